"""Our trained autoencoder against diffusers' ``VQModel`` trained for the same wall-clock time.

    python -m bench.vqmodel_equal_time outputs/demo/autoencoder_run [--minutes M] [--quick] [--threads N]

The ``VQModel`` gets our run's architecture (widths, res blocks, attention, latent channels, codebook
size and code dimension), data (its config's dataset, train split), batch size, optimizer settings,
precision and reconstruction loss (L1 + L2 + diffusers' quantizer loss; diffusers ships no GAN or
perceptual training loss). It trains for ``--minutes`` (default: the wall time our run recorded in its
``metrics.jsonl``; ``--quick``: 0.5). Then both are scored by the same function,
:func:`autoencoder.evaluate.evaluate`, on the held-out split: the ``VQModel`` is converted into our
format first (:func:`autoencoder.convert.from_diffusers`, exact by the parity tests), so PSNR and
codebook usage are computed identically. Prints JSON. (:class:`TrainingClock` lets
:mod:`bench.ttq_autoencoder` snapshot the same training at fixed intervals of training time.)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from autoencoder.convert import from_diffusers
from autoencoder.evaluate import component_dir, evaluate
from autoencoder.model import Autoencoder, AutoencoderConfig
from autoencoder.train_config import TrainConfig
from common.config import load_config
from common.data import DataConfig, build_dataset
from common.precision import resolve_precision
from common.training import make_optimizer, read_metrics


def build_vqmodel(config: AutoencoderConfig) -> nn.Module:
    """A diffusers ``VQModel`` with the architecture of our ``config`` (random weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import VQModel
    widths = tuple(config.base_channels * m for m in config.channel_mult)
    attention = [config.resolution // 2 ** i in config.attn_resolutions for i in range(len(widths))]
    down = tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention)
    up = tuple(kind.replace("Down", "Up").replace("Encoder", "Decoder") for kind in reversed(down))
    return VQModel(block_out_channels=widths, down_block_types=down, up_block_types=up,
                   layers_per_block=config.num_res_blocks, latent_channels=config.z_channels,
                   num_vq_embeddings=config.codebook_size, vq_embed_dim=config.code_dim,
                   sample_size=config.resolution, norm_num_groups=math.gcd(32, widths[0]),
                   mid_block_add_attention=config.mid_attention)


def batches(data: DataConfig, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled image batches; the dataset is built (rendered) now, before any clock starts."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(build_dataset(data), batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)

    def endless() -> Iterator[torch.Tensor]:
        while True:
            for item in loader:
                yield item["image"]
    return endless()


class TrainingClock:
    """Seconds of training alone, with optional snapshots every ``every`` seconds of it.

    ``begin`` starts it (after the data is ready). ``snapshot(step, seconds)`` is called when another
    ``every`` seconds have passed (``tick``) and at the end (``finish``, unless that step was just
    taken); the time it takes (saving weights) is not training time, so snapshots taken often do not
    slow the curve they sample.
    """

    def __init__(self, every: float = 0.0, snapshot: Callable[[int, float], None] | None = None) -> None:
        self.every, self.snapshot = every, snapshot
        self.start, self.excluded, self.due, self.taken = time.perf_counter(), 0.0, every, -1

    def begin(self) -> None:
        self.start, self.excluded, self.due = time.perf_counter(), 0.0, self.every

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def tick(self, step: int) -> None:
        if self.snapshot is not None and self.every > 0 and self.seconds >= self.due:
            self.due = (self.seconds // self.every + 1) * self.every
            self._take(step)

    def finish(self, step: int) -> None:
        if self.snapshot is not None and step != self.taken:
            self._take(step)

    def _take(self, step: int) -> None:
        began, seconds = time.perf_counter(), self.seconds
        self.snapshot(step, seconds)
        self.excluded += time.perf_counter() - began
        self.taken = step


def train_for(model: nn.Module, cfg: TrainConfig, seconds: float, device: torch.device,
              echo: Callable[[str], None] = lambda line: None, clock: TrainingClock | None = None) -> dict:
    """Train ``model`` on ``cfg.data`` for ``seconds`` of training time (``clock``'s, which may take
    snapshots on the way; default: none); returns steps and the loss curve."""
    torch.manual_seed(cfg.run.seed)
    optimizer, schedule = make_optimizer(model.parameters(), cfg.optim)
    data = batches(dataclasses.replace(cfg.data, split="train"), cfg.run.batch_size, cfg.run.seed)
    # The precision our run trained in (config.yaml records the resolved one; "auto" in an older record
    # resolves the same way on this machine), so both models train alike.
    bf16 = resolve_precision(cfg.run.precision, device).precision == "bf16"
    curve, step, clock = [], 0, clock or TrainingClock()
    model.train()
    clock.begin()
    while clock.seconds < seconds:
        x = next(data).to(device)
        context = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with context:
            recon, quantizer_loss = model(x, return_dict=False)
        error = recon.float() - x
        rec = cfg.loss.l1_weight * error.abs().mean() + cfg.loss.l2_weight * error.square().mean()
        loss = rec + cfg.loss.codebook_weight * quantizer_loss.float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        schedule.step()
        step += 1
        if step == 1 or step % 10 == 0:
            curve.append({"step": step, "seconds": clock.seconds, "loss": loss.item(), "rec": rec.item()})
        if step % cfg.run.log_every == 0:
            echo(f"  VQModel step {step}: loss {loss.item():.4f} ({curve[-1]['seconds']:.0f} s)")
        clock.tick(step)
    clock.finish(step)
    return {"steps": step, "seconds": clock.seconds, "curve": curve, "bf16": bf16}


def recorded_seconds(run_dir: str | Path) -> tuple[int, float]:
    """The last logged step of a run and its wall time in seconds (0, 0.0 without metrics)."""
    metrics = [m for m in read_metrics(run_dir) if "seconds" in m]
    return (int(metrics[-1]["step"]), float(metrics[-1]["seconds"])) if metrics else (0, 0.0)


def run(run_dir: str | Path, minutes: float = 0.0, split: str = "heldout", device: str = "cpu",
        echo: Callable[[str], None] = lambda line: None) -> dict:
    """Train the ``VQModel`` for ``minutes`` (0: our run's recorded time) and score both models."""
    run_dir = Path(run_dir)
    cfg = load_config(TrainConfig, run_dir / "config.yaml")
    if cfg.model.kind != "vq":
        raise SystemExit(f"error: {run_dir} holds a {cfg.model.kind!r} autoencoder; this compares VQ models")
    our_steps, our_seconds = recorded_seconds(run_dir)
    seconds = minutes * 60 if minutes else our_seconds
    if seconds <= 0:
        raise SystemExit(f"error: {run_dir}/metrics.jsonl records no wall time; pass --minutes")
    target = torch.device(device)
    theirs = build_vqmodel(cfg.model).to(target)
    echo(f"training diffusers VQModel ({count(theirs) / 1e6:.2f} M parameters) for {seconds / 60:.1f} min")
    training = train_for(theirs, cfg, seconds, target, echo)
    data = DataConfig(name=cfg.data.name, resolution=cfg.model.resolution, split=split, path=cfg.data.path,
                      size=cfg.data.size)
    ours = Autoencoder.from_pretrained(component_dir(run_dir)).to(target).eval()
    converted = from_diffusers(theirs.cpu()).to(target).eval()
    echo(f"evaluating both on {cfg.data.name} {split}")
    return {
        "run_dir": str(run_dir), "data": cfg.data.name, "split": split, "resolution": cfg.model.resolution,
        "batch_size": cfg.run.batch_size, "precision": cfg.run.precision,
        "ours": {"parameters": count(ours), "steps": our_steps, "train_seconds": our_seconds,
                 **evaluate(ours, data)},
        "vqmodel": {"parameters": count(theirs), "steps": training["steps"], "train_seconds": training["seconds"],
                    "curve": training["curve"], **evaluate(converted, data)},
    }


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="our autoencoder training run (config.yaml, metrics.jsonl, autoencoder/)")
    parser.add_argument("--minutes", type=float, default=0.0, help="VQModel training time (0: our run's recorded time)")
    parser.add_argument("--quick", action="store_true", help="train the VQModel for 0.5 minutes")
    parser.add_argument("--split", default="heldout", choices=["train", "heldout", "all"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    minutes = 0.5 if args.quick and not args.minutes else args.minutes
    result = run(args.run_dir, minutes, args.split, args.device, echo=lambda line: print(line, file=sys.stderr))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
