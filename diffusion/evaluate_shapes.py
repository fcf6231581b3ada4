"""Score a shapes latent diffusion model: prompt accuracy and diversity, printed as JSON.

    python -m diffusion.evaluate_shapes runs/shapes32_diffusion --guidance 4 --steps 20 --sampler dpmpp_2m
    python -m diffusion.evaluate_shapes runs/shapes32_diffusion --sweep 0,1,2,4,8     # prints a list

RUN_DIR is a training run directory (its ``pipeline/`` is used) or a pipeline directory. Accuracy is
the fraction of samples whose colour, shape and position the analytic shapes scorer finds right, over
a fixed set of prompts (:func:`common.evaluation.evaluate_shapes`, shared with the AR prior);
diversity is the mean pairwise RMS distance among the samples of one prompt.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common.evaluation import evaluate_shapes
from diffusion.latent_diffusion import PIPELINE_FILE, LatentDiffusion
from diffusion.samplers import SAMPLERS


def pipeline_dir(path: str | Path) -> Path:
    """``path`` if it is a pipeline directory, else the ``pipeline/`` of the run directory ``path``."""
    path = Path(path)
    for candidate in (path, path / "pipeline"):
        if (candidate / PIPELINE_FILE).is_file():
            return candidate
    raise SystemExit(f"error: {path} is neither a pipeline directory nor a run directory with pipeline/{PIPELINE_FILE}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="training run directory or pipeline directory")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--sweep", default="", help="comma-separated guidance scales, e.g. 0,1,2,4,8 (overrides --guidance)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS))
    parser.add_argument("--prompts", type=int, default=32, help="number of fixed evaluation prompts")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--rescale", type=float, default=0.0, help="guidance rescale in [0, 1]")
    parser.add_argument("--negative", default="", help="negative prompt (default: the null prompt \"\")")
    parser.add_argument("--batch-size", type=int, default=64, help="images per sampling call")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def evaluate(pipe: LatentDiffusion, args: argparse.Namespace, guidance: float) -> dict:
    """Score one guidance scale; the result repeats every setting that produced it."""
    negative = [args.negative] if args.negative else None

    def generate(prompts: list[str], seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return pipe.generate(prompts, negative_prompts=negative, steps=args.steps, guidance=guidance,
                             rescale=args.rescale, sampler=args.sampler, generator=generator)

    start = time.perf_counter()
    scores = evaluate_shapes(generate, num_prompts=args.prompts, samples_per_prompt=args.samples, seed=args.seed,
                             batch_size=args.batch_size)
    settings = {"run_dir": str(args.run_dir), "guidance": guidance, "steps": args.steps, "sampler": args.sampler,
                "rescale": args.rescale, "negative": args.negative, "seed": args.seed}
    return {**settings, **scores, "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scales = [float(s) for s in args.sweep.split(",") if s.strip()] if args.sweep else [args.guidance]
    pipe = LatentDiffusion.from_pretrained(pipeline_dir(args.run_dir)).to(args.device)
    results = [evaluate(pipe, args, scale) for scale in scales]
    json.dump(results if args.sweep else results[0], sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
