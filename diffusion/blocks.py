"""The U-Net's attention blocks and timestep embedder, built on :mod:`common.layers`.

Shape vocabulary: B batch, C channels, h w latent grid, N = h * w pixel tokens, L text tokens,
D context width (the text encoder's), E time-embedding width.

Parameter names follow the roles, and map one tensor at a time onto diffusers'
``Transformer2DModel`` / ``BasicTransformerBlock`` (see :mod:`diffusion.convert`).
"""
from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from common.layers import Attention, group_norm, timestep_embedding, zero_module


class GEGLUFeedForward(nn.Module):
    """Position-wise feed-forward with a GELU-gated linear unit (Shazeer 2020).

    ``proj_in`` produces the value and the gate side by side (value first), so its weight is
    diffusers' ``ff.net.0.proj`` unchanged.

    Args:
        dim: token width.
        mult: the hidden width is ``mult * dim``.
        dropout: dropout on the gated hidden units.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, dim) -> (B, N, dim)."""
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(value * F.gelu(gate)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer layer over pixel tokens: self-attention, cross-attention, feed-forward.

    Args:
        dim: token width.
        heads: attention heads; each is ``dim // heads`` wide.
        context_dim: width of the text tokens; 0 builds no cross-attention (unconditional or
            class-conditional models).
        dropout: feed-forward dropout.
    """

    def __init__(self, dim: int, heads: int, context_dim: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads)
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.attn2 = Attention(dim, context_dim=context_dim, heads=heads) if context_dim else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """Update tokens (B, N, dim), attending to ``context`` (B, L, D) where ``context_mask`` is True."""
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            if context is None:
                raise ValueError("this U-Net has cross-attention (context_dim > 0) and needs a context; "
                                 "encode the empty prompt \"\" for the unconditional case")
            x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Residual transformer over the pixels of a feature map (latent diffusion's text conditioning).

    GroupNorm -> ``proj_in`` -> ``depth`` x :class:`TransformerBlock` -> ``proj_out``, added to the input.
    ``proj_out`` starts at zero, so a fresh block is the identity.

    Args:
        channels: feature-map width C (also the token width).
        heads: attention heads (``channels`` must be divisible by it).
        depth: number of transformer layers.
        context_dim: text-token width D; 0 for no cross-attention.
        dropout: feed-forward dropout.
        linear_projection: project with linear layers on tokens (True) or 1x1 convolutions on the
            feature map (False, the original latent-diffusion layout). The two compute the same map;
            the flag only fixes the weight shapes, so either kind of checkpoint imports exactly.
    """

    def __init__(self, channels: int, heads: int, depth: int = 1, context_dim: int = 0, dropout: float = 0.0,
                 linear_projection: bool = True) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
        self.linear_projection = linear_projection
        self.norm = group_norm(channels, eps=1e-6)
        def make() -> nn.Module:  # SD 1.x projects with 1x1 convs, SD 2.x with linear layers
            return nn.Linear(channels, channels) if linear_projection else nn.Conv2d(channels, channels, 1)
        self.proj_in = make()
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim, dropout) for _ in range(depth))
        self.proj_out = zero_module(make())

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """(B, C, h, w), context (B, L, D), context_mask (B, L) bool -> (B, C, h, w)."""
        height = x.shape[2]
        h = self.norm(x)
        if self.linear_projection:
            h = self.proj_in(rearrange(h, "b c h w -> b (h w) c"))
        else:
            h = rearrange(self.proj_in(h), "b c h w -> b (h w) c")
        for block in self.blocks:
            h = block(h, context, context_mask)
        if self.linear_projection:
            h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=height)
        else:
            h = self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=height))
        return x + h


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (possibly fractional) timestep, then Linear -> SiLU -> Linear.

    Args:
        channels: width of the sinusoidal features (the U-Net's first level width).
        dim: output width E.
        freq_shift: the ``freq_shift`` of :func:`common.layers.timestep_embedding` (0 for SD-style models).
    """

    def __init__(self, channels: int, dim: int, freq_shift: float = 0.0) -> None:
        super().__init__()
        self.channels = channels
        self.freq_shift = freq_shift
        self.linear_1 = nn.Linear(channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        """(B,) timesteps -> (B, E), in the dtype of the weights (autocast may lower it further)."""
        features = timestep_embedding(t, self.channels, freq_shift=self.freq_shift).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))
