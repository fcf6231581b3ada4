"""User images and masks -> tensors: what ImageToImage and Inpaint accept, converted by what they mean.

Accepted, for ``image`` and ``mask_image`` alike: a PIL image, a NumPy array, a tensor, or a list of
them (one image each, all of one size).

- Images. PIL images of any mode go through :func:`common.images.to_rgb`, as the training folders
  do: transparency (RGBA, LA, a transparent palette) is composited onto white, 16-bit and float
  modes are scaled by their real range. Arrays are channel-last, (H, W), (H, W, 1|3|4) or
  (N, H, W, 1|3|4) (4 = RGBA, composited onto white); tensors are channel-first, (3, H, W) or
  (N, 3, H, W).
- Masks. Arrays are (H, W), (H, W, 1), (N, H, W) or (N, H, W, 1); tensors (H, W), (1, H, W) or
  (N, 1, H, W).
- Values of arrays and tensors. Float: in [0, 1] (what ``output_type="pt"`` / ``"np"`` return;
  anything else is refused with the conversion to apply). Integer: by the dtype's range, uint8
  0..255 and uint16 0..65535; other integer types by the first of 0..1, 0..255, 0..65535 that holds
  their maximum; bool: 0/1. An integer *mask* holding only 0 and 1 (``(m > 0).astype(np.uint8)``)
  is read as 0/1, not as 0 and 1/255: nobody draws a mask in values too dark to see.

Mask convention (what regenerates), decided here once:

- Grey or colour masks: white / 1 is regenerated, black / 0 is kept (diffusers, A1111's uploaded
  masks); colours count by their luminance. Values are cut at 0.5 (8-bit: 128 and above).
- Masks with transparency (RGBA, LA, PA, a palette or colour key with a transparent entry) whose
  alpha varies: the alpha is the mask, opaque = regenerate, whatever the colours. That is what
  painting on a transparent layer exports (A1111's and InvokeAI's canvases, image editors), where the
  strokes may be any colour, black included. An alpha that is the same everywhere (a fully opaque
  or a fully transparent file) marks no region, so the colours are read as for a grey mask: a
  white-on-black mask saved as opaque RGBA works as it looks.
- 16-bit and float PIL masks (I;16, I, F) are scaled by their real range first (0/65535 -> 0/1).

A mask that, after all this, marks no pixel or every pixel draws a :class:`MaskWarning` that says
what the edit will then do and what the mask was read as.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from os import PathLike

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from common.images import has_alpha, is_wide, to_rgb, unit_grey

ImageInput = Image.Image | np.ndarray | Tensor | Sequence[Image.Image | np.ndarray | Tensor]
# Nominal maxima of integer types without a fixed range (int64, int32, ...): the first that holds the data.
_NOMINAL_MAXIMA = (1, 255, 65535)


class MaskWarning(UserWarning):
    """A mask marks no pixel or every pixel: the edit does nothing, or regenerates the whole image."""


def _pil_image(image: Image.Image) -> tuple[np.ndarray, str]:
    return np.asarray(to_rgb(image), dtype=np.float32).transpose(2, 0, 1)[None] / 255.0, f"a mode {image.mode} image"


def _pil_mask(image: Image.Image) -> tuple[np.ndarray, str]:
    """A PIL mask -> (1, 1, H, W) float in [0, 1] and what it was read as (see the module docstring)."""
    source = f"a mode {image.mode} image"
    if is_wide(image):
        return unit_grey(image)[None, None], f"{source} scaled by its real range"
    if has_alpha(image):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        if alpha.min() < alpha.max():
            return alpha[None, None], f"the alpha of {source} (opaque = regenerate)"
        image, source = rgba, f"the colours of {source} (its alpha is the same everywhere)"
    return np.asarray(image.convert("L"), dtype=np.float32)[None, None] / 255.0, source


def _unit_range(values: np.ndarray, name: str, kind: str, mask: bool) -> np.ndarray:
    """Array values -> float32 in [0, 1] by their dtype (see the module docstring)."""
    if values.dtype == np.bool_:
        return values.astype(np.float32)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise ValueError(f"{name} {kind} holds NaN/inf; give finite values in [0, 1]")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            hint = ("it looks like [-1, 1]: pass (x + 1) / 2" if low >= -1 and high <= 1 else
                    "it looks like 0..255: divide it by 255 (or pass uint8)" if low >= 0 and high <= 255 else
                    "rescale it to [0, 1]")
            raise ValueError(f"{name} {kind} values must be in [0, 1] (the range output_type='pt' returns), "
                             f"got [{low:.4g}, {high:.4g}]; {hint}")
        return values.astype(np.float32)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{name} {kind} has dtype {values.dtype}; give float values in [0, 1] or uint8")
    low, high = int(values.min()), int(values.max())
    if low < 0:
        raise ValueError(f"{name} {kind} of {values.dtype} holds negative values ({low}); give uint8 0..255, "
                         "uint16 0..65535 or float in [0, 1]")
    if mask and high <= 1:
        top = 1  # a 0/1 mask, whatever its dtype
    elif values.dtype in (np.uint8, np.uint16):
        top = np.iinfo(values.dtype).max
    else:
        top = next((m for m in _NOMINAL_MAXIMA if high <= m), None)
        if top is None:
            raise ValueError(f"{name} {kind} of {values.dtype} reaches {high}, beyond 16 bits; give uint8 0..255, "
                             "uint16 0..65535 or float in [0, 1]")
    return values.astype(np.float32) / float(top)


def _channels_first(array: np.ndarray, name: str, mask: bool) -> np.ndarray:
    """A channel-last NumPy image or mask -> (N, C, H, W)."""
    shape = array.shape
    if mask:
        if array.ndim == 3 and shape[-1] in (3, 4):  # (N, H, W) with W = 3 or 4 would be no real mask
            raise ValueError(f"{name} array of shape {shape} looks like a colour image (channels last); give one "
                             "channel, (H, W), or a PIL image (Image.fromarray(mask)) to use its alpha or luminance")
        if array.ndim in (3, 4) and shape[-1] == 1:
            array = array[..., 0]
        if array.ndim in (2, 3):
            return array.reshape((-1, 1) + array.shape[-2:])
        raise ValueError(f"{name} array must have shape (H, W), (H, W, 1), (N, H, W) or (N, H, W, 1), got {shape}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} array must have shape (H, W), (H, W, C) or (N, H, W, C) with C = 1, 3 or 4 "
                         f"(channels last), got {shape}")
    return array.transpose(0, 3, 1, 2)


def _tensor_shape(batch: Tensor, name: str, mask: bool) -> Tensor:
    """A channel-first tensor -> (N, C, H, W), or the error that lists the accepted shapes."""
    if mask and batch.ndim == 2:
        batch = batch[None]
    if batch.ndim == 3:
        batch = batch[None]
    channels = 1 if mask else 3
    if batch.ndim != 4 or batch.shape[1] != channels or batch.shape[0] == 0:
        shapes = "(H, W), (1, H, W) or (N, 1, H, W)" if mask else "(3, H, W) or (N, 3, H, W)"
        raise ValueError(f"{name} tensor must have shape {shapes}, got {tuple(batch.shape)}")
    return batch


def _one(value: object, name: str, mask: bool) -> tuple[np.ndarray, str]:
    """One accepted input (not a list) -> (N, C, H, W) float32 in [0, 1] and what it was read as."""
    if isinstance(value, Image.Image):
        return _pil_mask(value) if mask else _pil_image(value)
    if isinstance(value, Tensor):
        batch = _tensor_shape(value.detach(), name, mask).cpu()
        array, kind = (batch.float() if batch.dtype.is_floating_point else batch).numpy(), "tensor"
    elif isinstance(value, np.ndarray):
        array, kind = _channels_first(value, name, mask), "array"
    else:
        raise _type_error(name, value)
    if array.size == 0:
        raise ValueError(f"{name} {kind} is empty: shape {tuple(value.shape)}")
    return _unit_range(array, name, kind, mask), f"a {array.dtype} {kind}"


def _composite_on_white(batch: np.ndarray) -> np.ndarray:
    """(N, 1|3|4, H, W) -> (N, 3, H, W): grey is repeated, RGBA is composited onto white."""
    if batch.shape[1] == 1:
        return np.repeat(batch, 3, axis=1)
    if batch.shape[1] == 4:
        alpha = batch[:, 3:]
        return batch[:, :3] * alpha + (1.0 - alpha)
    return batch


def _as_batch(value: ImageInput, name: str, mask: bool) -> tuple[Tensor, list[str]]:
    """Any accepted input -> (N, C, H, W) float in [0, 1] (C = 3 images, 1 masks) and what each was read as."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"{name} is an empty list; give one image, or one per prompt")
    converted = [_one(item, name, mask) for item in items]
    sizes = {tuple(array.shape[-2:]) for array, _ in converted}
    if len(sizes) > 1:
        raise ValueError(f"{name} images differ in size (height, width): {sorted(sizes)}")
    batch = np.concatenate([array if mask else _composite_on_white(array) for array, _ in converted])
    sources = [source for array, source in converted for _ in range(array.shape[0])]
    return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)), sources


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
    batch, _ = _as_batch(image, "image", mask=False)
    if batch.shape[0] not in (1, count):
        raise ValueError(f"image holds {batch.shape[0]} images for {count} prompts; give one, or one per prompt")
    size = (height or batch.shape[-2], width or batch.shape[-1])
    return _resize(batch, size, "bicubic") * 2 - 1


