"""Guidance wrappers: classifier-free (batched, rescaled), classifier guidance, inpainting."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from diffusion.guidance import classifier_free, classifier_guided, inpainting
from diffusion.objectives import Denoiser, to_eps
from diffusion.samplers import SAMPLERS, get_sampler, sample_ddim
from diffusion.schedules import NoiseSchedule, make_schedule, timesteps_for

SCHEDULE = make_schedule("scaled_linear")


class CountingDenoiser:
    """A toy conditional x0 denoiser: data ~ N(shift, 0.5^2) where ``shift`` (B, 1) is the condition."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule
        self.batches: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, shift: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
        self.batches.append(x.shape[0])
        mu = torch.zeros(x.shape[0], 1, 1, 1, dtype=x.dtype) if shift is None else shift.to(x).view(-1, 1, 1, 1)
        alpha_bar = self.schedule.alpha_bar(t).to(x).view(-1, 1, 1, 1)
        a = alpha_bar.sqrt()
        x0 = mu + a * 0.25 / (alpha_bar * 0.25 + 1 - alpha_bar) * (x - a * mu)
        # a non-affine part whose size depends on the condition, so that guidance changes the std
        return x0 * (1.5 if extra is not None else 1.0) + 0.1 * (1 + mu) * torch.tanh(x)


def inputs(batch: int = 2) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 8, 8, generator=generator, dtype=torch.float64), torch.tensor([700.0] * batch)


COND = {"shift": torch.tensor([[1.0], [2.0]]), "extra": None}
UNCOND = {"shift": torch.tensor([[0.0], [0.0]]), "extra": None}


def test_cfg_scale_one_and_zero_run_one_branch() -> None:
    denoiser = CountingDenoiser(SCHEDULE)
    x, t = inputs()
    torch.testing.assert_close(classifier_free(denoiser, COND, UNCOND, 1.0)(x, t), denoiser(x, t, **COND))
    torch.testing.assert_close(classifier_free(denoiser, COND, UNCOND, 0.0)(x, t), denoiser(x, t, **UNCOND))
    assert denoiser.batches == [2, 2, 2, 2], "scale 1 and 0 must skip the other half"


def test_cfg_is_one_batched_call_matching_the_formula() -> None:
    denoiser = CountingDenoiser(SCHEDULE)
    x, t = inputs()
    guided = classifier_free(denoiser, COND, UNCOND, 4.0)(x, t)
    assert denoiser.batches == [4]
    cond, uncond = denoiser(x, t, **COND), denoiser(x, t, **UNCOND)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond))
    # a sampler run calls the network once per step, with both halves in one batch
    denoiser.batches.clear()
    timesteps = timesteps_for(SCHEDULE, 7, "trailing")
    sample_ddim(classifier_free(denoiser, COND, UNCOND, 4.0), x, SCHEDULE, timesteps)
    assert denoiser.batches == [4] * 7


