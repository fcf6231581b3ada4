"""Training targets, prediction conversions, min-SNR loss weighting and the one denoiser contract.

Notation (Ho et al. 2020; v from Salimans & Ho 2022):

    a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t), x_t = a_t x0 + s_t eps
    eps   the noise                          ("epsilon")
    x0    the clean latent                   ("x0"; diffusers calls it "sample")
    v     a_t eps - s_t x0                   ("v"; diffusers "v_prediction")
    SNR   alpha_bar_t / (1 - alpha_bar_t) = a_t^2 / s_t^2

Conversions, for a fixed x_t (they are exact inverses of each other):

    x0 = (x_t - s_t eps) / a_t = a_t x_t - s_t v
    eps = (x_t - a_t x0) / s_t = a_t v + s_t x_t

Shapes: B batch, C channels, h w latent grid.

Every sampler consumes a :data:`DenoiserFn`: ``(x_t (B, C, h, w), t (B,) float timesteps in [0, T-1],
**cond) -> x0_hat (B, C, h, w)``. :class:`Denoiser` turns an epsilon-, x0- or v-predicting network into
one, so that the parameterization lives in one place and samplers never read network attributes.

:class:`DiffusionConfig` (a :class:`diffusion.schedules.ScheduleConfig` plus the objective), condition
dropout and :func:`training_loss` are what the training script shares with the benchmarks.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from diffusion.schedules import NoiseSchedule, ScheduleConfig, Spacing, expand_to, q_sample

if TYPE_CHECKING:
    from common.text_encoder import TextEmbedding

Prediction = Literal["epsilon", "x0", "v"]
Weighting = Literal["none", "min_snr"]
DenoiserFn = Callable[..., Tensor]
"""``(x_t: (B, C, h, w), t: (B,) float timesteps in [0, T-1], **cond) -> x0_hat: (B, C, h, w)``."""

PREDICTIONS: tuple[str, ...] = ("epsilon", "x0", "v")


def _check_prediction(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {kind!r}; valid types: {', '.join(PREDICTIONS)}")


def _scales(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(a_t, s_t) computed in float64 from the schedule, broadcast to like's batch as (B, 1, 1, 1)."""
    alpha_bar = schedule.alpha_bar(torch.as_tensor(t, device=like.device))
    return expand_to(alpha_bar.sqrt(), like), expand_to((1.0 - alpha_bar).sqrt(), like)


