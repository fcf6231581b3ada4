"""LPIPS perceptual distance (Zhang et al. 2018) through the ``lpips`` package, offline by design.

The ``lpips`` package ships its small linear heads, but the VGG16 backbone weights normally come
from torchvision's one-time download, which fails offline and which users confuse with the heads file.
Here nothing is ever downloaded: LPIPS is built with a random backbone (``pnet_rand=True``) and the
ImageNet weights are loaded from a local file that :func:`resolve_vgg16_weights` finds, or a
:class:`PerceptualWeightsError` explains how to provide it.

Shape vocabulary: B batch, H W pixels.
"""
from __future__ import annotations

import bisect
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

PerceptualKind = Literal["lpips", "lpips_random", "none"]

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
WEIGHTS_ENV = "LATENTGEN_VGG16_WEIGHTS"
CONFIG_KEY = "loss.perceptual_weights_path"
# lpips.pretrained_networks.vgg16 cuts torchvision's vgg16().features into slice1..slice5 at these
# indices and keeps each layer's original index as its name: features.5.weight -> slice2.5.weight.
_SLICE_STARTS = (0, 4, 9, 16, 23, 30)


class PerceptualWeightsError(RuntimeError):
    """The VGG16 backbone weights LPIPS needs are missing, corrupt, or not a torchvision VGG16."""


def hub_cache_path() -> Path:
    """Where torchvision caches the VGG16 weights: ``torch.hub.get_dir()/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def _how_to_provide(problem: str) -> str:
    return (
        f"{problem}\nLPIPS needs torchvision's ImageNet VGG16 weights, the file {VGG16_FILENAME} "
        f"(528 MB), and latentgen never downloads it. Provide it in one of these ways:\n"
        f"  1. put {VGG16_FILENAME} into torchvision's cache: {hub_cache_path()} (on a machine with "
        f"internet, `python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` "
        f"puts it there; or fetch {VGG16_URL});\n"
        f"  2. set the environment variable {WEIGHTS_ENV}=/path/to/{VGG16_FILENAME};\n"
        f"  3. set the config key {CONFIG_KEY}=/path/to/{VGG16_FILENAME} (a file, or a folder holding it).\n"
        f"Or train without the perceptual loss with loss.perceptual=none (blurrier reconstructions)."
    )


def _existing(path: str | Path, source: str) -> Path:
    """The weights file at ``path`` (or inside it, if a folder); an explicit path must exist."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / VGG16_FILENAME
    if not path.is_file():
        raise PerceptualWeightsError(_how_to_provide(f"{source} points to {path}, which does not exist."))
    return path


def resolve_vgg16_weights(weights_path: str | Path | None = None) -> Path:
    """Find the VGG16 weights: the configured path, then ``$LATENTGEN_VGG16_WEIGHTS``, then the hub cache.

    An explicitly configured path or environment variable that points nowhere is an error rather
    than a silent fall-through, so a typo never trains with other weights than intended.

    Raises:
        PerceptualWeightsError: nothing found; the message says how to provide the file.
    """
    if weights_path:
        return _existing(weights_path, f"the config key {CONFIG_KEY}")
    if os.environ.get(WEIGHTS_ENV):
        return _existing(os.environ[WEIGHTS_ENV], f"the environment variable {WEIGHTS_ENV}")
    cached = hub_cache_path()
    if cached.is_file():
        return cached
    raise PerceptualWeightsError(_how_to_provide(
        f"No VGG16 weights found: {CONFIG_KEY} is unset, {WEIGHTS_ENV} is unset, and {cached} does not exist."))


def _verify_checksum(path: Path) -> None:
    """torchvision names its file after its SHA-256 prefix; a mismatch means a partial or wrong file."""
    if path.name != VGG16_FILENAME:
        return
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    expected = VGG16_FILENAME.split("-")[1].split(".")[0]
    if not digest.hexdigest().startswith(expected):
        raise PerceptualWeightsError(_how_to_provide(
            f"{path} has SHA-256 {digest.hexdigest()[:8]}..., not {expected}...: the file is corrupt or incomplete."))


