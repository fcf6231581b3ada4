"""The VQ-GAN encoder and decoder (Esser et al. 2021), built from the shared layers.

Shape vocabulary: B batch, C channels, H W pixels, h w latent grid (H / f, W / f with
f = 2 ** (len(channel_mult) - 1)), Z ``z_channels``.

Layout (the order taming-transformers runs, with its tensors one-to-one):
    encoder: conv_in -> per level [num_res_blocks x (ResBlock, attention?)] + Downsample
             -> mid (ResBlock, attention, ResBlock) -> GroupNorm, SiLU, conv_out
    decoder: conv_in -> mid -> per level, lowest resolution first,
             [(num_res_blocks + 1) x (ResBlock, attention?)] + Upsample -> GroupNorm, SiLU, conv_out
Unlike taming, ``decoder.up`` is stored in the order it runs (``up.0`` is the lowest resolution),
which is also diffusers' ``up_blocks`` order.

With ``gradient_checkpointing`` in the config, every ResBlock and attention block of the encoder and
decoder recomputes its activations in the backward pass while training (the quantizer is never
checkpointed: its training-mode forward updates codebook state, which a replay would do twice).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from common.layers import Downsample, ResBlock, SpatialSelfAttention, Upsample, group_norm, maybe_checkpoint

if TYPE_CHECKING:
    from autoencoder.model_config import AutoencoderConfig


class Level(nn.Module):
    """One resolution: ResBlocks, each optionally followed by self-attention, then a resampler.

    Args:
        in_channels, out_channels: widths into the first block and out of every block.
        num_blocks: number of ResBlocks.
        attention: add a SpatialSelfAttention after every ResBlock.
        resample: a Downsample or Upsample applied last, or None at the end of the stack.
        dropout, eps: passed to the ResBlocks (eps also to the attention GroupNorm).
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool,
                 resample: nn.Module | None, dropout: float, eps: float) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.blocks = nn.ModuleList(ResBlock(widths[i], out_channels, dropout=dropout, eps=eps)
                                    for i in range(num_blocks))
        self.attns = nn.ModuleList(SpatialSelfAttention(out_channels, eps=eps)
                                   for _ in range(num_blocks if attention else 0))
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: Tensor, checkpointing: bool = False) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W') with H' = H/2, 2H or H depending on the resampler."""
        for index, block in enumerate(self.blocks):
            x = maybe_checkpoint(block, x, enabled=checkpointing)
            if self.attns:
                x = maybe_checkpoint(self.attns[index], x, enabled=checkpointing)
        return self.resample(x)


class MidBlock(nn.Module):
    """ResBlock, self-attention (optional), ResBlock at the lowest resolution."""

    def __init__(self, channels: int, attention: bool, dropout: float, eps: float) -> None:
        super().__init__()
        self.block_1 = ResBlock(channels, dropout=dropout, eps=eps)
        self.attn = SpatialSelfAttention(channels, eps=eps) if attention else nn.Identity()
        self.block_2 = ResBlock(channels, dropout=dropout, eps=eps)

    def forward(self, x: Tensor, checkpointing: bool = False) -> Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        for block in (self.block_1, self.attn, self.block_2):
            x = maybe_checkpoint(block, x, enabled=checkpointing and not isinstance(block, nn.Identity))
        return x


def _level_widths(config: AutoencoderConfig) -> list[int]:
    return [config.base_channels * mult for mult in config.channel_mult]


def _has_attention(config: AutoencoderConfig, level: int) -> bool:
    return config.resolution // 2 ** level in config.attn_resolutions


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> features (B, out_channels, h, w).

    Args:
        config: the autoencoder config (widths, depths, attention resolutions, dropout, eps).
        out_channels: width of ``conv_out`` (Z for VQ, 2Z for the Gaussian posterior's mean and log-variance).
    """

    def __init__(self, config: AutoencoderConfig, out_channels: int) -> None:
        super().__init__()
        self.gradient_checkpointing = config.gradient_checkpointing
        widths = _level_widths(config)
        eps, last = config.norm_eps, len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        previous = config.base_channels
        for level, width in enumerate(widths):
            resample = Downsample(width, asymmetric_padding=True) if level != last else None
            self.down.append(Level(previous, width, config.num_res_blocks, _has_attention(config, level),
                                   resample, config.dropout, eps))
            previous = width
        self.mid = MidBlock(previous, config.mid_attention, config.dropout, eps)
        self.norm_out = group_norm(previous, eps)
        self.conv_out = nn.Conv2d(previous, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, h, w)."""
        checkpointing = self.gradient_checkpointing and self.training
        h = self.conv_in(x)
        for level in self.down:
            h = level(h, checkpointing)
        h = self.mid(h, checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, Z, h, w) -> images (B, in_channels, H, W), mirroring :class:`Encoder`.

    Args:
        config: the autoencoder config.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.gradient_checkpointing = config.gradient_checkpointing
        widths = _level_widths(config)
        eps = config.norm_eps
        previous = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, previous, 3, padding=1)
        self.mid = MidBlock(previous, config.mid_attention, config.dropout, eps)
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            resample = Upsample(width) if level != 0 else None
            self.up.append(Level(previous, width, config.num_res_blocks + 1, _has_attention(config, level),
                                 resample, config.dropout, eps))
            previous = width
        self.norm_out = group_norm(previous, eps)
        self.conv_out = nn.Conv2d(previous, config.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """(B, Z, h, w) -> (B, in_channels, H, W), unbounded (trained toward [-1, 1])."""
        checkpointing = self.gradient_checkpointing and self.training
        h = self.mid(self.conv_in(z), checkpointing)
        for level in self.up:
            h = level(h, checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))
