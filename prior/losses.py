"""The prior's training objective: next-token cross-entropy on corrupted inputs, with condition dropout.

Shape vocabulary: B batch, N image tokens, K codebook size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossConfig:
    """Training-time regularisers of the prior.

    Attributes:
        pkeep: probability that an input token is kept; otherwise it is replaced by a uniformly random
            code (the targets stay clean), so the model learns to recover from its own sampling errors.
        cond_drop: probability that a sample's condition is replaced by the learned null condition,
            which is what classifier-free guidance needs at sampling time.
    """

    pkeep: float = 1.0
    cond_drop: float = 0.1


class LossTerms(NamedTuple):
    loss: Tensor      # () mean cross-entropy in nats
    accuracy: Tensor  # () fraction of tokens whose argmax is the target (logging only)


def corrupt_tokens(tokens: Tensor, pkeep: float, codebook_size: int) -> Tensor:
    """Replace each token by a random code with probability 1 - pkeep: (B, T) -> (B, T)."""
    if pkeep >= 1.0:
        return tokens
    keep = torch.rand(tokens.shape, device=tokens.device) < pkeep
    return torch.where(keep, tokens, torch.randint_like(tokens, codebook_size))


def condition_dropout(batch: int, prob: float, device: torch.device) -> Tensor:
    """(B,) bool: True for the rows trained on the null condition."""
    return torch.rand(batch, device=device) < prob


def next_token_loss(logits: Tensor, targets: Tensor) -> LossTerms:
    """Cross-entropy of logits (B, N, K) against targets (B, N), in float32."""
    logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    accuracy = (logits.detach().argmax(dim=-1) == targets).float().mean()
    return LossTerms(loss, accuracy)
