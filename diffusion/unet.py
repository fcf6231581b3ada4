"""The text- and/or class-conditional latent diffusion U-Net (Rombach et al. 2022), with save/load.

Shape vocabulary: B batch, C latent channels, h w latent grid, L text tokens, D context width,
E time-embedding width (4x the first level width).

    unet = UNet(UNetConfig(in_channels=4, out_channels=4, block_channels=(64, 128, 128), context_dim=384))
    eps = unet(z_t, t, context=text.states, context_mask=text.mask)   # (B, 4, h, w)

The network is split in two halves that own disjoint parameters: :class:`UNetEncoder` (timestep and
class embedding, ``conv_in``, the down path and the middle) and :class:`UNetDecoder` (the up path with
skip connections and the output head). A noisy-latent classifier for classifier guidance can reuse
:class:`UNetEncoder` alone, and load a trained U-Net's ``encoder.*`` weights into it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.checkpoint import load_module, save_component
from common.component_check import over_limits
from common.config import ConfigError
from common.layers import Downsample, ResBlock, Upsample, group_norm, maybe_checkpoint, zero_module
from diffusion.blocks import SpatialTransformer, TimestepEmbedder

COMPONENT_KIND = "unet"
NULL_CLASS = 0  # the class id of "no class": real labels are fed as label + 1


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the U-Net.

    Attributes:
        in_channels, out_channels: latent channels in and prediction channels out; None (the training
            configs' default): the autoencoder's ``code_dim``, filled in by :meth:`resolve`.
        block_channels: width of each resolution level; the latent is halved between levels.
        layers_per_block: ResBlocks per down level (each up level has one more).
        attention_levels: per level, whether every ResBlock is followed by a :class:`SpatialTransformer`
            (diffusers' CrossAttnDownBlock2D / CrossAttnUpBlock2D versus DownBlock2D / UpBlock2D).
        mid_attention: a SpatialTransformer between the two middle ResBlocks.
        transformer_depth: transformer layers inside each SpatialTransformer.
        head_dim: width of one attention head; level ``i`` has ``block_channels[i] // head_dim`` heads.
        num_heads: if > 0, this many heads at every level instead (each ``channels // num_heads`` wide);
            this is what diffusers calls ``attention_head_dim``.
        context_dim: width D of the text tokens; 0 builds no cross-attention (no text); None: the text
            encoder's width, filled in by :meth:`resolve`.
        num_classes: number of classes for class conditioning; 0 for none. The embedding has
            ``num_classes + 1`` rows: id 0 is the null class and label ``y`` is fed as ``y + 1``.
        dropout: dropout inside ResBlocks and feed-forwards.
        norm_eps: GroupNorm epsilon of the ResBlocks and the output head (the transformers use 1e-6).
        use_linear_projection: linear (True) or 1x1-convolution (False) projections around the
            transformers; the same map, only the weight layout differs (see SpatialTransformer).
        timestep_freq_shift: ``freq_shift`` of the sinusoidal timestep features (diffusers' name).
        gradient_checkpointing: recompute block activations in the backward pass while training.
        pooled_context: also add the masked mean of the text tokens, through Linear -> SiLU -> Linear,
            to the time embedding, so every ResBlock sees the prompt (cross-attention reaches only the
            attention levels). A short-caption model such as the emoji demo's learns which glyph a prompt
            names in fewer steps this way. In diffusers' terms: ``class_embed_type="projection"`` fed
            with the pooled tokens.
    """

    in_channels: int | None = None
    out_channels: int | None = None
    block_channels: tuple[int, ...] = (128, 256, 512)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (False, True, True)
    mid_attention: bool = True
    transformer_depth: int = 1
    head_dim: int = 64
    num_heads: int = 0
    context_dim: int | None = None
    num_classes: int = 0
    dropout: float = 0.0
    norm_eps: float = 1e-5
    use_linear_projection: bool = True
    timestep_freq_shift: float = 0.0
    gradient_checkpointing: bool = False
    pooled_context: bool = False

    # Upper bounds of the sizes that allocate memory or build modules, each far beyond any real model.
    LIMITS: ClassVar[dict[str, int]] = {
        "in_channels": 8192, "out_channels": 8192,  # the autoencoder's code_dim (AutoencoderConfig bounds it so)
        "block_channels (max)": 16384,  # 320-1280 in Stable Diffusion / SDXL; a 3x3 conv is then 2.4G weights
        "block_channels (levels)": 12,  # the latent is halved between levels: 2**11 is beyond any latent grid
        "layers_per_block": 64,  # 1-3 in published U-Nets
        "transformer_depth": 128,  # 1-10 in published U-Nets (SDXL: 10)
        "head_dim": 4096, "num_heads": 4096,  # 8-64 heads of 32-160 channels in published U-Nets
        "context_dim": 65536,  # the text encoder's width: 768-4096 (T5-XXL)
        "num_classes": 2**24,  # one embedding row each; ImageNet-21k has 21,841 classes
    }

    def __post_init__(self) -> None:
        problems = over_limits({
            "in_channels": self.in_channels or 0, "out_channels": self.out_channels or 0,
            "block_channels (max)": max(self.block_channels, default=0),
            "block_channels (levels)": len(self.block_channels), "layers_per_block": self.layers_per_block,
            "transformer_depth": self.transformer_depth, "head_dim": self.head_dim, "num_heads": self.num_heads,
            "context_dim": self.context_dim or 0, "num_classes": self.num_classes}, self.LIMITS)
        if not self.block_channels or min(self.block_channels) < 1:
            problems.append(f"block_channels must be positive widths, got {self.block_channels}")
        if len(self.attention_levels) != len(self.block_channels):
            problems.append(f"attention_levels has {len(self.attention_levels)} entries but block_channels has "
                            f"{len(self.block_channels)}; give one bool per level")
        if self.layers_per_block < 1 or self.transformer_depth < 1:
            problems.append("layers_per_block and transformer_depth must be at least 1")
        if self.num_heads < 0 or (self.num_heads == 0 and self.head_dim < 1):
            problems.append("set head_dim > 0, or num_heads > 0 for a fixed number of heads per level")
        attended = [c for c, a in zip(self.block_channels, self.attention_levels) if a]
        if self.mid_attention and self.block_channels:
            attended.append(self.block_channels[-1])
        for channels in attended:
            divisor = self.num_heads or self.head_dim
            if channels % divisor:
                what = "num_heads" if self.num_heads else "head_dim"
                problems.append(f"level width {channels} is not divisible by {what}={divisor}")
        if self.pooled_context and self.context_dim == 0:
            problems.append("pooled_context needs text (context_dim > 0)")
        if problems:
            raise ConfigError("invalid UNetConfig: " + "; ".join(problems))

    def resolve(self, code_dim: int, text_width: int, where: str = "model.") -> UNetConfig:
        """This config with the derived fields filled in: in/out channels from the autoencoder's
        ``code_dim``, ``context_dim`` from the text encoder's width (0: no text encoder). A value given
        explicitly must agree, since a mismatch would only fail later, inside the first forward pass."""
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) not in (None, code_dim):
                raise ConfigError(f"{where}{name}={getattr(self, name)} contradicts the autoencoder's code_dim="
                                  f"{code_dim}; leave {where}{name} out, it is taken from the autoencoder")
        if self.context_dim not in (None, text_width):
            raise ConfigError(f"{where}context_dim={self.context_dim} must equal the text encoder's width "
                              f"{text_width}; set {where}context_dim={text_width}")
        return dataclasses.replace(self, in_channels=code_dim, out_channels=code_dim, context_dim=text_width)

    def check_resolved(self) -> None:
        """Refuse to build a network while a derived field is still None."""
        unset = [name for name in ("in_channels", "out_channels", "context_dim") if getattr(self, name) is None]
        if unset:
            raise ConfigError(f"UNetConfig.{', '.join(unset)} is None (taken from the autoencoder and text "
                              "encoder): call UNetConfig.resolve(code_dim, text_width) first, or set it")

    @property
    def time_embed_dim(self) -> int:
        """Width E of the timestep (and class) embedding."""
        return 4 * self.block_channels[0]

    def heads(self, channels: int) -> int:
        """Number of attention heads at a level of width ``channels``."""
        return self.num_heads or channels // self.head_dim

    def transformer(self, channels: int) -> SpatialTransformer:
        """A SpatialTransformer of this config at width ``channels``."""
        return SpatialTransformer(channels, self.heads(channels), self.transformer_depth, self.context_dim,
                                  self.dropout, self.use_linear_projection)

    def resblock(self, in_channels: int, out_channels: int) -> ResBlock:
        """A ResBlock of this config, fed with the time embedding."""
        return ResBlock(in_channels, out_channels, emb_dim=self.time_embed_dim, dropout=self.dropout,
                        eps=self.norm_eps)


