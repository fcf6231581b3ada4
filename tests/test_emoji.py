"""Tests of the Noto Color Emoji dataset (need Debian's fonts-noto-color-emoji)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from common.data.emoji import (
    BACKGROUNDS,
    DEFAULT_FONT,
    EmojiDataset,
    EmojiFontNotFoundError,
    emoji_font_path,
    emoji_name,
    split_of,
)

DOG = 0x1F415

try:
    FONT = emoji_font_path()
except EmojiFontNotFoundError:
    pytest.skip(
        f"emoji font missing ({DEFAULT_FONT}): apt-get install fonts-noto-color-emoji",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def train() -> EmojiDataset:
    return EmojiDataset(32, split="train")


@pytest.fixture(scope="module")
def heldout() -> EmojiDataset:
    return EmojiDataset(32, split="heldout")


def test_count_and_dog(train: EmojiDataset, heldout: EmojiDataset) -> None:
    assert len(train) + len(heldout) >= 1300
    assert "dog" in train.captions and "dog" not in heldout.captions
    assert "dog face" in train.captions + heldout.captions
    item = train[train.captions.index("dog")]
    assert item["caption"] == "dog"
    assert train.codepoints[train.captions.index("dog")] == DOG


def test_captions_are_lowercase_unicode_names(train: EmojiDataset) -> None:
    assert emoji_name(0x1F34E) == "red apple"
    assert emoji_name(0x1F600) == "grinning face"
    assert emoji_name(0x1FABF) == "goose"  # Unicode 15: named even where unicodedata is older
    assert all(c and c == c.lower() for c in train.captions)
    # Modifiers, joiners and keycap bases are not emoji by themselves.
    for codepoint in (0x1F3FB, 0x1F1E6, 0x200D, 0xFE0F, 0x23, 0x30, 0xE0062, 0x20E3):
        assert codepoint not in train.codepoints


def test_split_fixed_and_disjoint(train: EmojiDataset, heldout: EmojiDataset) -> None:
    everything = EmojiDataset(32, split="all")
    assert set(train.codepoints).isdisjoint(heldout.codepoints)
    assert sorted(train.codepoints + heldout.codepoints) == everything.codepoints
    assert 0.07 < len(heldout) / len(everything) < 0.13
    # The split is a pure function of the codepoint: these never move.
    assert split_of(DOG) == "train"
    assert split_of(0x1F41C) == "heldout" and "ant" in heldout.captions
    assert split_of(0x1F43B) == "heldout" and "bear face" in heldout.captions
    # Labels index the whole font, so both splits share one label space.
    assert everything.num_classes == train.num_classes == len(everything)
    dog = everything.codepoints.index(DOG)
    assert train.labels[train.codepoints.index(DOG)] == dog == everything.labels[dog]


def test_images(train: EmojiDataset) -> None:
    for index in (0, len(train) // 2, len(train) - 1):
        image = train[index]["image"]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert image.std() > 0.05  # a picture, not a blank canvas
        corners = image[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert corners.min() > 0.95  # white border
    assert train[-1]["caption"] == train.captions[-1]
    with pytest.raises(IndexError):
        train[len(train)]


def test_other_resolutions_are_fast() -> None:
    start = time.perf_counter()
    small = EmojiDataset(16, split="heldout")
    assert time.perf_counter() - start < 10.0
    assert small[0]["image"].shape == (3, 16, 16)
    assert EmojiDataset(48, split="heldout")[0]["image"].shape == (3, 48, 48)


def test_augment_captions(train: EmojiDataset) -> None:
    augmented = EmojiDataset(32, split="train", augment=True, seed=1, variants=3)
    glyphs = len(train)
    assert len(augmented) == 4 * glyphs
    assert augmented.captions[:glyphs] == train.captions
    dog = train.captions.index("dog")
    variants = [augmented.captions[dog + k * glyphs] for k in range(1, 4)]
    colours = [c.removeprefix("dog on ").removeprefix("an ").removeprefix("a ").removesuffix(" background")
               for c in variants]
    assert len(set(colours)) == 3 and set(colours) <= set(BACKGROUNDS)
    item = augmented[dog + glyphs]
    expected = torch.tensor(BACKGROUNDS[colours[0]], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(item["image"][:, 0, 0], expected, atol=0.01)
    assert item["label"] == augmented[dog]["label"]
    # Deterministic given the seed.
    again = EmojiDataset(32, split="train", augment=True, seed=1, variants=3)
    assert again.captions == augmented.captions
    # Evaluation splits are never augmented.
    assert EmojiDataset(32, split="heldout", augment=True).captions == EmojiDataset(32, split="heldout").captions


def test_missing_font(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.ttf"
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        EmojiDataset(32, font_path=missing)
    monkeypatch.setenv("LATENTGEN_EMOJI_FONT", str(missing))
    with pytest.raises(EmojiFontNotFoundError, match="fonts-noto-color-emoji"):
        emoji_font_path()
