"""Training throughput with the latent cache against encoding every batch on the fly.

    python -m bench.latent_caching [--config configs/diffusion/shapes32_quick.yaml] [--steps 10] [--repeats 5]

Both ways train the same U-Net (the config's) with the same loss, optimizer and batch size, in one
process. "cached" reads latents and caption ids from the latent cache and gathers the cached text
embeddings; "on the fly" loads the images and captions from the dataset and runs the frozen
autoencoder (VQ: encode, then snap to the codebook) and the text encoder on every batch, as a
training loop without a cache would. Runs alternate between the two ways so that a drifting clock
or a neighbour on a shared machine hits both alike; the result is the median samples/s of each and
their ratio (goal: >= 3x). Building the cache is a one-off cost, reported separately.

If the config's autoencoder has not been trained yet, ``--autoencoder-config`` builds one with random
weights from a stage-1 YAML: throughput does not depend on the weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from autoencoder.model import Autoencoder, build_autoencoder
from autoencoder.train_config import TrainConfig as StageOneConfig
from common.config import load_config
from common.data import build_dataset
from common.text_encoder import TextEncoder
from diffusion.latent_cache import NULL_CAPTION, NULL_ID, encode_latents, load_or_build_cache
from diffusion.objectives import drop_condition, training_loss
from diffusion.train_config import TrainConfig
from diffusion.unet import UNet


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/diffusion/shapes32_quick.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. run.batch_size=32")
    parser.add_argument("--autoencoder-config", default="configs/autoencoder/shapes32_quick.yaml",
                        help="stage-1 YAML for a random-weight autoencoder when the config's is missing")
    parser.add_argument("--items", type=int, default=2048, help="shapes items to cache (data.size)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each way")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def autoencoder_dir(cfg: TrainConfig, args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    """The trained autoencoder of the config, or a random one saved into ``scratch``."""
    for candidate in (Path(cfg.autoencoder), Path(cfg.autoencoder) / "autoencoder"):
        if (candidate / "config.json").is_file():
            return candidate, str(candidate)
    model = build_autoencoder(load_config(StageOneConfig, args.autoencoder_config).model)
    return model.save_pretrained(scratch / "autoencoder"), f"random weights ({args.autoencoder_config})"


def endless(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def make_steps(cfg: TrainConfig, args: argparse.Namespace, ae_dir: Path, scratch: Path) -> tuple[dict, float, dict]:
    """The two training steps as closures over their own U-Net and optimizer, the cache build time, and
    each step's seconds per part (filled in as they run)."""
    device = torch.device(args.device)
    autoencoder = Autoencoder.from_pretrained(ae_dir).to(device).requires_grad_(False)
    text_encoder = TextEncoder(cfg.text).to(device)
    model_cfg = cfg.model.resolve(autoencoder.config.code_dim, text_encoder.width)
    start = time.perf_counter()
    cache = load_or_build_cache(ae_dir, cfg.data, cfg.text, scratch / "cache", autoencoder=autoencoder,
                                text_encoder=text_encoder, device=device).text_to(device)
    build_seconds = time.perf_counter() - start
    schedule, batch = cfg.diffusion.make_schedule(), cfg.run.batch_size
    cached_batches = endless(DataLoader(cache, batch_size=batch, shuffle=True, drop_last=True))
    image_batches = endless(DataLoader(build_dataset(cfg.data), batch_size=batch, shuffle=True, drop_last=True))

    def trainer() -> Callable[[torch.Tensor, object], None]:
        torch.manual_seed(0)
        unet = UNet(model_cfg).to(device).train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr)

        def update(latents: torch.Tensor, text) -> None:
            training_loss(unet, schedule, cfg.diffusion, latents, text).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return update

    update_cached, update_live = trainer(), trainer()

    def cached() -> None:
        clock = time.perf_counter()
        item = next(cached_batches)
        ids = drop_condition(item["caption_id"].to(device), cfg.diffusion.cond_drop_prob, NULL_ID)
        latents, text = item["latent"].to(device), cache.text(ids)
        clock = lap("cached: load batch", clock)
        update_cached(latents, text)
        lap("cached: unet step", clock)

    def on_the_fly() -> None:
        clock = time.perf_counter()
        item = next(image_batches)
        drop = torch.rand(len(item["caption"])) < cfg.diffusion.cond_drop_prob
        captions = [NULL_CAPTION if d else c for c, d in zip(item["caption"], drop.tolist())]
        clock = lap("on the fly: load images", clock)
        with torch.no_grad():
            latents = encode_latents(autoencoder, item["image"].to(device)) * cache.latent_scale
            clock = lap("on the fly: autoencoder", clock)
            text = text_encoder.encode(captions)
            clock = lap("on the fly: text encoder", clock)
        update_live(latents, text)
        lap("on the fly: unet step", clock)

    def lap(name: str, since: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        breakdown.setdefault(name, []).append(now - since)
        return now

    breakdown: dict[str, list[float]] = {}
    return {"cached": cached, "on_the_fly": on_the_fly}, build_seconds, breakdown


def timed(step: Callable[[], None], steps: int, device: str) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    """Measure both ways with the settings of :func:`parse_args`; returns the report the command prints."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    with tempfile.TemporaryDirectory() as scratch:
        ae_dir, ae_source = autoencoder_dir(cfg, args, Path(scratch))
        data = dataclasses.replace(cfg.data, size=args.items) if cfg.data.name == "shapes" else cfg.data
        cfg = dataclasses.replace(cfg, data=data, cache_dir=str(Path(scratch) / "cache"))
        steps, build_seconds, breakdown = make_steps(cfg, args, ae_dir, Path(scratch))
        for step in steps.values():  # warm-up: allocator, kernels, first batches
            timed(step, 2, args.device)
        breakdown.clear()
        rates: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                rates[name].append(args.steps * cfg.run.batch_size / timed(step, args.steps, args.device))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "config": args.config, "autoencoder": ae_source, "device": args.device, "threads": torch.get_num_threads(),
        "batch_size": cfg.run.batch_size, "steps_per_run": args.steps, "repeats": args.repeats,
        "cached_samples_per_s": round(medians["cached"], 2),
        "on_the_fly_samples_per_s": round(medians["on_the_fly"], 2),
        "speedup": round(medians["cached"] / medians["on_the_fly"], 2),
        "cache_build_seconds": round(build_seconds, 1),
        "cache_items": args.items if cfg.data.name == "shapes" else None,
        "ms_per_batch": {name: round(1000 * statistics.median(v), 1) for name, v in breakdown.items()},
        "runs": {name: [round(v, 2) for v in values] for name, values in rates.items()},
    }
    return result


def main(argv: list[str] | None = None) -> None:
    result = run(parse_args(argv))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
