"""The autoregressive pipeline: text (or class) -> GPT prior over code indices -> VQ decoder.

    pipe = TokensToImage.from_pretrained("runs/emoji32_quick_prior")
    images = pipe(["dog face", "red apple"], num_images_per_prompt=2, seed=0).images

It takes the same call as :class:`pipelines.TextToImage`, so code can swap the two generators. The
arguments that only mean something to a diffusion sampler are still checked the same way (a bad
value fails in both pipelines alike) and are then ignored, with a warning when they differ from
their defaults: ``num_inference_steps`` (the prior always samples one token per grid cell),
``sampler`` and ``guidance_rescale``. A ``callback`` is refused, since there are no denoising
steps to report and silently never calling it would hide that; so is a ``classifier`` (classifier
guidance steers denoising steps). The image size is fixed by the prior's token grid:
``height``/``width`` may only repeat it.

The generator's uniforms are drawn on its own device and moved to the prior's
(:func:`prior.sampling.draw`), so a seed gives the same tokens on CPU and GPU (up to float rounding).
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from diffusion.samplers import Callback
from pipelines.base import Pipeline, PipelineOutput, to_output
from pipelines.options import RunOptions, as_negatives, as_prompts, check_int, check_number, repeat_rows
from prior.generate import PIPELINE_KIND, TokenPrior
from prior.sampling import sample_tokens
from prior.transformer import Condition, Prefix

DIFFUSION_ONLY = {"num_inference_steps": 20, "sampler": "dpmpp_2m", "guidance_rescale": 0.0}
CLASSIFIER_GUIDANCE = {"classifier": None, "classifier_labels": None, "classifier_scale": 1.0}


class TokensToImage(Pipeline):
    """Text or class condition -> AR token prior with classifier-free guidance -> VQ decoder.

    Args:
        model: the :class:`prior.generate.TokenPrior` bundle (autoencoder, GPT, text encoder config,
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
    def image_size(self) -> int:
        """H = W: the prior's token grid times the autoencoder's downsampling factor."""
        return self.model.prior.config.grid_size * self.model.autoencoder.downsample_factor

    def __call__(self, prompt: str | list[str] | None = None, *, class_labels: Sequence[int] | Tensor | None = None,
                 negative_prompt: str | list[str] | None = None, num_inference_steps: int = 20,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0, sampler: str = "dpmpp_2m",
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, seed: int | None = None, callback: Callback | None = None,
                 progress: bool = True, output_type: str = "pil", classifier: Any = None,
                 classifier_labels: Any = None, classifier_scale: float = 1.0, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None) -> PipelineOutput:
        """Generate images for prompts (or class labels).

        Args:
            prompt: one prompt or a list. A text prior encodes it; a class prior looks it up among its
                class names. ``""`` is the unconditional prompt (the prior's learned null condition).
            class_labels: instead of ``prompt``, for a class prior: (B,) dataset labels.
            negative_prompt: a text prior's unconditional branch (one, or one per prompt); "" = null.
            guidance_scale: s in u + s (c - u) on the logits; None = the pipeline's saved default.
            num_inference_steps, sampler, guidance_rescale: checked, then ignored (see the module doc).
            height, width: None, or the fixed :attr:`image_size`.
            callback: must be None (see the module doc).
            classifier, classifier_labels, classifier_scale: must keep their defaults (None, None, 1.0):
                classifier guidance needs a diffusion pipeline.
            progress: a tqdm bar over the tokens.
            output_type: "pil", "pt" or "latent" (the code indices (B, h, w)).
            temperature, top_k, top_p: token filtering (see :class:`prior.sampling.SamplingConfig`);
                None = the pipeline's saved defaults.
            The other arguments are those of :meth:`pipelines.TextToImage.__call__`.
        """
        run = RunOptions(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale, sampler=sampler, height=height, width=width,
                         num_images_per_prompt=num_images_per_prompt, generator=generator, seed=seed,
                         callback=callback, progress=progress, output_type=output_type)
        self._check_diffusion_only(run, classifier=classifier, classifier_labels=classifier_labels,
                                   classifier_scale=classifier_scale)
        settings = self._settings(run, temperature=temperature, top_k=top_k, top_p=top_p)
        cond, uncond = self._prefixes(prompt, class_labels, negative_prompt, num_images_per_prompt)
        with self._token_progress(run.progress), self.autocast():
            tokens = sample_tokens(self.model.prior, cond, uncond, generator=run.make_generator(), **settings)
        if run.output_type == "latent":
            return PipelineOutput(rearrange(tokens, "b (h w) -> b h w", h=self.model.prior.config.grid_size))
        return to_output(self.model.decode(tokens), run.output_type)

    # ---------------------------------------------------------------------------------- checks
    def _check_diffusion_only(self, run: RunOptions, **guidance: Any) -> None:
        if run.callback is not None:
            raise ValueError("callback: TokensToImage samples one token at a time and has no denoising steps to "
                             "report; pass callback=None (progress=True shows a bar over the tokens)")
        check_number("classifier_scale", guidance["classifier_scale"], 0.0)
        given = [name for name, default in CLASSIFIER_GUIDANCE.items()
                 if (guidance[name] is not None if default is None else guidance[name] != default)]
        if given:
            raise ValueError(f"{given[0]}: TokensToImage cannot use classifier guidance, which steers the denoising "
                             f"steps of a diffusion sampler; use TextToImage or ClassToImage")
        for name in ("height", "width"):
            value = getattr(run, name)
            if value is not None and value != self.image_size:
                raise ValueError(f"{name}={value}: this prior's token grid fixes the image size at "
                                 f"{self.image_size}x{self.image_size}; leave {name} out")
        changed = [f"{name}={getattr(run, name)!r}" for name, default in DIFFUSION_ONLY.items()
                   if getattr(run, name) != default]
        if changed:
            warnings.warn(f"TokensToImage ignores {', '.join(changed)}: they configure diffusion samplers, and "
                          f"an autoregressive prior samples one token per grid cell", UserWarning, stacklevel=3)

    def _settings(self, run: RunOptions, **filters: float | None) -> dict[str, Any]:
        """The sampling settings: the call's, else the pipeline's saved defaults."""
        given = {name: value for name, value in filters.items() if value is not None}
        if run.guidance_scale is not None:
            given["guidance"] = run.guidance_scale
        if "temperature" in given:
            check_number("temperature", given["temperature"], 1e-8)
        if "top_k" in given:
            check_int("top_k", given["top_k"], 0)
        if "top_p" in given and check_number("top_p", given["top_p"], 0.0, 1.0) == 0:
            raise ValueError("top_p must be in (0, 1], got 0")
        return dataclasses.asdict(dataclasses.replace(self.model.sampling, **given))

    # ---------------------------------------------------------------------------------- conditions
    def _prefixes(self, prompt: str | list[str] | None, class_labels: Sequence[int] | Tensor | None,
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

    def _check_labels(self, class_labels: Sequence[int] | Tensor) -> Tensor:
        config = self.model.prior.config
        labels = torch.as_tensor(class_labels).reshape(-1)
        if config.condition != "class":
            raise ValueError(f"class_labels need a class prior; this prior is conditioned on {config.condition!r}, "
                             f"give prompt instead")
        if labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be a non-empty list of ints, got {class_labels!r}")
        bad = labels[(labels < 0) | (labels >= config.num_classes)]
        if bad.numel():
            raise ValueError(f"class_labels must be in [0, {config.num_classes}), got {bad[0].item()}")
        return labels.long()

    def _embed(self, prompts: list[str]) -> Prefix:
        """Prompts -> prefix rows; "" rows get the learned null condition, as in training's dropout."""
        prior, kind = self.model.prior, self.model.prior.config.condition
        empty = torch.tensor([p == "" for p in prompts], device=self.device)
        if kind == "none":
            if not bool(empty.all()):
                raise ValueError("prompt: this prior is unconditional; pass \"\" prompts")
            return prior.null_prefix(len(prompts))
        if kind == "class":
            stand_in = next((n for n in self.model.class_names or [] if n is not None), None)
            prompts = [p or stand_in or "" for p in prompts]  # any class: "" rows are replaced by the null
        return prior.prefix(self.model.condition(prompts), drop=empty)

    @contextmanager
    def _token_progress(self, progress: bool) -> Iterator[None]:
        """A tqdm bar over the tokens: the prior's output head runs once per sampled token."""
        if not progress:
            yield
            return
        bar = tqdm(total=self.model.prior.config.num_tokens, unit="token")
        handle = self.model.prior.head.register_forward_hook(lambda module, inputs, output: bar.update(1))
        try:
            yield
        finally:
            handle.remove()
            bar.close()
