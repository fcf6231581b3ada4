"""Train the stage-1 autoencoder (VQ-GAN, or the KL variant).

    accelerate launch autoencoder/train.py configs/autoencoder/emoji32_quick.yaml [key=value ...]

Two explicit optimizer steps per iteration: the autoencoder (reconstruction + perceptual +
codebook/KL + adaptive-weighted adversarial term), then the discriminator, both through
:func:`common.training.apply_update` inside the loop every stage shares
(:func:`common.training.optimizer_steps`). A non-finite autoencoder loss skips the step; a non-finite
discriminator loss skips only the discriminator's update (a warning, and ``disc_skipped`` in the
metrics). Everything is resumable: re-running the same command continues from ``run.out_dir``'s
latest checkpoint.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch.func import functional_call

from autoencoder import convert, losses
from autoencoder.discriminator import PatchDiscriminator
from autoencoder.model import COMPONENT_KIND, AutoencoderConfig, build_autoencoder
from autoencoder.perceptual import PerceptualWeightsError, build_perceptual
from autoencoder.quantizer import mark_micro_step
from autoencoder.train_config import TrainConfig
from common import training
from common.data import build_dataset
from common.ema import EMA
from common.images import save_grid
from common.init_from import Component, init_weights
from common.resume import resume_run


def autoencoder_component(resolution: int) -> Component:
    """What init_from loads: our autoencoder components, a diffusers VQModel / AutoencoderKL folder, or a
    taming checkpoint (read at the config's ``model.resolution``)."""
    def imported(path: Path) -> torch.nn.Module:
        return convert.load_taming_checkpoint(path, resolution) if path.is_file() else convert.from_diffusers(path)

    return Component("autoencoder", COMPONENT_KIND, AutoencoderConfig, importer=imported)


def frozen_call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``module`` with its parameters detached: gradients reach ``x`` but not the module.

    The generator's adversarial term must not touch the discriminator's gradients, and calling the
    unwrapped module this way also keeps DDP's gradient hooks out of the generator step.
    """
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, (x,))


def generator_step(batch, model, disc, perceptual, opt, accelerator, cfg: TrainConfig, step: int):
    """One autoencoder update; returns (loss terms, model output, whether the loss was finite)."""
    x = batch["image"]
    mark_micro_step(model, last=accelerator.sync_gradients)  # the quantizer advances once per optimizer step
    out = model(x)
    gan_on = losses.gan_factor(step, cfg.loss) > 0
    logits_fake = frozen_call(accelerator.unwrap_model(disc), out.recon) if gan_on else None
    terms = losses.autoencoder_loss(
        x, out.recon, out.quantizer_loss, out.kl, logits_fake,
        accelerator.unwrap_model(model).last_layer, step, cfg.loss, perceptual)
    finite, _ = training.apply_update(terms.total, model, opt, accelerator, cfg.optim.grad_clip)
    return terms, out, finite


def discriminator_step(x, recon, disc, opt, accelerator, cfg: TrainConfig, step: int) -> dict:
    """One discriminator update on real images and detached reconstructions (one forward pass); returns
    its logs, empty before ``loss.disc_start``.

    A non-finite discriminator loss skips this update alone (the autoencoder's has been made): the logs
    are then ``{"disc_skipped": 1.0}`` and a warning names the step.
    """
    if losses.disc_factor(step, cfg.loss) == 0:
        return {}
    logits_real, logits_fake = disc(torch.cat([x, recon.detach()])).chunk(2)
    loss, logs = losses.discriminator_loss(logits_real, logits_fake, step, cfg.loss)
    finite, _ = training.apply_update(loss, disc, opt, accelerator, 0.0)  # the discriminator is not clipped
    if finite:
        return logs
    warnings.warn(f"step {step}: non-finite discriminator loss ({float(loss.detach().float())}); its update was "
                  f"skipped, the autoencoder's was made", RuntimeWarning, stacklevel=2)
    return {"disc_skipped": 1.0}


@torch.no_grad()
def write_reconstructions(model, images: torch.Tensor, path) -> None:
    """Originals on the odd rows, reconstructions on the even rows."""
    recon = model(images).recon.float().clamp(-1, 1)
    rows = torch.stack([images, recon], 1).reshape(-1, *images.shape[1:])
    save_grid(rows, path, columns=images.shape[0] if images.shape[0] <= 16 else 16, scale=2)


def main(argv: list[str] | None = None) -> None:
    cfg = training.load_run_config(TrainConfig, argv, __doc__, "autoencoder", "optim.lr=2e-4")
    accelerator = training.make_accelerator(cfg.run)
    out_dir = cfg.run.out_dir

    model, disc = build_autoencoder(cfg.model).train(), PatchDiscriminator(cfg.disc)
    init_weights(model, cfg, autoencoder_component(cfg.model.resolution), cfg.model, accelerator.print)
    perceptual = build_perceptual(cfg.loss.perceptual, cfg.loss.perceptual_weights_path)
    if perceptual is not None:
        perceptual.to(accelerator.device)  # frozen: never wrapped in DDP
    opt_g, sched_g = training.make_optimizer(model.parameters(), cfg.optim)
    opt_d, sched_d = training.make_optimizer(disc.parameters(), cfg.optim)
    model, disc, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(model, disc, opt_g, opt_d, sched_g, sched_d)
    ema = EMA(accelerator.unwrap_model(model), cfg.run.ema_decay)
    accelerator.register_for_checkpointing(ema)
    step = resume_run(accelerator, cfg, (opt_g, opt_d), (sched_g, sched_d))

    dataset = build_dataset(cfg.data)
    batches = training.make_loader(dataset, cfg.run, accelerator, step)
    fixed = torch.stack([dataset[i]["image"] for i in range(min(16, len(dataset)))]).to(accelerator.device)
    metrics, budget = training.MetricsLog(accelerator, out_dir, step), training.Budget(cfg.run, accelerator)
    bar = budget.progress(step, "autoencoder")

    def train_step(batch: dict, step: int):
        """Both updates of one (micro-)step; a non-finite autoencoder loss skips both."""
        terms, out, finite = generator_step(batch, model, disc, perceptual, opt_g, accelerator, cfg, step)
        d_logs = discriminator_step(batch["image"], out.recon, disc, opt_d, accelerator, cfg, step) if finite else {}
        return terms.total, finite, (terms, out, d_logs)

    # the discriminator's schedule runs from its first update
    scheds = (sched_g, (sched_d, lambda at: losses.disc_factor(at, cfg.loss) != 0))
    for step, _, (terms, out, d_logs) in training.optimizer_steps(
            accelerator, (model, disc), batches, train_step, step=step, budget=budget,
            skips=training.NonFiniteSkips(cfg.run, accelerator), scheds=scheds, ema=ema, bar=bar):
        if step % cfg.run.log_every == 0 or step == 1:
            stats = {"perplexity": out.quant.perplexity, "usage": out.quant.usage} if out.quant is not None else {}
            logged = metrics.log(step, {**terms._asdict(), **d_logs, **stats, "lr": sched_g.get_last_lr()[0],
                                        **bar.metrics()})
            bar.set_postfix(l1=f"{logged['l1']:.3f}", usage=f"{logged.get('usage', 0):.2f}")
        if accelerator.is_main_process and step % cfg.run.sample_every == 0:
            write_reconstructions(ema.shadow, fixed, f"{out_dir}/samples/step_{step:08d}.png")
        if step % cfg.run.save_every == 0:
            training.save_training_state(accelerator, out_dir, step, cfg.run.keep_checkpoints)
    bar.close()
    training.save_training_state(accelerator, out_dir, step, cfg.run.keep_checkpoints)
    if accelerator.is_main_process:
        ema.shadow.save_pretrained(f"{out_dir}/autoencoder")
        write_reconstructions(ema.shadow, fixed, f"{out_dir}/samples/final.png")
        accelerator.print(f"done: {bar.summary()}; autoencoder saved to {out_dir}/autoencoder")
    training.end_run(accelerator)


if __name__ == "__main__":
    training.run_cli(main, sys.argv[1:], PerceptualWeightsError)
