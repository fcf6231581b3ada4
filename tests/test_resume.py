"""Resuming under a changed command: safe changes are allowed and recorded, optimizer settings and the EMA
decay are applied to the restored objects (accelerate would restore the checkpoint's), a precision that
auto picks differently on another machine continues the run, and the documented fork works.

Refused changes and planted pickles are in the catalogue, test_bad_resumes.py.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from bad_inputs import cli, train
from common import training
from common.ema import EMA
from common.resume import RESUME_SAFE, resume_run, resume_safety
from common.training import OptimConfig, RunConfig, cosine_warmup, read_metrics
from tiny import TINY_AUTOENCODER

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class TinyConfig:
    """The smallest config resume_run accepts: an optimizer, a run and one model setting."""

    width: int = 2
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _start(cfg: TinyConfig, steps: int = 0):
    """resume_run on a fresh Linear model, as a training script calls it; then ``steps`` steps."""
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    model = torch.nn.Linear(cfg.width, 2)
    opt, sched = training.make_optimizer(model.parameters(), cfg.optim)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    ema = EMA(accelerator.unwrap_model(model), cfg.run.ema_decay)
    accelerator.register_for_checkpointing(ema)
    step = resume_run(accelerator, cfg, (opt,), (sched,))
    for _ in range(steps):
        model(torch.randn(4, cfg.width)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        step += 1
    return accelerator, opt, sched, ema, step


def test_optimizer_settings_and_ema_decay_are_applied_on_resume(tmp_path):
    run = RunConfig(out_dir=str(tmp_path), precision="no", ema_decay=0.9)
    old = TinyConfig(optim=OptimConfig(lr=1e-3, betas=(0.9, 0.99), warmup_steps=2, decay_steps=10), run=run)
    accelerator, *_ = _start(old, steps=4)
    training.save_training_state(accelerator, tmp_path, 4)
    optim = OptimConfig(lr=0.1, betas=(0.5, 0.6), weight_decay=0.3, warmup_steps=2, decay_steps=20, lr_floor=0.5)
    new = TinyConfig(optim=optim, run=RunConfig(out_dir=str(tmp_path), precision="no", ema_decay=0.5))
    _, opt, sched, ema, step = _start(new)
    expected = 0.1 * cosine_warmup(4, 2, 20, 0.5)  # the new rate and schedule at the restored step
    assert step == 4 and sched.get_last_lr() == [expected] and sched.scheduler.base_lrs == [0.1]
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["initial_lr"]) == (expected, (0.5, 0.6), 0.3, 0.1)
    assert ema.decay == 0.5 and ema.updates == 0  # updates: the checkpoint's (the test's loop has no EMA)
    sched.step()
    assert sched.get_last_lr() == [0.1 * cosine_warmup(5, 2, 20, 0.5)], "the next step follows the new schedule"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.1


def test_an_unchanged_resume_restores_the_checkpoint_values_exactly(tmp_path):
    cfg = TinyConfig(optim=OptimConfig(lr=3e-3, warmup_steps=3, decay_steps=7),
                     run=RunConfig(out_dir=str(tmp_path), precision="no"))
    accelerator, opt, sched, _, _ = _start(cfg, steps=5)
    saved = ([dict(g, params=None) for g in opt.param_groups], sched.get_last_lr())
    training.save_training_state(accelerator, tmp_path, 5)
    _, opt, sched, _, step = _start(cfg)
    assert step == 5 and ([dict(g, params=None) for g in opt.param_groups], sched.get_last_lr()) == saved


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny autoencoder YAML and a 2-step run of it (two optimizers, checkpoint at step 2)."""
    root = tmp_path_factory.mktemp("resume")
    (root / "ae.yaml").write_text(yaml.safe_dump(TINY_AUTOENCODER))
    _train_ae(root / "ae.yaml", f"run.out_dir={root / 'run'}", "run.steps=2", "run.save_every=2", "run.cpu_threads=1")
    return root / "ae.yaml", root / "run"


def _train_ae(config: Path, *overrides: str) -> None:
    train("autoencoder.train", str(config), *overrides)


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_safe_changes_are_recorded_and_optim_lr_trains_at_the_new_rate(stage1, tmp_path, capsys):
    config, run = stage1[0], _copy(stage1[1], tmp_path)
    capsys.readouterr()
    _train_ae(config, f"run.out_dir={run}", "run.steps=4", "run.log_every=2", "optim.lr=0.05", "run.cpu_threads=1")
    out = capsys.readouterr().out
    assert "resumed from" in out and "resumed with changes (recorded in config.yaml): " in out
    assert "optim.lr: 0.001 -> 0.05 (applied to the restored optimizers and schedulers)" in out
    assert "run.log_every: 1 -> 2, run.save_every: 2 -> 3 (cadence)" in out and "run.steps: 2 -> 4 (budget)" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["optim"]["lr"], saved["run"]["steps"], saved["run"]["log_every"]) == (0.05, 4, 2)
    logged = {m["step"]: m["lr"] for m in read_metrics(run)}
    assert logged[4] == pytest.approx(0.05 * cosine_warmup(4, 2, 8, 0.1), rel=1e-6), "lr override ignored"


def test_precision_picked_differently_on_another_machine_continues_the_run(stage1, tmp_path, capsys):
    """auto may pick bf16 on one CPU kind and fp32 on another; a requeued job continues (fp32 state in both)."""
    config, run = stage1[0], _copy(stage1[1], tmp_path)
    _train_ae(config, f"run.out_dir={run}", "run.steps=3", "run.precision=bf16", "run.cpu_threads=1")
    assert "run.precision: 'fp32' -> 'bf16' (this machine's precision)" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["precision"] == "bf16"
    assert max(m["step"] for m in read_metrics(run)) == 3


def test_the_printed_fork_starts_a_new_run_from_the_checkpoint(stage1, tmp_path, capsys):
    config, run = stage1[0], _copy(stage1[1], tmp_path)
    message = cli("autoencoder.train", str(config), f"run.out_dir={run}", "loss.disc_weight=0.25", "run.steps=3",
                  "run.cpu_threads=1")
    command = message.split("with the new values: ")[1].split(" then run this command")[0]
    subprocess.run(command, shell=True, cwd=tmp_path, check=True)
    capsys.readouterr()
    _train_ae(config, f"run.out_dir={tmp_path / 'NEW'}", "loss.disc_weight=0.25", "run.steps=3", "run.cpu_threads=1")
    assert f"resumed from {tmp_path / 'NEW' / 'checkpoints' / 'step_00000002'} at step 2" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "NEW" / "config.yaml").read_text())["loss"]["disc_weight"] == 0.25
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"]["disc_weight"] == 0.5, "the old run changed"


def test_one_table_says_what_a_resume_may_change():
    allowed = ["run.steps", "run.max_minutes", "run.save_every", "run.keep_checkpoints", "run.precision",
               "optim.lr", "optim.betas", "sample.guidance", "run.out_dir"]
    refused = ["model.base_channels", "autoencoder", "tokens.autoencoder", "data.name", "text.name_or_path",
               "diffusion.num_steps", "loss.disc_weight", "run.batch_size", "run.grad_accum", "run.seed",
               "model.quantizer.codebook_size", "optim"]
    assert all(resume_safety(key) for key in allowed) and not any(resume_safety(key) for key in refused)
    assert all(resume_safety(pattern.replace("*", "x")) == note for pattern, note in RESUME_SAFE.items())
