"""Any folder of images as a captioned dataset, robust to broken and odd files.

Every candidate image is decoded once in ``__init__``; the ones that fail are skipped, listed in
``dataset.skipped`` and reported in one warning, so ``__getitem__`` only meets images that decode.
The folder is only ever read.
"""
from __future__ import annotations

import json
import logging
import os
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from common.data.dataset_config import DataError
from common.images import pil_to_tensor, to_rgb

logger = logging.getLogger(__name__)

__all__ = ["CaptionWarning", "FolderDataset", "SkippedImagesWarning", "folder_classes", "to_rgb"]

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm", ".tga"}
)
METADATA_FILE = "metadata.jsonl"
# Longest list of skipped files spelled out in the warning; all of them are in ``.skipped``.
MAX_REPORTED = 50
# Names spelled out per kind in the caption warning (the counts are always complete).
MAX_NAMED = 5


class SkippedImagesWarning(UserWarning):
    """Some files of an image folder could not be decoded, or some folders could not be listed."""


class CaptionWarning(UserWarning):
    """``metadata.jsonl`` lines that match no image, or images that no caption source names."""


def _list_images(root: Path) -> tuple[list[Path], list[str]]:
    """Image files under root, recursively (through symlinked folders and files), sorted.

    Hidden files and folders are dropped silently because they are tool litter (.git, macOS
    ``._x.png``). Returns the files and a description of each folder left out: a symlink back to a
    folder above it (a loop) or a folder that cannot be read; these are named, not silently lost.
    """
    found: list[Path] = []
    left_out: list[str] = []

    def walk(directory: Path, ancestors: frozenset[str]) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            left_out.append(f"{directory}: cannot be listed ({error.strerror or error})")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(directory, entry.name)
            if entry.is_dir(follow_symlinks=True):
                real = os.path.realpath(path)
                if real in ancestors:
                    left_out.append(f"{path.relative_to(root)}: symlink loop (points back to {real})")
                else:
                    walk(path, ancestors | {real})
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)  # dangling symlinks too: they are reported as undecodable

    walk(root, frozenset({os.path.realpath(root)}))
    return sorted(found), left_out


def _open_rgb(path: Path, draft_size: int | None = None) -> Image.Image:
    """Decode a file fully and return it as upright RGB.

    Args:
        path: image file.
        draft_size: when set, JPEGs may be decoded at a reduced scale no smaller than this.
    """
    with Image.open(path) as image:
        if draft_size is not None:
            image.draft(image.mode, (draft_size, draft_size))
        # load() decodes every byte, so truncated files raise here (LOAD_TRUNCATED_IMAGES is left
        # as it is: changing Pillow's global state would affect the caller's other code).
        image.load()
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - a broken EXIF orientation is no reason to drop a picture
            logger.debug("ignoring unreadable EXIF orientation of %s", path)
        return to_rgb(image)


def _check(path: Path) -> str | None:
    """Return why a file cannot be used, or None when it decodes and converts."""
    # Pillow's own warnings (e.g. DecompressionBombWarning) pass through: catch_warnings would
    # not be thread-safe here, and they are worth seeing.
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        _open_rgb(path)
    except Exception as error:  # noqa: BLE001 - any decoder failure means "skip this file"
        return f"{type(error).__name__}: {error}"
    return None


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


