"""Decoding, cheap checks and the read-time skip shared by the image sources read from disk.

Every source (``folder``, ``webdataset``, ``hf``) turns one stored image into an item the same way:
decode (JPEGs at a reduced scale when that is still large enough), upright it by its EXIF
orientation, convert any mode to RGB (:func:`common.images.to_rgb`), centre-crop to a square and
resize. :func:`image_problem` is the check an index runs without decoding the pixels,
:class:`DecodedOnRead` is the base that decodes only in ``__getitem__`` and skips what fails there,
and :class:`Selection` one split of such a source.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import struct
from pathlib import Path
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from common.data.dataset_config import DataError
from common.images import pil_to_tensor, to_rgb

logger = logging.getLogger(__name__)

Source = Union[str, os.PathLike, IO[bytes]]
# How each format's last bytes end when the file is whole; anything else gets a full decode at indexing.
_ENDINGS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}


def open_rgb(source: Source, draft_size: int | None = None) -> Image.Image:
    """Decode an image file (a path or a binary file object) fully and return it as upright RGB.

    Args:
        source: image file.
        draft_size: when set, JPEGs may be decoded at a reduced scale no smaller than this.
    """
    with Image.open(source) as image:
        if draft_size is not None:
            image.draft(image.mode, (draft_size, draft_size))
        # load() decodes every byte, so truncated files raise here (LOAD_TRUNCATED_IMAGES is left
        # as it is: changing Pillow's global state would affect the caller's other code).
        image.load()
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - a broken EXIF orientation is no reason to drop a picture
            logger.debug("ignoring unreadable EXIF orientation of %s", source)
        return to_rgb(image)


def square_item(image: Image.Image, caption: str, label: int, resolution: int) -> dict[str, Tensor | str | int]:
    """The item of an RGB image: centre-cropped to a square and resized to ``resolution`` (fit = crop, then
    resize: the same as shorter side + centre crop)."""
    square = ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.LANCZOS)
    return {"image": pil_to_tensor(square), "caption": caption, "label": label}


@functools.lru_cache(maxsize=None)
def _mode_problem(mode: str) -> str | None:
    """Why images of ``mode`` cannot become RGB, tried on one pixel (None: they can, or Pillow cannot make one)."""
    try:
        pixel = Image.new(mode, (1, 1))
    except (ValueError, TypeError, OSError):
        return None  # a mode Pillow only reads: the full decode at read time decides
    try:
        to_rgb(pixel)
    except Exception as error:  # noqa: BLE001
        return f"mode {mode} cannot be converted to RGB ({error})"
    return None


def _looks_cut_short(handle: IO[bytes], image_format: str | None) -> bool:
    """Whether the file's last bytes say it is incomplete (JPEG, PNG, GIF end markers; the WebP RIFF size)."""
    handle.seek(0, io.SEEK_END)
    size = handle.tell()
    if image_format == "WEBP":
        handle.seek(4)
        declared = handle.read(4)
        return len(declared) < 4 or struct.unpack("<I", declared)[0] + 8 > size
    ending = _ENDINGS.get(image_format or "")
    if ending is None:
        return False
    handle.seek(max(size - 64, 0))
    return not handle.read().rstrip(b"\x00\r\n ").endswith(ending)


def image_problem(handle: IO[bytes]) -> str | None:
    """Why an image file cannot be used, from its header and its last bytes; None when it looks whole.

    The pixels are decoded only when the end of the file says it was cut short (a truncated JPEG's
    header reads fine), so that a good file costs two small reads. Files that pass may still fail
    to decode later; :class:`DecodedOnRead` skips those.
    """
    try:
        with Image.open(handle) as image:
            width, height = image.size
            image_format, mode = image.format, image.mode
        if width < 1 or height < 1:
            return f"image of {width}x{height} pixels"
        problem = _mode_problem(mode)
        if problem is None and _looks_cut_short(handle, image_format):
            handle.seek(0)
            open_rgb(handle)  # trailing bytes after the end marker are fine when it decodes
        return problem
    except Exception as error:  # noqa: BLE001 - any decoder failure means "skip this file"
        return f"{type(error).__name__}: {error}"


def file_problem(path: Path) -> str | None:
    """:func:`image_problem` of a file, or why it cannot be opened."""
    try:
        with open(path, "rb") as handle:
            return image_problem(handle)
    except OSError as error:
        return f"{type(error).__name__}: {error}"


class DecodedOnRead(Dataset):
    """Base of the sources that decode an image only when its item is read.

    Subclasses implement :meth:`read_image`, :meth:`caption`, :meth:`label`, :meth:`name` and
    ``__len__``. An image that fails to decode is named once in the log, counted in
    :attr:`unreadable` (per process) and replaced by the next readable item (in index order,
    wrapping), so a batch keeps its size and a resumed run reads exactly what an uninterrupted one
    would have read.
    """

    resolution: int
    source: str  # what the errors call the whole source (a folder, a shard pattern)

    def read_image(self, index: int) -> Image.Image:
        """The decoded RGB image of item ``index`` (any exception: the image is unreadable)."""
        raise NotImplementedError

    def caption(self, index: int) -> str:
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        """What the log calls item ``index`` (a path, a shard and key, a row)."""
        raise NotImplementedError

    @property
    def unreadable(self) -> dict[int, str]:
        """Index -> "name: reason" of every item this process found unreadable."""
        return self.__dict__.setdefault("_unreadable", {})

    def __getitem__(self, index: int) -> dict[str, Tensor | str | int]:
        count = len(self)
        index = range(count)[index]  # negative indices, and an IndexError past the end
        for candidate in (index + step for step in range(count)):
            candidate %= count
            if candidate in self.unreadable:
                continue
            try:
                image = self.read_image(candidate)
            except Exception as error:  # noqa: BLE001 - a bad file is skipped, never a crash
                self._skip(candidate, error)
                continue
            return square_item(image, self.caption(candidate), self.label(candidate), self.resolution)
        raise DataError(f"none of the {count} images of {self.source} could be decoded; see the log for each reason")

    def _skip(self, index: int, error: Exception) -> None:
        self.unreadable[index] = f"{self.name(index)}: {type(error).__name__}: {error}"
        logger.warning("skipped an unreadable image, %s (read as the next readable item instead; %d unreadable "
                       "so far in this process)", self.unreadable[index], len(self.unreadable))


class Selection(DecodedOnRead):
    """The items ``rows`` (int array, in order) of a source read from disk: one split of it."""

    def __init__(self, base: DecodedOnRead, rows: np.ndarray, what: str) -> None:
        self.base, self.rows = base, rows
        self.resolution, self.source = base.resolution, f"{base.source} ({what})"

    def __len__(self) -> int:
        return len(self.rows)

    def read_image(self, index: int) -> Image.Image:
        return self.base.read_image(int(self.rows[index]))

    def caption(self, index: int) -> str:
        return self.base.caption(int(self.rows[index]))

    def label(self, index: int) -> int:
        return self.base.label(int(self.rows[index]))

    def name(self, index: int) -> str:
        return self.base.name(int(self.rows[index]))
