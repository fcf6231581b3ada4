"""PatchGAN discriminator (Isola et al. 2017, pix2pix "N-layer"), without BatchNorm.

Shape vocabulary: B batch, C channels, H W pixels, h w patch-logit grid.

Each output logit judges one receptive-field patch of the input (70x70 pixels for three layers).
The head is a plain convolution: the logits are unbounded, as hinge and non-saturating losses expect
(no sigmoid, cf. the sigmoid-headed D trained with hinge loss in diffusers' VQGAN example).

Normalisation. taming-transformers uses BatchNorm here, which fails under DDP with an in-place
autograd error (its running buffers are re-broadcast between the real and the fake pass) and couples
the statistics of real and fake samples in a batch. We use GroupNorm by default: it keeps no running
state, normalises each sample on its own, and behaves the same for any batch size and world size.
We deliberately offer no spectral norm: its power-iteration vectors are buffers updated in place on
every forward pass, which brings back the buffer-synchronisation problem that motivated dropping
BatchNorm. ``norm="none"`` gives the bare pix2pix stack (with conv biases).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from common.layers import group_norm


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Configuration of :class:`PatchDiscriminator`.

    Attributes:
        in_channels: image channels.
        base_channels: width of the first convolution; doubled per layer, capped at 8x.
        num_layers: stride-2 convolutions; more layers give a larger patch and a coarser logit grid.
        norm: ``"group"`` (GroupNorm, the default) or ``"none"``; BatchNorm is not offered (see module doc).
    """

    in_channels: int = 3
    base_channels: int = 64
    num_layers: int = 3
    norm: Literal["group", "none"] = "group"

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.base_channels < 1 or self.in_channels < 1:
            raise ValueError(f"DiscriminatorConfig needs positive sizes, got {self}")


def _block(in_ch: int, out_ch: int, stride: int, norm: str) -> list[nn.Module]:
    """Conv 4x4 -> (GroupNorm) -> LeakyReLU(0.2); the bias is redundant before a normalisation."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 4, stride=stride, padding=1, bias=norm == "none")]
    if norm == "group":
        layers.append(group_norm(out_ch, eps=1e-5))
    layers.append(nn.LeakyReLU(0.2))
    return layers


class PatchDiscriminator(nn.Module):
    """The pix2pix N-layer PatchGAN: ``(B, C, H, W) -> (B, 1, h, w)`` real/fake logits.

    ``h = H / 2**num_layers - 2``; with three layers 32 px gives a 2x2 grid, 64 px 6x6, 256 px 30x30.
    Inputs need at least ``3 * 2**num_layers`` pixels a side to leave one output position.
    """

    def __init__(self, cfg: DiscriminatorConfig = DiscriminatorConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.base_channels
        # The first layer is never normalised (pix2pix): it sees raw pixels.
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, cfg.num_layers + 1):
            out = cfg.base_channels * min(2**n, 8)
            # The last hidden layer keeps the resolution (stride 1), as in pix2pix.
            layers += _block(width, out, stride=2 if n < cfg.num_layers else 1, norm=cfg.norm)
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, 1, h, w) unbounded logits (positive means real)."""
        return self.layers(x)


def _init_weights(module: nn.Module) -> None:
    """pix2pix initialisation: conv weights N(0, 0.02); norm scales N(1, 0.02), shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
