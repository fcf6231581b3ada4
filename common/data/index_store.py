"""Where the indexes of on-disk sources live, how one process builds them while the others wait, and the
compact columns they are made of.

An index (of a folder, of a set of tar shards) is a few flat numpy arrays plus a JSON record, saved as
one ``.npz`` under ``<cache root>/data_index/<kind>-<hash of the source's absolute path>/``, where the
cache root is ``$LATENTGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/latentgen``, else ``~/.cache/latentgen``
(the root the precision probe uses). The file name holds a fingerprint of the source's listing
(names, sizes, modification times), so a changed source finds no file and is indexed again; the
source itself is never written to.

Strings are packed into one UTF-8 byte array and an array of end offsets (:class:`PackedStrings`):
a few bytes per item instead of a Python object each, which DataLoader workers do not copy on read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent processes may each build (the result is the same)
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
CACHE_ENV = "LATENTGEN_CACHE_DIR"
SOURCES_FILE = "sources.json"  # beside each index: the paths it indexes, to find indexes of deleted sources

Arrays = dict[str, np.ndarray]


class IndexWarning(UserWarning):
    """An index could not be saved (the cache folder is not writable): it is rebuilt by every process."""


def index_root() -> Path:
    """The folder holding every index (see the module docstring for the rule)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "latentgen")
    return Path(root) / "data_index"


def digest(parts: Iterable[Any]) -> str:
    """SHA-256 hex digest of the ``repr`` of each part, separated (a fingerprint of a listing)."""
    hasher = hashlib.sha256(f"format {INDEX_FORMAT}".encode())
    for part in parts:
        hasher.update(repr(part).encode("utf-8", "surrogateescape") + b"\x00")
    return hasher.hexdigest()


