"""Samplers: pure functions that run the reverse process with a denoiser that predicts x0.

Notation (per step i; diffusers' DDIM notation map, Song et al. 2021):

    t, s          the current timestep ``timesteps[i]`` and the next one ``timesteps[i + 1]``; after the
                  last timestep comes the clean endpoint, alpha_bar = 1 (sigma = 0)
    alpha_bar     the schedule's cumulative product at t or s
    x0_hat        ``denoiser(x_t, t, **cond)``, the only network output any sampler uses
    eps_hat       (x_t - sqrt(alpha_bar_t) x0_hat) / sqrt(1 - alpha_bar_t), derived when needed
    a, sig        sqrt(alpha_bar), sqrt(1 - alpha_bar): the VP signal and noise scales (DPM-Solver's
                  alpha_t, sigma_t); lambda = log(a / sig)
    sigma         sqrt((1 - alpha_bar) / alpha_bar): the noise level of x / a (Karras et al. 2022)

Every sampler has the signature

    sample_X(denoiser, x, schedule, timesteps, *, cond=None, generator=None, callback=None, **options)

where ``x`` is the latent at ``timesteps[0]`` (pure noise for txt2img, a noised latent for img2img),
``timesteps`` is descending (from :func:`diffusion.schedules.timesteps_for`; float timesteps work too, e.g.
the Karras / exponential noise levels of :func:`diffusion.schedules.sigma_timesteps`),
and ``callback(i, x_t, x0_hat)`` sees each step's input and prediction. Every sampler ends at zero
noise: the last step returns the last x0_hat itself. Random numbers come only from ``generator``, one
draw of x's shape per stochastic step, in step order; a CPU generator gives the same images on any
device. Samplers know nothing of guidance, masks or network parameterizations: wrap the denoiser
(:mod:`diffusion.guidance`, :class:`diffusion.objectives.Denoiser`). Nothing clips x0_hat: diffusers'
DDPM/DDIM ``clip_sample=True`` default suits [-1, 1] pixels, not latents (wrap the denoiser to clamp).
Work happens in x's dtype promoted to at least float32, and the result is returned in x's dtype.

Shapes: B batch, C channels, h w latent grid, N sampling steps.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from diffusion.objectives import DenoiserFn
from diffusion.schedules import NoiseSchedule

Callback = Callable[[int, Tensor, Tensor], None]
Sampler = Callable[..., Tensor]
StepFn = Callable[[int, Tensor, Tensor], Tensor]

# alpha_bar floor for the samplers that divide by it (Euler, DPM-Solver++): a zero-terminal-SNR schedule
# has alpha_bar = 0 at T-1, i.e. infinite sigma. diffusers uses the same value (fp16's smallest subnormal).
MIN_ALPHA_BAR = 2.0**-24


def _alpha_bars(schedule: NoiseSchedule, timesteps: Tensor, floor: float = 0.0) -> list[float]:
    """alpha_bar at each timestep, then 1.0 for the clean endpoint, as float64 Python numbers."""
    if timesteps.ndim != 1 or timesteps.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D tensor, got shape {tuple(timesteps.shape)}")
    timesteps = timesteps.detach().cpu()
    if timesteps.numel() > 1 and not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError("timesteps must be strictly descending")
    return [max(value, floor) for value in schedule.alpha_bar(timesteps).tolist()] + [1.0]


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of x's shape and dtype, drawn on the generator's device, then moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _integrate(
    denoiser: DenoiserFn,
    x: Tensor,
    timesteps: Tensor,
    cond: dict[str, Any] | None,
    callback: Callback | None,
    step: StepFn,
    step_last: bool = False,
) -> Tensor:
    """Shared loop: denoise at each timestep, report, then ``step(i, x_t, x0_hat)``; the last step is x0_hat
    (the clean endpoint) unless ``step_last``."""
    out_dtype = x.dtype
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    times = timesteps.detach().cpu().tolist()
    for i, t in enumerate(times):
        t_batch = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
        x0_hat = denoiser(x, t_batch, **(cond or {})).to(x.dtype)
        if callback is not None:
            callback(i, x, x0_hat)
        x = x0_hat if i == len(times) - 1 and not step_last else step(i, x, x0_hat)
    if not bool(torch.isfinite(x).all()):  # one check per call: NaN latents would decode to plausible garbage
        raise FloatingPointError(
            "sampling produced NaN/inf latents: the denoiser's predictions were not finite. Check the guidance "
            "scale (it must be a finite number), the input latents, masks and conditions, and the model weights.")
    return x.to(out_dtype)


def ddpm_step(x: Tensor, x0_hat: Tensor, alpha_bar_t: float, alpha_bar_s: float, noise: Tensor) -> Tensor:
    """One ancestral step t -> s from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, eqs. 6-7).

    1. alpha = alpha_bar_t / alpha_bar_s, beta = 1 - alpha: the single-step values for a strided jump.
    2. mean = sqrt(alpha_bar_s) beta / (1 - alpha_bar_t) x0_hat + sqrt(alpha) (1 - alpha_bar_s) / (1 - alpha_bar_t) x_t.
    3. variance = (1 - alpha_bar_s) / (1 - alpha_bar_t) beta ("fixed_small", beta tilde of eq. 7).
    """
    alpha = alpha_bar_t / alpha_bar_s
    beta = 1.0 - alpha
    mean = (math.sqrt(alpha_bar_s) * beta / (1.0 - alpha_bar_t)) * x0_hat + (
        math.sqrt(alpha) * (1.0 - alpha_bar_s) / (1.0 - alpha_bar_t)
    ) * x
    return mean + math.sqrt((1.0 - alpha_bar_s) / (1.0 - alpha_bar_t) * beta) * noise


def ddim_step(
    x: Tensor, x0_hat: Tensor, alpha_bar_t: float, alpha_bar_s: float, eta: float, noise: Tensor | None
) -> Tensor:
    """One DDIM step t -> s (Song et al. 2021, eqs. 12 and 16).

    1. eps_hat = (x_t - sqrt(alpha_bar_t) x0_hat) / sqrt(1 - alpha_bar_t).
    2. sigma_eta = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s).
    3. x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma_eta^2) eps_hat + sigma_eta noise.
    """
    eps_hat = (x - math.sqrt(alpha_bar_t) * x0_hat) / math.sqrt(1.0 - alpha_bar_t)
    sigma_eta = eta * math.sqrt((1.0 - alpha_bar_s) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_s))
    x_s = math.sqrt(alpha_bar_s) * x0_hat + math.sqrt(max(1.0 - alpha_bar_s - sigma_eta**2, 0.0)) * eps_hat
    return x_s if noise is None else x_s + sigma_eta * noise


def _half_log_snr(alpha_bar: float) -> float:
    """DPM-Solver's lambda = log(a / sig) = log(alpha_bar / (1 - alpha_bar)) / 2."""
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def dpmpp_2m_step(
    x: Tensor,
    x0_hat: Tensor,
    alpha_bar_t: float,
    alpha_bar_s: float,
    x0_prev: Tensor | None = None,
    alpha_bar_prev: float | None = None,
) -> Tensor:
    """One DPM-Solver++(2M) step t -> s in data prediction (Lu et al. 2022, "DPM-Solver++", Alg. 2).

    Without a previous prediction (``x0_prev`` at the previous timestep) the step is first order.

    1. h = lambda_s - lambda_t; first order (= DDIM): D = x0_hat.
    2. second order: r = h_prev / h with h_prev = lambda_t - lambda_prev, and
       D = (1 + 1 / (2r)) x0_hat - 1 / (2r) x0_prev.
    3. x_s = (sig_s / sig_t) x_t + a_s (1 - exp(-h)) D.
    """
    h = _half_log_snr(alpha_bar_s) - _half_log_snr(alpha_bar_t)
    data = x0_hat
    if x0_prev is not None and alpha_bar_prev is not None:
        h_prev = _half_log_snr(alpha_bar_t) - _half_log_snr(alpha_bar_prev)
        ratio = h / (2.0 * h_prev)  # 1 / (2r)
        data = (1.0 + ratio) * x0_hat - ratio * x0_prev
    decay = math.sqrt((1.0 - alpha_bar_s) / (1.0 - alpha_bar_t))
    return decay * x + (math.sqrt(alpha_bar_s) * -math.expm1(-h)) * data


