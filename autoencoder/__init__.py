"""Stage 1: the VQ-GAN autoencoder (and its KL-regularised variant).

Modules:

- ``autoencoder.model_config``: ``AutoencoderConfig`` (architecture, latent width, nested quantizer options).
- ``autoencoder.model``: ``VQGAN``, ``KLAutoencoder`` and their save/load.
- ``autoencoder.networks``: the encoder and decoder.
- ``autoencoder.quantizer``: ``QuantizerConfig`` (the only quantizer defaults) and ``VectorQuantizer``.
- ``autoencoder.codebook_health``: k-means, restart buffers and the quantizer's distributed helpers.
- ``autoencoder.losses``: reconstruction, perceptual, GAN and KL terms.
- ``autoencoder.perceptual``: the LPIPS network, offline.
- ``autoencoder.discriminator``: the PatchGAN discriminator.
- ``autoencoder.convert``: import taming-transformers and diffusers weights.
- ``autoencoder.export``: export as diffusers ``AutoencoderKL`` / ``VQModel``.
- ``autoencoder.evaluate``: reconstruction metrics of a saved autoencoder (entry point).
- ``autoencoder.train_config``: the stage 1 training config.
- ``autoencoder.train``: the stage 1 training script (entry point).
"""
from autoencoder.model import (
    VQGAN,
    Autoencoder,
    AutoencoderConfig,
    AutoencoderOutput,
    GaussianPosterior,
    KLAutoencoder,
    build_autoencoder,
)
from autoencoder.networks import Decoder, Encoder
from autoencoder.quantizer import CLASSIC_QUANTIZER, QuantizerConfig, QuantizerOutput, VectorQuantizer

__all__ = [
    "Autoencoder",
    "AutoencoderConfig",
    "AutoencoderOutput",
    "CLASSIC_QUANTIZER",
    "Decoder",
    "Encoder",
    "GaussianPosterior",
    "KLAutoencoder",
    "QuantizerConfig",
    "QuantizerOutput",
    "VQGAN",
    "VectorQuantizer",
    "build_autoencoder",
]
