"""The weights hash in config.json: recorded by every save, verified by every load (whole file up to
FULL_CHECK_BYTES, header + strided blocks above), absent in older components (they load with a warning)."""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from common import integrity
from common.checkpoint import CheckpointError, load_component, load_module, save_component
from common.integrity import UnverifiedWeightsWarning, verify_weights


@dataclass(frozen=True)
class LinearConfig:
    width: int = 64


def build(config: LinearConfig) -> nn.Module:
    return nn.Linear(config.width, config.width)


def saved(directory: Path, width: int = 64) -> Path:
    torch.manual_seed(0)
    return save_component(directory, "linear", LinearConfig(width), build(LinearConfig(width)))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def meta(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def test_save_records_the_sha256_of_the_weights_file(tmp_path):
    directory = saved(tmp_path / "c")
    weights = (directory / "model.safetensors").read_bytes()
    assert meta(directory)["weights"] == {"file": "model.safetensors", "bytes": len(weights),
                                          "sha256": hashlib.sha256(weights).hexdigest()}


def test_a_flipped_bit_is_refused_with_the_file_named(tmp_path):
    directory = saved(tmp_path / "c")
    model = load_module(directory, "linear", LinearConfig, build)  # intact: loads
    flip(directory / "model.safetensors", -7)  # the last weight's last byte: still a valid safetensors file
    for load in (lambda: load_component(directory, "linear", LinearConfig),
                 lambda: load_module(directory, "linear", LinearConfig, build)):
        with pytest.raises(CheckpointError, match=r"c/model\.safetensors: its SHA-256 .* differ from the sha256 "
                                                  r".*c/config\.json recorded"):
            load()
    assert model.weight.shape == (64, 64)


def test_components_saved_before_hashes_load_with_a_warning(tmp_path):
    directory = saved(tmp_path / "c")
    old = meta(directory)
    del old["weights"]
    (directory / "config.json").write_text(json.dumps(old))
    with pytest.warns(UnverifiedWeightsWarning, match=r"model\.safetensors carries no hash .* save_pretrained it"):
        model = load_module(directory, "linear", LinearConfig, build)
    torch.manual_seed(0)
    assert torch.equal(model.weight, build(LinearConfig()).weight)


def test_large_files_take_the_sampled_fast_path(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "FULL_CHECK_BYTES", 4096)
    monkeypatch.setattr(integrity, "SAMPLE_BLOCKS", 4)
    monkeypatch.setattr(integrity, "BLOCK_BYTES", 256)
    directory = saved(tmp_path / "c", width=256)  # 263 KB, 4 blocks of 256 bytes sampled
    record = meta(directory)["weights"]
    weights = directory / "model.safetensors"
    assert record["bytes"] > 4096 and record["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    stride = record["bytes"] // 4
    flip(weights, stride + 10)  # inside the second sampled block
    with pytest.raises(CheckpointError, match="its header and sampled blocks .* differ from the sampled_sha256"):
        load_component(directory, "linear", LinearConfig)
    flip(weights, stride + 10)  # back
    flip(weights, stride + 1000)  # between sampled blocks: the fast path cannot see it ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_component(directory, "linear", LinearConfig)
    with pytest.raises(integrity.IntegrityError, match="its SHA-256"):  # ... the full check does
        verify_weights(weights, record, directory / "config.json", full=True)
