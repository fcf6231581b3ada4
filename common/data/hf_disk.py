"""A Hugging Face ``datasets`` dataset saved on local disk (``save_to_disk``), read at random.

The saved Arrow files are memory-mapped, so nothing that grows with the dataset is read at start-up;
an item is read as raw Arrow values (the image's stored bytes, not ``datasets``' decoded PIL image)
and decoded like a folder's image (:mod:`common.data.decoding`), so the three sources read from disk
give the same pixels for the same file. Images that fail to decode are skipped when read.

``datasets`` is an optional dependency: ``pip install -e '.[hf]'``.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from PIL import Image

from common.data.dataset_config import DataError
from common.data.decoding import DecodedOnRead, open_rgb

# The split of a saved DatasetDict that each DataConfig.split reads, first present wins.
SPLITS = {"train": ("train",), "heldout": ("test", "validation", "valid", "heldout")}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise DataError("data.name=hf needs the `datasets` package: pip install -e '.[hf]' "
                        "(or pip install datasets)") from error
    return datasets


def load_saved(path: str | os.PathLike[str], split: str) -> Any:
    """The ``datasets.Dataset`` saved at ``path``; for a saved ``DatasetDict``, its ``split`` (``all``: every split).

    Raises:
        DataError: nothing loadable is saved there, or the dict has no split for ``split``.
    """
    datasets = _datasets()
    if not Path(path).is_dir():
        raise DataError(f"data.path={os.fspath(path)!r} is not a folder: data.name=hf reads a dataset saved with "
                        "`dataset.save_to_disk(path)`")
    try:
        loaded = datasets.load_from_disk(os.fspath(path))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"{path} holds no dataset saved with `save_to_disk` ({error}); data.name=hf reads those "
                        "(for a folder of images use data.name=folder, for .tar shards data.name=webdataset)"
                        ) from error
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split == "all":
        return datasets.concatenate_datasets([loaded[name] for name in sorted(loaded)])
    for name in SPLITS[split]:
        if name in loaded:
            return loaded[name]
    raise DataError(f"{path} holds a DatasetDict with the splits {sorted(loaded)}, none of them a {split} split "
                    f"({' or '.join(SPLITS[split])}); set data.split=all to read every split")


def _check_column(dataset: Any, column: str, key: str, kinds: tuple[str, ...], path: str) -> None:
    """Raise a DataError naming the columns when ``column`` is absent or its feature type is not one of ``kinds``."""
    if column not in dataset.column_names:
        raise DataError(f"{path} has no column {column!r} (data.{key}); its columns are "
                        f"{', '.join(dataset.column_names)}: set data.{key}=<one of them>")
    feature = dataset.features[column]
    kind = type(feature).__name__
    dtype = getattr(feature, "dtype", "")
    if kind not in kinds and not any(dtype.startswith(k) for k in kinds):
        raise DataError(f"{path}: column {column!r} (data.{key}) holds {feature}, which is not usable here "
                        f"(expected {' or '.join(kinds)})")


class HFDiskDataset(DecodedOnRead):
    """The rows of a saved ``datasets`` dataset, resized to a square and captioned.

    Attributes:
        path: the folder the dataset was saved to.
        classes: the names of a ``ClassLabel`` label column ([] otherwise).
    """

    def __init__(self, path: str | os.PathLike[str], resolution: int = 32, *, image_column: str = "image",
                 caption_column: str = "text", label_column: str = "", split: str = "train") -> None:
        """Open (memory-map) the saved dataset and check its columns.

        Raises:
            DataError: ``datasets`` is missing, nothing is saved at ``path``, or a column is missing or of a
                type that cannot be an image, a caption or a label.
        """
        if resolution < 1:
            raise ValueError(f"resolution must be positive, not {resolution}")
        self.path, self.resolution, self.source = Path(path).expanduser(), resolution, os.fspath(path)
        dataset = load_saved(self.path, split)
        _check_column(dataset, image_column, "image_column", ("Image", "binary", "large_binary", "string"),
                      self.source)
        _check_column(dataset, caption_column, "caption_column", ("string", "large_string", "List",
                                                                  "LargeList", "Sequence"), self.source)
        columns = [image_column, caption_column]
        if label_column:
            _check_column(dataset, label_column, "label_column", ("ClassLabel", "int", "uint"), self.source)
            columns.append(label_column)
        if len(dataset) == 0:
            raise DataError(f"the dataset saved at {self.source} has no rows")
        label = dataset.features.get(label_column) if label_column else None
        self.classes: list[str] = list(getattr(label, "names", None) or [])
        self.columns = (image_column, caption_column, label_column)
        # Arrow rows: the image as stored (bytes / path), not decoded by `datasets`.
        self.rows = dataset.select_columns(columns).with_format("arrow")

    def __len__(self) -> int:
        return len(self.rows)

    def _value(self, index: int, column: str) -> Any:
        """One cell as a Python value (only that column is converted)."""
        return self.rows[index].column(column)[0].as_py()

    def read_image(self, index: int) -> Image.Image:
        value = self._value(index, self.columns[0])
        if isinstance(value, dict):  # the Image feature's storage
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return open_rgb(io.BytesIO(value), draft_size=self.resolution)
        if isinstance(value, str):
            return open_rgb(self.path / value, draft_size=self.resolution)  # absolute paths stay as they are
        raise DataError(f"row {index} of {self.source} has no image in column {self.columns[0]!r} ({value!r})")

    def caption(self, index: int) -> str:
        text = self._value(index, self.columns[1])
        if isinstance(text, list):  # several captions per image: the first
            text = next((t for t in text if isinstance(t, str)), "")
        return text.strip() if isinstance(text, str) else ""

    def label(self, index: int) -> int:
        if not self.columns[2]:
            return 0
        value = self._value(index, self.columns[2])
        return int(value) if value is not None else 0

    def name(self, index: int) -> str:
        return f"row {index} of {self.source}"