def euler_step(x: Tensor, x0_hat: Tensor, alpha_bar_t: float, alpha_bar_s: float) -> Tensor:
    """One Euler step of the probability-flow ODE in sigma space (Karras et al. 2022, Alg. 1 without churn).

    1. Leave VP space: y = x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps, sigma = sqrt((1 - alpha_bar) / alpha_bar).
    2. dy/dsigma = (y - x0_hat) / sigma_t; y_s = y + (sigma_s - sigma_t) dy/dsigma.
    3. Return to VP space: x_s = sqrt(alpha_bar_s) y_s.
    With an x0 denoiser this equals DDIM with eta = 0 up to rounding.
    """
    sigma_t = math.sqrt((1.0 - alpha_bar_t) / alpha_bar_t)
    sigma_s = math.sqrt((1.0 - alpha_bar_s) / alpha_bar_s)
    y = x / math.sqrt(alpha_bar_t)
    y_s = y + (sigma_s - sigma_t) * ((y - x0_hat) / sigma_t)
    return math.sqrt(alpha_bar_s) * y_s


@torch.no_grad()
def sample_ddpm(
    denoiser: DenoiserFn,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral DDPM sampling with "fixed_small" variance (diffusers' DDPMScheduler default), any stride.

    One noise draw per step except the last. Options: none. See the module docstring for the arguments.
    """
    alpha_bars = _alpha_bars(schedule, timesteps)

    def step(i: int, x_t: Tensor, x0_hat: Tensor) -> Tensor:
        return ddpm_step(x_t, x0_hat, alpha_bars[i], alpha_bars[i + 1], _randn_like(x_t, generator))

    return _integrate(denoiser, x, timesteps, cond, callback, step)


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
    final_alpha_bar: float = 1.0,
) -> Tensor:
    """DDIM sampling; ``eta`` 0 is the deterministic ODE sampler, 1 the DDPM-like stochastic one.

    With eta > 0, one noise draw per step except the last. ``final_alpha_bar`` < 1 makes the last step a DDIM
    step to that alpha_bar instead of the clean endpoint (diffusers' ``set_alpha_to_one=False``: alpha_bar at
    t = 0). See the module docstring for the other arguments.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if not 0.0 < final_alpha_bar <= 1.0:
        raise ValueError(f"final_alpha_bar must be in (0, 1], got {final_alpha_bar}")
    alpha_bars = _alpha_bars(schedule, timesteps)
    alpha_bars[-1] = final_alpha_bar

    def step(i: int, x_t: Tensor, x0_hat: Tensor) -> Tensor:
        noise = _randn_like(x_t, generator) if eta > 0 else None
        return ddim_step(x_t, x0_hat, alpha_bars[i], alpha_bars[i + 1], eta, noise)

    return _integrate(denoiser, x, timesteps, cond, callback, step, step_last=final_alpha_bar < 1.0)


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M): second-order multistep, first order at the first step, x0_hat at the last.

    Matches diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    final_sigmas_type="zero") given its timesteps (``timesteps_for(..., style="dpmsolver")``). Prefer
    those: DDIM-style timesteps end with a model call at t = 0, and the second-order step into it spans
    a log-SNR gap several times the previous one, so its extrapolation overshoots (the std of a Gaussian
    test comes out 5 % too large at 50 steps). Deterministic; ``generator`` is unused. See the module
    docstring for the arguments.
    """
    alpha_bars = _alpha_bars(schedule, timesteps, floor=MIN_ALPHA_BAR)
    previous: list[Tensor] = []  # the last step's x0_hat: the multistep memory

    def step(i: int, x_t: Tensor, x0_hat: Tensor) -> Tensor:
        if previous:
            x_s = dpmpp_2m_step(x_t, x0_hat, alpha_bars[i], alpha_bars[i + 1], previous[0], alpha_bars[i - 1])
        else:
            x_s = dpmpp_2m_step(x_t, x0_hat, alpha_bars[i], alpha_bars[i + 1])
        previous[:] = [x0_hat]
        return x_s

    return _integrate(denoiser, x, timesteps, cond, callback, step)


@torch.no_grad()
def sample_euler(
    denoiser: DenoiserFn,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler's method on the sigma-space ODE, ending at sigma = 0 (diffusers' EulerDiscreteScheduler).

    ``x`` is in VP space like for every sampler (diffusers' scaled sample x * sqrt(1 + sigma^2) is
    internal here). Deterministic; ``generator`` is unused. See the module docstring for the arguments.
    """
    alpha_bars = _alpha_bars(schedule, timesteps, floor=MIN_ALPHA_BAR)

    def step(i: int, x_t: Tensor, x0_hat: Tensor) -> Tensor:
        return euler_step(x_t, x0_hat, alpha_bars[i], alpha_bars[i + 1])

    return _integrate(denoiser, x, timesteps, cond, callback, step)


