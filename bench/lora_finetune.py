"""LoRA fine-tuning of a trained text-to-image model on a folder of one new concept, measured.

    python -m bench.lora_finetune outputs/demo/pipeline [--minutes 5] [--out runs/lora_bench]
    python -m bench.lora_finetune BASE --folder MY_PHOTOS --prompt "my cat"     # a concept of your own

1. The concept folder: 16 shapes images of one caption (default "a large red square in the center", drawn
   with the dataset's jitter at the base autoencoder's resolution; ``.txt`` captions beside them), or
   ``--folder`` with ``--prompt``.
2. A LoRA run on it: ``diffusion/train_latent.py`` with ``configs/diffusion/lora_quick.yaml`` (rank 8 on the
   cross-attention keys and values, no condition dropout, 300 steps), ``init_from`` and ``autoencoder`` = the
   base, the model and diffusion process read from the base's own files (so any base fits), for at most
   ``--minutes`` (``run.max_minutes``).
3. The base pipeline samples the concept prompt and a few other prompts with fixed seeds, then again with
   the adapter loaded, then unloaded. Printed as JSON: the concept's shapes-scorer accuracy (shapes
   concepts) and mean nearest-neighbour pixel distance to the folder's images, base vs adapter; the mean
   absolute change of the other prompts' images, beside the change one seed to the next makes; whether
   unloading gave back the base's images bit for bit; the adapter's size against the U-Net's; wall times.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from common.checkpoint import find_pipeline_dir
from common.data.shapes import parse_caption, prompt_accuracy, render
from common.images import pil_to_tensor
from common.lora import ADAPTER_DIR, ADAPTER_FILE
from common.run_state import latest_checkpoint
from diffusion.train_config import TRAINING_ONLY
from pipelines import TextToImage

CONCEPT = "a large red square in the center"
OTHERS = ("dog", "red apple", "rocket", "ghost", "snowman", "cat face")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "diffusion" / "lora_quick.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the base: a text-to-image pipeline directory or a diffusion run directory")
    parser.add_argument("--out", default="runs/lora_bench", help="working directory (folder, run, results)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget (run.max_minutes)")
    parser.add_argument("--steps", type=int, default=0, help="training step cap (run.steps; 0: the config's)")
    parser.add_argument("--folder", default="", help="a concept folder of your own (captions beside the images)")
    parser.add_argument("--prompt", default=CONCEPT, help="the concept's prompt (its caption)")
    parser.add_argument("--images", type=int, default=16, help="concept images to draw (shapes concepts)")
    parser.add_argument("--samples", type=int, default=8, help="images per prompt, seeds 0..N-1")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("overrides", nargs="*", help="more training overrides, e.g. lora.rank=4 optim.lr=1e-3")
    return parser.parse_intermixed_args(argv)


def write_concept(folder: Path, caption: str, resolution: int, count: int) -> Path:
    """``count`` jittered shapes images of ``caption`` with ``.txt`` captions (the folder dataset's sidecars)."""
    spec, rng = parse_caption(caption), np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        render(spec, resolution, rng).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n")
    return folder


def base_sections(pipeline: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The model, diffusion and text sections of the base's own files (the run must build the base's U-Net and
    keep its process), with the config's training-only diffusion settings (no condition dropout)."""
    unet = json.loads((pipeline / "unet" / "config.json").read_text())["config"]
    meta = json.loads((pipeline / "pipeline.json").read_text())
    for derived in ("in_channels", "out_channels"):  # the training script fills them from the autoencoder
        unet.pop(derived, None)
    ours = {key: value for key, value in config["diffusion"].items() if key in TRAINING_ONLY}
    return {"model": unet, "diffusion": {**meta["diffusion"], **ours}, "text": meta["text_encoder"]}


def train(args: argparse.Namespace, pipeline: Path, folder: Path, resolution: int, out: Path) -> float:
    """The LoRA run through ``accelerate launch`` (one process; the script picks its precision); its wall time."""
    config = yaml.safe_load(CONFIG.read_text())
    config.update(base_sections(pipeline, config), init_from=str(pipeline), autoencoder=str(pipeline),
                  cache_dir=str(out / "cache"))
    config["data"].update(path=str(folder), resolution=resolution)
    config["run"].update(out_dir=str(out / "run"), max_minutes=args.minutes, steps=args.steps or config["run"]["steps"])
    (out / "lora.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--dynamo_backend", "no", "--mixed_precision", "no", "diffusion/train_latent.py",
               str(out / "lora.yaml"), *args.overrides]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return time.perf_counter() - start


def generate(pipe: TextToImage, prompt: str, args: argparse.Namespace) -> torch.Tensor:
    """``--samples`` images of ``prompt``, one per seed 0..N-1 (the same seeds with and without the adapter)."""
    images = [pipe([prompt], seed=seed, num_inference_steps=args.sampling_steps, guidance_scale=args.guidance,
                   output_type="pt", progress=False).images for seed in range(args.samples)]
    return torch.cat(images)


def nearest_distance(images: torch.Tensor, references: torch.Tensor) -> float:
    """Mean over ``images`` of the RMS pixel distance (in [0, 1] units) to the nearest reference image."""
    distances = torch.cdist(images.flatten(1), references.flatten(1)) / images[0].numel() ** 0.5
    return float(distances.min(dim=1).values.mean())


def concept_scores(images: torch.Tensor, references: torch.Tensor, prompt: str) -> dict[str, float]:
    scores = {"nn_distance": nearest_distance(images, references)}
    try:
        scores["shapes_accuracy"] = prompt_accuracy(images * 2 - 1, [prompt] * len(images))["correct"]
    except ValueError:  # not a shapes caption: the nearest-neighbour distance alone
        pass
    return scores


def references(folder: Path, resolution: int) -> torch.Tensor:
    """The folder's images (3, R, R) in [0, 1], resized to the model's resolution."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    images = [pil_to_tensor(Image.open(p).resize((resolution, resolution), Image.BICUBIC)) for p in paths]
    return (torch.stack(images) + 1) / 2


def measure(args: argparse.Namespace, pipeline: Path, folder: Path, run_dir: Path, resolution: int) -> dict[str, Any]:
    pipe = TextToImage.from_pretrained(pipeline, precision="fp32")
    concept = references(folder, resolution)
    prompts = [args.prompt, *OTHERS]
    base = {prompt: generate(pipe, prompt, args) for prompt in prompts}
    pipe.load_lora(run_dir)
    tuned = {prompt: generate(pipe, prompt, args) for prompt in prompts}
    pipe.unload_lora()
    restored = generate(pipe, args.prompt, args)
    others = {p: float((tuned[p] - base[p]).abs().mean()) for p in OTHERS}
    seed_change = float(np.mean([float((base[p][1:] - base[p][:-1]).abs().mean()) for p in OTHERS]))
    adapter, unet = run_dir / ADAPTER_DIR / ADAPTER_FILE, pipeline / "unet" / "model.safetensors"
    return {
        "concept": args.prompt, "base": concept_scores(base[args.prompt], concept, args.prompt),
        "adapter": concept_scores(tuned[args.prompt], concept, args.prompt),
        "concept_mean_abs_change": float((tuned[args.prompt] - base[args.prompt]).abs().mean()),
        "other_prompts_mean_abs_change": others, "other_prompts_seed_to_seed_change": seed_change,
        "unload_bit_exact": bool(torch.equal(restored, base[args.prompt])),
        "adapter_bytes": adapter.stat().st_size, "unet_bytes": unet.stat().st_size,
        "adapter_fraction": adapter.stat().st_size / unet.stat().st_size,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out).resolve()  # the training subprocess runs in the repository root
    pipeline = find_pipeline_dir(args.base).resolve()
    resolution = json.loads((pipeline / "autoencoder" / "config.json").read_text())["config"]["resolution"]
    if args.folder:
        folder = Path(args.folder).resolve()
    else:
        folder = write_concept(out / "concept", args.prompt, resolution, args.images)
    train_seconds = train(args, pipeline, folder, resolution, out)
    start = time.perf_counter()
    result = measure(args, pipeline, folder, out / "run", resolution)
    steps = json.loads((latest_checkpoint(out / "run") / "step.json").read_text())["step"]
    result.update(train_seconds=round(train_seconds, 1), train_steps=steps,
                  measure_seconds=round(time.perf_counter() - start, 1), threads=torch.get_num_threads())
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
