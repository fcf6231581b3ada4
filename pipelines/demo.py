"""The main job: ``make demo`` (``python -m pipelines.demo``) on the built-in emoji data.

Stages run in order and each writes what it made under ``--out`` (default ``outputs/demo``):

1. a preview of the built-in datasets;
2. the quick stage-1 autoencoder (``configs/autoencoder/emoji32_quick.yaml``), evaluated on held-out emoji;
3. the quick text-to-image latent diffusion model on its latents (``configs/diffusion/emoji32_quick.yaml``);
4. the pipeline assembled from both (``outputs/demo/pipeline``) and a grid of samples for a few prompts,
   "a dog" first;

and ends with a summary of the output paths and timings. Each training stage runs through
``accelerate launch`` exactly as a user would, and a finished stage is reused by the next ``make demo``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.data import DataConfig, build_dataset
from common.images import save_grid
from pipelines import TextToImage
from pipelines.png_info import Layout, Parameters, call, identify, recorded_options, render, save_png

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPTS = ("a dog", "dog face", "cat face", "red apple", "rocket", "grinning face", "snowman", "ghost")
# The steps each stage needs for a grid in which every row shows its emoji, as the runs log them (every 50):
# the fewest with which a fresh-clone demo of the shipped recipes drew every row (the README's demo table).
FULL_GRID_STEPS = {"autoencoder": 650, "diffusion": 4950}


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


def full_grid_minutes(runs: dict[str, dict], minutes: dict[str, float]) -> dict[str, float] | None:
    """The stage budgets that would reach :data:`FULL_GRID_STEPS` at each stage's measured rate on this
    machine (never less than the budget given, rounded up to half minutes), or None when every stage already
    reached its steps or a stage logged no rate to scale."""
    rates = {stage: runs[stage]["steps_per_second"] for stage in FULL_GRID_STEPS}
    if all((runs[stage]["steps"] or 0) >= steps for stage, steps in FULL_GRID_STEPS.items()) or not all(rates.values()):
        return None
    return {stage: max(minutes[stage], math.ceil(steps / rates[stage] / 30) / 2)  # steps / rate / 60, in halves
            for stage, steps in FULL_GRID_STEPS.items()}


def run_facts(run_dir: Path) -> dict:
    """What a training run did: the precision it chose (and why), its steps and its training rate."""
    record = json.loads((run_dir / "environment.json").read_text())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    return {"precision": record["precision"]["chosen"], "precision_reason": record["precision"]["reason"],
            "steps": last.get("step"), "steps_per_second": last.get("steps_per_second")}


def train_autoencoder(out: Path, minutes: float, precision: str) -> dict[str, str]:
    """Train the quick emoji autoencoder (reused when a finished run is already there), evaluate it."""
    run_dir = out / "autoencoder_run"
    if (run_dir / "autoencoder" / "config.json").is_file():
        print(f"reusing the trained autoencoder in {run_dir} (delete it or pass --fresh to retrain)")
    else:
        launch("autoencoder/train.py", CONFIGS / "autoencoder" / "emoji32_quick.yaml",
               f"run.out_dir={run_dir}", f"run.max_minutes={minutes}", f"run.precision={precision}")
    metrics = run_python("autoencoder.evaluate", str(run_dir), "--data", "emoji", "--split", "heldout")
    (out / "autoencoder_heldout.json").write_text(json.dumps(metrics, indent=2))
    print(f"autoencoder on held-out emoji: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}, "
          f"codebook used {metrics['codebook_used']:.1%}, perplexity {metrics['perplexity']:.0f}")
    grid = out / "autoencoder_reconstructions.png"
    shutil.copyfile(run_dir / "samples" / "final.png", grid)
    return {"autoencoder": str(run_dir / "autoencoder"), "autoencoder_reconstructions": str(grid),
            "autoencoder_metrics": str(out / "autoencoder_heldout.json")}


def train_diffusion(out: Path, autoencoder_run: Path, minutes: float, precision: str) -> dict[str, str]:
    """Train the quick emoji diffusion model on the autoencoder's latents (reused when finished)."""
    run_dir = out / "diffusion_run"
    if (run_dir / "pipeline" / "pipeline.json").is_file() and (run_dir / "samples" / "final.png").is_file():
        print(f"reusing the trained diffusion model in {run_dir} (delete it or pass --fresh to retrain)")
    else:
        launch("diffusion/train_latent.py", CONFIGS / "diffusion" / "emoji32_quick.yaml",
               f"autoencoder={autoencoder_run}", f"cache_dir={out / 'latent_cache'}",
               f"run.out_dir={run_dir}", f"run.max_minutes={minutes}", f"run.precision={precision}")
    return {"diffusion_run": str(run_dir), "diffusion_samples": str(run_dir / "samples" / "final.png")}


