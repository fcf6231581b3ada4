"""Token caching: encode a dataset to code indices once, so prior training never runs the encoder.

Shape vocabulary: M dataset items, N tokens per item (h * w, raster order), U unique captions,
L text tokens (the longest caption's), D text width.

The cache is one safetensors file named by a hash of everything it depends on: the autoencoder's
weights and config, the data config, a fingerprint of the data itself (its length and first items, so
a change to a dataset's code is noticed too) and the text encoder config. Each caption is encoded once;
the file is written atomically, so an interrupted extraction leaves no cache behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from autoencoder.model import VQGAN, Autoencoder
from common.captions import add_phrasings, check_templates
from common.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, atomic_write
from common.config import to_dict
from common.data import DataConfig, build_dataset
from prior.text import TextEncoderConfig, fit_length, load_text_encoder

logger = logging.getLogger(__name__)
CACHE_FORMAT = 1


@dataclass(frozen=True)
class TokensConfig:
    """Where the tokens come from and where they are cached.

    Attributes:
        autoencoder: the stage 1 component directory (``<run>/autoencoder``).
        cache_dir: directory of the token caches (one file per autoencoder x data x text setting).
        batch_size: images per encoder batch during extraction.
        num_workers: data loader processes during extraction (decoding a large folder is the slow part).
        caption_templates: phrasings of each caption that a text prior also trains on, one drawn per item
            and step with the caption itself ("{}" is the caption: "a {}", "{} emoji"). A prior trained
            on one phrasing per glyph learns its captions by heart and fails on "a dog" for "dog".
    """

    autoencoder: str = "runs/autoencoder/autoencoder"
    cache_dir: str = "runs/token_cache"
    batch_size: int = 256
    num_workers: int = 0
    caption_templates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_templates(self.caption_templates, "tokens.caption_templates")


class TokenData(NamedTuple):
    """A cached, tokenised dataset."""

    tokens: Tensor          # (M, N) int64 code indices
    labels: Tensor          # (M,) int64 dataset labels
    caption_ids: Tensor     # (M,) int64 index into ``captions``
    captions: list[str]     # U unique captions, in first-seen order, then each template's phrasings of them
    text_states: Tensor | None  # (U (1 + templates), L, D) float32, zero at padding; None without text
    text_mask: Tensor | None    # (U, L) bool
    variants: Tensor | None = None  # (U, 1 + templates) ids of each caption's phrasings; None: no templates

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def class_names(self) -> list[str | None] | None:
        """Caption of each label (None for labels the data never shows) when labels and captions
        correspond one to one, else None."""
        names: dict[int, int] = {}
        for label, caption in zip(self.labels.tolist(), self.caption_ids.tolist()):
            if names.setdefault(label, caption) != caption:
                return None
        if len(set(names.values())) != len(names):
            return None
        return [self.captions[names[label]] if label in names else None for label in range(self.num_classes)]


class TokenDataset(Dataset):
    """Items ``{"tokens": (N,) int64, "label": int64, "caption": int64 caption id}`` of a :class:`TokenData`."""

    def __init__(self, data: TokenData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.tokens)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"tokens": self.data.tokens[index], "label": self.data.labels[index],
                "caption": self.data.caption_ids[index]}


def data_fingerprint(dataset: Dataset, items: int = 4) -> str:
    """A hex digest of the dataset's length and its first ``items`` items (pixels, caption, label)."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    for index in range(min(items, len(dataset))):
        item = dataset[index]
        digest.update(item["image"].float().numpy().tobytes())
        digest.update(f"{item['caption']}\0{int(item['label'])}".encode())
    return digest.hexdigest()


def cache_key(autoencoder_dir: str | Path, data: DataConfig, text: TextEncoderConfig | None,
              fingerprint: str = "", templates: tuple[str, ...] = ()) -> str:
    """A hex digest of the autoencoder (weights + config), the data (config + fingerprint) and the text settings."""
    directory = Path(autoencoder_dir)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory} is not an autoencoder component directory ({name} is missing); "
                                  "set tokens.autoencoder to <stage 1 run>/autoencoder")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    settings = {"format": CACHE_FORMAT, "data": to_dict(data), "fingerprint": fingerprint,
                "text": to_dict(text) if text is not None else None}
    if templates:  # only then, so the caches built before templates existed keep their keys
        settings["templates"] = list(templates)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:20]


