"""Noto Color Emoji glyphs as a captioned image dataset.

Each single-codepoint emoji of the font is rendered once per (font, resolution) and kept as a
small RGBA tile; items composite a tile onto a background colour on the fly. The caption is the
lower-cased Unicode character name ("dog", "red apple") and the label is the glyph's index in the
sorted codepoint list of the whole font, so train and held-out labels share one space.

The held-out split is fixed by the codepoint alone (a CRC-32 hash), so it does not depend on the
font version, the seed or the resolution.
"""
from __future__ import annotations

import functools
import logging
import os
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_ENV_VAR = "LATENTGEN_EMOJI_FONT"
# Noto Color Emoji is a CBDT bitmap font with one strike: FreeType only accepts this pixel size.
RENDER_SIZE = 109
# Fraction of the square tile left white on each side, so every image has a clean border.
MARGIN = 1 / 16
HELDOUT_MODULUS = 10

# Background colours of the augmented variants, named as they appear in captions.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "orange": (245, 140, 30),
    "yellow": (250, 215, 60),
    "green": (70, 170, 70),
    "blue": (50, 110, 220),
    "purple": (130, 70, 180),
    "pink": (240, 140, 190),
    "grey": (128, 128, 128),
    "black": (0, 0, 0),
}

Split = Literal["train", "heldout", "all"]

# Emoji of Unicode 14.0 and 15.0 that the Debian font has: older Pythons' unicodedata lacks their
# names (3.10 has Unicode 13, 3.11 has 14), and without this table the glyph set, and with it
# every label, would change with the Python version.
_NEW_EMOJI_NAMES: dict[int, str] = {
    0x1F6DC: "WIRELESS", 0x1F6DD: "PLAYGROUND SLIDE", 0x1F6DE: "WHEEL", 0x1F6DF: "RING BUOY",
    0x1F7F0: "HEAVY EQUALS SIGN", 0x1F979: "FACE HOLDING BACK TEARS", 0x1F9CC: "TROLL",
    0x1FA75: "LIGHT BLUE HEART", 0x1FA76: "GREY HEART", 0x1FA77: "PINK HEART", 0x1FA7B: "X-RAY",
    0x1FA7C: "CRUTCH", 0x1FA87: "MARACAS", 0x1FA88: "FLUTE", 0x1FAA9: "MIRROR BALL",
    0x1FAAA: "IDENTIFICATION CARD", 0x1FAAB: "LOW BATTERY", 0x1FAAC: "HAMSA",
    0x1FAAD: "FOLDING HAND FAN", 0x1FAAE: "HAIR PICK", 0x1FAAF: "KHANDA", 0x1FAB7: "LOTUS",
    0x1FAB8: "CORAL", 0x1FAB9: "EMPTY NEST", 0x1FABA: "NEST WITH EGGS", 0x1FABB: "HYACINTH",
    0x1FABC: "JELLYFISH", 0x1FABD: "WING", 0x1FABF: "GOOSE", 0x1FAC3: "PREGNANT MAN",
    0x1FAC4: "PREGNANT PERSON", 0x1FAC5: "PERSON WITH CROWN", 0x1FACE: "MOOSE", 0x1FACF: "DONKEY",
    0x1FAD7: "POURING LIQUID", 0x1FAD8: "BEANS", 0x1FAD9: "JAR", 0x1FADA: "GINGER ROOT",
    0x1FADB: "PEA POD", 0x1FAE0: "MELTING FACE", 0x1FAE1: "SALUTING FACE",
    0x1FAE2: "FACE WITH OPEN EYES AND HAND OVER MOUTH", 0x1FAE3: "FACE WITH PEEKING EYE",
    0x1FAE4: "FACE WITH DIAGONAL MOUTH", 0x1FAE5: "DOTTED LINE FACE", 0x1FAE6: "BITING LIP",
    0x1FAE7: "BUBBLES", 0x1FAE8: "SHAKING FACE", 0x1FAF0: "HAND WITH INDEX FINGER AND THUMB CROSSED",
    0x1FAF1: "RIGHTWARDS HAND", 0x1FAF2: "LEFTWARDS HAND", 0x1FAF3: "PALM DOWN HAND",
    0x1FAF4: "PALM UP HAND", 0x1FAF5: "INDEX POINTING AT THE VIEWER", 0x1FAF6: "HEART HANDS",
    0x1FAF7: "LEFTWARDS PUSHING HAND", 0x1FAF8: "RIGHTWARDS PUSHING HAND",
}

# Codepoints that only modify or join other emoji: they are not pictures of anything on their own.
_EXCLUDED_RANGES: tuple[tuple[int, int], ...] = (
    (0x0000, 0x007F),  # ASCII: keycap bases (digits, '#', '*'), space, controls
    (0x1F1E6, 0x1F1FF),  # regional indicators (halves of flags)
    (0x1F3FB, 0x1F3FF),  # skin-tone modifiers
    (0x1F9B0, 0x1F9B3),  # hair components
    (0xFE00, 0xFE0F),  # variation selectors
    (0xE0000, 0xE007F),  # tag characters (subdivision flags)
    (0xF0000, 0x10FFFF),  # private use planes (the font's internal glyphs)
)
# Marks, format and control characters, separators, modifier symbols (skin tones are Sk).
_EXCLUDED_CATEGORIES = frozenset({"Mn", "Mc", "Me", "Cc", "Cf", "Cs", "Co", "Zs", "Zl", "Zp", "Sk"})


