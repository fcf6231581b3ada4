"""Train the text-conditioned latent diffusion U-Net on top of a frozen stage-1 autoencoder.

    accelerate launch diffusion/train_latent.py configs/diffusion/shapes32_quick.yaml [key=value ...]

The dataset is encoded once into a latent cache (latents, and each distinct caption's text
embedding) and every step trains on it: t ~ U{0, ..., T-1}, the chosen prediction target, Min-SNR
weights, and condition dropout to the "" caption so that classifier-free guidance works. EMA weights
draw the sample grids and are what ``run_dir/pipeline/`` (a LatentDiffusion directory, written at
every save) holds. Re-running the same command resumes from ``run.out_dir``'s latest checkpoint.
A class-conditional U-Net (``model.num_classes`` > 0) is saved with the names of the dataset's labels
(shapes: their captions; a folder: its class sub-folders), so that the pipelines accept class names.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from accelerate.utils import set_seed
from tqdm import tqdm

from autoencoder.model import Autoencoder
from common.config import ConfigError, dump_config, load_config
from common.data import DataConfig, label_names
from common.ema import EMA
from common.images import save_grid
from common.training import (
    Budget, MetricsLog, NonFiniteSkips, OptimConfig, RunConfig, apply_update, make_accelerator, make_loader,
    make_optimizer, optimizer_steps, resume_training_state, run_cli, save_training_state,
)
from diffusion.latent_cache import NULL_ID, LatentCache, load_or_build_cache, resolve_autoencoder_dir
from diffusion.latent_diffusion import DiffusionConfig, LatentDiffusion, drop_condition, training_loss
from common.text_encoder import TextEncoder, TextEncoderConfig
from diffusion.unet import NULL_CLASS, UNet, UNetConfig

SHAPES_PROMPTS = (
    "a large red circle in the center", "a small blue square at the top left", "a large green triangle at the bottom",
    "a small yellow circle at the right", "a large purple square at the top right",
    "a small orange triangle at the left", "a large blue circle at the bottom right", "a small red square at the top",
)


@dataclass(frozen=True)
class SampleConfig:
    """The periodic sample grid: one column per prompt, ``per_prompt`` rows, a fixed seed."""

    prompts: tuple[str, ...] = SHAPES_PROMPTS
    per_prompt: int = 2
    sampler: Literal["ddpm", "ddim", "dpmpp_2m", "euler"] = "dpmpp_2m"
    steps: int = 20
    guidance: float = 4.0
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Everything a latent diffusion run uses.

    autoencoder: a stage-1 run directory (holding ``autoencoder/``) or an autoencoder component directory.
    cache_dir: parent directory of the latent caches (one sub-directory per autoencoder/data/text combination).
    model: the U-Net. ``in_channels``/``out_channels`` come from the autoencoder's ``code_dim`` (leave them
        out); ``context_dim`` must equal the text encoder's width (384 for the default MiniLM).
    """

    autoencoder: str = "runs/shapes32_quick"
    cache_dir: str = "runs/latent_cache"
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/diffusion"))
    sample: SampleConfig = field(default_factory=SampleConfig)


def unet_config_for(model: UNetConfig, code_dim: int, text_width: int) -> UNetConfig:
    """The U-Net config with the autoencoder's channel count filled in, checked against the text width."""
    default = UNetConfig()
    for name in ("in_channels", "out_channels"):
        if getattr(model, name) not in (getattr(default, name), code_dim):
            raise ConfigError(f"model.{name}={getattr(model, name)} contradicts the autoencoder's code_dim="
                              f"{code_dim}; leave model.{name} out, it is taken from the autoencoder")
    if model.context_dim != text_width:
        raise ConfigError(f"model.context_dim={model.context_dim} must equal the text encoder's width {text_width}; "
                          f"set model.context_dim={text_width}")
    return dataclasses.replace(model, in_channels=code_dim, out_channels=code_dim)


def class_names_for(model: UNetConfig, data: DataConfig) -> list[str] | None:
    """The name of each class of a class-conditional U-Net, saved in ``pipeline.json`` so that the
    pipelines take class names: the dataset's label names (:func:`common.data.label_names`; shapes:
    each label's caption, folder: its class sub-folders). None without class conditioning, or when
    the labels have no names (emoji, a folder without class sub-folders).

    Raises:
        ConfigError: ``model.num_classes`` differs from the number of named labels.
    """
    if not model.num_classes:
        return None
    names = label_names(data)
    if names is not None and len(names) != model.num_classes:
        raise ConfigError(f"model.num_classes={model.num_classes}, but the {data.name} data has {len(names)} labels; "
                          f"set model.num_classes={len(names)} (one class per label)")
    return names


