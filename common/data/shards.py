"""Local ``.tar`` shards in the webdataset / img2dataset layout, read at random like a folder.

A sample is the group of tar members that share a key, the member path up to the first dot of its
file name (``00042.jpg``, ``00042.txt``, ``00042.json``). Its image is the ``jpg``/``jpeg``/``png``/
``webp`` (or any other image extension) member; its caption the ``txt`` member, else the
``caption`` (or ``text``) field of the ``json`` member (img2dataset writes both), else ""; its
label the integer in a ``cls`` member, else 0.

Each shard set is indexed once (:mod:`common.data.index_store`): every member's header is read
with the standard library's ``tarfile``, the image's data offset and size kept and its header
checked, the captions stored. Reading an item then seeks into its shard and decodes one image, so
the training stream's shuffling, per-process sharding and exact resume
(:class:`common.training.StreamSampler`) apply unchanged. Compressed shards (``.tar.gz``) cannot be
read at an offset and are refused with the command that decompresses them.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.data.dataset_config import DataError
from common.data.decoding import DecodedOnRead, image_problem, open_rgb
from common.data.folder import SkippedImagesWarning
from common.data.folder_index import IMAGE_EXTENSIONS
from common.data.index_store import Arrays, PackedStrings, digest, load_or_build

SHARD_SEPARATOR = "::"
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
# Extensions (without the dot) that are the image of a sample, in the order one is picked when several are.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_REPORTED = 20


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives and ``{000..012}`` ranges (zero padding kept), left to right."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    numbers = _RANGE.match(match.group(1))
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = match.group(1).split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def shard_paths(spec: str) -> list[Path]:
    """The shard files ``spec`` names (see ``DataConfig.path``), in order, each once.

    Raises:
        DataError: a named shard does not exist, or a pattern or folder matches no ``.tar`` file.
    """
    found: list[Path] = []
    missing: list[str] = []
    for part in (p.strip() for p in spec.split(SHARD_SEPARATOR) if p.strip()):
        for name in expand_braces(os.path.expanduser(part)):
            if os.path.isdir(name):
                matches = sorted(glob.glob(os.path.join(glob.escape(name), "*.tar")))
                if not matches:
                    raise DataError(f"the shard folder {name} holds no .tar files")
            elif glob.has_magic(name):
                matches = sorted(glob.glob(name))
                if not matches:
                    raise DataError(f"no file matches the shard pattern {name!r}")
            else:
                matches = [name] if os.path.isfile(name) else []
                missing += [] if matches else [name]
            found.extend(Path(m).absolute() for m in matches)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} shard(s) of data.path={spec!r} do not exist: {', '.join(missing[:3])}{more} "
                        "(give a brace pattern like '/data/{00000..00009}.tar', a glob, a folder of .tar files, or "
                        "paths joined with '::')")
    if not found:
        raise DataError("data.path is empty: the webdataset source needs data.path=/data/{00000..00009}.tar")
    return list(dict.fromkeys(found))


def split_key(member: str) -> tuple[str, str]:
    """``dir/00042.seg.png`` -> (``dir/00042``, ``seg.png``): the webdataset convention (first dot of the name)."""
    folder, _, name = member.rpartition("/")
    stem, _, extension = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _caption_of(parts: dict[str, bytes]) -> str:
    if "txt" in parts:
        return parts["txt"].decode("utf-8", "replace").strip()
    if "json" in parts:
        try:
            record = json.loads(parts["json"])
        except ValueError:
            return ""
        text = record.get("caption", record.get("text")) if isinstance(record, dict) else None
        return text.strip() if isinstance(text, str) else ""
    return ""


def _label_of(parts: dict[str, bytes]) -> int:
    try:
        return int(parts["cls"].decode().strip()) if "cls" in parts else 0
    except ValueError:
        return 0


def _index_shard(path: Path) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Every sample of one shard as {key, offset, size, caption, label}, and [name, reason] of those skipped."""
    try:
        tar = tarfile.open(path, "r:")  # plain tar only: random access needs uncompressed offsets
    except (tarfile.TarError, OSError) as error:
        fix = f" (decompress it first, e.g. `gunzip -k {path}`)" if str(path).endswith(("gz", "bz2", "xz")) else ""
        raise DataError(f"the shard {path} is not a readable uncompressed tar archive: {error}{fix}") from error
    samples: dict[str, dict[str, Any]] = {}
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            key, extension = split_key(member.name)
            sample = samples.setdefault(key, {"key": key, "parts": {}, "images": {}})
            if "." + extension in IMAGE_EXTENSIONS:
                sample["images"][extension] = (member.offset_data, member.size)
            elif extension in ("txt", "json", "cls"):
                sample["parts"][extension] = tar.extractfile(member).read()
        handle = tar.fileobj
        good, skipped = [], []
        for sample in samples.values():
            kept = _pick_image(sample, handle)
            if isinstance(kept, str):
                skipped.append([f"{path.name}:{sample['key']}", kept])
            else:
                good.append({"key": sample["key"], "offset": kept[0], "size": kept[1],
                             "caption": _caption_of(sample["parts"]), "label": _label_of(sample["parts"])})
    return good, skipped


