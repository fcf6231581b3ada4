"""Discrete variance-preserving noise schedules, the closed-form forward process and sampling timesteps.

Notation (DDPM, Ho et al. 2020; diffusers attribute names in brackets):

    T            number of training timesteps; t in {0, ..., T-1}
    beta_t       [betas] per-step noise variance
    alpha_bar_t  [alphas_cumprod] prod_{s<=t} (1 - beta_s), so that
                 x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM eq. 4)
    sigma_t      [sigmas] sqrt((1 - alpha_bar_t) / alpha_bar_t): the noise level of x_t / sqrt(alpha_bar_t),
                 the variance-exploding view of the same process (Karras et al. 2022, Song et al. 2021)
    lambda_t     [log_snr] log(alpha_bar_t / (1 - alpha_bar_t)) = -2 log sigma_t (Kingma et al. 2021).
                 DPM-Solver's lambda is half of it: log(alpha_t / sigma_t) with alpha_t = sqrt(alpha_bar_t).

Shapes: B batch, C channels, h w latent grid, T training steps, N sampling steps.

The schedule is a frozen dataclass of float64 CPU tensors: it has no step state and no device. Lookups
move the (T,) tables to the device of the timesteps they are asked about.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

ScheduleKind = Literal["linear", "scaled_linear", "cosine"]
Spacing = Literal["leading", "trailing", "linspace"]
TimestepStyle = Literal["ddim", "dpmsolver"]
SigmaSpacing = Literal["default", "karras", "exponential"]
SIGMA_SPACINGS: tuple[str, ...] = ("default", "karras", "exponential")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5: rho = 7 puts more steps at low noise; diffusers and k-diffusion use it


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean equality; identity is enough
class NoiseSchedule:
    """A discrete noise schedule given by its betas; every other table is derived once and cached.

    Treat the tensors as read-only. Build one with :func:`make_schedule`, or pass trained betas.

    Attributes:
        betas: (T,) float64 in (0, 1]; a last beta of 1 means zero terminal SNR.
        alphas_cumprod: (T,) alpha_bar_t, decreasing from about 1 to about 0 (exactly 0 at zero terminal SNR).
        sigmas: (T,) sqrt((1 - alpha_bar) / alpha_bar), increasing; inf where alpha_bar = 0.
        log_snr: (T,) log(alpha_bar / (1 - alpha_bar)), decreasing; -inf where alpha_bar = 0.
    """

    betas: Tensor
    alphas_cumprod: Tensor = field(init=False)
    sigmas: Tensor = field(init=False)
    log_snr: Tensor = field(init=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas).detach().to("cpu", torch.float64).clone()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # frozen dataclass: derived fields are written once here, never again
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", alphas_cumprod)
        object.__setattr__(self, "sigmas", ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt())
        object.__setattr__(self, "log_snr", alphas_cumprod.log() - torch.log1p(-alphas_cumprod))

    def __repr__(self) -> str:
        first, last = self.alphas_cumprod[0].item(), self.alphas_cumprod[-1].item()
        return f"NoiseSchedule(T={self.num_steps}, alpha_bar={first:.6g}..{last:.6g})"

    @property
    def num_steps(self) -> int:
        """T, the number of training timesteps."""
        return self.betas.numel()

    def alpha_bar(self, t: Tensor | float | int) -> Tensor:
        """Look up alpha_bar at timesteps ``t``.

        Integer timesteps index the table. Float timesteps interpolate sigma linearly between the two
        neighbouring integers (diffusers' ``EulerDiscreteScheduler`` convention, ``np.interp`` over
        ``sigmas``) and return ``1 / (1 + sigma^2)``; integral floats give exactly the table value.

        Args:
            t: () or (B,) timesteps in [0, T-1], int or float, on any device.

        Returns:
            alpha_bar with t's shape, on t's device, float64 (float32 on MPS, which has no float64).

        Raises:
            ValueError: if a timestep lies outside [0, T-1] (negative ints would otherwise wrap around).
        """
        t = torch.as_tensor(t)
        last = self.num_steps - 1
        if bool(((t < 0) | (t > last)).any()):
            raise ValueError(f"timesteps must lie in [0, {last}], got min {t.min().item()} max {t.max().item()}")
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        table = self.alphas_cumprod.to(t.device, dtype)
        if not t.is_floating_point():
            return table[t]
        t = t.to(dtype)
        low = t.floor().long()
        high = (low + 1).clamp(max=last)
        frac = t - low
        sigmas = self.sigmas.to(t.device, dtype)
        sigma = sigmas[low] + frac * (sigmas[high] - sigmas[low])  # inf next to a zero-SNR end, never used at frac 0
        return torch.where(frac == 0, table[low], 1.0 / (1.0 + sigma**2))

    def snr(self, t: Tensor | float | int) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at ``t`` (0 at zero terminal SNR)."""
        alpha_bar = self.alpha_bar(t)
        return alpha_bar / (1.0 - alpha_bar)


