"""Run a training entry point and SIGKILL it half-way through writing one file of one checkpoint.

    python tests/kill_during_save.py MODULE STEP FILE CONFIG [key=value ...]

MODULE is the training script's module (``autoencoder.train``, ``diffusion.train_latent``,
``prior.train``). When accelerate has written FILE (e.g. ``optimizer.bin``) into the checkpoint of
optimizer step STEP, the file is cut to half its size and the process kills itself with SIGKILL: the
state a power cut or the OOM killer leaves behind, reproduced at a chosen point instead of by timing
(a tiny model writes its checkpoint in milliseconds). A helper of ``tests/test_faults.py``.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when run by hand

import accelerate.checkpointing as checkpointing  # noqa: E402


def main(argv: list[str]) -> None:
    module, step, victim, *train_argv = argv
    checkpoint_dir = f"step_{int(step):08d}.tmp"  # common.training.save_training_state writes here first
    real_save = checkpointing.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        path = Path(f)
        if path.parent.name == checkpoint_dir and path.name == victim:
            with open(path, "r+b") as handle:
                handle.truncate(path.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpointing.save = save  # accelerate looks the name up in its module at call time
    importlib.import_module(module).main(train_argv)
    raise SystemExit(f"{module} finished without writing {victim} for step {step}")


if __name__ == "__main__":
    main(sys.argv[1:])
