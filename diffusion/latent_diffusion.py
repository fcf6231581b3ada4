"""Latent diffusion as one object: frozen autoencoder + U-Net + text encoder (or none) + noise schedule.

    pipe = LatentDiffusion.from_pretrained("runs/shapes32_diffusion/pipeline")
    images = pipe.generate(["a small red circle at the top left"], guidance=4.0,
                           generator=torch.Generator().manual_seed(0))   # (1, 3, 32, 32) in [-1, 1]

A pipeline directory::

    dir/pipeline.json   {"kind": "text_to_image", "format_version": 1, "diffusion": {DiffusionConfig},
                         "text_encoder": {TextEncoderConfig} | null, "latent_scale": float,
                         "class_names": [str, ...] | null}     (class_names: optional, class-conditional U-Nets)
                        (any other key is refused: the file was written by another version)
    dir/autoencoder/    component directory (config.json + model.safetensors)
    dir/unet/           component directory

Classifier guidance: ``sample_latents``/``generate`` take a :class:`diffusion.classifier.NoisyLatentClassifier`
(``classifier=``, ``classifier_labels=``, ``classifier_scale=``) that wraps the (CFG-guided) denoiser.

A class-only U-Net (``context_dim`` 0, ``num_classes`` > 0) is saved without a text encoder
(``"text_encoder": null``); its prompts are the names of its classes.

The U-Net works on scaled latents z * latent_scale; :meth:`LatentDiffusion.decode` divides the scale
out (and snaps VQ latents to the codebook) before decoding. This module also holds what training
shares with the benchmarks: :class:`DiffusionConfig`, condition dropout and the training loss.

Shapes: B batch, D latent channels, h w latent grid, L tokens, E text width.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from autoencoder.model import Autoencoder
from common.checkpoint import CONFIG_FILE, PIPELINE_FILE, CheckpointError, atomic_write, find_pipeline_dir
from common.config import from_dict, to_dict
from diffusion.guidance import classifier_free, classifier_guided, inpainting
from diffusion.latent_cache import decode_latents, encode_latents, pad_tokens
from diffusion.objectives import Denoiser, Prediction, Weighting, diffusion_loss, loss_weight, training_target
from diffusion.samplers import Callback, get_sampler
from diffusion.schedules import (
    NoiseSchedule, ScheduleKind, Spacing, img2img_timesteps, make_schedule, q_sample, timesteps_for,
)
from common.text_encoder import TextEmbedding, TextEncoder, TextEncoderConfig
from diffusion.unet import NULL_CLASS, UNet

if TYPE_CHECKING:  # diffusion.classifier imports this module (for DiffusionConfig)
    from diffusion.classifier import NoisyLatentClassifier

PIPELINE_KIND = "text_to_image"
FORMAT_VERSION = 1
PIPELINE_KEYS = frozenset({"kind", "format_version", "diffusion", "text_encoder", "latent_scale", "class_names"})
TRAIN_DIFFUSION = ("`accelerate launch diffusion/train_latent.py configs/diffusion/<config>.yaml` "
                   "(it writes <run.out_dir>/pipeline)")
TRAIN_CLASSIFIER = ("`accelerate launch diffusion/train_classifier.py configs/classifier/<config>.yaml` "
                    "(it writes <run.out_dir>/classifier)")


@dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion process and its training objective.

    Attributes:
        schedule: beta ramp, see :func:`diffusion.schedules.make_schedule`.
        num_steps: T, the number of training timesteps.
        beta_start, beta_end: ends of the linear ramps (ignored by "cosine").
        zero_terminal_snr: rescale the schedule to zero SNR at T-1 (pair with "v" or "x0" prediction).
        prediction: what the U-Net predicts: "epsilon", "x0" or "v".
        weighting: "none" or "min_snr" (Min-SNR-gamma loss weights, Hang et al. 2023).
        snr_gamma: gamma of min_snr.
        cond_drop_prob: probability p that training replaces a condition by its null (the "" caption, the
            null class), which is what makes classifier-free guidance work. Caption and class are dropped
            independently (``diffusion.train_latent.drop_conditions``), so a class + text U-Net sees every
            pair the pipelines guide with: (class, "") and (null, prompt) each with probability p (1 - p),
            against (null, "") with p^2.
        spacing: how sampling picks its timesteps ("trailing" starts at T-1).
    """

    schedule: ScheduleKind = "scaled_linear"
    num_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False
    prediction: Prediction = "epsilon"
    weighting: Weighting = "min_snr"
    snr_gamma: float = 5.0
    cond_drop_prob: float = 0.1
    spacing: Spacing = "trailing"

    def __post_init__(self) -> None:
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.zero_terminal_snr and self.prediction == "epsilon":
            raise ValueError("zero_terminal_snr needs prediction 'v' or 'x0': an epsilon network cannot "
                             "recover x0 from pure noise at the last timestep")

    def make_schedule(self) -> NoiseSchedule:
        """The noise schedule this config describes."""
        return make_schedule(self.schedule, self.num_steps, self.beta_start, self.beta_end, self.zero_terminal_snr)


