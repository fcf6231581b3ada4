"""The baseline of ``bench.ttq_diffusion``: diffusers' ``examples/text_to_image/train_text_to_image.py`` at its
defaults, re-implemented on our shapes data, stage-1 autoencoder and text encoder, from a fresh U-Net.

    python -m bench.diffusers_recipe configs/diffusion/shapes32_quick.yaml --out runs/ttq/diffusers \\
        --minutes 30 --snapshot-minutes 2 --threads 1

Read from the script at diffusers commit 58eb52c0 (the training step, lines 955-1051), and kept:

- the network: diffusers' own ``UNet2DConditionModel``, built from our config's U-Net
  (:func:`diffusion.export.unet_config_to_diffusers`: the same architecture and size, convertible both ways
  exactly) with diffusers' own initialisation. The script fine-tunes a pretrained U-Net; from scratch
  is the only start that compares recipes, so the constructor's weights stand in for ``from_pretrained``.
- the noise process: ``DDPMScheduler`` with Stable Diffusion 1.x's ``scheduler_config.json``
  (:data:`SD_SCHEDULER`: scaled_linear 0.00085..0.012, 1000 steps, epsilon), what the script loads; it is
  the process of our shapes config. ``t ~ randint(0, 1000)``, ``noise = randn_like(latents)``,
  ``add_noise``, target = the noise, loss = ``F.mse_loss(pred.float(), target.float())``: no min-SNR
  (``--snr_gamma`` None), no noise offset, input perturbation or DREAM (all off by default).
- the optimizer: ``torch.optim.AdamW(lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)``,
  ``get_scheduler("constant")`` (whose ``lr_warmup_steps=500`` is unused: "constant" has no warm-up),
  ``max_grad_norm=1.0``, batch 16, no gradient accumulation, no EMA, fp32 (``mixed_precision`` None),
  ``scale_lr`` off: :data:`DEFAULTS`.
- the data path: each step encodes its images through the frozen stage-1 encoder and its captions through
  the frozen text encoder, in fp32; a ``DataLoader(shuffle=True, batch_size=16, num_workers=0)``, epoch
  after epoch. Images are drawn on the fly by the dataset (shapes renders each item).

Where it must differ, and why:

- latents: our VQ autoencoder has no ``latent_dist``; its quantized latent (what our cache stores) takes
  the place of ``latent_dist.sample()``, times the latent scale. diffusers reads that scale from the VAE's
  config (``scaling_factor``, estimated once offline as 1 / std of the latents); ours has none, so it is
  1 / std of the latents of the first :data:`SCALE_ITEMS` items (Rombach et al. 2022, §4.3.2; the start-up
  cost counts in the arm's wall clock), unless ``--latent-scale`` gives it.
- text: our ``TextEncoder`` (the config's MiniLM) in place of CLIP. CLIP's convention is to pad to 77
  tokens and attend to every position, which is why the script passes no ``encoder_attention_mask``;
  MiniLM's convention masks padding (:mod:`common.text_encoder`), and the scorer samples with that mask, so
  the U-Net trains with ``encoder_attention_mask`` = the padding mask (on padded rows only; same network).
- transforms: resolution 512, random crop and no flip are the defaults; shapes images are already at the
  config's resolution, so resize and crop are the identity, and flipping stays off as the default says.
- seeding: the script's ``--seed`` default is None (unseeded); here ``--seed`` (0) seeds torch, so a run
  repeats. Checkpoints every 500 steps (``--checkpointing_steps``) are replaced by ``--snapshot-minutes``
  snapshots of the U-Net alone; no validation (``--validation_prompt`` is None by default), no hub.
- the sampler that scores the snapshots is not part of the recipe: ``bench.ttq_diffusion`` samples both
  arms through our pipeline with our shapes config's sampling settings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from autoencoder.model import Autoencoder
from common.config import load_config
from common.data import build_dataset
from common.text_encoder import TextEmbedding, TextEncoder
from diffusion.convert import POOLED_MARK
from diffusion.export import unet_config_to_diffusers
from diffusion.latent_cache import encode_latents, resolve_autoencoder_dir
from diffusion.train_config import TrainConfig
from diffusion.unet import UNetConfig

# Stable Diffusion 1.x's scheduler/scheduler_config.json (a PNDM config; DDPMScheduler.from_pretrained, as the
# script calls it, keeps the keys it knows and its own defaults for the rest, e.g. prediction_type="epsilon").
SD_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                    skip_prk_steps=True, steps_offset=1, trained_betas=None)
SCALE_ITEMS = 1000  # items whose latents estimate the latent scale when none is given
SNAPSHOTS = "snapshots.jsonl"  # one line per saved U-Net: minutes since launch, step, mean loss so far, directory


@dataclass(frozen=True)
class RecipeDefaults:
    """The argparse defaults of ``train_text_to_image.py`` that shape training (names as the script's)."""

    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    max_grad_norm: float = 1.0
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    dataloader_num_workers: int = 0
    mixed_precision: str = "no"
    use_ema: bool = False
    snr_gamma: float | None = None


DEFAULTS = RecipeDefaults()


def make_scheduler() -> Any:
    """The script's noise scheduler: diffusers' ``DDPMScheduler`` with Stable Diffusion's config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(SD_SCHEDULER)


def build_unet(config: UNetConfig, sample_size: int | None = None) -> nn.Module:
    """A fresh diffusers ``UNet2DConditionModel`` of our resolved U-Net ``config``'s architecture."""
    from diffusers import UNet2DConditionModel

    settings = {k: v for k, v in unet_config_to_diffusers(config, sample_size).items() if k != POOLED_MARK}
    return UNet2DConditionModel(**settings).train()


def make_optimizer(unet: nn.Module, defaults: RecipeDefaults = DEFAULTS) -> tuple[torch.optim.Optimizer, Any]:
    """``torch.optim.AdamW`` and diffusers' ``get_scheduler`` exactly as the script makes them."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(unet.parameters(), lr=defaults.learning_rate,
                                  betas=(defaults.adam_beta1, defaults.adam_beta2),
                                  weight_decay=defaults.adam_weight_decay, eps=defaults.adam_epsilon)
    # the script's step count only matters to decaying schedules; "constant" ignores it and the warm-up
    schedule = get_scheduler(defaults.lr_scheduler, optimizer=optimizer, num_warmup_steps=defaults.lr_warmup_steps,
                             num_training_steps=10**9)
    return optimizer, schedule


def recipe_loss(unet: nn.Module, scheduler: Any, latents: Tensor, text: TextEmbedding) -> Tensor:
    """The script's loss on scaled ``latents`` (B, C, h, w): noise and timesteps from the global RNG, in its order."""
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps.long())
    model_pred = unet(noisy_latents, timesteps.long(), text.states, encoder_attention_mask=text.mask.float(),
                      return_dict=False)[0]
    return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")