def make_schedule(
    kind: ScheduleKind,
    num_steps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
) -> NoiseSchedule:
    """Build a schedule with diffusers' names and formulas (the defaults are Stable Diffusion's).

    - ``"linear"``: beta linear from beta_start to beta_end (DDPM; diffusers ``linear``).
    - ``"scaled_linear"``: sqrt(beta) linear, then squared (latent diffusion; diffusers ``scaled_linear``).
      Note that CompVis' LDM configs call this one ``linear``.
    - ``"cosine"``: Nichol & Dhariwal 2021 eq. 17 (diffusers ``squaredcos_cap_v2``); ignores beta_start/end.

    Args:
        kind: which beta ramp.
        num_steps: T.
        beta_start: first beta of the linear ramps.
        beta_end: last beta of the linear ramps.
        zero_terminal_snr: rescale so that alpha_bar_{T-1} = 0 (Lin et al. 2023, Alg. 1). Pair it with
            v- or x0-prediction: an epsilon network cannot recover x0 from pure noise.

    Returns:
        The schedule.
    """
    if kind == "linear":
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    elif kind == "cosine":
        betas = cosine_betas(num_steps)
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; valid kinds: 'linear', 'scaled_linear', 'cosine'")
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return NoiseSchedule(betas)


@dataclass(frozen=True)
class ScheduleConfig:
    """A noise schedule as config data: all a model trained on noised latents must agree on.

    The diffusion config extends it with the training objective; the noisy-latent classifier keeps only
    this part, so its saved config carries no objective it never used.

    Attributes:
        schedule: beta ramp, see :func:`make_schedule`.
        num_steps: T, the number of training timesteps.
        beta_start, beta_end: ends of the linear ramps (ignored by "cosine").
        zero_terminal_snr: rescale the schedule to zero SNR at T-1 (pair with "v" or "x0" prediction).
    """

    schedule: ScheduleKind = "scaled_linear"
    num_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False

    def make_schedule(self) -> NoiseSchedule:
        """The noise schedule this config describes."""
        return make_schedule(self.schedule, self.num_steps, self.beta_start, self.beta_end, self.zero_terminal_snr)


