"""Prompt faithfulness and diversity of any text-to-image generator on the procedural shapes data.

Both generators (diffusion and the AR prior) are scored by the same function, on the same prompts,
with the analytic scorer of :mod:`common.data.shapes`, so their numbers are comparable. The argparse
types at the end check the numbers their command lines take, so that a bad value ends in
``error: argument --steps: ...`` before any model is loaded.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

import torch
from torch import Tensor

from common.data.shapes import evaluation_prompts, prompt_accuracy

# generate(prompts, seed) -> (len(prompts), 3, H, W) images in [-1, 1]
GenerateFn = Callable[[list[str], int], Tensor]


def diversity(images: Tensor) -> float:
    """Mean pairwise RMS distance between images (N, 3, H, W) in [-1, 1]; 0 when all are identical."""
    flat = images.float().flatten(1)
    n = flat.shape[0]
    if n < 2:
        return 0.0
    distances = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return float(distances.sum() / (n * (n - 1)))


def evaluate_shapes(generate: GenerateFn, num_prompts: int = 32, samples_per_prompt: int = 4, seed: int = 0,
                    batch_size: int = 64) -> dict:
    """Generate ``samples_per_prompt`` images for each of a fixed set of shapes prompts and score them.

    Returns the fraction of images whose colour, shape and position are all right ("accuracy"),
    the per-attribute fractions, and the mean diversity among the samples of each prompt.
    """
    prompts = evaluation_prompts(num_prompts, seed=0)  # fixed prompts, whatever the sampling seed
    requests = [p for p in prompts for _ in range(samples_per_prompt)]
    images = torch.cat([generate(requests[i:i + batch_size], seed + i)
                        for i in range(0, len(requests), batch_size)]).cpu()
    scores = prompt_accuracy(list(images), requests)
    per_prompt = images.reshape(num_prompts, samples_per_prompt, *images.shape[1:])
    return {
        "accuracy": scores["correct"],
        **{attribute: scores[attribute] for attribute in ("colour", "shape", "position", "size")},
        "diversity": sum(diversity(group) for group in per_prompt) / num_prompts,
        "prompts": num_prompts,
        "samples_per_prompt": samples_per_prompt,
    }


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


def finite_number(low: float = -math.inf, high: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a finite float in [``low``, ``high``] (NaN and inf are refused)."""
    bounds = "" if (low, high) == (-math.inf, math.inf) else f" in [{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a finite number{bounds}, got {text!r}")
        return value

    parse.__name__ = f"finite number{bounds}"
    return parse


def number_list(text: str) -> list[float]:
    """An argparse type: comma-separated finite numbers, e.g. "0,1,2,4" -> [0.0, 1.0, 2.0, 4.0] ("" -> [])."""
    number = finite_number()
    try:
        return [number(item.strip()) for item in text.split(",") if item.strip()]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error}; give comma-separated finite numbers, e.g. 0,1,2,4") from None
