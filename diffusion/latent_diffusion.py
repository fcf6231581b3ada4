"""Latent diffusion as one object: frozen autoencoder + U-Net + text encoder (or none) + noise schedule.

Users sample through the pipelines (:mod:`pipelines`), which check the call's options and then run
:meth:`LatentDiffusion.sample_latents` and :meth:`LatentDiffusion.decode`::

    pipe = TextToImage.from_pretrained("runs/shapes32_diffusion")
    images = pipe(["a small red circle at the top left"], seed=0).images

A pipeline directory::

    dir/pipeline.json   {"kind": "text_to_image", "format_version": 1, "diffusion": {DiffusionConfig},
                         "text_encoder": {TextEncoderConfig} | null, "latent_scale": float,
                         "class_names": [str, ...] | null}     (class_names: optional, class-conditional U-Nets)
                        (any other key is refused: the file was written by another version)
    dir/autoencoder/    component directory (config.json + model.safetensors)
    dir/unet/           component directory

Classifier guidance: ``sample_latents`` takes a :class:`diffusion.classifier.NoisyLatentClassifier`
(``classifier=``, ``classifier_labels=``, ``classifier_scale=``) that wraps the (CFG-guided) denoiser.

A class-only U-Net (``context_dim`` 0, ``num_classes`` > 0) is saved without a text encoder
(``"text_encoder": null``); :class:`pipelines.ClassToImage` runs it on class ids or names.

The U-Net works on scaled latents z * latent_scale; :meth:`LatentDiffusion.decode` divides the scale
out (and snaps VQ latents to the codebook) before decoding. :class:`DiffusionConfig`, condition dropout
and the training loss live in :mod:`diffusion.objectives` (re-exported here).

Shapes: B batch, D latent channels, h w latent grid, L tokens, E text width.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from autoencoder.model import Autoencoder
from common.checkpoint import (
    CONFIG_FILE,
    PIPELINE_FILE,
    CheckpointError,
    atomic_write,
    find_pipeline_dir,
    read_pipeline_json,
)
from common.component_check import non_finite_fields
from common.config import ConfigError, from_dict, to_dict
from common.text_encoder import TextEmbedding, TextEncoder, TextEncoderConfig
from diffusion.guidance import classifier_free, classifier_guided, inpainting
from diffusion.latent_cache import decode_latents, encode_latents, pad_tokens
from diffusion.objectives import Denoiser, DiffusionConfig, drop_condition, training_loss  # noqa: F401 (re-exported)
from diffusion.samplers import SIGMA_SPACING_SAMPLERS, Callback, get_sampler
from diffusion.schedules import SigmaSpacing, img2img_timesteps, q_sample, sigma_timesteps, timesteps_for
from diffusion.unet import NULL_CLASS, UNet

if TYPE_CHECKING:  # annotations only; diffusion.classifier does not import this module
    from diffusion.classifier import NoisyLatentClassifier

PIPELINE_KIND = "text_to_image"
FORMAT_VERSION = 1
PIPELINE_KEYS = frozenset({"kind", "format_version", "diffusion", "text_encoder", "latent_scale", "class_names"})
TRAIN_DIFFUSION = ("`accelerate launch diffusion/train_latent.py configs/diffusion/<config>.yaml` "
                   "(it writes <run.out_dir>/pipeline)")
TRAIN_CLASSIFIER = ("`accelerate launch diffusion/train_classifier.py configs/classifier/<config>.yaml` "
                    "(it writes <run.out_dir>/classifier)")


class LatentDiffusion(nn.Module):
    """Autoencoder + U-Net + text encoder + schedule: the pieces the text-to-image pipelines compose.

    Args:
        autoencoder: the frozen stage-1 model (VQ or KL).
        unet: the denoising network, on scaled latents with D = autoencoder code_dim channels.
        text_encoder: the frozen text encoder, or None for a U-Net without cross-attention (class-only).
        config: the diffusion process the U-Net was trained with.
        latent_scale: the factor between autoencoder latents and U-Net latents.
        class_names: for a class-conditional U-Net, the name of each dataset label (index = label),
            saved in ``pipeline.json`` so that pipelines accept names; None when unknown.
    """

    def __init__(self, autoencoder: Autoencoder, unet: UNet, text_encoder: TextEncoder | None,
                 config: DiffusionConfig, latent_scale: float, class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        check_compatible(autoencoder, unet, text_encoder)
        self.autoencoder, self.unet, self.text_encoder = autoencoder.eval(), unet, text_encoder
        self.config, self.latent_scale = config, float(latent_scale)
        self.class_names = check_class_names(class_names, unet.config.num_classes)
        self.schedule = config.make_schedule()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the pipeline directory (components first, ``pipeline.json`` last)."""
        directory = Path(directory)
        self.autoencoder.save_pretrained(directory / "autoencoder")
        self.unet.save_pretrained(directory / "unet")
        meta = {"kind": PIPELINE_KIND, "format_version": FORMAT_VERSION, "diffusion": to_dict(self.config),
                "text_encoder": to_dict(self.text_encoder.config) if self.text_encoder is not None else None,
                "latent_scale": self.latent_scale,
                "class_names": list(self.class_names) if self.class_names is not None else None}
        atomic_write(directory / PIPELINE_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, text_encoder: TextEncoder | None = None) -> LatentDiffusion:
        """Load a pipeline directory on CPU; pass an already loaded ``text_encoder`` to share it."""
        directory = Path(directory)
        config, text_config, latent_scale = read_pipeline_meta(directory)
        autoencoder = Autoencoder.from_pretrained(directory / "autoencoder")  # checked before the slower text encoder
        unet = UNet.from_pretrained(directory / "unet").eval()
        if text_encoder is None and text_config is not None:
            text_encoder = TextEncoder(text_config)
        class_names = read_pipeline_json(directory).get("class_names")
        try:
            return cls(autoencoder, unet, text_encoder, config, latent_scale, class_names)
        except ValueError as error:
            raise CheckpointError(f"{directory / PIPELINE_FILE}: {error}") from None

    # ------------------------------------------------------------------------------------- the pieces
    def encode_prompts(self, prompts: list[str]) -> TextEmbedding:
        """Prompts -> TextEmbedding(states (B, L, E), mask (B, L)) on the U-Net's device."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder (its U-Net has no cross-attention)")
        text = self.text_encoder.encode(list(prompts))
        return TextEmbedding(text.states.to(self.device), text.mask.to(self.device))

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, D, h, w) as the U-Net sees them."""
        return encode_latents(self.autoencoder, images.to(self.device)) * self.latent_scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, D, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        return decode_latents(self.autoencoder, latents.to(self.device).float() / self.latent_scale)

    @property
    def size_multiple(self) -> int:
        """Image heights and widths must be multiples of this: the autoencoder's factor f times the U-Net's."""
        return self.autoencoder.downsample_factor * self.unet.downsample_factor

    def latent_shape(self, batch: int, height: int | None = None,
                     width: int | None = None) -> tuple[int, int, int, int]:
        """(B, D, H / f, W / f) for images ``height`` x ``width`` pixels, each defaulting to the autoencoder's
        training resolution (non-square works: the U-Net is convolutional). The pipelines check the sizes
        first (:meth:`pipelines.latent.LatentPipeline.check_size`)."""
        ae = self.autoencoder.config
        factor = self.autoencoder.downsample_factor
        height, width = (ae.resolution if side is None else side for side in (height, width))
        return batch, ae.code_dim, height // factor, width // factor

    def timesteps(self, steps: int, sampler: str, sigma_spacing: SigmaSpacing = "default") -> Tensor:
        """The sampling timesteps: the model's timestep spacing in the style each sampler was matched to
        diffusers with, or float timesteps at Karras / exponentially spaced noise levels
        (:func:`diffusion.schedules.sigma_timesteps`; only for :data:`SIGMA_SPACING_SAMPLERS`)."""
        if sigma_spacing != "default":
            if sampler not in SIGMA_SPACING_SAMPLERS:
                raise ValueError(f"sigma_spacing={sigma_spacing!r} applies to the samplers "
                                 f"{', '.join(SIGMA_SPACING_SAMPLERS)}, not {sampler!r}: DDPM and DDIM step on the "
                                 "training timestep grid (for DDIM with eta 0 on these noise levels use 'euler')")
            return sigma_timesteps(self.schedule, steps, sigma_spacing)
        style = "dpmsolver" if sampler in ("dpmpp_2m", "unipc") else "ddim"
        return timesteps_for(self.schedule, steps, self.config.spacing, self.config.steps_offset, style=style)

    @torch.no_grad()
    def sample_latents(self, cond: TextEmbedding | None, uncond: TextEmbedding | None,
                       shape: tuple[int, ...], *, steps: int = 20, guidance: float = 1.0, rescale: float = 0.0,
                       sampler: str = "dpmpp_2m", generator: torch.Generator | None = None,
                       init_latents: Tensor | None = None, strength: float = 1.0, mask: Tensor | None = None,
                       known_latents: Tensor | None = None, class_labels: Tensor | None = None,
                       callback: Callback | None = None, classifier: NoisyLatentClassifier | None = None,
                       classifier_labels: Tensor | None = None, classifier_scale: float = 1.0,
                       noise: Tensor | None = None, **sampler_options: Any) -> Tensor:
        """Run a sampler from noise (or from noised ``init_latents``) to scaled latents (B, D, h, w).

        Args:
            cond: the prompts' embeddings (B rows), or None without text.
            uncond: the unconditional / negative embeddings (1 or B rows); None with guidance 1.
            shape: (B, D, h, w).
            steps: sampling steps before img2img truncation.
            guidance: classifier-free guidance scale w (1: conditional only, 0: unconditional only).
            rescale: guidance rescale phi in [0, 1].
            sampler: a name of :data:`diffusion.samplers.SAMPLERS`.
            generator: the only source of randomness (initial noise, img2img noise, stochastic steps).
            init_latents: (B, D, h, w) scaled latents to start from (img2img); ``strength`` 0 returns them.
            strength: fraction of the trajectory re-run from ``init_latents``.
            mask, known_latents: inpainting: where ``mask`` (B or 1, 1, h, w), values in [0, 1], is 1, the
                result equals ``known_latents`` (B, D, h, w); a pair that does not fit ``shape`` is a ValueError
                (:func:`check_inpainting_inputs`).
            class_labels: (B,) dataset labels (not shifted) for a class-conditional U-Net.
            callback: ``callback(i, x_t, x0_hat)`` after each step.
            classifier: a noisy-latent classifier trained on this pipeline's latents and schedule; its
                gradient steers every step towards ``classifier_labels`` (classifier guidance). It is
                moved to the U-Net's device. Works with any ``guidance``, text, classes or neither.
            classifier_labels: (B,) class ids of the classifier's attribute to steer towards.
            classifier_scale: the classifier guidance scale; 0 gives exactly the unguided samples.
            noise: (B, D, h, w) start noise to use instead of a draw from ``generator`` (diffusers' ``latents=``).
            sampler_options: extra sampler options, e.g. ``eta`` for "ddim", ``order`` for "unipc", and
                ``sigma_spacing`` ("default", "karras" or "exponential"; see :meth:`timesteps`).
        """
        timesteps = self.timesteps(steps, sampler, sampler_options.pop("sigma_spacing", "default"))
        device = self.device
        if sampler == "ddim" and not self.config.set_alpha_to_one:  # Stable Diffusion's DDIM ends at t = 0
            sampler_options.setdefault("final_alpha_bar", float(self.schedule.alpha_bar(0)))
        if init_latents is not None:
            if strength == 0:
                return init_latents.to(device).clone()
            timesteps = img2img_timesteps(timesteps, strength)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=generator.device if generator else device)
        x = noise.to(device, torch.float32)
        if init_latents is not None:  # SDEdit: noise the input to the first kept timestep
            # .item(): an int for the model's timesteps, a float for sigma spacings (int() would truncate it)
            start = torch.full((shape[0],), timesteps[0].item(), device=device)
            x = q_sample(self.schedule, init_latents.to(device).float(), start, x)
        denoiser = self._guided_denoiser(cond, uncond, guidance, rescale, class_labels)
        if classifier is not None:  # inside inpainting, which must see the final x0 estimate
            denoiser = self._classifier_guided(denoiser, classifier, classifier_labels, classifier_scale, shape[0])
        if mask is not None:
            check_inpainting_inputs(mask, known_latents, shape)
            denoiser = inpainting(denoiser, known_latents.to(device), mask.to(device))
        elif known_latents is not None:
            raise ValueError("known_latents were given without mask; inpainting needs both (mask (B or 1, 1, h, w), "
                             "1 = keep known_latents)")
        return get_sampler(sampler)(denoiser, x, self.schedule, timesteps, generator=generator,
                                    callback=callback, **sampler_options)

    def _guided_denoiser(self, cond: TextEmbedding | None, uncond: TextEmbedding | None, guidance: float,
                         rescale: float, class_labels: Tensor | None):
        denoiser = Denoiser(self.unet, self.schedule, self.config.prediction)
        cond_kwargs: dict[str, Any] = {}
        uncond_kwargs: dict[str, Any] = {}
        if cond is not None:
            if uncond is None:
                uncond = cond  # only used with guidance 1, where it is never evaluated
            length = max(cond.states.shape[1], uncond.states.shape[1])  # [cond; uncond] share one length
            cond, uncond = pad_tokens(cond, length), pad_tokens(uncond, length)
            cond_kwargs.update(context=cond.states.to(self.device), context_mask=cond.mask.to(self.device))
            uncond_kwargs.update(context=uncond.states.to(self.device), context_mask=uncond.mask.to(self.device))
        if class_labels is not None:
            labels = class_labels.to(self.device).long() + 1  # the U-Net's id 0 is the null class
            cond_kwargs["class_labels"] = labels
            uncond_kwargs["class_labels"] = torch.full_like(labels, NULL_CLASS)
        if not cond_kwargs or guidance == 1.0:
            return lambda x, t: denoiser(x, t, **cond_kwargs)
        return classifier_free(denoiser, cond_kwargs, uncond_kwargs, guidance, rescale)

    def check_classifier(self, classifier: NoisyLatentClassifier) -> None:
        """Refuse a classifier trained on other latents or another noise schedule (ValueError saying which)."""
        classifier.check_compatible(self.autoencoder.config.code_dim, self.latent_scale, self.schedule)

    def _classifier_guided(self, denoiser, classifier: NoisyLatentClassifier, labels: Tensor | None,
                           scale: float, batch: int):
        """Wrap ``denoiser`` with the gradient of log p(labels | x_t) (see :func:`classifier_guided`); the
        pipelines checked ``labels`` (B,) against the classifier's classes."""
        if labels is None or labels.shape != (batch,):  # a precondition on the tensors, not a user check
            got = None if labels is None else tuple(labels.shape)
            raise ValueError(f"classifier guidance needs classifier_labels of shape ({batch},), got {got}")
        self.check_classifier(classifier)
        classifier.to(self.device)
        labels = labels.to(self.device).long()
        return classifier_guided(denoiser, lambda x, t: classifier.log_prob(x, t, labels), scale, self.schedule)


