"""Train the latent diffusion U-Net (text- and/or class-conditional) on top of a frozen stage-1 autoencoder.

    accelerate launch diffusion/train_latent.py configs/diffusion/shapes32_quick.yaml [key=value ...]
    accelerate launch diffusion/train_latent.py configs/diffusion/shapes32_class.yaml   # class-only

The dataset is encoded once into a latent cache (latents, and each distinct caption's text
embedding) and every step trains on it: t ~ U{0, ..., T-1}, the chosen prediction target, Min-SNR
weights, and condition dropout to the "" caption and the null class so that classifier-free guidance
works (each dropped independently, see ``DiffusionConfig.cond_drop_prob``). EMA weights draw the
sample grids and are what ``run_dir/pipeline/`` (a LatentDiffusion directory, written at every save)
holds. Re-running the same command resumes from ``run.out_dir``'s latest checkpoint.

Conditions: ``model.context_dim`` left out (or set to the text encoder's width) conditions on captions;
``model.num_classes`` > 0 on dataset labels, fed as label + 1 with 0 the null class. With
``model.context_dim: 0`` the U-Net is class-only: no text encoder is loaded, the cache holds no text,
and the saved pipeline has none (load it with ``pipelines.ClassToImage``). A class-conditional U-Net is
saved with the names of the dataset's labels (shapes: their captions; a folder: its class
sub-folders), so that the pipelines accept class names.

Fine-tuning: ``init_from=PATH`` starts the U-Net from a trained one (:mod:`common.init_from`; a pipeline or
run directory, a ``unet`` component, a diffusers U-Net or Stable Diffusion folder), at its pipeline's latent
scale. ``lora.rank=8`` (with ``init_from``) trains LoRA adapters on its attention projections only
(:mod:`common.lora`): ``run_dir/lora/`` then holds the adapter alone and ``run_dir/pipeline/`` the untouched
base, which ``TextToImage.from_pretrained(run_dir).load_lora(run_dir)`` puts together.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import Tensor

from autoencoder.model import Autoencoder
from common import training
from common.config import ConfigError
from common.data import DataConfig, label_names
from common.ema import EMA
from common.images import save_grid
from common.init_from import Component, check_same_autoencoder, init_weights, source_pipeline
from common.lora import ADAPTER_DIR, add_adapters, save_adapter, trainable, without_adapters
from common.resume import resume_run
from common.text_encoder import TextEncoder
from diffusion import convert
from diffusion.latent_cache import NULL_ID, LatentCache, load_or_build_cache, resolve_autoencoder_dir
from diffusion.latent_diffusion import LatentDiffusion, read_pipeline_meta
from diffusion.objectives import drop_condition, training_loss
from diffusion.train_config import TRAINING_ONLY, SampleConfig, TrainConfig
from diffusion.unet import COMPONENT_KIND, NULL_CLASS, UNet, UNetConfig
from pipelines.loading import pipeline_for
from pipelines.options import check_options, options_from_call

# What init_from loads: our unet components, or a diffusers U-Net / Stable Diffusion folder through the importer.
UNET = Component("unet", COMPONENT_KIND, UNetConfig, importer=convert.from_diffusers)


def unet_config_for(model: UNetConfig, code_dim: int, text_width: int) -> UNetConfig:
    """The U-Net config with the autoencoder's channel count filled in, checked against the text width
    (0: no text encoder, as for ``model.context_dim: 0``)."""
    resolved = model.resolve(code_dim, text_width)
    check_conditions(resolved)
    return resolved


def check_conditions(model: UNetConfig) -> None:
    """Refuse a U-Net with neither text nor classes: the pipelines have no unconditional generator.
    (``context_dim`` None means the text encoder's width, so text.)"""
    if model.context_dim == 0 and not model.num_classes:
        raise ConfigError("model.context_dim=0 and model.num_classes=0 leave the U-Net without a condition; set "
                          "model.context_dim to the text encoder's width (384 for the default MiniLM) and/or "
                          "model.num_classes to the number of dataset labels")


def load_text_encoder(cfg: TrainConfig, device: torch.device) -> TextEncoder | None:
    """The frozen text encoder, or None for a class-only U-Net (``model.context_dim: 0``), which loads none."""
    return TextEncoder(cfg.text).to(device) if cfg.model.context_dim != 0 else None


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


def drop_conditions(caption_ids: Tensor | None, labels: Tensor | None, prob: float,
                    generator: torch.Generator | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Condition dropout: caption ids (B,) and dataset labels (B,) (None: the U-Net lacks that condition)
    -> (caption ids or ``NULL_ID``, U-Net class ids ``label + 1`` or ``NULL_CLASS``).

    Each is dropped with probability ``prob`` independently of the other, so that a class + text U-Net
    also learns (class, "") and (null, prompt), the pairs the class and text pipelines guide with
    (dropping both together never shows it those). The caption is drawn first: a text-only U-Net draws
    exactly what it did before classes existed.
    """
    if caption_ids is not None:
        caption_ids = drop_condition(caption_ids, prob, NULL_ID, generator)
    if labels is not None:
        labels = drop_condition(labels.long() + 1, prob, NULL_CLASS, generator)
    return caption_ids, labels


def build_unet(cfg: TrainConfig, autoencoder_dir, accelerator) -> UNet:
    """The U-Net to train: fresh, or ``init_from``'s (whose stage 1 must be ``autoencoder``), with LoRA
    adapters on it when ``lora.rank`` > 0 (everything else frozen)."""
    unet = UNet(cfg.model)
    if init_weights(unet, cfg, UNET, cfg.model, accelerator.print):
        check_same_autoencoder(cfg.init_from, autoencoder_dir, "autoencoder")
    if cfg.lora.enabled:
        add_adapters(unet, cfg.lora)
        count = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        accelerator.print(f"LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}: {count} trainable parameters")
    return unet.train()


def base_latent_scale(cfg: TrainConfig, cache: LatentCache, accelerator) -> float:
    """The latent scale the U-Net trains at: ``init_from``'s pipeline's (a fine-tuned U-Net must keep seeing
    latents at the scale it learned; the new data's own 1/std would shift them), else the cache's. A resumed
    run whose source is gone reads the one its own pipeline recorded."""
    sources = (cfg.init_from, cfg.run.out_dir) if cfg.init_from else ()
    for pipeline in filter(None, map(source_pipeline, sources)):
        diffusion, _, scale = read_pipeline_meta(pipeline)
        if dataclasses.replace(diffusion, **TRAINING_ONLY) != dataclasses.replace(cfg.diffusion, **TRAINING_ONLY):
            accelerator.print(f"warning: the diffusion process differs from {pipeline}'s, which init_from's U-Net "
                              "was trained with; copy the diffusion section from its pipeline.json unless intended")
        return scale
    return cache.latent_scale


def train_step(batch: dict, unet, cache: LatentCache, pipe: LatentDiffusion, cfg: TrainConfig, opt, accelerator):
    """One denoising update with condition dropout; returns (loss, whether it was finite, grad norm or None)."""
    ids, labels = drop_conditions(cache.phrasings(batch["caption_id"]) if cfg.model.context_dim else None,
                                  batch["label"] if cfg.model.num_classes else None, cfg.diffusion.cond_drop_prob)
    text = cache.text(ids) if ids is not None else None
    latents = batch["latent"]
    if pipe.latent_scale != cache.latent_scale:  # init_from's scale (base_latent_scale)
        latents = latents * (pipe.latent_scale / cache.latent_scale)
    loss = training_loss(unet, pipe.schedule, cfg.diffusion, latents, text, labels).mean()
    finite, norm = training.apply_update(loss, unet, opt, accelerator, cfg.optim.grad_clip)
    return loss, finite, norm


def grid_condition(pipe: LatentDiffusion, prompts: tuple[str, ...], per_prompt: int) -> list[str] | Tensor:
    """What the sample grid's pipeline is called with, row by row: the prompts, or for a U-Net without text
    the classes they name; when they name none (labels without names, e.g. emoji), the first classes instead."""
    if pipe.text_encoder is not None or set(prompts) <= set(pipe.class_names or ()):
        return [p for _ in range(per_prompt) for p in prompts]
    labels = torch.arange(len(prompts)) % pipe.unet.config.num_classes
    return labels.repeat(per_prompt)


@torch.no_grad()
def write_samples(pipe: LatentDiffusion, sample: SampleConfig, path: str) -> None:
    """Sample the fixed prompts with a fixed seed through the pipelines: one column per prompt, ``per_prompt``
    rows. In fp32, so a grid does not depend on the machine's precision="auto"."""
    generate = pipeline_for(pipe).to(pipe.device, precision="fp32")
    latents = generate(grid_condition(pipe, sample.prompts, sample.per_prompt), seed=sample.seed, progress=False,
                       output_type="latent", **grid_options(sample)).images
    save_grid(pipe.decode(latents), path, columns=len(sample.prompts), scale=2)


def grid_options(sample: SampleConfig) -> dict[str, Any]:
    """The grid's sampling settings under the pipelines' names; those left out take the pipelines' defaults.

    Raises:
        ConfigError: a value the pipelines refuse (checked at start-up, not at the first grid).
    """
    given = dict(num_inference_steps=sample.steps, guidance_scale=sample.guidance, sampler=sample.sampler)
    given = {name: value for name, value in given.items() if value is not None}
    try:
        check_options(options_from_call("sample", given))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"sample: {error}") from None
    return given


def save_outputs(pipe: LatentDiffusion, cfg: TrainConfig) -> None:
    """The run's ``pipeline/``; with LoRA, the adapter alone in ``lora/`` and the untouched base in ``pipeline/``
    (load the two together with ``pipe.load_lora(run_dir)``)."""
    out_dir = cfg.run.out_dir
    if not cfg.lora.enabled:
        pipe.save_pretrained(f"{out_dir}/pipeline")
        return
    save_adapter(pipe.unet, f"{out_dir}/{ADAPTER_DIR}", cfg.lora, "unet", cfg.init_from)
    LatentDiffusion(pipe.autoencoder, without_adapters(pipe.unet), pipe.text_encoder, pipe.config, pipe.latent_scale,
                    pipe.class_names).save_pretrained(f"{out_dir}/pipeline")


def main(argv: list[str] | None = None) -> None:
    cfg = training.load_run_config(TrainConfig, argv, __doc__, "diffusion", "optim.lr=2e-4")
    check_conditions(cfg.model)  # before anything is loaded or written
    grid_options(cfg.sample)
    class_names = class_names_for(cfg.model, cfg.data)
    accelerator = training.make_accelerator(cfg.run)
    device, out_dir, main_process = accelerator.device, cfg.run.out_dir, accelerator.is_main_process

    autoencoder_dir = resolve_autoencoder_dir(cfg.autoencoder)
    autoencoder = Autoencoder.from_pretrained(autoencoder_dir).to(device).requires_grad_(False)
    text_encoder = load_text_encoder(cfg, device)
    width = text_encoder.width if text_encoder is not None else 0
    cfg = dataclasses.replace(cfg, model=unet_config_for(cfg.model, autoencoder.config.code_dim, width))
    text_config = cfg.text if text_encoder is not None else None  # class-only: a cache without text
    # every process encodes its share of a missing cache, then all read its files
    cache = load_or_build_cache(autoencoder_dir, cfg.data, text_config, cfg.cache_dir, autoencoder=autoencoder,
                                text_encoder=text_encoder, device=device, progress=cfg.run.progress and main_process,
                                templates=cfg.caption_templates, accelerator=accelerator)
    cache.text_to(device)
    accelerator.print(f"latent cache: {len(cache)} items, {len(cache.captions)} captions, latents "
                      f"{tuple(cache.latents.shape[1:])}, latent_scale {cache.latent_scale:.4f} ({cache.directory})")

    # Loading models may or may not draw random numbers (and encoding only happens on a first run):
    # re-seed so the U-Net's initialization and the training stream depend on run.seed alone.
    set_seed(cfg.run.seed, device_specific=True)
    unet = build_unet(cfg, autoencoder_dir, accelerator)
    opt, sched = training.make_optimizer(trainable(list(unet.parameters())), cfg.optim)
    unet, opt, sched = accelerator.prepare(unet, opt, sched)
    ema = EMA(accelerator.unwrap_model(unet), cfg.run.ema_decay)
    accelerator.register_for_checkpointing(ema)
    step = resume_run(accelerator, cfg, (opt,), (sched,))
    latent_scale = base_latent_scale(cfg, cache, accelerator)
    pipe = LatentDiffusion(autoencoder, ema.shadow, text_encoder, cfg.diffusion, latent_scale, class_names)

    batches = training.make_loader(cache, cfg.run, accelerator, step)
    metrics, budget = training.MetricsLog(accelerator, out_dir, step), training.Budget(cfg.run, accelerator)
    bar = budget.progress(step, "diffusion")
    skips = training.NonFiniteSkips(cfg.run, accelerator)
    for step, loss, norm in training.optimizer_steps(
            accelerator, unet, batches, lambda batch, _: train_step(batch, unet, cache, pipe, cfg, opt, accelerator),
            step=step, budget=budget, skips=skips, scheds=sched, ema=ema, bar=bar):
        if step % cfg.run.log_every == 0 or step == 1:
            values = {"loss": loss, "lr": sched.get_last_lr()[0], **bar.metrics()}
            logged = metrics.log(step, {**values, **({"grad_norm": norm} if norm is not None else {})})
            bar.set_postfix(loss=f"{logged['loss']:.4f}")
        if main_process and step % cfg.run.sample_every == 0:
            write_samples(pipe, cfg.sample, f"{out_dir}/samples/step_{step:08d}.png")
        if step % cfg.run.save_every == 0:
            training.save_training_state(accelerator, out_dir, step, cfg.run.keep_checkpoints)
            if main_process:
                save_outputs(pipe, cfg)
    bar.close()
    training.save_training_state(accelerator, out_dir, step, cfg.run.keep_checkpoints)
    if main_process:
        save_outputs(pipe, cfg)
        write_samples(pipe, cfg.sample, f"{out_dir}/samples/final.png")
        accelerator.print(f"done: {bar.summary()}; pipeline saved to {out_dir}/pipeline")
    training.end_run(accelerator)


if __name__ == "__main__":
    training.run_cli(main, sys.argv[1:])