class Level(nn.Module):
    """One resolution level: ResBlocks, each optionally followed by a SpatialTransformer, then resampling."""

    def __init__(self, blocks: list[ResBlock], attns: list[SpatialTransformer], resample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)  # empty, or one per block
        self.resample = resample


class Middle(nn.Module):
    """The bottleneck: ResBlock, optional SpatialTransformer, ResBlock."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        channels = config.block_channels[-1]
        self.block_1 = config.resblock(channels, channels)
        self.attn = config.transformer(channels) if config.mid_attention else None
        self.block_2 = config.resblock(channels, channels)


class Conditioning(NamedTuple):
    """What every block sees besides the feature map."""

    emb: Tensor                  # (B, E) time (+ class) embedding
    context: Tensor | None       # (B, L, D) text tokens
    context_mask: Tensor | None  # (B, L) True for real tokens


class EncoderOutput(NamedTuple):
    """The down half's result: bottleneck features, skip activations (in push order) and conditioning."""

    h: Tensor            # (B, C_last, h / 2**(levels-1), w / 2**(levels-1))
    skips: list[Tensor]
    cond: Conditioning


def pooled(context: Tensor | None, mask: Tensor | None) -> Tensor:
    """The mean of the real (unmasked) text tokens: (B, L, D) -> (B, D)."""
    if context is None:
        raise ValueError("this U-Net adds the pooled text to its time embedding: pass context (the text tokens)")
    if mask is None:
        return context.mean(1)
    weights = mask.to(context.dtype).unsqueeze(-1)
    return (context * weights).sum(1) / weights.sum(1).clamp_min(1)