def load_or_build(kind: str, paths: Sequence[str], fingerprint: str,
                  build: Callable[[], tuple[Arrays, dict[str, Any]]]) -> tuple[Arrays, dict[str, Any]]:
    """The index of the source at ``paths`` with this ``fingerprint``: read from disk, or built and saved.

    The first process to miss it takes an exclusive file lock and builds; the others block on the
    lock and then read what it saved. Older indexes of the same source are removed, and so are the
    indexes of sources that no longer exist (temporary folders), whenever an index is built.

    Args:
        kind: the source type, part of the folder name ("folder", "webdataset").
        paths: the source's absolute paths (a folder, or every shard), its identity.
        fingerprint: a digest of everything the index depends on (:func:`digest` of the listing).
        build: returns the arrays and a JSON-serialisable record.
    """
    source = "\n".join(paths)
    directory = index_root() / f"{kind}-{hashlib.sha256(source.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
    path = directory / f"index-{fingerprint[:32]}.npz"
    found = _read(path)
    if found is not None:
        return found
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / "lock", "a+b")  # noqa: SIM115 - held across the build below
    except OSError as error:
        warnings.warn(f"cannot save the index of {source} under {directory} ({error}); every process builds it "
                      f"again. Set ${CACHE_ENV} to a writable folder.", IndexWarning, stacklevel=3)
        return build()
    with lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        found = _read(path)  # another process built it while this one waited
        if found is not None:
            return found
        logger.info("indexing %s (once; saved to %s)", source, path)
        arrays, record = build()
        try:
            _write(path, arrays, record)
            (directory / SOURCES_FILE).write_text(json.dumps(list(paths)))
        except OSError as error:  # a full disk costs the next start an index build, not this run
            warnings.warn(f"cannot save the index of {source} to {path} ({error}); the next start builds it again",
                          IndexWarning, stacklevel=3)
            return arrays, record
        for old in directory.glob("index-*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
    _remove_orphans(directory.parent)
    return arrays, record


def _remove_orphans(root: Path) -> None:
    """Delete the indexes whose sources are all gone (best effort: another process may be at it too)."""
    for sources in root.glob(f"*/{SOURCES_FILE}"):
        try:
            if not any(os.path.exists(p) for p in json.loads(sources.read_text())):
                shutil.rmtree(sources.parent, ignore_errors=True)
        except (OSError, ValueError, TypeError):
            continue


def _read(path: Path) -> tuple[Arrays, dict[str, Any]] | None:
    """A saved index, or None when it is missing or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        return arrays, json.loads(str(arrays.pop("record")))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        logger.warning("ignoring the unreadable index %s (%s); building it again", path, error)
        return None


def _write(path: Path, arrays: Arrays, record: dict[str, Any]) -> None:
    """Save atomically: readers that do not take the lock never see half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".index-", suffix=".npz")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, record=np.array(json.dumps(record)), **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class Column(Sequence):
    """A read-only list view over stored values; compares equal to any sequence with the same items."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(repr(self[i]) for i in range(min(len(self), 3)))
        return f"{type(self).__name__}([{shown}{', ...' if len(self) > 3 else ''}], {len(self)} items)"


class PackedStrings(Column):
    """Strings stored as one UTF-8 byte array and the end offset of each."""

    def __init__(self, data: np.ndarray, ends: np.ndarray) -> None:
        self.data, self.ends = data, ends

    @classmethod
    def pack(cls, strings: Iterable[str]) -> PackedStrings:
        encoded = [text.encode("utf-8", "surrogateescape") for text in strings]
        ends = np.cumsum([len(b) for b in encoded], dtype=np.int64) if encoded else np.zeros(0, np.int64)
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), ends)

    @classmethod
    def from_arrays(cls, arrays: Arrays, name: str) -> PackedStrings:
        return cls(arrays[f"{name}_data"], arrays[f"{name}_ends"])

    def arrays(self, name: str) -> Arrays:
        return {f"{name}_data": self.data, f"{name}_ends": self.ends}

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        index = range(len(self.ends))[index]
        start = int(self.ends[index - 1]) if index else 0
        return self.data[start:int(self.ends[index])].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        raw, start = self.data.tobytes(), 0  # one bytes object: slicing it is cheaper than indexing the array
        for end in self.ends.tolist():
            yield raw[start:end].decode("utf-8", "surrogateescape")
            start = end


def held_out(keys: PackedStrings, fraction: float) -> np.ndarray:
    """Whether each key falls in the held-out ``fraction`` (bool (K,)): by a hash of the key alone, so a
    sample keeps its split whatever else the source holds."""
    threshold, raw, start = int(fraction * 2 ** 64), keys.data.tobytes(), 0
    chosen = np.zeros(len(keys), bool)
    for index, end in enumerate(keys.ends.tolist()):
        chosen[index] = int.from_bytes(hashlib.blake2b(raw[start:end], digest_size=8).digest(), "little") < threshold
        start = end
    return chosen


class StringPacker:
    """Builds :class:`PackedStrings` one string at a time, holding only their bytes and end offsets (a listing
    of a million files would otherwise be a million Python strings, whose freed memory the allocator keeps)."""

    def __init__(self) -> None:
        self.data, self.ends = bytearray(), array("q")

    def append(self, text: str) -> None:
        self.data += text.encode("utf-8", "surrogateescape")
        self.ends.append(len(self.data))

    def packed(self) -> PackedStrings:
        return PackedStrings(np.frombuffer(bytes(self.data), np.uint8), np.frombuffer(self.ends, np.int64).copy())


class Ints(Column):
    """Integers (labels) stored as one numpy array, read as Python ints."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> int:  # type: ignore[override]
        return int(self.values[index])


class Paths(Column):
    """Paths under ``root`` from their stored relative POSIX form."""

    def __init__(self, root: Path, relative: PackedStrings) -> None:
        self.root, self.relative = root, relative

    def __len__(self) -> int:
        return len(self.relative)

    def __getitem__(self, index: int) -> Path:  # type: ignore[override]
        return self.root / self.relative[index]
