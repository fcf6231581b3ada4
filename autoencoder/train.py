"""Train the stage-1 autoencoder (VQ-GAN, or the KL variant).

    accelerate launch autoencoder/train.py configs/autoencoder/emoji32_quick.yaml [key=value ...]

Two explicit optimizer steps per iteration: the autoencoder (reconstruction + perceptual +
codebook/KL + adaptive-weighted adversarial term), then the discriminator. Everything is resumable:
re-running the same command continues from ``run.out_dir``'s latest checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from autoencoder import losses
from autoencoder.discriminator import DiscriminatorConfig, PatchDiscriminator
from autoencoder.model import AutoencoderConfig, build_autoencoder
from autoencoder.perceptual import PerceptualWeightsError, build_perceptual
from autoencoder.quantizer import mark_micro_step
from common.config import dump_config, load_config
from common.data import DataConfig, build_dataset
from common.ema import EMA
from common.images import save_grid
from common.training import (
    Budget, MetricsLog, NonFiniteSkips, OptimConfig, RunConfig, all_finite, make_accelerator, make_loader,
    make_optimizer, resolved_config, resume_training_state, run_cli, save_training_state,
)


@dataclass(frozen=True)
class TrainConfig:
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: losses.LossConfig = field(default_factory=losses.LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(name="emoji"))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/autoencoder"))


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
    if not all_finite(terms.total, accelerator):
        opt.zero_grad(set_to_none=True)
        return terms, out, False
    accelerator.backward(terms.total)
    if accelerator.sync_gradients and cfg.optim.grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return terms, out, True


def discriminator_step(x, recon, disc, opt, accelerator, cfg: TrainConfig, step: int) -> dict:
    """One discriminator update on real images and detached reconstructions (one forward pass)."""
    if losses.disc_factor(step, cfg.loss) == 0:
        return {}
    logits_real, logits_fake = disc(torch.cat([x, recon.detach()])).chunk(2)
    loss, logs = losses.discriminator_loss(logits_real, logits_fake, step, cfg.loss)
    accelerator.backward(loss)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return logs


@torch.no_grad()
def write_reconstructions(model, images: torch.Tensor, path) -> None:
    """Originals on the odd rows, reconstructions on the even rows."""
    recon = model(images).recon.float().clamp(-1, 1)
    rows = torch.stack([images, recon], 1).reshape(-1, *images.shape[1:])
    save_grid(rows, path, columns=images.shape[0] if images.shape[0] <= 16 else 16, scale=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML file under configs/autoencoder/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4")
    args = parser.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    accelerator = make_accelerator(cfg.run)
    out_dir = cfg.run.out_dir

    model, disc = build_autoencoder(cfg.model).train(), PatchDiscriminator(cfg.disc)
    perceptual = build_perceptual(cfg.loss.perceptual, cfg.loss.perceptual_weights_path)
    if perceptual is not None:
        perceptual.to(accelerator.device)  # frozen: never wrapped in DDP
    opt_g, sched_g = make_optimizer(model.parameters(), cfg.optim)
    opt_d, sched_d = make_optimizer(disc.parameters(), cfg.optim)
    model, disc, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(model, disc, opt_g, opt_d, sched_g, sched_d)
    ema = EMA(accelerator.unwrap_model(model), cfg.run.ema_decay)
    accelerator.register_for_checkpointing(ema)
    step = resume_training_state(accelerator, out_dir)
    if accelerator.is_main_process:  # after the resume: a config that does not fit leaves the old record
        dump_config(resolved_config(cfg, accelerator), f"{out_dir}/config.yaml")

    dataset = build_dataset(cfg.data)
    batches = make_loader(dataset, cfg.run, accelerator, step)
    fixed = torch.stack([dataset[i]["image"] for i in range(min(16, len(dataset)))]).to(accelerator.device)
    metrics, budget = MetricsLog(accelerator, out_dir), Budget(cfg.run, accelerator)
    bar = budget.progress(step, "autoencoder")
    skips = NonFiniteSkips(cfg.run, accelerator)
    while not budget.done(step):
        batch = next(batches)
        with accelerator.accumulate(model, disc):
            terms, out, ok = generator_step(batch, model, disc, perceptual, opt_g, accelerator, cfg, step)
            d_logs = discriminator_step(batch["image"], out.recon, disc, opt_d, accelerator, cfg, step) if ok else {}
        if not ok:
            skips.skip(step, terms.total)
            continue
        skips.ok()
        if not accelerator.sync_gradients:
            continue  # gradient accumulation: the optimizers have not stepped yet
        sched_g.step()
        if d_logs:  # the discriminator's schedule runs from its first update
            sched_d.step()
        ema.update(accelerator.unwrap_model(model))
        step += 1
        bar.update(1)
        if step % cfg.run.log_every == 0 or step == 1:
            stats = {"perplexity": out.quant.perplexity, "usage": out.quant.usage} if out.quant is not None else {}
            logged = metrics.log(step, {**terms._asdict(), **d_logs, **stats, "lr": sched_g.get_last_lr()[0],
                                        **bar.metrics()})
            bar.set_postfix(l1=f"{logged['l1']:.3f}", usage=f"{logged.get('usage', 0):.2f}")
        if accelerator.is_main_process and step % cfg.run.sample_every == 0:
            write_reconstructions(ema.shadow, fixed, f"{out_dir}/samples/step_{step:08d}.png")
        if step % cfg.run.save_every == 0:
            save_training_state(accelerator, out_dir, step, cfg.run.keep_checkpoints)
    bar.close()
    save_training_state(accelerator, out_dir, step, cfg.run.keep_checkpoints)
    if accelerator.is_main_process:
        ema.shadow.save_pretrained(f"{out_dir}/autoencoder")
        write_reconstructions(ema.shadow, fixed, f"{out_dir}/samples/final.png")
        accelerator.print(f"done: {bar.summary()}; autoencoder saved to {out_dir}/autoencoder")
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, sys.argv[1:], PerceptualWeightsError)
