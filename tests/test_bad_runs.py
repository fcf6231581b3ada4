"""Run values that would destroy work or crash later, refused at the training command lines before
anything is built or written: each message names the key, the value, the valid range and the fix.

The ranges live in the config dataclasses (``RunConfig`` and ``OptimConfig.__post_init__`` in
common/training.py). Also catalogued elsewhere for issue #12: a second launch on a running directory
(tests/test_run_lock.py), a failed save with a full disk (tests/test_run_state.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from bad_inputs import ROOT, cli

# (override, words in the message besides the key and the value)
RUN_VALUES = {
    "run.steps=-1": ">= 0",
    "run.max_minutes=-1": ">= 0",
    "run.max_minutes=.nan": ">= 0",
    "run.batch_size=0": ">= 1",
    "run.grad_accum=0": ">= 1",
    "run.seed=-1": "[0, 4294967295]",
    "run.log_every=0": ">= 1",
    "run.sample_every=0": "above run.steps never samples",
    "run.save_every=0": "saves at the end only",
    "run.keep_checkpoints=-1": "the newest checkpoint is always kept",
    "run.keep_checkpoints=0": ">= 1",
    "run.num_workers=-1": ">= 0",
    "run.ema_decay=1.5": "[0, 1]",
    "run.max_skipped_steps=-1": ">= 0",
    "run.cpu_threads=-2": "0 = automatic",
    "optim.lr=0": "finite number > 0",
    "optim.lr=-1e-4": "finite number > 0",
    "optim.lr=.inf": "finite number > 0",
    "optim.betas=[0.9,1.0]": "[0, 1)",
    "optim.betas=[-0.1,0.99]": "[0, 1)",
    "optim.weight_decay=-0.1": ">= 0",
    "optim.warmup_steps=-1": ">= 0",
    "optim.decay_steps=-5": "constant after the warm-up",
    "optim.lr_floor=2": "[0, 1]",
    "optim.grad_clip=-1": "0 = no clipping",
}
SCRIPTS = {  # every training command line, with a shipped config
    "autoencoder.train": "configs/autoencoder/shapes32_quick.yaml",
    "diffusion.train_latent": "configs/diffusion/shapes32_quick.yaml",
    "diffusion.train_classifier": "configs/classifier/shapes32_quick.yaml",
    "prior.train": "configs/prior/shapes32_quick.yaml",
}


@pytest.mark.parametrize("override", list(RUN_VALUES))
def test_an_out_of_range_run_value_is_refused_before_anything_is_written(override, tmp_path):
    key, value = override.split("=")
    section, name = key.split(".")
    run_dir = tmp_path / "run"
    message = cli("autoencoder.train", ROOT / SCRIPTS["autoencoder.train"], f"run.out_dir={run_dir}", override)
    shown = name if "[" not in value else f"{name}["
    for words in (f"{section}: {shown}", "is out of range", RUN_VALUES[override], f"set {name.split('[')[0]}"):
        assert words in message, f"{words!r} not in: {message}"
    assert not run_dir.exists(), "nothing is created for a refused run"


@pytest.mark.parametrize("module", list(SCRIPTS))
def test_every_training_command_line_refuses_destructive_run_values(module, tmp_path):
    run_dir = tmp_path / "run"
    message = cli(module, ROOT / SCRIPTS[module], f"run.out_dir={run_dir}", "run.keep_checkpoints=-1")
    assert "run: keep_checkpoints=-1 is out of range: it must be >= 1" in message
    assert not Path(run_dir).exists()
