"""The main job: ``make demo`` (``python -m pipelines.demo``) on the built-in data.

Stages run in order and each writes what it made under ``--out`` (default ``outputs/demo``):
a preview of the built-in datasets, then (as later stages land) the quick autoencoder, the
generator and the pipeline, ending with a summary of the output paths and timings.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common.data import DataConfig, build_dataset
from common.images import save_grid


def preview_datasets(out: Path, count: int = 64) -> dict[str, str]:
    """Write an image grid of each built-in dataset, captions beside it as JSON."""
    paths = {}
    for name, resolution in (("shapes", 32), ("emoji", 32)):
        dataset = build_dataset(DataConfig(name=name, resolution=resolution))
        step = max(1, len(dataset) // count)
        items = [dataset[i * step] for i in range(min(count, len(dataset)))]
        grid = save_grid(torch.stack([item["image"] for item in items]), out / f"dataset_{name}.png", columns=8, scale=3)
        (out / f"dataset_{name}_captions.json").write_text(json.dumps([item["caption"] for item in items], indent=1))
        paths[f"dataset_{name}"] = str(grid)
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="where every output goes")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings, outputs = {}, {}
    start = time.monotonic()
    outputs.update(preview_datasets(out))
    timings["datasets"] = round(time.monotonic() - start, 1)
    summary = {"outputs": outputs, "seconds": timings, "total_seconds": round(time.monotonic() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nlatentgen demo finished")
    for key, path in outputs.items():
        print(f"  {key:<24} {path}")
    print(f"  total {summary['total_seconds']} s (summary: {out / 'summary.json'})")
    return summary


if __name__ == "__main__":
    main()
