"""Tests of the sources read from disk: the folder index (built once, reused, rebuilt on change), images
that fail only when read, webdataset shards and saved Hugging Face datasets giving the same items as
a folder of the same images, their errors, and two processes streaming shards across a resume."""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common.data.folder_index as folder_index
from common.config import ConfigError, load_config
from common.data import DataConfig, DataError, build_dataset, label_names
from common.data.folder import FolderDataset, SkippedImagesWarning
from common.data.folder_index import file_problem
from common.data.index_store import IndexWarning, index_root
from common.data.shards import expand_braces, shard_paths
from common.training import StreamSampler

ROOT = Path(__file__).resolve().parents[1]
COUNT = 12


@pytest.fixture(autouse=True)
def index_dir(tmp_path, monkeypatch) -> Path:
    """Indexes go to this test's own cache folder."""
    monkeypatch.setenv("LATENTGEN_CACHE_DIR", str(tmp_path / "cache"))
    return index_root()


def _image(seed: int, size: tuple[int, int] = (20, 14)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _encoded(seed: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    _image(seed).save(buffer, format=fmt)
    return buffer.getvalue()


def _folder(root: Path, count: int = COUNT) -> Path:
    """``count`` PNGs with .txt captions, in two class folders."""
    for i in range(count):
        path = root / ("cats" if i % 2 else "dogs") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_encoded(i, "PNG"))
        path.with_suffix(".txt").write_text(f"sample {i}")
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shards(root: Path, count: int = COUNT, per_shard: int = 4, extra: bool = False) -> str:
    """The same images as :func:`_folder`, in img2dataset-style shards; a brace pattern naming them.

    Captions alternate between ``.txt`` and img2dataset's ``.json``; ``extra`` adds a sample without image.
    """
    root.mkdir(parents=True, exist_ok=True)
    shards = (count + per_shard - 1) // per_shard
    for shard in range(shards):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                key = f"{i:03d}"
                _add(tar, f"{key}.png", _encoded(i, "PNG"))
                if i % 2:
                    _add(tar, f"{key}.json", json.dumps({"caption": f"sample {i}", "url": "x"}).encode())
                else:
                    _add(tar, f"{key}.txt", f"sample {i}".encode())
                _add(tar, f"{key}.cls", str(1 - i % 2).encode())  # the folder's label: dogs=1, cats=0
            if extra and shard == 0:
                _add(tar, "lonely.txt", b"a caption without an image")
    return f"{root}/{{00000..{shards - 1:05d}}}.tar"


def _by_caption(dataset) -> dict[str, dict]:
    return {item["caption"]: item for item in (dataset[i] for i in range(len(dataset)))}


def _assert_same_items(dataset, reference) -> None:
    items, expected = _by_caption(dataset), _by_caption(reference)
    assert sorted(items) == sorted(expected)
    for caption, item in items.items():
        assert item["label"] == expected[caption]["label"], caption
        assert torch.equal(item["image"], expected[caption]["image"]), caption


# ----------------------------------------------------------------------------------------- the folder index
def _count_checks(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = file_problem

    def counting(path):
        calls.append(Path(path).name)
        time.sleep(0.01)  # long enough for a second process (thread) to arrive while the first builds
        return original(path)

    monkeypatch.setattr(folder_index, "file_problem", counting)
    return calls


def test_the_index_is_built_once_and_reused_without_opening_an_image(tmp_path, monkeypatch, index_dir):
    root = _folder(tmp_path / "images")
    calls = _count_checks(monkeypatch)
    first = FolderDataset(root, 8)
    assert len(calls) == COUNT and len(first) == COUNT
    assert len(list(index_dir.glob("folder-*/index-*.npz"))) == 1
    assert not any(p.name.startswith(".") or p.suffix == ".npz" for p in root.rglob("*"))  # nothing written there
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or pytest.fail("an image was opened"))
    second = FolderDataset(root, 8)
    assert len(calls) == COUNT and not opened  # no check, no decode
    assert list(second.files) == list(first.files) and second.captions == first.captions
    assert second.classes == ["cats", "dogs"] and second.labels == first.labels


def test_a_changed_folder_is_indexed_again(tmp_path, monkeypatch):
    root = _folder(tmp_path / "images")
    calls = _count_checks(monkeypatch)
    FolderDataset(root, 8)
    (root / "dogs" / "000.txt").write_text("a new caption, longer")
    changed = FolderDataset(root, 8)
    assert len(calls) == 2 * COUNT and "a new caption, longer" in list(changed.captions)
    (root / "cats" / "new.png").write_bytes(_encoded(99, "PNG"))
    assert len(FolderDataset(root, 8)) == COUNT + 1


def test_concurrent_starts_build_the_index_once(tmp_path, monkeypatch):
    root = _folder(tmp_path / "images")
    calls = _count_checks(monkeypatch)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(len(FolderDataset(root, 8)))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [COUNT] * 3 and len(calls) == COUNT  # one built (under the lock), two waited and read


def test_an_image_that_fails_only_when_read_is_skipped_and_named(tmp_path, caplog):
    root = _folder(tmp_path / "images")
    whole = (root / "dogs" / "000.png").read_bytes()
    buffer = io.BytesIO()
    _image(7, (64, 64)).save(buffer, format="BMP")  # BMP headers carry no end marker: the index accepts it
    (root / "dogs" / "000.png").unlink()
    (root / "dogs" / "000.bmp").write_bytes(buffer.getvalue()[:1000])
    dataset = FolderDataset(root, 8)
    assert len(dataset) == COUNT and not dataset.skipped
    broken = [p.name for p in dataset.files].index("000.bmp")
    with caplog.at_level(logging.WARNING, logger="common.data.decoding"):
        item = dataset[broken]
        again = dataset[broken]
    assert item["caption"] == dataset.captions[broken + 1] and torch.equal(item["image"], again["image"])
    assert len(caplog.records) == 1 and "000.bmp" in caplog.text and "1 unreadable" in caplog.text
    assert list(dataset.unreadable) == [broken]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=COUNT)))
    assert batch["image"].shape == (COUNT, 3, 8, 8)  # the batch keeps its size
    (root / "dogs" / "000.bmp").write_bytes(whole)  # a file replaced by a good one is indexed again
    assert FolderDataset(root, 8)[broken]["caption"] == "sample 0"


