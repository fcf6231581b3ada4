"""MaskGIT's parallel decoding: T steps over all N tokens, guided, filtered, with fixed tokens kept.

Shape vocabulary: B samples, N image tokens, K codebook size, T steps.

    tokens = sample_maskgit(model, model.prefix(cond), model.null_prefix(B), steps=10, guidance=3.0,
                            generator=torch.Generator().manual_seed(0))                 # (B, N)

Each step runs the model once on [cond; uncond] rows (classifier-free guidance in one batch), samples a
code for every masked position from the filtered logits, scores it by its log-probability plus Gumbel
noise whose temperature falls linearly to 0 over the steps, keeps the most confident and re-masks the
rest so that floor(F cos(pi / 2 (t + 1) / T)) stay masked after step t, where F is the row's number of
free (not fixed) tokens. Fixed tokens (``given`` where ``fixed``) are never sampled, scored or masked:
inpainting and editing pass the tokens to keep that way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from prior.sampling import check_fixed, draw, filter_logits
from prior.transformer import Prefix, PriorConfig


@dataclass(frozen=True)
class MaskGITSampling:
    """MaskGIT's own sampling settings (the shared ones, guidance and filters, are
    :class:`prior.sampling.SamplingConfig`'s); a pipeline records them as its defaults.

    Attributes:
        steps: T, parallel decoding steps (forward passes); the pipeline's ``num_inference_steps``.
        choice_temperature: scale of the Gumbel noise on the confidences at the first step (falling
            linearly to 0 at the last); 0 keeps the most likely draws.
    """

    steps: int = 10
    choice_temperature: float = 4.5

    def problems(self, where: str = "") -> list[str]:
        """What is wrong with these settings, each naming the field (prefixed by ``where``)."""
        found = []
        if not isinstance(self.steps, int) or self.steps < 1:
            found.append(f"{where}steps={self.steps!r} must be an integer >= 1 (MaskGIT uses 8-12)")
        if not 0 <= self.choice_temperature < math.inf:
            found.append(f"{where}choice_temperature={self.choice_temperature!r} must be a finite number >= 0")
        return found


class TokenModel(Protocol):
    """What the sampler needs of a model: :class:`prior.maskgit.MaskGIT` or a test double."""

    config: PriorConfig

    def logits(self, prefix: Prefix, idx: Tensor) -> Tensor: ...


def masked_counts(free: Tensor, steps: int) -> Tensor:
    """How many of each row's ``free`` (B,) tokens stay masked after each step: (T, B) int64.

    floor(free cos(pi / 2 (t + 1) / T)), non-increasing, and 0 after the last step. (With very few free
    tokens a step may decide none; that costs one forward pass and changes nothing.)
    """
    progress = torch.arange(1, steps + 1, dtype=torch.float64, device=free.device) / steps
    counts = (free[None].double() * torch.cos(math.pi / 2 * progress)[:, None]).floor().long()
    counts[-1] = 0  # cos(pi / 2) is 6e-17, not 0: the last step decides everything
    return counts


def guided_logits(logits: Tensor, batch: int, guidance: float) -> Tensor:
    """Combine the [cond; uncond] rows (2B, ...) into u + g (c - u), (B, ...); B rows pass through."""
    if logits.shape[0] == batch:
        return logits
    conditional, unconditional = logits[:batch], logits[batch:]
    return unconditional + guidance * (conditional - unconditional)


def draw_uniforms(steps: int, rows: int, tokens: int, generator: torch.Generator | None = None) -> Tensor:
    """Every uniform of sampling ``rows`` images, drawn up front on the generator's device: (T, 2, B, N).

    ``[t, 0]`` draws step t's codes, ``[t, 1]`` its Gumbel noise. Drawn per image, not per batch, so a
    pipeline can sample its images in chunks of any size and get the same tokens.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(rows, steps, 2, tokens, generator=generator, device=device).permute(1, 2, 0, 3)