def _match_metadata(root: Path, files: list[Path]) -> tuple[dict[Path, str], list[str], list[int]]:
    """Captions of ``metadata.jsonl`` by image path, the file names that match no image, the bad lines.

    Raises:
        DataError: a file name matches two images, or two lines give one image different captions.
    """
    metadata = root / METADATA_FILE
    if not metadata.is_file():
        return {}, [], []
    records, bad = _read_metadata(metadata)
    by_key: dict[str, list[Path]] = {}
    for path in files:
        by_key.setdefault(_nfc(path.relative_to(root).as_posix()), []).append(path)
    captions: dict[Path, tuple[int, str, str]] = {}
    unmatched = []
    bases = [PurePosixPath(_nfc(base.as_posix())) for base in (root.absolute(), root.resolve())]
    for number, name, text in records:
        hits = list(dict.fromkeys(p for key in _name_keys(name, bases) for p in by_key.get(key, [])))
        if len(hits) > 1:
            both = " and ".join(repr(p.relative_to(root).as_posix()) for p in hits[:2])
            raise DataError(f"{metadata} line {number}: file_name {name!r} matches both {both}; write the "
                            f"image's exact path relative to {root} (or rename one of them)")
        if not hits:
            unmatched.append(name)
            continue
        earlier = captions.setdefault(hits[0], (number, name, text))
        if earlier[2] != text:
            raise DataError(f"{metadata} lines {earlier[0]} and {number} give {hits[0].relative_to(root).as_posix()!r}"
                            f" two captions (as {earlier[1]!r} and {name!r}); keep one of the lines")
    return {path: text for path, (_, _, text) in captions.items()}, unmatched, bad


def _warn_captions(root: Path, unmatched: list[str], uncaptioned: list[str], bad: list[int], total: int) -> None:
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
    if problems:
        warnings.warn(f"{root / METADATA_FILE}: " + "; ".join(problems), CaptionWarning, stacklevel=4)


def _sidecar_caption(path: Path) -> str | None:
    """The stripped contents of ``<stem>.txt`` next to an image, if it exists and reads."""
    sidecar = path.with_suffix(".txt")
    try:
        return sidecar.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _class_of(relative: Path) -> str | None:
    """Top-level sub-folder of an image relative to the root, or None at the root."""
    return relative.parts[0] if len(relative.parts) > 1 else None


def _classes(root: Path, candidates: list[Path]) -> list[str]:
    """Sorted class sub-folder names of the image files ``candidates``; [] when any sits at the root."""
    folders = [_class_of(path.relative_to(root)) for path in candidates]
    if any(folder is None for folder in folders):
        return []
    return sorted(set(folders))  # type: ignore[arg-type]


def folder_classes(path: str | os.PathLike[str]) -> list[str]:
    """The class names (= labels, in order) a :class:`FolderDataset` of ``path`` would have, from the
    listing alone (no image is decoded): its sorted class sub-folders, [] without classes or folder."""
    root = Path(path).expanduser()
    return _classes(root, _list_images(root)[0]) if root.is_dir() else []


