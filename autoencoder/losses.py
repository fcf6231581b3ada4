"""Stage-1 losses: reconstruction, GAN, adaptive GAN weight, warm-up, and their assembly.

Shape vocabulary: B batch, C channels, H W pixels, h w discriminator logit grid.

Warm-up (anchors' pain point: the GAN term switching on ruins reconstructions). The discriminator
trains from ``disc_start``; its adversarial term reaches the autoencoder only from ``gan_start``
(>= ``disc_start``), ramping linearly to full strength over ``gan_ramp`` steps. So the generator never
receives gradients from an untrained discriminator.

    terms = autoencoder_loss(x, recon, q_loss, None, disc(recon), last_layer, step, cfg, perceptual)
    d_loss, d_logs = discriminator_loss(disc(x), disc(recon.detach()), step, cfg)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoencoder.perceptual import PerceptualKind

GanLossKind = Literal["hinge", "non_saturating"]


@dataclass(frozen=True)
class LossConfig:
    """Weights and schedule of the stage-1 losses; every weight is applied in this module.

    Attributes:
        l1_weight, l2_weight: pixel L1 and L2 (mean squared error) terms.
        perceptual: ``"lpips"``, ``"lpips_random"`` (tests only) or ``"none"``.
        perceptual_weight: weight of the mean LPIPS distance.
        perceptual_weights_path: VGG16 weights file or folder (see ``autoencoder.perceptual``).
        gan_loss: ``"hinge"`` or ``"non_saturating"`` (softplus), for both D and G.
        disc_weight: scale of the generator's adversarial term, on top of the adaptive weight.
        disc_start: first step at which the discriminator trains.
        gan_start: first step at which the adversarial term reaches the autoencoder (>= disc_start).
        gan_ramp: steps over which that term ramps linearly from 0 to full (0: switch on at once).
        codebook_weight: weight of the quantizer's codebook + commitment loss.
        kl_weight: weight of the KL term of the KL-regularised variant.
        adaptive_weight_max: upper clamp of the adaptive GAN weight.
    """

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual: PerceptualKind = "lpips"
    perceptual_weight: float = 1.0
    perceptual_weights_path: str | None = None
    gan_loss: GanLossKind = "hinge"
    disc_weight: float = 0.8
    disc_start: int = 10_000
    gan_start: int = 12_000
    gan_ramp: int = 2_000
    codebook_weight: float = 1.0
    kl_weight: float = 1e-6
    adaptive_weight_max: float = 1e4

    def __post_init__(self) -> None:
        weights = ("l1_weight", "l2_weight", "perceptual_weight", "disc_weight", "codebook_weight", "kl_weight")
        negative = [name for name in weights if getattr(self, name) < 0]
        if negative:
            raise ValueError(f"loss weights must be >= 0: {', '.join(negative)}")
        if not 0 <= self.disc_start <= self.gan_start:
            raise ValueError(f"need 0 <= disc_start <= gan_start, got {self.disc_start} and {self.gan_start}: "
                             "the generator must not learn from an untrained discriminator")
        if self.gan_ramp < 0 or self.adaptive_weight_max <= 0:
            raise ValueError("need gan_ramp >= 0 and adaptive_weight_max > 0")


class LossTerms(NamedTuple):
    """The autoencoder's total loss and its unweighted pieces (for logging).

    ``gan_weight`` is the effective weight on ``gan``: disc_weight * adaptive weight * warm-up factor.
    """

    total: Tensor
    rec: Tensor
    l1: Tensor
    l2: Tensor
    perceptual: Tensor
    codebook: Tensor
    kl: Tensor
    gan: Tensor
    gan_weight: Tensor


# ---------------------------------------------------------------- GAN losses (logits: any shape)

def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge loss for D: mean(relu(1 - real)) and mean(relu(1 + fake)), averaged."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def non_saturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Logistic loss for D: -log sigmoid(real) - log(1 - sigmoid(fake)), averaged; softplus is stable."""
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Hinge loss for G: -mean(fake logits)."""
    return -logits_fake.float().mean()


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating loss for G: -log sigmoid(fake) = softplus(-fake), averaged."""
    return F.softplus(-logits_fake.float()).mean()


