"""Training checkpoints on disk (common/run_state.py): rotation never deletes the newest checkpoint, a
save that fails (a full disk, simulated and on a real small tmpfs) ends the run with one ``error:`` line
naming the directory, the free space and the space needed, removes its ``.tmp`` and leaves the previous
checkpoint and ``latest`` intact; a stale ``step_*.tmp`` never blocks a start."""
from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import accelerate.checkpointing as checkpointing
import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from bad_inputs import cli, train
from common.run_state import save_training_state
from tiny import TINY_AUTOENCODER

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ("run.log_every=1", "run.sample_every=100000", "run.cpu_threads=1", "run.save_every=3")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("state") / "ae.yaml"
    path.write_text(yaml.safe_dump(TINY_AUTOENCODER))
    return path


@pytest.mark.parametrize("keep", [-1, 0, 1])
def test_rotation_never_deletes_the_newest_checkpoint(keep, tmp_path):
    accelerator = Accelerator(cpu=True)
    try:
        accelerator.prepare(torch.nn.Linear(2, 2))
        for step in (1, 2, 3):
            save_training_state(accelerator, tmp_path, step, keep)
            root = tmp_path / "checkpoints"
            assert (root / f"step_{step:08d}" / "step.json").is_file(), f"keep={keep} deleted the newest"
            assert (root / "latest").read_text() == f"step_{step:08d}"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def fill_disk_at(monkeypatch, step: int) -> None:
    """accelerate's writes into the checkpoint of ``step`` hit a full disk: half a file, then ENOSPC."""
    real_save = checkpointing.save

    def save(obj, f, *args, **kwargs):
        if Path(f).parent.name != f"step_{step:08d}.tmp":
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(checkpointing, "save", save)


@pytest.mark.parametrize("step", [3, 6])
def test_a_full_disk_during_a_save_is_one_error_and_keeps_the_previous_checkpoint(step, config, tmp_path,
                                                                                   monkeypatch, capsys):
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    fill_disk_at(monkeypatch, step)
    message = cli("autoencoder.train", config, f"run.out_dir={run_dir}", "run.steps=7", *RUN)
    previous = root / "step_00000003" if step == 6 else None
    basis = f"the size of {previous}" if previous else "an estimate from the models and optimizers"
    for words in (f"error: cannot save the checkpoint of step {step} in {root}: No space left on device",
                  "free there before this save, about ", f"MB needed ({basis})", "choose a run.out_dir",
                  f"{previous} and latest are intact" if previous else "no checkpoint was written before this"):
        assert words in message, f"{words!r} not in: {message}"
    assert not list(root.glob("*.tmp")), "the partial checkpoint is removed"
    assert [p.name for p in root.iterdir() if p.name != "latest"] == ([previous.name] if previous else [])
    if previous:
        assert (root / "latest").read_text() == previous.name
    monkeypatch.undo()  # space freed: the same command resumes
    capsys.readouterr()
    train("autoencoder.train", config, f"run.out_dir={run_dir}", "run.steps=7", *RUN)
    assert (f"resumed from {previous} at step 3" in capsys.readouterr().out) == bool(previous)
    assert (root / "latest").read_text() == "step_00000007"


def test_a_stale_tmp_is_removed_at_the_start(config, tmp_path):
    stale = tmp_path / "run" / "checkpoints" / "step_00000009.tmp"
    stale.mkdir(parents=True)
    (stale / "optimizer.bin").write_bytes(b"half")
    (stale / "step.json").write_text('{"step": 9}')  # a .tmp never counts as a checkpoint, even so
    train("autoencoder.train", config, f"run.out_dir={tmp_path / 'run'}", "run.steps=2", *RUN)
    assert not stale.exists()
    assert (stale.parent / "latest").read_text() == "step_00000002"


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MB tmpfs (the tiny autoencoder's training state is 3.1 MB: one checkpoint fits, two do not)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_tmpfs_ends_with_one_error_and_the_next_start_is_not_blocked(config, small_disk, capsys):
    run_dir, root = small_disk / "run", small_disk / "run" / "checkpoints"
    message = cli("autoencoder.train", config, f"run.out_dir={run_dir}", "run.steps=7", *RUN)
    assert f"cannot save the checkpoint of step 6 in {root}: a write failed" in message
    assert f"about 3.1 MB needed (the size of {root / 'step_00000003'})" in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003"]
    assert (root / "latest").read_text() == "step_00000003"
    # a save killed mid-way leaves its .tmp, filling the disk: the next start must still get going
    stale = root / "step_00000006.tmp"
    stale.mkdir()
    with open(stale / "optimizer.bin", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    capsys.readouterr()
    message = cli("autoencoder.train", config, f"run.out_dir={run_dir}", "run.steps=4", *RUN)
    assert f"resumed from {root / 'step_00000003'} at step 3" in capsys.readouterr().out, "the start went through"
    assert not stale.exists()
    # and trained on: its own save then needs a second 3.1 MB (rotation waits for the new checkpoint)
    assert f"cannot save the checkpoint of step 4 in {root}" in message