class FolderDataset(Dataset):
    """Images of a folder (recursive), resized to a square and captioned.

    Caption of each image, first that applies: its ``text`` (or ``caption``) in a root
    ``metadata.jsonl``; a ``.txt`` file with the same stem beside it; its class sub-folder name
    with ``_`` and ``-`` as spaces; else "". Class sub-folders count only when every image sits
    in one (none at the root); the label is then the sorted class index, else 0.

    Attributes:
        root: the folder.
        files: paths of the usable images, sorted.
        captions: caption of each image.
        labels: label of each image.
        classes: sorted class sub-folder names ([] without classes).
        skipped: (path relative to root, reason) of every file that did not decode.
        left_out: why each folder that was not listed was left out (a symlink loop, unreadable).

    Symlinked folders and images are followed; a symlink back to a folder above it is left out and
    named in the warning. ``metadata.jsonl`` names match their files whatever the Unicode normal form
    (macOS writes NFD), with ``./``, an absolute path inside the folder, or the folder's own name
    in front (``train/dog.png`` in ``train/``); lines that match no image and images without any
    caption are counted and named in one :class:`CaptionWarning`.
    """

    def __init__(self, path: str | os.PathLike[str], resolution: int = 32, workers: int | None = None) -> None:
        """Scan and validate the folder.

        Args:
            path: image folder.
            resolution: side of the square images in pixels.
            workers: decoding threads for validation (default: up to 8, from the CPU count).

        Raises:
            FileNotFoundError: the folder does not exist.
            DataError: it holds no usable image, or a ``metadata.jsonl`` name matches two images or
                gives one image two captions (a ValueError).
        """
        if resolution < 1:
            raise ValueError(f"resolution must be positive, not {resolution}")
        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"Image folder {self.root} does not exist or is not a folder.")
        self.resolution = resolution
        candidates, self.left_out = _list_images(self.root)
        if not candidates:
            raise DataError(f"No image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {self.root}."
                            + "".join(f"\n  left out {why}" for why in self.left_out))
        reasons = self._validate(candidates, workers)
        self.files = [p for p, reason in zip(candidates, reasons) if reason is None]
        self.skipped = [(self._relative(p).as_posix(), r) for p, r in zip(candidates, reasons) if r is not None]
        self._report_skipped(len(candidates))
        if not self.files:
            raise DataError(f"None of the {len(candidates)} image files in {self.root} could be decoded.")
        self.classes = self._find_classes(candidates)
        self.captions, self.labels = self._caption_all(candidates)

    def _relative(self, path: Path) -> Path:
        return path.relative_to(self.root)

    @staticmethod
    def _validate(candidates: list[Path], workers: int | None) -> list[str | None]:
        """Decode every candidate; Pillow's decoders release the GIL, so threads help."""
        workers = workers or min(8, os.cpu_count() or 1)
        if workers <= 1 or len(candidates) < 16:
            return [_check(p) for p in candidates]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_check, candidates))

    def _report_skipped(self, total: int) -> None:
        """Emit the one warning that lists the skipped files."""
        parts = []
        if self.skipped:
            lines = [f"  {name}: {reason}" for name, reason in self.skipped[:MAX_REPORTED]]
            if len(self.skipped) > MAX_REPORTED:
                lines.append(f"  ... and {len(self.skipped) - MAX_REPORTED} more (see dataset.skipped)")
            parts.append(f"Skipped {len(self.skipped)} of {total} image files in {self.root}:\n" + "\n".join(lines))
        if self.left_out:
            parts.append(f"Left out {len(self.left_out)} folders of {self.root}:\n"
                         + "\n".join(f"  {why}" for why in self.left_out))
        if parts:
            warnings.warn("\n".join(parts), SkippedImagesWarning, stacklevel=3)

    def _find_classes(self, candidates: list[Path]) -> list[str]:
        """Class names from the listing (not the decode results, so labels do not shift)."""
        return _classes(self.root, candidates)

    def _caption_all(self, candidates: list[Path]) -> tuple[list[str], list[int]]:
        """Caption and label of each usable image; warns once about ``metadata.jsonl`` mismatches."""
        # Matched against every listed file, so an undecodable image's line is not called unmatched.
        metadata, unmatched, bad = _match_metadata(self.root, candidates)
        uncaptioned = []
        index = {name: i for i, name in enumerate(self.classes)}
        captions, labels = [], []
        for path in self.files:
            relative = self._relative(path)
            folder = _class_of(relative) if self.classes else None
            caption = metadata.get(path)
            if caption is None:
                caption = _sidecar_caption(path)
            if caption is None:
                uncaptioned.append(relative.as_posix())
                caption = folder.replace("_", " ").replace("-", " ") if folder else ""
            captions.append(caption)
            labels.append(index[folder] if folder else 0)
        if (self.root / METADATA_FILE).is_file():
            _warn_captions(self.root, unmatched, uncaptioned, bad, len(self.files))
        return captions, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Tensor | str | int]:
        image = _open_rgb(self.files[index], draft_size=self.resolution)
        size = (self.resolution, self.resolution)
        # fit = centre crop to a square, then resize: the same as shorter side + centre crop.
        square = ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)
        return {"image": pil_to_tensor(square), "caption": self.captions[index], "label": self.labels[index]}
