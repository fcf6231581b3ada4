"""taming-transformers' stage-1 training recipe, built from its own modules, for time-to-quality benchmarks.

taming's ``VQModel`` is a PyTorch Lightning 1.x module (its ``taming.main`` import fails under Lightning 2),
so the recipe is rebuilt here around the package's own pieces, each used as is:

- the generator: taming's ``Encoder`` / ``Decoder`` / ``VectorQuantizer`` (beta 0.25) and the two 1x1
  quant convs, as ``VQModel.__init__`` wires them, with the architecture of one of our configs;
- the loss: taming's ``VQLPIPSWithDiscriminator`` (L1 + codebook loss + hinge GAN with the adaptive
  weight, its default 3-layer BatchNorm PatchGAN) with ``custom_vqgan.yaml``'s settings, the config
  its README points a user to for training on their own images: disc_start 10000, disc_weight 0.8,
  codebook_weight 1.0, base_learning_rate 4.5e-6;
- the optimizers: ``VQModel.configure_optimizers``: Adam, betas (0.5, 0.9), for the generator and the
  discriminator, at ``main.py``'s learning rate base_learning_rate x batch x accumulate x GPUs;
- the step: Lightning 1.0's loop over two optimizers (the version taming's environment.yaml pins).
  ``training_step`` runs once per optimizer and calls the generator in each, so a batch costs two
  generator forwards; the other optimizer's parameters are frozen meanwhile (``toggle_optimizer``);
  ``global_step`` counts batches; fp32 (Lightning's default precision); no gradient clipping.

One departure, forced: LPIPS. Building ``VQLPIPSWithDiscriminator`` constructs taming's ``LPIPS``,
which downloads VGG16 and its LPIPS heads. As in our emoji config (``loss.perceptual: none``), the
recipe runs with ``perceptual_weight = 0``; taming's loss then never calls the perceptual network,
so it is built with :class:`NoPerceptual` in its place (refused with any other weight).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from autoencoder.model import AutoencoderConfig

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.losses import vqperceptual
    from taming.modules.vqvae.quantize import VectorQuantizer


@dataclass(frozen=True)
class TamingRecipe:
    """taming's training settings (``configs/custom_vqgan.yaml`` and its code defaults).

    Attributes:
        base_learning_rate: ``model.base_learning_rate``; ``main.py`` multiplies it by the batch size,
            the gradient accumulation and the number of GPUs.
        betas: Adam's betas in ``VQModel.configure_optimizers`` (both optimizers).
        beta: the quantizer's commitment factor, hard-coded in ``VQModel.__init__``.
        disc_start, disc_weight, codebook_weight: ``lossconfig.params`` of ``custom_vqgan.yaml``.
        perceptual_weight: 0 here (taming's default 1.0 needs the LPIPS download; see the module docstring).
    """

    base_learning_rate: float = 4.5e-6
    betas: tuple[float, float] = (0.5, 0.9)
    beta: float = 0.25
    disc_start: int = 10000
    disc_weight: float = 0.8
    codebook_weight: float = 1.0
    perceptual_weight: float = 0.0
    accumulate_grad_batches: int = 1
    gpus: int = 1

    def __post_init__(self) -> None:
        if self.perceptual_weight != 0:
            raise ValueError(f"perceptual_weight={self.perceptual_weight}: taming's LPIPS downloads VGG16 weights, "
                             "which this benchmark never does; keep perceptual_weight=0 (as loss.perceptual: none)")

    def learning_rate(self, batch_size: int) -> float:
        """``main.py``'s scaling: accumulate_grad_batches x ngpu x batch_size x base_learning_rate."""
        return self.accumulate_grad_batches * self.gpus * batch_size * self.base_learning_rate

    def record(self, batch_size: int) -> dict[str, Any]:
        """The settings and the resulting learning rate, for a results file."""
        return {**asdict(self), "learning_rate": self.learning_rate(batch_size), "source": "configs/custom_vqgan.yaml",
                "precision": "fp32", "generator_forwards_per_step": 2, "grad_clip": None}


def ddconfig(config: AutoencoderConfig) -> dict[str, Any]:
    """taming's ``ddconfig`` for the architecture of our ``config`` (same widths, blocks, attention, latent)."""
    if config.kind != "vq":
        raise ValueError(f"model.kind={config.kind!r}: taming's VQModel recipe needs a VQ config (kind: vq)")
    if not config.mid_attention:
        raise ValueError("model.mid_attention=false: taming's Encoder and Decoder always have middle attention; "
                         "use a config with mid_attention: true")
    return dict(ch=config.base_channels, out_ch=config.in_channels, ch_mult=tuple(config.channel_mult),
                num_res_blocks=config.num_res_blocks, attn_resolutions=tuple(config.attn_resolutions),
                dropout=config.dropout, in_channels=config.in_channels, resolution=config.resolution,
                z_channels=config.z_channels, double_z=False)


class TamingGenerator(nn.Module):
    """The generator of taming's ``VQModel`` (its attribute names, so its state dict is taming's)."""

    def __init__(self, config: AutoencoderConfig, beta: float = 0.25) -> None:
        super().__init__()
        arch = ddconfig(config)
        self.encoder, self.decoder = Encoder(**arch), Decoder(**arch)
        self.quantize = VectorQuantizer(config.codebook_size, config.code_dim, beta=beta)
        self.quant_conv = nn.Conv2d(config.z_channels, config.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.z_channels, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        quant, codebook_loss, _ = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(quant)), codebook_loss

    @property
    def last_layer(self) -> Tensor:
        """``VQModel.get_last_layer``: where the adaptive weight compares gradients."""
        return self.decoder.conv_out.weight


class NoPerceptual(nn.Module):
    """Stands in for taming's ``LPIPS`` while the loss is built (weight 0: never called). Calling it is an error,
    so a perceptual weight that slipped through cannot train with a made-up zero."""

    def forward(self, *_: Tensor) -> Tensor:
        raise RuntimeError("the LPIPS stand-in was called: this recipe runs with perceptual_weight=0")


def build_loss(recipe: TamingRecipe) -> nn.Module:
    """taming's ``VQLPIPSWithDiscriminator`` with the recipe's settings (and its own defaults otherwise)."""
    with mock.patch.object(vqperceptual, "LPIPS", NoPerceptual), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vqperceptual.VQLPIPSWithDiscriminator(
            disc_start=recipe.disc_start, codebook_weight=recipe.codebook_weight, disc_weight=recipe.disc_weight,
            perceptual_weight=recipe.perceptual_weight, disc_conditional=False, disc_in_channels=3)


class TamingTrainer:
    """One taming training step per call, as Lightning 1.0 runs ``VQModel.training_step`` (module docstring)."""

    def __init__(self, config: AutoencoderConfig, batch_size: int, recipe: TamingRecipe = TamingRecipe(),
                 device: torch.device | str = "cpu") -> None:
        self.recipe, self.global_step = recipe, 0
        self.generator = TamingGenerator(config, recipe.beta).to(device).train()
        self.loss = build_loss(recipe).to(device).train()
        lr = recipe.learning_rate(batch_size)
        self.opt_ae = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=recipe.betas)
        self.opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=recipe.betas)

    def step(self, x: Tensor) -> dict[str, float]:
        """Both optimizer steps on the batch ``x`` (images in [-1, 1]); returns the two losses."""
        disc = self.loss.discriminator
        disc.requires_grad_(False)  # toggle_optimizer(opt_ae)
        recon, codebook_loss = self.generator(x)
        ae_loss, _ = self.loss(codebook_loss, x, recon, 0, self.global_step, last_layer=self.generator.last_layer)
        self._update(self.opt_ae, ae_loss)
        disc.requires_grad_(True)
        self.generator.requires_grad_(False)  # toggle_optimizer(opt_disc); training_step runs the generator again
        recon, codebook_loss = self.generator(x)
        disc_loss, _ = self.loss(codebook_loss, x, recon, 1, self.global_step, last_layer=self.generator.last_layer)
        self._update(self.opt_disc, disc_loss)
        self.generator.requires_grad_(True)
        self.global_step += 1
        return {"ae_loss": ae_loss.item(), "disc_loss": disc_loss.item(),
                "rec": (recon.detach() - x).abs().mean().item()}

    @staticmethod
    def _update(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
