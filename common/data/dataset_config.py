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