def check_inpainting_inputs(mask: Tensor, known_latents: Tensor | None, shape: tuple[int, ...]) -> None:
    """Refuse an inpainting ``mask`` / ``known_latents`` pair that does not fit latents of ``shape`` (B, D, h, w).

    Raises:
        ValueError: no known_latents; known_latents not of ``shape``; a mask that is not (B or 1, 1, h, w),
            or whose values are not finite numbers in [0, 1].
    """
    batch, _, height, width = shape
    if known_latents is None:
        raise ValueError("inpainting needs known_latents together with mask")
    if tuple(known_latents.shape) != tuple(shape):
        raise ValueError(f"known_latents has shape {tuple(known_latents.shape)} but the latents being sampled are "
                         f"{tuple(shape)}; give known_latents of exactly that shape (encode_images of the images)")
    if mask.ndim != 4 or mask.shape[0] not in (1, batch) or tuple(mask.shape[1:]) != (1, height, width):
        rows = f"{batch} or 1" if batch > 1 else "1"
        raise ValueError(f"mask has shape {tuple(mask.shape)} but must be ({rows}, 1, {height}, {width}): one "
                         f"channel on the latent grid (the image size divided by the autoencoder's "
                         f"downsampling factor)")
    if not bool(torch.isfinite(mask).all()):
        raise ValueError("mask holds NaN/inf values; masks must be finite numbers in [0, 1] (1 = keep known_latents, "
                         "0 = generate)")
    low, high = float(mask.min()), float(mask.max())
    if low < 0 or high > 1:
        hint = " (it looks like a 0..255 image: divide it by 255)" if high > 1 and high <= 255 else ""
        raise ValueError(f"mask values must lie in [0, 1] (1 = keep known_latents, 0 = generate), got values in "
                         f"[{low:g}, {high:g}]{hint}")


