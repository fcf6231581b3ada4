"""The one sampling path of the token prior: guided, filtered, token by token, with a static KV cache.

Shape vocabulary: B samples, N image tokens, K codebook size.

    tokens = sample_tokens(model, model.prefix(cond), model.null_prefix(B), guidance=3.0,
                           top_k=100, generator=torch.Generator().manual_seed(0))   # (B, N)

Training sample grids, the pipeline and the evaluation all call :func:`sample_tokens`; ``use_cache=False``
recomputes the whole sequence at every step through the same loop (for the parity test and the bench).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from prior.transformer import GPT, Prefix


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings (the defaults a pipeline records, and the training sample grids use).

    Attributes:
        guidance: classifier-free guidance scale s on the logits, u + s (c - u); 1 = no guidance
            (then no unconditional rows are computed), 0 = unconditional.
        guidance_tokens: guide only the first this many tokens, then drop the unconditional rows; 0 = all.
        temperature: divides the (guided) logits; must be > 0.
        top_k: keep the k most likely codes; 0 = all.
        top_p: keep the smallest set of codes whose probability reaches p; 1 = all.
    """

    guidance: float = 3.0
    guidance_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Apply temperature, then top-k, then top-p (nucleus) filtering; removed codes get -inf.

    Args:
        logits: (..., K) unnormalised log-probabilities.
        temperature: > 0; the logits are divided by it.
        top_k: keep the k largest logits (ties with the k-th are kept too); 0 or >= K keeps all.
        top_p: keep the minimal set of most likely codes whose total probability is >= top_p
            (the most likely code always stays); 1 keeps all.

    Returns:
        (..., K) float32 logits.
    """
    if not 0 < temperature < math.inf:  # also refuses NaN
        raise ValueError(f"temperature must be a finite number > 0, got {temperature} "
                         "(use top_k=1 for greedy decoding)")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps every code), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the codes ranked above each one
        remove_sorted = mass_before >= top_p         # the nucleus already holds p without this code
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def draw_uniforms(tokens: int, rows: int, generator: torch.Generator | None = None) -> Tensor:
    """The (tokens, rows) uniforms of sampling ``rows`` sequences of ``tokens`` tokens, drawn up front.

    They are the numbers :func:`draw` takes from ``generator`` one token at a time (CPU uniform draws come
    one value after another, so one (tokens, rows) draw equals ``tokens`` draws of ``rows``), and with them
    a row's tokens no longer depend on which rows are sampled in the same batch: a pipeline can sample
    its images in chunks of any size and get the same tokens (up to float rounding of batched matmuls).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(tokens, rows, generator=generator, device=device)


def draw(logits: Tensor, generator: torch.Generator | None = None, uniform: Tensor | None = None) -> Tensor:
    """One code per row from softmax(logits) (B, K) -> (B,) int64, by inverting the CDF.

    One uniform per row is ``uniform`` (B,) when given, else drawn from ``generator`` on the generator's
    own device (the global RNG on the logits' device without one), and moved to the logits, so a CPU
    generator works with logits on any device and a seed draws the same codes everywhere (up to float
    rounding of the CDF). Codes of probability 0 (filtered out, -inf logits) are never drawn.
    """
    probs = logits.float().softmax(dim=-1)
    rows, count = probs.shape
    if uniform is None:
        device = generator.device if generator is not None else probs.device
        uniform = torch.rand(rows, 1, generator=generator, device=device)
    uniform = uniform.reshape(rows, 1).to(probs.device)
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)[:, 0]
    # u * total may round up to the total: stay on the last code that has any probability
    last = count - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(index, last)


def check_fixed(given: Tensor | None, fixed: Tensor | None, batch: int, count: int,
                device: torch.device) -> tuple[Tensor, Tensor] | None:
    """The tokens to keep of a sampler call, checked: (given codes (B, N) int64, fixed (B, N) bool) on
    ``device``, or None when neither is given."""
    if (given is None) != (fixed is None):
        raise ValueError("give both `given` (B, N) codes and `fixed` (B, N) bool, or neither")
    if fixed is None:
        return None
    if tuple(fixed.shape) != (batch, count) or tuple(given.shape) != (batch, count):
        raise ValueError(f"given and fixed must have shape ({batch}, {count}), got "
                         f"{tuple(given.shape)} and {tuple(fixed.shape)}")
    return given.to(device).long(), fixed.to(device).bool()