@torch.no_grad()
def extract_tokens(autoencoder: VQGAN, dataset: Dataset, batch_size: int, device: torch.device | str,
                   num_workers: int = 0) -> tuple[Tensor, Tensor, list[str]]:
    """Encode every item: returns tokens (M, N) int32, labels (M,) int64 and the M captions."""
    autoencoder = autoencoder.to(device).eval()
    tokens, labels, captions = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        indices = autoencoder.encode_to_indices(batch["image"].to(device))
        tokens.append(rearrange(indices, "b h w -> b (h w)").to("cpu", torch.int32))
        labels.append(torch.as_tensor(batch["label"], dtype=torch.long))
        captions.extend(batch["caption"])
    return torch.cat(tokens), torch.cat(labels), captions


def load_or_build_tokens(config: TokensConfig, data: DataConfig, text: TextEncoderConfig | None = None,
                         device: torch.device | str = "cpu") -> TokenData:
    """Load the token cache for these settings, building it first if there is none.

    Args:
        config: autoencoder directory and cache location.
        data: the dataset to tokenise.
        text: the text encoder for text conditioning; None skips text encoding.
        device: where the encoders run.
    """
    # Building initialises models and data loaders from the global RNG; a run that builds the cache
    # must draw the same random numbers afterwards as one that finds it (exact resume).
    with torch.random.fork_rng(devices=[]):
        dataset = build_dataset(data)
        templates = config.caption_templates if text is not None else ()
        key = cache_key(config.autoencoder, data, text, data_fingerprint(dataset), templates)
        path = Path(config.cache_dir) / f"tokens-{key}.safetensors"
        if not path.is_file():
            build_token_cache(path, config, dataset, text, device)
    return read_token_cache(path)


def build_token_cache(path: Path, config: TokensConfig, dataset: Dataset, text: TextEncoderConfig | None,
                      device: torch.device | str) -> Path:
    """Tokenise ``dataset`` (and encode its unique captions) into the safetensors file ``path``."""
    autoencoder = Autoencoder.from_pretrained(config.autoencoder)
    if not isinstance(autoencoder, VQGAN):
        raise CheckpointError(f"{config.autoencoder} holds a {autoencoder.config.kind!r} autoencoder; the token "
                              "prior needs a vector-quantized one (kind: vq)")
    logger.info("extracting tokens of %d items with %s into %s", len(dataset), config.autoencoder, path)
    tokens, labels, item_captions = extract_tokens(autoencoder, dataset, config.batch_size, device,
                                                   config.num_workers)
    captions = list(dict.fromkeys(item_captions))
    ids = {caption: i for i, caption in enumerate(captions)}
    tensors = {"tokens": tokens, "labels": labels,
               "caption_ids": torch.tensor([ids[c] for c in item_captions], dtype=torch.long)}
    if text is not None:
        captions, variants = add_phrasings(captions, config.caption_templates)
        if variants is not None:
            tensors["variants"] = variants
        encoder = load_text_encoder(text, device)
        parts = [encoder.encode(captions[i:i + 256]) for i in range(0, len(captions), 256)]
        longest = max(part.states.shape[1] for part in parts)
        parts = [fit_length(part.states.float().cpu(), part.mask.cpu(), longest) for part in parts]
        tensors["text_states"] = torch.cat([s for s, _ in parts]).contiguous()
        tensors["text_mask"] = torch.cat([m for _, m in parts]).contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"captions": json.dumps(captions)}))
    return path


def read_token_cache(path: str | Path) -> TokenData:
    """Read a cache file written by :func:`build_token_cache`."""
    with safe_open(str(path), framework="pt") as handle:
        captions = json.loads(handle.metadata()["captions"])
    tensors = load_file(str(path))
    return TokenData(tokens=tensors["tokens"].long(), labels=tensors["labels"], caption_ids=tensors["caption_ids"],
                     captions=captions, text_states=tensors.get("text_states"), text_mask=tensors.get("text_mask"),
                     variants=tensors.get("variants"))
