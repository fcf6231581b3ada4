"""The shared machinery of the latent diffusion pipelines (text, class, image-to-image, inpainting).

Every diffusion pipeline wraps one :class:`diffusion.latent_diffusion.LatentDiffusion` (autoencoder,
U-Net, text encoder, noise schedule) and differs only in how it builds the condition and the start
latents, so the steps live here once: the size checks, the prompt embeddings, classifier guidance,
the sampler run with its progress bar, and the decoding into the requested output type. The call's
options are checked before any of it, in :func:`pipelines.options.check_options`.

Shapes: B images (prompts x images per prompt), D latent channels, H W pixels, h w latent grid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch import Tensor

from common.text_encoder import TextEmbedding
from diffusion.classifier import NoisyLatentClassifier
from diffusion.latent_diffusion import PIPELINE_KIND, LatentDiffusion, find_classifier_dir
from diffusion.schedules import img2img_timesteps
from pipelines.base import Pipeline, PipelineKindError, PipelineOutput, step_reporter, to_output
from pipelines.options import (
    DEFAULT_GUIDANCE_SCALE,
    GenerationOptions,
    PipelineFacts,
    check_size,
    label_ids,
    repeat_rows,
    repeat_tensor,
)

LatentT = TypeVar("LatentT", bound="LatentPipeline")


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
        ``ImageToImage.from_pipe(text_to_image)``."""
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

    def latent_shape(self, batch: int, run: GenerationOptions) -> tuple[int, int, int, int]:
        """(B, D, h, w) of the call's images, its ``height`` and ``width`` checked."""
        return self.model.latent_shape(batch, *self.check_size(run.height, run.width))

    # ------------------------------------------------------------------------------- classifier guidance
    def classifier_guidance(self, run: GenerationOptions, count: int) -> dict[str, Any]:
        """The :meth:`sample` keywords of the call's classifier guidance ({} without a classifier).

        The options were checked already; this loads the classifier and checks what needs it: the labels
        (one for every prompt, or one per prompt, each repeated for the prompt's images) and that it was
        trained on this pipeline's latents and schedule.
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
        labels = repeat_tensor(labels, count, run.num_images_per_prompt).contiguous()
        return dict(classifier=classifier, classifier_labels=labels, classifier_scale=run.classifier_scale)

    # ------------------------------------------------------------------------------------ conditions
    def text_conditions(self, prompts: list[str], negatives: list[str] | None,
                        run: GenerationOptions) -> tuple[TextEmbedding, TextEmbedding | None]:
        """Embeddings of the prompts (each repeated per image) and of the negative or null prompt.

        The unconditional branch is not encoded at guidance 1, where it is never evaluated.
        """
        times = run.num_images_per_prompt
        cond = self.model.encode_prompts(repeat_rows(prompts, times))
        if run.guidance_scale == 1.0:
            return cond, None
        rows = [""] if negatives is None else negatives if len(negatives) == 1 else repeat_rows(negatives, times)
        return cond, self.model.encode_prompts(rows)

    # ------------------------------------------------------------------------------------- sampling
    def sample(self, shape: tuple[int, int, int, int], run: GenerationOptions, cond: TextEmbedding | None,
               uncond: TextEmbedding | None, *, strength: float = 1.0, **inputs: Any) -> Tensor:
        """Run the sampler with the call's settings, a progress bar and the user's callback.

        This is the one place where the options' names meet the bundle's (``steps``, ``guidance``, ...).

        Args:
            shape: (B, D, h, w).
            run: the checked call options (``guidance_scale`` resolved).
            cond, uncond: text embeddings (B and 1 or B rows), or None without text.
            strength: img2img strength in [0, 1], used with ``init_latents``.
            inputs: ``init_latents``, ``mask``, ``known_latents``, ``class_labels``, and the classifier
                guidance keywords of :meth:`classifier_guidance`, as :meth:`LatentDiffusion.sample_latents`
                takes them.

        Returns:
            Scaled latents (B, D, h, w).
        """
        total = self.steps_to_run(run, strength if inputs.get("init_latents") is not None else 1.0)
        with step_reporter(total, run.progress, run.callback) as callback, self.autocast():
            return self.model.sample_latents(
                cond, uncond, shape, steps=run.num_inference_steps, guidance=run.guidance_scale,
                rescale=run.guidance_rescale, sampler=run.sampler, generator=run.make_generator(), strength=strength,
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

    def encode_inputs(self, pixels: Tensor, count: int, run: GenerationOptions) -> Tensor:
        """Images (1 or count, 3, H, W) in [-1, 1] -> scaled latents, one row per output image."""
        self.check_size(pixels.shape[-2], pixels.shape[-1])
        latents = self.model.encode_images(pixels)
        return repeat_tensor(latents, count, run.num_images_per_prompt).contiguous()

    def finish(self, latents: Tensor, run: GenerationOptions) -> PipelineOutput:
        """Latents -> the requested output ("latent" skips the decoder)."""
        if run.output_type == "latent":
            return PipelineOutput(latents)
        return to_output(self.model.decode(latents), run.output_type)
