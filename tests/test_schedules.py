"""Noise schedules, the forward process, timesteps, and the training objectives (no peers needed here)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from diffusion.objectives import (
    Denoiser,
    DiffusionConfig,
    diffusion_loss,
    loss_weight,
    sample_timesteps,
    to_eps,
    to_x0,
    training_target,
)
from diffusion.schedules import (
    NoiseSchedule,
    expand_to,
    img2img_timesteps,
    make_schedule,
    q_sample,
    rescale_zero_terminal_snr,
    timesteps_for,
)

KINDS = ("linear", "scaled_linear", "cosine")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedule_tables_are_consistent(kind: str, zero_snr: bool) -> None:
    schedule = make_schedule(kind, zero_terminal_snr=zero_snr)
    alpha_bar = schedule.alphas_cumprod
    assert schedule.num_steps == 1000 and schedule.betas.dtype == torch.float64
    assert bool((alpha_bar[1:] < alpha_bar[:-1]).all()), "alpha_bar must decrease"
    torch.testing.assert_close(alpha_bar, torch.cumprod(1 - schedule.betas, 0))
    finite = alpha_bar > 0
    torch.testing.assert_close(schedule.sigmas[finite], ((1 - alpha_bar[finite]) / alpha_bar[finite]).sqrt())
    torch.testing.assert_close(schedule.log_snr[finite], -2 * schedule.sigmas[finite].log())
    if zero_snr:
        assert alpha_bar[-1].item() == 0.0 and schedule.betas[-1].item() == 1.0
        assert math.isinf(schedule.sigmas[-1].item()) and schedule.log_snr[-1].item() == -math.inf
        plain = make_schedule(kind)
        torch.testing.assert_close(alpha_bar[0], plain.alphas_cumprod[0])  # the first step is unchanged
    else:
        assert 0 < alpha_bar[-1].item() < 0.01


def test_schedule_formulas() -> None:
    linear = make_schedule("linear", beta_start=1e-4, beta_end=2e-2)
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(2e-2)
    scaled = make_schedule("scaled_linear")
    assert scaled.betas.sqrt()[1:].diff().std().item() < 1e-12, "scaled_linear: sqrt(beta) is linear"
    cosine = make_schedule("cosine", num_steps=50)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cosine.alphas_cumprod[20].item() == pytest.approx(f(21 / 50) / f(0), rel=1e-12)
    assert cosine.betas.max().item() <= 0.999
    with pytest.raises(ValueError, match="valid kinds"):
        make_schedule("squaredcos_cap_v2")  # type: ignore[arg-type]


def test_schedule_is_immutable_and_validated() -> None:
    schedule = make_schedule("linear", num_steps=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.betas = torch.ones(10)  # type: ignore[misc]
    assert "T=10" in repr(schedule)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(torch.ones(2, 2) * 0.1)


def test_rescale_zero_terminal_snr_keeps_first_and_zeroes_last() -> None:
    betas = make_schedule("scaled_linear").betas
    rescaled = rescale_zero_terminal_snr(betas)
    before, after = torch.cumprod(1 - betas, 0), torch.cumprod(1 - rescaled, 0)
    assert after[0].item() == pytest.approx(before[0].item(), rel=1e-12) and after[-1].item() == 0.0
    # sqrt(alpha_bar) is an affine map of the original one (Lin et al. 2023, Alg. 1)
    slope = (after.sqrt()[1:] - after.sqrt()[:-1]) / (before.sqrt()[1:] - before.sqrt()[:-1])
    assert slope.std().item() < 1e-9


def test_alpha_bar_lookup_int_float_and_range() -> None:
    schedule = make_schedule("scaled_linear")
    t = torch.tensor([0, 10, 999])
    torch.testing.assert_close(schedule.alpha_bar(t), schedule.alphas_cumprod[t])
    assert torch.equal(schedule.alpha_bar(t.float()), schedule.alphas_cumprod[t]), "integral floats are exact"
    sigma = 0.25 * schedule.sigmas[10] + 0.75 * schedule.sigmas[11]  # linear interpolation of sigma
    assert schedule.alpha_bar(torch.tensor(10.75)).item() == pytest.approx(1 / (1 + sigma.item() ** 2), rel=1e-12)
    for bad in (torch.tensor([-1]), torch.tensor([1000]), torch.tensor([999.5])):
        with pytest.raises(ValueError, match="must lie in"):
            schedule.alpha_bar(bad)
    assert schedule.snr(torch.tensor([5])).item() == pytest.approx(math.exp(schedule.log_snr[5].item()))


def test_q_sample_closed_form_and_statistics() -> None:
    schedule = make_schedule("linear", beta_start=1e-4, beta_end=2e-2)
    generator = torch.Generator().manual_seed(0)
    x0 = 0.5 + 2.0 * torch.randn(4, 3, 32, 32, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0, 100, 500, 999])
    x_t = q_sample(schedule, x0, t, noise)
    alpha_bar = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise)
    # the marginal of q(x_t | x0) with x0 ~ N(0.5, 4): mean sqrt(ab) 0.5, variance 4 ab + 1 - ab
    std = (4 * alpha_bar + 1 - alpha_bar).sqrt().flatten()
    torch.testing.assert_close(x_t.flatten(1).std(1), std, rtol=0.05, atol=0)
    assert x_t.dtype == x0.dtype
    assert expand_to(torch.tensor([1.0, 2.0], dtype=torch.float64), x0[:2]).shape == (2, 1, 1, 1)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("style", ["ddim", "dpmsolver"])
def test_timesteps_are_descending_and_in_range(spacing: str, style: str) -> None:
    schedule = make_schedule("scaled_linear")
    for steps in (1, 7, 20, 61, 500):
        timesteps = timesteps_for(schedule, steps, spacing, style=style)  # type: ignore[arg-type]
        assert timesteps.dtype == torch.int64 and len(timesteps) == steps
        assert bool((timesteps[1:] < timesteps[:-1]).all()) and 0 <= timesteps.min() and timesteps.max() <= 999
    assert timesteps_for(schedule, 10, "trailing")[0].item() == 999, "trailing starts at T-1"
    assert timesteps_for(schedule, 10, "leading", 1)[-1].item() == 1


def test_timesteps_errors() -> None:
    schedule = make_schedule("linear", num_steps=100)
    with pytest.raises(ValueError, match="steps must be"):
        timesteps_for(schedule, 0, "leading")
    with pytest.raises(ValueError, match="only applies to 'leading'"):
        timesteps_for(schedule, 10, "trailing", 1)
    with pytest.raises(ValueError, match="repeat timesteps"):
        timesteps_for(schedule, 100, "linspace", style="dpmsolver")
    with pytest.raises(ValueError, match="valid spacings"):
        timesteps_for(schedule, 10, "uniform")  # type: ignore[arg-type]


def test_img2img_timesteps_keep_the_tail() -> None:
    timesteps = timesteps_for(make_schedule("linear"), 50, "leading")
    assert torch.equal(img2img_timesteps(timesteps, 1.0), timesteps)
    assert torch.equal(img2img_timesteps(timesteps, 0.3), timesteps[-15:])
    with pytest.raises(ValueError, match="keeps none"):
        img2img_timesteps(timesteps, 0.01)


# --- objectives ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["epsilon", "x0", "v"])
def test_targets_and_conversions_round_trip(kind: str) -> None:
    schedule = make_schedule("scaled_linear")
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    x_t = q_sample(schedule, x0, t, noise)
    target = training_target(kind, x0, noise, schedule, t)  # type: ignore[arg-type]
    torch.testing.assert_close(to_x0(kind, target, x_t, schedule, t), x0)  # type: ignore[arg-type]
    torch.testing.assert_close(to_eps(kind, target, x_t, schedule, t), noise)  # type: ignore[arg-type]
    if kind == "v":
        a = schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        torch.testing.assert_close(target, a * noise - (1 - a**2).sqrt() * x0)
    with pytest.raises(ValueError, match="valid types"):
        training_target("sample", x0, noise, schedule, t)  # type: ignore[arg-type]


def test_min_snr_weights_per_prediction() -> None:
    schedule = make_schedule("scaled_linear", zero_terminal_snr=True)
    t = torch.tensor([0, 100, 300, 999])
    snr = schedule.snr(t)
    gamma = 5.0
    clipped = snr.clamp(max=gamma)
    eps = loss_weight("min_snr", schedule, t, gamma, prediction="epsilon")
    torch.testing.assert_close(eps[:3], (clipped / snr)[:3].float())
    assert eps[-1].item() == 1.0, "the epsilon weight tends to 1 at zero SNR"
    torch.testing.assert_close(loss_weight("min_snr", schedule, t, gamma, prediction="x0"), clipped.float())
    v_weight = loss_weight("min_snr", schedule, t, gamma, prediction="v")
    torch.testing.assert_close(v_weight, (clipped / (snr + 1)).float())
    assert torch.equal(loss_weight("none", schedule, t), torch.ones(4))
    # min-SNR is the same x0-space weight whatever the parameterization (Hang et al. 2023)
    x0_weight = lambda p, factor: loss_weight("min_snr", schedule, t[:3], gamma, prediction=p) * factor  # noqa: E731
    torch.testing.assert_close(x0_weight("epsilon", snr[:3].float()), x0_weight("x0", 1.0))
    torch.testing.assert_close(x0_weight("v", (snr[:3] + 1).float()), x0_weight("x0", 1.0))
    with pytest.raises(ValueError, match="valid weightings"):
        loss_weight("p2", schedule, t)  # type: ignore[arg-type]


def test_diffusion_loss_is_weighted_per_sample_mse() -> None:
    output, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    target[1] *= 2
    torch.testing.assert_close(diffusion_loss(output, target), torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(diffusion_loss(output, target, torch.tensor([0.5, 2.0])), torch.tensor([0.5, 8.0]))
    assert diffusion_loss(output.bfloat16(), target.bfloat16()).dtype == torch.float32


def test_denoiser_wraps_each_prediction_in_fp32() -> None:
    schedule = make_schedule("linear", beta_start=1e-4, beta_end=2e-2)
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([50.0, 700.0])
    x_t = q_sample(schedule, x0, t, noise)
    for kind in ("epsilon", "x0", "v"):
        oracle = lambda x, tt, scale=1.0: (training_target(kind, x0, noise, schedule, tt) * scale).bfloat16()  # noqa: B023,E731
        x0_hat = Denoiser(oracle, schedule, kind)(x_t, t, scale=1.0)  # type: ignore[arg-type]
        assert x0_hat.dtype == torch.float32
        torch.testing.assert_close(x0_hat, x0, atol=0.1, rtol=0.02)  # bf16 network output, fp32 conversion
    with pytest.raises(ValueError, match="valid types"):
        Denoiser(lambda x, t: x, schedule, "sample")  # type: ignore[arg-type]


def test_timestep_bias_one_is_the_uniform_draw_and_two_favours_noisy_timesteps() -> None:
    torch.manual_seed(0)
    uniform = sample_timesteps(64, 1000, 1.0, "cpu")
    torch.manual_seed(0)
    assert torch.equal(uniform, torch.randint(0, 1000, (64,))), "bias 1 must keep the random stream of old runs"
    for bias in (2.0, 3.0, 0.5):
        t = sample_timesteps(200_000, 1000, bias, "cpu")
        assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
        fraction = (t + 0.5) / 1000  # t/T ~ Beta(bias, 1): mean bias / (bias + 1), P(t/T < x) = x^bias
        assert fraction.mean().item() == pytest.approx(bias / (bias + 1), abs=3e-3)
        assert (t < 500).float().mean().item() == pytest.approx(0.5 ** bias, abs=3e-3)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="timestep_bias must be a finite number > 0"):
            DiffusionConfig(timestep_bias=bad)