class UNetEncoder(nn.Module):
    """Timestep/class embedding, ``conv_in``, the down path and the middle of the U-Net."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        config.check_resolved()
        self.config = config
        widths = config.block_channels
        self.time_embed = TimestepEmbedder(widths[0], config.time_embed_dim, config.timestep_freq_shift)
        self.class_embed = nn.Embedding(config.num_classes + 1, config.time_embed_dim) if config.num_classes else None
        self.context_embed = (nn.Sequential(nn.Linear(config.context_dim, config.time_embed_dim), nn.SiLU(),
                                            nn.Linear(config.time_embed_dim, config.time_embed_dim))
                              if config.pooled_context else None)
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        for level, (width, attention) in enumerate(zip(widths, config.attention_levels)):
            in_widths = [widths[max(level - 1, 0)]] + [width] * (config.layers_per_block - 1)
            last = level == len(widths) - 1
            self.down.append(Level(
                [config.resblock(c, width) for c in in_widths],
                [config.transformer(width) for _ in in_widths] if attention else [],
                None if last else Downsample(width),
            ))
        self.mid = Middle(config)

    def embed(self, t: Tensor | float, batch: int, device: torch.device, class_labels: Tensor | None = None,
              context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """Time (+ class, + pooled text) embedding (B, E); missing class labels mean the null class."""
        emb = self.time_embed(torch.as_tensor(t, device=device).expand(batch))  # a scalar or (1,) is broadcast
        if self.context_embed is not None:
            emb = emb + self.context_embed(pooled(context, context_mask)).to(emb.dtype)
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), NULL_CLASS, dtype=torch.long, device=device)
            emb = emb + self.class_embed(class_labels).to(emb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels were given but this U-Net was built with num_classes=0")
        return emb

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor | None = None,
                context_mask: Tensor | None = None, class_labels: Tensor | None = None) -> EncoderOutput:
        """Run the down path and the middle; see :meth:`UNet.forward` for the arguments."""
        if context_mask is not None:
            context_mask = context_mask.bool()
        cond = Conditioning(self.embed(t, x.shape[0], x.device, class_labels, context, context_mask), context,
                            context_mask)
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for index, block in enumerate(level.blocks):
                h = run_block(self, block, level.attns[index] if level.attns else None, h, cond)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = run_block(self, self.mid.block_1, self.mid.attn, h, cond)
        h = run_block(self, self.mid.block_2, None, h, cond)
        return EncoderOutput(h, skips, cond)


class UNetDecoder(nn.Module):
    """The up path, fed with the encoder's skip activations, and the output head."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        config.check_resolved()
        self.config = config
        widths = config.block_channels
        # up[i] works at the resolution of down[i]; it runs deepest first.
        self.up = nn.ModuleList()
        for level, (width, attention) in enumerate(zip(widths, config.attention_levels)):
            previous = widths[min(level + 1, len(widths) - 1)]
            skip_widths = [width] * config.layers_per_block + [widths[max(level - 1, 0)]]
            in_widths = [previous] + [width] * config.layers_per_block
            self.up.append(Level(
                [config.resblock(c + s, width) for c, s in zip(in_widths, skip_widths)],
                [config.transformer(width) for _ in in_widths] if attention else [],
                Upsample(width) if level > 0 else None,
            ))
        self.norm_out = group_norm(widths[0], config.norm_eps)
        self.conv_out = zero_module(nn.Conv2d(widths[0], config.out_channels, 3, padding=1))

    def forward(self, encoded: EncoderOutput) -> Tensor:
        """EncoderOutput -> prediction (B, out_channels, h, w)."""
        h, skips, cond = encoded.h, list(encoded.skips), encoded.cond
        for level in reversed(self.up):
            for index, block in enumerate(level.blocks):
                h = torch.cat([h, skips.pop()], dim=1)
                h = run_block(self, block, level.attns[index] if level.attns else None, h, cond)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def run_block(owner: UNetEncoder | UNetDecoder, block: ResBlock, attn: SpatialTransformer | None, h: Tensor,
              cond: Conditioning) -> Tensor:
    """ResBlock, then the optional SpatialTransformer, each checkpointed when the config asks for it."""
    enabled = owner.config.gradient_checkpointing and owner.training
    h = maybe_checkpoint(block, h, cond.emb, enabled=enabled)
    if attn is not None:
        h = maybe_checkpoint(attn, h, cond.context, cond.context_mask, enabled=enabled)
    return h