def test_cfg_in_x0_space_equals_cfg_in_eps_space() -> None:
    """For a fixed x_t, eps is affine in x0, so guiding x0 equals guiding the network's eps."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(3, 3, generator=generator, dtype=torch.float64) * 0.3

    def eps_net(x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        assert label.shape[0] == x.shape[0], "conditioning must arrive with the batch of x"
        mixed = (weight[None, :, :, None, None] * x[:, None]).sum(2)  # channel mixing without a BLAS call
        return torch.tanh(mixed + label.view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000)

    x, t = inputs()
    cond, uncond = {"label": torch.tensor([1.0, 2.0])}, {"label": torch.tensor([0.0])}  # batch-1 uncond broadcasts
    guided = classifier_free(Denoiser(eps_net, SCHEDULE, "epsilon"), cond, uncond, 7.5)(x, t)
    eps_c, eps_u = eps_net(x, t, cond["label"]), eps_net(x, t, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(to_eps("x0", guided, x, SCHEDULE, t), eps_u + 7.5 * (eps_c - eps_u))
    unconditional = classifier_free(Denoiser(eps_net, SCHEDULE, "epsilon"), cond, uncond, 0.0)(x, t)
    torch.testing.assert_close(to_eps("x0", unconditional, x, SCHEDULE, t), eps_u)  # broadcast at scale 0 too


def test_cfg_rescale() -> None:
    denoiser = CountingDenoiser(SCHEDULE)
    x, t = inputs()
    plain = classifier_free(denoiser, COND, UNCOND, 6.0)(x, t)
    torch.testing.assert_close(classifier_free(denoiser, COND, UNCOND, 6.0, rescale=0.0)(x, t), plain)
    full = classifier_free(denoiser, COND, UNCOND, 6.0, rescale=1.0)(x, t)
    cond_std = denoiser(x, t, **COND).flatten(1).std(1)
    assert not torch.allclose(plain.flatten(1).std(1), cond_std)
    torch.testing.assert_close(full.flatten(1).std(1), cond_std)
    half = classifier_free(denoiser, COND, UNCOND, 6.0, rescale=0.5)(x, t)
    torch.testing.assert_close(half, 0.5 * (plain + full))
    with pytest.raises(ValueError, match=r"rescale must be in \[0, 1\].*got 2.0"):
        classifier_free(denoiser, COND, UNCOND, 6.0, rescale=2.0)
    with pytest.raises(ValueError, match=r"rescale must be in \[0, 1\].*got nan"):
        classifier_free(denoiser, COND, UNCOND, 6.0, rescale=float("nan"))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_cfg_refuses_a_non_finite_scale_up_front(scale) -> None:
    with pytest.raises(ValueError, match=f"guidance scale must be a finite number .*got {scale}"):
        classifier_free(lambda *a, **k: pytest.fail("the denoiser must not run"), COND, UNCOND, scale)


def test_cfg_conditioning_validation() -> None:
    denoiser = CountingDenoiser(SCHEDULE)
    with pytest.raises(ValueError, match="same keys"):
        classifier_free(denoiser, COND, {"shift": UNCOND["shift"]}, 3.0)
    with pytest.raises(ValueError, match="None in both"):
        classifier_free(denoiser, COND, {"shift": UNCOND["shift"], "extra": torch.ones(2)}, 3.0)
    with pytest.raises(ValueError, match="differs"):
        classifier_free(denoiser, {"shift": 1}, {"shift": 2}, 3.0)


def test_classifier_guidance_shift_and_direction() -> None:
    """The x0 shift is eps' = eps - sqrt(1 - ab) w grad log p mapped back, and samples move up the classifier."""

    def log_prob(x: Tensor, t: Tensor) -> Tensor:  # a toy noisy-latent classifier for "y = positive"
        return torch.nn.functional.logsigmoid(3.0 * x).flatten(1).sum(1)

    denoiser = CountingDenoiser(SCHEDULE)
    x, t = inputs()
    guided = classifier_guided(denoiser, log_prob, 2.0, SCHEDULE)(x, t)
    grad = 3.0 * torch.sigmoid(-3.0 * x)
    s = (1 - SCHEDULE.alpha_bar(t)).sqrt().view(-1, 1, 1, 1)
    eps = to_eps("x0", denoiser(x, t), x, SCHEDULE, t) - s * 2.0 * grad
    torch.testing.assert_close(to_eps("x0", guided, x, SCHEDULE, t), eps)

    noise = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    timesteps = timesteps_for(SCHEDULE, 25, "trailing")
    plain = sample_ddim(denoiser, noise, SCHEDULE, timesteps)
    pushed = sample_ddim(classifier_guided(denoiser, log_prob, 2.0, SCHEDULE), noise, SCHEDULE, timesteps)
    assert log_prob(pushed, t[:1]).item() > log_prob(plain, t[:1]).item()
    assert pushed.mean().item() > plain.mean().item() + 0.1
    assert torch.equal(classifier_guided(denoiser, log_prob, 0.0, SCHEDULE)(x, t), denoiser(x, t))


def test_classifier_guidance_is_skipped_at_zero_snr() -> None:
    schedule = make_schedule("scaled_linear", zero_terminal_snr=True)
    denoiser = CountingDenoiser(schedule)
    x, _ = inputs()
    t = torch.tensor([999.0, 999.0])
    guided = classifier_guided(denoiser, lambda x, t: x.flatten(1).sum(1), 5.0, schedule)(x, t)
    assert torch.equal(guided, denoiser(x, t))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_inpainting_keeps_known_latents_exactly(name: str) -> None:
    generator = torch.Generator().manual_seed(5)
    known = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    mask[..., :4] = 1.0  # keep the left half
    noise = torch.randn(known.shape, generator=generator, dtype=torch.float64)
    guided = classifier_free(CountingDenoiser(SCHEDULE), COND, UNCOND, 3.0)  # guidance inside, inpainting outside
    timesteps = timesteps_for(SCHEDULE, 1000 if name == "ddpm" else 10, "trailing")
    options: dict[str, Any] = {"eta": 1.0} if name == "ddim" else {}
    out = get_sampler(name)(inpainting(guided, known, mask), noise, SCHEDULE, timesteps, generator=generator, **options)
    assert torch.equal(out[..., :4], known[..., :4])
    assert (out[..., 4:] - known[..., 4:]).abs().mean().item() > 0.1, "the unknown half is generated"
