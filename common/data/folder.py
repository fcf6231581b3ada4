"""Any folder of images as a captioned dataset, robust to broken and odd files.

Every candidate image is decoded once in ``__init__``; the ones that fail are skipped, listed in
``dataset.skipped`` and reported in one warning, so ``__getitem__`` only meets images that decode.
The folder is only ever read.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from common.data.dataset_config import DataError
from common.images import pil_to_tensor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm", ".tga"}
)
METADATA_FILE = "metadata.jsonl"
# Longest list of skipped files spelled out in the warning; all of them are in ``.skipped``.
MAX_REPORTED = 50


class SkippedImagesWarning(UserWarning):
    """Some files of an image folder could not be decoded and were left out."""


def _list_images(root: Path) -> list[Path]:
    """Image files under root, recursively, sorted; hidden files and folders are ignored.

    Hidden entries are dropped silently because they are tool litter (.git, macOS ``._x.png``).
    """
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(directory, name))
    return sorted(found)


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float greyscale image to 8-bit ``L``.

    Pillow's own conversion clips at 255, which turns most 16-bit images white.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        low, high = float(values.min()), float(values.max())
        # Float images are usually in [0, 1]; anything else is stretched to its range.
        scale = 255.0 if low >= 0.0 and high <= 1.0 else 255.0 / max(high - low, 1e-12)
        values = (values - (0.0 if scale == 255.0 else low)) * scale
    elif image.mode.startswith("I;16") or values.max() <= 65535:
        values = values / 257.0  # 16-bit range: 65535 -> 255
    else:
        values = values * (255.0 / values.max())
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB; transparency is composited onto white.

    Raises:
        ValueError: the mode cannot be converted.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _sixteen_bit_to_l(image).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # CMYK (Pillow undoes Adobe's inverted JPEG CMYK when decoding), L, 1, P, YCbCr, ...
    return image.convert("RGB")


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


def _read_metadata(root: Path) -> dict[str, str]:
    """Captions from ``metadata.jsonl`` (Hugging Face imagefolder), keyed by relative POSIX path.

    Lines that are not JSON objects with a ``file_name`` and a ``text`` or ``caption`` string are
    ignored with one warning.
    """
    path = root / METADATA_FILE
    if not path.is_file():
        return {}
    captions, bad = {}, []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record.get("text", record.get("caption"))
            name = PurePosixPath(record["file_name"].replace("\\", "/"))
        except (ValueError, KeyError, TypeError, AttributeError):
            bad.append(number)
            continue
        if isinstance(text, str):
            captions[str(name)] = text.strip()
        else:
            bad.append(number)
    if bad:
        warnings.warn(f"{path}: ignored malformed lines {bad[:20]}", SkippedImagesWarning, stacklevel=4)
    return captions


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
    return _classes(root, _list_images(root)) if root.is_dir() else []


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
    """

    def __init__(self, path: str | os.PathLike[str], resolution: int = 32, workers: int | None = None) -> None:
        """Scan and validate the folder.

        Args:
            path: image folder.
            resolution: side of the square images in pixels.
            workers: decoding threads for validation (default: up to 8, from the CPU count).

        Raises:
            FileNotFoundError: the folder does not exist.
            DataError: it holds no usable image (a ValueError).
        """
        if resolution < 1:
            raise ValueError(f"resolution must be positive, not {resolution}")
        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"Image folder {self.root} does not exist or is not a folder.")
        self.resolution = resolution
        candidates = _list_images(self.root)
        if not candidates:
            raise DataError(f"No image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {self.root}.")
        reasons = self._validate(candidates, workers)
        self.files = [p for p, reason in zip(candidates, reasons) if reason is None]
        self.skipped = [(self._relative(p).as_posix(), r) for p, r in zip(candidates, reasons) if r is not None]
        self._report_skipped(len(candidates))
        if not self.files:
            raise DataError(f"None of the {len(candidates)} image files in {self.root} could be decoded.")
        self.classes = self._find_classes(candidates)
        self.captions, self.labels = self._caption_all()

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
        if not self.skipped:
            return
        lines = [f"  {name}: {reason}" for name, reason in self.skipped[:MAX_REPORTED]]
        if len(self.skipped) > MAX_REPORTED:
            lines.append(f"  ... and {len(self.skipped) - MAX_REPORTED} more (see dataset.skipped)")
        message = f"Skipped {len(self.skipped)} of {total} image files in {self.root}:\n" + "\n".join(lines)
        warnings.warn(message, SkippedImagesWarning, stacklevel=3)

    def _find_classes(self, candidates: list[Path]) -> list[str]:
        """Class names from the listing (not the decode results, so labels do not shift)."""
        return _classes(self.root, candidates)

    def _caption_all(self) -> tuple[list[str], list[int]]:
        metadata = _read_metadata(self.root)
        index = {name: i for i, name in enumerate(self.classes)}
        captions, labels = [], []
        for path in self.files:
            relative = self._relative(path)
            folder = _class_of(relative) if self.classes else None
            caption = metadata.get(relative.as_posix())
            if caption is None:
                caption = _sidecar_caption(path)
            if caption is None:
                caption = folder.replace("_", " ").replace("-", " ") if folder else ""
            captions.append(caption)
            labels.append(index[folder] if folder else 0)
        return captions, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Tensor | str | int]:
        image = _open_rgb(self.files[index], draft_size=self.resolution)
        size = (self.resolution, self.resolution)
        # fit = centre crop to a square, then resize: the same as shorter side + centre crop.
        square = ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)
        return {"image": pil_to_tensor(square), "caption": self.captions[index], "label": self.labels[index]}
