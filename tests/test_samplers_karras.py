"""Karras / exponential sigma spacings and UniPC: parity with diffusers, behaviour, and the front door.

Both sides run a fixed random network (as in ``test_sampler_parity``) from the same latent, diffusers with
our float64 ``alphas_cumprod`` ("shared") unless said otherwise. Measured max |ours - diffusers| over
the final latents at 5, 10 and 20 steps, epsilon and v networks:

    UniPC bh2, orders 1-3, model timestep spacing:        3e-7 (diffusers computes in float32)
    Karras / exponential sigmas: DPM-Solver++(2M) 1.3e-6, UniPC 5e-7, Euler 3.1e-6
    UniPC as shipped (diffusers' float32 schedule):        1.7e-6

Network time: diffusers' DPM-Solver and UniPC call the network at the sigma's timestep rounded (Karras)
or truncated (exponential) and convert its output at the unrounded sigma; we call it at the exact float
timestep of that sigma. So that one network is compared, our side maps its timestep to the one
diffusers used at that step; without the map the results differ by the rounding's effect (up to 3e-3
here, ``test_network_time_is_the_only_difference``). Euler keeps float timesteps in diffusers too and
needs no map.
"""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

from diffusion.objectives import Denoiser
from diffusion.samplers import SIGMA_SPACING_SAMPLERS, get_sampler, sample_unipc
from diffusion.schedules import (
    karras_sigmas,
    make_schedule,
    sigma_timesteps,
    timestep_of_sigma,
    timesteps_for,
)
from pipelines.options import GenerationOptions, check_options

diffusers = pytest.importorskip("diffusers")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

TOLERANCE = 1e-5  # well inside the 1e-4 asked for; the measured differences are in the module docstring
SCHEDULE = make_schedule("scaled_linear")
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}
_weights = torch.Generator().manual_seed(321)
MIX = torch.randn(4, 4, generator=_weights, dtype=torch.float64) * 0.4
BIAS = torch.randn(4, generator=_weights, dtype=torch.float64)


def eps_model(x: Tensor, t: Tensor | float) -> Tensor:
    """A fixed random non-linear network of (x, t) over 4 channels; t is a scalar (diffusers) or (B,) (ours).

    Channel mixing by broadcasting plus a spatial shift (no BLAS call, which crawls on busy cores); its
    output moves by about 1e-3 per training timestep, so a network time off by 0.5 shows.
    """
    t = torch.as_tensor(t).to(x.dtype).reshape(-1, 1, 1, 1)
    mixed = (MIX.to(x.dtype)[None, :, :, None, None] * x[:, None]).sum(2) + 0.5 * x.roll(1, dims=-2)
    return 0.8 * x + 0.3 * torch.tanh(mixed + BIAS.to(x.dtype).view(1, -1, 1, 1) * torch.sin(t / 120))


def start(dtype: torch.dtype) -> Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)


def noise(seed: int = 0) -> Tensor:
    return torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gaussian_denoiser(mu: float = 0.3, std: float = 0.5):
    """The exact x0 denoiser for data ~ N(mu, std^2): E[x0 | x_t] is linear in x_t for Gaussian data."""

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        alpha_bar = SCHEDULE.alpha_bar(t).to(x).view(-1, 1, 1, 1)
        a = alpha_bar.sqrt()
        return mu + a * std**2 / (alpha_bar * std**2 + 1 - alpha_bar) * (x - a * mu)

    return denoise
SCHEDULERS = {  # our sampler name: diffusers' scheduler with the matching settings
    "dpmpp_2m": lambda **kw: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **kw),
    "unipc": lambda **kw: UniPCMultistepScheduler(solver_type="bh2", **kw),
    "euler": lambda **kw: EulerDiscreteScheduler(**kw),
}
SPACING_FLAGS = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}


def run_diffusers(scheduler: Any, steps: int, x: Tensor) -> Tensor:
    """The usual denoising loop; Euler works on x * sqrt(1 + sigma^2), i.e. x / sqrt(alpha_bar)."""
    scheduler.set_timesteps(steps)
    euler = isinstance(scheduler, EulerDiscreteScheduler)
    sample = x * (scheduler.sigmas[0].double() ** 2 + 1).sqrt().to(x.dtype) if euler else x.clone()
    for t in scheduler.timesteps:
        sample = scheduler.step(eps_model(scheduler.scale_model_input(sample, t), t), t, sample).prev_sample
    return sample


def network_at(ours: Tensor, theirs: Tensor):
    """The test network, called at the timestep diffusers used at the step whose timestep is ours."""
    keys, values = ours.float(), theirs.double()

    def net(x: Tensor, t: Tensor) -> Tensor:
        return eps_model(x, values[(t[:, None] - keys[None]).abs().argmin(1)])

    return net


