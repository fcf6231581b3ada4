"""Image-to-image (SDEdit) and inpainting pipelines over a text-to-image latent diffusion directory.

    img2img = ImageToImage.from_pretrained("runs/emoji32_diffusion")
    out = img2img("dog face", image, strength=0.6, seed=0).images[0]
    inpaint = Inpaint.from_pipe(img2img)                      # the same components, no reload
    out = inpaint("red apple", image, mask, seed=0).images[0]   # white mask pixels are regenerated

Both load the same directories as :class:`pipelines.TextToImage` (diffusers' convention: one
checkpoint, several pipelines). The input is encoded to latents once; ``strength`` is the fraction
of the sampler's trajectory re-run from the noised input latents (0 returns the input, 1 keeps
almost nothing of it). Inpainting keeps the unmasked latents exactly (they are put back into every
x0 estimate), so outside the mask the result is the autoencoder's reconstruction of the input.

On a token prior's directory (or pipeline), both give their token variants with the same call:
:class:`pipelines.token_editing.TokenImageToImage` and :class:`~pipelines.token_editing.TokenInpaint`.
"""
from __future__ import annotations

from typing import Any

import torch

from pipelines.base import PipelineOutput
from pipelines.inputs import ImageInput, image_batch, image_size, keep_mask, mask_batch
from pipelines.latent import ChunkInputs, LatentPipeline, image_rows
from pipelines.options import as_negatives, as_prompts
from pipelines.token_editing import TokenImageToImage, TokenInpaint


class ImageToImage(LatentPipeline):
    """Input image -> latents -> noised to ``strength`` -> guided sampler -> decoder."""

    roles = frozenset({"diffusion", "text", "image"})
    default_strength = 0.8
    variants = {TokenImageToImage.kind: TokenImageToImage}

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image: ImageInput, **options: Any) -> PipelineOutput:
        """Re-generate images towards prompts.

        Args:
            prompt: one prompt or a list ("" is the unconditional prompt).
            image: one image for all prompts or one per prompt: PIL (any mode), numpy array or tensor
                (3, H, W) / (N, 3, H, W), or a list of them (:mod:`pipelines.inputs` says how each kind
                is converted). Its size must be a multiple of
                :attr:`size_multiple` unless ``height``/``width`` resize it.
            options: as in :meth:`pipelines.TextToImage.__call__` (no classifier guidance), plus
                ``strength`` in [0, 1] (default 0.8): runs ``int(num_inference_steps * strength)`` steps
                from the input noised to that point; 0 returns the input's reconstruction (no step, no
                callback). ``height``/``width`` resize the input first (default: keep its size).
        """
        prompts = as_prompts(prompt)
        run = self.options(options)
        strength = self.check_strength(run)
        negatives = as_negatives(run.negative_prompt, len(prompts))
        count = self.check_inputs_memory(run, image, len(prompts))
        latents = self.encode_inputs(image_batch(image, len(prompts), run.height, run.width), run)

        def chunk(rows: range) -> ChunkInputs:
            cond, uncond = self.text_conditions(prompts, negatives, run, rows)
            init = image_rows(rows, run.num_images_per_prompt, latents).contiguous()
            return tuple(init.shape), cond, uncond, dict(init_latents=init)

        return self.generate(run, count, chunk, strength)


class Inpaint(LatentPipeline):
    """Image + mask -> regenerate the masked region, keep the rest (in latent space, exactly)."""

    roles = frozenset({"diffusion", "text", "image"})
    default_strength = 1.0
    variants = {TokenInpaint.kind: TokenInpaint}

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image: ImageInput, mask_image: ImageInput,
                 **options: Any) -> PipelineOutput:
        """Fill the masked region of images according to prompts.

        Args:
            prompt: one prompt or a list ("" is the unconditional prompt).
            image: as in :meth:`ImageToImage.__call__`.
            mask_image: one mask for all prompts or one per prompt, the size of ``image``: a PIL image,
                numpy array or tensor (H, W) / (1, H, W) / (N, 1, H, W). White / 1 pixels are
                regenerated; in a mask whose alpha varies, its opaque pixels are (:mod:`pipelines.inputs`).
                A latent cell is regenerated when any of its pixels is marked.
            options: as in :meth:`ImageToImage.__call__`; ``strength`` defaults to 1.0, and below 1 the
                masked region starts from the noised input instead of noise.
        """
        prompts = as_prompts(prompt)
        run = self.options(options)
        strength = self.check_strength(run)
        negatives = as_negatives(run.negative_prompt, len(prompts))
        count = self.check_inputs_memory(run, image, len(prompts))
        pixels = image_batch(image, len(prompts), run.height, run.width)
        masks = mask_batch(mask_image, len(prompts), image_size(image), run.height, run.width)
        latents = self.encode_inputs(pixels, run)
        keep = keep_mask(masks, self.model.autoencoder.downsample_factor).to(latents.device)

        def chunk(rows: range) -> ChunkInputs:
            cond, uncond = self.text_conditions(prompts, negatives, run, rows)
            init = image_rows(rows, run.num_images_per_prompt, latents).contiguous()
            mask = image_rows(rows, run.num_images_per_prompt, keep).contiguous()
            return tuple(init.shape), cond, uncond, dict(init_latents=init, mask=mask, known_latents=init)

        return self.generate(run, count, chunk, strength)
