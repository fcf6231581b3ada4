"""The index of an image folder: which files are usable images, and the caption and label of each.

Built once from the listing and the image headers (no pixel is decoded, except for files whose last
bytes say they were cut short), saved by :mod:`common.data.index_store` and reused for as long as the
listing is unchanged: the names, sizes and modification times of every image, every ``.txt`` file
and the root ``metadata.jsonl``. Listing 100,000 files takes about a second; decoding them took
minutes, in every process, at every start.
"""
from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from common.data.dataset_config import DataError
from common.data.decoding import file_problem
from common.data.index_store import Arrays, PackedStrings, StringPacker, digest, load_or_build

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm", ".tga"}
)
METADATA_FILE = "metadata.jsonl"
# Names spelled out per kind in the caption warning (the counts are always complete).
MAX_NAMED = 5


@dataclass(frozen=True)
class Listing:
    """What a walk of a folder found.

    images: relative POSIX paths of the image files, sorted as paths, packed (no Python object per file).
    fingerprint: digest of the folder's absolute path, of (relative path, size, mtime in ns) of every file
        the index depends on (-1 where stat fails), in walk order, then of ``left_out``.
    left_out: a description of each folder left out (a symlink loop, one that cannot be listed).
    """

    images: PackedStrings
    fingerprint: str
    left_out: list[str]


def list_folder(root: Path) -> Listing:
    """Walk ``root`` recursively, through symlinked folders and files, without opening any file.

    Hidden files and folders are dropped silently because they are tool litter (.git, macOS
    ``._x.png``). A symlink back to a folder above it (a loop) and a folder that cannot be read are
    named in ``left_out``, not silently lost. Dangling symlinks are listed (their check names them).
    Nothing per file outlives the walk but its packed path: the stats are hashed as they come, so the
    start-up of a training run holds a few bytes per image, not a few Python objects.
    """
    images = StringPacker()
    left_out: list[str] = []

    def walk(directory: str, prefix: str, ancestors: frozenset[str]) -> Iterator[tuple[str, int, int]]:
        try:
            with os.scandir(directory) as scan:
                names, folders = [], set()
                for entry in scan:
                    if not entry.name.startswith("."):
                        names.append(entry.name)
                        if _is_dir(entry):
                            folders.add(entry.name)
        except OSError as error:
            left_out.append(f"{directory}: cannot be listed ({error.strerror or error})")
            return
        names.sort()  # name by name, depth first: the order of sorting the paths by their parts
        for name in names:
            relative, path = prefix + name, os.path.join(directory, name)
            if name in folders:
                real = os.path.realpath(path)
                if real in ancestors:
                    left_out.append(f"{relative}: symlink loop (points back to {real})")
                else:
                    yield from walk(path, relative + "/", ancestors | {real})
                continue
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_EXTENSIONS:
                images.append(relative)
            elif suffix != ".txt" and relative != METADATA_FILE:
                continue
            yield (relative, *_size_and_time(path))

    stats = walk(os.fspath(root), "", frozenset({os.path.realpath(root)}))
    fingerprint = digest(chain([os.fspath(root.absolute())], stats, left_out))  # left_out is read after the walk
    return Listing(images.packed(), fingerprint, left_out)


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder (through symlinks); one that cannot be told is listed as a file, whose
    check then names the problem, rather than losing its whole folder."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _size_and_time(path: str) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except OSError:
        return -1, -1
    return info.st_size, info.st_mtime_ns


def classes_of(images: Iterable[str]) -> list[str]:
    """Sorted class sub-folder names of the relative image paths; [] when any image sits at the root."""
    folders = {name.split("/", 1)[0] if "/" in name else None for name in images}
    return [] if None in folders else sorted(folders)  # type: ignore[type-var]


def folder_index(root: Path, listing: Listing, workers: int | None = None) -> tuple[Arrays, dict[str, Any]]:
    """The saved index of ``root`` for this listing, built (by one process, the others waiting) if missing.

    Arrays: ``files`` (packed relative paths of the usable images), ``captions`` (packed), ``labels``.
    Record: ``classes``, ``skipped`` ([relative path, reason]), ``total`` (image files listed),
    ``caption_warning`` (the text of the one warning about captions, or None).

    Raises:
        DataError: a ``metadata.jsonl`` name matches two images, or gives one image two captions.
    """
    return load_or_build("folder", [os.fspath(root.resolve())], listing.fingerprint,
                         lambda: _build(root, listing, workers))


def _build(root: Path, listing: Listing, workers: int | None) -> tuple[Arrays, dict[str, Any]]:
    candidates = list(listing.images)  # a Python list while building only
    reasons = _check_all(root, candidates, workers)
    files = [name for name, reason in zip(candidates, reasons) if reason is None]
    skipped = [[name, reason] for name, reason in zip(candidates, reasons) if reason is not None]
    classes = classes_of(candidates)  # from the listing, not the checks, so labels do not shift
    captions, labels, warning = _caption_all(root, candidates, files, classes)
    arrays = {**PackedStrings.pack(files).arrays("files"), **PackedStrings.pack(captions).arrays("captions"),
              "labels": np.asarray(labels, dtype=np.int64)}
    return arrays, {"classes": classes, "skipped": skipped, "total": len(candidates), "caption_warning": warning}


def _check_all(root: Path, names: list[str], workers: int | None) -> list[str | None]:
    """Header-level check of every image; file reads release the GIL, so threads help."""
    def check(name: str) -> str | None:
        return "empty file (0 bytes)" if _size_and_time(os.fspath(root / name))[0] == 0 else file_problem(root / name)

    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(names) < 16:
        return [check(name) for name in names]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check, names, chunksize=64))


