"""The main job: ``make demo`` (``python -m pipelines.demo``) on the built-in data.

Stages run in order and each writes what it made under ``--out`` (default ``outputs/demo``):
a preview of the built-in datasets, then (as later stages land) the quick autoencoder, the
generator and the pipeline, ending with a summary of the output paths and timings.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.data import DataConfig, build_dataset
from common.images import save_grid

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def launch(script: str, config: Path, *overrides: str) -> None:
    """Run a training script exactly as a user would: through ``accelerate launch``."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", script, str(config), *overrides]
    print("$ accelerate launch", script, config.relative_to(CONFIGS.parent), *overrides, flush=True)
    subprocess.run(command, check=True, cwd=CONFIGS.parent)


def run_python(module: str, *args: str) -> dict:
    """Run ``python -m module args`` and parse the JSON it prints."""
    result = subprocess.run([sys.executable, "-m", module, *args], check=True, cwd=CONFIGS.parent,
                            capture_output=True, text=True)
    return json.loads(result.stdout[result.stdout.index("{"):])


def train_autoencoder(out: Path, minutes: float) -> dict[str, str]:
    """Train the quick emoji autoencoder (reused when a finished run is already there), evaluate it."""
    run_dir = out / "autoencoder_run"
    if (run_dir / "autoencoder" / "config.json").is_file():
        print(f"reusing the trained autoencoder in {run_dir} (delete it or pass --fresh to retrain)")
    else:
        launch("autoencoder/train.py", CONFIGS / "autoencoder" / "emoji32_quick.yaml",
               f"run.out_dir={run_dir}", f"run.max_minutes={minutes}")
    metrics = run_python("autoencoder.evaluate", str(run_dir), "--data", "emoji", "--split", "heldout")
    (out / "autoencoder_heldout.json").write_text(json.dumps(metrics, indent=2))
    print(f"autoencoder on held-out emoji: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, "
          f"codebook used {metrics['codebook_used']:.1%}, perplexity {metrics['perplexity']:.0f}")
    grid = out / "autoencoder_reconstructions.png"
    shutil.copyfile(run_dir / "samples" / "final.png", grid)
    return {"autoencoder": str(run_dir / "autoencoder"), "autoencoder_reconstructions": str(grid),
            "autoencoder_metrics": str(out / "autoencoder_heldout.json")}


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
    parser.add_argument("--autoencoder-minutes", type=float, default=8.0, help="wall-clock budget of stage 1")
    parser.add_argument("--fresh", action="store_true", help="retrain everything instead of reusing earlier runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    timings, outputs = {}, {}
    start = time.monotonic()
    outputs.update(preview_datasets(out))
    timings["datasets"] = round(time.monotonic() - start, 1)
    outputs.update(train_autoencoder(out, args.autoencoder_minutes))
    timings["autoencoder"] = round(time.monotonic() - start - timings["datasets"], 1)
    summary = {"outputs": outputs, "seconds": timings, "total_seconds": round(time.monotonic() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nlatentgen demo finished")
    for key, path in outputs.items():
        print(f"  {key:<24} {path}")
    print(f"  total {summary['total_seconds']} s (summary: {out / 'summary.json'})")
    return summary


if __name__ == "__main__":
    main()
