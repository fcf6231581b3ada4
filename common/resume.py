"""Resuming a run: find its newest complete checkpoint, restore it, and record the config it continues with.

Every training script calls :func:`resume_run` once, after ``accelerator.prepare`` and after registering
what else it checkpoints (the EMA), so that what is checked and applied on resume lives in one place.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from accelerate import Accelerator

from common.checkpoint import CheckpointError
from common.config import dump_config
from common.training import latest_checkpoint, resolved_config


def resume_run(accelerator: Accelerator, cfg: Any, optimizers: Sequence[Any] = (),
               schedulers: Sequence[Any] = ()) -> int:
    """Restore the newest checkpoint of ``cfg.run.out_dir`` (step 0 when there is none) and write the
    resolved config to ``config.yaml``; returns the step training continues from.

    ``optimizers`` and ``schedulers`` are the restored objects the run's ``optim`` settings apply to.
    """
    out_dir = cfg.run.out_dir
    step = resume_training_state(accelerator, out_dir)
    if accelerator.is_main_process:  # after the resume: a config that does not fit leaves the old record
        dump_config(resolved_config(cfg, accelerator), f"{out_dir}/config.yaml")
    return step


def resume_training_state(accelerator: Accelerator, run_dir: str | Path) -> int:
    """Restore the newest checkpoint of ``run_dir`` if there is one; return its step (0 otherwise).

    Raises:
        CheckpointError: the checkpoint does not load (damaged files, or a config that changed the
            models' shapes); the message names it and the ways out.
    """
    path = latest_checkpoint(run_dir)
    if path is None:
        return 0
    try:
        accelerator.load_state(str(path))
        step = int(json.loads((path / "step.json").read_text())["step"])
    except Exception as error:  # noqa: BLE001 - whatever failed, the user needs the same advice
        reason = " ".join(str(error).split())
        reason = reason if len(reason) <= 600 else reason[:600] + " ..."
        raise CheckpointError(
            f"cannot resume from {path}: {type(error).__name__}: {reason}. If the model config changed since "
            f"this checkpoint was written (its config is {Path(run_dir) / 'config.yaml'}), put it back or choose "
            f"a new run.out_dir; if the checkpoint is damaged, delete {path} to resume from the one before it."
        ) from error
    accelerator.print(f"resumed from {path} at step {step}")
    return step
