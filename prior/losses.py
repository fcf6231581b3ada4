"""The prior's training objective: next-token cross-entropy on corrupted inputs, with condition dropout.

Shape vocabulary: B batch, N image tokens, K codebook size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from common.config import ConfigError


@dataclass(frozen=True)
class LossConfig:
    """Training-time regularisers of the prior.

    Attributes:
        pkeep: probability that an input token is kept; otherwise it is replaced by a uniformly random
            other code (the targets stay clean), so the model learns to recover from its own sampling
            errors. 1.0 turns the corruption off.
        cond_drop: probability that a sample's condition is replaced by the learned null condition,
            which is what classifier-free guidance needs at sampling time.
    """

    pkeep: float = 1.0
    cond_drop: float = 0.1

    def __post_init__(self) -> None:
        bad = [f"{name} must be a probability in [0, 1], got {getattr(self, name)}"
               for name in ("pkeep", "cond_drop") if not 0.0 <= getattr(self, name) <= 1.0]
        if bad:
            raise ConfigError("invalid loss config: " + "; ".join(bad))


class LossTerms(NamedTuple):
    loss: Tensor      # () mean cross-entropy in nats
    accuracy: Tensor  # () fraction of tokens whose argmax is the target (logging only)


def corrupt_tokens(tokens: Tensor, pkeep: float, codebook_size: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """Replace each token, with probability 1 - pkeep, by a uniformly drawn *other* code: (B, T) -> (B, T).

    Drawing among the other codes (unlike taming's draw among all K, which keeps a "replaced" token with
    probability 1 / K) makes ``pkeep`` exactly the fraction kept, even for the small codebooks of tests.
    ``tokens`` must hold valid codes in [0, codebook_size); so does the result. ``generator`` (on the
    tokens' device) makes the corruption reproducible; training uses the global RNG, which resume restores.
    """
    if pkeep >= 1.0 or codebook_size < 2:  # off, or no other code to draw
        return tokens
    replace = torch.rand(tokens.shape, generator=generator, device=tokens.device) >= pkeep
    # token + a shift in [1, K) modulo K is uniform over the K - 1 codes that differ from the token
    shift = torch.randint(1, codebook_size, tokens.shape, generator=generator, device=tokens.device,
                          dtype=tokens.dtype)
    return torch.where(replace, (tokens + shift) % codebook_size, tokens)


def condition_dropout(batch: int, prob: float, device: torch.device) -> Tensor:
    """(B,) bool: True for the rows trained on the null condition."""
    return torch.rand(batch, device=device) < prob


def next_token_loss(logits: Tensor, targets: Tensor) -> LossTerms:
    """Cross-entropy of logits (B, N, K) against targets (B, N), in float32."""
    logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    accuracy = (logits.detach().argmax(dim=-1) == targets).float().mean()
    return LossTerms(loss, accuracy)
