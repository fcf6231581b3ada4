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
"""
from __future__ import annotations

import torch
from diffusion.samplers import Callback
from pipelines.base import PipelineOutput
from pipelines.inputs import ImageInput, image_batch, image_size, keep_mask, mask_batch
from pipelines.latent import LatentPipeline
from pipelines.options import RunOptions, as_negatives, as_prompts, repeat_tensor


class ImageToImage(LatentPipeline):
    """Input image -> latents -> noised to ``strength`` -> guided sampler -> decoder."""

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image: ImageInput, *, strength: float = 0.8,
                 negative_prompt: str | list[str] | None = None, num_inference_steps: int = 20,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0, sampler: str = "dpmpp_2m",
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, seed: int | None = None, callback: Callback | None = None,
                 progress: bool = True, output_type: str = "pil") -> PipelineOutput:
        """Re-generate images towards prompts.

        Args:
            prompt: one prompt or a list ("" is the unconditional prompt).
            image: one image for all prompts or one per prompt: PIL, list of PIL, or a tensor
                (3, H, W) / (N, 3, H, W) in [0, 1]. Its size must be a multiple of
                :attr:`size_multiple` unless ``height``/``width`` resize it.
            strength: in [0, 1]; runs ``int(num_inference_steps * strength)`` steps from the input
                noised to that point. 0 returns the input's reconstruction (no step, no callback).
            height, width: resize the input to this size first (default: keep its size).
            The other arguments are those of :meth:`pipelines.TextToImage.__call__`.
        """
        prompts = as_prompts(prompt)
        run = RunOptions(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale, sampler=sampler, height=height, width=width,
                         num_images_per_prompt=num_images_per_prompt, generator=generator, seed=seed,
                         callback=callback, progress=progress, output_type=output_type)
        strength = self.check_strength(strength, run)
        negatives = as_negatives(negative_prompt, len(prompts))
        latents = self.encode_inputs(image_batch(image, len(prompts), height, width), len(prompts), run)
        cond, uncond = self.text_conditions(prompts, negatives, run)
        out = self.sample(tuple(latents.shape), run, cond, uncond, strength=strength, init_latents=latents)
        return self.finish(out, run)


class Inpaint(LatentPipeline):
    """Image + mask -> regenerate the masked region, keep the rest (in latent space, exactly)."""

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image: ImageInput, mask_image: ImageInput, *,
                 strength: float = 1.0, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 20, guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                 sampler: str = "dpmpp_2m", height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None, seed: int | None = None,
                 callback: Callback | None = None, progress: bool = True, output_type: str = "pil") -> PipelineOutput:
        """Fill the masked region of images according to prompts.

        Args:
            prompt: one prompt or a list ("" is the unconditional prompt).
            image: as in :meth:`ImageToImage.__call__`.
            mask_image: one mask for all prompts or one per prompt, the size of ``image``: a PIL image
                (converted to "L") or a tensor (H, W) / (1, H, W) / (N, 1, H, W) in [0, 1]. White / 1
                pixels are regenerated. A latent cell is regenerated when any of its pixels is marked.
            strength: in [0, 1]; below 1 the masked region starts from the noised input instead of
                noise (0 returns the input's reconstruction).
            The other arguments are those of :meth:`pipelines.TextToImage.__call__`.
        """
        prompts = as_prompts(prompt)
        run = RunOptions(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale, sampler=sampler, height=height, width=width,
                         num_images_per_prompt=num_images_per_prompt, generator=generator, seed=seed,
                         callback=callback, progress=progress, output_type=output_type)
        strength = self.check_strength(strength, run)
        negatives = as_negatives(negative_prompt, len(prompts))
        pixels = image_batch(image, len(prompts), height, width)
        masks = mask_batch(mask_image, len(prompts), image_size(image), height, width)
        latents = self.encode_inputs(pixels, len(prompts), run)
        keep = repeat_tensor(keep_mask(masks, self.model.autoencoder.downsample_factor), len(prompts),
                             num_images_per_prompt).to(latents.device)
        cond, uncond = self.text_conditions(prompts, negatives, run)
        out = self.sample(tuple(latents.shape), run, cond, uncond, strength=strength, init_latents=latents,
                          mask=keep, known_latents=latents)
        return self.finish(out, run)
