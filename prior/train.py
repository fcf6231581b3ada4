"""Train the token prior (stage 2b) on code indices of a trained stage 1 autoencoder.

    accelerate launch prior/train.py configs/prior/shapes32_quick.yaml [key=value ...]

The dataset is tokenised once (and its captions encoded once) into a cache keyed by the autoencoder
weights and the data/text settings. Each step trains, with condition dropout, next-token prediction
with pkeep input corruption (``model.kind: ar``) or masked-token prediction on a cosine-scheduled
fraction of masked tokens (``model.kind: maskgit``). Everything is resumable: re-running the same command continues
from ``run.out_dir``'s latest checkpoint. The EMA weights are saved as a pipeline in ``<out_dir>/pipeline``.
``init_from=PATH`` starts from a trained prior; with ``lora.rank`` > 0 only LoRA adapters on its attention
projections train, saved alone in ``<out_dir>/lora/`` beside the untouched base in ``<out_dir>/pipeline``.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autoencoder.model import Autoencoder
from common import training
from common.config import ConfigError
from common.data import DataConfig
from common.ema import EMA
from common.images import save_grid
from common.init_from import Component, InitFrom, check_same_autoencoder, init_weights
from common.lora import ADAPTER_DIR, LoraConfig, add_adapters, check_lora, save_adapter, trainable, without_adapters
from common.resume import resume_run
from common.training import OptimConfig, RunConfig
from pipelines import TokensToImage
from prior.losses import LossConfig, condition_dropout, corrupt_tokens, next_token_loss
from prior.maskgit import build_prior, mask_tokens, masked_token_loss
from prior.maskgit_sampling import MaskGITSampling
from prior.sampling import SamplingConfig
from prior.text import TextEncoderConfig
from prior.token_cache import TokenData, TokenDataset, TokensConfig, load_or_build_tokens
from prior.token_prior import TokenPrior
from prior.transformer import COMPONENT_KIND, Condition, PriorConfig, parameter_groups

PRIOR = Component("prior", COMPONENT_KIND, PriorConfig)  # what init_from loads


@dataclass(frozen=True)
class TrainConfig(InitFrom):
    """Everything a token prior run uses; ``init_from`` starts from a trained prior (:mod:`common.init_from`,
    its stage 1 must be ``tokens.autoencoder``) and ``lora`` trains adapters on it (:mod:`common.lora`)."""

    model: PriorConfig = field(default_factory=PriorConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sample: SamplingConfig = field(default_factory=SamplingConfig)
    maskgit: MaskGITSampling = field(default_factory=MaskGITSampling)  # sampling steps of model.kind=maskgit
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05))
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/prior"))
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        check_lora(self.lora, self.init_from)


def resolve_model_config(config: PriorConfig, data: TokenData, codebook_size: int) -> PriorConfig:
    """Fill the zero fields of ``config`` from stage 1 and the data; fail on explicit values that disagree."""
    grid = math.isqrt(data.tokens.shape[1])
    derived = {"codebook_size": codebook_size, "grid_size": grid,
               "num_classes": data.num_classes if config.condition == "class" else 0,
               "text_dim": data.text_states.shape[-1] if data.text_states is not None else 0}
    for name, value in derived.items():
        given = getattr(config, name)
        if given and value and given != value and name != "num_classes":
            raise ConfigError(f"model.{name}={given}, but stage 1 / the data give {value}; set it to 0 to derive it")
        if given and name == "num_classes" and given < value:
            raise ConfigError(f"model.num_classes={given}, but the data has labels up to {value - 1}")
    config = dataclasses.replace(config, **{k: getattr(config, k) or v for k, v in derived.items()})
    config.validate()
    return config


def check_kind_settings(cfg: TrainConfig) -> None:
    """Refuse settings that the chosen ``model.kind`` would silently ignore, before anything is built."""
    problems = cfg.maskgit.problems("maskgit.")
    if cfg.model.kind == "maskgit":
        if cfg.loss.pkeep != 1.0:
            problems.append(f"loss.pkeep={cfg.loss.pkeep} corrupts the AR prior's inputs; MaskGIT masks tokens "
                            "instead: set loss.pkeep=1.0 for model.kind=maskgit")
        if cfg.sample.guidance_tokens:
            problems.append(f"sample.guidance_tokens={cfg.sample.guidance_tokens} counts AR decoding steps; "
                            "set it to 0 for model.kind=maskgit (MaskGIT guides every step)")
    elif cfg.maskgit != MaskGITSampling():
        problems.append("the maskgit section changes MaskGIT's sampling settings, but model.kind is 'ar'; remove "
                        "the section or set model.kind=maskgit")
    if problems:
        raise ConfigError("; ".join(problems))


def batch_condition(batch: dict, data: TokenData, kind: str) -> Condition:
    """The condition of a batch: its labels, or its captions' cached text states."""
    if kind == "class":
        return Condition(labels=batch["label"])
    if kind == "text":
        states, mask = data.text(batch["caption"])  # one phrasing per item, fit to the prior's text slots
        return Condition(states=states, mask=mask)
    return Condition()