def test_an_unwritable_index_folder_is_named_and_the_data_still_loads(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("LATENTGEN_CACHE_DIR", str(tmp_path / "a_file"))
    with pytest.warns(IndexWarning, match="cannot save the index .*Set \\$LATENTGEN_CACHE_DIR to a writable"):
        dataset = FolderDataset(_folder(tmp_path / "images", count=2), 8)
    assert [dataset[i]["caption"] for i in range(2)] == ["sample 1", "sample 0"]  # cats/001, dogs/000


# ----------------------------------------------------------------------------------------- webdataset and hf
def test_webdataset_shards_give_the_folder_items(tmp_path):
    folder = FolderDataset(_folder(tmp_path / "images"), 8)
    spec = _shards(tmp_path / "shards", extra=True)
    with pytest.warns(SkippedImagesWarning, match="lonely"):
        shards = build_dataset(DataConfig(name="webdataset", path=spec, resolution=8))
    assert len(shards) == COUNT and len(shards.shards) == 3
    _assert_same_items(shards, folder)
    with pytest.warns(SkippedImagesWarning):  # the index is reused, the report repeated
        assert build_dataset(DataConfig(name="webdataset", path=str(tmp_path / "shards"), resolution=8)).keys \
            == shards.keys


def test_shard_specs_and_their_errors(tmp_path):
    assert expand_braces("a{08..11}b{x,y}") == ["a08bx", "a08by", "a09bx", "a09by", "a10bx", "a10by", "a11bx",
                                                "a11by"]
    spec = _shards(tmp_path / "shards")
    every = shard_paths(spec)
    assert [p.name for p in every] == ["00000.tar", "00001.tar", "00002.tar"]
    assert shard_paths(f"{tmp_path}/shards/0000[12].tar::{every[0]}") == every[1:] + every[:1]
    missing = r"5 shard\(s\) of data.path=.* do not exist: .*00003.tar, .*00005.tar and 2 more.*brace pattern"
    with pytest.raises(DataError, match=missing):
        shard_paths(f"{tmp_path}/shards/{{00000..00007}}.tar")
    with pytest.raises(DataError, match="no file matches"):
        shard_paths(f"{tmp_path}/none-*.tar")
    with tarfile.open(tmp_path / "packed.tar.gz", "w:gz") as tar:
        _add(tar, "0.png", _encoded(0, "PNG"))
    with pytest.raises(DataError, match="not a readable uncompressed tar.*gunzip"):
        build_dataset(DataConfig(name="webdataset", path=str(tmp_path / "packed.tar.gz")))


def _save_hf(path: Path, count: int = COUNT, dict_split: str | None = None) -> Path:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"picture": datasets.Image(), "words": datasets.Value("string"),
                                  "kind": datasets.ClassLabel(names=["cats", "dogs"])})
    rows = {"picture": [{"bytes": _encoded(i, "PNG"), "path": None} for i in range(count)],
            "words": [f"sample {i}" for i in range(count)], "kind": [1 - i % 2 for i in range(count)]}
    dataset = datasets.Dataset.from_dict(rows, features=features)
    if dict_split:
        dataset = datasets.DatasetDict({dict_split: dataset})
    dataset.save_to_disk(str(path))
    return path


