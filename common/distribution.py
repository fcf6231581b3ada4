"""Distribution-level image scores that need no pretrained network: sliced Wasserstein distance (SWD)
on Laplacian-pyramid patches, as Karras et al. 2018 (progressive GANs) measure it, and the record every
distribution score returns (:class:`ScoreRecord`, shared with :mod:`common.inception_scores`).

    record = sliced_wasserstein(generated, reference, SWDConfig(seed=0))
    record.score, record.per_level          # x1e3, as the literature reports it

Images are (N, 3, H, W) tensors in [-1, 1]. Each set is put in a canonical order (by the bytes of each
image) before patches are drawn, so the score is a function of the *set*: shuffling the images does not
change it, and the same inputs and seed always give the same number.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# The binomial 5-tap filter of Karras et al.'s pyramid: [1, 4, 6, 4, 1] / 16, applied separably.
BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)
SWD_SCALE = 1e3  # the literature reports SWD x 1e3


class DistributionScoreError(ValueError):
    """Two image sets (or a feature extractor) that a distribution score cannot compare."""


@dataclass(frozen=True)
class ScoreRecord:
    """One distribution score, with what it takes to reproduce and compare it.

    name: ``swd``, ``fid`` or ``kid``. score: the number (SWD x1e3: the mean over pyramid levels; KID:
    the mean over subsets). std: the spread over KID subsets (None otherwise). per_level: SWD of each
    pyramid level, finest first. counts: images in the (generated, reference) sets. resize: how images
    reached the extractor's input size. extractor: the feature extractor's name. weights_sha256: the
    SHA-256 of its weights file, "none" for SWD (no weights). seed: the seed of every random draw.
    """

    name: str
    score: float
    counts: tuple[int, int]
    resize: str
    extractor: str
    weights_sha256: str
    seed: int
    std: float | None = None
    per_level: tuple[float, ...] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready plain data (tuples as lists; unset fields left out)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class SWDConfig:
    """Settings of the Laplacian-pyramid SWD (defaults as Karras et al.).

    patch: side of the square patches (7). patches_per_image: drawn per image and level (128).
    directions: random unit projections per repeat (128); repeats: independent draws of them (4), averaged
    (Karras et al.'s 4 x 128 = 512 directions per level).
    min_resolution: the coarsest level's side (16); smaller images give a single level. seed: every draw.
    """

    patch: int = 7
    patches_per_image: int = 128
    directions: int = 128
    repeats: int = 4
    min_resolution: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("patch", "patches_per_image", "directions", "repeats", "min_resolution"):
            if getattr(self, name) < 1:
                raise DistributionScoreError(f"SWDConfig.{name} must be at least 1, got {getattr(self, name)}")


def check_images(images: Tensor, what: str) -> Tensor:
    """``images`` as float (N, 3, H, W), or one error naming ``what`` is wrong and the expected layout."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DistributionScoreError(f"{what}: expected images (N, 3, H, W) in [-1, 1], got {shape}")
    if images.shape[0] < 2:
        raise DistributionScoreError(f"{what}: a distribution score needs at least 2 images, got {images.shape[0]}; "
                                     "generate or pass more images")
    if not torch.isfinite(images).all():
        raise DistributionScoreError(f"{what}: images hold NaN or infinite values; check the generator's output")
    return images.float()


def canonical_order(images: Tensor) -> Tensor:
    """The images sorted by the SHA-256 of their bytes: one order per set, whatever order they came in."""
    cpu = images.detach().cpu().contiguous()
    keys = [hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in cpu]
    return images[sorted(range(len(keys)), key=keys.__getitem__)]


def _blur(images: Tensor) -> Tensor:
    """Separable binomial 5-tap filter per channel, reflect-padded (the pyramid's low-pass)."""
    taps = torch.tensor(BINOMIAL_5, dtype=images.dtype, device=images.device) / 16
    channels = images.shape[1]
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    rows = F.conv2d(padded, taps.view(1, 1, 1, 5).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, taps.view(1, 1, 5, 1).repeat(channels, 1, 1, 1), groups=channels)


def _down(images: Tensor) -> Tensor:
    return _blur(images)[:, :, ::2, ::2]


def _up(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-insertion upsampling then the same filter x4 (the energy of the inserted zeros)."""
    up = images.new_zeros(images.shape[0], images.shape[1], size[0], size[1])
    up[:, :, ::2, ::2] = images
    return _blur(up) * 4


def laplacian_pyramid(images: Tensor, min_resolution: int) -> list[Tensor]:
    """Band-pass levels, finest first, then the coarsest low-pass image (side >= ``min_resolution``)."""
    levels, current = [], images
    while min(current.shape[-2:]) // 2 >= min_resolution and min(current.shape[-2:]) >= 4:
        low = _down(current)
        levels.append(current - _up(low, current.shape[-2:]))
        current = low
    return [*levels, current]


def _draw_positions(count: int, generator: torch.Generator) -> Tensor:
    """(count, 3) uniforms in [0, 1): which image, row and column, scaled to each set's sizes.

    Both sets take their patches at the same uniforms (common random numbers): identical sets give exactly
    0, and the noise of the draw largely cancels between two sets instead of adding up.
    """
    return torch.rand(count, 3, generator=generator, dtype=torch.float64)


def _draw_patches(level: Tensor, positions: Tensor, patch: int) -> Tensor:
    """The patch x patch crops of a level (N, 3, h, w) at ``positions``, flattened to (count, 3 * patch^2)."""
    n, _, h, w = level.shape
    which = (positions[:, 0] * n).long()
    ys = (positions[:, 1] * (h - patch + 1)).long()
    xs = (positions[:, 2] * (w - patch + 1)).long()
    offsets = torch.arange(patch)
    rows = (ys[:, None] + offsets)[:, None, :, None]  # (count, 1, patch, 1)
    cols = (xs[:, None] + offsets)[:, None, None, :]  # (count, 1, 1, patch)
    channels = torch.arange(level.shape[1])[None, :, None, None]
    crops = level.cpu()[which[:, None, None, None], channels, rows, cols]  # (count, 3, patch, patch)
    return crops.flatten(1)


def _normalise(descriptors: Tensor, mean: Tensor, std: Tensor, patch: int) -> Tensor:
    shaped = descriptors.view(descriptors.shape[0], 3, patch * patch)
    return ((shaped - mean[None, :, None]) / std[None, :, None]).flatten(1)


def _sliced_distance(a: Tensor, b: Tensor, config: SWDConfig, generator: torch.Generator) -> float:
    """Mean over random unit directions of the mean |sorted projection of a - sorted projection of b|."""
    total = 0.0
    for _ in range(config.repeats):
        directions = torch.randn(a.shape[1], config.directions, generator=generator, dtype=torch.float64)
        directions = (directions / directions.norm(dim=0, keepdim=True)).float()
        # (directions, patches), contiguous: sorting along the last dim is many times faster than along dim 0
        projected_a = torch.sort((directions.T @ a.T).contiguous(), dim=1).values
        projected_b = torch.sort((directions.T @ b.T).contiguous(), dim=1).values
        total += float((projected_a - projected_b).abs().mean())
    return total / config.repeats


def sliced_wasserstein(generated: Tensor, reference: Tensor, config: SWDConfig = SWDConfig()) -> ScoreRecord:
    """SWD x1e3 between two image sets, per Laplacian-pyramid level and their mean.

    Both sets draw the same number of patches per level (``patches_per_image`` times the smaller set), so
    the sorted projections pair one to one. Patches are normalised per colour channel by the *reference*
    set's patch mean and std at that level, so a colour shift of the generated set shows up in the score.
    """
    generated, reference = check_images(generated, "generated"), check_images(reference, "reference")
    if generated.shape[-2:] != reference.shape[-2:]:
        raise DistributionScoreError(
            f"the image sets differ in size ({tuple(generated.shape[-2:])} vs {tuple(reference.shape[-2:])}); "
            "compare at one resolution (resize one set, or build the reference at the generator's resolution)")
    if min(generated.shape[-2:]) < config.patch:
        raise DistributionScoreError(f"images of {tuple(generated.shape[-2:])} pixels are smaller than the "
                                     f"{config.patch}x{config.patch} patches; lower SWDConfig.patch")
    count = config.patches_per_image * min(len(generated), len(reference))
    generator = torch.Generator().manual_seed(config.seed)
    per_level = []
    for fake, real in zip(laplacian_pyramid(canonical_order(generated), config.min_resolution),
                          laplacian_pyramid(canonical_order(reference), config.min_resolution)):
        if min(fake.shape[-2:]) < config.patch:
            break  # a level too small for one patch carries nothing this patch size can see
        positions = _draw_positions(count, generator)
        real_patches = _draw_patches(real, positions, config.patch)
        fake_patches = _draw_patches(fake, positions, config.patch)
        shaped = real_patches.view(count, 3, -1)
        mean, std = shaped.mean(dim=(0, 2)), shaped.std(dim=(0, 2)).clamp_min(1e-8)
        distance = _sliced_distance(_normalise(fake_patches, mean, std, config.patch),
                                    _normalise(real_patches, mean, std, config.patch), config, generator)
        per_level.append(distance * SWD_SCALE)
    return ScoreRecord(
        name="swd", score=sum(per_level) / len(per_level), counts=(len(generated), len(reference)),
        resize=f"none (native {generated.shape[-1]}x{generated.shape[-2]})", extractor="laplacian-pyramid-7x7",
        weights_sha256="none", seed=config.seed, per_level=tuple(per_level),
        settings={k: v for k, v in asdict(config).items() if k != "seed"})
