"""What names a dataset (:class:`DataConfig`) and the error a dataset raises (:class:`DataError`).

Apart from the package ``__init__`` so that the dataset modules import them without importing the
package that builds them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class DataError(ValueError):
    """A dataset that cannot be built from what the user pointed to (e.g. a folder without usable images)."""


@dataclass(frozen=True)
class DataConfig:
    """Which images to train or evaluate on.

    name: ``shapes`` (procedural), ``emoji`` (Noto Color Emoji glyphs), ``folder`` (an image folder),
        ``webdataset`` (local ``.tar`` shards, the img2dataset layout) or ``hf`` (a Hugging Face
        ``datasets`` dataset saved with ``save_to_disk``); the last three read ``path``.
    resolution: square side in pixels.
    split: ``train`` or ``heldout`` (the fixed evaluation split), or ``all``. ``hf``: a saved
        ``DatasetDict`` is read at its ``train`` split, or ``test``/``validation`` for ``heldout``;
        ``folder``/``webdataset``: see ``heldout_fraction`` and ``heldout_path``.
    size: number of items of the procedural ``shapes`` dataset (its stream is infinite).
    seed: seed of the procedural data and of the augmentations.
    path: ``folder``: the image folder; ``hf``: the folder ``save_to_disk`` wrote; ``webdataset``: the
        shards, as a brace pattern (``/data/{00000..00099}.tar``), a glob, a folder of ``.tar`` files,
        or several of these joined with ``::``.
    augment: captioned augmentations (emoji: background colours), train split only.
    image_column, caption_column: ``hf``: the columns holding the image and its caption.
    label_column: ``hf``: the column holding an integer class label ("" = every label is 0).
    heldout_fraction: ``folder``/``webdataset``: hold out this fraction of the samples, chosen by a hash
        of each sample's key (its relative path; its tar key, which img2dataset numbers uniquely), so
        a sample keeps its split when shards or files are added or re-cut: ``train`` leaves them out,
        ``heldout`` reads them alone, ``all`` reads every sample. 0: no held-out split.
    heldout_path: ``folder``/``webdataset``: held-out data apart, in the form of ``path`` (e.g. the
        shards img2dataset wrote from a validation set), read by ``split=heldout``; ``train`` and
        ``all`` read ``path``. Without either of these two, a folder or shard set has no held-out
        split and ``split`` does not change what is read.
    """

    name: Literal["shapes", "emoji", "folder", "webdataset", "hf"] = "shapes"
    resolution: int = 32
    split: Literal["train", "heldout", "all"] = "train"
    size: int = 10_000
    seed: int = 0
    path: str = ""
    augment: bool = False
    image_column: str = "image"
    caption_column: str = "text"
    label_column: str = ""
    heldout_fraction: float = 0.0
    heldout_path: str = ""
