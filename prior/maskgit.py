"""MaskGIT (Chang et al. 2022): a bidirectional transformer over code indices with a mask token.

Shape vocabulary: B batch, P prefix (condition) slots, N image tokens, K codebook size, W width.

It shares the AR prior's config, conditioning (class / text / none, learned null condition for
classifier-free guidance), embeddings and initialisation by subclassing :class:`prior.transformer.GPT`;
what differs is that every image token attends to every other one, the input holds all N tokens with
masked ones replaced by the mask id K, and the output at each image position is that token's
distribution. Sampling is :func:`prior.maskgit_sampling.sample_maskgit`.

    model = MaskGIT(PriorConfig(codebook_size=1024, grid_size=8, condition="class", num_classes=10,
                                kind="maskgit"))
    inputs, masked = mask_tokens(tokens, model.mask_id)                             # masked positions hold K
    terms = masked_token_loss(model(inputs, Condition(labels=labels)), tokens, masked)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prior.losses import LossTerms
from prior.transformer import GPT, Block, Condition, KVCache, Prefix, PriorConfig


class BidirectionalBlock(Block):
    """The AR prior's pre-norm block with full (non-causal) self-attention; padding keys stay masked."""

    def forward(self, x: Tensor, start: int, key_valid: Tensor | None,
                cache: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(B, S, W) -> (B, S, W); same signature as :class:`Block` so ``GPT._run`` drives it unchanged."""
        if start or cache is not None:
            raise ValueError("MaskGIT runs the whole sequence at once: no cache, start 0")
        x = x + self.drop(self.attn(self.norm1(x), context_mask=key_valid))
        return x + self.drop(self.mlp(self.norm2(x)))


class MaskGIT(GPT):
    """Bidirectional token transformer (see the module docstring).

    Args:
        config: a fully resolved :class:`PriorConfig`; ``config.kind`` is not checked here so that
            tests can build either kind from one config.
    """

    def __init__(self, config: PriorConfig) -> None:
        super().__init__(config)
        width = config.width
        # the AR layout feeds P + N - 1 positions over K codes; MaskGIT feeds all N tokens, one of them
        # possibly the extra mask id K, so these two tables are rebuilt and everything re-initialised
        self.token_embedding = nn.Embedding(config.codebook_size + 1, width)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.prefix_len + config.num_tokens, width))
        self.blocks = nn.ModuleList(BidirectionalBlock(config) for _ in range(config.depth))
        self._init_weights()

    @property
    def mask_id(self) -> int:
        """The input id of a masked token: K, one past the last code."""
        return self.config.codebook_size

    def logits(self, prefix: Prefix, idx: Tensor) -> Tensor:
        """Logits of every image token given the visible ones.

        Args:
            prefix: the embedded condition, (B, P, W).
            idx: (B, N) code indices, ``mask_id`` where masked.

        Returns:
            (B, N, K): ``[:, t]`` is the distribution of image token t.
        """
        batch, length = idx.shape
        if length != self.config.num_tokens:
            raise ValueError(f"MaskGIT takes all N = {self.config.num_tokens} tokens (masked ones as "
                             f"{self.mask_id}), got {length}")
        slots = prefix.embeddings.shape[1]
        x = torch.cat([prefix.embeddings, self.token_embedding(idx).to(prefix.embeddings.dtype)], dim=1)
        x = x + self.position_embedding[:, :slots + length]
        key_valid = None
        if prefix.valid is not None:
            key_valid = torch.cat([prefix.valid, prefix.valid.new_ones(batch, length)], dim=1)
        return self._run(x, 0, key_valid, None)[:, slots:]

    def forward(self, idx: Tensor, cond: Condition, drop: Tensor | None = None) -> Tensor:
        """Training forward: (B, N) inputs with masked ids -> logits (B, N, K); ``drop`` as in :class:`GPT`."""
        return self.logits(self.prefix(cond, drop, batch=idx.shape[0]), idx)

    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        raise TypeError("MaskGIT decodes all tokens in parallel and has no KV cache; "
                        "sample with prior.maskgit_sampling.sample_maskgit")

    def prefill(self, prefix: Prefix, cache: KVCache) -> Tensor:
        return self.new_cache(0)

    def decode(self, token: Tensor, index: int, cache: KVCache) -> Tensor:
        return self.new_cache(0)


def build_prior(config: PriorConfig) -> GPT:
    """The token prior ``config.kind`` names: :class:`GPT` ("ar") or :class:`MaskGIT` ("maskgit")."""
    return MaskGIT(config) if config.kind == "maskgit" else GPT(config)


def mask_ratio(progress: Tensor) -> Tensor:
    """The cosine schedule: the fraction of tokens masked at ``progress`` in [0, 1], cos(pi / 2 * progress).

    1 at the start (all masked), 0 at the end. Training draws progress ~ U(0, 1), so most batches
    mask many tokens; sampling walks it from (t + 1) / T. (1 - cos would invert it: few masked.)
    """
    return torch.cos(math.pi / 2 * progress)


def mask_tokens(tokens: Tensor, mask_id: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Mask a cosine-scheduled fraction of each row: (B, N) codes -> (inputs, masked), both (B, N).

    Per row, u ~ U(0, 1) and ceil(N cos(pi / 2 u)) tokens (at least one) at random positions are
    replaced by ``mask_id`` (``model.mask_id``, one past the largest code).
    ``masked`` is True where a token was replaced: the loss is taken there only.
    """
    batch, count = tokens.shape
    device = generator.device if generator is not None else tokens.device
    ratio = mask_ratio(torch.rand(batch, 1, generator=generator, device=device))
    masked_count = (ratio * count).ceil().clamp(1, count)
    # a random rank per position; the masked_count lowest ranks are masked
    ranks = torch.rand(batch, count, generator=generator, device=device).argsort(dim=1).argsort(dim=1)
    masked = (ranks < masked_count).to(tokens.device)
    return tokens.masked_fill(masked, mask_id), masked


def masked_token_loss(logits: Tensor, targets: Tensor, masked: Tensor) -> LossTerms:
    """Cross-entropy of logits (B, N, K) against targets (B, N) on the ``masked`` positions only.

    Visible tokens are given in the input; a loss there would teach copying, not generation.
    """
    picked = logits[masked].float()
    wanted = targets[masked]
    loss = F.cross_entropy(picked, wanted)
    accuracy = (picked.detach().argmax(dim=-1) == wanted).float().mean()
    return LossTerms(loss, accuracy)