def train_step(unet: nn.Module, scheduler: Any, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
               latents: Tensor, text: TextEmbedding, defaults: RecipeDefaults = DEFAULTS) -> Tensor:
    """Loss, backward, clip to ``max_grad_norm``, optimizer and learning-rate step, zero_grad (the script's order)."""
    loss = recipe_loss(unet, scheduler, latents, text)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), defaults.max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()
    return loss.detach()


@torch.no_grad()
def encode_batch(batch: dict, autoencoder: Autoencoder, text_encoder: TextEncoder,
                 latent_scale: float) -> tuple[Tensor, TextEmbedding]:
    """Images and captions of one batch -> (scaled latents, text states and mask), both encoded now."""
    latents = encode_latents(autoencoder, batch["image"].float()) * latent_scale
    return latents, text_encoder.encode(list(batch["caption"]))


@torch.no_grad()
def estimate_latent_scale(dataset: Dataset, autoencoder: Autoencoder, items: int = SCALE_ITEMS) -> float:
    """1 / std of the latents of the first ``items`` items (unbiased, over every value, as the cache's scale)."""
    loader = DataLoader(Subset(dataset, range(min(items, len(dataset)))), batch_size=100, shuffle=False)
    latents = torch.cat([encode_latents(autoencoder, batch["image"]) for batch in loader])
    return 1.0 / float(latents.std())


def batches(dataset: Dataset, defaults: RecipeDefaults = DEFAULTS) -> Iterator[dict]:
    """The script's loader, epoch after epoch: shuffled, last partial batch kept, no workers."""
    loader = DataLoader(dataset, batch_size=defaults.train_batch_size, shuffle=True,
                        num_workers=defaults.dataloader_num_workers)
    while True:
        yield from loader


