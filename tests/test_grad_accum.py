"""Gradient accumulation is one large batch: 2 micro-batches of 4 give the gradients of one batch of 8.

Checked through both training paths: ``common.training.optimizer_steps`` with ``apply_update`` (the loop of
every single-optimizer script) and ``autoencoder.train``'s ``generator_step``/``discriminator_step``
under ``accelerator.accumulate``. The autoencoder has every codebook-health option on (k-means
initialisation, dead-code restarts every step, a 2-step usage window), which must not make the two runs
differ: the quantizer advances once per optimizer step, not per micro-batch.

The gradients compared are those the optimizer steps with, caught by a pre-step hook on the torch
optimizer (accelerate calls it only when the accumulated gradients are complete). The optimizer is SGD:
AdamW's first steps move each weight by about +-lr whatever its gradient's size, so a rounding-level
difference (two half-batch sums are not one whole sum) that flips the sign of a near-zero gradient puts
that weight 2 lr apart in the two runs, and the next steps' gradients then differ by more than 1e-6
(2.5e-6 seen) for reasons that have nothing to do with accumulation.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from autoencoder.discriminator import DiscriminatorConfig, PatchDiscriminator
from autoencoder.losses import LossConfig
from autoencoder.model import AutoencoderConfig, build_autoencoder
from autoencoder.quantizer import QuantizerConfig, mark_micro_step
from autoencoder.train import TrainConfig, discriminator_step, generator_step
from common.data import DataConfig
from common.training import Budget, NonFiniteSkips, OptimConfig, RunConfig, apply_update, optimizer_steps

BATCH, STEPS = 8, 3
MODEL = AutoencoderConfig(resolution=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                          z_channels=8, code_dim=4,
                          quantizer=QuantizerConfig(codebook_size=16, l2_normalize=True, kmeans_init=True,
                                                    kmeans_iters=2, dead_code_threshold=1, usage_window=2))
# The discriminator trains from step 0; the adversarial term stays off: its adaptive weight
# ||grad L_rec|| / ||grad L_G|| is a ratio of one micro-batch's gradients, so accumulation cannot
# reproduce the large batch's weight (see the xfail case of the test below).
TRAIN = TrainConfig(model=MODEL, data=DataConfig(name="shapes", resolution=16),
                    disc=DiscriminatorConfig(base_channels=8, num_layers=2),
                    loss=LossConfig(perceptual="none", disc_start=0, gan_start=1000),
                    optim=OptimConfig(grad_clip=1.0))
STUB = SimpleNamespace(update=lambda *args: None, step=lambda *args: None)  # EMA, schedule, progress bar


def sgd(module: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=0.05)


def images() -> torch.Tensor:
    """STEPS batches of BATCH images, one after the other."""
    return torch.rand(STEPS * BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def seeded(module: torch.nn.Module) -> torch.nn.Module:
    """Perturb every weight, so that no zero-initialised layer leaves the others' gradients at 0."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return module.train()


def gradient_recorder(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """A list that receives the flattened gradients each time ``optimizer`` steps."""
    steps: list[torch.Tensor] = []

    def record(opt, args, kwargs) -> None:
        params = [p for group in opt.param_groups for p in group["params"]]
        steps.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]))

    optimizer.register_step_pre_hook(record)
    return steps


