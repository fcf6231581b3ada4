"""Tiny random models and configs that several test modules share; factories only.

Everything is built from fixed seeds (in a temporary directory where files are needed): a 16 px, f=2 VQ
autoencoder, a one-layer 32-wide BERT with the bundled MiniLM's tokenizer, a small U-Net, a noisy-latent
colour classifier, saved pipelines of each kind, and small training configs. The fixtures built from these
live in ``conftest.py``; test modules import from here and never from one another.
"""
from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate.state import AcceleratorState

from autoencoder.model import Autoencoder, AutoencoderConfig, build_autoencoder
from autoencoder.quantizer import QuantizerConfig
from common.data import DataConfig
from common.data.shapes import COLOURS
from common.text_encoder import TextEncoder, TextEncoderConfig, bundled_model_dir
from diffusion.classifier import ClassifierConfig, NoisyLatentClassifier
from diffusion.latent_diffusion import LatentDiffusion
from diffusion.objectives import DiffusionConfig
from diffusion.schedules import ScheduleConfig
from diffusion.unet import UNet, UNetConfig
from prior.sampling import SamplingConfig
from prior.token_prior import TokenPrior
from prior.transformer import GPT, PriorConfig

TINY_DATA = DataConfig(name="shapes", resolution=16, size=48)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# The stage-1 training YAML of the autoencoder tests: the autoencoder of make_tiny_autoencoder, 64 images.
TINY_AUTOENCODER = {
    "model": {"resolution": 16, "base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
              "attn_resolutions": [], "z_channels": 16, "code_dim": 4,
              "quantizer": {"codebook_size": 32, "dead_code_threshold": 2, "usage_window": 4}},
    "disc": {"base_channels": 8, "num_layers": 2},
    "loss": {"perceptual": "none", "disc_start": 2, "gan_start": 3, "gan_ramp": 0, "disc_weight": 0.5},
    "optim": {"lr": 1e-3, "warmup_steps": 2, "decay_steps": 8},
    "data": {"name": "shapes", "resolution": 16, "size": 64},
    "run": {"batch_size": 4, "precision": "no", "log_every": 1, "sample_every": 4, "save_every": 3,
            "progress": False, "ema_decay": 0.9},
}
# The saved class-conditional pipeline's class names, in order (build_pipelines).
CLASS_NAMES = ("circle", "square", "triangle")
# The tiny classifier's backbone: same latents as the tiny pipeline, no text.
CLASSIFIER_BACKBONE = UNetConfig(in_channels=4, out_channels=4, block_channels=(16, 32), layers_per_block=1,
                                 attention_levels=(False, True), mid_attention=True, head_dim=8, context_dim=0)


def make_tiny_autoencoder(directory: Path, kind: str = "vq") -> Path:
    """A random 16 px, f=2, 4-channel autoencoder saved as a component directory."""
    torch.manual_seed(0)
    config = AutoencoderConfig(resolution=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               attn_resolutions=(), z_channels=16, code_dim=4, kind=kind,
                               quantizer=QuantizerConfig(codebook_size=32))
    build_autoencoder(config).save_pretrained(directory)
    return directory


