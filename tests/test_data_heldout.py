"""Held-out splits of the sources read from disk, and the two scripts that evaluate on them.

A folder or webdataset source gets a held-out split by a hash of each sample's key
(``data.heldout_fraction``) or from a separate path (``data.heldout_path``); ``autoencoder.evaluate``
reads every source through ``common.data`` and refuses a held-out split that does not exist; the
classifier script never scores its training items as held-out ones.
"""
from __future__ import annotations

import contextlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import autoencoder.evaluate as evaluate_module
from autoencoder import AutoencoderConfig, QuantizerConfig, build_autoencoder
from common.config import ConfigError
from common.data import DataConfig, build_dataset, has_heldout
from diffusion import train_classifier

pytestmark = pytest.mark.usefixtures("one_thread")
COUNT = 40
TINY = AutoencoderConfig(resolution=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                         z_channels=4, code_dim=4, quantizer=QuantizerConfig(codebook_size=16))


@pytest.fixture(autouse=True)
def index_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTGEN_CACHE_DIR", str(tmp_path / "cache"))


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _shards(root: Path, keys: range, per_shard: int = 10) -> str:
    """img2dataset-style shards (keys numbered across shards) of the samples ``keys``; a glob naming them."""
    root.mkdir(parents=True, exist_ok=True)
    for first in range(keys.start, keys.stop, per_shard):
        with tarfile.open(root / f"{first // per_shard:05d}.tar", "w") as tar:
            for key in range(first, min(first + per_shard, keys.stop)):
                for suffix, data in ((".png", _png(key)), (".txt", f"sample {key}".encode())):
                    info = tarfile.TarInfo(f"{key:09d}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{root}/*.tar"


def _captions(config: DataConfig) -> set[str]:
    dataset = build_dataset(config)
    return {dataset.caption(i) for i in range(len(dataset))}


def test_a_hash_holdout_splits_shards_disjointly_and_keeps_each_sample_in_its_split(tmp_path):
    config = DataConfig(name="webdataset", path=_shards(tmp_path / "shards", range(COUNT)), resolution=8,
                        heldout_fraction=0.25)
    train, heldout = _captions(config), _captions(DataConfig(**{**vars(config), "split": "heldout"}))
    assert not train & heldout and len(train | heldout) == COUNT and 3 <= len(heldout) <= 17
    assert _captions(DataConfig(**{**vars(config), "split": "all"})) == train | heldout
    assert has_heldout(config) and not has_heldout(DataConfig(name="webdataset", path=config.path))
    # more shards written later: the old samples stay where they were
    _shards(tmp_path / "shards", range(COUNT, COUNT + 20))
    grown = DataConfig(**{**vars(config), "split": "heldout"})
    assert _captions(grown) & {f"sample {i}" for i in range(COUNT)} == heldout
    item = build_dataset(grown)[0]
    assert item["image"].shape == (3, 8, 8) and item["caption"] in _captions(grown)


def test_a_folder_holds_out_by_path_hash_or_reads_a_separate_heldout_path(tmp_path):
    root, apart = tmp_path / "images", tmp_path / "apart"
    for folder, count in ((root, 20), (apart, 3)):
        folder.mkdir()
        for i in range(count):
            (folder / f"{i:03d}.png").write_bytes(_png(i))
            (folder / f"{i:03d}.txt").write_text(f"{folder.name} {i}")
    hashed = DataConfig(name="folder", path=str(root), resolution=8, heldout_fraction=0.3)
    train, heldout = _captions(hashed), _captions(DataConfig(**{**vars(hashed), "split": "heldout"}))
    assert not train & heldout and len(train | heldout) == 20 and heldout
    separate = DataConfig(name="folder", path=str(root), resolution=8, heldout_path=str(apart))
    assert _captions(DataConfig(**{**vars(separate), "split": "heldout"})) == {f"apart {i}" for i in range(3)}
    assert len(_captions(separate)) == 20  # train reads path whole


@pytest.mark.parametrize("changes, message", [
    ({"heldout_fraction": 1.0}, r"must be in \[0, 1\)"),
    ({"heldout_fraction": 0.1, "heldout_path": "/x"}, "not both"),
    ({"name": "shapes", "heldout_fraction": 0.1}, "apply to folder and webdataset, not shapes"),
])
def test_bad_heldout_settings_name_the_fix(tmp_path, changes, message):
    config = DataConfig(**{**vars(DataConfig(name="webdataset", path=_shards(tmp_path / "s", range(4)))), **changes})
    with pytest.raises(ConfigError, match=message):
        build_dataset(config)


def _autoencoder_run(tmp_path: Path) -> str:
    torch.manual_seed(0)
    build_autoencoder(TINY).eval().save_pretrained(tmp_path / "run" / "autoencoder")
    return str(tmp_path / "run")


def test_evaluate_reads_webdataset_and_hf_through_the_data_front_door(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate_module, "build_perceptual", lambda kind, weights="": None)
    run, shards = _autoencoder_run(tmp_path), _shards(tmp_path / "shards", range(COUNT))
    result = evaluate_module.main([run, "--data", "webdataset", "--path", shards, "data.heldout_fraction=0.25"])
    heldout = build_dataset(DataConfig(name="webdataset", path=shards, resolution=8, split="heldout",
                                       heldout_fraction=0.25))
    assert json.loads(capsys.readouterr().out) == result and result["images"] == len(heldout) < COUNT
    expected = evaluate_module.evaluate(build_autoencoder(TINY).eval(), DataConfig(
        name="webdataset", path=shards, resolution=8, split="heldout", heldout_fraction=0.25))
    assert result["images"] == expected["images"] and result["data"] == "webdataset"
    with pytest.raises(SystemExit, match="no held-out split: set data.heldout_fraction"):
        evaluate_module.main([run, "--data", "webdataset", "--path", shards])  # would score training images
    with pytest.raises(SystemExit, match="key=value with a key other than"):
        evaluate_module.main([run, "--data", "webdataset", "--path", shards, "path=/x"])
    datasets = pytest.importorskip("datasets")
    rows = {"img": [{"bytes": _png(i), "path": None} for i in range(6)], "txt": [f"s {i}" for i in range(6)]}
    features = datasets.Features({"img": datasets.Image(), "txt": datasets.Value("string")})
    whole = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": whole.select(range(4)), "test": whole.select(range(4, 6))}).save_to_disk(
        str(tmp_path / "hf"))
    result = evaluate_module.main([run, "--data", "hf", "--path", str(tmp_path / "hf"), "image_column=img",
                                   "caption_column=txt"])
    assert result["images"] == 2 and result["psnr"] > 0  # the test split


