"""Does each prompt draw its emoji? A number for what the demo grid shows by eye.

    python -m bench.emoji_recall outputs/demo/pipeline [NAME=PIPELINE ...] [--prompts "a dog" ghost ...]
                                 [--random 32] [--samples 6] [--seed 0] [--threads N]

Each prompt names one training glyph: its caption after taking off a caption template (``"a dog"`` ->
``"dog"``, ``"ghost emoji"`` -> ``"ghost"``). Every generated image is matched to its nearest glyph among
all 1,230 training glyphs by RMS pixel distance; the image *shows its emoji* when that nearest glyph is
the prompted one. Pixel nearest neighbours suit this data: the model learns each glyph from one training
image, so a right sample is a (slightly blurred) copy of it, and a coloured blob lands on whichever glyph
has the closest colours. The default prompts and seed are the demo grid's, so the figures count the grid.
``--random K`` adds K training captions drawn with a fixed seed (as ``"a {caption}"``): a wider sample of
the set than the eight demo rows. Prints JSON: per prompt the hits, the nearest glyph of every sample and
its distance; per pipeline the rows drawn (at least half the samples hit) and the overall hit rate.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any

import torch

from common.data.emoji import EmojiDataset
from pipelines import TextToImage
from pipelines.demo import PROMPTS

PREFIXES = ("a ", "an ", "the ")  # with the " emoji" suffix: the caption templates a prompt may use


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", help="PATH or NAME=PATH of text-to-image pipelines or runs")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), help="prompts (default: the demo's rows)")
    parser.add_argument("--random", type=int, default=0, help="also this many random training captions")
    parser.add_argument("--samples", type=int, default=6, help="images per prompt (the demo grid's columns)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the demo grid's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the pipeline's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def glyph_of(prompt: str, captions: list[str]) -> int:
    """Index of the training glyph a prompt asks for: its caption, bare or inside a template."""
    text = prompt.strip().lower()
    bare = text.removesuffix(" emoji")
    for prefix in PREFIXES:
        bare = bare.removeprefix(prefix)
    for candidate in (text, bare):
        if candidate in captions:
            return captions.index(candidate)
    raise SystemExit(f"error: the prompt {prompt!r} names no training emoji (a caption such as 'dog face', "
                     "optionally as 'a dog face' or 'dog face emoji'); see outputs/demo/dataset_emoji_captions.json")


def prompts_to_score(args: argparse.Namespace, captions: list[str]) -> list[str]:
    drawn = random.Random(args.seed).sample(captions, args.random) if args.random else []
    return list(args.prompts) + [f"a {caption}" for caption in drawn]


def score(pipe: TextToImage, prompts: list[str], glyphs: torch.Tensor, captions: list[str],
          args: argparse.Namespace) -> dict[str, Any]:
    """Generate ``args.samples`` images per prompt and match each to its nearest training glyph."""
    options = {"num_images_per_prompt": args.samples, "seed": args.seed, "output_type": "pt", "progress": False}
    if args.guidance is not None:
        options["guidance_scale"] = args.guidance
    if args.steps is not None:
        options["num_inference_steps"] = args.steps
    rows, hits_total = {}, 0
    for start in range(0, len(prompts), 8):  # the demo grid is one call of 8 prompts: keep its seeds
        chunk = prompts[start:start + 8]
        images = pipe(chunk, **options).images.float().clamp(0, 1)
        distances = torch.cdist(images.flatten(1), glyphs.flatten(1)) / images[0].numel() ** 0.5
        ranked = distances.argsort(dim=1)[:, :5]
        nearest = ranked[:, 0]
        for i, prompt in enumerate(chunk):
            target = glyph_of(prompt, captions)
            found = nearest[i * args.samples:(i + 1) * args.samples].tolist()
            hits = sum(g == target for g in found)
            hits_total += hits
            top5 = int((ranked[i * args.samples:(i + 1) * args.samples] == target).any(dim=1).sum())
            rows[prompt] = {"hits": hits, "top5": top5, "of": args.samples, "nearest": [captions[g] for g in found],
                            "distance": [round(float(distances[i * args.samples + k, g]), 4)
                                         for k, g in enumerate(found)]}
    drawn = sum(row["hits"] * 2 >= row["of"] for row in rows.values())
    drawn_top5 = sum(row["top5"] * 2 >= row["of"] for row in rows.values())
    return {"rows_drawn": drawn, "rows_drawn_top5": drawn_top5, "rows": len(rows),
            "hit_rate": hits_total / (len(rows) * args.samples), "prompts": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = EmojiDataset(resolution=32, split="train")
    captions = [c.lower() for c in data.captions]
    glyphs = torch.stack([(data[i]["image"].float() + 1) / 2 for i in range(len(data))])
    prompts = prompts_to_score(args, captions)
    results: dict[str, Any] = {"prompts": prompts, "samples": args.samples, "seed": args.seed, "pipelines": {}}
    for spec in args.pipelines:
        name, _, path = spec.rpartition("=") if "=" in spec else (spec, "", spec)
        pipe = TextToImage.from_pretrained(path)
        results["pipelines"][name] = score(pipe, prompts, glyphs, captions, args)
        summary = results["pipelines"][name]
        print(f"{name}: {summary['rows_drawn']} of {summary['rows']} rows drawn "
              f"({summary['rows_drawn_top5']} within the 5 nearest), "
              f"{summary['hit_rate']:.1%} of samples", file=sys.stderr)
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
