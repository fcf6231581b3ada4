"""Arrays on disk that training reads without holding them in RAM, and the helpers that write them.

The caches of encoded datasets (:mod:`diffusion.latent_cache`, :mod:`prior.token_cache`) grow with the
dataset; this module keeps what grows on disk:

- fixed-shape rows (latents, code indices, labels, caption ids): one ``.npy`` file each, opened as a
  memory map (:func:`open_tensor`), so a process holds only the pages it reads, and the pages are the
  operating system's file cache, shared by every process and loader worker on the machine;
- strings: one UTF-8 byte array and end offsets (:class:`StoredStrings`);
- text token states, unpadded (:class:`TextStore`): each text's (L_u, E) rows one after another in
  fp16, gathered and padded per batch to the batch's longest text (or to a fixed number of slots).

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.data.index_store import PackedStrings

FP16_MAX = float(np.finfo(np.float16).max)


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
    """

    def __init__(self, parts: Sequence[np.ndarray], part_starts: np.ndarray, ends: np.ndarray, width: int) -> None:
        self.parts, self.part_starts, self.ends, self.width = list(parts), part_starts, ends, width

    @classmethod
    def open(cls, directory: Path, stems: Sequence[str]) -> TextStore:
        """The texts of the parts ``stems`` (written by :func:`write_text_part`), in that order; their
        end offsets come from ``text_ends.npy`` (:meth:`save_ends`)."""
        parts, width = [], 0
        for stem in stems:
            record = read_json(directory / f"{stem}.json")
            width = record["width"] or width
            count = record["rows"]
            # a plain ndarray view of the map: slicing a np.memmap costs a subclass object per slice
            parts.append(np.asarray(np.memmap(directory / f"{stem}.bin", dtype=record["dtype"], mode="r",
                                              shape=(count, record["width"]))) if count else np.zeros((0, width)))
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
        states = np.zeros((len(rows), size, self.width), np.float32)
        mask = np.zeros((len(rows), size), bool)
        for b, (start, count) in enumerate(zip(starts.tolist(), counts.tolist())):
            take = min(count, size)
            if not take:  # a text without tokens: all padding
                continue
            part = int(np.searchsorted(self.part_starts, start, side="right")) - 1
            local = start - int(self.part_starts[part])
            states[b, :take] = self.parts[part][local:local + take]
            mask[b, :take] = True
        return torch.from_numpy(states).to(ids.device), torch.from_numpy(mask).to(ids.device)
