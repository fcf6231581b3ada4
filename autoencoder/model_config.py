"""The stage 1 autoencoder's config: architecture, latent width and the nested quantizer options.

It lives apart from :mod:`autoencoder.model` so that :mod:`autoencoder.networks` can name it without
importing the model that imports the networks.

    config = AutoencoderConfig(resolution=64, channel_mult=(1, 2, 2), quantizer=QuantizerConfig(codebook_size=512))

YAML files spell the quantizer options ``model.quantizer.codebook_size``; files that still have them flat
(``model.codebook_size``) load through :meth:`AutoencoderConfig.upgrade_legacy`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from autoencoder.quantizer import QuantizerConfig
from common.component_check import over_limits
from common.config import ConfigError, nest_flat_keys

if TYPE_CHECKING:
    from common.data import DataConfig

# The quantizer options that used to sit flat in the autoencoder config; code_dim stays there, as the
# latent width of both kinds. Computed, so a new quantizer option needs no edit here.
FLAT_QUANTIZER_KEYS: tuple[str, ...] = tuple(f.name for f in fields(QuantizerConfig) if f.name != "code_dim")


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture and regulariser of a stage 1 autoencoder (defaults: taming's ImageNet f16 VQ-GAN
    with low-dimensional, l2-normalised, k-means-initialised codes and dead-code restart).

    Attributes:
        resolution: training image size H = W; fixes which levels get attention.
        in_channels: image channels (also the decoder's output channels).
        base_channels: width of the first level; level i has base_channels * channel_mult[i].
        channel_mult: one multiplier per level; the downsampling factor is 2 ** (len - 1).
        num_res_blocks: ResBlocks per encoder level (the decoder has one more).
        attn_resolutions: feature-map sizes at which every ResBlock is followed by self-attention.
        mid_attention: self-attention between the two middle ResBlocks.
        z_channels: width of the encoder output and decoder input, around the 1x1 quant convs.
        dropout: dropout inside the ResBlocks.
        norm_eps: GroupNorm epsilon.
        kind: "vq" (vector-quantized) or "kl" (diagonal Gaussian posterior).
        code_dim: D, the latent width: the width of one code ("vq") or of the posterior ("kl").
        quantizer: the quantizer options ("vq"; ignored by "kl"), see
            :class:`autoencoder.quantizer.QuantizerConfig`; its ``code_dim`` is left None (taken from here).
        logvar_min, logvar_max: clamp of the posterior log-variance (KL variant).
        gradient_checkpointing: recompute the encoder's and decoder's block activations in the backward
            pass while training (less memory, about one more forward pass of time); no effect in eval mode.
    """

    resolution: int = 256
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    mid_attention: bool = True
    z_channels: int = 256
    dropout: float = 0.0
    norm_eps: float = 1e-6
    kind: Literal["vq", "kl"] = "vq"
    code_dim: int = 8
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    gradient_checkpointing: bool = False  # off by default, so config.json files saved before it load unchanged

    # Upper bounds of the sizes that allocate memory or build modules, each far beyond any real model.
    LIMITS: ClassVar[dict[str, int]] = {
        "resolution": 16384,  # training image side; stage-1 models train at 256-1024 px
        "in_channels": 1024,  # image channels: 3 for RGB, tens for multispectral data
        "base_channels": 8192,  # level-0 width: 64-256 in published autoencoders; one 3x3 conv is then 600M weights
        "channel_mult (max)": 64,  # width multipliers are 1-8 in every published config
        "channel_mult (levels)": 12,  # a downsampling factor of 2**11 = 2048
        "num_res_blocks": 64,  # 2-3 in published configs
        "z_channels": 8192,  # 4-256 in published configs
        "code_dim": 8192,  # the latent width: 3-16 for KL, 4-256 for VQ
        "quantizer.codebook_size": 2**24,  # 64 x the largest published codebooks (2**18); K x D floats each
    }

    def __post_init__(self) -> None:
        problems = over_limits({
            "resolution": self.resolution, "in_channels": self.in_channels, "base_channels": self.base_channels,
            "channel_mult (max)": max(self.channel_mult, default=0), "channel_mult (levels)": len(self.channel_mult),
            "num_res_blocks": self.num_res_blocks, "z_channels": self.z_channels, "code_dim": self.code_dim,
            "quantizer.codebook_size": self.quantizer.codebook_size}, self.LIMITS)
        if not self.channel_mult or min(self.channel_mult) < 1:
            problems.append(f"channel_mult must be a non-empty list of positive ints, got {self.channel_mult}")
        elif self.resolution % self.downsample_factor:
            problems.append(f"resolution {self.resolution} is not divisible by the downsampling factor "
                            f"{self.downsample_factor} of channel_mult {self.channel_mult}")
        for name in ("resolution", "in_channels", "base_channels", "num_res_blocks", "z_channels", "code_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.quantizer.code_dim not in (None, self.code_dim):
            problems.append(f"quantizer.code_dim={self.quantizer.code_dim} contradicts code_dim={self.code_dim}; "
                            "leave quantizer.code_dim out, it is taken from code_dim")
        if self.kind not in ("vq", "kl"):
            problems.append(f"kind must be 'vq' or 'kl', got {self.kind!r}")
        if problems:
            raise ConfigError("invalid AutoencoderConfig: " + "; ".join(problems))

    @classmethod
    def upgrade_legacy(cls, data: dict[str, Any], where: str = "") -> tuple[dict[str, Any], list[str]]:
        """Read the layout with the quantizer options flat (``codebook_size`` beside ``code_dim``)."""
        return nest_flat_keys(data, "quantizer", FLAT_QUANTIZER_KEYS, where)

    @property
    def downsample_factor(self) -> int:
        """f: how many pixels one latent position covers along each side."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        """h = w at the training resolution."""
        return self.resolution // self.downsample_factor

    @property
    def codebook_size(self) -> int:
        """K, read-only: set it as ``quantizer.codebook_size``."""
        return self.quantizer.codebook_size

    def resolved_quantizer(self) -> QuantizerConfig:
        """The quantizer options with ``code_dim`` filled in, as :class:`VectorQuantizer` takes them."""
        return replace(self.quantizer, code_dim=self.code_dim)


def check_data_resolution(model: AutoencoderConfig, data: DataConfig) -> None:
    """Stage 1 trains on images of the model's resolution: fail when the data section says otherwise.

    (A diffusion run may encode at another size, so only the autoencoder's training config calls this.)
    """
    if model.resolution != data.resolution:
        raise ConfigError(f"model.resolution={model.resolution} but data.resolution={data.resolution}: stage 1 "
                          "trains on images of the model's resolution; set both to the same size")
