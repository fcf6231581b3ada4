"""The layers every stage shares: one attention, one ResBlock, resampling, timestep embeddings.

Shape vocabulary: B batch, C channels, H W spatial size, N query tokens, L context tokens,
D embedding width.

The parameter layout (``norm1/conv1/emb_proj/norm2/conv2/skip``; ``to_q/to_k/to_v/to_out``) is chosen so
that taming-transformers' and diffusers' weights map onto these modules one tensor at a time.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(function: Callable[..., Tensor], *args: Any, enabled: bool) -> Tensor:
    """Call ``function(*args)``, recomputing its activations in the backward pass when ``enabled``.

    Skipped under ``no_grad``, where there is no backward pass to save memory for. The non-reentrant
    variant replays the RNG state (same dropout masks) and, unlike the reentrant one, still reaches the
    parameters when no input requires a gradient (the first block's input is the data).
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


# On a CPU, PyTorch's bf16/fp16 attention kernel is 3-8x slower, forward + backward, than its fp32 one for
# the short sequences of latent grids and token priors (64 x 16 x 16 ... 64 x 80 x 80), and the fp32 kernel
# is as fast up to 256 x 256 (bench/attention_precision.py); so attention up to that size runs in fp32 there
# (more accurate too) and returns the input dtype. Longer sequences and GPUs keep the kernel autocast picks.
FP32_ATTENTION_MAX = 256 * 256


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` of (B, heads, N, d) queries over (B, heads, L, d) keys/values,
    in fp32 for reduced-precision inputs of N x L <= ``FP32_ATTENTION_MAX`` on a CPU (see above)."""
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-2] * k.shape[-2] <= FP32_ATTENTION_MAX):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def group_norm(channels: int, eps: float = 1e-6, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows it (fewer for narrow test models)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=eps, affine=True)


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention`` (:func:`attend`): self, cross, causal.

    Args:
        dim: width of the queries (and of the output).
        context_dim: width of the keys/values source; ``None`` for self-attention.
        heads: number of heads; ``dim`` is split evenly unless ``head_dim`` is given.
        head_dim: width of one head (inner width = heads * head_dim).
        qkv_bias: bias on the query/key/value projections.
    """

    def __init__(self, dim: int, context_dim: int | None = None, heads: int = 1,
                 head_dim: int | None = None, qkv_bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        head_dim = head_dim or dim // heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                causal: bool = False) -> Tensor:
        """Attend from ``x`` (B, N, dim) to ``context`` (B, L, context_dim), or to ``x`` itself.

        ``context_mask`` (B, L) is True for real tokens and False for padding, which is never attended.
        """
        source = x if context is None else context
        q, k, v = (rearrange(p, "b n (h d) -> b h n d", h=self.heads)
                   for p in (self.to_q(x), self.to_k(source), self.to_v(source)))
        mask = None
        if context_mask is not None:
            keep = context_mask.bool()
            keep = keep | ~keep.any(dim=-1, keepdim=True)  # an all-padding row would give NaN: attend to all
            mask = keep[:, None, None, :]
        out = attend(q, k, v, mask, causal)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class SpatialSelfAttention(nn.Module):
    """Pre-norm residual self-attention over the pixels of a feature map (VQ-GAN's attention block)."""

    def __init__(self, channels: int, heads: int = 1, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = group_norm(channels, eps)
        self.attn = Attention(channels, heads=heads, qkv_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        height = x.shape[2]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        return x + rearrange(self.attn(tokens), "b (h w) c -> b c h w", h=height)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with pre-activation GroupNorm + SiLU, optional embedding, residual skip.

    Args:
        in_channels, out_channels: widths; a 1x1 convolution matches them on the skip path.
        emb_dim: width of a time/condition embedding added after the first convolution (0: none).
        dropout: dropout before the second convolution.
        eps: GroupNorm epsilon (taming uses 1e-6, diffusers' U-Net 1e-5).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, emb_dim: int = 0,
                 dropout: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels) if emb_dim else None
        self.norm2 = group_norm(out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        """(B, C_in, H, W), optional emb (B, emb_dim) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("this ResBlock was built with emb_dim > 0 and needs an embedding")
            h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution.

    ``asymmetric_padding`` pads one pixel right and bottom only (the VQ-GAN encoder's convention);
    otherwise one pixel on every side (the diffusion U-Net's convention).
    """

    def __init__(self, channels: int, out_channels: int | None = None, asymmetric_padding: bool = False) -> None:
        super().__init__()
        self.asymmetric_padding = asymmetric_padding
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=0 if asymmetric_padding else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.asymmetric_padding:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # Nearest upsampling has no bf16 kernel on some CPUs; it is cheap, so run it in fp32.
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (B,) -> (B, dim), as [cos, sin].

    Frequencies are ``max_period ** (-i / (dim/2 - freq_shift))`` for i < dim/2, the form diffusers'
    ``Timesteps(flip_sin_to_cos=True)`` computes, so imported U-Nets see the same embedding.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, so a residual branch starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module