def gumbel(uniform: Tensor) -> Tensor:
    """Standard Gumbel noise -log(-log u) of uniforms in [0, 1)."""
    return -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))


def check_settings(steps: int, guidance: float, choice_temperature: float) -> None:
    """Refuse settings that would fail later or mean nothing, naming the fix."""
    problems = MaskGITSampling(steps, choice_temperature).problems()
    if not math.isfinite(guidance):
        problems.append(f"guidance={guidance} must be a finite number (1 = no guidance)")
    if problems:
        raise ValueError("; ".join(problems))


@torch.no_grad()
def sample_maskgit(model: TokenModel, cond: Prefix, uncond: Prefix | None = None, *, steps: int = 10,
                   guidance: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   choice_temperature: float = 4.5, given: Tensor | None = None, fixed: Tensor | None = None,
                   generator: torch.Generator | None = None, uniforms: Tensor | None = None) -> Tensor:
    """Sample N code indices per row in ``steps`` parallel steps (see the module docstring).

    Args:
        model: the MaskGIT prior (in eval mode).
        cond: (B, P, W) embedded conditions; uncond: the unconditional rows, or None for no guidance.
        steps: T, forward passes in all.
        guidance: g in u + g (c - u) on the logits; 1 (or ``uncond`` None) runs the conditional rows only.
        temperature, top_k, top_p: see :func:`prior.sampling.filter_logits`; the token is still drawn
            from the filtered distribution (top_k > 1 samples, it is not argmax).
        choice_temperature: scale of the Gumbel noise on the confidences at step 0, falling linearly to 0.
        given: (B, N) codes, read where ``fixed`` is True; fixed: (B, N) bool, the tokens to keep.
        generator: the only source of randomness.
        uniforms: instead of ``generator``, the (T, 2, B, N) uniforms of :func:`draw_uniforms`.

    Returns:
        (B, N) int64 code indices in raster order; equal to ``given`` wherever ``fixed``.
    """
    check_settings(steps, guidance, choice_temperature)
    batch, count, device = cond.embeddings.shape[0], model.config.num_tokens, cond.embeddings.device
    mask_id = model.config.codebook_size
    tokens = torch.full((batch, count), mask_id, dtype=torch.long, device=device)
    keep = check_fixed(given, fixed, batch, count, device)
    if keep is not None:
        tokens = torch.where(keep[1], keep[0], tokens)
    if uniforms is None:
        uniforms = draw_uniforms(steps, batch, count, generator)
    elif tuple(uniforms.shape) != (steps, 2, batch, count):
        raise ValueError(f"uniforms must have shape ({steps}, 2, {batch}, {count}) (steps, 2, rows, tokens), "
                         f"got {tuple(uniforms.shape)}")
    guided = uncond is not None and guidance != 1.0
    prefix = Prefix.cat(cond, uncond) if guided else cond
    counts = masked_counts((tokens == mask_id).sum(dim=1), steps)
    for step in range(steps):
        masked = tokens == mask_id
        if not bool(masked.any()):
            break
        logits = guided_logits(model.logits(prefix, torch.cat([tokens, tokens]) if guided else tokens), batch, guidance)
        filtered = filter_logits(logits, temperature, top_k, top_p)
        uniform = uniforms[step].to(device)
        sampled = draw(filtered.flatten(0, 1), uniform=uniform[0].flatten()).view(batch, count)
        log_prob = filtered.log_softmax(dim=-1).gather(-1, sampled[..., None])[..., 0]
        noise = choice_temperature * (1 - (step + 1) / steps) * gumbel(uniform[1])
        # higher = surer; decided and fixed tokens get +inf so they are never re-masked
        confidence = torch.where(masked, log_prob + noise, torch.full_like(log_prob, math.inf))
        rank = confidence.argsort(dim=1).argsort(dim=1)  # 0 = least confident
        remask = rank < counts[step][:, None]
        tokens = torch.where(masked & ~remask, sampled, tokens)
    return tokens