class _Accelerator:
    is_main_process, device = True, torch.device("cpu")

    def __init__(self) -> None:
        self.printed: list[str] = []

    def main_process_first(self):
        return contextlib.nullcontext()

    def print(self, text: str) -> None:
        self.printed.append(text)


def _fake_caches(monkeypatch) -> list[DataConfig]:
    """Replace the latent cache by 20 labelled latents per data config; record which configs were read."""
    read: list[DataConfig] = []

    class Cache:
        def __init__(self) -> None:
            self.latents, self.labels = torch.randn(20, 4, 2, 2), torch.arange(20) % 2

        def __len__(self) -> int:
            return 20

    def load(cfg, pipeline, data, text, scale, device, progress):
        read.append(data)
        return Cache(), 2.0
    monkeypatch.setattr(train_classifier, "load_latents", load)
    return read


def test_the_classifier_holds_out_shards_or_reports_no_accuracy(tmp_path, monkeypatch):
    read, shards = _fake_caches(monkeypatch), _shards(tmp_path / "shards", range(8))
    plain = train_classifier.TrainConfig(target="label", data=DataConfig(name="webdataset", path=shards),
                                         eval=train_classifier.EvalConfig(items=5))
    accelerator = _Accelerator()
    train, heldout, _ = train_classifier.prepare_data(plain, Path("p"), None, 1.0, accelerator)
    assert heldout is None and len(read) == 1 and "heldout_fraction" in accelerator.printed[0]
    held = train_classifier.TrainConfig(target="label", eval=train_classifier.EvalConfig(items=5), data=DataConfig(
        name="webdataset", path=shards, heldout_fraction=0.2))
    train, heldout, _ = train_classifier.prepare_data(held, Path("p"), None, 1.0, _Accelerator())
    assert [(d.split, d.heldout_fraction) for d in read[1:]] == [("train", 0.2), ("heldout", 0.2)]
    assert len(heldout) == 5 and torch.equal(train[3]["latent"], train.latents[3] * 2.0)  # scaled when read
