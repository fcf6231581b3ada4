"""The training entry point end to end: resume is exact, two-process DDP trains, bad keys fail early."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from autoencoder.model import Autoencoder
from common.training import read_metrics
from tiny import TINY_AUTOENCODER as TINY

ROOT = Path(__file__).resolve().parents[1]


def train(tmp_path: Path, *overrides: str, processes: int = 1) -> subprocess.CompletedProcess:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if processes == 1:
        command = [sys.executable, "autoencoder/train.py"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29517", "autoencoder/train.py"]
    result = subprocess.run(command + [str(config), *overrides], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses_by_step(run_dir: Path) -> dict[int, dict]:
    keys = ("total", "l1", "codebook", "gan", "disc_loss")
    return {m["step"]: {k: m[k] for k in keys if k in m} for m in read_metrics(run_dir)}


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    train(tmp_path, f"run.out_dir={tmp_path / 'full'}", "run.steps=6")
    train(tmp_path, f"run.out_dir={tmp_path / 'split'}", "run.steps=3")
    second = train(tmp_path, f"run.out_dir={tmp_path / 'split'}", "run.steps=6")
    assert "resumed from" in second.stdout + second.stderr
    full, split = losses_by_step(tmp_path / "full"), losses_by_step(tmp_path / "split")
    assert set(full) == set(range(1, 7)) and "disc_loss" in full[6] and full[6]["gan"] != 0
    for step in (4, 5, 6):  # after the resume: discriminator and adversarial term both active
        assert split[step] == full[step], f"step {step}: {split[step]} != {full[step]}"


def test_run_directory_is_loadable_and_complete(tmp_path):
    run_dir = tmp_path / "run"
    train(tmp_path, f"run.out_dir={run_dir}", "run.steps=4")
    model = Autoencoder.from_pretrained(run_dir / "autoencoder")
    assert model.config.codebook_size == 32
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["steps"] == 4
    assert (run_dir / "samples" / "step_00000004.png").is_file() and (run_dir / "samples" / "final.png").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    assert any((run_dir / "tensorboard").iterdir())


def test_two_process_ddp_trains(tmp_path):
    run_dir = tmp_path / "ddp"
    train(tmp_path, f"run.out_dir={run_dir}", "run.steps=4", processes=2)
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4], "only the main process writes metrics"
    assert all(m["total"] == m["total"] for m in metrics)  # finite
    assert len(list((run_dir / "checkpoints" / "step_00000004").glob("random_states_*.pkl"))) == 2
    Autoencoder.from_pretrained(run_dir / "autoencoder")


def test_bad_override_fails_before_training(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    result = subprocess.run([sys.executable, "autoencoder/train.py", str(config), "optim.lrr=1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Did you mean 'lr'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bf16_with_gradient_accumulation_counts_optimizer_steps(tmp_path):
    run_dir = tmp_path / "accum"
    train(tmp_path, f"run.out_dir={run_dir}", "run.steps=3", "run.grad_accum=2", "run.precision=bf16")
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["total"] == m["total"] for m in metrics)
    assert json.loads((run_dir / "checkpoints" / "step_00000003" / "step.json").read_text())["step"] == 3
