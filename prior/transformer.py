"""The stage 2 prior: a decoder-only transformer over codebook indices, conditioned by prefix tokens.

Shape vocabulary: B batch, P prefix (condition) slots, N image tokens (h * w, raster order), T tokens
in one call, S sequence positions (P + N - 1: the last image token is predicted, never fed), W model
width, K codebook size, D text width.

The sequence is ``[prefix_1 .. prefix_P, token_1 .. token_{N-1}]``; the output at position
``P - 1 + t`` is the distribution of image token t. The prefix is a class embedding (P = 1), projected
text states (and, with ``pooled_text``, their masked mean) followed by a learned start slot
(P = ``text_tokens + 1``, one more when pooled; padding slots are masked out of every attention, and
token 0 is read from the start slot, which is never padding) or, for an unconditional prior, a learned
start embedding. The null condition of classifier-free guidance is a learned embedding: class id 0 for
class priors, ``null_text`` in the first slot for text priors.

    model = GPT(PriorConfig(codebook_size=1024, grid_size=8, condition="class", num_classes=10))
    logits = model(tokens[:, :-1], Condition(labels=labels))       # (B, N, K)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from common.component_check import over_limits
from common.config import ConfigError
from common.layers import Attention, attend, maybe_checkpoint

COMPONENT_KIND = "prior"


@dataclass(frozen=True)
class PriorConfig:
    """Architecture of the token prior. Zero means "derive from stage 1 / the data" in training configs.

    Attributes:
        codebook_size: K, the autoencoder's codebook size.
        grid_size: h = w of the token grid (N = grid_size ** 2).
        condition: "class" (one learned embedding per class), "text" (projected text token states)
            or "none" (a learned start embedding only).
        num_classes: number of classes for "class" (the null condition is one more embedding).
        text_dim: D, width of the text encoder's states, for "text".
        text_tokens: text slots for "text": text states are cut or padded to this many (P = text_tokens + 1).
        pooled_text: for "text", one more prefix slot holding the prompt's masked mean state (P = text_tokens
            + 2): what a sentence encoder such as MiniLM is trained to output, so prompts that differ in
            small words ("a dog", "dog") give nearly the same slot, where their token states differ.
        width, depth, heads: W, number of blocks, attention heads (W % heads == 0).
        mlp_ratio: hidden width of the MLP as a multiple of W.
        dropout: dropout on the embeddings and on each residual branch during training.
        gradient_checkpointing: recompute each block's activations in the backward pass of the training
            forward (less memory, about one more forward pass of time); decoding and eval mode ignore it.
        kind: "ar" (this GPT, one token per step) or "maskgit" (:class:`prior.maskgit.MaskGIT`, a
            bidirectional transformer decoding all tokens in a few parallel steps).
        gelu: the MLP's GELU: "tanh" (the approximation ours train with) or "exact" (the erf form of
            taming-transformers' minGPT, which imported weights need to reproduce its logits).
        null_condition: whether the null condition (class id 0, ``null_text``) was learned; False for
            priors imported from taming-transformers, which never saw one, so classifier-free guidance
            and "" prompts are refused (see :mod:`prior.convert`).
    """

    codebook_size: int = 0
    grid_size: int = 0
    condition: Literal["class", "text", "none"] = "text"
    num_classes: int = 0
    text_dim: int = 0
    text_tokens: int = 16
    pooled_text: bool = False  # off by default, so config.json files saved before it load unchanged
    width: int = 256
    depth: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    gradient_checkpointing: bool = False  # off by default, so config.json files saved before it load unchanged
    kind: Literal["ar", "maskgit"] = "ar"  # "ar" by default, so config.json files saved before it load unchanged
    # these two default to what trained priors are, so config.json files saved before them load unchanged
    gelu: Literal["tanh", "exact"] = "tanh"
    null_condition: bool = True

    # Upper bounds of the sizes that allocate memory or build modules, each far beyond any real model.
    LIMITS: ClassVar[dict[str, int]] = {
        "codebook_size": 2**24,  # as AutoencoderConfig bounds it: 64 x the largest published codebooks
        "grid_size": 512,  # 262,144 tokens per image; published token priors use grids of 16-64
        "num_classes": 2**24,  # one embedding row each; ImageNet-21k has 21,841 classes
        "text_dim": 65536, "text_tokens": 65536,  # text encoders: widths 768-4096, 77-512 tokens
        "width": 65536, "depth": 1024, "heads": 4096,  # GPT-3 175B: width 12,288, depth 96, 96 heads
        "mlp_ratio": 64,  # 4 in every published transformer
    }

    def __post_init__(self) -> None:
        # only upper bounds here: 0 means "derive from stage 1 / the data" until validate()
        problems = over_limits({name: getattr(self, name) for name in self.LIMITS}, self.LIMITS)
        if not self.mlp_ratio > 0:
            problems.append(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if problems:
            raise ConfigError("invalid PriorConfig: " + "; ".join(problems))

    @property
    def text_slots(self) -> int:
        """The prefix slots before the start slot of a text prior: the text tokens, and the pooled slot."""
        return self.text_tokens + int(self.pooled_text) if self.condition == "text" else 0

    @property
    def prefix_len(self) -> int:
        """P, the number of condition slots before the image tokens."""
        return self.text_slots + 1

    @property
    def num_tokens(self) -> int:
        """N, image tokens per sample."""
        return self.grid_size ** 2

    @property
    def max_len(self) -> int:
        """S, the positions that ever enter the model (the last token is only predicted)."""
        return self.prefix_len + self.num_tokens - 1

    def validate(self) -> None:
        """Fail with every unresolved or inconsistent field named."""
        problems = [f"{name} must be >= 1, got {getattr(self, name)}"
                    for name in ("codebook_size", "grid_size", "width", "depth", "heads")
                    if getattr(self, name) < 1]
        if self.width % max(1, self.heads):
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        if self.condition == "class" and self.num_classes < 1:
            problems.append("condition 'class' needs num_classes >= 1")
        if self.condition == "text" and (self.text_dim < 1 or self.text_tokens < 1):
            problems.append("condition 'text' needs text_dim >= 1 and text_tokens >= 1")
        if self.pooled_text and self.condition != "text":
            problems.append(f"pooled_text needs condition 'text', got {self.condition!r}")
        if problems:
            raise ConfigError("invalid PriorConfig: " + "; ".join(problems))


class Condition(NamedTuple):
    """What a batch is conditioned on (the fields of the other condition kinds stay None)."""

    labels: Tensor | None = None  # (B,) int64 class ids in [0, num_classes)
    states: Tensor | None = None  # (B, text_tokens, D) text states, cut/padded with prior.text.fit_length
    mask: Tensor | None = None    # (B, text_tokens) bool, True for real text tokens


class Prefix(NamedTuple):
    """The embedded condition, as the transformer consumes it."""

    embeddings: Tensor     # (B, P, W)
    valid: Tensor | None   # (B, P) bool, False at padding slots; None when every slot is real

    def rows(self, count: int) -> Prefix:
        """The first ``count`` rows."""
        return Prefix(self.embeddings[:count], None if self.valid is None else self.valid[:count])

    @staticmethod
    def cat(first: Prefix, second: Prefix) -> Prefix:
        """Stack two prefixes along the batch (e.g. conditional rows, then unconditional rows)."""
        if (first.valid is None) != (second.valid is None):
            raise ValueError("cannot stack a padded prefix with an unpadded one")
        valid = None if first.valid is None else torch.cat([first.valid, second.valid])
        return Prefix(torch.cat([first.embeddings, second.embeddings]), valid)


class KVCache:
    """Static keys and values of every layer, allocated once for (batch, max_len).

    Decoding writes position ``t``'s keys/values in place and attends to ``[:t + 1]``. When guidance
    stops, :meth:`keep_rows` drops the trailing (unconditional) rows: later steps read views of the
    first rows only, so neither memory is reallocated nor dropped rows computed.
    """

    def __init__(self, config: PriorConfig, batch: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        head_dim = config.width // config.heads
        shape = (config.depth, batch, config.heads, config.max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.ones(batch, config.max_len, device=device, dtype=torch.bool)
        self.padded = False  # whether any prefix slot is padding (then a key mask is needed)
        self.batch = batch

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        """Keys and values (B, heads, S, head_dim) of layer ``index``, active rows only."""
        return self.keys[index, :self.batch], self.values[index, :self.batch]

    def key_valid(self, end: int) -> Tensor | None:
        """(B, end) key mask for positions ``[0, end)``, or None when nothing is padding."""
        return self.valid[:self.batch, :end] if self.padded else None

    def keep_rows(self, count: int) -> None:
        """Keep only the first ``count`` rows from now on."""
        if not 0 < count <= self.batch:
            raise ValueError(f"cannot keep {count} of {self.batch} rows")
        self.batch = count


def causal_attention(attn: Attention, x: Tensor, start: int, key_valid: Tensor | None,
                     cache: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Causal self-attention of positions ``[start, start + T)`` through the shared layer's projections.

    Args:
        attn: the shared :class:`common.layers.Attention` (its to_q/to_k/to_v/to_out are used).
        x: (B, T, W) normalised inputs at positions start .. start + T - 1.
        start: position of ``x[:, 0]``; must be 0 without a cache.
        key_valid: (B, start + T) bool, False for padding keys that nobody may attend to; None: all real.
        cache: this layer's (keys, values) buffers (B, heads, S, head_dim); written at [start, start + T).

    Returns:
        (B, T, W).
    """
    length = x.shape[1]
    end = start + length
    q, k, v = (rearrange(proj(x), "b t (h d) -> b h t d", h=attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
    if cache is not None:
        cache[0][:, :, start:end] = k
        cache[1][:, :, start:end] = v
        k, v = cache[0][:, :, :end], cache[1][:, :, :end]
    elif start:
        raise ValueError("an offset start needs the keys of the earlier positions: pass a cache")
    mask, is_causal = None, False
    if key_valid is not None or (start and length > 1):
        # causal mask offset by ``start``: query i (position start + i) sees keys <= start + i
        mask = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
        mask = mask[None, None] if key_valid is None else mask[None, None] & key_valid[:, None, None, :end]
    else:
        is_causal = length > 1  # one query at the newest position sees every cached key
    out = attend(q, k, v, mask, is_causal)
    return attn.to_out(rearrange(out, "b h t d -> b t (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        hidden = int(config.width * config.mlp_ratio)
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = Attention(config.width, heads=config.heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(config.width)
        gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.mlp = nn.Sequential(nn.Linear(config.width, hidden), gelu,
                                 nn.Linear(hidden, config.width))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, start: int, key_valid: Tensor | None,
                cache: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(B, T, W) at positions [start, start + T) -> (B, T, W)."""
        x = x + self.drop(causal_attention(self.attn, self.norm1(x), start, key_valid, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """Decoder-only transformer over code indices with prefix conditioning (see the module docstring).

    Args:
        config: a fully resolved :class:`PriorConfig`.
    """

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        width = config.width
        self.token_embedding = nn.Embedding(config.codebook_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.max_len, width))
        if config.condition == "text":
            self.text_proj = nn.Linear(config.text_dim, width)
            self.null_text = nn.Parameter(torch.zeros(1, width))
            self.text_start = nn.Parameter(torch.zeros(1, width))  # reads out token 0 whatever the padding
            self.pooled_proj = nn.Linear(config.text_dim, width) if config.pooled_text else None
        else:  # id 0 is the null condition (or, for "none", the start token); class c has id c + 1
            self.class_embedding = nn.Embedding(config.num_classes + 1 if config.condition == "class" else 1, width)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, config.codebook_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1 / sqrt(2 * depth)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        for param in (self.position_embedding, getattr(self, "null_text", None), getattr(self, "text_start", None)):
            if param is not None:
                nn.init.normal_(param, std=0.02)
        for block in self.blocks:
            for layer in (block.attn.to_out, block.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * self.config.depth))

    # ------------------------------------------------------------------------------------ condition
    def prefix(self, cond: Condition, drop: Tensor | None = None, batch: int | None = None) -> Prefix:
        """Embed a condition; rows where ``drop`` (B,) is True get the null condition instead."""
        kind = self.config.condition
        if kind == "none":
            return self.null_prefix(batch if batch is not None else len(drop))
        if kind == "class":
            if cond.labels is None:
                raise ValueError("a class prior needs Condition(labels=...)")
            ids = cond.labels.long() + 1
            ids = ids.masked_fill(drop, 0) if drop is not None else ids
            return Prefix(self.class_embedding(ids)[:, None], None)
        if cond.states is None or cond.mask is None:
            raise ValueError("a text prior needs Condition(states=..., mask=...)")
        if cond.states.shape[1] != self.config.text_tokens:
            raise ValueError(f"text states have {cond.states.shape[1]} slots, the prior expects "
                             f"{self.config.text_tokens}; cut or pad them with prior.text.fit_length")
        embeddings, valid = self.text_proj(cond.states), cond.mask.bool()
        if self.pooled_proj is not None:
            weights = valid[..., None].to(cond.states.dtype)
            pooled = (cond.states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
            embeddings = torch.cat([embeddings, self.pooled_proj(pooled)[:, None].to(embeddings.dtype)], dim=1)
            valid = torch.cat([valid, valid.new_ones(len(valid), 1)], dim=1)
        if drop is not None:
            null = self.null_prefix(len(drop))
            embeddings = torch.where(drop[:, None, None], null.embeddings[:, :-1].to(embeddings.dtype), embeddings)
            valid = torch.where(drop[:, None], null.valid[:, :-1], valid)
        return self._with_start(embeddings, valid)

    def _with_start(self, embeddings: Tensor, valid: Tensor) -> Prefix:
        """Append the start slot to text slots (B, text_slots, W) -> Prefix (B, P, W)."""
        start = self.text_start.to(embeddings.dtype).expand(embeddings.shape[0], 1, -1)
        return Prefix(torch.cat([embeddings, start], dim=1), torch.cat([valid, valid.new_ones(len(valid), 1)], dim=1))

    def null_prefix(self, batch: int) -> Prefix:
        """The learned null condition for ``batch`` rows."""
        device = self.position_embedding.device
        if self.config.condition != "text":
            return Prefix(self.class_embedding(torch.zeros(batch, 1, dtype=torch.long, device=device)), None)
        slots = self.config.text_slots  # null_text in the first; the others (and the pooled slot) are padding
        embeddings = torch.cat([self.null_text.expand(batch, 1, -1),
                                self.null_text.new_zeros(batch, slots - 1, self.config.width)], dim=1)
        valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        valid[:, 0] = True
        return self._with_start(embeddings, valid)

    # ------------------------------------------------------------------------------------ forward
    def _run(self, x: Tensor, start: int, key_valid: Tensor | None, cache: KVCache | None) -> Tensor:
        """Blocks + final norm + head over positions [start, start + T): (B, T, W) -> (B, T, K)."""
        x = self.drop(x)
        if cache is None:  # only the cache-free (training) path: decoding has no backward pass to save memory for
            checkpointing = self.config.gradient_checkpointing and self.training
            for block in self.blocks:
                x = maybe_checkpoint(block, x, start, key_valid, None, enabled=checkpointing)
        else:
            for index, block in enumerate(self.blocks):
                x = block(x, start, key_valid, cache.layer(index))
        return self.head(self.norm(x))

    def logits(self, prefix: Prefix, idx: Tensor) -> Tensor:
        """Next-token logits over the whole sequence, without a cache.

        Args:
            prefix: the embedded condition, (B, P, W).
            idx: (B, T) code indices, T <= N - 1.

        Returns:
            (B, T + 1, K): ``[:, t]`` is the distribution of image token t given the prefix and ``idx[:, :t]``.
        """
        batch, length = idx.shape
        slots = prefix.embeddings.shape[1]
        if length > self.config.num_tokens - 1:
            raise ValueError(f"at most N - 1 = {self.config.num_tokens - 1} tokens can be fed, got {length}")
        x = torch.cat([prefix.embeddings, self.token_embedding(idx).to(prefix.embeddings.dtype)], dim=1)
        x = x + self.position_embedding[:, :slots + length]
        key_valid = None
        if prefix.valid is not None:
            key_valid = torch.cat([prefix.valid, prefix.valid.new_ones(batch, length)], dim=1)
        return self._run(x, 0, key_valid, None)[:, slots - 1:]

    def forward(self, idx: Tensor, cond: Condition, drop: Tensor | None = None) -> Tensor:
        """Training forward: (B, T) indices (usually ``tokens[:, :-1]``) -> logits (B, T + 1, K).

        ``drop`` (B,) bool replaces those rows' condition by the null one (condition dropout).
        """
        return self.logits(self.prefix(cond, drop, batch=idx.shape[0]), idx)

    # ------------------------------------------------------------------------------------ decoding
    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        """A static key/value cache for ``batch`` rows on this model's device."""
        return KVCache(self.config, batch, self.position_embedding.device, dtype or self.position_embedding.dtype)

    def prefill(self, prefix: Prefix, cache: KVCache) -> Tensor:
        """Run the prefix into an empty cache; return the logits of image token 0, (B, K)."""
        slots = prefix.embeddings.shape[1]
        cache.padded = prefix.valid is not None
        if cache.padded:
            cache.valid[:cache.batch, :slots] = prefix.valid
        x = prefix.embeddings + self.position_embedding[:, :slots]
        return self._run(x, 0, cache.key_valid(slots), cache)[:, -1]

    def decode(self, token: Tensor, index: int, cache: KVCache) -> Tensor:
        """Feed image token ``index`` (B,) at its position; return the logits of token index + 1, (B, K)."""
        position = self.config.prefix_len + index
        x = self.token_embedding(token)[:, None] + self.position_embedding[:, position:position + 1]
        return self._run(x, position, cache.key_valid(position + 1), cache)[:, -1]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the weights of linear layers; not embeddings, norms, biases or learned vectors."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
