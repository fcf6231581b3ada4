"""Stage 1 autoencoders: the VQ-GAN generator and its KL-regularised sibling, with save/load.

Shape vocabulary: B batch, H W pixels, h w latent grid (H / f, W / f), D ``code_dim`` (the latent
width the quantizer or the Gaussian posterior works in), Z ``z_channels`` (the decoder's input width).

    model = VQGAN(AutoencoderConfig(resolution=64, channel_mult=(1, 2, 2),
                                    quantizer=QuantizerConfig(codebook_size=512)))
    indices = model.encode_to_indices(images)   # (B, h, w) int64
    images = model.decode_indices(indices)      # (B, 3, H, W)
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from autoencoder.model_config import AutoencoderConfig
from autoencoder.networks import Decoder, Encoder
from autoencoder.quantizer import QuantizerOutput, VectorQuantizer
from common.checkpoint import CheckpointError, load_module, load_state_strict, save_component
from common.config import ConfigError

__all__ = [  # AutoencoderConfig lives in autoencoder.model_config; importing it from here keeps working
    "Autoencoder", "AutoencoderConfig", "AutoencoderOutput", "GaussianPosterior", "KLAutoencoder", "VQGAN",
    "build_autoencoder",
]

COMPONENT_KIND = "autoencoder"


class GaussianPosterior(NamedTuple):
    """Diagonal Gaussian q(z | x) with fp32 ``mean`` and ``logvar``, each (B, D, h, w)."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample mean + std * eps, (B, D, h, w); gradients reach mean and logvar."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        """The most likely latent, the mean (B, D, h, w)."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over D, h, w: (B,), always >= 0."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderOutput(NamedTuple):
    """What both autoencoders' ``forward`` returns; the fields of the other kind are None.

    Attributes:
        recon: (B, in_channels, H, W) reconstruction.
        quantizer_loss: () codebook + beta * commitment loss ("vq"), else None.
        kl: () KL(q || N(0, I)) summed over the latent dimensions and averaged over the batch ("kl"),
            else None; the KL weight is applied by the loss.
        quant: the full quantizer output ("vq"), else None.
        posterior: the Gaussian posterior ("kl"), else None.
    """

    recon: Tensor
    quantizer_loss: Tensor | None
    kl: Tensor | None
    quant: QuantizerOutput | None
    posterior: GaussianPosterior | None


class Autoencoder(nn.Module):
    """What both kinds share: encoder, 1x1 quant convs, decoder, and component save/load.

    Use :class:`VQGAN` or :class:`KLAutoencoder`; ``Autoencoder.from_pretrained`` returns whichever
    the directory holds.
    """

    kind: str = ""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if config.kind != self.kind:
            raise ConfigError(f"{type(self).__name__} needs kind={self.kind!r}, the config says {config.kind!r}")
        self.config = config
        moments = 2 if config.kind == "kl" else 1  # mean and log-variance for the Gaussian posterior
        self.encoder = Encoder(config, moments * config.z_channels)
        self.quant_conv = nn.Conv2d(moments * config.z_channels, moments * config.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output convolution weight, where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, D, h, w) -> images (B, in_channels, H, W)."""
        return self.decoder(self.post_quant_conv(z))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (weights and quantizer state) to ``directory``."""
        return save_component(directory, COMPONENT_KIND, self.config, self)

    def load_weights(self, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
        """Load a full state dict strictly; missing, unexpected or mis-shaped tensors are named in the error."""
        load_state_strict(self, state_dict, source)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: object) -> Autoencoder:
        """Load a directory written by :meth:`save_pretrained` (strict; on CPU; in eval mode).

        ``overrides`` replace config fields that do not change the weights, e.g. ``gradient_checkpointing=True``
        to fine-tune a saved model.
        """
        def build(config: AutoencoderConfig) -> Autoencoder:
            if not issubclass(_CLASSES[config.kind], cls):
                raise CheckpointError(f"{directory} holds a {config.kind!r} autoencoder, not a {cls.__name__}")
            return build_autoencoder(config)

        return load_module(directory, COMPONENT_KIND, AutoencoderConfig, build, **overrides).eval()


class VQGAN(Autoencoder):
    """The vector-quantized autoencoder: encode -> quantize -> decode.

    Args:
        config: an :class:`AutoencoderConfig` with ``kind="vq"``.
    """

    kind = "vq"

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__(config)
        self.quantizer = VectorQuantizer(config.resolved_quantizer())

    def encode(self, x: Tensor) -> Tensor:
        """Images (B, in_channels, H, W) in [-1, 1] -> pre-quantization latents z_e (B, D, h, w)."""
        return self.quant_conv(self.encoder(x))

    def quantize(self, z_e: Tensor) -> QuantizerOutput:
        """Quantize z_e (B, D, h, w); in training mode this also updates the codebook statistics."""
        return self.quantizer(z_e)

    @torch.no_grad()
    def encode_to_indices(self, x: Tensor) -> Tensor:
        """Images (B, in_channels, H, W) -> code indices (B, h, w) int64; changes no state."""
        return self.quantizer.lookup(self.encode(x))

    def indices_to_latents(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, w) -> quantized latents (B, D, h, w)."""
        return self.quantizer.embed(indices)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Code indices (B, h, w) -> images (B, in_channels, H, W)."""
        return self.decode(self.indices_to_latents(indices))

    def forward(self, x: Tensor) -> AutoencoderOutput:
        """Reconstruct images (B, in_channels, H, W); see :class:`AutoencoderOutput`."""
        quant = self.quantize(self.encode(x))
        return AutoencoderOutput(recon=self.decode(quant.z_q), quantizer_loss=quant.loss, kl=None, quant=quant,
                                 posterior=None)


class KLAutoencoder(Autoencoder):
    """The KL-regularised variant: the encoder predicts a diagonal Gaussian over the latents.

    Args:
        config: an :class:`AutoencoderConfig` with ``kind="kl"``.
    """

    kind = "kl"

    def encode(self, x: Tensor) -> GaussianPosterior:
        """Images (B, in_channels, H, W) -> the posterior over latents (B, D, h, w), in fp32."""
        moments = self.quant_conv(self.encoder(x)).float()
        mean, logvar = moments.chunk(2, dim=1)
        return GaussianPosterior(mean, logvar.clamp(self.config.logvar_min, self.config.logvar_max))

    def forward(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> AutoencoderOutput:
        """Reconstruct images from a posterior sample (``sample=True``) or its mode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return AutoencoderOutput(recon=self.decode(z), quantizer_loss=None, kl=posterior.kl().mean(), quant=None,
                                 posterior=posterior)


_CLASSES: dict[str, type[Autoencoder]] = {"vq": VQGAN, "kl": KLAutoencoder}


def build_autoencoder(config: AutoencoderConfig) -> Autoencoder:
    """A fresh :class:`VQGAN` or :class:`KLAutoencoder`, as ``config.kind`` says."""
    return _CLASSES[config.kind](config)
