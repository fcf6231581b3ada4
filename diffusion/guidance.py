"""Guidance and inpainting as denoiser wrappers: each takes a DenoiserFn and returns a new one.

Samplers never see guidance; compose wrappers instead, inpainting outermost so that it sees the real
batch:

    denoiser = Denoiser(unet, schedule, "v")
    guided = classifier_free(denoiser, {"context": text}, {"context": empty_text}, scale=5.0)
    x = sample_dpmpp_2m(inpainting(guided, known_x0, mask), noise, schedule, timesteps)

Notation: x_t (B, C, h, w) the sampler's latent at float timesteps t (B,); x0_c, x0_u the conditional and
unconditional x0 estimates; a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t); w the guidance scale.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusion.objectives import DenoiserFn
from diffusion.schedules import NoiseSchedule, expand_to

LogProbFn = Callable[[Tensor, Tensor], Tensor]


def _match_uncond(name: str, cond: Any, uncond: Any) -> Any:
    """Check one unconditional entry against its conditional one; broadcast a batch-1 tensor to cond's batch."""
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        if uncond.shape[0] == 1 and cond.shape[0] > 1:  # one negative prompt for the whole batch
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
        return uncond.to(cond.dtype)
    if isinstance(cond, Tensor) or isinstance(uncond, Tensor) or (cond is None) != (uncond is None):
        raise ValueError(f"condition {name!r} must be a tensor in both cond and uncond, or None in both")
    if cond != uncond:
        raise ValueError(f"non-tensor condition {name!r} differs between cond and uncond: {cond!r} vs {uncond!r}")
    return uncond


def _stack(cond: Any, uncond: Any) -> Any:
    """[cond; uncond] along the batch for tensors; None and plain values pass through."""
    return torch.cat([cond, uncond]) if isinstance(cond, Tensor) else cond


