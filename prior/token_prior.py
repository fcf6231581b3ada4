"""The tokens-to-image bundle: text encoder (or class names) -> token prior -> autoencoder decoder.

A pipeline directory::

    dir/pipeline.json    {"kind": "tokens_to_image", "format_version": 1,
                          "prior": {"kind": "ar" | "maskgit", "sampling": {...}, "class_names": [...] | null,
                                    "maskgit": {"steps": ..., "choice_temperature": ...} (maskgit only)},
                          "text_encoder": {"name_or_path": ..., "max_length": ...} | null}
    dir/autoencoder/     config.json + model.safetensors (a VQ autoencoder)
    dir/prior/           config.json + model.safetensors (the GPT, or MaskGIT: config.json's "kind")

A file without ``prior.kind`` (written before MaskGIT) holds an AR prior.

Users sample through :class:`pipelines.TokensToImage`, which checks the call's options::

    pipe = TokensToImage.from_pretrained("runs/shapes32_prior")
    images = pipe(["a small red circle at the top left"], guidance_scale=3.0, seed=0).images
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from autoencoder.model import VQGAN, Autoencoder
from common.checkpoint import (
    PIPELINE_FILE,
    CheckpointError,
    atomic_write,
    load_module,
    read_pipeline_json,
    save_component,
)
from common.component_check import non_finite_fields
from common.config import ConfigError, from_dict, to_dict
from prior.maskgit import build_prior
from prior.maskgit_sampling import MaskGITSampling, sample_maskgit
from prior.sampling import SamplingConfig, sample_tokens
from prior.text import TextEncoderConfig, encode_prompts, load_text_encoder
from prior.transformer import COMPONENT_KIND, GPT, Condition, Prefix, PriorConfig

PIPELINE_KIND = "tokens_to_image"
FORMAT_VERSION = 1
# what common.checkpoint.find_pipeline_dir suggests when a token prior pipeline is missing
TRAIN_PRIOR = "`accelerate launch prior/train.py configs/prior/<config>.yaml` (it writes <run.out_dir>/pipeline)"


class TokenPrior:
    """Autoencoder + token prior (+ the text encoder's config, loaded on first use).

    Args:
        autoencoder: a VQ autoencoder whose codebook the prior models.
        prior: the GPT, or a :class:`prior.maskgit.MaskGIT` (``prior.config.kind == "maskgit"``).
        text_config: the text encoder config for a text prior (None otherwise).
        class_names: for a class prior, the prompt naming each class (prompts map to labels by name;
            None for classes without a name).
        sampling: the default sampling settings.
        maskgit: MaskGIT's default steps and choice temperature (None: the defaults); only a MaskGIT prior
            records them.
    """

    def __init__(self, autoencoder: VQGAN, prior: GPT, text_config: TextEncoderConfig | None = None,
                 class_names: list[str | None] | None = None, sampling: SamplingConfig | None = None,
                 maskgit: MaskGITSampling | None = None) -> None:
        if autoencoder.config.codebook_size != prior.config.codebook_size:
            raise ValueError(f"the prior models {prior.config.codebook_size} codes, the autoencoder has "
                             f"{autoencoder.config.codebook_size}")
        if prior.config.condition == "text" and text_config is None:
            raise ValueError("a text prior needs its text encoder config")
        self.autoencoder, self.prior = autoencoder.eval(), prior.eval()
        self.text_config, self.class_names = text_config, class_names
        self.sampling = sampling or SamplingConfig()
        self.maskgit = maskgit or MaskGITSampling()
        self._text_encoder: Any = None

    @property
    def kind(self) -> str:
        """"ar" (one token per forward pass) or "maskgit" (all tokens in a few parallel steps)."""
        return self.prior.config.kind

    @property
    def device(self) -> torch.device:
        return self.prior.position_embedding.device

    def to(self, device: torch.device | str) -> TokenPrior:
        self.autoencoder.to(device)
        self.prior.to(device)
        if self._text_encoder is not None:
            self._text_encoder.to(device)
        return self

    @property
    def text_encoder(self) -> Any:
        """The frozen text encoder, loaded on first use."""
        if self._text_encoder is None:
            self._text_encoder = load_text_encoder(self.text_config, self.device)
        return self._text_encoder

    # -------------------------------------------------------------------------------- sampling
    def condition(self, prompts: list[str] | None = None, labels: Tensor | None = None) -> Condition:
        """The condition of already checked prompts (a text prior) or class labels (a class prior)."""
        kind = self.prior.config.condition
        if kind == "text":
            if prompts is None:
                raise ValueError("a text prior needs prompts")
            states, mask = encode_prompts(self.text_encoder, prompts, self.prior.config.text_tokens)
            return Condition(states=states.to(self.device), mask=mask.to(self.device))
        if kind == "class":
            if labels is None:
                raise ValueError("a class prior needs class labels")
            return Condition(labels=torch.as_tensor(labels, device=self.device).long())
        return Condition()

    @torch.no_grad()
    def sample(self, cond: Prefix, uncond: Prefix | None, settings: dict[str, Any],
               generator: torch.Generator | None = None) -> Tensor:
        """Code indices (B, N) for the prefix rows, guided against ``uncond`` (see :func:`sample_tokens` and
        :func:`sample_maskgit`; ``settings`` are the fields of a :class:`SamplingConfig`, and for MaskGIT
        also of :class:`MaskGITSampling`, which default to the saved ones)."""
        if self.kind == "maskgit":
            shared = {k: v for k, v in settings.items() if k != "guidance_tokens"}
            return sample_maskgit(self.prior, cond, uncond, generator=generator,
                                  **{**dataclasses.asdict(self.maskgit), **shared})
        return sample_tokens(self.prior, cond, uncond, generator=generator, **settings)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Code indices (B, N) or (B, h, w) -> images (B, 3, H, W) in [-1, 1] (no autograd graph is kept)."""
        grid = tokens if tokens.ndim == 3 else rearrange(tokens, "b (h w) -> b h w", h=self.prior.config.grid_size)
        return self.autoencoder.decode_indices(grid).float().clamp(-1, 1)

    # -------------------------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the pipeline directory (see the module docstring)."""
        directory = Path(directory)
        self.autoencoder.save_pretrained(directory / "autoencoder")
        save_component(directory / "prior", COMPONENT_KIND, self.prior.config, self.prior)
        meta = {"kind": PIPELINE_KIND, "format_version": FORMAT_VERSION,
                "prior": {"kind": self.kind, "sampling": to_dict(self.sampling), "class_names": self.class_names,
                          **({"maskgit": to_dict(self.maskgit)} if self.kind == "maskgit" else {})},
                "text_encoder": to_dict(self.text_config) if self.text_config is not None else None}
        atomic_write(directory / PIPELINE_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> TokenPrior:
        """Load a pipeline directory strictly (unknown keys, kinds, values or weights are errors)."""
        directory = Path(directory)
        record = read_prior_record(directory)
        autoencoder = Autoencoder.from_pretrained(directory / "autoencoder")
        if not isinstance(autoencoder, VQGAN):
            raise CheckpointError(f"{directory / 'autoencoder'} is not a VQ autoencoder")
        prior = load_module(directory / "prior", COMPONENT_KIND, PriorConfig, build_prior)
        class_names = record.class_names
        if prior.config.kind != record.kind:
            raise CheckpointError(f"{directory / PIPELINE_FILE} records prior.kind={record.kind!r} but "
                                  f"{directory / 'prior'} holds a {prior.config.kind!r} prior; restore the "
                                  "pipeline.json saved with these weights")
        if class_names is not None and len(class_names) != prior.config.num_classes:
            raise CheckpointError(f"{directory / PIPELINE_FILE}: prior.class_names has {len(class_names)} names but "
                                  f"the prior has num_classes={prior.config.num_classes}; give one name (or null) "
                                  "per class")
        return cls(autoencoder, prior, record.text_config, class_names, record.sampling, record.maskgit).to(device)


class PriorRecord(NamedTuple):
    """What ``pipeline.json`` says about the prior."""

    kind: str                                 # "ar" or "maskgit"
    text_config: TextEncoderConfig | None
    class_names: list[str | None] | None
    sampling: SamplingConfig
    maskgit: MaskGITSampling | None           # None for an AR prior


def read_prior_record(directory: Path) -> PriorRecord:
    """The prior's kind, text encoder config, class names and default sampling settings of ``pipeline.json``,
    every value checked before any weights are read (malformed files, unknown keys and out-of-range values
    name the key)."""
    path = directory / PIPELINE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a token prior pipeline: {PIPELINE_FILE} is missing")
    meta = read_pipeline_json(directory)
    if meta.get("kind") != PIPELINE_KIND or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} holds kind {meta.get('kind')!r} version {meta.get('format_version')}, "
                              f"expected {PIPELINE_KIND!r} version {FORMAT_VERSION}")
    section = meta.get("prior")
    if not isinstance(section, dict):
        raise CheckpointError(f"{path}: 'prior' must be an object with 'sampling' and 'class_names', got "
                              f"{section!r}; save the pipeline again")
    unknown = (set(meta) - {"kind", "format_version", "prior", "text_encoder"}) | (
        set(section) - {"kind", "sampling", "class_names", "maskgit"})
    if unknown:
        raise CheckpointError(f"{path} has unknown keys {sorted(unknown)}; was it written by a newer version?")
    kind = section.get("kind", "ar")  # files written before MaskGIT hold AR priors
    if kind not in ("ar", "maskgit") or ("maskgit" in section) != (kind == "maskgit"):
        raise CheckpointError(f"{path}: prior.kind must be 'ar' or 'maskgit', and prior.maskgit present exactly for "
                              f"'maskgit'; got kind {kind!r} with{'' if 'maskgit' in section else 'out'} "
                              "prior.maskgit; restore the pipeline.json the training run saved")
    try:
        sampling = from_dict(SamplingConfig, section.get("sampling", {}), "prior.sampling.")
        maskgit = from_dict(MaskGITSampling, section["maskgit"], "prior.maskgit.") if kind == "maskgit" else None
        text = meta.get("text_encoder")
        text_config = from_dict(TextEncoderConfig, text, "text_encoder.") if text is not None else None
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}; save the pipeline again, or restore the file") from None
    problems = maskgit.problems("prior.maskgit.") if maskgit is not None else []
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}; restore the values the training run saved "
                              "(configs/prior/*.yaml, section maskgit)")
    return PriorRecord(kind, text_config, check_prior_class_names(section.get("class_names"), path),
                       check_sampling(sampling, path), maskgit)