def test_a_saved_hf_dataset_gives_the_folder_items(tmp_path):
    folder = FolderDataset(_folder(tmp_path / "images"), 8)
    config = DataConfig(name="hf", path=str(_save_hf(tmp_path / "hf")), resolution=8, image_column="picture",
                        caption_column="words", label_column="kind")
    dataset = build_dataset(config)
    assert len(dataset) == COUNT and label_names(config) == ["cats", "dogs"]
    _assert_same_items(dataset, folder)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1)))  # pickles into workers
    assert batch["image"].shape == (4, 3, 8, 8)


def test_hf_errors_name_the_fix(tmp_path, monkeypatch):
    path = _save_hf(tmp_path / "hf", count=2)
    with pytest.raises(DataError, match="no column 'image'.*its columns are picture, words, kind.*data.image_column"):
        build_dataset(DataConfig(name="hf", path=str(path), caption_column="words"))
    with pytest.raises(DataError, match="column 'kind' .*data.caption_column.* not usable"):
        build_dataset(DataConfig(name="hf", path=str(path), image_column="picture", caption_column="kind"))
    with pytest.raises(DataError, match="holds no dataset saved with `save_to_disk`"):
        build_dataset(DataConfig(name="hf", path=str(tmp_path)))
    split = _save_hf(tmp_path / "split", count=2, dict_split="validation")
    heldout = DataConfig(name="hf", path=str(split), split="heldout", image_column="picture", caption_column="words")
    assert len(build_dataset(heldout)) == 2
    with pytest.raises(DataError, match=r"splits \['validation'\], none of them a train split.*data.split=all"):
        build_dataset(DataConfig(name="hf", path=str(split), image_column="picture", caption_column="words"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install -e '\.\[hf\]'"):
        build_dataset(DataConfig(name="hf", path=str(path)))


def test_bad_data_configs_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path is empty.*data.path=/data/\{00000..00009\}.tar"):
        build_dataset(DataConfig(name="webdataset"))
    with pytest.raises(ConfigError, match="data.path is empty.*save_to_disk"):
        build_dataset(DataConfig(name="hf"))
    with pytest.raises(ConfigError, match="data.caption_column only apply to data.name=hf, not folder"):
        build_dataset(DataConfig(name="folder", path=str(tmp_path), caption_column="words"))
    with pytest.raises(ConfigError, match="'webdataset', 'hf'"):
        load_config(DataConfig, overrides=["name=tar"])


# ----------------------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_see_every_sample_once_per_epoch_across_a_resume(tmp_path):
    count, steps, resume_step, batch = 24, 6, 3, 3  # 12 samples per process and epoch: 1.5 epochs, resumed mid-epoch
    spec = _shards(tmp_path / "shards", count=count, per_shard=6)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LATENTGEN_CACHE_DIR": str(tmp_path / "c")}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), "tests/stream_check.py", spec, str(tmp_path), str(resume_step), str(steps)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [s["world"] for s in seen] == [2, 2]
    per_epoch = count // 2
    first = [c for s in seen for c in s["captions"][:per_epoch]]
    assert sorted(first) == sorted(f"sample {i}" for i in range(count))  # epoch 0: each sample exactly once
    second = [c for s in seen for c in s["captions"][per_epoch:]]
    assert len(second) == len(set(second)) == 2 * (steps * batch - per_epoch)  # epoch 1: no repeat so far
    dataset = build_dataset(DataConfig(name="webdataset", path=spec, resolution=8))
    for rank in range(2):  # exactly what an uninterrupted run reads
        order = islice(StreamSampler(count, seed=5, rank=rank, world=2), steps * batch)
        assert seen[rank]["captions"] == [dataset.captions[i] for i in order]
