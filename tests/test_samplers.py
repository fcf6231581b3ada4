"""Sampler behaviour on problems with an exact denoiser: data ~ N(mu, s^2) per dimension.

For Gaussian data the posterior mean is linear in x_t:
E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + 1 - a^2) (x_t - a mu), with a = sqrt(alpha_bar_t).
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from diffusion.samplers import (
    SAMPLERS,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
)
from diffusion.schedules import NoiseSchedule, img2img_timesteps, make_schedule, q_sample, timesteps_for

MU, STD = 0.3, 0.5
SHAPE = (1, 1, 64, 64)  # 4096 independent one-dimensional samples
SCHEDULE = make_schedule("scaled_linear")


def gaussian_denoiser(schedule: NoiseSchedule, mu: float = MU, std: float = STD) -> Callable[..., Tensor]:
    """The exact x0 denoiser for data ~ N(mu, std^2); it is defined at zero SNR too."""

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        alpha_bar = schedule.alpha_bar(t).to(x).view(-1, 1, 1, 1)
        a = alpha_bar.sqrt()
        return mu + a * std**2 / (alpha_bar * std**2 + 1 - alpha_bar) * (x - a * mu)

    return denoise


def noise(seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def run(name: str, schedule: NoiseSchedule, timesteps: Tensor, seed: int = 0, **options: float) -> Tensor:
    sampler, generator = get_sampler(name), torch.Generator().manual_seed(seed + 1)
    return sampler(gaussian_denoiser(schedule), noise(seed), schedule, timesteps, generator=generator, **options)


def steps_for(name: str, schedule: NoiseSchedule, spacing: str = "linspace") -> Tensor:
    """DDPM needs the full chain; the ODE samplers get 50 steps in their diffusers style."""
    if name == "ddpm":
        return timesteps_for(schedule, 1000, spacing)  # type: ignore[arg-type]
    style = "dpmsolver" if name in ("dpmpp_2m", "unipc") else "ddim"
    return timesteps_for(schedule, 50, spacing, style=style)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samples_have_the_data_moments(name: str) -> None:
    sample = run(name, SCHEDULE, steps_for(name, SCHEDULE), eta=0.0) if name == "ddim" else run(
        name, SCHEDULE, steps_for(name, SCHEDULE)
    )
    assert sample.mean().item() == pytest.approx(MU, abs=0.03)
    # first-order solvers with 50 steps shrink the std by about 4 %; DDPM with 1000 steps by about 1 %
    assert sample.std().item() == pytest.approx(STD, rel=0.06)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_zero_terminal_snr_with_trailing_spacing(name: str) -> None:
    schedule = make_schedule("scaled_linear", zero_terminal_snr=True)
    timesteps = steps_for(name, schedule, "trailing")
    assert timesteps[0].item() == 999 and schedule.alpha_bar(timesteps[:1]).item() == 0.0
    sample = run(name, schedule, timesteps)
    assert bool(sample.isfinite().all())
    assert sample.mean().item() == pytest.approx(MU, abs=0.03)
    assert sample.std().item() == pytest.approx(STD, rel=0.08)


def test_ddim_eta_one_is_stochastic_and_right() -> None:
    sample = run("ddim", SCHEDULE, timesteps_for(SCHEDULE, 200, "leading"), eta=1.0)
    assert sample.mean().item() == pytest.approx(MU, abs=0.03)
    assert sample.std().item() == pytest.approx(STD, rel=0.06)
    with pytest.raises(ValueError, match="eta"):
        run("ddim", SCHEDULE, timesteps_for(SCHEDULE, 5, "leading"), eta=-1.0)


def test_ddim_final_alpha_bar_ends_one_step_short_of_clean() -> None:
    """final_alpha_bar (diffusers' set_alpha_to_one=False) makes the last step a DDIM step to that noise level:
    the result is the clean one plus sqrt(1 - final) of the predicted noise, exactly as a DDIM step."""
    timesteps = timesteps_for(SCHEDULE, 20, "leading", 1)
    clean = run("ddim", SCHEDULE, timesteps)
    final = float(SCHEDULE.alpha_bar(0))
    noisy = run("ddim", SCHEDULE, timesteps, final_alpha_bar=final)
    assert 0 < (noisy - clean).abs().max().item() < 0.1 and torch.equal(run("ddim", SCHEDULE, timesteps), clean)
    assert torch.equal(run("ddim", SCHEDULE, timesteps, final_alpha_bar=1.0), clean)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="final_alpha_bar"):
            run("ddim", SCHEDULE, timesteps, final_alpha_bar=bad)


def test_dpmpp_2m_20_steps_is_close_to_ddim_500() -> None:
    """Regression guard for the second-order update (and for residual noise at the end, DF#5689)."""
    denoise = gaussian_denoiser(SCHEDULE, mu=0.5, std=1.0)
    x = noise(3)
    reference = sample_ddim(denoise, x, SCHEDULE, timesteps_for(SCHEDULE, 500, "linspace"))
    dpm = sample_dpmpp_2m(denoise, x, SCHEDULE, timesteps_for(SCHEDULE, 20, "linspace", style="dpmsolver"))
    ddim = sample_ddim(denoise, x, SCHEDULE, timesteps_for(SCHEDULE, 20, "linspace", style="dpmsolver"))
    dpm_error, ddim_error = (dpm - reference).abs().mean().item(), (ddim - reference).abs().mean().item()
    assert dpm_error < 0.02, f"DPM-Solver++ 20 steps is {dpm_error:.4f} from DDIM 500 steps"
    assert dpm_error < 0.4 * ddim_error, f"2nd order must beat DDIM at 20 steps: {dpm_error:.4f} vs {ddim_error:.4f}"


def test_euler_equals_ddim_on_the_same_timesteps() -> None:
    """With an x0 denoiser, Euler in sigma space and DDIM (eta = 0) are the same integrator."""
    timesteps = timesteps_for(SCHEDULE, 25, "trailing")
    denoise = gaussian_denoiser(SCHEDULE)
    euler = sample_euler(denoise, noise(), SCHEDULE, timesteps)
    torch.testing.assert_close(euler, sample_ddim(denoise, noise(), SCHEDULE, timesteps), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_generator_determinism(name: str) -> None:
    options = {"eta": 1.0} if name == "ddim" else {}
    timesteps = timesteps_for(SCHEDULE, 20, "leading")
    first, again = run(name, SCHEDULE, timesteps, seed=5, **options), run(name, SCHEDULE, timesteps, seed=5, **options)
    assert torch.equal(first, again)
    denoise, x = gaussian_denoiser(SCHEDULE), noise(5)
    other = get_sampler(name)(denoise, x, SCHEDULE, timesteps, generator=torch.Generator().manual_seed(99), **options)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_ends_at_zero_noise(name: str) -> None:
    seen: list[tuple[int, Tensor, Tensor]] = []
    timesteps = timesteps_for(SCHEDULE, 8, "trailing")
    denoise = gaussian_denoiser(SCHEDULE)
    out = get_sampler(name)(
        denoise, noise(), SCHEDULE, timesteps, generator=torch.Generator().manual_seed(0),
        callback=lambda i, x_t, x0_hat: seen.append((i, x_t, x0_hat)),
    )
    assert [i for i, _, _ in seen] == list(range(8))
    assert torch.equal(out, seen[-1][2]), "the output must be the last x0 estimate, with no noise left"
    torch.testing.assert_close(seen[0][1], noise())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_img2img_starts_at_a_later_timestep(name: str) -> None:
    """Noise data to a later timestep and run the tail: the distribution is kept; low strength stays close."""
    full = steps_for(name, SCHEDULE)
    generator = torch.Generator().manual_seed(7)
    x0 = MU + STD * torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    change = {}
    for strength in (0.6, 0.05):
        tail = img2img_timesteps(full, strength)
        x_start = q_sample(SCHEDULE, x0, tail[:1], torch.randn(SHAPE, generator=generator, dtype=torch.float64))
        out = get_sampler(name)(gaussian_denoiser(SCHEDULE), x_start, SCHEDULE, tail, generator=generator)
        assert out.mean().item() == pytest.approx(MU, abs=0.03)
        assert out.std().item() == pytest.approx(STD, rel=0.06)
        change[strength] = (out - x0).abs().mean().item()
    assert change[0.05] < 0.5 * change[0.6], f"low strength should stay close to the input: {change}"


def test_registry_and_validation() -> None:
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp_2m", "euler", "unipc"} and get_sampler("ddpm") is sample_ddpm
    with pytest.raises(ValueError, match="ddim, ddpm, dpmpp_2m, euler, unipc"):
        get_sampler("plms")
    with pytest.raises(ValueError, match="strictly descending"):
        sample_ddim(gaussian_denoiser(SCHEDULE), noise(), SCHEDULE, torch.tensor([10, 20]))
    with pytest.raises(ValueError, match="non-empty"):
        sample_ddim(gaussian_denoiser(SCHEDULE), noise(), SCHEDULE, torch.tensor([], dtype=torch.long))
    with pytest.raises(TypeError):
        sample_euler(gaussian_denoiser(SCHEDULE), noise(), SCHEDULE, torch.tensor([10]), eta=0.5)  # type: ignore[call-arg]


def test_dtypes_cond_and_float_timesteps() -> None:
    """Low-precision latents are integrated in fp32 and returned in their dtype; cond reaches the denoiser."""
    calls: list[dict] = []

    def denoise(x: Tensor, t: Tensor, **cond: Tensor | None) -> Tensor:
        calls.append(cond)
        assert x.dtype == torch.float32 and t.dtype == torch.float32 and t.shape == (x.shape[0],)
        return gaussian_denoiser(SCHEDULE)(x, t)

    x = noise(dtype=torch.float32).bfloat16()
    timesteps = torch.linspace(999, 0, 12)  # fractional timesteps, as diffusers' Euler linspace uses
    out = sample_dpmpp_2m(denoise, x, SCHEDULE, timesteps, cond={"context": torch.ones(1, 2), "mask": None})
    assert out.dtype == torch.bfloat16 and len(calls) == 12 and calls[0]["mask"] is None