def _unipc_weights(ratios: list[float], h: float, rows: int) -> list[float]:
    """UniPC's rho: solve R rho = b with R[i][k] = r_k^i (r = ``ratios`` + [1]) and b_i = i! phi_{i+1}(h) / B(h).

    The phi_k are the exponential integrators' phi functions at -h, built by the recursion h phi_{k+1} =
    h phi_k / (-h) - 1 / k! from h phi_1 = e^(-h) - 1; B(h) = e^(-h) - 1 is the "bh2" choice (Zhao et al.
    2023, §3.3). Only the first ``rows`` rows and columns are used (the predictor drops the last).
    """
    h_phi, factorial, b = math.expm1(-h) / -h - 1.0, 1.0, []
    for i in range(1, rows + 1):
        b.append(h_phi * factorial / math.expm1(-h))
        factorial *= i + 1
        h_phi = h_phi / -h - 1.0 / factorial
    points = torch.tensor((ratios + [1.0])[:rows], dtype=torch.float64)
    matrix = torch.stack([points**i for i in range(rows)])
    return torch.linalg.solve(matrix, torch.tensor(b, dtype=torch.float64)).tolist()


def unipc_step(
    x: Tensor,
    x0_hat: Tensor,
    alpha_bar_t: float,
    alpha_bar_s: float,
    earlier: Sequence[tuple[Tensor, float]] = (),
    x0_next: Tensor | None = None,
) -> Tensor:
    """One UniPC step t -> s in data prediction with B(h) = e^(-h) - 1 (Zhao et al. 2023, "UniPC", Alg. 1-2).

    ``earlier`` holds (x0_hat, alpha_bar) of the previous steps, newest first; p = len(earlier) + 1 is the order.
    Without ``x0_next`` this is the predictor UniP-p; with it (the x0_hat at s) the corrector UniC-p, which
    redoes the same step with that new evaluation to give a better x_s (order p + 1, no extra network call).

    1. h = lambda_s - lambda_t; r_k = (lambda_k - lambda_t) / h; D_k = (x0_k - x0_hat) / r_k.
    2. base (= DDIM, DPM-Solver++ 1st order): (sig_s / sig_t) x_t + a_s (1 - e^(-h)) x0_hat.
    3. predictor: x_s = base - a_s B(h) sum_k rho_k D_k, rho from the first p - 1 rows of
       :func:`_unipc_weights` (p = 2: rho = 1/2).
    4. corrector: x_s = base - a_s B(h) (sum_k rho_k D_k + rho_p (x0_next - x0_hat)), rho from all p rows
       (p = 1: rho = 1/2).
    """
    lambda_t = _half_log_snr(alpha_bar_t)
    h = _half_log_snr(alpha_bar_s) - lambda_t
    decay = math.sqrt((1.0 - alpha_bar_s) / (1.0 - alpha_bar_t))
    x_s = decay * x + (math.sqrt(alpha_bar_s) * -math.expm1(-h)) * x0_hat
    ratios = [(_half_log_snr(alpha_bar) - lambda_t) / h for _, alpha_bar in earlier]
    if x0_next is None:
        if not earlier:
            return x_s
        weights = [0.5] if len(earlier) == 1 else _unipc_weights(ratios, h, len(earlier))
        differences = [(x0 - x0_hat) / r for (x0, _), r in zip(earlier, ratios)]
    else:
        weights = [0.5] if not earlier else _unipc_weights(ratios, h, len(earlier) + 1)
        differences = [(x0 - x0_hat) / r for (x0, _), r in zip(earlier, ratios)] + [x0_next - x0_hat]
    correction = sum(weight * difference for weight, difference in zip(weights, differences))
    return x_s - (math.sqrt(alpha_bar_s) * math.expm1(-h)) * correction