def drop_condition(ids: Tensor, prob: float, null_id: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each of ``ids`` (B,) by ``null_id`` with probability ``prob`` (condition dropout)."""
    if prob <= 0:
        return ids
    drop = torch.rand(ids.shape, generator=generator, device=ids.device if generator is None else generator.device)
    return torch.where(drop.to(ids.device) < prob, torch.full_like(ids, null_id), ids)


def training_loss(unet: nn.Module, schedule: NoiseSchedule, config: DiffusionConfig, latents: Tensor,
                  text: TextEmbedding | None = None, class_labels: Tensor | None = None) -> Tensor:
    """The weighted denoising loss (B,) of clean scaled latents (B, D, h, w), t ~ U{0, ..., T-1}.

    Draws t and the noise from the global RNG (what accelerate checkpoints, so resume is exact).
    ``class_labels`` are already shifted (label + 1, or NULL_CLASS) as the U-Net takes them.
    """
    batch = latents.shape[0]
    t = torch.randint(0, schedule.num_steps, (batch,), device=latents.device)
    noise = torch.randn_like(latents)
    x_t = q_sample(schedule, latents, t, noise)
    context = dict(context=text.states, context_mask=text.mask) if text is not None else {}
    output = unet(x_t, t, class_labels=class_labels, **context)
    target = training_target(config.prediction, latents, noise, schedule, t)
    weights = loss_weight(config.weighting, schedule, t, config.snr_gamma, config.prediction)
    return diffusion_loss(output, target, weights)


class LatentDiffusion(nn.Module):
    """Autoencoder + U-Net + text encoder + schedule: the pieces the text-to-image pipelines compose.

    Args:
        autoencoder: the frozen stage-1 model (VQ or KL).
        unet: the denoising network, on scaled latents with D = autoencoder code_dim channels.
        text_encoder: the frozen text encoder, or None for a U-Net without cross-attention (class-only:
            :meth:`generate` then takes the names of its classes as prompts).
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
        if text_encoder is None and text_config is not None:
            text_encoder = TextEncoder(text_config)
        autoencoder = Autoencoder.from_pretrained(directory / "autoencoder")
        unet = UNet.from_pretrained(directory / "unet").eval()
        class_names = json.loads((directory / PIPELINE_FILE).read_text()).get("class_names")
        try:
            return cls(autoencoder, unet, text_encoder, config, latent_scale, class_names)
        except ValueError as error:
            raise CheckpointError(f"{directory / PIPELINE_FILE}: {error}") from None

    # ------------------------------------------------------------------------------------- the pieces
    def encode_prompts(self, prompts: str | list[str]) -> TextEmbedding:
        """Prompts (a bare string is one) -> TextEmbedding(states (B, L, E), mask (B, L)) on the U-Net's device."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder (its U-Net has no cross-attention)")
        text = self.text_encoder.encode(as_prompt_list(prompts))
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
        """(B, D, H / f, W / f) for images ``height`` x ``width`` pixels (non-square works: the U-Net is
        convolutional); each defaults to the autoencoder's training resolution.

        Raises:
            TypeError: a size that is not an integer.
            ValueError: a size < 1, or not a multiple of :attr:`size_multiple` (naming the valid ones).
        """
        ae = self.autoencoder.config
        height, width = (self._check_side(name, value, ae.resolution) for name, value in
                         (("height", height), ("width", width)))
        factor = self.autoencoder.downsample_factor
        return batch, ae.code_dim, height // factor, width // factor

    def _check_side(self, name: str, value: int | None, default: int) -> int:
        """One image side in pixels, checked (None: ``default``)."""
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer number of pixels, got {value!r}")
        multiple = self.size_multiple
        ae, unet = self.autoencoder.downsample_factor, self.unet.downsample_factor
        why = f"the autoencoder downsamples by {ae}" + (f" and the U-Net by {unet} more" if unet > 1 else "")
        if value < 1:
            raise ValueError(f"{name}={value}: image sizes must be positive multiples of {multiple} ({why}); "
                             f"leave {name} out for the training resolution {default}")
        if value % multiple:
            lower = value - value % multiple
            valid = f"{lower} or {lower + multiple}" if lower else f"{multiple}"
            raise ValueError(f"{name}={value} is not a multiple of {multiple} ({why}); image sizes must be "
                             f"multiples of {multiple}, e.g. {valid}")
        return value

    def timesteps(self, steps: int, sampler: str) -> Tensor:
        """The sampling timesteps, in the style each sampler was matched to diffusers with."""
        style = "dpmsolver" if sampler == "dpmpp_2m" else "ddim"
        return timesteps_for(self.schedule, steps, self.config.spacing, style=style)

    @torch.no_grad()
    def sample_latents(self, cond: TextEmbedding | None, uncond: TextEmbedding | None,
                       shape: tuple[int, ...], *, steps: int = 20, guidance: float = 1.0, rescale: float = 0.0,
                       sampler: str = "dpmpp_2m", generator: torch.Generator | None = None,
                       init_latents: Tensor | None = None, strength: float = 1.0, mask: Tensor | None = None,
                       known_latents: Tensor | None = None, class_labels: Tensor | None = None,
                       callback: Callback | None = None, classifier: NoisyLatentClassifier | None = None,
                       classifier_labels: Tensor | None = None, classifier_scale: float = 1.0,
                       **sampler_options: Any) -> Tensor:
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
            sampler_options: extra sampler options, e.g. ``eta`` for "ddim".
        """
        timesteps = self.timesteps(steps, sampler)
        device = self.device
        if init_latents is not None:
            if strength == 0:
                return init_latents.to(device).clone()
            timesteps = img2img_timesteps(timesteps, strength)
        x = torch.randn(shape, generator=generator, device=generator.device if generator else device).to(device)
        if init_latents is not None:  # SDEdit: noise the input to the first kept timestep
            start = torch.full((shape[0],), int(timesteps[0]), device=device)
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

    def _classifier_guided(self, denoiser, classifier: NoisyLatentClassifier, labels: Tensor | None,
                           scale: float, batch: int):
        """Wrap ``denoiser`` with the gradient of log p(labels | x_t) (see :func:`classifier_guided`)."""
        if labels is None or labels.shape != (batch,):
            got = None if labels is None else tuple(labels.shape)
            raise ValueError(f"classifier guidance needs classifier_labels of shape ({batch},), got {got}")
        if int(labels.min()) < 0 or int(labels.max()) >= classifier.num_classes:
            raise ValueError(f"classifier_labels must lie in [0, {classifier.num_classes}) "
                             f"({classifier.config.attribute}: {', '.join(classifier.config.class_names)})")
        classifier.check_compatible(self.autoencoder.config.code_dim, self.latent_scale, self.schedule)
        classifier.to(self.device)
        labels = labels.to(self.device).long()
        return classifier_guided(denoiser, lambda x, t: classifier.log_prob(x, t, labels), scale, self.schedule)

    @torch.no_grad()
    def generate(self, prompts: str | list[str], *, negative_prompts: str | list[str] | None = None, steps: int = 20,
                 guidance: float = 4.0, rescale: float = 0.0, sampler: str = "dpmpp_2m",
                 generator: torch.Generator | None = None, size: int | None = None,
                 height: int | None = None, width: int | None = None,
                 class_labels: Tensor | None = None, classifier: NoisyLatentClassifier | None = None,
                 classifier_labels: Tensor | None = None, classifier_scale: float = 1.0,
                 **sampler_options: Any) -> Tensor:
        """Text -> images (B, 3, H, W) in [-1, 1]; negative prompts (1 or B) replace the null prompt "".

        ``prompts`` and ``negative_prompts`` take a list, or one bare string (one prompt, as the pipelines do).
        ``size`` is a square image's side, ``height``/``width`` one side each (not both kinds); all
        default to the training resolution, see :meth:`latent_shape`.
        ``classifier``, ``classifier_labels``, ``classifier_scale``: classifier guidance, see :meth:`sample_latents`.
        """
        if size is not None and (height is not None or width is not None):
            raise ValueError(f"size={size} and height/width were both given; give size (square) or height and width")
        prompts = as_prompt_list(prompts) if prompts is not None else []
        if self.text_encoder is None and prompts:  # a class-only U-Net: its prompts are class names
            if class_labels is not None:
                raise ValueError("this pipeline has no text encoder: give prompts (names of its classes) or "
                                 "class_labels, not both")
            class_labels, prompts = self.labels_of(prompts), []
        cond = self.encode_prompts(prompts) if self.text_encoder is not None else None  # refuses no prompts
        labels = class_labels if class_labels is not None else classifier_labels  # without prompts: the batch size
        if not prompts and labels is None:
            raise ValueError("give prompts, or class_labels (or classifier_labels) to a pipeline without text")
        batch = len(prompts) if prompts else int(labels.shape[0])
        negatives = self._negatives(negative_prompts, batch)
        uncond = None
        if cond is not None and guidance != 1.0:
            uncond = self.encode_prompts(negatives if negatives is not None else [""])
        shape = self.latent_shape(batch, size if size is not None else height, size if size is not None else width)
        latents = self.sample_latents(cond, uncond, shape, steps=steps, guidance=guidance,
                                      rescale=rescale, sampler=sampler, generator=generator,
                                      class_labels=class_labels, classifier=classifier,
                                      classifier_labels=classifier_labels, classifier_scale=classifier_scale,
                                      **sampler_options)
        return self.decode(latents)

    def labels_of(self, prompts: list[str]) -> Tensor:
        """The dataset labels (B,) of prompts naming classes of :attr:`class_names`; ValueError for any other."""
        index = {name: label for label, name in enumerate(self.class_names or ())}
        unknown = [prompt for prompt in prompts if prompt not in index]
        if unknown:
            names = (f"its {len(index)} class names (e.g. {self.class_names[0]!r})" if index
                     else "its (unsaved) class names")
            raise ValueError(f"this pipeline has no text encoder, and the prompt {unknown[0]!r} is none of {names}; "
                             f"give class names or class_labels")
        return torch.tensor([index[prompt] for prompt in prompts], dtype=torch.long)

    def _negatives(self, negative_prompts: str | list[str] | None, batch: int) -> list[str] | None:
        """``negative_prompts`` as a list of 1 or ``batch`` prompts (None: the null prompt)."""
        if negative_prompts is None:
            return None
        if self.text_encoder is None:
            raise ValueError("negative_prompts need a text encoder, and this pipeline has none (its U-Net has no "
                             "cross-attention); leave negative_prompts out")
        negatives = as_prompt_list(negative_prompts)
        if len(negatives) not in (1, batch):
            raise ValueError(f"negative_prompts has {len(negatives)} entries for {batch} prompts; give one (shared by "
                             f"every prompt) or one per prompt, or leave it out for the null prompt \"\"")
        return negatives


def as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """A bare string is one prompt (``"a dog"`` -> ``["a dog"]``, not one prompt per character); a
    sequence is copied to a list. The text encoder checks the items."""
    return [prompts] if isinstance(prompts, str) else list(prompts)


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


def read_pipeline_meta(directory: str | Path) -> tuple[DiffusionConfig, TextEncoderConfig | None, float]:
    """The diffusion config, text encoder config (None without text) and latent scale of a pipeline directory."""
    path = Path(directory) / PIPELINE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a pipeline directory: {PIPELINE_FILE} is missing "
                              f"(training writes one to <run_dir>/pipeline)")
    meta = json.loads(path.read_text())
    if meta.get("kind") != PIPELINE_KIND or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} holds kind {meta.get('kind')!r} format {meta.get('format_version')}; "
                              f"expected {PIPELINE_KIND!r} format {FORMAT_VERSION}")
    # strict like every other file we load: a key we do not know would otherwise be silently ignored
    unknown = sorted(set(meta) - PIPELINE_KEYS)
    if unknown:
        raise CheckpointError(f"{path} has unknown keys {unknown} (valid keys: {', '.join(sorted(PIPELINE_KEYS))}); "
                              f"was it written by a newer version?")
    text = meta.get("text_encoder")
    text_config = from_dict(TextEncoderConfig, text) if text is not None else None
    return from_dict(DiffusionConfig, meta["diffusion"]), text_config, float(meta["latent_scale"])


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
