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

from pathlib import Path

import torch
from torch import Tensor

from common.text_encoder import TextEmbedding
from diffusion.classifier import NoisyLatentClassifier
from diffusion.samplers import Callback
from pipelines.base import PipelineOutput
from pipelines.latent import LatentPipeline
from pipelines.options import Labels, RunOptions, as_negatives, as_prompts, label_ids


class TextToImage(LatentPipeline):
    """Text encoder -> diffusion sampler with classifier-free guidance -> autoencoder decoder."""

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 20, guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                 sampler: str = "dpmpp_2m", height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None, seed: int | None = None,
                 callback: Callback | None = None, progress: bool = True, output_type: str = "pil",
                 classifier: NoisyLatentClassifier | str | Path | None = None, classifier_labels: Labels | None = None,
                 classifier_scale: float = 1.0) -> PipelineOutput:
        """Generate images for prompts.

        Args:
            prompt: one prompt or a list. ``""`` is allowed: it is the unconditional (null) prompt the
                model was trained with under condition dropout, so it samples from the whole data.
            negative_prompt: replaces ``""`` in the unconditional branch of guidance; one for all
                prompts or one per prompt. Unused at ``guidance_scale=1``.
            num_inference_steps: sampler steps (model evaluations, twice batched with guidance).
            guidance_scale: w in u + w (c - u): 1 = conditional model only, 0 = unconditional only,
                larger follows the prompt more closely; None = 4.0.
            guidance_rescale: phi in [0, 1], rescales the guided prediction's std towards the
                conditional one (Lin et al. 2023), which tames over-saturation at high w.
            sampler: one of ``diffusion.samplers.SAMPLERS`` ("ddim", "ddpm", "dpmpp_2m", "euler").
            height, width: output size in pixels, multiples of :attr:`size_multiple`; default: the
                autoencoder's training resolution. Non-square sizes work (the U-Net is convolutional).
            num_images_per_prompt: images per prompt; the results come prompt by prompt.
            generator: the only source of randomness; a CPU generator draws the same noise on any device.
            seed: shorthand for ``generator=torch.Generator().manual_seed(seed)`` (not both).
            callback: ``callback(step_index, latents, x0_hat)`` after each sampler step, with the
                current scaled latents (B, D, h, w) and the model's clean estimate of them.
            progress: show a tqdm bar over the sampler steps (on stderr).
            output_type: "pil" (list of PIL images), "pt" (tensor (B, 3, H, W) in [0, 1]) or "latent".
            classifier: classifier guidance: a :class:`diffusion.classifier.NoisyLatentClassifier` trained
                on this pipeline's latents and schedule, or the path of its directory (or of its training
                run directory, holding ``classifier/``). Its gradient steers every step towards
                ``classifier_labels``; it works with any ``guidance_scale`` (0 leaves it alone in charge).
            classifier_labels: what to steer towards, as class ids or names of the classifier's
                attribute (e.g. "red" for a colour classifier): one for every prompt, or a list with one
                per prompt. Needed with ``classifier``.
            classifier_scale: the classifier guidance scale, finite and >= 0; 0 gives exactly the images
                of a call without a classifier.

        Returns:
            :class:`PipelineOutput` whose ``.images`` hold ``len(prompts) * num_images_per_prompt`` images.
        """
        prompts = as_prompts(prompt)
        run = RunOptions(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale, sampler=sampler, height=height, width=width,
                         num_images_per_prompt=num_images_per_prompt, generator=generator, seed=seed,
                         callback=callback, progress=progress, output_type=output_type)
        negatives = as_negatives(negative_prompt, len(prompts))
        shape = self.model.latent_shape(len(prompts) * num_images_per_prompt, height, width)
        steering = self.classifier_guidance(classifier, classifier_labels, classifier_scale, len(prompts),
                                            num_images_per_prompt)
        cond, uncond = self.text_conditions(prompts, negatives, run)
        return self.finish(self.sample(shape, run, cond, uncond, **steering), run)


class ClassToImage(LatentPipeline):
    """Class labels -> class-conditional diffusion sampler, guided against the null class -> decoder.

    It runs class-only U-Nets (trained with ``model.context_dim: 0``; no text encoder is loaded) and
    class + text ones. The latter get the null prompt "" in both branches of guidance, (class, "")
    against (null, ""): training drops the caption and the class independently
    (``diffusion.cond_drop_prob``), so it saw both pairs.
    """

    needs_text = False

    @property
    def num_classes(self) -> int:
        return self.model.unet.config.num_classes

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The name of each class (index = dataset label) saved with the pipeline, or None."""
        return self.model.class_names

    @torch.no_grad()
    def __call__(self, class_labels: Labels, *, num_inference_steps: int = 20,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0, sampler: str = "dpmpp_2m",
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, seed: int | None = None, callback: Callback | None = None,
                 progress: bool = True, output_type: str = "pil",
                 classifier: NoisyLatentClassifier | str | Path | None = None, classifier_labels: Labels | None = None,
                 classifier_scale: float = 1.0) -> PipelineOutput:
        """Generate images of classes.

        Args:
            class_labels: one dataset label or a list / (B,) tensor of them, each in [0, num_classes);
                names of :attr:`class_names` work too when the pipeline has them.
            num_images_per_prompt: images per label (the name is shared with the text pipelines).
            classifier_labels: one for every class label, or one per class label.
            The other arguments are those of :meth:`TextToImage.__call__`; guidance_scale=None is 4.0.

        Returns:
            :class:`PipelineOutput`, label by label.
        """
        labels = self.check_labels(class_labels)
        run = RunOptions(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale, sampler=sampler, height=height, width=width,
                         num_images_per_prompt=num_images_per_prompt, generator=generator, seed=seed,
                         callback=callback, progress=progress, output_type=output_type)
        shape = self.model.latent_shape(len(labels) * num_images_per_prompt, height, width)
        steering = self.classifier_guidance(classifier, classifier_labels, classifier_scale, len(labels),
                                            num_images_per_prompt)
        labels = labels.repeat_interleave(num_images_per_prompt)
        cond = self.null_text(len(labels))
        return self.finish(self.sample(shape, run, cond, cond, class_labels=labels, **steering), run)

    def check_labels(self, class_labels: Labels) -> Tensor:
        """Labels (ids, or names of :attr:`class_names`) as a non-empty (B,) int64 tensor in [0, num_classes)."""
        return label_ids("class_labels", class_labels, self.num_classes, self.class_names)

    def null_text(self, batch: int) -> TextEmbedding | None:
        """The null prompt "" for each row, for a U-Net that also takes text (None otherwise)."""
        if self.model.text_encoder is None:
            return None
        empty = self.model.encode_prompts([""])
        return TextEmbedding(empty.states.expand(batch, -1, -1), empty.mask.expand(batch, -1))

