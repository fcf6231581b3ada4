"""Caption phrasings: several wordings of each training caption for a text-conditioned generator.

A generator that sees one wording per image ("dog") learns that string by heart and then fails on what
users type ("a dog"), the more so the less it has trained. Templates such as ``"a {}"`` or ``"{} emoji"``
add phrasings: the caches (latent and token) encode every phrasing once, next to the captions, and
training draws one phrasing per item and step. The empty caption (the null condition of
classifier-free guidance, or an image without a caption) has no phrasings: it stays itself.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from common.config import ConfigError


def check_templates(templates: Sequence[str], key: str) -> None:
    """Refuse a template without exactly one ``{}`` (where the caption goes), naming the config ``key``."""
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ConfigError(f"{key}: each template needs exactly one {{}} (the caption), e.g. \"a {{}}\"; got {bad}")


def add_phrasings(captions: list[str], templates: Sequence[str]) -> tuple[list[str], Tensor | None]:
    """``captions`` (U distinct) followed by each template's phrasing of every non-empty one, and the (U, 1 + T)
    ids of each caption's phrasings in that list (column 0: the caption itself); None without templates."""
    if not templates:
        return list(captions), None
    texts = list(captions)
    variants = torch.arange(len(captions)).repeat(1 + len(templates), 1).T.contiguous()
    for column, template in enumerate(templates, start=1):
        for row, caption in enumerate(captions):
            if caption:
                variants[row, column] = len(texts)
                texts.append(template.format(caption))
    return texts, variants


def draw_phrasings(ids: Tensor, variants: Tensor | None) -> Tensor:
    """One phrasing of each caption id (B,), drawn uniformly from the global RNG (checkpointed, so a resumed
    run draws the same); the ids themselves when there are no phrasings (and no random number is drawn)."""
    if variants is None:
        return ids
    return variants[ids, torch.randint(variants.shape[1], ids.shape, device=ids.device)]
