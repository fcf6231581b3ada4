"""``load_pipeline(path)``: the right pipeline class for whatever a directory holds.

    pipe = load_pipeline("runs/emoji32_diffusion")   # TextToImage, ClassToImage or TokensToImage
    images = pipe("dog face", seed=0).images          # (ClassToImage takes class labels instead)

``pipeline.json``'s kind decides: "text_to_image" gives :class:`TextToImage`, or
:class:`ClassToImage` when the bundle has no text encoder (a class-conditional U-Net);
"tokens_to_image" gives :class:`TokensToImage`. ImageToImage and Inpaint run the same
"text_to_image" directories: load them by name, or convert with ``ImageToImage.from_pipe(pipe)``.
:func:`pipeline_for` picks the class for a bundle in memory (training's sample grids).
"""
from __future__ import annotations

from pathlib import Path

from diffusion.latent_diffusion import LatentDiffusion
from pipelines.base import CLASS_FOR_KIND, Pipeline, PipelineKindError, resolve
from pipelines.latent import LatentPipeline
from pipelines.text_to_image import ClassToImage, TextToImage
from pipelines.tokens_to_image import TokensToImage


def pipeline_class(kind: str, meta: dict) -> type[Pipeline]:
    """The default pipeline class of a ``pipeline.json`` record."""
    if kind == TokensToImage.kind:
        return TokensToImage
    if kind == TextToImage.kind:
        return TextToImage if meta.get("text_encoder") is not None else ClassToImage
    raise PipelineKindError(f"unknown pipeline kind {kind!r}; known kinds: {', '.join(sorted(CLASS_FOR_KIND))}")


def load_pipeline(path: str | Path) -> Pipeline:
    """Load a pipeline directory, or the ``pipeline/`` of a training run directory, as its default class."""
    directory, kind, meta = resolve(path)
    return pipeline_class(kind, meta).from_pretrained(directory)


def pipeline_for(model: LatentDiffusion) -> LatentPipeline:
    """The default pipeline of an in-memory bundle (what training's sample grids run): TextToImage, or
    ClassToImage for a U-Net without text."""
    return TextToImage(model) if model.text_encoder is not None else ClassToImage(model)