def _pick_image(sample: dict[str, Any], handle: Any) -> tuple[int, int] | str:
    """(offset, size) of the sample's image, or why it has none that can be used."""
    if not sample["images"]:
        return "no image member (jpg, png, webp, ...)"
    extension = min(sample["images"], key=lambda e: IMAGE_KEYS.index(e) if e in IMAGE_KEYS else len(IMAGE_KEYS))
    offset, size = sample["images"][extension]
    if size == 0:
        return f"empty {extension} member"
    handle.seek(offset)
    problem = image_problem(io.BytesIO(handle.read(size)))
    return problem if problem else (offset, size)


def _build(paths: list[Path]) -> tuple[Arrays, dict[str, Any]]:
    keys, captions, shard, offsets, sizes, labels, skipped = [], [], [], [], [], [], []
    for number, path in enumerate(paths):
        good, bad = _index_shard(path)
        skipped.extend(bad)
        for sample in good:
            keys.append(sample["key"])
            captions.append(sample["caption"])
            shard.append(number)
            offsets.append(sample["offset"])
            sizes.append(sample["size"])
            labels.append(sample["label"])
    arrays = {**PackedStrings.pack(keys).arrays("keys"), **PackedStrings.pack(captions).arrays("captions"),
              "shard": np.asarray(shard, np.int32), "offset": np.asarray(offsets, np.int64),
              "size": np.asarray(sizes, np.int64), "labels": np.asarray(labels, np.int64)}
    return arrays, {"skipped": skipped}


class ShardDataset(DecodedOnRead):
    """The samples of local webdataset shards, resized to a square and captioned.

    Attributes:
        shards: the shard files, in order.
        keys: each sample's key (its member path without extension); ``keys[i]`` is in shard ``shard_of(i)``.
        captions: caption of each sample.
        skipped: (shard:key, reason) of every sample without a usable image.
    """

    def __init__(self, spec: str, resolution: int = 32) -> None:
        """Find the shards and load their index (building it first when they are new or changed).

        Raises:
            DataError: a shard is missing, compressed or not a tar, or no sample has a usable image.
        """
        if resolution < 1:
            raise ValueError(f"resolution must be positive, not {resolution}")
        self.resolution, self.source = resolution, spec
        self.shards = shard_paths(spec)
        listing = []
        for path in self.shards:
            info = path.stat()
            listing.append((os.fspath(path), info.st_size, info.st_mtime_ns))
        arrays, record = load_or_build("webdataset", [os.fspath(p) for p in self.shards], digest(listing),
                                       lambda: _build(self.shards))
        self.keys = PackedStrings.from_arrays(arrays, "keys")
        self.captions = PackedStrings.from_arrays(arrays, "captions")
        self._shard, self._offset, self._size = arrays["shard"], arrays["offset"], arrays["size"]
        self._labels = arrays["labels"]
        self.skipped = [(name, reason) for name, reason in record["skipped"]]
        self._report_skipped()
        if not len(self.keys):
            raise DataError(f"none of the {len(self.shards)} shards of {spec} holds a sample with a usable image "
                            "(a jpg, png or webp member beside its txt/json caption)")

    def _report_skipped(self) -> None:
        if not self.skipped:
            return
        lines = [f"  {name}: {reason}" for name, reason in self.skipped[:MAX_REPORTED]]
        more = len(self.skipped) - MAX_REPORTED
        warnings.warn(f"Skipped {len(self.skipped)} samples of {self.source}:\n" + "\n".join(lines)
                      + (f"\n  ... and {more} more (see dataset.skipped)" if more > 0 else ""),
                      SkippedImagesWarning, stacklevel=3)

    def shard_of(self, index: int) -> Path:
        return self.shards[int(self._shard[index])]

    def __len__(self) -> int:
        return len(self.keys)

    def read_image(self, index: int) -> Image.Image:
        with open(self.shard_of(index), "rb") as handle:
            handle.seek(int(self._offset[index]))
            data = handle.read(int(self._size[index]))
        return open_rgb(io.BytesIO(data), draft_size=self.resolution)

    def caption(self, index: int) -> str:
        return self.captions[index]

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def name(self, index: int) -> str:
        return f"{self.shard_of(index)}:{self.keys[index]}"

    def split_keys(self) -> PackedStrings:
        """What ``data.heldout_fraction`` hashes: each sample's key (img2dataset numbers them across shards)."""
        return self.keys
