"""Faults: a run stopped and resumed, a SIGKILL while a checkpoint is written, non-finite losses, DDP.

Where each fault of issue #7 is tested:

(a) stop at step N, resume, and the next losses equal those of an uninterrupted run (CPU, fixed seed),
    for every stage, in the stage's own tests:
      autoencoder  tests/test_autoencoder_train.py::test_resume_reproduces_the_uninterrupted_run
      diffusion    tests/test_diffusion_train.py::test_resume_reproduces_the_uninterrupted_run
      prior        tests/test_prior_train.py::test_resume_reproduces_the_uninterrupted_run
    and here, after a kill, from a checkpoint older than the step the run had reached (b).
(b) SIGKILL while a checkpoint is written: a component directory in
    tests/test_checkpoint.py::test_sigkill_during_save_keeps_previous_checkpoint; the full training
    state (common.training.save_training_state) here.
(c) NaN/inf losses in each of the three training scripts: skipped with a message, the run stops after
    more than run.max_skipped_steps in a row with a clear error, and its last checkpoint resumes.
(d) two-process DDP (gloo on CPU): averaged gradients equal one process's on the full batch.

The training runs call the scripts' ``main`` in this process (an interpreter per run costs seconds);
the killed run and the DDP run are separate processes.
"""
from __future__ import annotations

import importlib
import itertools
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import ddp_grad_check
from common.training import NonFiniteLossError, read_metrics
from tiny import TINY_AUTOENCODER, make_tiny_autoencoder, make_tiny_text_encoder, tiny_prior_config, train_in_process

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
NAN_RUN = ("run.steps=20", "run.save_every=3", "run.max_skipped_steps=2", "run.sample_every=1000",
           "run.log_every=1", "run.cpu_threads=1")


def train(module: str, config: Path, *overrides: str) -> None:
    """One run of a training script's ``main`` in this process."""
    train_in_process(importlib.import_module(module).main, config, *overrides)


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    """A tiny config file for each stage (the diffusion and prior ones over a tiny random autoencoder)."""
    root = tmp_path_factory.mktemp("faults")
    stage1 = make_tiny_autoencoder(root / "stage1")
    files = {
        "autoencoder.train": TINY_AUTOENCODER,
        "diffusion.train_latent": {
            "autoencoder": str(stage1), "cache_dir": str(root / "latents"),
            "model": {"block_channels": [16, 32], "attention_levels": [False, True], "layers_per_block": 1,
                      "head_dim": 8, "context_dim": 32},
            "diffusion": {"num_steps": 100},
            "text": {"name_or_path": str(make_tiny_text_encoder(root / "text"))},
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            "data": {"name": "shapes", "resolution": 16, "size": 32},
            "run": {"batch_size": 4, "precision": "no", "progress": False, "ema_decay": 0.9},
            "sample": {"prompts": ["a small red circle at the top left"], "per_prompt": 1, "steps": 2},
        },
        "prior.train": tiny_prior_config(stage1, root / "tokens"),
    }
    paths = {}
    for module, config in files.items():
        paths[module] = root / f"{module}.yaml"
        paths[module].write_text(yaml.safe_dump(config))
    return paths


