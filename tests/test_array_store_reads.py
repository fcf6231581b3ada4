"""Training reads of on-disk caches copy rows with pread rather than fault them in through a memory map.

Rows read through a :class:`RowTensor` and text states gathered from a :class:`TextStore` equal what
the memory map holds, bit for bit, for every kind of index; they leave no file pages resident in the
process (what a map's fault-around would add to its RSS); loader workers read them too. Also: the
listing of an image folder holds a few bytes per file, not Python objects, at its peak.
"""
from __future__ import annotations

import io
import pickle
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common.array_store import RowTensor, TextStore, open_rows, open_tensor, save_array, write_text_part
from common.data.folder import FolderDataset
from common.data.folder_index import list_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stored(tmp_path) -> Path:
    path = tmp_path / "rows.npy"
    save_array(path, np.random.default_rng(0).standard_normal((50, 3, 4)).astype(np.float32))
    return path


def test_row_reads_equal_the_map_for_every_index(stored):
    rows, mapped = open_rows(stored), open_tensor(stored)
    assert isinstance(rows, RowTensor) and rows.shape == mapped.shape and torch.equal(rows, mapped)
    for index in (0, 7, -1, np.int64(3), torch.tensor(5), torch.tensor([4, 0, 49, -2]), np.array([1, 1]), [2, 9],
                  slice(3, 9), rows[:, 0, 0] > 0):
        got = rows[index]
        assert type(got) is torch.Tensor and torch.equal(got, mapped[index]), index
    for outside in (50, -51, torch.tensor([0, 50])):
        with pytest.raises(IndexError, match="out of bounds"):
            rows[outside]
    assert type(rows * 2) is torch.Tensor and torch.equal(rows * 2, mapped * 2)  # whole-tensor maths: plain
    again = pickle.loads(pickle.dumps(rows))  # a spawned loader worker opens the file again
    assert torch.equal(again[[3, 4]], mapped[[3, 4]])


class _Rows(Dataset):
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.rows[index]


def test_loader_workers_read_rows(stored):
    batches = list(DataLoader(_Rows(open_rows(stored)), batch_size=16, num_workers=1))
    assert torch.equal(torch.cat(batches), open_tensor(stored))


def _text_store(directory: Path, dtypes: tuple[type, ...]) -> TextStore:
    """Texts of 0..5 tokens of width 3 over parts stored in ``dtypes``."""
    generator = torch.Generator().manual_seed(0)
    stems = []
    for number, dtype in enumerate(dtypes):
        lengths = torch.tensor([(number * 4 + i) % 6 for i in range(4)])
        states = torch.randn(4, 6, 3, generator=generator) * 100
        write_text_part(directory / f"text-{number}", [(states, torch.arange(6)[None] < lengths[:, None])], dtype)
        stems.append(f"text-{number}")
    TextStore.save_ends(directory, stems)
    return TextStore.open(directory, stems)


@pytest.mark.parametrize("dtypes", [(np.float16, np.float16), (np.float16, np.float32)])
def test_gathered_text_states_equal_the_maps(tmp_path, dtypes):
    store = _text_store(tmp_path, dtypes)
    mapped = TextStore(store.parts, store.part_starts, store.ends, store.width)
    mapped.readers = [None] * len(store.parts)  # the map path
    ids = torch.tensor([7, 0, 3, 4, 6, 1, 2])
    for length in (0, 2, 8):
        (states, mask), (expected, expected_mask) = store.gather(ids, length), mapped.gather(ids, length)
        assert torch.equal(states, expected) and torch.equal(mask, expected_mask)
        assert states.dtype == torch.float32 and states.abs().sum() > 0
    assert torch.equal(mask.sum(1), torch.from_numpy(store.lengths(ids.numpy())).clamp(max=8))


def _resident_file_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssFile:")).split()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssFile from /proc")
def test_row_reads_leave_no_file_pages_resident(tmp_path):
    path = tmp_path / "big.npy"
    save_array(path, np.zeros((4096, 4096), np.float32)[:, :1024])  # 16 MiB, rows of 4 KiB
    picks = np.random.default_rng(0).permutation(4096)[:400]
    rows, mapped = open_rows(path), open_tensor(path)
    before = _resident_file_kib()
    copied = [rows[int(i)] for i in picks]
    after_rows = _resident_file_kib()
    faulted = [mapped[int(i)].clone() for i in picks]
    after_map = _resident_file_kib()
    assert all(torch.equal(a, b) for a, b in zip(copied, faulted))
    assert after_rows - before < 512, "pread copies rows: no page of the file is mapped in"
    assert after_map - after_rows > 1600, "while the map's page faults map at least the 400 pages read"


def test_a_folder_listing_holds_bytes_per_file_not_objects(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTGEN_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "images"
    (root / "b").mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buffer, "PNG")
    for i in range(1500):
        (root / ("b" if i % 3 else "") / f"{i:05d}.png").write_bytes(buffer.getvalue())
    listing = list_folder(root)
    names = list(listing.images)
    assert names == sorted(names, key=lambda name: name.split("/")) and len(names) == 1500
    assert listing.images.data.nbytes + listing.images.ends.nbytes < 25 * 1500
    FolderDataset(root, 4)  # builds the index
    tracemalloc.start()
    try:
        dataset = FolderDataset(root, 4)  # a later start: list, fingerprint, load the index
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the listing of objects this replaced peaked near 850 bytes per file
    assert len(dataset) == 1500 and peak / 1500 < 400, f"{peak / 1500:.0f} bytes per file at the peak"
