"""Encode a dataset into an on-disk cache with every process at once, each its part, resumably.

Used by the latent cache (:mod:`diffusion.latent_cache`) and the token cache (:mod:`prior.token_cache`),
which differ in what they encode per item and how they order captions (:class:`CacheSpec`). A build
runs in four phases, each ended by a barrier of the processes (:class:`common.array_store.Processes`):

1. items: process r encodes the items of its contiguous share of the dataset into ``parts/``: rows
   (latents or code indices, unscaled), labels, captions, and the moments of the rows. A share whose
   record exists is complete and not encoded again, so an interrupted build resumes where it stopped.
2. texts: every process reads all shares' captions, orders the distinct ones, adds each template's
   phrasings (:mod:`common.captions`) and encodes its share of those texts into the text store
   (:func:`common.array_store.write_text_part`; also resumable). The main process allocates the rows file.
3. assembly: each process copies its rows (times the scale, for latents) into the one rows file; the
   main process writes labels, caption ids, captions, phrasing ids and the text offsets.
4. the main process writes ``meta.json``, last: its presence marks a complete cache. Then it removes
   ``parts/`` and anything a build with another number of processes left behind.

Contiguous shares, not the training stream's shuffled split: the build reads the source in order
(tar shards, image folders) and each process writes one run of rows. Nothing here holds more than one
share of rows in memory; the distinct captions are held while building (not while training).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from common.array_store import (
    Processes,
    StoredStrings,
    TextOverflow,
    TextStore,
    create_array,
    fill_rows,
    open_array,
    open_rows,
    open_tensor,
    part_name,
    part_range,
    read_json,
    save_array,
    save_json,
    write_text_part,
)
from common.captions import add_phrasings

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two runs building one cache at once may collide
    fcntl = None  # type: ignore[assignment]

META_FILE = "meta.json"
PARTS = "parts"
TEXT_CHUNK = 256  # texts per text-encoder call
COPY_ROWS = 4096  # rows per copy in the assembly (bounded memory)

ItemBatch = tuple[Tensor, Tensor, list[str]]  # rows (B, ...), labels (B,), captions


@dataclass(frozen=True)
class CacheSpec:
    """What a cache encodes.

    Attributes:
        rows: the name of the per-item rows ("latents", "tokens"): ``<rows>.npy`` in the cache.
        encode_items: batches of (rows, labels, captions) of the dataset items in a range, in order.
        order_captions: the distinct captions of the whole dataset in the cache's order, given all of them.
        encode_texts: texts -> (states (n, L, E), mask (n, L)); None for a cache without text states.
        templates: caption templates whose phrasings are stored (and encoded) after the captions.
        unit_variance: scale the rows by 1 / their std (latents), recorded as ``scale`` in the manifest.
    """

    rows: str
    encode_items: Callable[[range], Iterable[ItemBatch]]
    order_captions: Callable[[Iterable[str]], list[str]]
    encode_texts: Callable[[list[str]], tuple[Tensor, Tensor]] | None = None
    templates: tuple[str, ...] = ()
    unit_variance: bool = False


@dataclass(frozen=True)
class StoredCache:
    """A built cache, every array read from disk (rows: :func:`common.array_store.open_rows`, the id columns
    memory-mapped): rows (N, ...), labels (N,), caption_ids (N,), captions (the distinct captions, then
    their phrasings), text (None without text states), variants ((U, 1 + T) ids of each caption's
    phrasings; None without templates), and the manifest."""

    rows: Tensor
    labels: Tensor
    caption_ids: Tensor
    captions: StoredStrings
    text: TextStore | None
    variants: Tensor | None
    manifest: dict[str, Any]


def open_cache(directory: str | Path) -> StoredCache:
    """Open the cache in ``directory`` (its ``meta.json`` must exist)."""
    directory = Path(directory)
    meta = read_json(directory / META_FILE)
    text = TextStore.open(directory, meta["text_parts"]) if meta["has_text"] else None
    variants = open_tensor(directory / "variants.npy") if meta["has_variants"] else None
    return StoredCache(open_rows(directory / f"{meta['rows']}.npy"), open_tensor(directory / "labels.npy"),
                       open_tensor(directory / "caption_ids.npy"), StoredStrings.open(directory, "captions"), text,
                       variants, meta)


def ensure_built(directory: str | Path, processes: Processes, build: Callable[[], None]) -> None:
    """Call ``build`` (on every process of ``processes``) unless ``directory`` holds a complete cache.

    The main process holds a file lock while the group checks and builds: a second run (another group
    of processes) that needs the same cache waits, then finds it complete. A complete cache is used
    without taking the lock, so a read-only copy of one works.
    """
    directory = Path(directory)
    if (directory / META_FILE).is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+b") if processes.main else nullcontext() as lock:  # noqa: SIM115
        if lock is not None and fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        processes.barrier()  # the others check only once the main process holds the lock
        if not (directory / META_FILE).is_file():
            build()


def build_cache(directory: str | Path, count: int, spec: CacheSpec, processes: Processes, meta: dict[str, Any],
                progress: bool = False) -> None:
    """Encode ``count`` items into ``directory`` with every process of ``processes`` (all must call this);
    ``meta`` goes into the manifest."""
    directory = Path(directory)
    parts = directory / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    shares = [part_range(count, rank, processes.count) for rank in range(processes.count)]
    _encode_items(parts / part_name("items", shares[processes.rank]), shares[processes.rank], spec,
                  progress and processes.main)
    processes.barrier()
    records = [read_json(parts / f"{part_name('items', share)}.json") for share in shares]
    captions = spec.order_captions(chain.from_iterable(
        StoredStrings.open(parts, f"{part_name('items', share)}-captions") for share in shares))
    texts, variants = add_phrasings(captions, spec.templates if spec.encode_texts else ())
    stems = [part_name("text", part_range(len(texts), rank, processes.count)) for rank in range(processes.count)]
    if spec.encode_texts is not None:
        mine = part_range(len(texts), processes.rank, processes.count)
        _encode_texts(directory / stems[processes.rank], [texts[i] for i in mine], spec.encode_texts)
    shaped = next((r for r in records if r["count"]), records[0])
    if processes.main:
        create_array(directory / f"{spec.rows}.npy", (count, *shaped["shape"]), np.dtype(shaped["dtype"]))
    processes.barrier()
    scale = 1.0 / _std(records) if spec.unit_variance else None
    _copy_rows(parts / part_name("items", shares[processes.rank]), directory / f"{spec.rows}.npy",
               shares[processes.rank].start, scale)
    if processes.main:
        _write_columns(directory, [parts / part_name("items", share) for share in shares], captions, texts, variants)
        if spec.encode_texts is not None:
            TextStore.save_ends(directory, stems)
    processes.barrier()
    if processes.main:
        save_json(directory / META_FILE, {**meta, "count": count, "rows": spec.rows, "scale": scale,
                                          "has_text": spec.encode_texts is not None,
                                          "text_parts": stems, "has_variants": variants is not None})
        _remove_leftovers(directory, stems)
    processes.barrier()


def _encode_items(stem: Path, items: range, spec: CacheSpec, progress: bool) -> None:
    """Phase 1 for one share: rows, labels and captions of ``items``, then the record (the completion mark)."""
    if stem.with_suffix(".json").is_file():
        return
    rows, labels, captions, moments = None, [], [], Moments()
    temporary = stem.parent / f".{stem.name}-rows.npy.tmp"
    done = 0
    for batch_rows, batch_labels, batch_captions in tqdm(spec.encode_items(items), desc=f"encoding {spec.rows}",
                                                         disable=not progress, dynamic_ncols=True):
        values = batch_rows.cpu().numpy()
        if rows is None:
            rows = np.lib.format.open_memmap(temporary, mode="w+", dtype=values.dtype,
                                             shape=(len(items), *values.shape[1:]))
        rows[done:done + len(values)] = values
        done += len(values)
        moments = moments.add(values) if spec.unit_variance else moments
        labels.append(batch_labels.long().cpu().numpy())
        captions.extend(batch_captions)
    if done != len(items):
        raise RuntimeError(f"the dataset gave {done} items for {len(items)} indices {items}")
    if rows is None:
        save_array(stem.parent / f"{stem.name}-rows.npy", np.zeros(0, np.float32))
    else:
        rows.flush()
        del rows
        temporary.replace(stem.parent / f"{stem.name}-rows.npy")
    save_array(stem.parent / f"{stem.name}-labels.npy", np.concatenate(labels or [np.zeros(0, np.int64)]))
    StoredStrings.save(stem.parent, f"{stem.name}-captions", captions)
    values = open_array(stem.parent / f"{stem.name}-rows.npy")
    save_json(stem.with_suffix(".json"), {"count": len(items), "shape": list(values.shape[1:]),
                                          "dtype": values.dtype.name, "moments": moments.as_list()})


def _encode_texts(stem: Path, texts: list[str], encode: Callable[[list[str]], tuple[Tensor, Tensor]]) -> None:
    """Phase 2 for one share of the texts: fp16, or fp32 if they do not fit (see :mod:`common.array_store`)."""
    if stem.with_suffix(".json").is_file():
        return

    def chunks() -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(texts), TEXT_CHUNK):
            yield encode(texts[start:start + TEXT_CHUNK])

    try:
        write_text_part(stem, chunks(), np.float16)
    except TextOverflow:
        write_text_part(stem, chunks(), np.float32)


def _copy_rows(stem: Path, target: Path, start: int, scale: float | None) -> None:
    """Phase 3 for one share: its rows (times ``scale``) into the rows file, a bounded chunk at a time."""
    rows = open_array(stem.parent / f"{stem.name}-rows.npy")
    for begin in range(0, len(rows), COPY_ROWS):
        chunk = torch.from_numpy(np.array(rows[begin:begin + COPY_ROWS]))
        fill_rows(target, start + begin, (chunk * scale).float().numpy() if scale is not None else chunk.numpy())


def _write_columns(directory: Path, stems: list[Path], captions: list[str], texts: list[str],
                   variants: Tensor | None) -> None:
    """Phase 3, main process: labels, caption ids, the texts (captions and phrasings) and the phrasing ids."""
    ids = {caption: i for i, caption in enumerate(captions)}
    save_array(directory / "labels.npy", np.concatenate([open_array(s.parent / f"{s.name}-labels.npy")
                                                         for s in stems]).astype(np.int64))
    save_array(directory / "caption_ids.npy", np.concatenate(
        [np.fromiter((ids[c] for c in StoredStrings.open(s.parent, f"{s.name}-captions")), np.int64)
         for s in stems]))
    StoredStrings.save(directory, "captions", texts)
    if variants is not None:
        save_array(directory / "variants.npy", variants.numpy().astype(np.int64))


def _remove_leftovers(directory: Path, stems: list[str]) -> None:
    """The parts, text parts of builds with another process count, and temporary files of killed writers."""
    shutil.rmtree(directory / PARTS, ignore_errors=True)
    for path in chain(directory.glob("text-*"), directory.glob(".*.tmp")):
        if path.name.split(".")[0] not in stems:
            path.unlink(missing_ok=True)


def _std(records: list[dict]) -> float:
    """The (unbiased) std of all rows' values, from each share's moments."""
    total = Moments()
    for record in records:
        total = total.merge(Moments(*record["moments"]))
    return total.std


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations of values, merged exactly across batches and processes
    (Chan, Golub and LeVeque's update), in float64."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, values: np.ndarray) -> Moments:
        flat = values.astype(np.float64).ravel()
        if not flat.size:
            return self
        mean = float(flat.mean())
        return self.merge(Moments(flat.size, mean, float(((flat - mean) ** 2).sum())))

    def merge(self, other: Moments) -> Moments:
        count = self.count + other.count
        if not count:
            return self
        delta = other.mean - self.mean
        return Moments(count, self.mean + delta * other.count / count,
                       self.m2 + other.m2 + delta * delta * self.count * other.count / count)

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else float("nan")

    def as_list(self) -> list[float]:
        return [self.count, self.mean, self.m2]
