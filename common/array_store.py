"""Arrays on disk that training reads without holding them in RAM, and the helpers that write them.

The caches of encoded datasets (:mod:`diffusion.latent_cache`, :mod:`prior.token_cache`) grow with the
dataset; this module keeps what grows on disk:

- fixed-shape rows (latents, code indices, labels, caption ids): one ``.npy`` file each, opened as a
  memory-mapped tensor (:func:`open_tensor`), the wide rows as one whose row reads are copied from
  the file (:func:`open_rows`);
- strings: one UTF-8 byte array and end offsets (:class:`StoredStrings`);
- text token states, unpadded (:class:`TextStore`): each text's (L_u, E) rows one after another in
  fp16, gathered and padded per batch to the batch's longest text (or to a fixed number of slots).

Why training reads rows with ``os.pread`` (:class:`RowReader`) rather than from the memory map: a page
fault maps the kernel's fault-around window (64 KiB by default) of the file into the process, so the
random rows of a training stream grow its resident set by up to 64 KiB each: 3,200 random rows of a
1 GB cache raised RSS by 200 MB, with or without ``madvise(MADV_RANDOM)``, and a container's memory
limit counts those pages. A copied row lives in the batch and is freed with it; the file's pages
stay in the shared page cache, outside every process. Whole-array uses (statistics, slices) still
go through the map.

fp16, not bf16: numpy has no bf16 (it would need uint16 views and hand-made conversion), and fp16
keeps 11 significant bits against bf16's 8 (an 8x smaller rounding error) while its range (65504)
holds the layer-normed outputs of text encoders with room to spare. A part whose states do not fit
is stored in fp32 instead (:func:`write_text_part`).

Every file is written under a temporary name and renamed into place, so a reader never sees half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.data.index_store import PackedStrings

FP16_MAX = float(np.finfo(np.float16).max)
_PREADV = getattr(os, "preadv", None)


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class Processes:
    """The processes that build a cache together: this one's ``rank`` of ``count``, and a ``barrier`` that
    returns once every process has reached it (``accelerator.wait_for_everyone``)."""

    rank: int = 0
    count: int = 1
    barrier: Callable[[], None] = _no_barrier

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def of(cls, accelerator: Any | None) -> Processes:
        """Those of an ``accelerate.Accelerator`` (or anything with the same three members); None: this one alone."""
        if accelerator is None:
            return cls()
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)


def part_range(count: int, rank: int, parts: int) -> range:
    """The contiguous ``rank``-th of ``parts`` near-equal parts of ``range(count)`` (sequential reads and writes)."""
    return range(count * rank // parts, count * (rank + 1) // parts)


def part_name(prefix: str, items: range) -> str:
    """A part's file stem, named by its range: parts of a build with another process count never collide."""
    return f"{prefix}-{items.start:010d}-{items.stop:010d}"


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_array(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as ``.npy`` atomically."""
    def write(temporary: Path) -> None:
        with open(temporary, "wb") as stream:
            np.save(stream, np.ascontiguousarray(array), allow_pickle=False)
    return _atomic(Path(path), write)


def save_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` as JSON atomically."""
    return _atomic(Path(path), lambda temporary: temporary.write_text(json.dumps(value, indent=1) + "\n"))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def open_array(path: str | Path) -> np.ndarray:
    """A ``.npy`` file as a copy-on-write memory map: writable in memory (torch wants that), never written back."""
    path = Path(path)
    try:
        return np.load(path, mmap_mode="c", allow_pickle=False)
    except ValueError:  # an empty array cannot be memory-mapped; it costs nothing to read
        return np.load(path, allow_pickle=False)


def open_tensor(path: str | Path) -> Tensor:
    """A ``.npy`` file as a CPU tensor over its memory map (rows are read from disk when indexed)."""
    return torch.from_numpy(open_array(path))


def open_rows(path: str | Path) -> Tensor:
    """A ``.npy`` file as a :class:`RowTensor` (a plain mapped tensor where rows cannot be read apart:
    an empty or 0-d array, or a system without ``os.pread``).

    For the wide rows (latents, code indices, text states), where fault-around maps 64 times the row.
    Columns of one 8-byte id per item (labels, caption ids, text ends) stay plain maps: all of one is
    smaller than the index a dataset holds in memory (tens of bytes per item), and a mapped read costs
    a third of a pread (3 against 8 us), three times per item.
    """
    mapped = open_array(path)
    reader = _reader_of(mapped)
    return RowTensor.over(mapped, reader) if reader is not None else torch.from_numpy(mapped)


class RowReader:
    """Rows of a C-ordered array stored in a file at byte ``offset``, copied with ``os.pread`` into arrays
    of this process (see the module docstring for why not from a memory map). Thread-safe; each process
    (a forked or spawned loader worker) opens its own descriptor, closed when the reader is collected."""

    def __init__(self, path: str | Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = os.fspath(path), int(offset), tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._pid, self._fd = -1, -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pid": -1, "_fd": -1}  # a descriptor means nothing in another process

    def _descriptor(self) -> int:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), os.getpid()
            weakref.finalize(self, os.close, self._fd)
        return self._fd

    def _pread(self, view: memoryview, start: int) -> None:
        """Fill the bytes ``view`` from row ``start`` on."""
        offset = self.offset + start * self.row_bytes
        if _PREADV is not None:
            done = _PREADV(self._descriptor(), [view], offset)
        else:  # macOS before 11: one extra copy
            data = os.pread(self._descriptor(), len(view), offset)
            view[:len(data)], done = data, len(data)
        if done != len(view):
            raise OSError(f"{self.path} ends inside row {start + done // max(self.row_bytes, 1)} (a truncated file?): "
                          "delete the cache folder to build it again")

    def read_into(self, target: np.ndarray, start: int, count: int) -> None:
        """Copy rows ``start`` to ``start + count`` into ``target``, C-contiguous and of their dtype and shape."""
        if count and self.row_bytes:
            self._pread(memoryview(target).cast("B"), start)

    def read_run(self, start: int, count: int) -> np.ndarray:
        """Rows ``start`` to ``start + count`` as a new array."""
        out = np.empty((count, *self.shape[1:]), self.dtype)
        self.read_into(out, start, count)
        return out

    def row(self, index: int) -> Tensor:
        """Row ``index`` (negative counts from the end) as a new tensor: a loader's read of one item, so lean."""
        count = self.shape[0]
        if not -count <= index < count:
            raise IndexError(f"index {index} is out of bounds for dimension 0 with size {count}")
        out = np.empty(self.shape[1:], self.dtype)
        if self.row_bytes:
            self._pread(out.data.cast("B"), int(index) % count)
        return torch.from_numpy(out)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (K,) of int, in range, as a new (K, ...) array."""
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        if out.size:
            view, size = memoryview(out).cast("B"), self.row_bytes
            for i, row in enumerate(rows.tolist()):
                self._pread(view[i * size:(i + 1) * size], row)
        return out


class RowTensor(torch.Tensor):
    """A CPU tensor over a memory-mapped ``.npy`` file whose row reads, ``t[i]`` and ``t[ids]`` with an
    integer tensor, array or list, are copied from the file by a :class:`RowReader`; anything else
    (slices, whole-tensor maths) uses the map and gives plain tensors."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results are plain tensors
    reader: RowReader

    @classmethod
    def over(cls, mapped: np.memmap, reader: RowReader) -> RowTensor:
        tensor = torch.Tensor._make_subclass(cls, torch.from_numpy(mapped), False)
        tensor.reader = reader
        return tensor

    def __getitem__(self, index: Any) -> Tensor:
        if type(index) is int or isinstance(index, np.integer):  # a loader's read of one item: first, lean
            return self.reader.row(index)
        rows = _row_indices(index, self.shape[0])
        if rows is None:
            return super().__getitem__(index)
        values = torch.from_numpy(self.reader.read(rows.reshape(-1)))
        return values[0] if rows.ndim == 0 else values


def _row_indices(index: Any, count: int) -> np.ndarray | None:
    """``index`` as int64 row numbers (0-d for a single row) when it picks whole rows by number, else None."""
    if isinstance(index, Tensor):
        if index.dtype in (torch.bool, torch.uint8) or index.is_floating_point() or index.is_complex() \
                or index.dim() > 1:
            return None
        index = index.detach().cpu().numpy()
    elif isinstance(index, list) and index and all(isinstance(i, (int, np.integer)) for i in index):
        index = np.asarray(index)
    if not isinstance(index, np.ndarray) or index.dtype.kind not in "iu" or index.ndim > 1:
        return None
    rows = index.astype(np.int64)
    outside = (rows < -count) | (rows >= count)
    if outside.any():
        raise IndexError(f"index {int(rows[outside].flat[0])} is out of bounds for dimension 0 with size {count}")
    return np.where(rows < 0, rows + count, rows)


def create_array(path: str | Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Allocate a ``.npy`` file that several processes then fill, each its rows (:func:`fill_rows`)."""
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()


def fill_rows(path: str | Path, start: int, rows: np.ndarray) -> None:
    """Write ``rows`` into the ``.npy`` file ``path`` from row ``start`` on."""
    if len(rows):
        target = np.load(path, mmap_mode="r+")
        target[start:start + len(rows)] = rows
        target.flush()
        del target


class StoredStrings(PackedStrings):
    """:class:`PackedStrings` read from two ``.npy`` files; a slice gives a list."""

    @classmethod
    def save(cls, directory: Path, name: str, strings: Iterable[str]) -> None:
        for key, array in cls.pack(strings).arrays(name).items():
            save_array(directory / f"{key}.npy", array)

    @classmethod
    def open(cls, directory: Path, name: str) -> StoredStrings:
        return cls(open_array(directory / f"{name}_data.npy"), open_array(directory / f"{name}_ends.npy"))

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [super(StoredStrings, self).__getitem__(i) for i in range(len(self))[index]]
        return super().__getitem__(index)


class TextOverflow(ValueError):
    """Text states too large for fp16."""


def write_text_part(stem: Path, chunks: Iterable[tuple[Tensor, Tensor]], dtype: type = np.float16) -> None:
    """Stream encoded texts to ``<stem>.bin`` (their real tokens' states, one row each, no padding), then
    ``<stem>.lengths.npy`` (each text's token count) and ``<stem>.json`` (dtype, width, rows): the last
    marks a complete part.

    ``chunks`` yields (states (n, L, E), mask (n, L) True for real tokens). Raises :class:`TextOverflow`
    when an fp16 part meets a value beyond fp16's range (the caller writes the part again in fp32).
    """
    lengths, width = [], 0
    handle, temporary = tempfile.mkstemp(dir=stem.parent, prefix=f".{stem.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            for states, mask in chunks:
                rows = states.float()[mask.bool()].cpu().numpy()
                if dtype == np.float16 and rows.size and float(np.abs(rows).max()) > FP16_MAX:
                    raise TextOverflow(f"text states up to {float(np.abs(rows).max()):.3g} do not fit fp16")
                stream.write(rows.astype(dtype).tobytes())
                lengths += mask.bool().sum(dim=1).tolist()
                width = states.shape[-1]
        os.replace(temporary, stem.with_suffix(".bin"))
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    save_array(stem.with_suffix(".lengths.npy"), np.asarray(lengths, np.int64))
    save_json(stem.with_suffix(".json"), {"dtype": np.dtype(dtype).name, "width": width, "rows": sum(lengths)})


class TextStore:
    """Token states of U texts stored unpadded, read per batch.

    ``parts`` are (T_p, E) arrays (memory maps) holding consecutive texts' rows; ``ends`` (U,) the end
    of each text's rows counted over all parts; ``part_starts`` (P + 1,) where each part's rows start.
    A batch's states are copied from the files (:class:`RowReader`), not read through the maps; the
    8-byte ends are read through theirs (see :func:`open_rows`).
    """

    def __init__(self, parts: Sequence[np.ndarray], part_starts: np.ndarray, ends: np.ndarray, width: int) -> None:
        self.parts, self.part_starts, self.ends, self.width = list(parts), part_starts, ends, width
        self.readers = [_reader_of(part) for part in self.parts]

    @classmethod
    def open(cls, directory: Path, stems: Sequence[str]) -> TextStore:
        """The texts of the parts ``stems`` (written by :func:`write_text_part`), in that order; their
        end offsets come from ``text_ends.npy`` (:meth:`save_ends`)."""
        parts, width = [], 0
        for stem in stems:
            record = read_json(directory / f"{stem}.json")
            width = record["width"] or width
            count = record["rows"]
            parts.append(np.memmap(directory / f"{stem}.bin", dtype=record["dtype"], mode="r",
                                   shape=(count, record["width"])) if count else np.zeros((0, width), np.float16))
        starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return cls(parts, starts, open_array(directory / "text_ends.npy"), width)

    @staticmethod
    def save_ends(directory: Path, stems: Sequence[str]) -> None:
        """Write ``text_ends.npy`` from the parts' token counts (the main process, once all parts exist)."""
        lengths = [np.load(directory / f"{stem}.lengths.npy") for stem in stems]
        save_array(directory / "text_ends.npy", np.cumsum(np.concatenate(lengths or [np.zeros(0, np.int64)])))

    def __len__(self) -> int:
        return len(self.ends)

    def lengths(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Token counts of the texts ``ids`` (all texts when None)."""
        ends = np.asarray(self.ends)
        starts = np.concatenate([[0], ends[:-1]])
        return (ends - starts) if ids is None else (ends - starts)[ids]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(U, longest, E): the shape of the padded table this store replaces."""
        return len(self), int(self.lengths().max(initial=0)), self.width

    def gather(self, ids: Tensor, length: int = 0) -> tuple[Tensor, Tensor]:
        """States (B, L, E) float32, zero at padding, and mask (B, L) bool of the texts ``ids`` (B,), on
        ``ids``' device. L is ``length`` (longer texts are cut) or, when 0, the longest of these texts."""
        rows = ids.detach().cpu().numpy().astype(np.int64)
        ends = np.asarray(self.ends[rows])
        starts = np.where(rows > 0, np.asarray(self.ends[np.maximum(rows - 1, 0)]), 0)
        counts = ends - starts
        size = length or max(int(counts.max(initial=0)), 1)
        parts = np.searchsorted(self.part_starts, starts, side="right") - 1
        # in the stored dtype (fp32 if any part is): one conversion per batch
        dtype = np.result_type(np.float16, *(part.dtype for part in self.parts))
        stored = np.zeros((len(rows), size, self.width), dtype)
        mask = np.zeros((len(rows), size), bool)
        for b, (start, count, part) in enumerate(zip(starts.tolist(), counts.tolist(), parts.tolist())):
            take = min(count, size)
            if not take:  # a text without tokens: all padding
                continue
            local = start - int(self.part_starts[part])
            reader = self.readers[part]
            if reader is None:
                stored[b, :take] = self.parts[part][local:local + take]
            elif reader.dtype == dtype:
                reader.read_into(stored[b, :take], local, take)
            else:
                stored[b, :take] = reader.read_run(local, take)
            mask[b, :take] = True
        states = torch.from_numpy(stored.astype(np.float32))
        return states.to(ids.device), torch.from_numpy(mask).to(ids.device)


def _reader_of(array: np.ndarray) -> RowReader | None:
    """A :class:`RowReader` of a memory-mapped array, or None (held in memory, or no ``os.pread`` here)."""
    if isinstance(array, np.memmap) and array.ndim and array.flags.c_contiguous and hasattr(os, "pread"):
        return RowReader(array.filename, array.offset, array.shape, array.dtype)
    return None

