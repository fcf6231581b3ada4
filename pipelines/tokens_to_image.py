"""The token pipeline: text (or class) -> token prior (AR GPT or MaskGIT) over code indices -> VQ decoder.

    pipe = TokensToImage.from_pretrained("runs/emoji32_quick_prior")
    images = pipe(["dog face", "red apple"], num_images_per_prompt=2, seed=0).images

It takes the same call as :class:`pipelines.TextToImage`, so code can swap the two generators. The
arguments that only mean something to a diffusion sampler are still checked the same way (a bad
value fails in both pipelines alike) and are then ignored, with a warning when they differ from
their defaults: ``num_inference_steps`` (an AR prior always samples one token per grid cell; for a
MaskGIT prior it is the number of parallel decoding steps T, default the saved ``maskgit.steps``),
``sampler`` and ``guidance_rescale``. A ``callback`` is refused, since there are no denoising
steps to report and silently never calling it would hide that; so is a ``classifier`` (classifier
guidance steers denoising steps). Which option applies where is the ``only=`` metadata of
:class:`pipelines.options.GenerationOptions`. The image size is fixed by the prior's token grid:
``height``/``width`` may only repeat it.

The generator's uniforms are drawn on its own device and moved to the prior's
(:func:`prior.sampling.draw`), so a seed gives the same tokens on CPU and GPU (up to float rounding).
They are drawn for every image up front (:func:`prior.sampling.draw_uniforms`, 4 bytes per token), and
the images are sampled and decoded ``chunk_size`` at a time, so memory is flat in the number of images
and the tokens do not depend on the chunk size. MaskGIT draws its (T, 2, images, N) uniforms up front the
same way (:func:`prior.maskgit_sampling.draw_uniforms`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from einops import rearrange
from torch import Tensor
from tqdm.auto import tqdm

from pipelines.base import Pipeline, PipelineKindError, PipelineOutput, to_output
from pipelines.latent import FLOAT_BYTES, autoencoder_activation_bytes, collect, image_rows, result_bytes
from pipelines.options import (
    GenerationOptions,
    ImageCost,
    Labels,
    PipelineFacts,
    as_negatives,
    as_prompts,
    check_int,
    check_memory,
    label_ids,
)
from prior.maskgit_sampling import draw_uniforms as draw_maskgit_uniforms
from prior.maskgit_sampling import sample_maskgit
from prior.sampling import draw_uniforms, sample_tokens
from prior.token_prior import PIPELINE_KIND, TokenPrior
from prior.transformer import Condition, Prefix

TokensT = TypeVar("TokensT", bound="TokensToImage")
SAMPLING_OPTIONS = ("guidance_tokens", "temperature", "top_k", "top_p")  # None: the pipeline's saved default
# Token editing: (images, generator) -> the codes (images, N) and which of them to keep (images, N) bool.
Edit = Callable[[int, torch.Generator | None], tuple[Tensor, Tensor]]


class TokensToImage(Pipeline):
    """Text or class condition -> token prior (AR or MaskGIT) with classifier-free guidance -> VQ decoder.

    Args:
        model: the :class:`prior.token_prior.TokenPrior` bundle (autoencoder, GPT, text encoder config,
            class names, default sampling settings).
    """

    kind = PIPELINE_KIND
    roles: ClassVar[frozenset[str]] = frozenset({"tokens", "text"})  # see PipelineFacts
    default_strength: ClassVar[float | None] = None  # what strength=None means (pipelines with an input image)

    def __init__(self, model: TokenPrior) -> None:
        self.model = model

    @classmethod
    def from_pipe(cls: type[TokensT], pipe: TokensToImage) -> TokensT:
        """Another token pipeline over the same components (no copy, no reload), e.g.
        ``TokenInpaint.from_pipe(tokens_to_image)``."""
        if not isinstance(pipe, TokensToImage):
            raise PipelineKindError(f"{cls.__name__}.from_pipe needs a token pipeline (TokensToImage), got "
                                    f"{type(pipe).__name__}")
        return cls(pipe.model)

    @classmethod
    def _load(cls, directory: Path) -> TokensToImage:
        return cls(TokenPrior.from_pretrained(directory))

    @property
    def default_guidance_scale(self) -> float:
        """What ``guidance_scale=None`` means: the guidance saved with the pipeline."""
        return self.model.sampling.guidance

    @property
    def facts(self) -> PipelineFacts:
        return PipelineFacts(type(self).__name__, self.roles, self.default_guidance_scale, self.default_strength)

    @property
    def image_size(self) -> int:
        """H = W: the prior's token grid times the autoencoder's downsampling factor."""
        return self.model.prior.config.grid_size * self.model.autoencoder.downsample_factor

    def options(self, given: dict[str, Any]) -> GenerationOptions:
        """The checked call options; for MaskGIT, ``num_inference_steps`` is its decoding steps T (the saved
        default when left out), for an AR prior it is warned about and ignored. A prior without a learned
        null condition (imported from taming-transformers) refuses guidance."""
        run = self._kind_options(given)
        if not self.model.prior.config.null_condition and run.guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={run.guidance_scale}: this prior never learned a null condition (it was "
                             "imported from taming-transformers), so classifier-free guidance has nothing to guide "
                             "against; use guidance_scale=1 (its saved default) or leave it out")
        return run

    def _kind_options(self, given: dict[str, Any]) -> GenerationOptions:
        if self.model.kind != "maskgit":
            return super().options(given)
        rest = {name: value for name, value in given.items() if name != "num_inference_steps"}
        steps = given.get("num_inference_steps", self.model.maskgit.steps)
        run = super().options(rest)
        if run.guidance_tokens:
            raise ValueError(f"guidance_tokens={run.guidance_tokens}: a MaskGIT prior guides every decoding step; "
                             "leave guidance_tokens out (it counts an AR prior's tokens)")
        return dataclasses.replace(run, num_inference_steps=check_int("num_inference_steps", steps, 1))

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
        given, negatives = self._conditions(prompt, class_labels, run.negative_prompt)
        return self.generate(run, given, negatives, "prompt" if class_labels is None else "class_labels")

    def generate(self, run: GenerationOptions, given: list[str] | Tensor, negatives: list[str] | None, name: str,
                 edit: Edit | None = None) -> PipelineOutput:
        """Sample and decode the images of checked conditions ``chunk_size`` at a time (``name``: what the
        conditions were given as, for the memory error); ``edit`` gives each chunk's tokens to keep."""
        times, count = run.num_images_per_prompt, len(given) * run.num_images_per_prompt
        check_memory(run, self.image_cost(run), count, (self.image_size, self.image_size), self.device,
                     (name, len(given)))
        generator = run.make_generator()
        uniforms = self._uniforms(run, count, generator)
        keep = None if edit is None else edit(count, generator)
        chunks = [range(start, min(start + run.chunk_size, count)) for start in range(0, count, run.chunk_size)]
        images = None
        with self._token_progress(run.progress, len(chunks), run):
            for rows in chunks:
                cond, uncond = self._prefixes(given, negatives, rows, times)
                kept = {} if keep is None else dict(given=keep[0][rows.start:rows.stop],
                                                    fixed=keep[1][rows.start:rows.stop])
                with self.autocast():
                    tokens = self._sample(cond, uncond, uniforms, rows, run, kept)
                images = collect(images, self._finish(tokens, run.output_type), rows, count)
        return PipelineOutput(images)

    def _uniforms(self, run: GenerationOptions, count: int, generator: torch.Generator | None) -> Tensor:
        """Every uniform the sampler of this prior's kind takes for ``count`` images, drawn up front."""
        tokens = self.model.prior.config.num_tokens
        if self.model.kind == "maskgit":
            return draw_maskgit_uniforms(run.num_inference_steps, count, tokens, generator)
        return draw_uniforms(tokens, count, generator)

    def _sample(self, cond: Prefix, uncond: Prefix | None, uniforms: Tensor, rows: range,
                run: GenerationOptions, kept: dict[str, Tensor]) -> Tensor:
        """The tokens (B, N) of output images ``rows``, by the sampler of this prior's kind (``kept``: the
        sampler's ``given`` and ``fixed`` tokens, or nothing)."""
        if self.model.kind == "maskgit":
            return sample_maskgit(self.model.prior, cond, uncond, uniforms=uniforms[:, :, rows.start:rows.stop],
                                  **self._maskgit_settings(run), **kept)
        return sample_tokens(self.model.prior, cond, uncond, uniforms=uniforms[:, rows.start:rows.stop],
                             **self._settings(run), **kept)

    def _finish(self, tokens: Tensor, output_type: str) -> list | Tensor:
        """One chunk's tokens (B, N) -> its images of ``output_type`` ("latent": the code indices (B, h, w))."""
        if output_type == "latent":
            return rearrange(tokens, "b (h w) -> b h w", h=self.model.prior.config.grid_size)
        return to_output(self.model.decode(tokens), output_type).images

    def image_cost(self, run: GenerationOptions) -> ImageCost:
        """The estimated bytes of one image: its rows' key/value cache and logits, the decoder, the pixels.

        The cache holds keys and values of every layer for the prefix and the image tokens; guidance doubles
        the rows. The logits of one step exist in a few copies (guided, filtered, softmax, CDF, top-p's sort).
        MaskGIT has no cache but one forward's activations (a few (S, W) copies and the (heads, S, S) attention
        weights) and the logits of all N tokens at once; its uniforms are 8 bytes per token and step.
        """
        config, size = self.model.prior.config, self.image_size
        rows = 1 if run.guidance_scale == 1.0 else 2
        cache = FLOAT_BYTES * 2 * config.depth * (config.prefix_len + config.num_tokens) * config.width
        logits = FLOAT_BYTES * 6 * config.codebook_size
        if self.model.kind == "maskgit":
            length = config.prefix_len + config.num_tokens
            cache = FLOAT_BYTES * (int(8 * length * config.width * config.mlp_ratio) + config.heads * length * length)
            logits *= config.num_tokens
        working = (rows * (cache + logits) + autoencoder_activation_bytes(self.model.autoencoder.config, size, size)
                   + 2 * 3 * FLOAT_BYTES * size * size)
        codes = 8 * config.num_tokens
        per_step = 2 if self.model.kind == "maskgit" else 1  # uniforms kept for every image up front
        steps = run.num_inference_steps if self.model.kind == "maskgit" else 1
        uniforms = FLOAT_BYTES * per_step * steps * config.num_tokens
        return ImageCost(working, uniforms + result_bytes(run.output_type, size, size, codes))

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

    def _maskgit_settings(self, run: GenerationOptions) -> dict[str, Any]:
        """MaskGIT's settings: the shared ones but guidance_tokens, the call's steps, the saved choice temperature."""
        shared = {k: v for k, v in self._settings(run).items() if k != "guidance_tokens"}
        return {**shared, "steps": run.num_inference_steps, "choice_temperature": self.model.maskgit.choice_temperature}

    # ---------------------------------------------------------------------------------- conditions
    def _conditions(self, prompt: str | list[str] | None, class_labels: Labels | None,
                    negative_prompt: str | list[str] | None) -> tuple[list[str] | Tensor, list[str] | None]:
        """The call's conditions, checked: prompts or class ids (one row per prompt), and negative prompts."""
        if (prompt is None) == (class_labels is None):
            raise ValueError("give prompt or class_labels (class_labels only for a class prior), not both")
        if class_labels is not None:
            if negative_prompt is not None:
                raise ValueError("negative_prompt needs a text prior; a class prior's only negative is the null class")
            return self._check_labels(class_labels), None
        prompts = as_prompts(prompt)
        negatives = as_negatives(negative_prompt, len(prompts))
        condition = self.model.prior.config.condition
        if negatives is not None and condition == "class":
            raise ValueError("negative_prompt needs a text prior; a class prior's only negative is the null class")
        return prompts, None if condition == "none" else negatives

    def _prefixes(self, given: list[str] | Tensor, negatives: list[str] | None, rows: range,
                  times: int) -> tuple[Prefix, Prefix | None]:
        """The conditional and unconditional rows (None for an unconditional prior) of output images ``rows``."""
        prior = self.model.prior
        if isinstance(given, Tensor):
            labels = image_rows(rows, times, given).to(self.device)
            return prior.prefix(Condition(labels=labels)), prior.null_prefix(len(rows))
        cond = self._embed([given[i // times] for i in rows])
        if prior.config.condition == "none":
            return cond, None
        if negatives is None:
            return cond, prior.null_prefix(len(rows))
        return cond, self._embed([negatives[0 if len(negatives) == 1 else i // times] for i in rows])

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
        if kind == "class" and bool(empty.any()) and not prior.config.null_condition:
            raise ValueError("prompt \"\": this class prior never learned a null condition (it was imported from "
                             "taming-transformers); name a class (or give its id) for every prompt")
        if kind == "class":  # prompts name classes; "" rows get any class, which the null then replaces
            stand_in = next((n for n in self.model.class_names or [] if n is not None), None)
            named = [p or stand_in or "" for p in prompts]
            labels = self._check_labels(named) if not bool(empty.all()) else torch.zeros(len(prompts), dtype=torch.long)
            return prior.prefix(self.model.condition(labels=labels), drop=empty)
        return prior.prefix(self.model.condition(prompts), drop=empty)

    @contextmanager
    def _token_progress(self, progress: bool, chunks: int, run: GenerationOptions) -> Iterator[None]:
        """A tqdm bar over the head's calls in every chunk: once per sampled token (AR) or step (MaskGIT)."""
        if not progress:
            yield
            return
        maskgit = self.model.kind == "maskgit"
        per_chunk = run.num_inference_steps if maskgit else self.model.prior.config.num_tokens
        bar = tqdm(total=per_chunk * chunks, unit="step" if maskgit else "token")
        def count(module: Any, inputs: Any, output: Tensor) -> None:  # returning bar.update's bool would
            bar.update(1)                                              # replace the head's output
        handle = self.model.prior.head.register_forward_hook(count)
        try:
            yield
        finally:
            handle.remove()
            bar.close()
