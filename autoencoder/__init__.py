"""Stage 1: the VQ-GAN autoencoder (and its KL-regularised variant)."""
from autoencoder.model import (
    Autoencoder,
    AutoencoderConfig,
    AutoencoderOutput,
    GaussianPosterior,
    KLAutoencoder,
    VQGAN,
    build_autoencoder,
)
from autoencoder.networks import Decoder, Encoder
from autoencoder.quantizer import QuantizerConfig, QuantizerOutput, VectorQuantizer

__all__ = [
    "Autoencoder",
    "AutoencoderConfig",
    "AutoencoderOutput",
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
