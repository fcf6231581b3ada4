"""Train a noisy-latent classifier for classifier guidance of a trained latent diffusion run.

    accelerate launch diffusion/train_classifier.py configs/classifier/shapes32_quick.yaml \
        diffusion=runs/shapes32_diffusion run.out_dir=runs/shapes32_classifier [key=value ...]

``diffusion`` is the diffusion training run (or its ``pipeline/`` directory): its autoencoder, latent
scale and noise schedule are what the classifier is trained on, so that its gradient means something
to that pipeline's sampler. The data are read from the latent cache (the same one the diffusion run
used when ``data`` and ``cache_dir`` match; otherwise it is encoded once). Each step noises a batch
of clean latents to t ~ U{0, ..., T-1} with the diffusion schedule and minimises the cross-entropy of
the chosen ``target`` attribute (shapes: colour, shape, size, position; any dataset: label).

``run.out_dir`` receives ``config.yaml``, ``metrics.jsonl``, training checkpoints (re-running the same
command resumes), ``classifier/`` (the EMA weights as a component directory, written at every save)
and ``eval.json``: accuracy on held-out items, clean (t=0), at a few fixed noise levels and at
uniformly drawn t. Held-out items are the data's ``heldout`` split: fixed for shapes and emoji, the
test/validation split of a saved ``hf`` DatasetDict, and for a folder or webdataset shards the
samples that ``data.heldout_fraction`` (by key hash; left out of training) or ``data.heldout_path``
name. Without one, no accuracy is reported, never one measured on training items.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import Dataset

from common import training
from common.checkpoint import atomic_write, find_pipeline_dir
from common.config import ConfigError
from common.data import DataConfig, has_heldout, no_heldout_message
from common.ema import EMA
from common.init_from import Component, InitFrom, init_weights
from common.resume import resume_run
from common.text_encoder import TextEncoderConfig
from common.training import OptimConfig, RunConfig
from diffusion.classifier import (
    COMPONENT_KIND,
    ClassifierConfig,
    NoisyLatentClassifier,
    attribute_classes,
    attribute_targets,
    check_attribute,
    classifier_loss,
    noisy_accuracy,
)
from diffusion.latent_cache import LatentCache, load_or_build_cache
from diffusion.latent_diffusion import TRAIN_DIFFUSION, read_pipeline_meta
from diffusion.unet import UNetConfig

EVAL_FILE = "eval.json"
CLASSIFIER = Component("classifier", COMPONENT_KIND, ClassifierConfig)  # what init_from loads


@dataclass(frozen=True)
class EvalConfig:
    """Held-out accuracy: ``items`` items of the data's ``heldout`` split (0: none), at fixed timesteps."""

    items: int = 1000
    timesteps: tuple[int, ...] = (0, 250, 500, 750, 999)
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig(InitFrom):
    """Everything a classifier run uses.

    init_from: start from a trained classifier (:mod:`common.init_from`): a classifier run or component
        directory of the same backbone, attribute and classes.
    diffusion: the diffusion run directory (holding ``pipeline/``) or a pipeline directory.
    cache_dir: parent directory of the latent caches.
    target: the attribute to predict: colour, shape, size, position (shapes) or label (any dataset).
    model: the UNetEncoder backbone; ``in_channels`` comes from the autoencoder (leave it out), and
        it sees no text (``context_dim`` 0).
    data: the training data; keep it equal to the diffusion run's to reuse its latent cache.
    """

    diffusion: str = ""
    cache_dir: str = "runs/latent_cache"
    target: str = "colour"
    model: UNetConfig = field(default_factory=lambda: ClassifierConfig().backbone)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=100))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/classifier"))
    eval: EvalConfig = field(default_factory=EvalConfig)


class TargetDataset(Dataset):
    """Cached latents times ``scale`` with their attribute class ids: items ``{"latent": (D, h, w), "target": int}``.
    The latents stay on disk (a cache's rows); each item is scaled when read."""

    def __init__(self, latents: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> None:
        self.latents, self.targets, self.scale = latents, targets, scale

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"latent": self.latents[index] * self.scale, "target": self.targets[index]}


def load_latents(cfg: TrainConfig, pipeline: Path, data: DataConfig, text: TextEncoderConfig,
                 latent_scale: float, device: torch.device, progress: bool) -> tuple[LatentCache, float]:
    """The latent cache of ``data`` and the factor that rescales it to the pipeline's ``latent_scale`` (a
    cache of other data computes its own scale, but the classifier must see the latents the sampler produces)."""
    cache = load_or_build_cache(pipeline / "autoencoder", data, text, cfg.cache_dir, device=device,
                                progress=progress)
    return cache, latent_scale / cache.latent_scale


def evaluate(model: NoisyLatentClassifier, schedule, heldout: TargetDataset | None, cfg: EvalConfig) -> dict:
    """Held-out accuracies (empty without held-out data)."""
    if heldout is None:
        return {}
    device = next(model.parameters()).device
    latents = heldout.latents.to(device) * heldout.scale  # eval.items of them: small
    return noisy_accuracy(model, schedule, latents, heldout.targets.to(device), cfg.timesteps, seed=cfg.seed)


