"""Built-in datasets behind one interface.

Every dataset is a map-style ``torch.utils.data.Dataset`` whose items are
``{"image": (3, H, W) float in [-1, 1], "caption": str, "label": int}``.

Modules (the dataset modules are imported when a dataset is built, not with this package):

- ``common.data.dataset_config``: ``DataConfig`` and ``DataError`` (re-exported here).
- ``common.data.shapes``: the procedural shapes dataset, its captions and scorer.
- ``common.data.emoji``: Noto Color Emoji glyphs.
- ``common.data.folder``: a folder of images, optionally with class sub-folders.
"""
from __future__ import annotations

from torch.utils.data import Dataset

from common.config import ConfigError
from common.data.dataset_config import DataConfig, DataError

__all__ = ["DataConfig", "DataError", "build_dataset", "label_names"]


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