def compare(name: str, steps: int, spacing: str = "default", prediction: str = "epsilon", shared: bool = True,
            map_time: bool = True, **config: Any) -> float:
    """Run ``name`` with ``spacing`` on both sides and return max |ours - diffusers|."""
    scheduler = SCHEDULERS[name](prediction_type=PREDICTION[prediction], **SPACING_FLAGS.get(spacing, {}), **SD,
                                 **config)
    if shared:
        scheduler.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    x = start(torch.float64 if shared else torch.float32)
    theirs = run_diffusers(scheduler, steps, x)
    if spacing == "default":
        timesteps = timesteps_for(SCHEDULE, steps, "linspace", style="dpmsolver")
        assert torch.equal(timesteps, scheduler.timesteps), "timesteps_for must reproduce set_timesteps"
    else:
        timesteps = sigma_timesteps(SCHEDULE, steps, spacing)  # type: ignore[arg-type]
        alpha_bar = SCHEDULE.alpha_bar(timesteps)  # the same noise levels, to diffusers' float32 rounding
        torch.testing.assert_close(((1 - alpha_bar) / alpha_bar).sqrt(), scheduler.sigmas[:-1].double(), rtol=2e-7,
                                   atol=0)
    net = network_at(timesteps, scheduler.timesteps) if map_time else eps_model
    ours = get_sampler(name)(Denoiser(net, SCHEDULE, prediction), x, SCHEDULE, timesteps,  # type: ignore[arg-type]
                             **({"order": config["solver_order"]} if "solver_order" in config else {}))
    assert ours.dtype == theirs.dtype
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_diffusers(order: int, steps: int, prediction: str) -> None:
    diff = compare("unipc", steps, prediction=prediction, solver_order=order)
    assert diff <= TOLERANCE, f"UniPC order {order}, {steps} steps, {prediction}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_unipc_as_shipped_float32(steps: int) -> None:
    diff = compare("unipc", steps, shared=False, solver_order=3)
    assert diff <= TOLERANCE, f"max abs diff {diff:.3g}"


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
@pytest.mark.parametrize("name", sorted(SIGMA_SPACING_SAMPLERS))
def test_sigma_spacings_match_diffusers(name: str, spacing: str, steps: int, prediction: str) -> None:
    config = {"solver_order": 3} if name == "unipc" and steps == 20 else {}
    diff = compare(name, steps, spacing, prediction, map_time=name != "euler", **config)
    assert diff <= TOLERANCE, f"{name} {spacing} {steps} steps {prediction}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_network_time_is_the_only_difference(spacing: str) -> None:
    """Unmapped, our exact float timesteps against diffusers' rounded ones: a small, bounded difference."""
    scheduler = DPMSolverMultistepScheduler(**SPACING_FLAGS[spacing], **SD)
    scheduler.set_timesteps(10)
    ours = sigma_timesteps(SCHEDULE, 10, spacing)  # type: ignore[arg-type]
    rounding = (ours - scheduler.timesteps.double()).abs().max().item()
    # rounded / truncated to integers (truncation turns the float32 sigma_max's 998.99997 into 998)
    assert 0 < rounding <= (0.5 if spacing == "karras" else 1.0) + 1e-6
    diff = compare("dpmpp_2m", 10, spacing, map_time=False)
    assert 1e-5 < diff < 5e-3, f"{spacing}: {diff:.3g}"


def test_sigma_timesteps_span_the_schedule() -> None:
    for spacing in ("karras", "exponential"):
        timesteps = sigma_timesteps(SCHEDULE, 12, spacing)  # type: ignore[arg-type]
        assert timesteps.dtype == torch.float64 and timesteps[0] == 999 and timesteps[-1] == 0
        assert bool((timesteps[1:] < timesteps[:-1]).all())
        alpha_bar = SCHEDULE.alpha_bar(timesteps)
        sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()
        torch.testing.assert_close(timestep_of_sigma(SCHEDULE, sigmas), timesteps, rtol=0, atol=1e-9)
    assert sigma_timesteps(SCHEDULE, 1, "karras").tolist() == [999.0]
    log_steps = karras_sigmas(0.03, 15.0, 10).log().diff()  # rho = 7: short log-sigma steps at high noise
    assert bool((log_steps[1:] < log_steps[:-1]).all()) and bool((log_steps < 0).all())


def test_sigma_spacing_refusals() -> None:
    with pytest.raises(ValueError, match="zero-terminal-SNR.*trailing"):
        sigma_timesteps(make_schedule("scaled_linear", zero_terminal_snr=True), 10, "karras")
    with pytest.raises(ValueError, match="unknown sigma spacing 'kras'"):
        sigma_timesteps(SCHEDULE, 10, "kras")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"steps must be a whole number in \[1, 1000\]"):
        sigma_timesteps(SCHEDULE, 0, "karras")
    with pytest.raises(ValueError, match="range"):
        timestep_of_sigma(SCHEDULE, torch.tensor([100.0]))
    with pytest.raises(ValueError, match="UniPC order must be 1, 2 or 3"):
        sample_unipc(gaussian_denoiser(), noise(), SCHEDULE, torch.tensor([500, 0]), order=4)


