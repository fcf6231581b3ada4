"""The autoregressive pipeline: text (or class) -> GPT prior over code indices -> VQ decoder.

    pipe = TokensToImage.from_pretrained("runs/emoji32_quick_prior")
    images = pipe(["dog face", "red apple"], num_images_per_prompt=2, seed=0).images

It takes the same call as :class:`pipelines.TextToImage`, so code can swap the two generators. The
arguments that only mean something to a diffusion sampler are still checked the same way (a bad
value fails in both pipelines alike) and are then ignored, with a warning when they differ from
their defaults: ``num_inference_steps`` (the prior always samples one token per grid cell),
``sampler`` and ``guidance_rescale``. A ``callback`` is refused, since there are no denoising
steps to report and silently never calling it would hide that; so is a ``classifier`` (classifier
guidance steers denoising steps). Which option applies where is the ``only=`` metadata of
:class:`pipelines.options.GenerationOptions`. The image size is fixed by the prior's token grid:
``height``/``width`` may only repeat it.

The generator's uniforms are drawn on its own device and moved to the prior's
(:func:`prior.sampling.draw`), so a seed gives the same tokens on CPU and GPU (up to float rounding).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from pipelines.base import Pipeline, PipelineOutput, to_output
from pipelines.options import GenerationOptions, Labels, PipelineFacts, as_negatives, as_prompts, label_ids, repeat_rows
from prior.token_prior import PIPELINE_KIND, TokenPrior
from prior.transformer import Condition, Prefix

SAMPLING_OPTIONS = ("guidance_tokens", "temperature", "top_k", "top_p")  # None: the pipeline's saved default


class TokensToImage(Pipeline):
    """Text or class condition -> AR token prior with classifier-free guidance -> VQ decoder.

    Args:
        model: the :class:`prior.token_prior.TokenPrior` bundle (autoencoder, GPT, text encoder config,
            class names, default sampling settings).
    """

    kind = PIPELINE_KIND

    def __init__(self, model: TokenPrior) -> None:
        self.model = model

    @classmethod
    def _load(cls, directory: Path) -> TokensToImage:
        return cls(TokenPrior.from_pretrained(directory))

    @property
    def default_guidance_scale(self) -> float:
        """What ``guidance_scale=None`` means: the guidance saved with the pipeline."""
        return self.model.sampling.guidance

    @property
    def facts(self) -> PipelineFacts:
        return PipelineFacts(type(self).__name__, frozenset({"tokens", "text"}), self.default_guidance_scale)

    @property
    def image_size(self) -> int:
        """H = W: the prior's token grid times the autoencoder's downsampling factor."""
        return self.model.prior.config.grid_size * self.model.autoencoder.downsample_factor

    def __call__(self, prompt: str | list[str] | None = None, *, class_labels: Labels | None = None,
                 **options: Any) -> PipelineOutput:
        """Generate images for prompts (or class labels).

        Args:
            prompt: one prompt or a list. A text prior encodes it; a class prior looks it up among its
                class names. ``""`` is the unconditional prompt (the prior's learned null condition).
            class_labels: instead of ``prompt``, for a class prior: (B,) dataset labels.
            options: as in :meth:`pipelines.TextToImage.__call__`, where ``negative_prompt`` is a text
                prior's unconditional branch, ``guidance_scale`` s in u + s (c - u) on the logits (None =
                the pipeline's saved default), ``height``/``width`` None or the fixed :attr:`image_size`,
                ``progress`` a bar over the tokens and ``output_type="latent"`` the code indices (B, h, w);
                plus the token filters ``guidance_tokens``, ``temperature``, ``top_k``, ``top_p`` (see
                :class:`prior.sampling.SamplingConfig`; None = the saved defaults). The diffusion-only
                options are warned about and ignored, a callback and classifier guidance are refused.
        """
        run = self.options(options)
        self._check_size(run)
        cond, uncond = self._prefixes(prompt, class_labels, run.negative_prompt, run.num_images_per_prompt)
        with self._token_progress(run.progress), self.autocast():
            tokens = self.model.sample(cond, uncond, self._settings(run), run.make_generator())
        if run.output_type == "latent":
            return PipelineOutput(rearrange(tokens, "b (h w) -> b h w", h=self.model.prior.config.grid_size))
        return to_output(self.model.decode(tokens), run.output_type)

    # ---------------------------------------------------------------------------------- checks
    def _check_size(self, run: GenerationOptions) -> None:
        for name in ("height", "width"):
            value = getattr(run, name)
            if value is not None and value != self.image_size:
                raise ValueError(f"{name}={value}: this prior's token grid fixes the image size at "
                                 f"{self.image_size}x{self.image_size}; leave {name} out")

    def _settings(self, run: GenerationOptions) -> dict[str, Any]:
        """The sampling settings: the call's, else the pipeline's saved defaults."""
        given = {name: getattr(run, name) for name in SAMPLING_OPTIONS if getattr(run, name) is not None}
        return dataclasses.asdict(dataclasses.replace(self.model.sampling, guidance=run.guidance_scale, **given))

    # ---------------------------------------------------------------------------------- conditions
    def _prefixes(self, prompt: str | list[str] | None, class_labels: Labels | None,
                  negative_prompt: str | list[str] | None, times: int) -> tuple[Prefix, Prefix | None]:
        """The conditional rows and the unconditional rows (None for an unconditional prior)."""
        prior = self.model.prior
        if (prompt is None) == (class_labels is None):
            raise ValueError("give prompt or class_labels (class_labels only for a class prior), not both")
        if class_labels is not None:
            if negative_prompt is not None:
                raise ValueError("negative_prompt needs a text prior; a class prior's only negative is the null class")
            labels = self._check_labels(class_labels).repeat_interleave(times).to(self.device)
            return prior.prefix(Condition(labels=labels)), prior.null_prefix(len(labels))
        prompts = as_prompts(prompt)
        negatives = as_negatives(negative_prompt, len(prompts))
        cond = self._embed(repeat_rows(prompts, times))
        if prior.config.condition == "none":
            return cond, None
        if negatives is None:
            return cond, prior.null_prefix(len(prompts) * times)
        if prior.config.condition != "text":
            raise ValueError("negative_prompt needs a text prior; a class prior's only negative is the null class")
        return cond, self._embed(repeat_rows(negatives * len(prompts) if len(negatives) == 1 else negatives, times))

    def _check_labels(self, class_labels: Labels) -> Tensor:
        config = self.model.prior.config
        if config.condition != "class":
            raise ValueError(f"class_labels need a class prior; this prior is conditioned on {config.condition!r}, "
                             f"give prompt instead")
        return label_ids("class_labels", class_labels, config.num_classes, self.model.class_names)

    def _embed(self, prompts: list[str]) -> Prefix:
        """Prompts -> prefix rows; "" rows get the learned null condition, as in training's dropout."""
        prior, kind = self.model.prior, self.model.prior.config.condition
        empty = torch.tensor([p == "" for p in prompts], device=self.device)
        if kind == "none":
            if not bool(empty.all()):
                raise ValueError("prompt: this prior is unconditional; pass \"\" prompts")
            return prior.null_prefix(len(prompts))
        if kind == "class":  # prompts name classes; "" rows get any class, which the null then replaces
            stand_in = next((n for n in self.model.class_names or [] if n is not None), None)
            named = [p or stand_in or "" for p in prompts]
            labels = self._check_labels(named) if not bool(empty.all()) else torch.zeros(len(prompts), dtype=torch.long)
            return prior.prefix(self.model.condition(labels=labels), drop=empty)
        return prior.prefix(self.model.condition(prompts), drop=empty)

    @contextmanager
    def _token_progress(self, progress: bool) -> Iterator[None]:
        """A tqdm bar over the tokens: the prior's output head runs once per sampled token."""
        if not progress:
            yield
            return
        bar = tqdm(total=self.model.prior.config.num_tokens, unit="token")
        def count(module: Any, inputs: Any, output: Tensor) -> None:  # returning bar.update's bool would
            bar.update(1)                                              # replace the head's output
        handle = self.model.prior.head.register_forward_hook(count)
        try:
            yield
        finally:
            handle.remove()
            bar.close()
