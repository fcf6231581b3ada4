"""Pipelines chain the text encoder, a generator and the autoencoder's decoder.

    from pipelines import TextToImage
    pipe = TextToImage.from_pretrained("runs/emoji32_diffusion")      # run directory or its pipeline/
    result = pipe(["dog face", "red apple"], num_images_per_prompt=2, seed=0)
    result.images[0].save("dog.png")                                   # 4 PIL images, prompt by prompt

Classes (all with ``from_pretrained``, ``save_pretrained``, ``.to(device)`` and a call that returns a
:class:`PipelineOutput` with ``.images``):

- :class:`TextToImage`: prompts -> latent diffusion with classifier-free guidance -> decoder.
- :class:`ClassToImage`: class labels (or names) -> class-conditional latent diffusion -> decoder.
  Both also take classifier guidance: ``classifier=``, ``classifier_labels=``, ``classifier_scale=``.
- :class:`ImageToImage`, :class:`Inpaint`: an input image (and mask) as the starting point.
- :class:`TokensToImage`: prompts -> token prior (AR or MaskGIT) -> VQ decoder, same call as TextToImage.
  ImageToImage and Inpaint on a token prior give :class:`TokenImageToImage` and :class:`TokenInpaint`.
- :func:`load_pipeline`: the right class for a directory, from its ``pipeline.json`` kind.

The command line is ``python -m pipelines.generate RUN_OR_PIPELINE_DIR "a prompt" -n 4 -o grid.png``.

Modules:

- ``pipelines.options``: :class:`~pipelines.options.GenerationOptions`, the keyword arguments every call
  shares (names, defaults, help, CLI flags), and the one place that checks them (``check_options``),
  prompts (``as_prompts``, ``as_negatives``), class labels (``label_ids``) and image sizes (``check_size``).
- ``pipelines.base``: the pipeline base class (loading by kind, ``.to``, precision), outputs, progress.
- ``pipelines.latent``: what the diffusion pipelines share: sizes, conditions, classifier guidance, sampling.
- ``pipelines.text_to_image``, ``pipelines.image_to_image``, ``pipelines.tokens_to_image``,
  ``pipelines.token_editing``: the pipelines.
- ``pipelines.inputs``: user images and masks -> tensors (ImageToImage, Inpaint).
- ``pipelines.lora``: LoRA adapters on a pipeline's network (``pipe.load_lora(path, scale)``, ``unload_lora``).
- ``pipelines.loading``: ``load_pipeline`` (the class for a directory), ``pipeline_for`` (for a bundle).
- ``pipelines.export``: a latent diffusion pipeline as a diffusers Stable Diffusion folder
  (``save_pretrained(path, format="diffusers")``, ``python -m pipelines.export``).
- ``pipelines.generate``: the command line; ``pipelines.demo``: train both stages briefly and render a grid.
- ``pipelines.png_info``: the settings inside every PNG written (a ``parameters`` chunk) and the call that
  makes its image again (``python -m pipelines.generate --from-png IMAGE.png``).
- ``pipelines.app``: the local web app (``python -m pipelines.app RUN_OR_PIPELINE_DIR``, gradio, an optional
  extra); ``pipelines.app_calls``: its controls, requests and files, without gradio.
"""
from pipelines.base import Pipeline, PipelineKindError, PipelineOutput
from pipelines.image_to_image import ImageToImage, Inpaint
from pipelines.loading import load_pipeline
from pipelines.text_to_image import ClassToImage, TextToImage
from pipelines.token_editing import TokenImageToImage, TokenInpaint
from pipelines.tokens_to_image import TokensToImage

__all__ = [
    "ClassToImage",
    "ImageToImage",
    "Inpaint",
    "Pipeline",
    "PipelineKindError",
    "PipelineOutput",
    "TextToImage",
    "TokenImageToImage",
    "TokenInpaint",
    "TokensToImage",
    "load_pipeline",
]
