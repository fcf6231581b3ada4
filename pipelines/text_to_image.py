"""Text-to-image and class-to-image latent diffusion pipelines.

    pipe = TextToImage.from_pretrained("runs/emoji32_diffusion")        # a run directory or its pipeline/
    images = pipe(["dog face", "red apple"], num_images_per_prompt=2, seed=0).images   # 4 PIL images

Both sample with classifier-free guidance: TextToImage guides the prompt against the negative prompt
(default: the null prompt ""), ClassToImage guides the class against the null class.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from common.text_encoder import TextEmbedding
from diffusion.samplers import Callback
from pipelines.base import PipelineOutput
from pipelines.latent import LatentPipeline
from pipelines.options import RunOptions, as_negatives, as_prompts


class TextToImage(LatentPipeline):
    """Text encoder -> diffusion sampler with classifier-free guidance -> autoencoder decoder."""

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 20, guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                 sampler: str = "dpmpp_2m", height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None, seed: int | None = None,
                 callback: Callback | None = None, progress: bool = True, output_type: str = "pil") -> PipelineOutput:
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

        Returns:
            :class:`PipelineOutput` whose ``.images`` hold ``len(prompts) * num_images_per_prompt`` images.
        """
        prompts = as_prompts(prompt)
        run = RunOptions(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale, sampler=sampler, height=height, width=width,
                         num_images_per_prompt=num_images_per_prompt, generator=generator, seed=seed,
                         callback=callback, progress=progress, output_type=output_type)
        negatives = as_negatives(negative_prompt, len(prompts))
        shape = self.latent_shape(len(prompts) * num_images_per_prompt, height, width)
        cond, uncond = self.text_conditions(prompts, negatives, run)
        return self.finish(self.sample(shape, run, cond, uncond), run)


class ClassToImage(LatentPipeline):
    """Class labels -> class-conditional diffusion sampler, guided against the null class -> decoder.

    A U-Net conditioned on text as well gets the null prompt "" in both branches of guidance.
    """

    needs_text = False

    @property
    def num_classes(self) -> int:
        return self.model.unet.config.num_classes

    @torch.no_grad()
    def __call__(self, class_labels: int | Sequence[int] | Tensor, *, num_inference_steps: int = 20,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0, sampler: str = "dpmpp_2m",
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, seed: int | None = None, callback: Callback | None = None,
                 progress: bool = True, output_type: str = "pil") -> PipelineOutput:
        """Generate images of classes.

        Args:
            class_labels: one dataset label or a list / (B,) tensor of them, each in [0, num_classes).
            num_images_per_prompt: images per label (the name is shared with the text pipelines).
            The other arguments are those of :meth:`TextToImage.__call__`; guidance_scale=None is 4.0.

        Returns:
            :class:`PipelineOutput`, label by label.
        """
        labels = self.check_labels(class_labels)
        run = RunOptions(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale, sampler=sampler, height=height, width=width,
                         num_images_per_prompt=num_images_per_prompt, generator=generator, seed=seed,
                         callback=callback, progress=progress, output_type=output_type)
        labels = labels.repeat_interleave(num_images_per_prompt)
        shape = self.latent_shape(len(labels), height, width)
        cond = self.null_text(len(labels))
        return self.finish(self.sample(shape, run, cond, cond, class_labels=labels), run)

    def check_labels(self, class_labels: int | Sequence[int] | Tensor) -> Tensor:
        """Labels as a non-empty (B,) int64 tensor, each in [0, num_classes)."""
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels)
        if labels.ndim != 1 or labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be an int or a non-empty list of ints, got {class_labels!r}")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"class_labels must be in [0, {self.num_classes}), got {bad[0].item()}")
        return labels.long()

    def null_text(self, batch: int) -> TextEmbedding | None:
        """The null prompt "" for each row, for a U-Net that also takes text (None otherwise)."""
        if self.model.text_encoder is None:
            return None
        empty = self.model.encode_prompts([""])
        return TextEmbedding(empty.states.expand(batch, -1, -1), empty.mask.expand(batch, -1))

