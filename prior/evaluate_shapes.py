"""Score a shapes token prior: prompt accuracy and diversity, printed as JSON.

    python -m prior.evaluate_shapes runs/shapes32_quick_prior --guidance 2 --top-k 0 --temperature 1
    python -m prior.evaluate_shapes runs/shapes32_quick_prior --sweep 0,1,2,4     # prints a list

RUN_DIR is a training run directory (its ``pipeline/`` is used) or a pipeline directory. The prompts,
scorer and output format are those of ``python -m diffusion.evaluate_shapes``
(:func:`common.evaluation.evaluate_shapes`), so the two generators are compared on the same terms.
Options left out take the pipeline's recorded sampling defaults; every result repeats the settings
that produced it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common.checkpoint import find_pipeline_dir
from common.evaluation import evaluate_shapes, finite_number, number_list, whole_number
from pipelines.tokens_to_image import TokensToImage
from prior.token_prior import TRAIN_PRIOR


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    count, number = whole_number(1), finite_number()
    parser.add_argument("run_dir", help="training run directory or pipeline directory")
    parser.add_argument("--guidance", type=number, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--sweep", type=number_list, default="",
                        help="comma-separated guidance scales, e.g. 0,1,2,4 (overrides --guidance)")
    parser.add_argument("--guidance-tokens", type=whole_number(0), default=None,
                        help="guide only the first N tokens (0: all)")
    parser.add_argument("--temperature", type=number, default=None)
    parser.add_argument("--top-k", type=whole_number(0), default=None, help="0 keeps every code")
    parser.add_argument("--top-p", type=number, default=None, help="1 keeps every code")
    parser.add_argument("--negative", default="", help="negative prompt (default: the learned null condition)")
    parser.add_argument("--prompts", type=count, default=32, help="number of fixed evaluation prompts")
    parser.add_argument("--samples", type=count, default=4, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--batch-size", type=count, default=64, help="images per sampling call")
    parser.add_argument("--threads", type=whole_number(0), default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def load(run_dir: str, device: str) -> TokensToImage:
    """The token prior pipeline of ``run_dir`` on ``device``, sampling in fp32 (so scores stay comparable with
    those of earlier runs, whatever the machine's precision="auto" picks)."""
    return TokensToImage.from_pretrained(find_pipeline_dir(run_dir, TRAIN_PRIOR)).to(device, "fp32")


def evaluate(pipe: TokensToImage, args: argparse.Namespace, guidance: float) -> dict:
    """Score one guidance scale; the result repeats every setting that produced it."""
    given = {"guidance_tokens": args.guidance_tokens, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p}
    given = {k: v for k, v in given.items() if v is not None}
    sampling = {**vars(pipe.model.sampling), **given, "guidance": guidance}
    options = dict(given, guidance_scale=guidance, progress=False, output_type="latent")
    if args.negative:
        options["negative_prompt"] = args.negative

    def generate(prompts: list[str], seed: int) -> torch.Tensor:
        # seed: a CPU generator, the same tokens on any device
        return pipe.model.decode(pipe(prompts, seed=seed, **options).images)

    start = time.perf_counter()
    scores = evaluate_shapes(generate, num_prompts=args.prompts, samples_per_prompt=args.samples, seed=args.seed,
                             batch_size=args.batch_size)
    settings = {"run_dir": str(args.run_dir), **sampling, "negative": args.negative, "seed": args.seed}
    return {**settings, **scores, "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> dict | list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load(args.run_dir, args.device)
    default = args.guidance if args.guidance is not None else pipe.default_guidance_scale
    scales = args.sweep or [default]
    results = [evaluate(pipe, args, scale) for scale in scales]
    report = results if args.sweep else results[0]
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