# ------------------------------------------------------------------------------------------------ (b)
def test_sigkill_while_writing_a_training_checkpoint_resumes_from_the_previous_one(configs, tmp_path, capsys):
    config, module = configs["autoencoder.train"], "autoencoder.train"
    common = ("run.steps=7", "run.save_every=3", "run.cpu_threads=1")
    train(module, config, f"run.out_dir={tmp_path / 'full'}", *common)
    killed = subprocess.run(
        [sys.executable, "tests/kill_during_save.py", module, "6", "optimizer.bin", str(config),
         f"run.out_dir={tmp_path / 'split'}", *common],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "split" / "checkpoints"
    half_written = checkpoints / "step_00000006.tmp" / "optimizer.bin"
    assert half_written.is_file() and not (checkpoints / "step_00000006").exists()
    assert (checkpoints / "latest").read_text() == "step_00000003"

    capsys.readouterr()
    train(module, config, f"run.out_dir={tmp_path / 'split'}", *common)  # the same command again
    assert f"resumed from {checkpoints / 'step_00000003'} at step 3" in capsys.readouterr().out
    assert not list(checkpoints.glob("*.tmp")), "the half-written checkpoint is cleaned up"
    keys = ("total", "l1", "codebook", "gan", "disc_loss")
    full = {m["step"]: {k: m.get(k) for k in keys} for m in read_metrics(tmp_path / "full")}
    split = {m["step"]: {k: m.get(k) for k in keys} for m in read_metrics(tmp_path / "split")}
    assert [m["step"] for m in read_metrics(tmp_path / "split")] == list(range(1, 8)), "the resume re-logs 4-6 once"
    for step in range(4, 8):
        assert split[step] == full[step], f"step {step} after the resume: {split[step]} != {full[step]}"
    weights = [load_file(tmp_path / run / "autoencoder" / "model.safetensors") for run in ("full", "split")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "EMA weights differ after the kill"


# ------------------------------------------------------------------------------------------------ (c)
LOSSES = {  # where each script gets its loss: (module, function, field of the result or None for a tensor)
    "autoencoder.train": ("autoencoder.losses", "autoencoder_loss", "total"),
    "diffusion.train_latent": ("diffusion.train_latent", "training_loss", None),
    "prior.train": ("prior.train", "next_token_loss", "loss"),
}


def poison_losses(monkeypatch, module: str, bad_calls) -> None:
    """Make the loss of the micro-steps numbered in ``bad_calls`` (from 1) NaN or inf."""
    owner, name, field = LOSSES[module]
    target = importlib.import_module(owner)
    real, calls = getattr(target, name), itertools.count(1)

    def poisoned(*args, **kwargs):
        result, call = real(*args, **kwargs), next(calls)
        if not bad_calls(call):
            return result
        factor = float("nan") if call % 2 else float("inf")
        return result * factor if field is None else result._replace(**{field: getattr(result, field) * factor})

    monkeypatch.setattr(target, name, poisoned)


@pytest.mark.parametrize("module", list(LOSSES))
def test_non_finite_losses_are_skipped_then_stop_the_run(module, configs, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    # micro-steps 3-4: two bad ones in a row, skipped; 5-7 train (steps 3-5, a checkpoint at 3);
    # from 8 on every loss is bad: 8 and 9 are skipped, 10 is one too many for max_skipped_steps=2
    poison_losses(monkeypatch, module, lambda call: call in (3, 4) or call >= 8)
    with pytest.raises(NonFiniteLossError) as stopped:
        train(module, configs[module], f"run.out_dir={run_dir}", *NAN_RUN)
    out = capsys.readouterr().out
    assert out.count("update skipped") == 5
    assert "step 2: non-finite loss (nan), update skipped (1 in a row" in out
    assert "step 2: non-finite loss (inf), update skipped (2 in a row" in out
    message = str(stopped.value)
    for words in ("stopping at step 5", "3 non-finite losses in a row", "run.max_skipped_steps=2",
                  f"{run_dir / 'checkpoints' / 'step_00000003'}, is intact", "optim.lr"):
        assert words in message
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000003" and not list(checkpoints.glob("*.tmp"))
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    for weights in (checkpoints / "step_00000003").glob("model*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(weights).values() if t.is_floating_point())

    monkeypatch.undo()  # the cause is fixed: the same command resumes from the last checkpoint
    train(module, configs[module], f"run.out_dir={run_dir}", *NAN_RUN[1:], "run.steps=5")
    assert f"resumed from {checkpoints / 'step_00000003'} at step 3" in capsys.readouterr().out
    assert (checkpoints / "latest").read_text() == "step_00000005"


def test_a_non_finite_discriminator_loss_skips_only_the_discriminator_update(configs, tmp_path, monkeypatch):
    from autoencoder import losses

    real, calls = losses.discriminator_loss, itertools.count(1)

    def poisoned(*args, **kwargs):  # the discriminator's first two updates (at steps 2 and 3) get a NaN loss
        loss, logs = real(*args, **kwargs)
        return (loss * float("nan"), logs) if next(calls) <= 2 else (loss, logs)

    monkeypatch.setattr(losses, "discriminator_loss", poisoned)
    run_dir = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="step 3: non-finite discriminator loss") as caught:
        train("autoencoder.train", configs["autoencoder.train"], f"run.out_dir={run_dir}", *NAN_RUN[1:],
              "run.steps=5")
    assert sum("non-finite discriminator loss" in str(w.message) for w in caught) == 2
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5], "the autoencoder's updates all count"
    # logged after the update at step N as step N + 1; the discriminator trains from step 2 (disc_start)
    assert [m.get("disc_skipped", 0.0) for m in metrics] == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert "disc_loss" not in metrics[3] and math.isfinite(metrics[4]["disc_loss"])
    weights = sorted((run_dir / "checkpoints" / "step_00000005").glob("model*.safetensors"))
    assert len(weights) == 2, "the autoencoder and the discriminator"
    for path in weights:
        assert all(torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------------ (d)
def free_port() -> int:
    """A TCP port nobody listens on now (other test sessions may share this machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ddp_gradients_equal_one_process_on_the_full_batch(tmp_path):
    out = tmp_path / "grads.pt"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "tests/ddp_grad_check.py", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    gathered = torch.load(out)
    assert gathered["processes"] == 2
    for name in ddp_grad_check.MODELS:
        batch = ddp_grad_check.full_batch(name)
        model = ddp_grad_check.build(name)
        ddp_grad_check.loss_of(name, model, batch).backward()
        expected = ddp_grad_check.flat_grads(model)
        half = ddp_grad_check.build(name)
        ddp_grad_check.loss_of(name, half, {k: v[:2] for k, v in batch.items()}).backward()
        assert (ddp_grad_check.flat_grads(half) - expected).abs().max() > 1e-3, "halves differ: not vacuous"
        assert torch.equal(gathered[name][0], gathered[name][1]), f"{name}: processes hold different gradients"
        torch.testing.assert_close(gathered[name][0], expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
