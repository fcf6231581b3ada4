"""What every pipeline shares: the result type, loading by kind, and the progress/callback hook.

A pipeline is a thin user-facing object over one generator bundle that already knows how to save and
load itself (:class:`diffusion.latent_diffusion.LatentDiffusion` or :class:`prior.token_prior.TokenPrior`).
This module adds what users of diffusers expect on top: ``from_pretrained`` that accepts a training
run directory as well as its ``pipeline/``, a clear error when the directory holds another kind of
pipeline, ``.to(device)`` that returns the pipeline, and results with an ``.images`` attribute.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from common.checkpoint import PIPELINE_FILE, CheckpointError, find_pipeline_dir, read_pipeline_json
from common.images import tensor_to_pil
from common.precision import PrecisionChoice, check_name, resolve_precision
from diffusion.latent_diffusion import PIPELINE_KIND as TEXT_TO_IMAGE
from diffusion.samplers import Callback
from diffusion.stable_diffusion import is_diffusers_pipeline
from pipelines.options import GenerationOptions, PipelineFacts, check_options, options_from_call

PipelineT = TypeVar("PipelineT", bound="Pipeline")

# The class that loads each kind written to pipeline.json, named in wrong-kind errors (strings, so
# this module need not import the concrete pipelines).
CLASS_FOR_KIND = {
    "text_to_image": "TextToImage (or ImageToImage / Inpaint on the same directory; ClassToImage if its U-Net "
                     "is conditioned on class labels only)",
    "tokens_to_image": "TokensToImage (or ImageToImage / Inpaint on the same directory)",
}


class PipelineKindError(CheckpointError):
    """A pipeline directory (or bundle) that the requested pipeline class cannot run."""


@dataclass(frozen=True)
class PipelineOutput:
    """What a pipeline call returns (diffusers' convention: always an object with ``.images``).

    Attributes:
        images: ``output_type="pil"``: a list of B RGB PIL images; ``"pt"``: a float32 tensor
            (B, 3, H, W) in [0, 1] on the pipeline's device; ``"latent"``: the generator's raw output
            (scaled latents (B, D, h, w) for diffusion, code indices (B, h, w) for the token prior).
            Images come prompt by prompt: the ``num_images_per_prompt`` images of prompt 0 first.
    """

    images: list[Image.Image] | Tensor


def read_kind(directory: Path) -> tuple[str, dict[str, Any]]:
    """The ``kind`` recorded in ``directory/pipeline.json``, and the whole record (a file that is no JSON
    object raises one :class:`CheckpointError` that names it)."""
    meta = read_pipeline_json(directory)
    return str(meta.get("kind")), meta


def resolve(path: str | Path) -> tuple[Path, str, dict[str, Any]]:
    """A pipeline directory given it or a training run directory holding ``pipeline/``, with its kind; a
    diffusers Stable Diffusion folder is a text-to-image pipeline (:mod:`diffusion.stable_diffusion`)."""
    if is_diffusers_pipeline(path):
        return Path(path), TEXT_TO_IMAGE, {"text_encoder": {"name_or_path": str(Path(path) / "text_encoder")}}
    directory = find_pipeline_dir(path)  # its error names both training commands
    kind, meta = read_kind(directory)
    return directory, kind, meta


class Pipeline:
    """Base class: subclasses set :attr:`kind`, hold their bundle as :attr:`model` and implement ``_load``.

    Attributes:
        kind: the ``pipeline.json`` kind this class runs.
        variants: other kinds this class's ``from_pretrained`` and ``from_pipe`` accept, and the class they
            give for each.
        model: the generator bundle (:class:`diffusion.latent_diffusion.LatentDiffusion` or
            :class:`prior.token_prior.TokenPrior`), which saves, loads and moves itself.
    """

    kind: ClassVar[str] = ""
    # Another kind whose directories this class's name also loads, and the class that runs them (ImageToImage
    # on a token prior gives the token editing pipeline, which takes the same call).
    variants: ClassVar[dict[str, type[Pipeline]]] = {}
    model: Any
    requested_precision: str = "auto"

    @classmethod
    def from_pretrained(cls: type[PipelineT], path: str | Path, precision: str = "auto") -> PipelineT:
        """Load a pipeline directory, or the ``pipeline/`` of a training run directory, on CPU.

        ``precision`` is what the networks sample in (see :attr:`precision`): "auto" (bf16 only where
        the device runs it natively faster), "fp32", "bf16" or "fp16" (CUDA only).

        Loading is strict: a directory of another kind, missing or unexpected weights, or unknown
        config keys raise :class:`common.checkpoint.CheckpointError` naming the problem.
        """
        precision = check_name(precision)  # a misspelling fails before anything is loaded
        directory, kind, meta = resolve(path)
        if kind != cls.kind:
            if kind in cls.variants:
                return cls.variants[kind].from_pretrained(directory, precision)  # type: ignore[return-value]
            raise PipelineKindError(
                f"{directory / PIPELINE_FILE} holds a {kind!r} pipeline, which {cls.__name__} cannot run; load it "
                f"with {CLASS_FOR_KIND.get(kind, 'no pipeline class (unknown kind)')}, or pipelines.load_pipeline()")
        cls._check_meta(directory, meta)
        pipe = cls._load(directory)
        pipe.requested_precision = precision
        return pipe

    @classmethod
    def _check_meta(cls, directory: Path, meta: dict[str, Any]) -> None:
        """Refuse, before loading any weights, a directory of the right kind this class still cannot run."""

    @classmethod
    def _load(cls: type[PipelineT], directory: Path) -> PipelineT:
        raise NotImplementedError

    def save_pretrained(self, path: str | Path, format: str = "latentgen") -> Path:
        """Write a pipeline directory that ``from_pretrained`` (and :func:`pipelines.load_pipeline`) reads.

        ``format="latentgen"``: ``pipeline.json`` and the bundle's component directories (``autoencoder/`` and
        ``unet/`` or ``prior/``; the text encoder is referenced by name). ``format="diffusers"``: a diffusers
        Stable Diffusion folder (:func:`pipelines.export.export_diffusers`; latent diffusion with text only,
        needs diffusers), which ``from_pretrained`` reads too.
        """
        from pipelines.export import FORMATS, export_diffusers  # light: diffusers is imported only to export

        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; valid formats: {', '.join(map(repr, FORMATS))}")
        if format == "diffusers":
            return export_diffusers(self, path)
        return self.model.save_pretrained(path)

    def to(self: PipelineT, device: torch.device | str, precision: str | None = None) -> PipelineT:
        """Move every component to ``device`` (and set ``precision`` when given); returns the pipeline itself."""
        self.model.to(device)
        if precision is not None:
            self.requested_precision = check_name(precision)
        return self

    @property
    def precision(self) -> PrecisionChoice:
        """The precision the networks (U-Net or transformer) sample in on the current device, and why.

        Weights stay fp32; the forward passes run under autocast, and the sampler's arithmetic, the
        token draws and the decoder stay fp32. On a CPU, "auto" gives bf16 only with native bf16
        instructions (measured faster), so the same seed gives the same images on every machine of
        one kind, and may differ slightly between a bf16 and an fp32 machine.
        """
        return resolve_precision(self.requested_precision, self.device)

    def autocast(self) -> AbstractContextManager[Any]:
        """The autocast context that runs the sampling networks in :attr:`precision`."""
        dtype = self.precision.autocast_dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def default_guidance_scale(self) -> float:
        """What ``guidance_scale=None`` means for this pipeline."""
        raise NotImplementedError

    @property
    def facts(self) -> PipelineFacts:
        """What :func:`pipelines.options.check_options` needs to know about this pipeline."""
        raise NotImplementedError

    def options(self, given: dict[str, Any]) -> GenerationOptions:
        """A call's keyword arguments, checked once (see :class:`pipelines.options.GenerationOptions`), with
        ``guidance_scale`` and ``strength`` resolved to this pipeline's defaults."""
        return check_options(options_from_call(type(self).__name__, given), self.facts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, precision={self.requested_precision})"

    def compile(self: PipelineT, **options: Any) -> PipelineT:
        """Compile the sampling networks with ``torch.compile``, in place; returns the pipeline.

        The diffusion U-Net and the autoencoder's decoder are compiled (a token prior's transformer is not:
        its sampler calls it through cached decoding methods, not one forward); weights and results stay the
        same to float rounding (fp32: within 1e-4). The first call at each new size pays the compile time
        (minutes on a CPU), so it pays for many images of one size. ``options`` go to :func:`torch.compile`.

        Raises:
            common.compile.CompileError: inductor cannot run on this device (the message names why).
        """
        from common.compile import CompileError, compile_in_place, inductor_problem

        problem = inductor_problem(self.device.type) if options.get("backend", "inductor") == "inductor" else None
        if problem:
            raise CompileError(f"cannot compile the pipeline: {problem}; run it without compile()")
        for net in (getattr(self.model, "unet", None), self.model.autoencoder.decoder):
            if net is not None:
                compile_in_place(net, **options)
        return self

    def load_lora(self: PipelineT, path: str | Path, scale: float = 1.0) -> PipelineT:
        """Put a LoRA adapter (its ``.safetensors`` file, its folder, or the training run that wrote ``lora/``)
        on this pipeline's U-Net or prior at ``scale`` (1.0: as trained; 0.0: the base's images exactly),
        replacing any adapter loaded before; returns the pipeline. See :mod:`pipelines.lora`.

        Raises:
            common.lora.AdapterError: the file is not an adapter, or does not fit this pipeline's network
                (the message names the missing modules or mis-shaped tensors).
        """
        from pipelines.lora import load_lora  # peft is imported only by pipelines that use adapters

        load_lora(self.model, path, scale)
        return self

    def unload_lora(self: PipelineT) -> PipelineT:
        """Remove the loaded adapter; the network's weights are the base's again, bit for bit."""
        from pipelines.lora import unload_lora

        unload_lora(self.model)
        return self


def to_output(images: Tensor, output_type: str) -> PipelineOutput:
    """Images (B, 3, H, W) in [-1, 1] -> the requested :class:`PipelineOutput` ("pil" or "pt")."""
    if output_type == "pil":
        return PipelineOutput(tensor_to_pil(images))
    return PipelineOutput(((images.float() + 1) / 2).clamp(0, 1))


@contextmanager
def step_reporter(total: int, progress: bool, callback: Callback | None,
                  unit: str = "step") -> Iterator[Callback | None]:
    """A sampler callback that advances a tqdm bar and then calls the user's ``callback``.

    Yields None when there is nothing to report (or no step to run), so the sampler skips the call.
    """
    if total == 0 or (not progress and callback is None):
        yield None
        return
    bar = tqdm(total=total, unit=unit, disable=not progress)

    def report(i: int, x_t: Tensor, x0_hat: Tensor) -> None:
        bar.update(1)
        if callback is not None:
            callback(i, x_t, x0_hat)

    try:
        yield report
    finally:
        bar.close()