def load_parts(cfg: TrainConfig) -> tuple[Autoencoder, TextEncoder, Dataset, UNetConfig]:
    """The frozen stage-1 autoencoder and text encoder, the dataset and the resolved U-Net config of ``cfg``."""
    autoencoder = Autoencoder.from_pretrained(resolve_autoencoder_dir(cfg.autoencoder)).eval().requires_grad_(False)
    text_encoder = TextEncoder(cfg.text).requires_grad_(False)
    unet_config = cfg.model.resolve(autoencoder.config.code_dim, text_encoder.width)
    return autoencoder, text_encoder, build_dataset(cfg.data), unet_config


class Snapshots:
    """U-Net snapshots every ``every`` minutes since ``start`` (a ``time.time()``), listed in ``snapshots.jsonl``."""

    def __init__(self, out: Path, start: float, every: float, minutes: float) -> None:
        self.out, self.start, self.every, self.minutes = out, start, every, minutes
        self.next = min(every, minutes)

    @property
    def elapsed(self) -> float:
        return (time.time() - self.start) / 60

    def due(self) -> bool:
        return self.elapsed >= self.next

    def save(self, unet: nn.Module, step: int, mean_loss: float) -> None:
        """Save the U-Net (diffusers' layout) and list it with the minutes it was reached at."""
        minutes = self.elapsed
        directory = self.out / f"unet_{step:08d}"
        unet.save_pretrained(directory)
        line = {"minutes": minutes, "step": step, "mean_loss": mean_loss, "unet": directory.name}
        with open(self.out / SNAPSHOTS, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        while self.next <= minutes:
            self.next += self.every


def train(cfg: TrainConfig, out: Path, minutes: float, snapshot_minutes: float, start: float, seed: int = 0,
          latent_scale: float | None = None) -> int:
    """Train until ``minutes`` after ``start``, snapshotting the U-Net on the way; returns the steps done."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    autoencoder, text_encoder, dataset, unet_config = load_parts(cfg)
    scale = latent_scale or estimate_latent_scale(dataset, autoencoder)
    meta = {"latent_scale": scale, "unet_config": unet_config_to_diffusers(unet_config), "defaults": asdict(DEFAULTS),
            "scheduler": SD_SCHEDULER, "seed": seed, "threads": torch.get_num_threads(), "precision": "fp32"}
    (out / "recipe.json").write_text(json.dumps(meta, indent=1, default=list))
    unet, scheduler = build_unet(unet_config), make_scheduler()
    optimizer, lr_scheduler = make_optimizer(unet)
    snapshots, step, total = Snapshots(out, start, snapshot_minutes, minutes), 0, 0.0
    for batch in batches(dataset):
        latents, text = encode_batch(batch, autoencoder, text_encoder, scale)
        total += float(train_step(unet, scheduler, optimizer, lr_scheduler, latents, text))
        step += 1
        if snapshots.due():
            snapshots.save(unet, step, total / step)
            if snapshots.elapsed >= minutes:
                return step
    raise AssertionError("unreachable: the loader is endless")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a latent diffusion YAML: its autoencoder, text encoder, data and U-Net")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. data.size=1000")
    parser.add_argument("--out", required=True, help="folder for the U-Net snapshots and snapshots.jsonl")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget since --start")
    parser.add_argument("--snapshot-minutes", type=float, required=True, help="minutes between U-Net snapshots")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (the script's default is unseeded)")
    parser.add_argument("--latent-scale", type=float, default=None,
                        help=f"latent scale (default: 1 / std over the first {SCALE_ITEMS} items' latents)")
    parser.add_argument("--start", type=float, default=None, help="time.time() the clock starts at (default: now)")
    args = parser.parse_args(argv)
    if not (args.minutes > 0 and args.snapshot_minutes > 0 and args.threads > 0):
        parser.error("--minutes, --snapshot-minutes and --threads must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = args.start if args.start is not None else time.time()
    torch.set_num_threads(args.threads)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    steps = train(cfg, Path(args.out), args.minutes, args.snapshot_minutes, start, args.seed, args.latent_scale)
    print(f"diffusers recipe: {steps} steps in {(time.time() - start) / 60:.2f} min; snapshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