def make_tiny_text_encoder(directory: Path) -> Path:
    """A random one-layer, 32-wide BERT with the bundled MiniLM's tokenizer, saved for ``name_or_path``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(bundled_model_dir() / name, directory / name)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    return directory


def tiny_unet_config(code_dim: int = 4, context_dim: int = 32) -> UNetConfig:
    return UNetConfig(in_channels=code_dim, out_channels=code_dim, block_channels=(16, 32),
                      attention_levels=(False, True), layers_per_block=1, head_dim=8, context_dim=context_dim)


ModelT = TypeVar("ModelT", bound=torch.nn.Module)


def perturbed(model: ModelT, seed: int, scale: float = 0.05) -> ModelT:
    """A fresh U-Net's zero-initialised output layer predicts 0 whatever its inputs (and a fresh prior's
    N(0, 0.02) weights give near-uniform logits); shake every weight by ``scale`` N(0, 1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return model.eval()


def make_tiny_pipeline(root: Path, seed: int = 0) -> LatentDiffusion:
    """A LatentDiffusion of tiny random parts; the U-Net is perturbed so that it depends on its inputs
    (a fresh U-Net's zero-initialised output layer would predict 0 whatever the prompt)."""
    autoencoder = Autoencoder.from_pretrained(make_tiny_autoencoder(root / "ae"))
    text_encoder = TextEncoder(TextEncoderConfig(name_or_path=str(make_tiny_text_encoder(root / "text"))))
    torch.manual_seed(seed)  # before the U-Net is built: its initial weights come from this seed too
    unet = UNet(tiny_unet_config()).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return LatentDiffusion(autoencoder, unet, text_encoder, DiffusionConfig(num_steps=100), latent_scale=2.5)


def tiny_classifier(seed: int = 0, **overrides) -> NoisyLatentClassifier:
    """A random colour classifier with every weight perturbed and a sharpened head, so that its
    log-probabilities depend clearly on x and t (a fresh one is almost uniform whatever the input)."""
    options = dict(backbone=CLASSIFIER_BACKBONE, attribute="colour", class_names=tuple(COLOURS),
                   schedule=ScheduleConfig(num_steps=100), latent_scale=2.5)
    torch.manual_seed(seed)
    model = NoisyLatentClassifier(ClassifierConfig(**{**options, **overrides})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        model.head.weight.mul_(30.0)
    return model


def build_pipelines(root: Path) -> dict[str, Path]:
    """Save tiny random pipelines under ``root``; returns their training-run-like directories.

    A text-conditioned diffusion run, a class-conditional one (no text encoder, ``CLASS_NAMES``), a text
    token prior run, all 16 px over one f=2 VQ autoencoder and a one-layer 32-wide BERT, and a tiny random
    colour classifier run for classifier guidance.
    """
    autoencoder = Autoencoder.from_pretrained(make_tiny_autoencoder(root / "ae"))
    text_config = TextEncoderConfig(name_or_path=str(make_tiny_text_encoder(root / "text")))
    config = DiffusionConfig(num_steps=100)
    text_unet = perturbed(UNet(tiny_unet_config()), 0)
    LatentDiffusion(autoencoder, text_unet, TextEncoder(text_config), config, 2.5).save_pretrained(
        root / "text_run" / "pipeline")
    # 64 channels: GroupNorm then has 2 channels per group; with one, it cancels the class embedding's shift
    class_config = dataclasses.replace(tiny_unet_config(context_dim=0), num_classes=3, block_channels=(64, 64))
    class_unet = perturbed(UNet(class_config), 1)
    LatentDiffusion(autoencoder, class_unet, None, config, 2.5, class_names=CLASS_NAMES).save_pretrained(
        root / "class_run" / "pipeline")
    torch.manual_seed(2)
    prior = GPT(PriorConfig(codebook_size=32, grid_size=8, condition="text", text_dim=32, text_tokens=12, width=32,
                            depth=2, heads=4)).eval()
    with torch.no_grad():  # GPT-2's N(0, 0.02) init gives near-uniform logits that ignore the condition
        for parameter in prior.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    TokenPrior(autoencoder, prior, text_config, sampling=SamplingConfig(guidance=2.0)).save_pretrained(
        root / "prior_run" / "pipeline")
    tiny_classifier().save_pretrained(root / "classifier_run" / "classifier")  # same latents and schedule
    return {"text": root / "text_run", "class": root / "class_run", "prior": root / "prior_run",
            "classifier": root / "classifier_run"}



def load_pipelines(dirs: dict[str, Path]) -> dict:
    """The pipelines of :func:`build_pipelines`' directories: text, class, image-to-image, inpainting, tokens."""
    from pipelines import ClassToImage, ImageToImage, Inpaint, TextToImage, TokensToImage

    text = TextToImage.from_pretrained(dirs["text"])
    return {"text": text, "class": ClassToImage.from_pretrained(dirs["class"]), "img2img": ImageToImage.from_pipe(text),
            "inpaint": Inpaint.from_pipe(text), "tokens": TokensToImage.from_pretrained(dirs["prior"])}

def tiny_prior_config(autoencoder_dir: Path, cache_dir: Path, condition: str = "class") -> dict:
    """The prior training YAML of the prior tests, over a saved tiny autoencoder."""
    return {
        "model": {"condition": condition, "text_tokens": 12, "width": 32, "depth": 2, "heads": 4},
        "tokens": {"autoencoder": str(autoencoder_dir), "cache_dir": str(cache_dir), "batch_size": 32},
        "loss": {"pkeep": 0.8, "cond_drop": 0.25},
        "sample": {"guidance": 2.0, "guidance_tokens": 10, "top_k": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "decay_steps": 8},
        "data": {"name": "shapes", "resolution": 16, "size": 48},
        "run": {"batch_size": 8, "precision": "no", "log_every": 1, "sample_every": 4, "save_every": 3,
                "progress": False, "ema_decay": 0.9, "cpu_threads": 1},
    }


def train_in_process(main: Callable[[list[str]], Any], *argv: str | Path) -> None:
    """Run a training script's ``main(argv)`` in this process (a fresh interpreter per run costs seconds)."""
    try:
        main([str(arg) for arg in argv])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no accelerate singleton behind


class SteppingClock:
    """A ``time`` stand-in whose clock advances ``tick`` seconds per reading (``time()`` or ``perf_counter()``):
    a run with a time budget then ends after the same steps and snapshots on every machine, however slow its
    loading or first step (a slow first step once left a single snapshot in CI)."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def time(self) -> float:
        self.now += self.tick
        return self.now

    perf_counter = time