class _Stepper:
    """Next-token logits for the growing sequence, with the static cache or by full recomputation."""

    def __init__(self, model: GPT, prefix: Prefix, use_cache: bool) -> None:
        self.model, self.prefix = model, prefix
        rows = prefix.embeddings.shape[0]
        self.cache = model.new_cache(rows, dtype=prefix.embeddings.dtype) if use_cache else None
        self.fed = prefix.embeddings.new_zeros(rows, 0, dtype=torch.long)  # uncached: every token so far

    def first(self) -> Tensor:
        """Logits of token 0, (rows, K)."""
        if self.cache is not None:
            return self.model.prefill(self.prefix, self.cache)
        return self.model.logits(self.prefix, self.fed)[:, -1]

    def next(self, token: Tensor, index: int) -> Tensor:
        """Feed token ``index`` (rows,); return the logits of token index + 1, (rows, K)."""
        if self.cache is not None:
            return self.model.decode(token, index, self.cache)
        self.fed = torch.cat([self.fed, token[:, None]], dim=1)
        return self.model.logits(self.prefix, self.fed)[:, -1]

    def keep_rows(self, count: int) -> None:
        if self.cache is not None:
            self.cache.keep_rows(count)
        self.prefix, self.fed = self.prefix.rows(count), self.fed[:count]


@torch.no_grad()
def sample_tokens(model: GPT, cond: Prefix, uncond: Prefix | None = None, *, guidance: float = 1.0,
                  guidance_tokens: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, uniforms: Tensor | None = None,
                  given: Tensor | None = None, fixed: Tensor | None = None, use_cache: bool = True) -> Tensor:
    """Sample N code indices per row, one token at a time.

    With guidance, the conditional and unconditional rows run as one batch [cond; uncond] (one
    forward per token) and the logits are combined as u + s (c - u) before filtering. After
    ``guidance_tokens`` tokens the unconditional rows are dropped, from the cache too.

    Args:
        model: the prior (put it in eval mode).
        cond: (B, P, W) embedded conditions, e.g. ``model.prefix(Condition(...))``.
        uncond: (B, P, W) unconditional / negative conditions, e.g. ``model.null_prefix(B)``;
            None samples without guidance.
        guidance: scale s; 1 (or ``uncond`` None) computes the conditional rows only.
        guidance_tokens: guide the first this many tokens only; 0 = every token.
        temperature, top_k, top_p: see :func:`filter_logits`.
        generator: the only source of randomness.
        uniforms: instead of ``generator``, the (N, B) uniforms of :func:`draw_uniforms`, drawn up front.
        given: (B, N) codes, read where ``fixed`` is True; fixed: (B, N) bool, the tokens to keep. A fixed
            token is fed instead of a draw (its uniform is unused), so every free token is sampled given
            the tokens before it in raster order, as taming's completion does; the ones after it are
            not seen by that draw.
        use_cache: False recomputes the whole sequence each step (same results, quadratic cost).

    Returns:
        (B, N) int64 code indices in raster order; equal to ``given`` wherever ``fixed``.
    """
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number (1 = no guidance), got {guidance}")
    if guidance_tokens < 0:
        raise ValueError(f"guidance_tokens must be >= 0 (0 guides every token), got {guidance_tokens}")
    batch, count = cond.embeddings.shape[0], model.config.num_tokens
    if uniforms is not None and tuple(uniforms.shape) != (count, batch):
        raise ValueError(f"uniforms must have shape ({count}, {batch}) (tokens, rows), got {tuple(uniforms.shape)}")
    keep = check_fixed(given, fixed, batch, count, cond.embeddings.device)
    if keep is not None and bool(keep[1].all()):
        return keep[0].clone()  # nothing to sample: N forward passes would only feed the given tokens
    guided = uncond is not None and guidance != 1.0
    stepper = _Stepper(model, Prefix.cat(cond, uncond) if guided else cond, use_cache)
    stop = guidance_tokens if guidance_tokens > 0 else count
    tokens = torch.empty(batch, count, dtype=torch.long, device=cond.embeddings.device)
    logits = stepper.first()
    for index in range(count):
        if guided:
            conditional, unconditional = logits[:batch], logits[batch:]
            logits = unconditional + guidance * (conditional - unconditional)
            if index + 1 >= stop:
                guided = False
                stepper.keep_rows(batch)
        tokens[:, index] = draw(filter_logits(logits, temperature, top_k, top_p), generator,
                                None if uniforms is None else uniforms[index])
        if keep is not None:
            tokens[:, index] = torch.where(keep[1][:, index], keep[0][:, index], tokens[:, index])
        if index + 1 < count:
            token = tokens[:, index]
            logits = stepper.next(torch.cat([token, token]) if guided else token, index)
    return tokens