def with_accelerator(accumulation: int, body: Callable[[Accelerator, Iterator[dict]], dict]) -> dict:
    """Run ``body`` under a fresh CPU Accelerator over micro-batches of BATCH / accumulation images."""
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="no", gradient_accumulation_steps=accumulation)
        batches = ({"image": x} for x in images().split(BATCH // accumulation))
        torch.manual_seed(0)  # the same weights, k-means seeds and restart draws in both runs
        return body(accelerator, batches)
    finally:  # accelerate keeps its settings in process-wide singletons
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def optimizer_steps_run(accelerator: Accelerator, batches: Iterator[dict]) -> dict:
    """The single-optimizer loop of common.training on the autoencoder (L1 + quantizer loss)."""
    model = seeded(build_autoencoder(MODEL))
    opt = sgd(model)
    grads = gradient_recorder(opt)
    model, opt = accelerator.prepare(model, opt)
    run = RunConfig(steps=STEPS, progress=False)

    def update(batch: dict, step: int):
        mark_micro_step(model, last=accelerator.sync_gradients)
        out = model(batch["image"])
        loss = (out.recon - batch["image"]).abs().mean() + out.quantizer_loss
        finite, _ = apply_update(loss, model, opt, accelerator, TRAIN.optim.grad_clip)
        return loss, finite, out

    stats = [(out.quant.perplexity, out.quant.usage) for _, _, out in optimizer_steps(
        accelerator, model, batches, update, step=0, budget=Budget(run, accelerator),
        skips=NonFiniteSkips(run, accelerator), scheds=STUB, ema=STUB, bar=STUB)]
    return {"grads": grads, "stats": stats, "quantizer": accelerator.unwrap_model(model).quantizer.state_dict()}


def train_script_run(accelerator: Accelerator, batches: Iterator[dict], cfg: TrainConfig = TRAIN) -> dict:
    """autoencoder/train.py's two optimizer steps, in its main loop's order."""
    model, disc = seeded(build_autoencoder(MODEL)), seeded(PatchDiscriminator(cfg.disc))
    opt_g, opt_d = sgd(model), sgd(disc)
    grads_g, grads_d = gradient_recorder(opt_g), gradient_recorder(opt_d)
    model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
    step, stats = 0, []
    while step < STEPS:
        batch = next(batches)
        with accelerator.accumulate(model, disc):
            mark_micro_step(model, last=accelerator.sync_gradients)  # the line autoencoder/train.py needs
            _, out, ok = generator_step(batch, model, disc, None, opt_g, accelerator, cfg, step)
            assert ok and discriminator_step(batch["image"], out.recon, disc, opt_d, accelerator, cfg, step)
        if accelerator.sync_gradients:
            step += 1
            stats.append((out.quant.perplexity, out.quant.usage))
    return {"grads": grads_g, "disc_grads": grads_d, "stats": stats,
            "quantizer": accelerator.unwrap_model(model).quantizer.state_dict()}


def assert_same_training(accumulated: dict, whole: dict) -> None:
    for key in ("grads", "disc_grads"):
        if key not in whole:
            continue
        assert len(accumulated[key]) == len(whole[key]) == STEPS, f"{key}: one optimizer step per {BATCH} images"
        for step, (got, want) in enumerate(zip(accumulated[key], whole[key])):
            assert want.abs().max() > 1e-3, f"{key} step {step}: vacuous"
            where = f"{key} step {step}"
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m, at=where: f"{at}: {m}")
    assert (whole["grads"][1] - whole["grads"][0]).abs().max() > 1e-3, "the steps differ: not vacuous"
    for (perplexity, usage), (want_perplexity, want_usage) in zip(accumulated["stats"], whole["stats"]):
        torch.testing.assert_close((perplexity, usage), (want_perplexity, want_usage))
    quantizer = accumulated["quantizer"]
    assert quantizer["step"].item() == STEPS, "the quantizer counts optimizer steps, not micro-batches"
    assert bool(quantizer["initialized"]), "k-means ran within the compared steps"
    for name, value in whole["quantizer"].items():
        torch.testing.assert_close(quantizer[name], value, rtol=1e-6, atol=1e-6, msg=lambda m, at=name: f"{at}: {m}")


WITH_GAN = dataclasses.replace(TRAIN, loss=dataclasses.replace(TRAIN.loss, gan_start=0, gan_ramp=0))


@pytest.mark.parametrize("loop", [
    optimizer_steps_run,
    train_script_run,
    pytest.param(functools.partial(train_script_run, cfg=WITH_GAN), id="train_script_with_gan", marks=[
        pytest.mark.slow, pytest.mark.xfail(strict=True, reason="the adaptive GAN weight is a per-micro-batch "
                                            "ratio of gradient norms (differences of ~20%)")]),
], ids=["optimizer_steps", "train_script", "train_script_with_gan"])
def test_accumulated_gradients_equal_one_large_batch(loop):
    assert_same_training(with_accelerator(2, loop), with_accelerator(1, loop))
