"""Any folder of images as a captioned dataset, robust to broken and odd files.

Nothing is decoded at start-up: an index of the folder (:mod:`common.data.folder_index`: the usable
images from their headers, and the caption and label of each) is built once, by one process while
the others wait, saved outside the folder and reused while the folder is unchanged. Files that the
index finds unusable are skipped, listed in ``dataset.skipped`` and reported in one warning at every
start; an image that fails to decode later, when read, is skipped then (:class:`DecodedOnRead`).
The folder is only ever read.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

from common.data.dataset_config import DataError
from common.data.decoding import DecodedOnRead, open_rgb
from common.data.folder_index import IMAGE_EXTENSIONS, classes_of, folder_index, list_folder
from common.data.index_store import Ints, PackedStrings, Paths
from common.images import to_rgb

__all__ = ["CaptionWarning", "FolderDataset", "SkippedImagesWarning", "folder_classes", "to_rgb"]

# Longest list of skipped files spelled out in the warning; all of them are in ``.skipped``.
MAX_REPORTED = 50


class SkippedImagesWarning(UserWarning):
    """Some files of an image folder could not be decoded, or some folders could not be listed."""


class CaptionWarning(UserWarning):
    """``metadata.jsonl`` lines that match no image, or images that no caption source names."""


def folder_classes(path: str | os.PathLike[str]) -> list[str]:
    """The class names (= labels, in order) a :class:`FolderDataset` of ``path`` would have, from the
    listing alone (no image is opened): its sorted class sub-folders, [] without classes or folder."""
    root = Path(path).expanduser()
    return classes_of(list_folder(root).images) if root.is_dir() else []


class FolderDataset(DecodedOnRead):
    """Images of a folder (recursive), resized to a square and captioned.

    Caption of each image, first that applies: its ``text`` (or ``caption``) in a root
    ``metadata.jsonl``; a ``.txt`` file with the same stem beside it; its class sub-folder name
    with ``_`` and ``-`` as spaces; else "". Class sub-folders count only when every image sits
    in one (none at the root); the label is then the sorted class index, else 0.

    Attributes:
        root: the folder.
        files: paths of the usable images, sorted (a read-only sequence).
        captions: caption of each image (a read-only sequence).
        labels: label of each image (a read-only sequence).
        classes: sorted class sub-folder names ([] without classes).
        skipped: (path relative to root, reason) of every file the index found unusable.
        left_out: why each folder that was not listed was left out (a symlink loop, unreadable).
        unreadable: index -> reason of the images that passed the index but failed to decode when
            read in this process (each was replaced by the next readable image).

    Symlinked folders and images are followed; a symlink back to a folder above it is left out and
    named in the warning. ``metadata.jsonl`` names match their files whatever the Unicode normal form
    (macOS writes NFD), with ``./``, an absolute path inside the folder, or the folder's own name
    in front (``train/dog.png`` in ``train/``); lines that match no image and images without any
    caption are counted and named in one :class:`CaptionWarning`.
    """

    def __init__(self, path: str | os.PathLike[str], resolution: int = 32, workers: int | None = None) -> None:
        """List the folder and load its index (building it first when the folder is new or changed).

        Args:
            path: image folder.
            resolution: side of the square images in pixels.
            workers: threads that check image headers while indexing (default: up to 8, from the CPU count).

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
        self.resolution, self.source = resolution, str(self.root)
        listing = list_folder(self.root)
        self.left_out = listing.left_out
        if not listing.images:
            raise DataError(f"No image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {self.root}."
                            + "".join(f"\n  left out {why}" for why in self.left_out))
        arrays, record = folder_index(self.root, listing, workers)
        self._files = PackedStrings.from_arrays(arrays, "files")
        self._captions = PackedStrings.from_arrays(arrays, "captions")
        self._labels = arrays["labels"]
        self.skipped = [(name, reason) for name, reason in record["skipped"]]
        self.classes: list[str] = record["classes"]
        self._report_skipped(record["total"])
        if not len(self._files):
            raise DataError(f"None of the {record['total']} image files in {self.root} could be decoded.")
        if record["caption_warning"]:
            warnings.warn(record["caption_warning"], CaptionWarning, stacklevel=2)

    @property
    def files(self) -> Paths:
        return Paths(self.root, self._files)

    @property
    def captions(self) -> PackedStrings:
        return self._captions

    @property
    def labels(self) -> Ints:
        return Ints(self._labels)

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

    def __len__(self) -> int:
        return len(self._files)

    def read_image(self, index: int) -> Image.Image:
        return open_rgb(self.root / self._files[index], draft_size=self.resolution)

    def caption(self, index: int) -> str:
        return self._captions[index]

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def name(self, index: int) -> str:
        return f"{self.root}/{self._files[index]}"

    def split_keys(self) -> PackedStrings:
        """What ``data.heldout_fraction`` hashes: each image's path relative to the folder."""
        return self._files