def render_prompts(out: Path, diffusion_run: Path, prompts: list[str], per_prompt: int, seed: int) -> dict[str, str]:
    """Assemble the text-to-image pipeline, save it, and sample a grid: one row per prompt. The PNG carries
    its settings (``python -m pipelines.generate --from-png`` makes it again)."""
    pipe = TextToImage.from_pretrained(diffusion_run)
    pipeline_dir = pipe.save_pretrained(out / "pipeline")
    given = dict(num_images_per_prompt=per_prompt, seed=seed)
    options = recorded_options(given, pipe.options(given).report(pipe.facts))
    parameters = Parameters(identify(pipeline_dir), type(pipe).__name__, list(prompts), options, (0, 0),
                            Layout(columns=per_prompt, scale=3, labels=True))
    images = call(pipe, parameters, progress=True)
    parameters = dataclasses.replace(parameters, size=(images[0].height, images[0].width))
    grid = save_png(render(images, parameters), out / "text_to_image.png", parameters)
    (out / "text_to_image_prompts.json").write_text(json.dumps({"rows": prompts, "seed": seed}, indent=1))
    print(f"text-to-image grid: {grid} (rows: {', '.join(repr(p) for p in prompts)})")
    return {"pipeline": str(pipeline_dir), "text_to_image": str(grid)}


def preview_datasets(out: Path, count: int = 64) -> dict[str, str]:
    """Write an image grid of each built-in dataset, captions beside it as JSON."""
    paths = {}
    for name, resolution in (("shapes", 32), ("emoji", 32)):
        dataset = build_dataset(DataConfig(name=name, resolution=resolution))
        step = max(1, len(dataset) // count)
        items = [dataset[i * step] for i in range(min(count, len(dataset)))]
        images = torch.stack([item["image"] for item in items])
        grid = save_grid(images, out / f"dataset_{name}.png", columns=8, scale=3)
        (out / f"dataset_{name}_captions.json").write_text(json.dumps([item["caption"] for item in items], indent=1))
        paths[f"dataset_{name}"] = str(grid)
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="where every output goes")
    # 4.5 + 11.5: the grid is limited by diffusion steps (recall, uniform t: 64 % at 3,800 steps, 91 % at 5,000, 97.5 %
    # at 7,600), not by stage 1 (a 1,800-step autoencoder's reconstructions: 99.7 % nearest their own glyph).
    # Moving a minute from 5.5 + 10.5 raised the fp32 demo's recall from 68.8 % to 82.1 % (README).
    parser.add_argument("--autoencoder-minutes", type=float, default=4.5, help="wall-clock budget of stage 1")
    parser.add_argument("--diffusion-minutes", type=float, default=11.5, help="wall-clock budget of stage 2")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), help="rows of the sample grid")
    parser.add_argument("--per-prompt", type=int, default=6, help="images per prompt (grid columns)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the grid")
    parser.add_argument("--fresh", action="store_true", help="retrain everything instead of reusing earlier runs")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="training precision of both stages; auto: bf16 only on hardware that runs it natively")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    outputs: dict[str, str] = {}
    start = last = time.monotonic()

    def timed(name: str, paths: dict[str, str]) -> None:
        nonlocal last
        outputs.update(paths)
        timings[name] = round(time.monotonic() - last, 1)
        last = time.monotonic()

    timed("datasets", preview_datasets(out))
    timed("autoencoder", train_autoencoder(out, args.autoencoder_minutes, args.precision))
    timed("diffusion", train_diffusion(out, out / "autoencoder_run", args.diffusion_minutes, args.precision))
    timed("text_to_image", render_prompts(out, out / "diffusion_run", args.prompts, args.per_prompt, args.seed))
    runs = {stage: run_facts(out / f"{stage}_run") for stage in ("autoencoder", "diffusion")}
    needed = full_grid_minutes(runs, {"autoencoder": args.autoencoder_minutes, "diffusion": args.diffusion_minutes})
    summary = {"outputs": outputs, "seconds": timings, "total_seconds": round(time.monotonic() - start, 1),
               "training": runs, "autoencoder_heldout": json.loads((out / "autoencoder_heldout.json").read_text()),
               "full_grid_minutes": needed}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nlatentgen demo finished")
    for key, path in outputs.items():
        print(f"  {key:<28} {path}")
    print("  seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    for stage, facts in runs.items():
        print(f"  {stage}: {facts['steps']} steps, {facts['steps_per_second'] or 0:.2f} steps/s, {facts['precision']} "
              f"({facts['precision_reason']})")
    print(f"  total {summary['total_seconds']} s (summary: {out / 'summary.json'})")
    if needed:
        print(f"  this machine trained fewer steps than a full grid needs (about {FULL_GRID_STEPS['autoencoder']:,} + "
              f"{FULL_GRID_STEPS['diffusion']:,}), so some rows may not show their emoji; at its measured rates "
              f"they take {needed['autoencoder']:g} + {needed['diffusion']:g} minutes: make demo ARGS=\"--fresh "
              f"--autoencoder-minutes {needed['autoencoder']:g} --diffusion-minutes {needed['diffusion']:g}\"")
    print(f"try: python -m pipelines.generate {out / 'pipeline'} \"a dog\" -n 4 --seed 1 -o dog.png")
    return summary


if __name__ == "__main__":
    main()
