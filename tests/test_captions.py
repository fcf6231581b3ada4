"""common.captions: caption templates add phrasings; the empty caption keeps itself; bad templates are refused."""
from __future__ import annotations

import pytest
import torch

from common.captions import add_phrasings, check_templates, draw_phrasings
from common.config import ConfigError


def test_phrasings_follow_the_captions_template_by_template():
    texts, variants = add_phrasings(["", "dog", "red apple"], ("a {}", "{} emoji"))
    assert texts == ["", "dog", "red apple", "a dog", "a red apple", "dog emoji", "red apple emoji"]
    assert variants.tolist() == [[0, 0, 0], [1, 3, 5], [2, 4, 6]]
    assert add_phrasings(["dog"], ()) == (["dog"], None)


def test_draws_cover_every_phrasing_and_no_templates_draw_nothing():
    _, variants = add_phrasings(["dog", "cat"], ("a {}", "the {}"))
    ids = torch.tensor([0, 1] * 200)
    torch.manual_seed(0)
    drawn = draw_phrasings(ids, variants)
    assert set(drawn[ids == 0].tolist()) == {0, 2, 4} and set(drawn[ids == 1].tolist()) == {1, 3, 5}
    state = torch.get_rng_state()
    assert torch.equal(draw_phrasings(ids, None), ids)
    assert torch.equal(torch.get_rng_state(), state), "no random number drawn without templates"


@pytest.mark.parametrize("template", ["a dog", "{} and {}", 3])
def test_a_template_needs_exactly_one_placeholder(template):
    with pytest.raises(ConfigError, match="exactly one"):
        check_templates(("a {}", template), "caption_templates")
