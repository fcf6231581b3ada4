"""bench.emoji_recall: a prompt maps to its glyph; a sample counts when its nearest glyph is the prompted one."""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from bench.emoji_recall import glyph_of, score

CAPTIONS = ["dog", "dog face", "ghost", "snowman", "snowman without snow"]


@pytest.mark.parametrize("prompt, caption", [("dog", "dog"), ("a dog", "dog"), ("the dog face", "dog face"),
                                             ("Ghost emoji", "ghost"), ("a snowman", "snowman")])
def test_a_prompt_names_its_caption_bare_or_in_a_template(prompt: str, caption: str) -> None:
    assert CAPTIONS[glyph_of(prompt, CAPTIONS)] == caption


def test_a_prompt_without_a_training_emoji_is_refused_with_the_fix() -> None:
    with pytest.raises(SystemExit, match="names no training emoji"):
        glyph_of("a unicorn", CAPTIONS)


class CopyPipe:
    """Returns, for each prompt, copies of a chosen glyph (a stand-in for a trained pipeline)."""

    def __init__(self, glyphs: torch.Tensor, drawn: dict[str, int]) -> None:
        self.glyphs, self.drawn = glyphs, drawn

    def __call__(self, prompts: list[str], num_images_per_prompt: int, **_: object) -> SimpleNamespace:
        rows = [self.glyphs[self.drawn[p]] + 0.01 for p in prompts for _ in range(num_images_per_prompt)]
        return SimpleNamespace(images=torch.stack(rows))


def test_hits_count_the_prompted_glyph_only() -> None:
    glyphs = torch.rand(len(CAPTIONS), 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a dog", "ghost", "snowman"]
    pipe = CopyPipe(glyphs, {"a dog": 0, "ghost": 2, "snowman": 4})  # the snowman row draws its near-twin
    args = argparse.Namespace(samples=3, seed=0, guidance=None, steps=None)
    result = score(pipe, prompts, glyphs, CAPTIONS, args)
    assert [result["prompts"][p]["hits"] for p in prompts] == [3, 3, 0]
    assert result["prompts"]["snowman"]["nearest"] == ["snowman without snow"] * 3
    assert result["prompts"]["snowman"]["top5"] == 3  # the twin is the nearest, the prompted glyph among the 5
    assert result["rows_drawn"] == 2 and result["rows_drawn_top5"] == 3
    assert result["hit_rate"] == pytest.approx(6 / 9)
