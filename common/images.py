"""Conversions between PIL images and (3, H, W) tensors in [-1, 1], and image grids."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def pil_to_tensor(image: Image.Image) -> Tensor:
    """Convert an RGB PIL image to a (3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
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