def cosine_betas(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    1. alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2) at u = t / T, t = 0..T.
    2. beta_t = 1 - alpha_bar(u_{t+1}) / alpha_bar(u_t), clipped at 0.999 to avoid the singularity at u = 1.
    """
    u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    alpha_bar = torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that the last timestep has zero SNR (Lin et al. 2023, Alg. 1).

    1. Shift sqrt(alpha_bar) so that its last value is 0.
    2. Scale it so that its first value is unchanged.
    3. Convert back: alpha_t = alpha_bar_t / alpha_bar_{t-1}, beta_t = 1 - alpha_t (the last beta becomes 1).
    """
    root = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Noise clean latents to timestep t in closed form: sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise.

    Args:
        schedule: the noise schedule.
        x0: (B, C, h, w) clean latents.
        t: (B,) or () timesteps, int or float (see :meth:`NoiseSchedule.alpha_bar`).
        noise: (B, C, h, w) standard normal noise.

    Returns:
        (B, C, h, w) x_t in x0's dtype (the coefficients are computed in float64).
    """
    alpha_bar = schedule.alpha_bar(torch.as_tensor(t, device=x0.device))
    signal = expand_to(alpha_bar.sqrt(), x0)
    noise_scale = expand_to((1.0 - alpha_bar).sqrt(), x0)
    return (signal * x0 + noise_scale * noise).to(x0.dtype)


def expand_to(values: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample values (B,) or () to (B, 1, ..., 1) on like's device, in like's dtype (at least fp32)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return values.to(like.device, dtype).reshape(-1, *([1] * (like.ndim - 1)))


def timesteps_for(
    schedule: NoiseSchedule,
    steps: int,
    spacing: Spacing,
    offset: int = 0,
    *,
    style: TimestepStyle = "ddim",
) -> Tensor:
    """Pick ``steps`` descending training timesteps to sample at (Lin et al. 2023, Table 2).

    Every sampler steps from ``timesteps[i]`` to ``timesteps[i + 1]`` and, after the last one, to the
    clean endpoint (alpha_bar = 1, sigma = 0). The two styles reproduce diffusers' ``set_timesteps``:

    - ``"ddim"``: DDPMScheduler and DDIMScheduler (and EulerDiscreteScheduler for leading/trailing).
      ``linspace``: round(linspace(0, T-1, N)); ``leading``: k * (T // N) + offset; ``trailing``:
      round(T - k * T / N) - 1. With linspace or leading the last model call is at t = 0.
    - ``"dpmsolver"``: DPMSolverMultistepScheduler, which places N + 1 points down to t = 0 and replaces
      t = 0 by the clean endpoint: ``linspace`` and ``leading`` use N + 1 points and drop the last;
      ``trailing`` is the same as in ``"ddim"``.

    Trailing spacing starts at t = T-1, which zero-terminal-SNR schedules need (Lin et al. 2023 §3.3).
    Unlike diffusers, trailing always returns exactly N timesteps (diffusers' float ``arange`` returns
    N + 1, ending at t = -1, for some N such as 61).

    Args:
        schedule: the schedule (only T is used).
        steps: N, between 1 and T.
        spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``.
        offset: diffusers' ``steps_offset`` (1 in Stable Diffusion's configs); only meaningful for leading.
        style: ``"ddim"`` or ``"dpmsolver"``, see above.

    Returns:
        (N,) int64, strictly descending, in [0, T-1].
    """
    num_train = schedule.num_steps
    if isinstance(steps, bool) or not hasattr(steps, "__index__"):  # 2.5 or "20" would fail further down
        raise TypeError(f"steps must be a whole number of sampling steps in [1, {num_train}], got {steps!r}")
    steps = operator.index(steps)
    if not 1 <= steps <= num_train:
        raise ValueError(f"steps must be in [1, {num_train}] (the model's training timesteps), got {steps}")
    if offset and spacing != "leading":
        raise ValueError(f"offset only applies to 'leading' spacing (diffusers ignores it otherwise), got {spacing!r}")
    if style not in ("ddim", "dpmsolver"):
        raise ValueError(f"unknown style {style!r}; valid styles: 'ddim', 'dpmsolver'")
    points = steps + 1 if style == "dpmsolver" else steps  # dpmsolver: the last point becomes sigma = 0
    k = torch.arange(points, dtype=torch.float64)
    if spacing == "linspace":
        grid = k * ((num_train - 1) / max(points - 1, 1))
        grid[-1] = num_train - 1 if points > 1 else 0.0  # like np.linspace: the endpoint is exact
    elif spacing == "leading":
        grid = k * (num_train // points) + offset
    elif spacing == "trailing":
        # reproduce np.arange(T, 0, -T/N) bit for bit: numpy steps by (T - T/N) - T, not by -T/N;
        # round before subtracting 1, since round-half-to-even depends on the parity
        delta = (num_train - num_train / steps) - num_train
        grid = num_train + torch.arange(steps, dtype=torch.float64) * delta
        return grid.round().long() - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}; valid spacings: 'leading', 'trailing', 'linspace'")
    timesteps = grid.round().long().flip(0)
    if style == "dpmsolver":
        timesteps = timesteps[:-1]
    if int(timesteps[0]) > num_train - 1:
        raise ValueError(f"offset {offset} pushes the first timestep past T-1 = {num_train - 1}")
    if timesteps.numel() > 1 and not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError(f"{steps} steps with {spacing!r} spacing and style {style!r} repeat timesteps; use fewer")
    return timesteps


def img2img_timesteps(timesteps: Tensor, strength: float) -> Tensor:
    """Keep the last ``round_down(N * strength)`` timesteps: img2img (SDEdit) starts from a later timestep.

    Noise the input latents to ``result[0]`` with :func:`q_sample`, then run any sampler on ``result``
    (diffusers' ``get_timesteps`` rule). strength 1 keeps every step; a strength that keeps no step fails.

    Args:
        timesteps: (N,) descending timesteps from :func:`timesteps_for`.
        strength: in (0, 1], the fraction of the trajectory to re-run.

    Returns:
        (M,) the tail of ``timesteps``, M = floor(N * strength).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    kept = min(int(len(timesteps) * strength), len(timesteps))
    if kept == 0:
        raise ValueError(f"strength {strength} keeps none of the {len(timesteps)} steps; raise it or add steps")
    return timesteps[len(timesteps) - kept :]


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO) -> Tensor:
    """The N noise levels of Karras et al. 2022, eq. 5: linear in sigma^(1/rho), from sigma_max down to sigma_min.

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1
    (N = 1 gives sigma_max alone). Returns (N,) float64, descending.
    """
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    low, high = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (high + ramp * (low - high)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int) -> Tensor:
    """N noise levels equally spaced in log sigma, i.e. in DPM-Solver's lambda, from sigma_max to sigma_min."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


def timestep_of_sigma(schedule: NoiseSchedule, sigmas: Tensor) -> Tensor:
    """The float timesteps whose noise level is ``sigmas``: the inverse of :meth:`NoiseSchedule.alpha_bar`.

    alpha_bar interpolates sigma linearly between integer timesteps, so t = j + (sigma - sigma_j) /
    (sigma_{j+1} - sigma_j) with sigma_j <= sigma <= sigma_{j+1}, and ``schedule.alpha_bar(t)`` gives back
    1 / (1 + sigma^2) to float64 rounding (diffusers' ``_sigma_to_t`` interpolates log sigma instead, which
    gives a timestep whose own alpha_bar is not the one it stands for).

    Args:
        schedule: a schedule with finite sigmas (no zero terminal SNR).
        sigmas: (N,) noise levels in [sigma_0, sigma_{T-1}].

    Returns:
        (N,) float64 timesteps in [0, T-1].
    """
    table = schedule.sigmas
    sigmas = sigmas.to(torch.float64)
    if bool((sigmas < table[0]).any() | (sigmas > table[-1]).any()):
        raise ValueError(f"sigmas must lie in the schedule's range [{table[0].item():.6g}, {table[-1].item():.6g}]")
    low = (torch.searchsorted(table, sigmas, right=True) - 1).clamp(0, schedule.num_steps - 2)
    return low + (sigmas - table[low]) / (table[low + 1] - table[low])


def sigma_timesteps(schedule: NoiseSchedule, steps: int, spacing: SigmaSpacing) -> Tensor:
    """N float timesteps at Karras or exponentially spaced noise levels over the schedule's whole range.

    The N noise levels run from sigma_max = sigma_{T-1} to sigma_min = sigma_0 (as diffusers'
    ``use_karras_sigmas`` / ``use_exponential_sigmas`` in DPMSolverMultistepScheduler and UniPC, and
    EulerDiscreteScheduler with ``linspace`` spacing); every sampler steps from the last one to the clean
    endpoint. Each noise level becomes the float timestep that has it (:func:`timestep_of_sigma`), so the
    samplers, the denoiser and the network all see the same noise level. diffusers instead calls the
    network at that timestep rounded (DPM-Solver, UniPC; truncated for exponential) while stepping with
    the unrounded sigma: same noise levels, network times that differ by up to half a training step.

    Args:
        schedule: the schedule; a zero-terminal-SNR one is refused (sigma_{T-1} is infinite).
        steps: N, between 1 and T.
        spacing: ``"karras"`` (rho = 7) or ``"exponential"`` (equal steps in log sigma).

    Returns:
        (N,) float64, strictly descending, from T-1 to 0.
    """
    if spacing not in ("karras", "exponential"):
        raise ValueError(f"unknown sigma spacing {spacing!r}; valid: 'karras', 'exponential' (or 'default': the "
                         "model's timestep spacing, from timesteps_for)")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= schedule.num_steps:
        raise ValueError(f"steps must be a whole number in [1, {schedule.num_steps}], got {steps!r}")
    sigma_min, sigma_max = schedule.sigmas[0].item(), schedule.sigmas[-1].item()
    if not math.isfinite(sigma_max):
        raise ValueError(f"{spacing} sigma spacing needs a finite largest noise level, and this zero-terminal-SNR "
                         "schedule's is infinite; use sigma_spacing='default' with 'trailing' timestep spacing")
    make = karras_sigmas if spacing == "karras" else exponential_sigmas
    sigmas = make(sigma_min, sigma_max, steps).clamp(sigma_min, sigma_max)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min if steps > 1 else sigma_max  # ends exactly at t = T-1 and 0: the
    return timestep_of_sigma(schedule, sigmas)  # power and exp round trips leave them 1e-16 off the table