def _warn_if_trivial(masks: Tensor, binary: Tensor, sources: list[str]) -> None:
    """One :class:`MaskWarning` per kind (nothing / everything marked), naming the masks and how they were read."""
    marked = binary.flatten(1).mean(dim=1)
    for fraction, effect in ((0.0, "marks no pixel to regenerate: the edit does nothing (Inpaint returns the "
                                   "input's reconstruction)"),
                             (1.0, "marks every pixel: the whole image is regenerated, as ImageToImage would")):
        which = [i for i in range(len(sources)) if marked[i].item() == fraction]
        if not which:
            continue
        read = "; ".join(f"mask {i}: {sources[i]}, values [{masks[i].min().item():.3g}, {masks[i].max().item():.3g}]"
                         for i in which[:5])
        # stacklevel: this < mask_batch < Inpaint.__call__ < torch.no_grad's wrapper < the caller's line
        warnings.warn(f"mask_image {effect}. Read as {read}; pixels >= 0.5 regenerate. Mark the region white "
                      "(or opaque, in a mask with a varying alpha) and the rest black.", MaskWarning, stacklevel=5)


def mask_batch(mask_image: ImageInput, count: int, image_size: tuple[int, int],
               height: int | None, width: int | None) -> Tensor:
    """Masks -> (1 or ``count``, 1, H, W) in {0, 1} (1 = regenerate), resized like the images.

    Args:
        mask_image: the masks, the size of the input images before any resizing (module docstring).
        count: the number of prompts.
        image_size: (H, W) of the input images as given.
        height, width: the size the images are resized to, when given.

    Warns:
        MaskWarning: a mask marks no pixel or every pixel.
    """
    masks, sources = _as_batch(mask_image, "mask_image", mask=True)
    if tuple(masks.shape[-2:]) != tuple(image_size):
        raise ValueError(f"mask_image is {masks.shape[-2]}x{masks.shape[-1]} (height x width) but the image is "
                         f"{image_size[0]}x{image_size[1]}; give a mask of the image's size")
    if masks.shape[0] not in (1, count):
        raise ValueError(f"mask_image holds {masks.shape[0]} masks for {count} prompts; give one, or one per prompt")
    binary = (masks >= 0.5).float()
    _warn_if_trivial(masks, binary, sources)
    return _resize(binary, (height or image_size[0], width or image_size[1]), "nearest")