def training_target(kind: Prediction, x0: Tensor, noise: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """Return what a network of prediction type ``kind`` should output for x_t = q_sample(x0, t, noise).

    Args:
        kind: ``"epsilon"``, ``"x0"`` or ``"v"``.
        x0: (B, C, h, w) clean latents.
        noise: (B, C, h, w) the noise used to make x_t.
        schedule: the noise schedule.
        t: (B,) timesteps.

    Returns:
        (B, C, h, w) target in x0's dtype.
    """
    _check_prediction(kind)
    if kind == "epsilon":
        return noise
    if kind == "x0":
        return x0
    a, s = _scales(schedule, t, x0)
    return (a * noise - s * x0).to(x0.dtype)


def to_x0(kind: Prediction, model_output: Tensor, x_t: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """Convert a network output of type ``kind`` to the x0 estimate, in float32 (float64 if given float64).

    Args:
        kind: the network's prediction type.
        model_output: (B, C, h, w) network output.
        x_t: (B, C, h, w) the network's input.
        schedule: the noise schedule.
        t: (B,) timesteps of x_t.

    Returns:
        (B, C, h, w) x0_hat. For epsilon at zero SNR (alpha_bar = 0) this divides by zero: use v or x0 there.
    """
    _check_prediction(kind)
    dtype = torch.promote_types(torch.promote_types(model_output.dtype, x_t.dtype), torch.float32)
    out, x = model_output.to(dtype), x_t.to(dtype)
    if kind == "x0":
        return out
    a, s = _scales(schedule, t, x)
    if kind == "epsilon":
        return (x - s * out) / a
    return a * x - s * out


def to_eps(kind: Prediction, model_output: Tensor, x_t: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """Convert a network output of type ``kind`` to the noise estimate (see :func:`to_x0`).

    For x0 at alpha_bar = 1 (never a training timestep) this divides by zero.
    """
    _check_prediction(kind)
    dtype = torch.promote_types(torch.promote_types(model_output.dtype, x_t.dtype), torch.float32)
    out, x = model_output.to(dtype), x_t.to(dtype)
    if kind == "epsilon":
        return out
    a, s = _scales(schedule, t, x)
    if kind == "x0":
        return (x - a * out) / s
    return a * out + s * x


def loss_weight(
    weighting: Weighting,
    schedule: NoiseSchedule,
    t: Tensor,
    gamma: float = 5.0,
    prediction: Prediction = "epsilon",
) -> Tensor:
    """Per-sample loss weights; ``"min_snr"`` is Min-SNR-gamma (Hang et al. 2023).

    Min-SNR clips the x0-space weight of each timestep at gamma: w_x0 = min(SNR, gamma). Expressed for
    the loss on each prediction type (whose MSE already carries an SNR factor relative to x0):

    1. epsilon: ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2, so w = min(SNR, gamma) / SNR = min(1, gamma / SNR).
    2. x0: w = min(SNR, gamma).
    3. v: ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2, so w = min(SNR, gamma) / (SNR + 1).

    At zero SNR the epsilon weight is 1 (its limit) and the x0 and v weights are 0.

    Args:
        weighting: ``"none"`` (all ones) or ``"min_snr"``.
        schedule: the noise schedule.
        t: (B,) training timesteps.
        gamma: the clip value; 5 is the paper's and diffusers' recommendation.
        prediction: the network's prediction type.

    Returns:
        (B,) float32 weights on t's device.
    """
    _check_prediction(prediction)
    t = torch.as_tensor(t)
    if weighting == "none":
        return torch.ones(t.shape, device=t.device, dtype=torch.float32).reshape(-1)
    if weighting != "min_snr":
        raise ValueError(f"unknown weighting {weighting!r}; valid weightings: 'none', 'min_snr'")
    snr = schedule.snr(t).reshape(-1)
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        weight = (gamma / snr).clamp(max=1.0)  # gamma / 0 = inf -> 1 at zero SNR
    elif prediction == "x0":
        weight = clipped
    else:
        weight = clipped / (snr + 1.0)
    return weight.float()


def diffusion_loss(network_output: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-sample weighted mean squared error, computed in float32.

    Args:
        network_output: (B, C, h, w) the network's prediction.
        target: (B, C, h, w) from :func:`training_target`.
        weights: (B,) from :func:`loss_weight`, or None for unweighted.

    Returns:
        (B,) losses; take ``.mean()`` for the training loss.
    """
    error = (network_output.float() - target.float()).square()
    per_sample = error.reshape(error.shape[0], -1).mean(dim=1)
    if weights is None:
        return per_sample
    return per_sample * weights.to(per_sample.device, per_sample.dtype).reshape(-1)


class Denoiser:
    """Wrap a network ``net(x_t, t, **cond) -> output`` of a prediction type into a :data:`DenoiserFn`.

    The network may run in any dtype (bf16 autocast included); the conversion to x0 happens in float32
    (float64 for float64 inputs) with float64 schedule coefficients.

    Example:
        >>> denoiser = Denoiser(unet, make_schedule("scaled_linear"), "epsilon")
        >>> x0_hat = denoiser(x_t, t, context=text_embeddings)
    """

    def __init__(self, net: Callable[..., Tensor], schedule: NoiseSchedule, prediction: Prediction) -> None:
        _check_prediction(prediction)
        self.net = net
        self.schedule = schedule
        self.prediction = prediction

    def __call__(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Return x0_hat (B, C, h, w) for x_t (B, C, h, w) at float timesteps t (B,)."""
        output = self.net(x_t, t, **cond)
        return to_x0(self.prediction, output, x_t, self.schedule, t)

    def __repr__(self) -> str:
        return f"Denoiser({type(self.net).__name__}, {self.schedule!r}, prediction={self.prediction!r})"


@dataclass(frozen=True)
class DiffusionConfig(ScheduleConfig):
    """The diffusion process (the :class:`ScheduleConfig` fields, first) and its training objective.

    The field order is the saved order: ``pipeline.json`` lists the schedule keys, then these.

    Attributes:
        prediction: what the U-Net predicts: "epsilon", "x0" or "v".
        weighting: "none" or "min_snr" (Min-SNR-gamma loss weights, Hang et al. 2023).
        snr_gamma: gamma of min_snr.
        cond_drop_prob: probability p that training replaces a condition by its null (the "" caption, the
            null class), which is what makes classifier-free guidance work. Caption and class are dropped
            independently (``diffusion.train_latent.drop_conditions``), so a class + text U-Net sees every
            pair the pipelines guide with: (class, "") and (null, prompt) each with probability p (1 - p),
            against (null, "") with p^2.
        timestep_bias: how training draws t: t/T ~ Beta(bias, 1), density proportional to (t/T)^(bias - 1).
            1 is DDPM's uniform draw; 2 draws noisy timesteps more often (twice as often at T as on average,
            rarely near t = 0), where the prompt alone must say which image to make (measured in
            ``configs/diffusion/emoji32_quick.yaml``).
        spacing: how sampling picks its timesteps ("trailing" starts at T-1).
        steps_offset: added to "leading" timesteps (diffusers' ``steps_offset``, 1 in Stable Diffusion).
        set_alpha_to_one: DDIM's last step lands on the clean endpoint (alpha_bar 1); False lands it on
            alpha_bar at t = 0, as Stable Diffusion's DDIM config does (diffusers' option of that name).
    """

    prediction: Prediction = "epsilon"
    weighting: Weighting = "min_snr"
    snr_gamma: float = 5.0
    cond_drop_prob: float = 0.1
    timestep_bias: float = 1.0
    spacing: Spacing = "trailing"
    steps_offset: int = 0
    set_alpha_to_one: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if not (math.isfinite(self.timestep_bias) and self.timestep_bias > 0):
            raise ValueError(f"timestep_bias must be a finite number > 0 (1 = uniform t, 2 = favour noisy t), got "
                             f"{self.timestep_bias}")
        if self.steps_offset < 0 or (self.steps_offset and self.spacing != "leading"):
            raise ValueError(f"steps_offset must be >= 0 and only shifts 'leading' spacing, got {self.steps_offset} "
                             f"with spacing {self.spacing!r}")
        if self.zero_terminal_snr and self.prediction == "epsilon":
            raise ValueError("zero_terminal_snr needs prediction 'v' or 'x0': an epsilon network cannot "
                             "recover x0 from pure noise at the last timestep")


def sample_timesteps(batch: int, num_steps: int, bias: float, device: torch.device | str) -> Tensor:
    """(batch,) training timesteps in {0, ..., num_steps - 1}, t/T ~ Beta(bias, 1) (:class:`DiffusionConfig`).

    ``bias`` 1 takes ``torch.randint``, so uniform runs keep the random stream they always had; otherwise
    t = floor(T u^(1 / bias)) for u ~ U[0, 1), the inverse of the Beta(bias, 1) distribution function.
    """
    if bias == 1.0:
        return torch.randint(0, num_steps, (batch,), device=device)
    u = torch.rand(batch, device=device)
    return (u.pow(1.0 / bias) * num_steps).long().clamp_(max=num_steps - 1)


def drop_condition(ids: Tensor, prob: float, null_id: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each of ``ids`` (B,) by ``null_id`` with probability ``prob`` (condition dropout)."""
    if prob <= 0:
        return ids
    drop = torch.rand(ids.shape, generator=generator, device=ids.device if generator is None else generator.device)
    return torch.where(drop.to(ids.device) < prob, torch.full_like(ids, null_id), ids)


def training_loss(unet: nn.Module, schedule: NoiseSchedule, config: DiffusionConfig, latents: Tensor,
                  text: TextEmbedding | None = None, class_labels: Tensor | None = None) -> Tensor:
    """The weighted denoising loss (B,) of clean scaled latents (B, D, h, w) at t from :func:`sample_timesteps`.

    Draws t and the noise from the global RNG (what accelerate checkpoints, so resume is exact).
    ``class_labels`` are already shifted (label + 1, or NULL_CLASS) as the U-Net takes them.
    """
    batch = latents.shape[0]
    t = sample_timesteps(batch, schedule.num_steps, config.timestep_bias, latents.device)
    noise = torch.randn_like(latents)
    x_t = q_sample(schedule, latents, t, noise)
    context = dict(context=text.states, context_mask=text.mask) if text is not None else {}
    output = unet(x_t, t, class_labels=class_labels, **context)
    target = training_target(config.prediction, latents, noise, schedule, t)
    weights = loss_weight(config.weighting, schedule, t, config.snr_gamma, config.prediction)
    return diffusion_loss(output, target, weights)
