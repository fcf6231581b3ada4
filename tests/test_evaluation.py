from __future__ import annotations

import numpy as np
import torch

from common.data.shapes import parse_caption, render
from common.evaluation import diversity, evaluate_shapes
from common.images import pil_to_tensor


def oracle(prompts, seed):
    rng = np.random.default_rng(seed)
    return torch.stack([pil_to_tensor(render(parse_caption(p), 32, rng)) for p in prompts])


def test_oracle_generator_scores_perfectly_and_blank_scores_zero():
    assert evaluate_shapes(oracle, num_prompts=12, samples_per_prompt=2)["accuracy"] == 1.0
    blank = evaluate_shapes(lambda p, s: torch.ones(len(p), 3, 32, 32), num_prompts=6, samples_per_prompt=2)
    assert blank["accuracy"] == 0.0 and blank["diversity"] == 0.0


def test_diversity_grows_with_spread():
    base = torch.zeros(4, 3, 8, 8)
    assert diversity(base) == 0.0
    assert 0 < diversity(base + 0.1 * torch.randn_like(base)) < diversity(base + torch.randn_like(base))