D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hinge": hinge_d_loss, "non_saturating": non_saturating_d_loss}
G_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {
    "hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


# ---------------------------------------------------------------- schedule

def disc_factor(step: int, cfg: LossConfig) -> float:
    """1 once the discriminator trains (``step >= disc_start``), else 0."""
    return 1.0 if step >= cfg.disc_start else 0.0


def gan_factor(step: int, cfg: LossConfig) -> float:
    """Warm-up of the generator's adversarial term: 0 before ``gan_start``, then a linear ramp to 1.

    At ``gan_start`` the factor is ``1 / gan_ramp`` and it reaches 1 at ``gan_start + gan_ramp - 1``.
    """
    if step < cfg.gan_start:
        return 0.0
    if cfg.gan_ramp == 0:
        return 1.0
    return min(1.0, (step - cfg.gan_start + 1) / cfg.gan_ramp)


# ---------------------------------------------------------------- pieces

def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """Balance the GAN term against reconstruction at the decoder's last layer (Esser et al. 2021, eq. 7).

    ``||grad_last L_rec|| / (||grad_last L_G|| + 1e-4)``, clamped to ``[0, max_weight]`` and detached.
    Uses ``torch.autograd.grad`` (not ``.backward``), so no ``.grad`` is written and DDP's reducer is
    not triggered; pass the parameter of the unwrapped module. Norms are taken in fp32 under autocast.

    Args:
        rec_loss, gan_loss: scalar losses that both depend on ``last_layer``.
        last_layer: the decoder's final weight, e.g. ``unwrap(model).decoder.conv_out.weight``.
        max_weight: upper clamp.
    """
    if not (rec_loss.requires_grad and gan_loss.requires_grad):
        raise RuntimeError("adaptive_gan_weight needs a graph; under torch.no_grad pass last_layer=None "
                           "to autoencoder_loss to use a fixed weight of 1")
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def reconstruction_loss(x: Tensor, recon: Tensor, cfg: LossConfig,
                        perceptual: nn.Module | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weighted pixel + perceptual reconstruction loss, computed in fp32.

    Args:
        x: (B, C, H, W) target images in [-1, 1].
        recon: (B, C, H, W) reconstructions.
        perceptual: a module ``(recon, x) -> (B,)`` distances, or ``None`` when ``cfg.perceptual="none"``.

    Returns:
        ``(rec, l1, l2, perceptual)``: the weighted sum and its three unweighted means.
    """
    if perceptual is None and cfg.perceptual != "none" and cfg.perceptual_weight > 0:
        raise ValueError(f"cfg.perceptual={cfg.perceptual!r} but no perceptual module was passed; "
                         "build it with autoencoder.perceptual.build_perceptual")
    diff = recon.float() - x.float()
    l1, l2 = diff.abs().mean(), diff.square().mean()
    p = perceptual(recon, x).mean() if perceptual is not None else diff.new_zeros(())
    rec = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.perceptual_weight * p
    return rec, l1, l2, p


def _mean_or_zero(value: Tensor | None, like: Tensor) -> Tensor:
    return like.new_zeros(()) if value is None else value.float().mean()


def _gan_term(rec: Tensor, logits_fake: Tensor | None, last_layer: Tensor | None,
              step: int, cfg: LossConfig) -> tuple[Tensor, Tensor]:
    """The generator's adversarial loss and its effective weight (zero during warm-up)."""
    factor = gan_factor(step, cfg)
    if logits_fake is None:
        if factor > 0:
            raise ValueError(f"step {step} >= gan_start={cfg.gan_start}: logits_fake is required")
        return rec.new_zeros(()), rec.new_zeros(())
    gan = G_LOSSES[cfg.gan_loss](logits_fake)
    if factor == 0 or cfg.disc_weight == 0:
        return gan, rec.new_zeros(())  # skip the two extra gradient passes while the term is off
    adaptive = rec.new_ones(()) if last_layer is None else adaptive_gan_weight(
        rec, gan, last_layer, cfg.adaptive_weight_max)
    return gan, cfg.disc_weight * factor * adaptive


# ---------------------------------------------------------------- assembly

def autoencoder_loss(x: Tensor, recon: Tensor, quantizer_loss: Tensor | None, kl: Tensor | None,
                     logits_fake: Tensor | None, last_layer: Tensor | None, step: int, cfg: LossConfig,
                     perceptual: nn.Module | None) -> LossTerms:
    """Total generator-side loss of the autoencoder (taming's ``VQLPIPSWithDiscriminator``, G half).

    ``total = rec + codebook_weight * quantizer_loss + kl_weight * kl + gan_weight * gan``, where
    ``rec = l1_weight * L1 + l2_weight * L2 + perceptual_weight * LPIPS`` and
    ``gan_weight = disc_weight * gan_factor(step) * adaptive_gan_weight(rec, gan, last_layer)``.

    Args:
        x, recon: (B, C, H, W) targets and reconstructions in [-1, 1].
        quantizer_loss: the quantizer's codebook + commitment loss (scalar), or ``None`` (KL variant).
        kl: KL of the posterior, scalar or (B,) (reduced by the mean), or ``None`` (VQ variant).
        logits_fake: ``disc(recon)`` (B, 1, h, w); may be ``None`` before ``gan_start``.
        last_layer: the decoder's last weight for the adaptive weight; ``None`` uses a weight of 1
            (e.g. in evaluation under ``torch.no_grad``).
        step: the global optimisation step.
        cfg: the loss configuration.
        perceptual: from :func:`autoencoder.perceptual.build_perceptual`.
    """
    rec, l1, l2, p = reconstruction_loss(x, recon, cfg, perceptual)
    codebook, kl_mean = _mean_or_zero(quantizer_loss, rec), _mean_or_zero(kl, rec)
    gan, gan_weight = _gan_term(rec, logits_fake, last_layer, step, cfg)
    total = rec + cfg.codebook_weight * codebook + cfg.kl_weight * kl_mean + gan_weight * gan
    return LossTerms(total, rec, l1, l2, p, codebook, kl_mean, gan, gan_weight)


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, step: int,
                       cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Discriminator loss, zero before ``disc_start``; pass ``disc(recon.detach())`` as ``logits_fake``.

    Returns:
        ``(loss, logs)`` with detached ``disc_loss`` (unscaled), ``logits_real``, ``logits_fake``
        (means) and ``disc_factor``.
    """
    raw = D_LOSSES[cfg.gan_loss](logits_real, logits_fake)
    factor = disc_factor(step, cfg)
    logs = {"disc_loss": raw.detach(), "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean(), "disc_factor": raw.new_tensor(factor)}
    return factor * raw, logs