class EmojiFontNotFoundError(FileNotFoundError):
    """The Noto Color Emoji font file is missing."""


def emoji_font_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Locate the emoji font.

    Args:
        path: explicit font file; when None, ``$LATENTGEN_EMOJI_FONT`` or ``DEFAULT_FONT``.

    Returns:
        The resolved path of an existing file.

    Raises:
        EmojiFontNotFoundError: the file does not exist; the message says how to install it.
    """
    chosen = Path(path or os.environ.get(FONT_ENV_VAR) or DEFAULT_FONT).expanduser()
    if not chosen.is_file():
        raise EmojiFontNotFoundError(
            f"Emoji font not found at {chosen}. Install the Debian package fonts-noto-color-emoji "
            f"(sudo apt-get install fonts-noto-color-emoji) or point {FONT_ENV_VAR} "
            "at a NotoColorEmoji.ttf file."
        )
    return chosen.resolve()


def emoji_name(codepoint: int) -> str | None:
    """Return the lower-cased Unicode name of a codepoint, or None when it has none."""
    name = unicodedata.name(chr(codepoint), None) or _NEW_EMOJI_NAMES.get(codepoint)
    return name.lower() if name else None


def split_of(codepoint: int) -> Literal["train", "heldout"]:
    """Return the fixed split of a codepoint: about 1 in 10 is held out.

    CRC-32 rather than ``hash()``: Python salts string hashes per process, CRC-32 never changes.
    """
    digest = zlib.crc32(f"U+{codepoint:04X}".encode("ascii"))
    return "heldout" if digest % HELDOUT_MODULUS == 0 else "train"


def _is_standalone_emoji(codepoint: int) -> bool:
    """Whether a codepoint of the font is a picture by itself (not a modifier or joiner)."""
    if any(low <= codepoint <= high for low, high in _EXCLUDED_RANGES):
        return False
    if emoji_name(codepoint) is None:
        return False
    # Names from _NEW_EMOJI_NAMES are "Cn" (unassigned) in older Pythons: not in the excluded set.
    return unicodedata.category(chr(codepoint)) not in _EXCLUDED_CATEGORIES


@functools.lru_cache(maxsize=4)
def _font_codepoints(font_path: str) -> tuple[int, ...]:
    """Sorted standalone emoji codepoints in the font's cmap."""
    from fontTools.ttLib import TTFont  # deferred: only this dataset needs fontTools

    with TTFont(font_path, lazy=True) as font:
        cmap = font.getBestCmap() or {}
    return tuple(sorted(cp for cp in cmap if _is_standalone_emoji(cp)))


def _load_font(font_path: str) -> ImageFont.FreeTypeFont:
    """Open the font at its only bitmap strike, with an actionable error for other fonts."""
    try:
        return ImageFont.truetype(font_path, RENDER_SIZE)
    except OSError as error:
        raise RuntimeError(
            f"Cannot open {font_path} at {RENDER_SIZE} px ({error}); the emoji dataset expects "
            "Noto Color Emoji from the Debian package fonts-noto-color-emoji."
        ) from error


def _render_glyph(font: ImageFont.FreeTypeFont, codepoint: int) -> Image.Image | None:
    """Render one glyph centred on a transparent square tile, or None when it draws nothing."""
    left, top, right, bottom = font.getbbox(chr(codepoint))
    pad = 4
    canvas = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), chr(codepoint), font=font, embedded_color=True)
    bbox = canvas.getbbox()
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    side = round(max(glyph.size) / (1 - 2 * MARGIN))
    tile = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    tile.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return tile


@functools.lru_cache(maxsize=4)
def _render_tiles(font_path: str, resolution: int) -> tuple[tuple[int, ...], np.ndarray]:
    """Render every standalone emoji at ``resolution``.

    The 109 px renders are dropped after resizing (keeping them would cost about 80 MB), so a
    second resolution renders again; that takes about a second.

    Returns:
        The sorted codepoints that draw something, and their tiles as (N, R, R, 4) uint8 RGBA
        (straight, not premultiplied, alpha).
    """
    start = time.perf_counter()
    font = _load_font(font_path)
    candidates = _font_codepoints(font_path)
    # Filled in place: stacking a list would hold two copies (360 MB each at 256 px).
    tiles = np.empty((len(candidates), resolution, resolution, 4), dtype=np.uint8)
    codepoints: list[int] = []
    for codepoint in candidates:
        tile = _render_glyph(font, codepoint)
        if tile is None:
            continue
        # Pillow resizes RGBA with premultiplied alpha, so transparent pixels do not bleed colour.
        tile = tile.resize((resolution, resolution), Image.Resampling.LANCZOS)
        tiles[len(codepoints)] = np.asarray(tile)
        codepoints.append(codepoint)
    if not codepoints:
        raise RuntimeError(f"No emoji could be rendered from {font_path}.")
    logger.debug("rendered %d emoji at %d px in %.2f s", len(codepoints), resolution, time.perf_counter() - start)
    return tuple(codepoints), tiles[: len(codepoints)]


