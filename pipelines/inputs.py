"""User images and masks -> tensors: what ImageToImage and Inpaint accept, converted and checked once.

Images are PIL images (any mode, converted to RGB), lists of them, or tensors (3, H, W) / (N, 3, H, W)
with values in [0, 1] (the range ``output_type="pt"`` returns, so outputs can be fed back). Masks are
PIL images (converted to "L"), lists of them, or tensors (H, W) / (1, H, W) / (N, 1, H, W) in [0, 1];
white / 1 marks the pixels to regenerate, and values are cut at 0.5.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from common.images import pil_to_tensor

ImageInput = Image.Image | Sequence[Image.Image] | Tensor


def _pil_batch(images: Sequence[Image.Image], name: str, mode: str) -> Tensor:
    """PIL images of one size -> (N, C, H, W) float in [0, 1]."""
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"{name} images differ in size: {sorted(sizes)}")
    if mode == "RGB":
        return torch.stack([(pil_to_tensor(image) + 1) / 2 for image in images])
    arrays = [np.asarray(image.convert("L"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays))[:, None]


def _as_batch(value: ImageInput, name: str, mode: str) -> Tensor:
    """Any accepted image or mask input -> (N, C, H, W) float in [0, 1] (C = 3 images, 1 masks)."""
    channels = 3 if mode == "RGB" else 1
    if isinstance(value, Image.Image):
        value = [value]
    if isinstance(value, Sequence) and value and all(isinstance(v, Image.Image) for v in value):
        return _pil_batch(value, name, mode)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a PIL image, a list of PIL images or a tensor, got {type(value).__name__}")
    batch = value.detach().float()
    if channels == 1 and batch.ndim == 2:
        batch = batch[None]
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[1] != channels or batch.shape[0] == 0:
        shapes = "(3, H, W) or (N, 3, H, W)" if channels == 3 else "(H, W), (1, H, W) or (N, 1, H, W)"
        raise ValueError(f"{name} tensor must have shape {shapes}, got {tuple(value.shape)}")
    if not torch.isfinite(batch).all() or batch.min() < 0 or batch.max() > 1:
        raise ValueError(f"{name} tensor values must be in [0, 1] (the range output_type='pt' returns)")
    return batch.cpu()


def _resize(batch: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if tuple(batch.shape[-2:]) == size:
        return batch
    if mode == "nearest":
        return F.interpolate(batch, size=size, mode="nearest-exact")
    return F.interpolate(batch, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def image_batch(image: ImageInput, count: int, height: int | None, width: int | None) -> Tensor:
    """Input images -> (1 or ``count``, 3, H, W) in [-1, 1], resized to height x width when given.

    One image is shared by all ``count`` prompts; otherwise there must be one per prompt.
    """
    batch = _as_batch(image, "image", "RGB")
    if batch.shape[0] not in (1, count):
        raise ValueError(f"image holds {batch.shape[0]} images for {count} prompts; give one, or one per prompt")
    size = (height or batch.shape[-2], width or batch.shape[-1])
    return _resize(batch, size, "bicubic") * 2 - 1


def mask_batch(mask_image: ImageInput, count: int, image_size: tuple[int, int],
               height: int | None, width: int | None) -> Tensor:
    """Masks -> (1 or ``count``, 1, H, W) in {0, 1} (1 = regenerate), resized like the images.

    Args:
        mask_image: the masks, the size of the input images before any resizing.
        count: the number of prompts.
        image_size: (H, W) of the input images as given.
        height, width: the size the images are resized to, when given.
    """
    masks = _as_batch(mask_image, "mask_image", "L")
    if tuple(masks.shape[-2:]) != tuple(image_size):
        raise ValueError(f"mask_image is {masks.shape[-2]}x{masks.shape[-1]} (height x width) but the image is "
                         f"{image_size[0]}x{image_size[1]}; give a mask of the image's size")
    if masks.shape[0] not in (1, count):
        raise ValueError(f"mask_image holds {masks.shape[0]} masks for {count} prompts; give one, or one per prompt")
    binary = (masks >= 0.5).float()
    return _resize(binary, (height or image_size[0], width or image_size[1]), "nearest")


def image_size(image: ImageInput) -> tuple[int, int]:
    """(H, W) of the input images as given."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    return image[0].height, image[0].width


def keep_mask(regenerate: Tensor, factor: int) -> Tensor:
    """Pixel mask (N, 1, H, W), 1 = regenerate -> latent mask (N, 1, H/f, W/f), 1 = keep.

    A latent cell is regenerated when any of its f x f pixels is marked (max pooling), so the
    generated region always covers the whole marked area.
    """
    return 1.0 - F.max_pool2d(regenerate, kernel_size=factor)