def prepare_data(cfg: TrainConfig, pipeline: Path, text: TextEncoderConfig | None, latent_scale: float, accelerator):
    """(train set, held-out set or None, class names); the main process encodes, the others read its files."""
    text = text if text is not None else TextEncoderConfig()  # a text-free pipeline: captions are cached anyway
    progress = cfg.run.progress and accelerator.is_main_process
    with accelerator.main_process_first():
        train, scale = load_latents(cfg, pipeline, cfg.data, text, latent_scale, accelerator.device, progress)
        heldout = None
        if cfg.eval.items > 0 and has_heldout(cfg.data):
            data = dataclasses.replace(cfg.data, split="heldout", size=cfg.eval.items)
            heldout, heldout_scale = load_latents(cfg, pipeline, data, text, latent_scale, accelerator.device,
                                                  progress)
        elif cfg.eval.items > 0:  # scoring the training items would pass them off as held-out accuracy
            accelerator.print(f"no held-out accuracy: {no_heldout_message(cfg.data)}")
    classes = attribute_classes(cfg.target, cfg.data.name, train.labels)
    train_set = TargetDataset(train.latents, attribute_targets(cfg.target, train.labels), scale)
    heldout_set = None
    if heldout is not None:
        count = min(cfg.eval.items, len(heldout))
        heldout_set = TargetDataset(heldout.latents[:count], attribute_targets(cfg.target, heldout.labels[:count]),
                                    heldout_scale)
    return train_set, heldout_set, classes


def train_step(batch: dict, model, schedule, cfg: TrainConfig, opt, accelerator):
    """One cross-entropy update; returns (loss, whether it was finite, (accuracy, grad norm or None))."""
    loss, accuracy = classifier_loss(model, schedule, batch["latent"], batch["target"])
    finite, norm = training.apply_update(loss, model, opt, accelerator, cfg.optim.grad_clip)
    return loss, finite, (accuracy, norm)


def save_outputs(classifier: NoisyLatentClassifier, out_dir: str, step: int, scores: dict) -> None:
    """The classifier component directory and the held-out accuracies (main process only)."""
    classifier.save_pretrained(f"{out_dir}/classifier")
    text = json.dumps({"step": step, "attribute": classifier.config.attribute, **scores}, indent=2) + "\n"
    atomic_write(Path(out_dir) / EVAL_FILE, lambda tmp: tmp.write_text(text))


def main(argv: list[str] | None = None) -> None:
    cfg = training.load_run_config(TrainConfig, argv, __doc__, "classifier", "diffusion=runs/shapes32_diffusion")
    if not cfg.diffusion:
        raise ConfigError("set diffusion=<diffusion run directory>: the classifier is trained on its latents")
    try:
        check_attribute(cfg.target, cfg.data.name)
    except ValueError as error:
        raise ConfigError(f"target: {error}") from None
    pipeline = find_pipeline_dir(cfg.diffusion, TRAIN_DIFFUSION)
    diffusion, text, latent_scale = read_pipeline_meta(pipeline)
    accelerator = training.make_accelerator(cfg.run)
    out_dir, main_process = cfg.run.out_dir, accelerator.is_main_process

    train_set, heldout_set, classes = prepare_data(cfg, pipeline, text, latent_scale, accelerator)
    code_dim = train_set.latents.shape[1]
    cfg = dataclasses.replace(cfg, model=cfg.model.resolve(code_dim, text_width=0))  # the backbone sees no text
    config = ClassifierConfig(cfg.model, cfg.target, classes, schedule=diffusion, latent_scale=latent_scale)
    schedule = config.schedule.make_schedule()  # the diffusion run's schedule, as the classifier saves it
    accelerator.print(f"classifier of {cfg.target!r} ({len(classes)} classes) on {len(train_set)} latents "
                      f"{tuple(train_set.latents.shape[1:])} from {pipeline}; {schedule!r}")

    set_seed(cfg.run.seed, device_specific=True)  # initialization and stream depend on run.seed alone
    model = NoisyLatentClassifier(config).train()
    init_weights(model, cfg, CLASSIFIER, config, accelerator.print)
    opt, sched = training.make_optimizer(model.parameters(), cfg.optim)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    ema = EMA(accelerator.unwrap_model(model), cfg.run.ema_decay)
    accelerator.register_for_checkpointing(ema)
    step = resume_run(accelerator, cfg, (opt,), (sched,))

    batches = training.make_loader(train_set, cfg.run, accelerator, step)
    metrics, budget = training.MetricsLog(accelerator, out_dir, step), training.Budget(cfg.run, accelerator)
    bar = budget.progress(step, "classifier")
    skips = training.NonFiniteSkips(cfg.run, accelerator)
    for step, loss, (accuracy, norm) in training.optimizer_steps(
            accelerator, model, batches, lambda batch, _: train_step(batch, model, schedule, cfg, opt, accelerator),
            step=step, budget=budget, skips=skips, scheds=sched, ema=ema, bar=bar):
        if step % cfg.run.log_every == 0 or step == 1:
            values = {"loss": loss, "accuracy": accuracy, "lr": sched.get_last_lr()[0], **bar.metrics()}
            logged = metrics.log(step, {**values, **({"grad_norm": norm} if norm is not None else {})})
            bar.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{logged['accuracy']:.3f}")
        if step % cfg.run.save_every == 0:
            training.save_training_state(accelerator, out_dir, step, cfg.run.keep_checkpoints)
            if main_process:
                scores = evaluate(ema.shadow, schedule, heldout_set, cfg.eval)
                metrics.log(step, {f"eval/{name}": value for name, value in scores.items()})
                save_outputs(ema.shadow, out_dir, step, scores)
    bar.close()
    training.save_training_state(accelerator, out_dir, step, cfg.run.keep_checkpoints)
    if main_process:
        scores = evaluate(ema.shadow, schedule, heldout_set, cfg.eval)
        save_outputs(ema.shadow, out_dir, step, scores)
        accelerator.print(f"done: {bar.summary()}; held-out accuracy "
                          f"{json.dumps(scores)}; classifier saved to {out_dir}/classifier")
    training.end_run(accelerator)


if __name__ == "__main__":
    training.run_cli(main, sys.argv[1:])
