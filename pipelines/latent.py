"""The shared machinery of the latent diffusion pipelines (text, class, image-to-image, inpainting).

Every diffusion pipeline wraps one :class:`diffusion.latent_diffusion.LatentDiffusion` (autoencoder,
U-Net, text encoder, noise schedule) and differs only in how it builds the condition and the start
latents, so the steps live here once: the size checks, the prompt embeddings, classifier guidance,
the sampler run with its progress bar, and the decoding into the requested output type.

Shapes: B images (prompts x images per prompt), D latent channels, H W pixels, h w latent grid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor

from common.text_encoder import TextEmbedding
from diffusion.classifier import NoisyLatentClassifier
from diffusion.latent_diffusion import PIPELINE_KIND, LatentDiffusion, find_classifier_dir
from diffusion.schedules import img2img_timesteps
from pipelines.base import Pipeline, PipelineKindError, PipelineOutput, step_reporter, to_output
from pipelines.options import Labels, RunOptions, check_number, label_ids, repeat_rows, repeat_tensor

DEFAULT_GUIDANCE = 4.0  # guidance_scale=None means this (LatentDiffusion.generate's default too)
LatentT = TypeVar("LatentT", bound="LatentPipeline")


class LatentPipeline(Pipeline):
    """Base of the diffusion pipelines: holds the :class:`LatentDiffusion` bundle as ``self.model``.

    Args:
        model: the bundle; subclasses refuse one whose U-Net lacks the condition they feed it.
    """

    kind = PIPELINE_KIND
    needs_text: bool = True  # False: the class-conditional pipeline, which needs class labels instead

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
        return DEFAULT_GUIDANCE

    # ------------------------------------------------------------------------------------- sizes
    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the autoencoder's factor f times the U-Net's."""
        return self.model.size_multiple

    def check_size(self, height: int, width: int) -> None:
        """Fail unless the U-Net can run on latents of images ``height`` x ``width`` (see
        :meth:`LatentDiffusion.latent_shape`, which checks them)."""
        self.model.latent_shape(1, height, width)

    # ------------------------------------------------------------------------------- classifier guidance
    def classifier_guidance(self, classifier: NoisyLatentClassifier | str | Path | None,
                            classifier_labels: Labels | None, classifier_scale: float, count: int,
                            times: int) -> dict[str, Any]:
        """The :meth:`sample` keywords of classifier guidance, checked ({} without a classifier).

        Args:
            classifier: a :class:`NoisyLatentClassifier`, the path of its component directory or of its
                training run directory (holding ``classifier/``), or None.
            classifier_labels: class ids or names of the classifier's attribute: one for every prompt,
                or one per prompt (a list); each is repeated for the prompt's ``times`` images.
            classifier_scale: finite, >= 0; 0 gives exactly the unguided samples.
            count: the number of prompts (or class labels).
            times: images per prompt.
        """
        scale = check_number("classifier_scale", classifier_scale, 0.0)
        if classifier is None:
            if classifier_labels is not None or scale != 1.0:
                given = "classifier_labels" if classifier_labels is not None else f"classifier_scale={scale:g}"
                raise ValueError(f"{given} needs a classifier: pass classifier= (a NoisyLatentClassifier, or the "
                                 f"directory of one or of its training run)")
            return {}
        if isinstance(classifier, (str, Path)):
            classifier = NoisyLatentClassifier.from_pretrained(find_classifier_dir(classifier))
        elif not isinstance(classifier, NoisyLatentClassifier):
            raise TypeError(f"classifier must be a NoisyLatentClassifier or the path of its directory, "
                            f"got {type(classifier).__name__}")
        config = classifier.config
        if classifier_labels is None:
            raise ValueError(f"classifier_labels: classifier guidance needs the {config.attribute} to steer each "
                             f"prompt towards (one, or one per prompt); valid names: {', '.join(config.class_names)}")
        labels = label_ids("classifier_labels", classifier_labels, classifier.num_classes, config.class_names,
                           owner=f"the classifier (it predicts {config.attribute!r})")
        if len(labels) not in (1, count):
            raise ValueError(f"classifier_labels has {len(labels)} entries for {count} prompts; give one, or one "
                             f"per prompt")
        try:
            classifier.check_compatible(self.model.autoencoder.config.code_dim, self.model.latent_scale,
                                        self.model.schedule)
        except ValueError as error:
            raise ValueError(f"classifier: {error}") from None
        return dict(classifier=classifier, classifier_labels=repeat_tensor(labels, count, times).contiguous(),
                    classifier_scale=scale)

    # ------------------------------------------------------------------------------------ conditions
    def text_conditions(self, prompts: list[str], negatives: list[str] | None,
                        run: RunOptions) -> tuple[TextEmbedding, TextEmbedding | None]:
        """Embeddings of the prompts (each repeated per image) and of the negative or null prompt.

        The unconditional branch is not encoded at guidance 1, where it is never evaluated.
        """
        times = run.num_images_per_prompt
        cond = self.model.encode_prompts(repeat_rows(prompts, times))
        if run.guidance(self.default_guidance_scale) == 1.0:
            return cond, None
        rows = [""] if negatives is None else negatives if len(negatives) == 1 else repeat_rows(negatives, times)
        return cond, self.model.encode_prompts(rows)

    # ------------------------------------------------------------------------------------- sampling
    def sample(self, shape: tuple[int, int, int, int], run: RunOptions, cond: TextEmbedding | None,
               uncond: TextEmbedding | None, *, strength: float = 1.0, **inputs: Any) -> Tensor:
        """Run the sampler with the call's settings, a progress bar and the user's callback.

        Args:
            shape: (B, D, h, w).
            run: the checked call options.
            cond, uncond: text embeddings (B and 1 or B rows), or None without text.
            strength: img2img strength in [0, 1], used with ``init_latents``.
            inputs: ``init_latents``, ``mask``, ``known_latents``, ``class_labels``, and the classifier
                guidance keywords of :meth:`classifier_guidance`, as :meth:`LatentDiffusion.sample_latents`
                takes them.

        Returns:
            Scaled latents (B, D, h, w).
        """
        guidance = run.guidance(self.default_guidance_scale)
        total = self.steps_to_run(run, strength if inputs.get("init_latents") is not None else 1.0)
        with step_reporter(total, run.progress, run.callback) as callback, self.autocast():
            return self.model.sample_latents(
                cond, uncond, shape, steps=run.num_inference_steps, guidance=guidance, rescale=run.guidance_rescale,
                sampler=run.sampler, generator=run.make_generator(), strength=strength, callback=callback, **inputs)

    def steps_to_run(self, run: RunOptions, strength: float) -> int:
        """How many sampler steps (and callback calls) a call makes: fewer for img2img, none at strength 0."""
        if strength == 0:
            return 0
        return len(img2img_timesteps(self.model.timesteps(run.num_inference_steps, run.sampler), strength))

    def check_strength(self, strength: float, run: RunOptions) -> float:
        """``strength`` in [0, 1] that keeps at least one of the call's steps (or none at all, at 0)."""
        strength = check_number("strength", strength, 0.0, 1.0)
        if strength > 0 and int(run.num_inference_steps * strength) == 0:
            raise ValueError(f"strength={strength} with num_inference_steps={run.num_inference_steps} runs no step; "
                             f"raise strength or num_inference_steps (strength 0 returns the input unchanged)")
        return strength

    def encode_inputs(self, pixels: Tensor, count: int, run: RunOptions) -> Tensor:
        """Images (1 or count, 3, H, W) in [-1, 1] -> scaled latents, one row per output image."""
        self.check_size(pixels.shape[-2], pixels.shape[-1])
        latents = self.model.encode_images(pixels)
        return repeat_tensor(latents, count, run.num_images_per_prompt).contiguous()

    def finish(self, latents: Tensor, run: RunOptions) -> PipelineOutput:
        """Latents -> the requested output ("latent" skips the decoder)."""
        if run.output_type == "latent":
            return PipelineOutput(latents)
        return to_output(self.model.decode(latents), run.output_type)
