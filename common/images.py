"""Conversions between PIL images and (3, H, W) tensors in [-1, 1], and image grids."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
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


def save_grid(images: Tensor, path: str | Path, columns: int | None = None, scale: int = 1) -> Path:
    """Write a grid of images as PNG (optionally upscaled with nearest neighbour) and return its path."""
    grid = make_grid(images, columns)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