def ode_error(name: str, timesteps: Tensor, **options: Any) -> float:
    """Mean |sampler - the exact probability-flow ODE solution| for data ~ N(0.5, 1), from the same noise.

    For Gaussian data y = x / a moves as y - mu ~ sqrt(s^2 + sigma^2): x0 = mu + (y_T - mu) s / sqrt(s^2 + sigma_T^2).
    """
    mu, std, x = 0.5, 1.0, noise(3)
    alpha_bar = SCHEDULE.alpha_bar(timesteps[:1]).item()
    exact = mu + (x / alpha_bar**0.5 - mu) * std / (std**2 + (1 - alpha_bar) / alpha_bar) ** 0.5
    out = get_sampler(name)(gaussian_denoiser(mu, std), x, SCHEDULE, timesteps, **options)
    return (out - exact).abs().mean().item()


@pytest.mark.parametrize("steps", [15, 20])
def test_unipc_converges_faster_on_karras_sigmas(steps: int) -> None:
    """Where the last model call is at sigma_min, the corrector and the third order pay off (at 5-8 steps the
    third order's extrapolation over long steps does not: diffusers advises order 2 for guided sampling)."""
    timesteps = sigma_timesteps(SCHEDULE, steps, "karras")
    dpm, unipc2, unipc3 = (ode_error("dpmpp_2m", timesteps), ode_error("unipc", timesteps),
                           ode_error("unipc", timesteps, order=3))
    assert unipc2 < 0.7 * dpm and unipc3 < 0.6 * unipc2, f"DPM++ 2M {dpm:.2e}, UniPC-2 {unipc2:.2e}, -3 {unipc3:.2e}"
    assert unipc3 < 5e-3


def test_the_option_reaches_the_sampler_and_is_refused_elsewhere() -> None:
    options = check_options(GenerationOptions(sampler="unipc", sigma_spacing="karras"))
    assert options.sampler_options() == {"sigma_spacing": "karras"}
    assert GenerationOptions(sampler="ddim", eta=1.0).sampler_options() == {"eta": 1.0}  # no spacing for DDIM
    with pytest.raises(ValueError, match="sigma_spacing='karras' is an option of samplers 'dpmpp_2m', 'euler', "
                                         "'unipc', and the sampler is 'ddim'"):
        check_options(GenerationOptions(sampler="ddim", sigma_spacing="karras"))
    with pytest.raises(ValueError, match="sigma_spacing must be one of 'default', 'karras', 'exponential'"):
        check_options(GenerationOptions(sigma_spacing="Karras"))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pytest.importorskip("transformers")
    from pipelines import TextToImage
    from tiny import build_pipelines

    return TextToImage.from_pretrained(build_pipelines(tmp_path_factory.mktemp("karras"))["text"])


@pytest.mark.usefixtures("one_thread")
def test_pipeline_samples_on_karras_sigmas(pipe) -> None:
    """Through the front door: the spacing changes the images, stays seeded, and is refused for DDPM."""
    seen: list[float] = []
    run = dict(num_inference_steps=6, sampler="unipc", seed=0, progress=False, output_type="latent")
    karras = pipe("a red circle", sigma_spacing="karras", callback=lambda i, x, x0: seen.append(i), **run).images
    assert seen == list(range(6))
    assert torch.equal(karras, pipe("a red circle", sigma_spacing="karras", **run).images)
    assert not torch.allclose(karras, pipe("a red circle", **run).images)
    assert pipe.model.timesteps(6, "unipc", "karras")[0] == pipe.model.schedule.num_steps - 1
    with pytest.raises(ValueError, match="DDPM and DDIM step on the training timestep grid"):
        pipe.model.timesteps(6, "ddpm", "exponential")
    with pytest.raises(ValueError, match="is an option of samplers"):
        pipe("a red circle", sigma_spacing="karras", **{**run, "sampler": "ddpm"})


@pytest.mark.usefixtures("one_thread")
def test_image_to_image_on_exponential_sigmas(pipe) -> None:
    """img2img keeps the tail of the float timesteps and noises the input to the first kept one."""
    from pipelines import ImageToImage

    seen: list[int] = []
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    edit = ImageToImage.from_pipe(pipe)
    run = dict(strength=0.5, num_inference_steps=6, sampler="dpmpp_2m", seed=0, progress=False, output_type="pt")
    out = edit("a dog", image, sigma_spacing="exponential", callback=lambda i, *tensors: seen.append(i), **run).images
    assert seen == [0, 1, 2] and bool(out.isfinite().all())
    assert not torch.allclose(out, edit("a dog", image, **run).images)
