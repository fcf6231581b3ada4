"""Text-to-image and class-to-image latent diffusion pipelines.

    pipe = TextToImage.from_pretrained("runs/emoji32_diffusion")        # a run directory or its pipeline/
    images = pipe(["dog face", "red apple"], num_images_per_prompt=2, seed=0).images   # 4 PIL images

Both sample with classifier-free guidance: TextToImage guides the prompt against the negative prompt
(default: the null prompt ""), ClassToImage guides the class against the null class. Both also take
classifier guidance from a noisy-latent classifier trained on the pipeline's latents
(``accelerate launch diffusion/train_classifier.py``)::

    images = pipe(["a small circle", "a large square"], guidance_scale=1.0, seed=0,
                  classifier="runs/shapes32_classifier", classifier_labels=["red", "blue"],
                  classifier_scale=3.0).images
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from common.text_encoder import TextEmbedding
from pipelines.base import PipelineOutput
from pipelines.latent import ChunkInputs, LatentPipeline, chunk_steering, image_rows
from pipelines.options import Labels, as_negatives, as_prompts, label_ids


class TextToImage(LatentPipeline):
    """Text encoder -> diffusion sampler with classifier-free guidance -> autoencoder decoder."""

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], **options: Any) -> PipelineOutput:
        """Generate images for prompts.

        Args:
            prompt: one prompt or a list. ``""`` is allowed: it is the unconditional (null) prompt the
                model was trained with under condition dropout, so it samples from the whole data.
            options: the keyword arguments of :class:`pipelines.options.GenerationOptions` (diffusers'
                names: ``negative_prompt``, ``num_inference_steps``, ``guidance_scale`` (None =
                ``DEFAULT_GUIDANCE_SCALE``), ``height``, ``width``, ``num_images_per_prompt``, ``seed``,
                ``output_type``, ...), and classifier guidance: ``classifier`` (a
                :class:`diffusion.classifier.NoisyLatentClassifier` trained on this pipeline's latents and
                schedule, or its directory), ``classifier_labels`` (class ids or names of its attribute, one
                or one per prompt) and ``classifier_scale``.

        Returns:
            :class:`PipelineOutput` whose ``.images`` hold ``len(prompts) * num_images_per_prompt`` images.
        """
        prompts = as_prompts(prompt)
        run = self.options(options)
        negatives = as_negatives(run.negative_prompt, len(prompts))
        size, count = self.check_call(run, len(prompts))
        times = run.num_images_per_prompt
        steering = self.classifier_guidance(run, len(prompts))

        def chunk(rows: range) -> ChunkInputs:
            cond, uncond = self.text_conditions(prompts, negatives, run, rows)
            return self.latent_shape(len(rows), size), cond, uncond, chunk_steering(steering, rows, times)

        return self.generate(run, count, chunk)


class ClassToImage(LatentPipeline):
    """Class labels -> class-conditional diffusion sampler, guided against the null class -> decoder.

    It runs class-only U-Nets (trained with ``model.context_dim: 0``; no text encoder is loaded) and
    class + text ones. The latter get the null prompt "" in both branches of guidance, (class, "")
    against (null, ""): training drops the caption and the class independently
    (``diffusion.cond_drop_prob``), so it saw both pairs.
    """

    needs_text = False
    roles = frozenset({"diffusion", "steering"})

    @property
    def num_classes(self) -> int:
        return self.model.unet.config.num_classes

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The name of each class (index = dataset label) saved with the pipeline, or None."""
        return self.model.class_names

    @torch.no_grad()
    def __call__(self, class_labels: Labels, **options: Any) -> PipelineOutput:
        """Generate images of classes.

        Args:
            class_labels: one dataset label or a list / (B,) tensor of them, each in [0, num_classes);
                names of :attr:`class_names` work too when the pipeline has them.
            options: as in :meth:`TextToImage.__call__` (no ``negative_prompt``: the unconditional branch
                is the null class); ``num_images_per_prompt`` is images per label, and ``classifier_labels``
                one for every class label or one per class label.

        Returns:
            :class:`PipelineOutput`, label by label.
        """
        labels = self.check_labels(class_labels)
        run = self.options(options)
        size, count = self.check_call(run, len(labels), "class_labels")
        times = run.num_images_per_prompt
        steering = self.classifier_guidance(run, len(labels))

        def chunk(rows: range) -> ChunkInputs:
            cond = self.null_text(len(rows))
            return (self.latent_shape(len(rows), size), cond, cond,
                    dict(class_labels=image_rows(rows, times, labels), **chunk_steering(steering, rows, times)))

        return self.generate(run, count, chunk)

    def check_labels(self, class_labels: Labels) -> Tensor:
        """Labels (ids, or names of :attr:`class_names`) as a non-empty (B,) int64 tensor in [0, num_classes)."""
        return label_ids("class_labels", class_labels, self.num_classes, self.class_names)

    def null_text(self, batch: int) -> TextEmbedding | None:
        """The null prompt "" for each row, for a U-Net that also takes text (None otherwise)."""
        if self.model.text_encoder is None:
            return None
        empty = self.model.encode_prompts([""])
        return TextEmbedding(empty.states.expand(batch, -1, -1), empty.mask.expand(batch, -1))
