"""A classifier of noisy latents, the p(y | x_t) of classifier guidance (Dhariwal & Nichol 2021, §4).

    clf = NoisyLatentClassifier.from_pretrained("runs/shapes32_classifier/classifier")
    captions = ["a small red circle at the top left", "a large blue square in the center"]
    pipe = TextToImage.from_pretrained("runs/shapes32_diffusion")
    images = pipe(captions, guidance_scale=0.0,   # unconditional: only the classifier knows the colour
                  classifier=clf, classifier_labels=clf.targets_of(captions), classifier_scale=3.0).images

The network is the U-Net's down half and middle (:class:`diffusion.unet.UNetEncoder`, with its
timestep embedding and no text), then GroupNorm, SiLU, a mean over the latent grid and one linear
layer. It sees the same scaled, noised latents x_t = q_sample(z * latent_scale, t) the diffusion
U-Net sees, so its gradient is meaningful at every step of sampling.

What it predicts is one *attribute* of the dataset label: for the procedural shapes data one of
``colour``, ``shape``, ``size``, ``position`` (read off :class:`common.data.shapes.ShapeSpec`), or the
whole ``label`` for any dataset. The attribute and its class names are part of the saved config.

A component directory holds ``config.json`` (kind ``noisy_latent_classifier``) and ``model.safetensors``.

Shapes: B batch, D latent channels, h w latent grid, K classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.checkpoint import load_module, save_component
from common.config import ConfigError
from common.data.shapes import COLOURS, NUM_LABELS, POSITIONS, SHAPES, SIZES, ShapeSpec, parse_caption
from common.layers import group_norm
from diffusion.schedules import NoiseSchedule, ScheduleConfig, q_sample
from diffusion.unet import UNetConfig, UNetEncoder

COMPONENT_KIND = "noisy_latent_classifier"
SHAPES_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "position": POSITIONS,
}
MAX_CLASSES = UNetConfig.LIMITS["num_classes"]  # the bound of a class embedding bounds a head too
LABEL = "label"  # the whole dataset label: the only attribute datasets other than shapes have
ATTRIBUTES: tuple[str, ...] = (*SHAPES_ATTRIBUTES, LABEL)


# ------------------------------------------------------------------------------------- attributes
def check_attribute(attribute: str, dataset: str = "shapes") -> None:
    """Fail with the list of valid names when ``attribute`` is not one ``dataset`` has."""
    valid = ATTRIBUTES if dataset == "shapes" else (LABEL,)
    if attribute not in valid:
        where = "" if dataset == "shapes" else f" for dataset {dataset!r} (the shapes attributes need shapes data)"
        raise ValueError(f"unknown classifier attribute {attribute!r}{where}; valid attributes: {', '.join(valid)}")


def attribute_classes(attribute: str, dataset: str = "shapes", labels: Tensor | None = None) -> tuple[str, ...]:
    """The class names of ``attribute``: shapes attribute values, or label ids "0".."N-1" for ``label``."""
    check_attribute(attribute, dataset)
    if attribute in SHAPES_ATTRIBUTES:
        return SHAPES_ATTRIBUTES[attribute]
    if dataset == "shapes":
        count = NUM_LABELS
    elif labels is None or labels.numel() == 0:
        raise ValueError(f"the classes of {LABEL!r} on {dataset!r} come from its labels; pass them")
    else:
        count = int(labels.max()) + 1
    return tuple(str(index) for index in range(count))


def attribute_targets(attribute: str, labels: Tensor) -> Tensor:
    """Dataset labels (B,) -> class indices (B,) of ``attribute`` (shapes labels for the shapes attributes)."""
    check_attribute(attribute)
    if attribute == LABEL:
        return labels.long()
    names = SHAPES_ATTRIBUTES[attribute]
    # 324 labels at most: a Python loop over the distinct ones is cheap and reuses ShapeSpec's decoding
    table = torch.tensor([names.index(getattr(ShapeSpec.from_label(i), attribute)) for i in range(NUM_LABELS)])
    return table.to(labels.device)[labels.long()]


def caption_targets(attribute: str, captions: list[str]) -> Tensor:
    """Shapes captions -> class indices (B,) of ``attribute``: the labels to steer towards."""
    return attribute_targets(attribute, torch.tensor([parse_caption(c).label for c in captions]))


# ------------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class ClassifierConfig:
    """A noisy-latent classifier and what it was trained on.

    Attributes:
        backbone: the UNetEncoder; ``in_channels`` = the latent channels, no text (``context_dim`` 0)
            and no class embedding (``num_classes`` 0). ``out_channels`` is unused.
        attribute: what is predicted, one of :data:`ATTRIBUTES`.
        class_names: the K class names, index = class id.
        schedule: the noise schedule whose q_sample noised the training latents; guidance refuses a
            pipeline with a different one. A full ``DiffusionConfig`` is narrowed to its schedule fields.
        latent_scale: the latent scale the training latents had (0: unknown, not checked).
    """

    backbone: UNetConfig = field(default_factory=lambda: UNetConfig(
        block_channels=(32, 64), layers_per_block=1, attention_levels=(False, False), mid_attention=False,
        context_dim=0))
    attribute: str = LABEL
    class_names: tuple[str, ...] = ("0", "1")
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    latent_scale: float = 0.0

    def __post_init__(self) -> None:
        if type(self.schedule) is not ScheduleConfig:  # e.g. the diffusion run's DiffusionConfig: keep the schedule
            narrowed = ScheduleConfig(**{f.name: getattr(self.schedule, f.name) for f in fields(ScheduleConfig)})
            object.__setattr__(self, "schedule", narrowed)
        check_attribute(self.attribute)
        if len(self.class_names) < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {list(self.class_names)}")
        if len(self.class_names) > MAX_CLASSES:
            raise ConfigError(f"{len(self.class_names):,} class_names is above {MAX_CLASSES:,}, beyond any real "
                              "classifier (its head has one row per class)")
        if not (math.isfinite(self.latent_scale) and self.latent_scale >= 0):
            raise ConfigError(f"latent_scale must be a finite number >= 0 (0: unknown), got {self.latent_scale}")
        if self.backbone.context_dim or self.backbone.num_classes:
            raise ConfigError("the classifier backbone sees neither text nor classes: set context_dim=0 and "
                              f"num_classes=0 (got {self.backbone.context_dim}, {self.backbone.num_classes})")

    @classmethod
    def upgrade_legacy(cls, data: dict[str, Any], where: str = "") -> tuple[dict[str, Any], list[str]]:
        """Read configs saved before ``schedule``: their ``diffusion`` section also held the objective."""
        if "diffusion" not in data:
            return data, []
        if "schedule" in data:
            raise ConfigError(f"{where}diffusion and {where}schedule are both given; keep {where}schedule and "
                              f"remove {where}diffusion")
        data = dict(data)
        old = data.pop("diffusion")
        keep = {f.name for f in fields(ScheduleConfig)}
        data["schedule"] = {k: v for k, v in old.items() if k in keep} if isinstance(old, dict) else old
        return data, [f"{where}diffusion is now {where}schedule (only its schedule keys are kept)"]


class NoisyLatentClassifier(nn.Module):
    """Logits (B, K) of an attribute from noisy scaled latents x_t (B, D, h, w) at timesteps t (B,)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        width = config.backbone.block_channels[-1]
        self.backbone = UNetEncoder(config.backbone)
        self.norm = group_norm(width, config.backbone.norm_eps)
        self.head = nn.Linear(width, len(config.class_names))

    @property
    def num_classes(self) -> int:
        return len(self.config.class_names)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Logits (B, K); ``t`` may be fractional (samplers' timesteps) or a scalar."""
        h = self.backbone(x, t).h
        return self.head(F.silu(self.norm(h)).mean(dim=(2, 3)))

    def log_prob(self, x: Tensor, t: Tensor | float, labels: Tensor) -> Tensor:
        """log p(labels | x_t) (B,): what classifier guidance climbs."""
        log_probs = F.log_softmax(self.forward(x, t).float(), dim=-1)
        return log_probs.gather(1, labels.long().reshape(-1, 1)).squeeze(1)

    def targets_of(self, captions: list[str]) -> Tensor:
        """Shapes captions -> this classifier's class ids (B,), e.g. the colour each caption names."""
        return caption_targets(self.config.attribute, captions)

    def check_compatible(self, code_dim: int, latent_scale: float, schedule: NoiseSchedule) -> None:
        """Fail clearly when this classifier was not trained on the latents a pipeline samples."""
        config = self.config
        if config.backbone.in_channels != code_dim:
            raise ValueError(f"the classifier takes {config.backbone.in_channels}-channel latents but the "
                             f"pipeline's have {code_dim}")
        if config.latent_scale and abs(config.latent_scale - latent_scale) > 1e-4 * abs(latent_scale):
            raise ValueError(f"the classifier was trained on latents scaled by {config.latent_scale:.6g}, the "
                             f"pipeline scales them by {latent_scale:.6g}; train it on this pipeline's latents")
        own = config.schedule.make_schedule().alphas_cumprod
        if own.shape != schedule.alphas_cumprod.shape or not torch.allclose(own, schedule.alphas_cumprod):
            raise ValueError("the classifier was trained with a different noise schedule than the pipeline's "
                             f"({config.schedule.schedule}, T={config.schedule.num_steps} vs {schedule!r})")

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``."""
        return save_component(directory, COMPONENT_KIND, self.config, self)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> NoisyLatentClassifier:
        """Load a classifier saved by :meth:`save_pretrained`, strictly, in eval mode."""
        return load_module(directory, COMPONENT_KIND, ClassifierConfig, cls).eval()


# --------------------------------------------------------------------------------- loss and accuracy
def classifier_loss(model: nn.Module, schedule: NoiseSchedule, latents: Tensor,
                    targets: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy (scalar) and accuracy (scalar) on ``latents`` (B, D, h, w) noised at t ~ U{0, ..., T-1}.

    Draws t and the noise from the global RNG (what accelerate checkpoints, so resume is exact).
    """
    t = torch.randint(0, schedule.num_steps, (latents.shape[0],), device=latents.device)
    x_t = q_sample(schedule, latents, t, torch.randn_like(latents))
    logits = model(x_t, t)
    return F.cross_entropy(logits.float(), targets), (logits.argmax(dim=1) == targets).float().mean()


@torch.no_grad()
def noisy_accuracy(model: NoisyLatentClassifier, schedule: NoiseSchedule, latents: Tensor, targets: Tensor,
                   timesteps: tuple[int, ...], batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Accuracy at each fixed timestep ("t=0" is clean latents) and at t ~ U{0, ..., T-1} ("uniform").

    The noise and the uniform timesteps come from a private generator seeded with ``seed``, so two
    evaluations of the same weights agree and the training RNG stream is untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    uniform = torch.randint(0, schedule.num_steps, (latents.shape[0],), generator=generator).to(latents.device)
    columns = {f"t={t}": torch.full_like(uniform, t) for t in timesteps} | {"uniform": uniform}
    results = {}
    for name, t in columns.items():
        correct = 0
        for start in range(0, latents.shape[0], batch_size):
            part = slice(start, start + batch_size)
            logits = model(q_sample(schedule, latents[part], t[part], noise[part]), t[part])
            correct += int((logits.argmax(dim=1) == targets[part]).sum())
        results[name] = correct / max(latents.shape[0], 1)
    return results