def check_sampling(sampling: SamplingConfig, path: Path) -> SamplingConfig:
    """The saved default sampling settings, refused where a call with them would fail or mean nothing."""
    problems = non_finite_fields(sampling, "prior.sampling.")
    problems += [f"prior.sampling.{name}={getattr(sampling, name)} must be >= 0"
                 for name in ("guidance", "guidance_tokens", "top_k") if getattr(sampling, name) < 0]
    if sampling.temperature <= 0:
        problems.append(f"prior.sampling.temperature={sampling.temperature} must be > 0")
    if not 0 < sampling.top_p <= 1:
        problems.append(f"prior.sampling.top_p={sampling.top_p} must be in (0, 1]")
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}; restore the values the training run saved "
                              "(configs/prior/*.yaml, section sample)")
    return sampling


def check_prior_class_names(names: Any, path: Path) -> list[str | None] | None:
    """``prior.class_names``: null, or a list of distinct strings (null for a class without a name)."""
    if names is None:
        return None
    if not isinstance(names, list) or not all(name is None or isinstance(name, str) for name in names):
        raise CheckpointError(f"{path}: prior.class_names must be a list of strings (null for an unnamed class), "
                              f"got {names!r}")
    repeated = sorted({name for name in names if name is not None and names.count(name) > 1})
    if repeated:
        raise CheckpointError(f"{path}: prior.class_names must be distinct, {repeated} repeat")
    return names