def train_step(batch: dict, unet, cache: LatentCache, pipe: LatentDiffusion, cfg: TrainConfig, opt, accelerator):
    """One denoising update with condition dropout; returns (loss, whether it was finite, grad norm or None)."""
    ids = drop_condition(batch["caption_id"], cfg.diffusion.cond_drop_prob, NULL_ID)
    labels = None
    if cfg.model.num_classes:  # the class is dropped together with the caption
        labels = torch.where(ids == NULL_ID, torch.full_like(ids, NULL_CLASS), batch["label"] + 1)
    loss = training_loss(unet, pipe.schedule, cfg.diffusion, batch["latent"], cache.text(ids), labels).mean()
    finite, norm = apply_update(loss, unet, opt, accelerator, cfg.optim.grad_clip)
    return loss, finite, norm


@torch.no_grad()
def write_samples(pipe: LatentDiffusion, sample: SampleConfig, path: str) -> None:
    """Sample the fixed prompts with a fixed generator: one column per prompt, ``per_prompt`` rows."""
    prompts = [p for _ in range(sample.per_prompt) for p in sample.prompts]
    generator = torch.Generator().manual_seed(sample.seed)
    images = pipe.generate(prompts, steps=sample.steps, guidance=sample.guidance, sampler=sample.sampler,
                           generator=generator)
    save_grid(images, path, columns=len(sample.prompts), scale=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML file under configs/diffusion/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4")
    args = parser.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    class_names = class_names_for(cfg.model, cfg.data)
    accelerator = make_accelerator(cfg.run)
    device, out_dir, main_process = accelerator.device, cfg.run.out_dir, accelerator.is_main_process

    autoencoder_dir = resolve_autoencoder_dir(cfg.autoencoder)
    autoencoder = Autoencoder.from_pretrained(autoencoder_dir).to(device).requires_grad_(False)
    text_encoder = TextEncoder(cfg.text).to(device)
    cfg = dataclasses.replace(cfg, model=unet_config_for(cfg.model, autoencoder.config.code_dim, text_encoder.width))
    with accelerator.main_process_first():  # the main process encodes, the others then read its files
        cache = load_or_build_cache(autoencoder_dir, cfg.data, cfg.text, cfg.cache_dir, autoencoder=autoencoder,
                                    text_encoder=text_encoder, device=device, progress=cfg.run.progress and main_process)
    cache.text_to(device)
    accelerator.print(f"latent cache: {len(cache)} items, {len(cache.captions)} captions, latents "
                      f"{tuple(cache.latents.shape[1:])}, latent_scale {cache.latent_scale:.4f} ({cache.directory})")

    # Loading models may or may not draw random numbers (and encoding only happens on a first run):
    # re-seed so the U-Net's initialization and the training stream depend on run.seed alone.
    set_seed(cfg.run.seed, device_specific=True)
    unet = UNet(cfg.model).train()
    opt, sched = make_optimizer(unet.parameters(), cfg.optim)
    unet, opt, sched = accelerator.prepare(unet, opt, sched)
    ema = EMA(accelerator.unwrap_model(unet), cfg.run.ema_decay)
    accelerator.register_for_checkpointing(ema)
    step = resume_training_state(accelerator, out_dir)
    if main_process:  # after the resume: a config that does not fit leaves the old record
        dump_config(cfg, f"{out_dir}/config.yaml")
    pipe = LatentDiffusion(autoencoder, ema.shadow, text_encoder, cfg.diffusion, cache.latent_scale, class_names)

    batches = make_loader(cache, cfg.run, accelerator, step)
    metrics, budget = MetricsLog(accelerator, out_dir), Budget(cfg.run, accelerator)
    bar = tqdm(total=cfg.run.steps, initial=step, disable=not (cfg.run.progress and main_process),
               desc="diffusion", dynamic_ncols=True)
    skips = NonFiniteSkips(cfg.run, accelerator)
    for step, loss, norm in optimizer_steps(
            accelerator, unet, batches, lambda batch: train_step(batch, unet, cache, pipe, cfg, opt, accelerator),
            step=step, budget=budget, skips=skips, sched=sched, ema=ema, bar=bar):
        if step % cfg.run.log_every == 0 or step == 1:
            values = {"loss": loss, "lr": sched.get_last_lr()[0], "seconds": budget.elapsed}
            logged = metrics.log(step, {**values, **({"grad_norm": norm} if norm is not None else {})})
            bar.set_postfix(loss=f"{logged['loss']:.4f}")
        if main_process and step % cfg.run.sample_every == 0:
            write_samples(pipe, cfg.sample, f"{out_dir}/samples/step_{step:08d}.png")
        if step % cfg.run.save_every == 0:
            save_training_state(accelerator, out_dir, step, cfg.run.keep_checkpoints)
            if main_process:
                pipe.save_pretrained(f"{out_dir}/pipeline")
    bar.close()
    save_training_state(accelerator, out_dir, step, cfg.run.keep_checkpoints)
    if main_process:
        pipe.save_pretrained(f"{out_dir}/pipeline")
        write_samples(pipe, cfg.sample, f"{out_dir}/samples/final.png")
        accelerator.print(f"done: {step} steps in {budget.elapsed / 60:.1f} min; pipeline saved to {out_dir}/pipeline")
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