class UNet(nn.Module):
    """The denoising U-Net (predicts eps, x0 or v per ``DiffusionConfig.prediction``): encoder half, decoder
    half, skip connections between them."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = UNetEncoder(config)
        self.decoder = UNetDecoder(config)

    @property
    def downsample_factor(self) -> int:
        """How much smaller the bottleneck is than the input; h and w must be multiples of it."""
        return 2 ** (len(self.config.block_channels) - 1)

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor | None = None,
                context_mask: Tensor | None = None, class_labels: Tensor | None = None) -> Tensor:
        """Predict from noisy latents (the target, e.g. noise, is the training objective's choice).

        Args:
            x: (B, in_channels, h, w) noisy latents; h and w multiples of :attr:`downsample_factor`.
            t: (B,) timesteps, integer or fractional (a scalar is broadcast over the batch).
            context: (B, L, D) text tokens; required when ``config.context_dim > 0``.
            context_mask: (B, L) True for real tokens, False for padding (never attended). Every row
                needs at least one real token.
            class_labels: (B,) long class ids in [0, num_classes]: ``label + 1``, or ``NULL_CLASS`` (0)
                for none. ``None`` means the null class for the whole batch.

        Returns:
            (B, out_channels, h, w).
        """
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not a multiple of {self.downsample_factor}")
        return self.decoder(self.encoder(x, t, context, context_mask, class_labels))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``."""
        return save_component(directory, COMPONENT_KIND, self.config, self)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: object) -> UNet:
        """Load a U-Net saved by :meth:`save_pretrained`, strictly (every tensor must match).

        ``overrides`` replace config fields that do not change the weights, e.g.
        ``gradient_checkpointing=True`` or ``dropout=0.1``.
        """
        return load_module(directory, COMPONENT_KIND, UNetConfig, cls, **overrides)
