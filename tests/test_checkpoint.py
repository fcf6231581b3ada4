from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from common.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_component,
    load_legacy_checkpoint,
    load_state_strict,
    read_component_config,
    save_component,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TinyConfig:
    width: int = 4


def test_round_trip_is_exact(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    save_component(tmp_path / "c", "tiny", TinyConfig(4), model)
    config, state = load_component(tmp_path / "c", "tiny", TinyConfig)
    assert config == TinyConfig(4)
    other = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    load_state_strict(other, state)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert not [p for p in (tmp_path / "c").iterdir() if ".tmp" in p.name]


def test_tied_weights_save(tmp_path):
    model = nn.Linear(3, 3)
    save_component(tmp_path, "tiny", TinyConfig(), {"a": model.weight, "b": model.weight})
    assert set(load_component(tmp_path, "tiny", TinyConfig)[1]) == {"a", "b"}


def test_strict_loading_names_missing_unexpected_and_shapes():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    state = dict(model.state_dict())
    del state["1.bias"]
    state["2.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(5, 4)
    with pytest.raises(CheckpointError) as error:
        load_state_strict(model, state, source="run/model.safetensors")
    message = str(error.value)
    assert "1 missing keys: 1.bias" in message and "1 unexpected keys: 2.weight" in message
    assert "0.weight: (5, 4) in run/model.safetensors, (3, 4) in the model" in message


def test_wrong_kind_and_missing_files(tmp_path):
    save_component(tmp_path / "unet", "unet", TinyConfig(), nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="holds a 'unet' component, but a 'autoencoder'"):
        read_component_config(tmp_path / "unet", "autoencoder", TinyConfig)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_component(tmp_path / "nothing", "unet", TinyConfig)
    (tmp_path / "unet" / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_component(tmp_path / "unet", "unet", TinyConfig)
    (tmp_path / "unet" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_component(tmp_path / "unet", "unet", TinyConfig)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_legacy_checkpoint_refuses_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.ckpt", "wb") as handle:
        pickle.dump({"state_dict": {}, "hook": Payload()}, handle)
    with pytest.raises(CheckpointError, match="pickled code is never executed"):
        load_legacy_checkpoint("evil.ckpt")
    assert not (tmp_path / "PWNED").exists()
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, "good.ckpt")
    assert load_legacy_checkpoint("good.ckpt")["global_step"] == 3


WRITER = """
import sys, torch
from dataclasses import dataclass
from common.checkpoint import save_component
@dataclass(frozen=True)
class TinyConfig:
    width: int = 4
big = {f"w{i}": torch.full((4_000_000,), 2.0) for i in range(16)}  # 256 MB: the write takes a while
while True:
    save_component(sys.argv[1], "tiny", TinyConfig(width=8), big)
"""


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    target = tmp_path / "component"
    previous = {"w0": torch.ones(10)}
    save_component(target, "tiny", TinyConfig(width=4), previous)
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not any(".tmp-" in p.name for p in target.iterdir()):
            assert child.poll() is None and time.time() < deadline, "the writer never started a save"
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)  # mid-write: the temporary file exists, the rename has not happened
    finally:
        child.kill()
        child.wait()
    config, state = load_component(target, "tiny", TinyConfig)
    assert config == TinyConfig(width=4) and torch.equal(state["w0"], previous["w0"])


def test_saved_files_are_readable_by_others(tmp_path):
    umask = os.umask(0o022)
    try:
        save_component(tmp_path, "tiny", TinyConfig(), nn.Linear(2, 2))
    finally:
        os.umask(umask)
    assert (tmp_path / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / CONFIG_FILE).stat().st_mode & 0o777 == 0o644