def preview_call(data: TokenData, kind: str, count: int) -> tuple[dict[str, Any], list[str]]:
    """What the sample grids ask the pipeline for: the first ``count`` distinct captions (or their labels),
    as :class:`pipelines.TokensToImage` keywords, and the captions themselves for the log."""
    first: dict[int, int] = {}  # caption id -> first item showing it
    for item, caption in enumerate(data.caption_ids.tolist()):
        first.setdefault(caption, item)
        if len(first) == count:
            break
    captions = [data.captions[c] for c in first]
    if kind == "class":
        return {"class_labels": data.labels[torch.tensor(list(first.values()))]}, captions
    return {"prompt": captions if kind == "text" else [""] * len(captions)}, captions


@torch.no_grad()
def write_samples(bundle: TokenPrior, call: dict[str, Any], path: str, samples: int = 4) -> None:
    """A grid with one row per preview condition and ``samples`` columns, sampled through the pipelines
    (the same path as every user call) with a fixed seed, in fp32 so that the grid does not depend on
    the machine's precision="auto"."""
    pipe = TokensToImage(bundle).to(bundle.device, precision="fp32")
    tokens = pipe(**call, num_images_per_prompt=samples, seed=0, progress=False, output_type="latent").images
    save_grid(bundle.decode(tokens), path, columns=samples, scale=2)


def train_step(batch, model, data: TokenData, opt, accelerator, cfg: TrainConfig):
    """One optimizer (micro-)step; returns (loss, whether it was finite, all the loss terms)."""
    tokens = batch["tokens"]
    kind = cfg.model.condition
    drop = condition_dropout(tokens.shape[0], cfg.loss.cond_drop if kind != "none" else 0.0, tokens.device)
    cond = batch_condition(batch, data, kind)
    if cfg.model.kind == "maskgit":
        inputs, masked = mask_tokens(tokens, cfg.model.codebook_size)  # the mask id is K, one past the codes
        terms = masked_token_loss(model(inputs, cond, drop), tokens, masked)
    else:
        inputs = corrupt_tokens(tokens[:, :-1], cfg.loss.pkeep, cfg.model.codebook_size)
        terms = next_token_loss(model(inputs, cond, drop), tokens)
    finite, _ = training.apply_update(terms.loss, model, opt, accelerator, cfg.optim.grad_clip)
    return terms.loss, finite, terms


def build_model(cfg: TrainConfig, accelerator) -> torch.nn.Module:
    """The prior to train: fresh or ``init_from``'s, with LoRA adapters on it when ``lora.rank`` > 0."""
    model = build_prior(cfg.model)
    if init_weights(model, cfg, PRIOR, cfg.model, accelerator.print):
        check_same_autoencoder(cfg.init_from, Path(cfg.tokens.autoencoder), "tokens.autoencoder")
    if cfg.lora.enabled:
        add_adapters(model, cfg.lora)
    return model.train()