def vgg16_features_to_lpips(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename torchvision VGG16 keys to ``lpips.pretrained_networks.vgg16``'s (``slice{k}.{i}.*``).

    Accepts the full ``vgg16().state_dict()`` (``features.*``; the ``classifier.*`` head, unused by
    LPIPS, is dropped) or ``vgg16().features.state_dict()`` (keys ``{i}.weight``).
    """
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        key = key.removeprefix("features.")
        index = key.split(".")[0]
        if not index.isdigit():
            raise PerceptualWeightsError(f"unexpected key {key!r}: not a torchvision VGG16 state dict")
        mapped[f"slice{bisect.bisect_right(_SLICE_STARTS, int(index))}.{key}"] = value
    return mapped


def _load_heads(model: nn.Module, package_dir: Path) -> None:
    """Load the linear heads shipped in the lpips package into ``lin0..lin4``, strictly.

    ``lpips.LPIPS`` loads them with ``strict=False`` and no check; a missing head would go unnoticed.
    """
    heads = torch.load(package_dir / "weights" / "v0.1" / "vgg.pth", map_location="cpu", weights_only=True)
    for i in range(5):
        prefix = f"lin{i}."
        part = {k.removeprefix(prefix): v for k, v in heads.items() if k.startswith(prefix)}
        getattr(model, f"lin{i}").load_state_dict(part, strict=True)
    extra = [k for k in heads if not k.startswith(tuple(f"lin{i}." for i in range(5)))]
    if extra:
        raise PerceptualWeightsError(f"unexpected keys in the lpips heads file: {extra}")


class LPIPSLoss(nn.Module):
    """Frozen LPIPS-VGG distance, computed in fp32 even under autocast.

    Args:
        backbone_path: torchvision VGG16 weights to load; ``None`` keeps the random backbone (tests only).
    """

    def __init__(self, backbone_path: Path | None) -> None:
        super().__init__()
        import lpips  # Lazy: it pulls in scipy (~1.5 s), and only training needs it.

        with warnings.catch_warnings():
            # lpips calls torchvision's deprecated vgg16(pretrained=False); the warning is noise.
            warnings.filterwarnings("ignore", message=r".*deprecated since 0\.13.*")
            self.lpips = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        _load_heads(self.lpips, Path(lpips.__file__).parent)
        if backbone_path is not None:
            self._load_backbone(backbone_path)
        self.requires_grad_(False)
        self.eval()

    def _load_backbone(self, path: Path) -> None:
        _verify_checksum(path)
        state = vgg16_features_to_lpips(torch.load(path, map_location="cpu", weights_only=True))
        try:
            self.lpips.net.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise PerceptualWeightsError(f"{path} is not a torchvision VGG16 state dict: {error}") from error
        logger.info("LPIPS: VGG16 backbone loaded from %s", path)

    def train(self, mode: bool = True) -> LPIPSLoss:
        """Stay in eval mode: the heads carry dropout that must never be active."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, 3, H, W), (B, 3, H, W) images in [-1, 1] -> (B,) distances; gradients reach the inputs."""
        # fp32: bf16 features lose the small squared differences that make up near-zero distances.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.lpips(x.float(), y.float()).reshape(x.shape[0])


def build_perceptual(kind: PerceptualKind, weights_path: str | Path | None = None) -> LPIPSLoss | None:
    """Build the perceptual loss module for ``kind``; warns loudly for anything but real LPIPS.

    Args:
        kind: ``"lpips"`` (ImageNet VGG16 backbone), ``"lpips_random"`` (random backbone, for tests),
            or ``"none"`` (no perceptual loss: returns ``None``).
        weights_path: the VGG16 weights file or folder (config key ``loss.perceptual_weights_path``).

    Raises:
        PerceptualWeightsError: ``kind="lpips"`` and the weights cannot be found or loaded.
    """
    if kind == "none":
        logger.warning("perceptual=none: training WITHOUT the LPIPS perceptual loss; "
                       "expect blurrier reconstructions.")
        return None
    if kind == "lpips_random":
        logger.warning("perceptual=lpips_random: LPIPS with a RANDOMLY INITIALISED VGG16 backbone. "
                       "This is for tests only and is not a perceptual loss.")
        return LPIPSLoss(None)
    if kind == "lpips":
        return LPIPSLoss(resolve_vgg16_weights(weights_path))
    raise ValueError(f"unknown perceptual loss {kind!r}; expected 'lpips', 'lpips_random' or 'none'")