def find_classifier_dir(path: str | Path) -> Path:
    """``path`` if it is a component directory (a noisy-latent classifier's), else the ``classifier/`` of the
    classifier training run directory ``path``; a CheckpointError says what is missing and how to train one
    (see :func:`common.checkpoint.find_pipeline_dir`)."""
    return find_pipeline_dir(path, TRAIN_CLASSIFIER, part="classifier", marker=CONFIG_FILE)


def check_class_names(class_names: Sequence[str] | None, num_classes: int) -> tuple[str, ...] | None:
    """``class_names`` as a tuple of ``num_classes`` distinct strings (None stays None)."""
    if class_names is None:
        return None
    if isinstance(class_names, str) or not all(isinstance(name, str) for name in class_names):
        raise ValueError(f"class_names must be a list of strings, got {class_names!r}")
    names = tuple(class_names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class_names for a U-Net with num_classes={num_classes}"
                         + (" (no class conditioning: leave class_names out)" if num_classes == 0 else ""))
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"class_names must be distinct, {repeated} repeat")
    return names


MAX_TRAIN_STEPS = 100_000  # T: the schedule's tensors are built on load; published schedules use T = 1000


def read_pipeline_meta(directory: str | Path) -> tuple[DiffusionConfig, TextEncoderConfig | None, float]:
    """The diffusion config, text encoder config (None without text) and latent scale of a pipeline directory.

    Every value is checked before any weights are read: a malformed file, an unknown key, a non-finite
    number, a schedule that is not a valid noise schedule or a latent scale that is not a finite number
    > 0 raise :class:`CheckpointError` naming the file and the key (a latent scale of 0 or NaN would
    otherwise decode wrong images without a word).
    """
    path = Path(directory) / PIPELINE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a pipeline directory: {PIPELINE_FILE} is missing "
                              f"(training writes one to <run_dir>/pipeline)")
    meta = read_pipeline_json(directory)
    if meta.get("kind") != PIPELINE_KIND or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} holds kind {meta.get('kind')!r} format {meta.get('format_version')}; "
                              f"expected {PIPELINE_KIND!r} format {FORMAT_VERSION}")
    # strict like every other file we load: a key we do not know would otherwise be silently ignored
    unknown = sorted(set(meta) - PIPELINE_KEYS)
    if unknown:
        raise CheckpointError(f"{path} has unknown keys {unknown} (valid keys: {', '.join(sorted(PIPELINE_KEYS))}); "
                              f"was it written by a newer version?")
    missing = sorted({"diffusion", "latent_scale"} - set(meta))
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; save the pipeline again (save_pretrained)")
    try:
        config = from_dict(DiffusionConfig, meta["diffusion"], "diffusion.")
        text = meta.get("text_encoder")
        text_config = from_dict(TextEncoderConfig, text, "text_encoder.") if text is not None else None
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}; save the pipeline again, or restore the file") from None
    return check_schedule(config, path), text_config, check_latent_scale(meta["latent_scale"], path)


