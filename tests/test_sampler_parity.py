"""Parity with diffusers: schedules, timesteps, training helpers and every sampler against its scheduler.

Both sides run the same fixed random network ``eps_model(x, t)`` from the same starting latent, with
the same torch.Generator seed for the stochastic steps. "Shared" runs give diffusers our float64
alphas_cumprod so that only the algorithms are compared; "as shipped" runs keep diffusers' float32
schedule. Measured max |ours - diffusers| (final latents of magnitude up to about 4):

    shared, float64:     DDPM 1000 steps 2e-15, DDPM 50 strided 1e-15, DDIM eta 0 4e-15, DDIM eta 1 2e-15
                         (x0 and v networks too); DPM-Solver++ 2M 1e-6 and Euler 9e-7, because diffusers
                         computes those two in float32; zero terminal SNR + trailing, v network: DDIM 1e-15,
                         DPM-Solver++ 5e-6
    as shipped, float32: DDIM 1.4e-6 (eta 1: 2.4e-6), DDPM 50 steps 5.6e-6, DPM-Solver++ 1.4e-6, Euler 1.4e-6,
                         DDPM 1000 steps 4.2e-5 (the float32 schedule's rounding over 1000 stochastic steps)

diffusers' DDIM steps to t - T // N rather than to the next listed timestep, so DDIM parity holds for
leading spacing and for trailing when N divides T; our samplers always step to the next listed timestep.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from diffusion.objectives import Denoiser, loss_weight, training_target
from diffusion.samplers import MIN_ALPHA_BAR, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler
from diffusion.schedules import NoiseSchedule, img2img_timesteps, make_schedule, q_sample, timesteps_for

diffusers = pytest.importorskip("diffusers")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

# diffusers calls np.array on tensors, which numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

TOLERANCE = 1e-5
CHANNELS = 4
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
DIFFUSERS_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}

_weights = torch.Generator().manual_seed(123)
MIX = torch.randn(CHANNELS, CHANNELS, generator=_weights, dtype=torch.float64) * 0.4
BIAS = torch.randn(CHANNELS, generator=_weights, dtype=torch.float64)


def eps_model(x: Tensor, t: Tensor | float) -> Tensor:
    """A fixed random non-linear network of (x, t); t is a scalar (diffusers) or (B,) (ours).

    Channel mixing by broadcasting plus a spatial shift: no BLAS call, whose threads crawl on busy cores.
    """
    t = torch.as_tensor(t).to(x.dtype).reshape(-1, 1, 1, 1)
    mixed = (MIX.to(x.dtype)[None, :, :, None, None] * x[:, None]).sum(2) + 0.5 * x.roll(1, dims=-1)
    hidden = mixed + BIAS.to(x.dtype).view(1, -1, 1, 1) * torch.cos(t / 150)
    return 0.8 * x + 0.3 * torch.tanh(hidden)


def start(dtype: torch.dtype) -> Tensor:
    return torch.randn(2, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)


def run_diffusers(scheduler: Any, steps: int, x: Tensor, seed: int, sigma_space: bool = False, **kwargs: Any) -> Tensor:
    """The usual diffusers denoising loop. Euler works on x * sqrt(1 + sigma^2), i.e. x / sqrt(alpha_bar)."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    sample = x * (scheduler.sigmas[0].double() ** 2 + 1).sqrt().to(x.dtype) if sigma_space else x.clone()
    for t in scheduler.timesteps:
        output = eps_model(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(output, t, sample, generator=generator, **kwargs).prev_sample
    return sample


CASES: dict[str, tuple[Callable[..., Any], int, Callable[..., Tensor], dict[str, Any]]] = {
    # name: (diffusers scheduler factory, steps, our sampler, options)
    "ddpm_1000": (lambda **kw: DDPMScheduler(clip_sample=False, **kw), 1000, sample_ddpm, {}),
    "ddpm_50_strided": (lambda **kw: DDPMScheduler(clip_sample=False, **kw), 50, sample_ddpm, {}),
    "ddim_50": (lambda **kw: DDIMScheduler(clip_sample=False, **kw), 50, sample_ddim, {}),
    "ddim_50_eta1": (lambda **kw: DDIMScheduler(clip_sample=False, **kw), 50, sample_ddim, {"eta": 1.0}),
    "dpmpp_2m_20": (lambda **kw: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **kw),
                    20, sample_dpmpp_2m, {}),
    "euler_30_leading": (lambda **kw: EulerDiscreteScheduler(timestep_spacing="leading", **kw), 30, sample_euler, {}),
    "euler_30_linspace": (lambda **kw: EulerDiscreteScheduler(**kw), 30, sample_euler, {}),
}