def _nfc(name: str) -> str:
    """Names in one Unicode normal form: macOS writes file names decomposed (NFD), editors type NFC."""
    return unicodedata.normalize("NFC", name)


def _read_metadata(path: Path) -> tuple[list[tuple[int, str, str]], list[int]]:
    """``metadata.jsonl`` (Hugging Face imagefolder) -> (line number, file_name, caption) records and
    the numbers of the malformed lines (not JSON objects with a ``file_name`` and a ``text`` or
    ``caption`` string)."""
    records, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text, name = record.get("text", record.get("caption")), record["file_name"]
        except (ValueError, KeyError, TypeError, AttributeError):
            bad.append(number)
            continue
        if isinstance(text, str) and isinstance(name, str):
            records.append((number, name, text.strip()))
        else:
            bad.append(number)
    return records, bad


def _name_keys(name: str, bases: list[PurePosixPath]) -> list[str]:
    """The relative POSIX paths (NFC) a metadata ``file_name`` may mean, most literal first.

    Accepted besides the plain relative path: ``./`` and Windows separators; an absolute path inside
    the folder; a path that repeats the folder's own trailing folders (``train/dog.png`` in ``train/``).
    ``bases`` are the folder's absolute paths (as given and with links resolved), in NFC.
    """
    name = _nfc(name.replace("\\", "/"))
    path = PurePosixPath(name)
    if path.is_absolute():
        keys = [path.relative_to(base).as_posix() for base in bases if path.is_relative_to(base)]
        return list(dict.fromkeys(keys))
    keys = [path.as_posix()]
    for base in bases:
        for depth in range(1, min(len(base.parts), len(path.parts) - 1) + 1):
            if path.parts[:depth] == base.parts[-depth:]:
                keys.append(PurePosixPath(*path.parts[depth:]).as_posix())
    return list(dict.fromkeys(keys))


def _named(items: list[str]) -> str:
    shown = ", ".join(repr(item) for item in items[:MAX_NAMED])
    return shown + (f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


def _match_metadata(root: Path, names: list[str]) -> tuple[dict[str, str], list[str], list[int]]:
    """Captions of ``metadata.jsonl`` by relative image path, the file names that match no image, the bad lines.

    Raises:
        DataError: a file name matches two images, or two lines give one image different captions.
    """
    metadata = root / METADATA_FILE
    if not metadata.is_file():
        return {}, [], []
    records, bad = _read_metadata(metadata)
    by_key: dict[str, list[str]] = {}
    for name in names:
        by_key.setdefault(_nfc(name), []).append(name)
    captions: dict[str, tuple[int, str, str]] = {}
    unmatched = []
    bases = [PurePosixPath(_nfc(base.as_posix())) for base in (root.absolute(), root.resolve())]
    for number, name, text in records:
        hits = list(dict.fromkeys(p for key in _name_keys(name, bases) for p in by_key.get(key, [])))
        if len(hits) > 1:
            both = " and ".join(repr(hit) for hit in hits[:2])
            raise DataError(f"{metadata} line {number}: file_name {name!r} matches both {both}; write the "
                            f"image's exact path relative to {root} (or rename one of them)")
        if not hits:
            unmatched.append(name)
            continue
        earlier = captions.setdefault(hits[0], (number, name, text))
        if earlier[2] != text:
            raise DataError(f"{metadata} lines {earlier[0]} and {number} give {hits[0]!r}"
                            f" two captions (as {earlier[1]!r} and {name!r}); keep one of the lines")
    return {hit: text for hit, (_, _, text) in captions.items()}, unmatched, bad


def _caption_warning(root: Path, unmatched: list[str], uncaptioned: list[str], bad: list[int],
                     total: int) -> str | None:
    """The one warning about ``metadata.jsonl``: lines that name no image, images it does not caption."""
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} file_name(s) match no image file ({_named(unmatched)}): write each "
                        f"image's path relative to {root}, e.g. 'dog.png' or 'class/dog.png'")
    if uncaptioned:
        problems.append(f"{len(uncaptioned)} of {total} images have no line in it and no .txt beside them "
                        f"({_named(uncaptioned)}): they are captioned by their class folder's name or ''")
    if bad:
        problems.append(f"ignored malformed lines {bad[:20]} (each line must be a JSON object with a file_name "
                        "and a text)")
    return f"{root / METADATA_FILE}: " + "; ".join(problems) if problems else None


def _sidecar_caption(path: Path) -> str | None:
    """The stripped contents of ``<stem>.txt`` next to an image, if it exists and reads."""
    try:
        return path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _caption_all(root: Path, candidates: list[str], files: list[str],
                 classes: list[str]) -> tuple[list[str], list[int], str | None]:
    """Caption and label of each usable image, and the caption warning's text."""
    # Matched against every listed file, so an undecodable image's line is not called unmatched.
    metadata, unmatched, bad = _match_metadata(root, candidates)
    uncaptioned = []
    index = {name: i for i, name in enumerate(classes)}
    captions, labels = [], []
    for name in files:
        folder = name.split("/", 1)[0] if classes else None
        caption = metadata.get(name)
        if caption is None:
            caption = _sidecar_caption(root / name)
        if caption is None:
            uncaptioned.append(name)
            caption = folder.replace("_", " ").replace("-", " ") if folder else ""
        captions.append(caption)
        labels.append(index[folder] if folder else 0)
    has_metadata = (root / METADATA_FILE).is_file()
    return captions, labels, _caption_warning(root, unmatched, uncaptioned, bad, len(files)) if has_metadata else None