def _rescale(x0_guided: Tensor, x0_cond: Tensor, rescale: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, §3.4): match the conditional prediction's per-sample std.

    1. ratio = std(x0_c) / std(x0_guided), over every dimension but the batch.
    2. Blend: rescale * ratio * x0_guided + (1 - rescale) * x0_guided.
    """
    dims = tuple(range(1, x0_guided.ndim))
    ratio = x0_cond.std(dim=dims, keepdim=True) / x0_guided.std(dim=dims, keepdim=True)
    return x0_guided * (rescale * ratio + (1.0 - rescale))


def classifier_free(
    denoiser: DenoiserFn,
    cond: dict[str, Any],
    uncond: dict[str, Any],
    scale: float,
    rescale: float = 0.0,
) -> DenoiserFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 with their w + 1 as w): x0 = x0_u + w (x0_c - x0_u).

    Both halves run in ONE batched denoiser call (x, t and every conditioning tensor concatenated as
    [cond; uncond]), so a step costs one network call of batch 2B. Scale 1 runs only the conditional
    half and scale 0 only the unconditional one. A negative prompt is simply a different ``uncond``;
    class conditioning uses the null label there (label + 1 for classes, 0 for null).

    The combination is done on x0. For a fixed x_t, eps = (x_t - a x0) / s is affine in x0 with
    coefficients that do not depend on the prediction, and the guidance weights (1 - w, w) sum to 1, so
    guiding x0 gives exactly the x0 of the usual eps-space guidance eps_u + w (eps_c - eps_u) (and the
    same holds for v). The rescale, a non-linear step, is computed on x0 here; diffusers applies its
    ``guidance_rescale`` to the raw network output, so values differ when the network predicts eps or v.

    Args:
        denoiser: the unguided DenoiserFn.
        cond: conditional keyword arguments of the denoiser, e.g. ``{"context": (B, L, D)}``; values are
            tensors with batch first, or None, or equal non-tensor values.
        uncond: the same keys for the unconditional (or negative) branch; a batch-1 tensor is broadcast.
        scale: w; 1 is the conditional model, 0 the unconditional one, > 1 strengthens the condition.
        rescale: phi in [0, 1] of Lin et al. 2023 §3.4; 0 is plain CFG, 1 matches the conditional std
            (the paper suggests 0.7).

    Raises:
        ValueError: a scale that is not finite, a rescale outside [0, 1], or cond / uncond that do not pair up.

    Returns:
        A DenoiserFn ``(x_t, t) -> x0_hat``; it takes no further conditioning keywords.
    """
    if not math.isfinite(scale):  # NaN/inf would only surface as NaN latents after the whole sampling run
        raise ValueError(f"the classifier-free guidance scale must be a finite number (not NaN/inf), got {scale}; "
                         f"1 is the conditional model, 0 the unconditional one, > 1 strengthens the condition")
    if not 0.0 <= rescale <= 1.0:  # also refuses NaN
        raise ValueError(f"the guidance rescale must be in [0, 1] (a finite number; 0 is plain guidance, 0.7 is "
                         f"suggested), got {rescale}")
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    uncond = {name: _match_uncond(name, cond[name], uncond[name]) for name in cond}  # checked, broadcast
    paired = {name: _stack(cond[name], uncond[name]) for name in cond}

    def guided(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0:
            return denoiser(x, t, **cond)
        if scale == 0.0:
            return denoiser(x, t, **uncond)
        x0_c, x0_u = denoiser(torch.cat([x, x]), torch.cat([t, t]), **paired).chunk(2)
        x0 = x0_u + scale * (x0_c - x0_u)
        return _rescale(x0, x0_c, rescale) if rescale > 0 else x0

    return guided


def classifier_guided(
    denoiser: DenoiserFn, log_prob_fn: LogProbFn, scale: float, schedule: NoiseSchedule
) -> DenoiserFn:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2) expressed on the x0 estimate.

    1. g = grad_x log p(y | x_t) from a classifier trained on noisy latents (under ``torch.enable_grad``,
       since samplers run under ``no_grad``).
    2. eps' = eps_hat - s w g: the score of p(x_t) p(y | x_t)^w.
    3. x0' = (x_t - s eps') / a = x0_hat + w (1 - alpha_bar) / a * g.

    At zero SNR (alpha_bar = 0) no finite x0 represents the shift, so guidance is skipped there.

    Args:
        denoiser: the DenoiserFn to guide.
        log_prob_fn: ``(x_t (B, C, h, w), t (B,)) -> (B,)`` log p(y | x_t) for the wanted labels y.
        scale: w; 0 turns guidance off.
        schedule: the noise schedule, for alpha_bar_t.

    Returns:
        A DenoiserFn ``(x_t, t, **cond) -> x0_hat``.
    """

    def guided(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        x0_hat = denoiser(x, t, **cond)
        if scale == 0.0:
            return x0_hat
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(log_prob_fn(x_in, t).sum(), x_in)
        alpha_bar = schedule.alpha_bar(t)
        coefficient = torch.where(alpha_bar > 0, (1.0 - alpha_bar) / alpha_bar.sqrt(), torch.zeros_like(alpha_bar))
        return x0_hat + scale * expand_to(coefficient, x0_hat) * grad.to(x0_hat.dtype)

    return guided


def inpainting(denoiser: DenoiserFn, known_x0: Tensor, mask: Tensor) -> DenoiserFn:
    """Keep known latents: replace the x0 estimate by ``known_x0`` where ``mask`` is 1.

    Because every sampler ends by returning its last x0 estimate, the final sample equals ``known_x0``
    exactly under the mask, and the unknown region is generated consistently with it (each step's
    noise estimate is derived from the replaced x0). Soft masks in (0, 1) blend linearly.

    Args:
        denoiser: the DenoiserFn (put guidance inside this wrapper, not outside).
        known_x0: (B, C, h, w) clean latents of the known content.
        mask: broadcastable to (B, C, h, w), e.g. (B, 1, h, w); 1 = keep known, 0 = generate.

    Returns:
        A DenoiserFn ``(x_t, t, **cond) -> x0_hat``.
    """

    def masked(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        x0_hat = denoiser(x, t, **cond)
        # lerp is exact at weights 0 and 1, so known latents come back bit for bit
        return torch.lerp(x0_hat, known_x0.to(x0_hat), mask.to(x0_hat))

    return masked
