"""Conversions between PIL images and (3, H, W) tensors in [-1, 1], and image grids.

Pillow's own ``convert`` clips 16/32-bit and float images at 255 and drops alpha; :func:`unit_grey`
and :func:`to_rgb` convert them by what the values mean instead (one rule for the folder dataset and
for the images users hand to the pipelines).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

# Modes whose values do not fit Pillow's 8-bit conversions.
WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;16S")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Nominal ranges tried in order: a value range is read as the first one its maximum fits in.
_NOMINAL_MAXIMA = (1.0, 255.0, 65535.0)


def is_wide(image: Image.Image) -> bool:
    """Whether an image holds 16/32-bit integer or float values (modes I, I;16*, F)."""
    return image.mode in WIDE_MODES or image.mode.startswith("I;16")


def has_alpha(image: Image.Image) -> bool:
    """Whether an image carries transparency (an alpha band or a transparent palette / colour key)."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def unit_grey(image: Image.Image) -> np.ndarray:
    """A wide greyscale image (:func:`is_wide`) -> (H, W) float32 in [0, 1], scaled by its real range.

    16-bit modes (``I;16*``, and ``I`` as older Pillows open 16-bit PNGs) are read on 0..65535; a
    mode ``I`` image with larger values (32-bit TIFF) is stretched to its maximum. Float (``F``)
    images have no declared range, so theirs is the first of [0, 1], [0, 255], [0, 65535] that holds
    the maximum (else the maximum itself); NaN/inf count as 0. Negative values become 0.
    """
    values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "F":
        top = next((m for m in _NOMINAL_MAXIMA if peak <= m), peak)
    else:  # "I": 32-bit signed; in practice a 16-bit PNG
        top = 65535.0 if peak <= 65535 else peak
    return np.clip(values / top, 0.0, 1.0).astype(np.float32)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB; transparency is composited onto white.

    Wide modes are scaled by their real range (:func:`unit_grey`), not clipped at 255.

    Raises:
        ValueError: the mode cannot be converted.
    """
    if is_wide(image):
        grey = np.rint(unit_grey(image) * 255.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # CMYK (Pillow undoes Adobe's inverted JPEG CMYK when decoding), L, 1, P, YCbCr, ...
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image) -> Tensor:
    """Convert a PIL image of any mode (by :func:`to_rgb`) to a (3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_pil(images: Tensor) -> list[Image.Image]:
    """Convert (B, 3, H, W) or (3, H, W) tensors in [-1, 1] to RGB PIL images."""
    if images.ndim == 3:
        images = images[None]
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def make_grid(images: Tensor, columns: int | None = None, padding: int = 2) -> Image.Image:
    """Tile (B, 3, H, W) images in [-1, 1] into one PIL image on a white background."""
    count, _, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding), "white")
    for index, tile in enumerate(tensor_to_pil(images)):
        row, column = divmod(index, columns)
        grid.paste(tile, (padding + column * (width + padding), padding + row * (height + padding)))
    return grid


def label_rows(grid: Image.Image, labels: list[str], rows: int) -> Image.Image:
    """Put one text label left of each of the grid's ``rows`` equal-height rows (e.g. the prompt)."""
    font = ImageFont.load_default()
    margin = max(int(ImageDraw.Draw(grid).textlength(text, font=font)) for text in labels) + 8
    labelled = Image.new("RGB", (grid.width + margin, grid.height), "white")
    labelled.paste(grid, (margin, 0))
    draw, row_height = ImageDraw.Draw(labelled), grid.height / rows
    for row, text in enumerate(labels):
        draw.text((4, int((row + 0.5) * row_height) - 6), text, fill="black", font=font)
    return labelled


def save_grid(images: Tensor, path: str | Path, columns: int | None = None, scale: int = 1,
              row_labels: list[str] | None = None) -> Path:
    """Write a grid of images as PNG (optionally upscaled with nearest neighbour, rows labelled) and return its path."""
    grid = make_grid(images, columns)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    if row_labels:
        per_row = columns or math.ceil(math.sqrt(images.shape[0]))
        grid = label_rows(grid, row_labels, math.ceil(images.shape[0] / per_row))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