@torch.no_grad()
def sample_unipc(
    denoiser: DenoiserFn,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 2,
) -> Tensor:
    """UniPC (bh2): a multistep predictor of ``order`` whose every step is corrected with the next evaluation.

    Matches diffusers' UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, lower_order_final=True,
    final_sigmas_type="zero", solver_order=order) given its timesteps (``timesteps_for(..., style=
    "dpmsolver")``, or :func:`diffusion.schedules.sigma_timesteps`). The order ramps up over the first
    steps and down over the last (step i of N uses min(order, i + 1, N - i)). ``order`` 2 suits guided
    sampling, 3 unguided (diffusers' advice). The callback sees each step's input before its correction.
    Deterministic; ``generator`` is unused. See the module docstring for the other arguments.
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    alpha_bars = _alpha_bars(schedule, timesteps, floor=MIN_ALPHA_BAR)
    count = len(alpha_bars) - 1
    x0s: list[Tensor] = []  # the x0_hat of the last `order` steps, oldest first: the multistep memory
    previous: list[Tensor] = []  # the last step's corrected input

    def earlier(j: int, p: int) -> list[tuple[Tensor, float]]:
        """(x0_hat, alpha_bar) of the p - 1 steps before step j, newest first, when x0s ends at step j."""
        return [(x0s[-1 - k], alpha_bars[j - k]) for k in range(1, p)]

    def step(i: int, x_t: Tensor, x0_hat: Tensor) -> Tensor:
        if previous:  # correct x_t with x0_hat, redoing the last step at that step's order
            p = min(order, i, count - i + 1)
            x_t = unipc_step(previous[0], x0s[-1], alpha_bars[i - 1], alpha_bars[i], earlier(i - 1, p), x0_hat)
        x0s.append(x0_hat)
        p = min(order, i + 1, count - i)
        x_s = unipc_step(x_t, x0_hat, alpha_bars[i], alpha_bars[i + 1], earlier(i, p))
        del x0s[:-order]
        previous[:] = [x_t]
        return x_s

    return _integrate(denoiser, x, timesteps, cond, callback, step)


SAMPLERS: dict[str, Sampler] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "unipc": sample_unipc,
}

# The samplers that take Karras / exponential sigma spacings (diffusers' use_karras_sigmas /
# use_exponential_sigmas). DDPM and DDIM step on the training timestep grid, as diffusers' DDPMScheduler and
# DDIMScheduler do (neither has sigma spacings); DDIM with eta = 0 is the Euler integrator: use "euler".
SIGMA_SPACING_SAMPLERS: tuple[str, ...] = ("dpmpp_2m", "euler", "unipc")


def get_sampler(name: str) -> Sampler:
    """Return the sampler registered under ``name`` (one of :data:`SAMPLERS`)."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(SAMPLERS), n=1, cutoff=0.8)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"sampler {name!r} is unknown; {hint}valid samplers: {', '.join(sorted(SAMPLERS))}") from None