def save_outputs(bundle: TokenPrior, cfg: TrainConfig) -> None:
    """The run's ``pipeline/``; with LoRA, the adapter alone in ``lora/`` and the untouched base in ``pipeline/``."""
    out_dir = cfg.run.out_dir
    if not cfg.lora.enabled:
        bundle.save_pretrained(f"{out_dir}/pipeline")
        return
    save_adapter(bundle.prior, f"{out_dir}/{ADAPTER_DIR}", cfg.lora, "prior", cfg.init_from)
    TokenPrior(bundle.autoencoder, without_adapters(bundle.prior), bundle.text_config, bundle.class_names,
               bundle.sampling, bundle.maskgit).save_pretrained(f"{out_dir}/pipeline")


def main(argv: list[str] | None = None) -> None:
    cfg = training.load_run_config(TrainConfig, argv, __doc__, "prior", "optim.lr=3e-4")
    check_kind_settings(cfg)  # before the accelerator, which creates the run directory
    accelerator = training.make_accelerator(cfg.run)
    out_dir, kind = cfg.run.out_dir, cfg.model.condition
    text = cfg.text if kind == "text" else None
    # every process tokenises its share of a missing cache, then all read it
    data = load_or_build_tokens(cfg.tokens, cfg.data, text, accelerator.device, accelerator=accelerator)
    autoencoder = Autoencoder.from_pretrained(cfg.tokens.autoencoder).to(accelerator.device)
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, data, autoencoder.config.codebook_size))
    data = data.fit_text(cfg.model.text_tokens)  # each batch's text states cut or padded to the prior's slots

    model = build_model(cfg, accelerator)
    opt, sched = training.make_optimizer(trainable(parameter_groups(model, cfg.optim.weight_decay)), cfg.optim)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    ema = EMA(accelerator.unwrap_model(model), cfg.run.ema_decay)
    accelerator.register_for_checkpointing(ema)
    step = resume_run(accelerator, cfg, (opt,), (sched,))

    batches = training.make_loader(TokenDataset(data), cfg.run, accelerator, step)
    preview, captions = preview_call(data, kind, 8)
    class_names = data.class_names() if kind == "class" else None
    bundle = TokenPrior(autoencoder, ema.shadow, text, class_names, cfg.sample, cfg.maskgit)  # the EMA weights
    metrics, budget = training.MetricsLog(accelerator, out_dir, step), training.Budget(cfg.run, accelerator)
    bar = budget.progress(step, "prior")
    accelerator.print(f"{len(data.tokens)} token sequences of {data.tokens.shape[1]}; model "
                      f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; preview: {captions}")
    skips = training.NonFiniteSkips(cfg.run, accelerator)
    for step, _, terms in training.optimizer_steps(
            accelerator, model, batches, lambda batch, _: train_step(batch, model, data, opt, accelerator, cfg),
            step=step, budget=budget, skips=skips, scheds=sched, ema=ema, bar=bar):
        if step % cfg.run.log_every == 0 or step == 1:
            logged = metrics.log(step, {**terms._asdict(), "lr": sched.get_last_lr()[0], **bar.metrics()})
            bar.set_postfix(loss=f"{logged['loss']:.3f}", acc=f"{logged['accuracy']:.3f}")
        if accelerator.is_main_process and step % cfg.run.sample_every == 0:
            write_samples(bundle, preview, f"{out_dir}/samples/step_{step:08d}.png")
        if step % cfg.run.save_every == 0:
            training.save_training_state(accelerator, out_dir, step, cfg.run.keep_checkpoints)
    bar.close()
    training.save_training_state(accelerator, out_dir, step, cfg.run.keep_checkpoints)
    if accelerator.is_main_process:
        save_outputs(bundle, cfg)
        write_samples(bundle, preview, f"{out_dir}/samples/final.png")
        accelerator.print(f"done: {bar.summary()}; pipeline saved to {out_dir}/pipeline")
    training.end_run(accelerator)


if __name__ == "__main__":
    training.run_cli(main, sys.argv[1:])