def compare(name: str, schedule: NoiseSchedule, dtype: torch.dtype, shared: bool, prediction: str = "epsilon",
            **config: Any) -> float:
    """Run case ``name`` on both sides and return max |ours - diffusers|."""
    factory, steps, sampler, options = CASES[name]
    scheduler = factory(prediction_type=PREDICTION[prediction], **config)
    floor = MIN_ALPHA_BAR if sampler in (sample_dpmpp_2m, sample_euler) else 0.0
    if shared:  # replace diffusers' float32 table by ours, floored like diffusers does at zero terminal SNR
        scheduler.alphas_cumprod = schedule.alphas_cumprod.clamp(min=floor)
    x = start(dtype)
    theirs = run_diffusers(scheduler, steps, x, seed=7, sigma_space=sampler is sample_euler,
                           **({"eta": options["eta"]} if "eta" in options else {}))
    timesteps = scheduler.timesteps
    if not timesteps.is_floating_point() or bool((timesteps == timesteps.round()).all()):
        style = "dpmsolver" if sampler is sample_dpmpp_2m else "ddim"
        ours_t = timesteps_for(schedule, steps, scheduler.config.timestep_spacing, scheduler.config.steps_offset,
                               style=style)
        assert torch.equal(ours_t, timesteps.long()), "timesteps_for must reproduce set_timesteps"
        timesteps = ours_t
    denoiser = Denoiser(eps_model, schedule, prediction)  # type: ignore[arg-type]
    ours = sampler(denoiser, x, schedule, timesteps, generator=torch.Generator().manual_seed(7), **options)
    assert ours.dtype == theirs.dtype
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_sampler_parity_shared_schedule(name: str) -> None:
    diff = compare(name, make_schedule("scaled_linear"), torch.float64, shared=True, **SD)
    assert diff <= TOLERANCE, f"{name}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("name", sorted(set(CASES) - {"ddpm_1000"}))
def test_sampler_parity_as_shipped_float32(name: str) -> None:
    diff = compare(name, make_schedule("scaled_linear"), torch.float32, shared=False, **SD)
    assert diff <= TOLERANCE, f"{name}: max abs diff {diff:.3g}"


def test_ddpm_1000_as_shipped_float32() -> None:
    """Over 1000 stochastic steps the float32 schedule's rounding (1e-6 relative) adds up to a few 1e-5."""
    diff = compare("ddpm_1000", make_schedule("scaled_linear"), torch.float32, shared=False, **SD)
    assert diff <= 1e-4, f"max abs diff {diff:.3g}"


@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize("name", ["ddpm_50_strided", "ddim_50_eta1", "dpmpp_2m_20", "euler_30_leading"])
def test_x0_and_v_networks(name: str, prediction: str) -> None:
    diff = compare(name, make_schedule("scaled_linear"), torch.float64, shared=True, prediction=prediction, **SD)
    assert diff <= TOLERANCE, f"{name} {prediction}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize("name", ["ddim_50", "dpmpp_2m_20"])
