"""The shared machinery of the latent diffusion pipelines (text, class, image-to-image, inpainting).

Every diffusion pipeline wraps one :class:`diffusion.latent_diffusion.LatentDiffusion` (autoencoder,
U-Net, text encoder, noise schedule) and differs only in how it builds the condition and the start
latents, so the steps live here once: the size checks, the memory estimate (:meth:`image_cost`), the
prompt embeddings, classifier guidance, the sampler run with its progress bar, and the decoding into the
requested output type. The call's options are checked before any of it, in
:func:`pipelines.options.check_options`, and the size and count against the memory estimate.

A call makes its images ``chunk_size`` at a time (:meth:`LatentPipeline.generate`): each chunk's text
embeddings, sampler run and decoding, so memory is flat in the number of images beyond the chunk, except
for the result itself.

Shapes: B images (prompts x images per prompt), D latent channels, H W pixels, h w latent grid.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from autoencoder.model_config import AutoencoderConfig
from common.text_encoder import TextEmbedding
from diffusion.classifier import NoisyLatentClassifier
from diffusion.latent_diffusion import PIPELINE_KIND, LatentDiffusion, find_classifier_dir
from diffusion.schedules import img2img_timesteps
from diffusion.stable_diffusion import is_diffusers_pipeline, load_stable_diffusion
from diffusion.unet import UNetConfig
from pipelines.base import Pipeline, PipelineKindError, PipelineOutput, step_reporter, to_output
from pipelines.inputs import ImageInput, image_size
from pipelines.options import (
    DEFAULT_GUIDANCE_SCALE,
    GenerationOptions,
    ImageCost,
    PipelineFacts,
    check_memory,
    check_size,
    label_ids,
)

LatentT = TypeVar("LatentT", bound="LatentPipeline")
# What one chunk's sampler run takes: (shape, cond, uncond, sample_latents keywords), for the rows it covers.
ChunkInputs = tuple[tuple[int, int, int, int], TextEmbedding | None, TextEmbedding | None, dict[str, Any]]

# The memory estimate (check_memory). Activations are counted in fp32 (autocast to bf16 halves some of them,
# so this errs high) and only what a no-grad forward keeps alive: a convolutional block holds about
# LIVE_MAPS feature maps of its width at once (input, GroupNorm and SiLU outputs, conv output, residual sum,
# and at attention levels q, k, v and the feed-forward's 4x-wide hidden); SDPA's fused kernels keep no
# (pixels x pixels) attention map. The U-Net also keeps every down block's output for its up path.
FLOAT_BYTES = 4
LIVE_MAPS = 8
SAMPLER_STATES = 8  # latent-sized tensors per image: x, noise, x0 and the last x0, eps, [x; x] for guidance, ...
PIL_OVERHEAD = 1024  # bytes of a PIL image object beyond its pixels


def unet_activation_bytes(config: UNetConfig, h: int, w: int) -> int:
    """One image's U-Net activations on an h x w latent grid (see LIVE_MAPS)."""
    maps = [channels * h * w // 4**level for level, channels in enumerate(config.block_channels)]
    return FLOAT_BYTES * (sum(maps) * (config.layers_per_block + 1) + LIVE_MAPS * max(maps))


def autoencoder_activation_bytes(config: AutoencoderConfig, height: int, width: int) -> int:
    """One image's encoder or decoder activations at height x width pixels (the widest level dominates)."""
    maps = [config.base_channels * mult * height * width // 4**level for level, mult in enumerate(config.channel_mult)]
    return FLOAT_BYTES * LIVE_MAPS * max(maps)


def result_bytes(output_type: str, height: int, width: int, latent: int) -> int:
    """One image of a call's result: uint8 RGB in a PIL image, float32 RGB, or its latents."""
    return {"pil": 3 * height * width + PIL_OVERHEAD, "pt": 3 * FLOAT_BYTES * height * width}.get(output_type, latent)


def image_rows(rows: range, times: int, given: Tensor) -> Tensor:
    """The rows of ``given`` (1 row shared, or one per prompt) for output images ``rows`` (prompt by prompt)."""
    if given.shape[0] == 1:
        return given.expand(len(rows), *given.shape[1:])
    return given[torch.arange(rows.start, rows.stop, device=given.device) // times]


class LatentPipeline(Pipeline):
    """Base of the diffusion pipelines: holds the :class:`LatentDiffusion` bundle as ``self.model``.

    Args:
        model: the bundle; subclasses refuse one whose U-Net lacks the condition they feed it.
    """

    kind = PIPELINE_KIND
    needs_text: bool = True  # False: the class-conditional pipeline, which needs class labels instead
    roles: ClassVar[frozenset[str]] = frozenset({"diffusion", "text", "steering"})  # see PipelineFacts
    default_strength: ClassVar[float | None] = None  # what strength=None means (pipelines with an input image)

    def __init__(self, model: LatentDiffusion) -> None:
        self._check_model(model.text_encoder is not None, model.unet.config.num_classes)
        self.model = model.eval()

    @classmethod
    def from_pipe(cls: type[LatentT], pipe: LatentPipeline) -> LatentT:
        """Another diffusion pipeline over the same components (no copy, no reload), e.g.
        ``ImageToImage.from_pipe(text_to_image)``; a token pipeline gives the class's token variant."""
        if pipe.kind != cls.kind:
            if pipe.kind not in cls.variants:
                raise PipelineKindError(f"{cls.__name__}.from_pipe needs a diffusion pipeline, got "
                                        f"{type(pipe).__name__}")
            return cls.variants[pipe.kind].from_pipe(pipe)  # type: ignore[return-value]
        return cls(pipe.model)

    @classmethod
    def _check_meta(cls, directory: Path, meta: dict[str, Any]) -> None:
        # The U-Net's class count is only known after loading; the text encoder is in pipeline.json.
        cls._check_model(meta.get("text_encoder") is not None, None)

    @classmethod
    def _check_model(cls, has_text: bool, num_classes: int | None) -> None:
        """Refuse a bundle without the condition this class feeds (num_classes None: not known yet)."""
        if cls.needs_text and not has_text:
            raise PipelineKindError(f"{cls.__name__} needs a text-conditioned U-Net, and this pipeline has no text "
                                    f"encoder; load it with ClassToImage")
        if not cls.needs_text and num_classes == 0:
            raise PipelineKindError(f"{cls.__name__} needs a class-conditional U-Net (num_classes > 0), and this one "
                                    f"has none; load it with TextToImage")

    @classmethod
    def _load(cls: type[LatentT], directory: Path) -> LatentT:
        if is_diffusers_pipeline(directory):
            return cls(load_stable_diffusion(directory))
        return cls(LatentDiffusion.from_pretrained(directory))

    @property
    def default_guidance_scale(self) -> float:
        """What ``guidance_scale=None`` means."""
        return DEFAULT_GUIDANCE_SCALE

    @property
    def facts(self) -> PipelineFacts:
        return PipelineFacts(type(self).__name__, self.roles, self.default_guidance_scale, self.default_strength,
                             self.model.schedule.num_steps)

    # ------------------------------------------------------------------------------------- sizes
    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the autoencoder's factor f times the U-Net's."""
        return self.model.size_multiple

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Image height and width in pixels (None: the training resolution) that the U-Net can run on."""
        ae, unet = self.model.autoencoder.downsample_factor, self.model.unet.downsample_factor
        why = f"the autoencoder downsamples by {ae}" + (f" and the U-Net by {unet} more" if unet > 1 else "")
        default = self.model.autoencoder.config.resolution
        return (check_size("height", height, self.size_multiple, why, default),
                check_size("width", width, self.size_multiple, why, default))

    def latent_shape(self, batch: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(B, D, h, w) of ``batch`` images of ``size`` (height, width) pixels."""
        return self.model.latent_shape(batch, *size)

    def check_call(self, run: GenerationOptions, prompts: int, name: str = "prompt") -> tuple[tuple[int, int], int]:
        """The (height, width) and the number of images of a call on ``prompts`` prompts (or labels: ``name``),
        refused when they cannot fit in memory (see :func:`pipelines.options.check_memory`)."""
        size = self.check_size(run.height, run.width)
        return size, self.check_memory(run, prompts, size, name)

    def check_inputs_memory(self, run: GenerationOptions, image: ImageInput, prompts: int) -> int:
        """The number of images of an img2img or inpainting call, refused (before the input is resized) when
        they cannot fit in memory at their size: ``height`` / ``width``, else the input image's."""
        given = image_size(image)
        return self.check_memory(run, prompts, (run.height or given[0], run.width or given[1]), "prompt")

    def check_memory(self, run: GenerationOptions, prompts: int, size: tuple[int, int], name: str) -> int:
        """The number of images of a call on ``prompts`` prompts (labels: ``name``), refused when they do not fit."""
        count = prompts * run.num_images_per_prompt
        check_memory(run, self.image_cost(run, *size), count, size, self.device, (name, prompts))
        return count

    def image_cost(self, run: GenerationOptions, height: int, width: int) -> ImageCost:
        """The estimated bytes of one image: latents, U-Net (twice with guidance), autoencoder, pixels."""
        _, channels, h, w = self.latent_shape(1, (height, width))
        latent = FLOAT_BYTES * channels * h * w
        branches = 1 if run.guidance_scale in (0.0, 1.0) else 2
        working = (SAMPLER_STATES * latent + branches * unet_activation_bytes(self.model.unet.config, h, w)
                   + autoencoder_activation_bytes(self.model.autoencoder.config, height, width)
                   + 2 * 3 * FLOAT_BYTES * height * width)
        return ImageCost(working, latent + result_bytes(run.output_type, height, width, latent))

    # ------------------------------------------------------------------------------- classifier guidance
    def classifier_guidance(self, run: GenerationOptions, count: int) -> dict[str, Any]:
        """The :meth:`sample` keywords of the call's classifier guidance ({} without a classifier).

        The options were checked already; this loads the classifier and checks what needs it: the labels
        (one for every prompt, or one per prompt: :func:`chunk_steering` picks each image's) and that it
        was trained on this pipeline's latents and schedule.
        """
        classifier = run.classifier
        if classifier is None:
            return {}
        if not isinstance(classifier, NoisyLatentClassifier):
            classifier = NoisyLatentClassifier.from_pretrained(find_classifier_dir(classifier))
        config = classifier.config
        if run.classifier_labels is None:
            raise ValueError(f"classifier_labels: classifier guidance needs the {config.attribute} to steer each "
                             f"prompt towards (one, or one per prompt); valid names: {', '.join(config.class_names)}")
        labels = label_ids("classifier_labels", run.classifier_labels, classifier.num_classes, config.class_names,
                           owner=f"the classifier (it predicts {config.attribute!r})")
        if len(labels) not in (1, count):
            raise ValueError(f"classifier_labels has {len(labels)} entries for {count} prompts; give one, or one "
                             f"per prompt")
        try:
            self.model.check_classifier(classifier)
        except ValueError as error:
            raise ValueError(f"classifier: {error}") from None
        return dict(classifier=classifier, classifier_labels=labels, classifier_scale=run.classifier_scale)

    # ------------------------------------------------------------------------------------ conditions
    def text_conditions(self, prompts: list[str], negatives: list[str] | None, run: GenerationOptions,
                        rows: range) -> tuple[TextEmbedding, TextEmbedding | None]:
        """Embeddings of the prompts of output images ``rows`` and of the negative or null prompt.

        The unconditional branch is not encoded at guidance 1, where it is never evaluated.
        """
        times = run.num_images_per_prompt
        cond = self.model.encode_prompts([prompts[i // times] for i in rows])
        if run.guidance_scale == 1.0:
            return cond, None
        chosen = [""] if negatives is None else negatives if len(negatives) == 1 else [negatives[i // times]
                                                                                         for i in rows]
        return cond, self.model.encode_prompts(chosen)

    # ------------------------------------------------------------------------------------- sampling
    def generate(self, run: GenerationOptions, count: int, chunk_inputs: Callable[[range], ChunkInputs],
                 strength: float = 1.0) -> PipelineOutput:
        """Sample and decode ``count`` images ``chunk_size`` at a time, so memory is flat in ``count``.

        Every chunk draws its start noise from the call's one generator, in image order, so a deterministic
        sampler (dpmpp_2m, euler, ddim with eta 0) gives the same latents for any chunk size: each chunk's
        draw continues the stream where the previous chunk's ended. The start noise is the same bit for bit
        for a CPU generator (``seed=`` makes one) when a chunk's latents hold a multiple of 16 values (torch
        draws normals in blocks of 16; D * h * w is such a multiple for 4-channel latents with h * w a
        multiple of 4); a CUDA generator's blocks follow its kernel launches instead. The latents then agree
        to float rounding: some CPUs' kernels round another batch size differently. A stochastic sampler (ddpm,
        ddim with eta > 0) also draws per step, so its images depend on ``chunk_size`` (recorded in the
        settings); the same seed and chunk size always repeat them. ``callback`` runs for each chunk's
        steps, with that chunk's latents.

        Args:
            run: the checked call options.
            count: the number of images (prompts x images per prompt).
            chunk_inputs: the sampler inputs of the output images in a range.
            strength: img2img strength (1: from noise).
        """
        generator = run.make_generator()
        chunks = [range(start, min(start + run.chunk_size, count)) for start in range(0, count, run.chunk_size)]
        images = None
        with step_reporter(self.steps_to_run(run, strength) * len(chunks), run.progress, run.callback) as callback:
            for rows in chunks:
                shape, cond, uncond, inputs = chunk_inputs(rows)
                if run.latents is not None:
                    inputs["noise"] = given_noise(run.latents, rows, shape, count)
                latents = self.sample(shape, run, cond, uncond, generator, callback, strength=strength, **inputs)
                images = collect(images, self.finish(latents, run).images, rows, count)
        return PipelineOutput(images)

    def sample(self, shape: tuple[int, int, int, int], run: GenerationOptions, cond: TextEmbedding | None,
               uncond: TextEmbedding | None, generator: torch.Generator | None, callback: Any, *,
               strength: float = 1.0, **inputs: Any) -> Tensor:
        """Run the sampler on one chunk with the call's settings (under autocast).

        This is the one place where the options' names meet the bundle's (``steps``, ``guidance``, ...).

        Args:
            shape: (B, D, h, w) of the chunk.
            run: the checked call options (``guidance_scale`` resolved).
            cond, uncond: text embeddings (B and 1 or B rows), or None without text.
            generator: the call's generator (None: torch's global one).
            callback: the progress / user callback of :func:`pipelines.base.step_reporter`.
            strength: img2img strength in [0, 1], used with ``init_latents``.
            inputs: ``init_latents``, ``mask``, ``known_latents``, ``class_labels``, and the classifier
                guidance keywords of :meth:`classifier_guidance`, as :meth:`LatentDiffusion.sample_latents`
                takes them, for the chunk's rows.

        Returns:
            Scaled latents (B, D, h, w).
        """
        with self.autocast():
            return self.model.sample_latents(
                cond, uncond, shape, steps=run.num_inference_steps, guidance=run.guidance_scale,
                rescale=run.guidance_rescale, sampler=run.sampler, generator=generator, strength=strength,
                callback=callback, **inputs, **run.sampler_options())

    def steps_to_run(self, run: GenerationOptions, strength: float) -> int:
        """How many sampler steps (and callback calls) a call makes: fewer for img2img, none at strength 0."""
        if strength == 0:
            return 0
        return len(img2img_timesteps(self.model.timesteps(run.num_inference_steps, run.sampler), strength))

    def check_strength(self, run: GenerationOptions) -> float:
        """The call's ``strength`` (in [0, 1], checked), refused when it keeps none of the call's steps."""
        strength = run.strength
        if strength > 0 and int(run.num_inference_steps * strength) == 0:
            raise ValueError(f"strength={strength} with num_inference_steps={run.num_inference_steps} runs no step; "
                             f"raise strength or num_inference_steps (strength 0 returns the input unchanged)")
        return strength

    def encode_inputs(self, pixels: Tensor, run: GenerationOptions) -> Tensor:
        """Images (1 or P, 3, H, W) in [-1, 1] -> scaled latents (1 or P, D, h, w), ``chunk_size`` at a time."""
        self.check_size(pixels.shape[-2], pixels.shape[-1])
        return torch.cat([self.model.encode_images(part) for part in pixels.split(run.chunk_size)])

    def finish(self, latents: Tensor, run: GenerationOptions) -> PipelineOutput:
        """Latents -> the requested output ("latent" skips the decoder)."""
        if run.output_type == "latent":
            return PipelineOutput(latents)
        return to_output(self.model.decode(latents), run.output_type)


def given_noise(latents: Tensor, rows: range, shape: tuple[int, ...], count: int) -> Tensor:
    """The rows of the call's ``latents=`` for one chunk of ``shape``, refused unless the whole tensor is
    (``count``, D, h, w) of finite numbers."""
    expected = (count, *shape[1:])
    if not isinstance(latents, Tensor) or tuple(latents.shape) != expected:
        got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"latents has shape {got}, but this call samples {expected}: one (D, h, w) start noise per "
                         f"image (prompts x num_images_per_prompt, latent channels, height and width / "
                         f"the size_multiple of the autoencoder)")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents holds NaN/inf values; give finite start noise (e.g. torch.randn)")
    return latents[rows.start:rows.stop]


def chunk_steering(steering: dict[str, Any], rows: range, times: int) -> dict[str, Any]:
    """The classifier guidance keywords of output images ``rows`` (labels: 1 or one per prompt)."""
    if not steering:
        return {}
    return dict(steering, classifier_labels=image_rows(rows, times, steering["classifier_labels"]).contiguous())


def collect(images: list | Tensor | None, part: list | Tensor, rows: range, count: int) -> list | Tensor:
    """Put one chunk's images (output images ``rows``) into the call's result, created at the first chunk: a
    list of PIL images, or a tensor of ``count`` rows (so the whole result is never held twice)."""
    if isinstance(part, list):
        images = [] if images is None else images
        images.extend(part)
        return images
    if images is None:
        images = part.new_empty((count, *part.shape[1:]))
    images[rows.start:rows.stop] = part
    return images
