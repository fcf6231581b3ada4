"""Built-in datasets behind one interface.

Every dataset is a map-style ``torch.utils.data.Dataset`` whose items are
``{"image": (3, H, W) float in [-1, 1], "caption": str, "label": int}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch.utils.data import Dataset

from common.config import ConfigError


class DataError(ValueError):
    """A dataset that cannot be built from what the user pointed to (e.g. a folder without usable images)."""


@dataclass(frozen=True)
class DataConfig:
    """Which images to train or evaluate on.

    name: ``shapes`` (procedural), ``emoji`` (Noto Color Emoji glyphs) or ``folder`` (``path``).
    resolution: square side in pixels.
    split: ``train`` or ``heldout`` (the fixed evaluation split), or ``all``.
    size: number of items of the procedural ``shapes`` dataset (its stream is infinite).
    seed: seed of the procedural data and of the augmentations.
    path: image folder for ``folder``.
    augment: captioned augmentations (emoji: background colours), train split only.
    """

    name: Literal["shapes", "emoji", "folder"] = "shapes"
    resolution: int = 32
    split: Literal["train", "heldout", "all"] = "train"
    size: int = 10_000
    seed: int = 0
    path: str = ""
    augment: bool = False


def build_dataset(config: DataConfig) -> Dataset:
    """Instantiate the dataset a ``DataConfig`` names."""
    if config.name == "shapes":
        from common.data.shapes import ShapesDataset

        return ShapesDataset(config.resolution, size=config.size, seed=config.seed, split=config.split)
    if config.name == "emoji":
        from common.data.emoji import EmojiDataset

        return EmojiDataset(config.resolution, split=config.split, augment=config.augment, seed=config.seed)
    if not config.path:
        raise ConfigError("data.path is empty: the folder dataset needs data.path=/path/to/images")
    from common.data.folder import FolderDataset

    return FolderDataset(config.path, config.resolution)


def label_names(config: DataConfig) -> list[str] | None:
    """The name of each label (index = label) of the dataset ``config`` names, where labels have names.

    shapes: the caption of each label (``ShapeSpec.from_label(label).caption``); folder: its class
    sub-folders, when every image sits in one; otherwise (emoji, a folder without classes) None.
    Nothing is rendered or decoded.
    """
    if config.name == "shapes":
        from common.data.shapes import NUM_LABELS, ShapeSpec

        return [ShapeSpec.from_label(label).caption for label in range(NUM_LABELS)]
    if config.name == "folder" and config.path:
        from common.data.folder import folder_classes

        return folder_classes(config.path) or None
    return None