def test_zero_terminal_snr_with_trailing_spacing(name: str, prediction: str) -> None:
    """Lin et al. 2023's recipe: zero terminal SNR, trailing spacing, a v (or x0) network."""
    schedule = make_schedule("scaled_linear", zero_terminal_snr=True)
    config = dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    diff = compare(name, schedule, torch.float64, shared=True, prediction=prediction, **config)
    assert diff <= TOLERANCE, f"{name} {prediction}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedules_match_diffusers(kind: str, zero_snr: bool) -> None:
    betas = dict(beta_start=1e-4, beta_end=2e-2) if kind == "linear" else dict(beta_start=0.00085, beta_end=0.012)
    ours = make_schedule(kind, zero_terminal_snr=zero_snr, **betas)  # type: ignore[arg-type]
    theirs = DDPMScheduler(beta_schedule=DIFFUSERS_KIND[kind], rescale_betas_zero_snr=zero_snr, **betas)
    # diffusers computes in float32: alpha_bar agrees at float32 resolution
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=5e-5, atol=1e-7)
    if not zero_snr:
        torch.testing.assert_close(ours.betas.float(), theirs.betas, rtol=2e-6, atol=1e-9)
    else:  # the float32 round trip alpha_bar -> beta loses digits; run diffusers' formula in float64 instead
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

        plain = make_schedule(kind, **betas)  # type: ignore[arg-type]
        torch.testing.assert_close(ours.betas, rescale_zero_terminal_snr(plain.betas.clone()), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_set_timesteps(spacing: str) -> None:
    schedule = make_schedule("scaled_linear")
    classes = {DDPMScheduler: "ddim", DDIMScheduler: "ddim", DPMSolverMultistepScheduler: "dpmsolver"}
    if spacing != "linspace":  # diffusers' Euler keeps fractional linspace timesteps (float timesteps work here too)
        classes[EulerDiscreteScheduler] = "ddim"
    for steps in (*range(1, 101), 128, 160, 250, 333, 400, 999, 1000):  # 16 and 80 hit exact halves
        for offset in (0, 1) if spacing == "leading" else (0,):
            for cls, style in classes.items():
                scheduler = cls(timestep_spacing=spacing, steps_offset=offset)
                scheduler.set_timesteps(steps)
                theirs = scheduler.timesteps.long()
                if int(theirs.max()) > 999 or len(theirs.unique()) < len(theirs):
                    with pytest.raises(ValueError):  # diffusers returns t = 1000 or repeated timesteps
                        timesteps_for(schedule, steps, spacing, offset, style=style)  # type: ignore[arg-type]
                    continue
                ours = timesteps_for(schedule, steps, spacing, offset, style=style)  # type: ignore[arg-type]
                if len(theirs) != steps:  # diffusers' float arange overshoots (trailing, 61 steps) to t = -1
                    assert spacing == "trailing" and int(theirs[-1]) < 0 <= int(ours[-1])
                    continue
                assert torch.equal(ours, theirs), (cls.__name__, spacing, steps, offset)


def test_training_helpers_match_diffusers() -> None:
    schedule = make_schedule("scaled_linear")
    scheduler = DDPMScheduler(**SD)
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, CHANNELS, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 250, 600, 999])
    torch.testing.assert_close(q_sample(schedule, x0, t, noise), scheduler.add_noise(x0, noise, t))
    torch.testing.assert_close(training_target("v", x0, noise, schedule, t), scheduler.get_velocity(x0, noise, t))
    # min-SNR as diffusers' train_text_to_image.py computes it (--snr_gamma)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t)
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    for prediction, reference in (("epsilon", clipped / snr), ("v", clipped / (snr + 1))):
        torch.testing.assert_close(loss_weight("min_snr", schedule, t, 5.0, prediction=prediction), reference.float())


def test_img2img_timesteps_match_diffusers_rule() -> None:
    """diffusers' img2img pipelines keep timesteps[N - int(N * strength):]."""
    scheduler = DDIMScheduler(**SD)
    scheduler.set_timesteps(50)
    for strength in (0.3, 0.75, 1.0):
        kept = min(int(50 * strength), 50)
        assert torch.equal(img2img_timesteps(scheduler.timesteps, strength), scheduler.timesteps[50 - kept :])
