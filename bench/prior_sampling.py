"""Sampling speed of the token priors: our AR static KV cache vs full recomputation vs taming's minGPT
``sample()``, and MaskGIT's parallel decoding.

    python bench/prior_sampling.py [--layers 8] [--width 512] [--heads 8] [--tokens 256] [--batch 8]
                                   [--repeats 3] [--threads 0] [--device cpu] [--variants cached,taming,maskgit]
                                   [--maskgit-steps 10]

All sample ``--tokens`` codes (a 16 x 16 grid by default) from a class prefix of one token, with random
weights and the same architecture (layers, width, heads, MLP 4x, codebook 1024):

- ``cached``: :func:`prior.sampling.sample_tokens` with its static key/value cache (the default path);
- ``uncached``: the same function with ``use_cache=False`` (recomputes the whole sequence every step);
- ``taming``: ``taming.modules.transformer.mingpt.sample`` from taming-transformers 0.0.1, which
  recomputes the whole sequence every step;
- ``maskgit``: :func:`prior.maskgit_sampling.sample_maskgit`, ``--maskgit-steps`` forward passes over all
  tokens (a :class:`prior.maskgit.MaskGIT` of the same size).

Each is run ``--warmup`` times untimed, then ``--repeats`` times; the JSON report gives the median seconds per
call and the ratios of each variant over cached, and of cached and taming over maskgit. No guidance (taming
has none).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Callable

import torch

from bench import device_timer
from prior.maskgit import MaskGIT
from prior.maskgit_sampling import sample_maskgit
from prior.sampling import sample_tokens
from prior.transformer import GPT, Condition, PriorConfig

CODEBOOK = 1024


def timed(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = [device_timer.seconds(fn, device) for _ in range(repeats)]
    return times


def build_ours(args: argparse.Namespace, device: torch.device,
               kind: str = "ar") -> tuple[GPT, Callable[..., torch.Tensor]]:
    """Our prior of ``kind`` ("ar" or "maskgit") and its sampling call."""
    grid = int(args.tokens ** 0.5)
    if grid * grid != args.tokens:
        raise SystemExit(f"--tokens must be a square number, got {args.tokens}")
    config = PriorConfig(codebook_size=CODEBOOK, grid_size=grid, condition="class", num_classes=1000,
                         width=args.width, depth=args.layers, heads=args.heads, kind=kind)
    model = (MaskGIT(config) if kind == "maskgit" else GPT(config)).to(device).eval()
    labels = torch.arange(args.batch, device=device) % 1000

    def sample(use_cache: bool = True) -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(0)
        prefix = model.prefix(Condition(labels=labels))
        if kind == "maskgit":
            return sample_maskgit(model, prefix, steps=args.maskgit_steps, generator=generator)
        return sample_tokens(model, prefix, generator=generator, use_cache=use_cache)

    return model, sample


def build_taming(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    from taming.modules.transformer import mingpt

    model = mingpt.GPT(vocab_size=CODEBOOK, block_size=args.tokens + 1, n_layer=args.layers, n_head=args.heads,
                       n_embd=args.width).to(device).eval()
    start = torch.zeros(args.batch, 1, dtype=torch.long, device=device)  # one conditioning token, like our prefix

    def sample() -> torch.Tensor:
        return mingpt.sample(model, start, steps=args.tokens, temperature=1.0, sample=True)[:, 1:]

    return model, sample


def run(layers: int = 8, width: int = 512, heads: int = 8, tokens: int = 256, batch: int = 8, repeats: int = 3,
        warmup: int = 1, device: str = "cpu", variants: tuple[str, ...] = ("cached", "uncached", "taming"),
        maskgit_steps: int = 10) -> dict:
    """Time the sampling ``variants`` (``cached`` always included) and return the report the command prints."""
    settings = argparse.Namespace(layers=layers, width=width, heads=heads, tokens=tokens, batch=batch,
                                  repeats=repeats, warmup=warmup, maskgit_steps=maskgit_steps)
    device = torch.device(device)
    torch.manual_seed(0)
    ours, sample = build_ours(settings, device)
    builders = {"uncached": lambda: (ours, lambda: sample(False)), "taming": lambda: build_taming(settings, device),
                "maskgit": lambda: build_ours(settings, device, "maskgit")}
    models, calls = {"ours": ours}, {"cached": sample}
    for name in variants:
        if name in builders:
            models[name], calls[name] = builders[name]()
    with torch.no_grad():
        seconds = {name: timed(call, repeats, warmup, device) for name, call in calls.items()}
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    report = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "settings": {k: getattr(settings, k)
                     for k in ("layers", "width", "heads", "tokens", "batch", "repeats", "warmup", "maskgit_steps")},
        "parameters": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()
                       if name != "uncached"},
        "seconds": seconds,
        "median_seconds": medians,
        "tokens_per_second_cached": batch * tokens / medians["cached"],
    }
    for name in ("taming", "uncached"):
        if name in medians:
            report[f"ratio_{name}_over_cached"] = medians[name] / medians["cached"]
    if "maskgit" in medians:
        for name in ("cached", "taming"):
            if name in medians:
                report[f"ratio_{name}_over_maskgit"] = medians[name] / medians["maskgit"]
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="cached,uncached,taming,maskgit", help="what to time (cached always is)")
    parser.add_argument("--maskgit-steps", type=int, default=10, help="MaskGIT's parallel decoding steps")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.layers, args.width, args.heads, args.tokens, args.batch, args.repeats, args.warmup, args.device,
                 tuple(args.variants.split(",")), args.maskgit_steps)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
