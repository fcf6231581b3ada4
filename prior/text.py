"""Text conditioning for the prior: the shared frozen text encoder, cut or padded to P slots.

Shape vocabulary: B prompts, L encoder tokens, P prefix slots, D text width.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from common.text_encoder import TextEncoder, TextEncoderConfig

logger = logging.getLogger(__name__)


def load_text_encoder(config: TextEncoderConfig, device: torch.device | str = "cpu") -> TextEncoder:
    """The frozen text encoder (``encode(prompts) -> TextEmbedding(states (B, L, D), mask (B, L))``)."""
    return TextEncoder(config).to(device)


def fit_length(states: Tensor, mask: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """Cut or zero-pad text states to exactly ``slots`` positions.

    Args:
        states: (B, L, D) token states; mask: (B, L) bool, True for real tokens (right padding).
        slots: P.

    Returns:
        states (B, P, D), zero at padding; mask (B, P) bool.
    """
    length = states.shape[1]
    if length > slots:
        cut = mask[:, slots:].any(dim=1)
        if cut.any():
            logger.warning("%d prompts have more than %d text tokens; the rest is ignored by the prior "
                           "(raise model.text_tokens to keep it)", int(cut.sum()), slots)
        return states[:, :slots], mask[:, :slots]
    pad = slots - length
    states = torch.cat([states, states.new_zeros(states.shape[0], pad, states.shape[2])], dim=1)
    return states, torch.cat([mask.bool(), mask.new_zeros(mask.shape[0], pad, dtype=torch.bool)], dim=1)


@torch.no_grad()
def encode_prompts(encoder: TextEncoder, prompts: list[str], slots: int) -> tuple[Tensor, Tensor]:
    """Encode prompts and fit them to ``slots``: states (B, P, D) float32 and mask (B, P) bool."""
    embedding = encoder.encode(list(prompts))
    return fit_length(embedding.states.float(), embedding.mask, slots)
