"""Built-in datasets behind one interface.

Every dataset is a map-style ``torch.utils.data.Dataset`` whose items are
``{"image": (3, H, W) float in [-1, 1], "caption": str, "label": int}``.

Modules (the dataset modules are imported when a dataset is built, not with this package):

- ``common.data.dataset_config``: ``DataConfig`` and ``DataError`` (re-exported here).
- ``common.data.shapes``: the procedural shapes dataset, its captions and scorer.
- ``common.data.emoji``: Noto Color Emoji glyphs.
- ``common.data.folder``: a folder of images, optionally with class sub-folders (its index:
  ``common.data.folder_index``).
- ``common.data.shards``: local webdataset ``.tar`` shards (the img2dataset layout).
- ``common.data.hf_disk``: a Hugging Face ``datasets`` dataset saved on local disk.
- ``common.data.decoding`` and ``common.data.index_store``: what those three share (decoding only on
  read, skipping what fails then; indexes built once under a lock and reused).

The sources read from disk are map-style, so the training stream
(:class:`common.training.StreamSampler`) gives each process and loader worker a disjoint part of
every epoch and resumes at the exact sample from the checkpointed step.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from common.config import ConfigError
from common.data.dataset_config import DataConfig, DataError

__all__ = ["DataConfig", "DataError", "build_dataset", "has_heldout", "label_names", "no_heldout_message"]

SPLIT_SOURCES = ("folder", "webdataset")  # the sources that data.heldout_fraction / data.heldout_path split


def build_dataset(config: DataConfig) -> Dataset:
    """Instantiate the dataset a ``DataConfig`` names.

    Raises:
        ConfigError: ``data.path`` is missing for a source read from disk, or an ``hf``-only key is set for another.
    """
    _check_keys(config)
    if config.name == "shapes":
        from common.data.shapes import ShapesDataset

        return ShapesDataset(config.resolution, size=config.size, seed=config.seed, split=config.split)
    if config.name == "emoji":
        from common.data.emoji import EmojiDataset

        return EmojiDataset(config.resolution, split=config.split, augment=config.augment, seed=config.seed)
    if config.name == "webdataset":
        from common.data.shards import ShardDataset

        return _split(ShardDataset(_split_path(config), config.resolution), config)
    if config.name == "hf":
        from common.data.hf_disk import HFDiskDataset

        return HFDiskDataset(config.path, config.resolution, image_column=config.image_column,
                             caption_column=config.caption_column, label_column=config.label_column,
                             split=config.split)
    from common.data.folder import FolderDataset

    return _split(FolderDataset(_split_path(config), config.resolution), config)


def _split_path(config: DataConfig) -> str:
    return config.heldout_path if config.split == "heldout" and config.heldout_path else config.path


def _split(dataset, config: DataConfig) -> Dataset:
    """The ``config.split`` of a folder or shard set held out by key hash (the whole of it otherwise)."""
    if not config.heldout_fraction or config.split == "all":
        return dataset
    from common.data.decoding import Selection
    from common.data.index_store import held_out

    chosen = held_out(dataset.split_keys(), config.heldout_fraction)
    rows = np.flatnonzero(chosen if config.split == "heldout" else ~chosen)
    if not len(rows):
        raise DataError(f"no sample of {dataset.source} falls in the {config.split} split of data.heldout_fraction="
                        f"{config.heldout_fraction:g} ({len(chosen)} samples): choose a fraction nearer 0.5")
    return Selection(dataset, rows, f"{config.split} split, {config.heldout_fraction:g} held out by key hash")


def has_heldout(config: DataConfig) -> bool:
    """Whether ``split=heldout`` of ``config`` reads data apart from the train split: shapes and emoji have a
    fixed one; a folder or shard set when ``data.heldout_fraction`` or ``data.heldout_path`` is set; ``hf``
    when the saved dataset is a DatasetDict with a test or validation split."""
    if config.name in SPLIT_SOURCES:
        return bool(config.heldout_fraction or config.heldout_path)
    if config.name == "hf":
        from common.data.hf_disk import load_saved

        try:
            load_saved(config.path, "heldout")
        except DataError:
            return False
    return True


def no_heldout_message(config: DataConfig) -> str:
    """Why ``config`` has no held-out split, and the settings that give it one."""
    if config.name == "hf":
        return (f"the hf dataset at {config.path} has no test or validation split: save a DatasetDict with one "
                "(e.g. dataset.train_test_split(0.05).save_to_disk(path))")
    return (f"the {config.name} source {config.path} has no held-out split: set data.heldout_fraction=0.05 (that "
            "fraction of samples, by a hash of their keys, left out of training) or data.heldout_path=<held-out "
            f"{'shards' if config.name == 'webdataset' else 'images'}>")


_PATH_EXAMPLES = {"folder": "data.path=/path/to/images", "webdataset": "data.path=/data/{00000..00009}.tar",
                  "hf": "data.path=/path/saved/with/save_to_disk"}
_HF_KEYS = ("image_column", "caption_column", "label_column")


def _check_keys(config: DataConfig) -> None:
    """Refuse a source read from disk without ``data.path``, ``hf``-only keys given to another source, and
    held-out settings that do not apply or contradict each other."""
    if config.name in _PATH_EXAMPLES and not config.path:
        raise ConfigError(f"data.path is empty: the {config.name} dataset needs {_PATH_EXAMPLES[config.name]}")
    if not 0 <= config.heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction={config.heldout_fraction:g} must be in [0, 1), e.g. 0.05")
    if (config.heldout_fraction or config.heldout_path) and config.name not in SPLIT_SOURCES:
        fixed = "reads its saved test/validation split" if config.name == "hf" else "has a fixed held-out split"
        raise ConfigError(f"data.heldout_fraction and data.heldout_path apply to folder and webdataset, not "
                          f"{config.name}, which {fixed}: remove them")
    if config.heldout_fraction and config.heldout_path:
        raise ConfigError("data.heldout_fraction and data.heldout_path both set: hold out by hash or by a separate "
                          "path, not both")
    if config.name != "hf":
        default = DataConfig()
        changed = [f"data.{key}" for key in _HF_KEYS if getattr(config, key) != getattr(default, key)]
        if changed:
            raise ConfigError(f"{', '.join(changed)} only apply to data.name=hf, not {config.name}: remove them")


def label_names(config: DataConfig) -> list[str] | None:
    """The name of each label (index = label) of the dataset ``config`` names, where labels have names.

    shapes: the caption of each label (``ShapeSpec.from_label(label).caption``); folder: its class
    sub-folders, when every image sits in one; hf: the names of a ``ClassLabel`` label column;
    otherwise (emoji, a folder without classes, webdataset) None. Nothing is rendered or decoded.
    """
    if config.name == "shapes":
        from common.data.shapes import NUM_LABELS, ShapeSpec

        return [ShapeSpec.from_label(label).caption for label in range(NUM_LABELS)]
    if config.name == "folder" and config.path:
        from common.data.folder import folder_classes

        return folder_classes(config.path) or None
    if config.name == "hf" and config.path and config.label_column:
        from common.data.hf_disk import load_saved

        feature = load_saved(config.path, config.split).features.get(config.label_column)
        return list(getattr(feature, "names", None) or []) or None
    return None