def check_latent_scale(value: Any, path: Path) -> float:
    """``latent_scale`` of ``pipeline.json`` as a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{path}: latent_scale={value!r} must be a finite number > 0 (the factor that brings "
                              "the autoencoder's latents to unit variance, 1 / their std); restore the value the "
                              "training run recorded, or measure it again with diffusion.latent_cache")
    return float(value)


def check_schedule(config: DiffusionConfig, path: Path) -> DiffusionConfig:
    """Refuse non-finite values, an unbounded T and betas that make no noise schedule (NaN or negative alphas)."""
    bad = non_finite_fields(config, "diffusion.")
    if bad:
        raise CheckpointError(f"{path}: {', '.join(bad)} must be finite; restore the values the training run used")
    if not 1 <= config.num_steps <= MAX_TRAIN_STEPS:
        raise CheckpointError(f"{path}: diffusion.num_steps={config.num_steps} must be in [1, {MAX_TRAIN_STEPS}] "
                              "(the number of training timesteps; 1000 in every shipped config)")
    if config.schedule != "cosine" and not 0 < config.beta_start <= config.beta_end < 1:
        raise CheckpointError(f"{path}: diffusion.beta_start={config.beta_start} and beta_end={config.beta_end} must "
                              "satisfy 0 < beta_start <= beta_end < 1; restore the values the training run used")
    try:
        alphas = config.make_schedule().alphas_cumprod
    except ValueError as error:
        raise CheckpointError(f"{path}: diffusion: {error}") from None
    if not bool(torch.isfinite(alphas).all()) or float(alphas.min()) < 0 or float(alphas.max()) > 1:
        raise CheckpointError(f"{path}: diffusion ({config.schedule}, T={config.num_steps}) gives cumulative alphas "
                              "outside [0, 1]; restore the values the training run used")
    return config


def check_compatible(autoencoder: Autoencoder, unet: UNet, text_encoder: TextEncoder | None) -> None:
    """Fail with a clear message when the components do not fit together."""
    code_dim, config = autoencoder.config.code_dim, unet.config
    if (config.in_channels, config.out_channels) != (code_dim, code_dim):
        raise ValueError(f"the U-Net maps {config.in_channels} -> {config.out_channels} channels but the "
                         f"autoencoder's latents have code_dim={code_dim} channels")
    width = text_encoder.width if text_encoder is not None else 0
    if config.context_dim != width:
        raise ValueError(f"the U-Net's context_dim={config.context_dim} does not match the text encoder width "
                         f"{width}" + (" (no text encoder)" if text_encoder is None else ""))