def _type_error(name: str, value: object) -> TypeError:
    hint = "; open a file with PIL.Image.open(path) first" if isinstance(value, (str, PathLike)) else ""
    return TypeError(f"{name} must be a PIL image, a NumPy array, a tensor or a list of them, "
                     f"got {type(value).__name__}{hint}")


def image_size(image: ImageInput) -> tuple[int, int]:
    """(H, W) of the input images as given (the first one of a list), read from their shape alone."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("image is an empty list; give one image, or one per prompt")
        image = image[0]
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, Tensor) and image.ndim >= 2:
        return int(image.shape[-2]), int(image.shape[-1])
    if isinstance(image, np.ndarray) and image.ndim >= 2:  # channels last: (H, W), (H, W, C), (N, H, W, C)
        return (int(image.shape[0]), int(image.shape[1])) if image.ndim == 2 else \
            (int(image.shape[-3]), int(image.shape[-2]))
    if isinstance(image, (Tensor, np.ndarray)):
        raise ValueError(f"image has shape {tuple(image.shape)}; give (H, W, C) arrays or (3, H, W) tensors")
    raise _type_error("image", image)


def keep_mask(regenerate: Tensor, factor: int) -> Tensor:
    """Pixel mask (N, 1, H, W), 1 = regenerate -> latent mask (N, 1, H/f, W/f), 1 = keep.

    A latent cell is regenerated when any of its f x f pixels is marked (max pooling), so the
    generated region always covers the whole marked area.
    """
    return 1.0 - F.max_pool2d(regenerate, kernel_size=factor)