def _composite(tile: np.ndarray, background: tuple[int, int, int]) -> Tensor:
    """Composite an RGBA uint8 tile onto a colour; return (3, R, R) in [-1, 1]."""
    alpha = tile[..., 3:].astype(np.float32) / 255.0
    rgb = tile[..., :3].astype(np.float32) * alpha + np.asarray(background, np.float32) * (1.0 - alpha)
    # Round to 8 bits like any decoded image, so that white is exactly +1.
    pixels = torch.from_numpy(np.rint(rgb)).permute(2, 0, 1).contiguous()
    return pixels / 127.5 - 1.0


class EmojiDataset(Dataset):
    """Noto Color Emoji glyphs, captioned with their Unicode names.

    Without augmentation there is one item per glyph of the split, on white. With ``augment``
    (train split only; ignored for ``heldout`` and ``all`` so evaluation stays plain) the dataset
    is ``1 + variants`` times longer: item ``i`` shows glyph ``i % G`` on white when
    ``i < G`` and otherwise on a background colour drawn for that glyph from ``BACKGROUNDS``
    (distinct colours per glyph, fixed by ``seed``), captioned e.g. "dog on a blue background".

    Attributes:
        codepoints: codepoints of the split's glyphs, sorted.
        captions: caption of every item.
        labels: label of every item (glyph index over the whole font).
        num_classes: number of glyphs in the whole font (all splits).
    """

    def __init__(
        self,
        resolution: int = 32,
        split: Split = "train",
        augment: bool = False,
        seed: int = 0,
        font_path: str | os.PathLike[str] | None = None,
        variants: int = 3,
    ) -> None:
        """Render (or reuse the cached renders of) the split's glyphs.

        Args:
            resolution: side of the square images in pixels.
            split: ``train``, ``heldout`` (about 10 %, fixed) or ``all``.
            augment: add background-colour variants (train only).
            seed: chooses the background colours of the variants.
            font_path: font file; default ``$LATENTGEN_EMOJI_FONT`` or ``DEFAULT_FONT``.
            variants: coloured copies of each glyph when augmenting (at most ``len(BACKGROUNDS)``).
        """
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, not {resolution}")
        if not 0 <= variants <= len(BACKGROUNDS):
            raise ValueError(f"variants must be in [0, {len(BACKGROUNDS)}], not {variants}")
        self.resolution = resolution
        self.split = split
        self.font_path = emoji_font_path(font_path)
        all_codepoints, all_tiles = _render_tiles(str(self.font_path), resolution)
        self.num_classes = len(all_codepoints)
        self._glyph_labels = [i for i, cp in enumerate(all_codepoints) if split in ("all", split_of(cp))]
        self.codepoints = [all_codepoints[i] for i in self._glyph_labels]
        if not self.codepoints:
            raise ValueError(f"The {split!r} split of {self.font_path} has no glyphs.")
        self._tiles = all_tiles  # shared with the cache: never written to
        self.augment = augment and split == "train"
        self._backgrounds = self._choose_backgrounds(seed, variants if self.augment else 0)
        self.captions = [self._caption(i) for i in range(len(self))]
        self.labels = [self._glyph_labels[i % len(self.codepoints)] for i in range(len(self))]

    def _choose_backgrounds(self, seed: int, variants: int) -> list[list[str]]:
        """Per glyph, the names of its ``variants`` distinct background colours."""
        names = list(BACKGROUNDS)
        chosen = []
        for codepoint in self.codepoints:
            rng = np.random.default_rng([seed, codepoint])
            chosen.append([names[k] for k in rng.permutation(len(names))[:variants]])
        return chosen

    def _locate(self, index: int) -> tuple[int, str | None]:
        """Map an item index to (glyph position in the split, background name or None)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        variant, glyph = divmod(index % len(self), len(self.codepoints))
        return glyph, (self._backgrounds[glyph][variant - 1] if variant else None)

    def _caption(self, index: int) -> str:
        glyph, background = self._locate(index)
        name = emoji_name(self.codepoints[glyph]) or ""
        if not background:
            return name
        article = "an" if background[0] in "aeiou" else "a"
        return f"{name} on {article} {background} background"

    def __len__(self) -> int:
        per_glyph = 1 + (len(self._backgrounds[0]) if self._backgrounds else 0)
        return len(self.codepoints) * per_glyph

    def __getitem__(self, index: int) -> dict[str, Tensor | str | int]:
        glyph, background = self._locate(index)
        label = self._glyph_labels[glyph]
        colour = BACKGROUNDS[background] if background else (255, 255, 255)
        return {
            "image": _composite(self._tiles[label], colour),
            "caption": self.captions[index],
            "label": label,
        }
