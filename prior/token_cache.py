"""Token caching: encode a dataset to code indices once, so prior training never runs the encoder.

Shape vocabulary: M dataset items, N tokens per item (h * w, raster order), U unique captions,
L text tokens (the longest caption's), D text width.

The cache is a directory ``tokens-<key>/`` named by a hash of everything it depends on: the
autoencoder's weights and config, the data config, a fingerprint of the data itself (its length and
first items, so a change to a dataset's code is noticed too) and the text encoder config. It holds
memory-mapped arrays (tokens int32, labels, caption ids) and each distinct caption's text states once,
unpadded fp16, cut or padded per batch to the prior's text slots; nothing in it is loaded into RAM or
moved to a GPU whole. Every process of a multi-process run tokenises its share, and ``meta.json`` is
written last, so an interrupted build leaves no cache behind and resumes from its finished shares
(:mod:`common.cache_build`). Text states are stored rather than encoded on the fly for the reason
given in :mod:`diffusion.latent_cache`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from einops import rearrange
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from autoencoder.model import VQGAN, Autoencoder
from common.array_store import Processes, TextStore, read_json
from common.cache_build import META_FILE, CacheSpec, build_cache, ensure_built, open_cache
from common.captions import check_templates
from common.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError
from common.config import to_dict
from common.data import DataConfig, build_dataset
from prior.text import TextEncoderConfig, load_text_encoder

logger = logging.getLogger(__name__)
CACHE_FORMAT = 2  # 1: one safetensors file read into RAM, text states padded fp32


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
    """A cached, tokenised dataset; every array is a memory map of the cache's files (:mod:`common.array_store`)."""

    tokens: Tensor          # (M, N) int32 code indices
    labels: Tensor          # (M,) int64 dataset labels
    caption_ids: Tensor     # (M,) int64 index into ``captions``
    captions: Sequence[str]  # U unique captions, in first-seen order, then each template's phrasings of them
    text_states: TextStore | None  # each caption's token states, unpadded fp16; None without text
    variants: Tensor | None = None  # (U, 1 + templates) ids of each caption's phrasings; None: no templates
    text_slots: int = 0     # text positions of each batch (cut or padded); 0: the batch's longest caption

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def class_names(self) -> list[str | None] | None:
        """Caption of each label (None for labels the data never shows) when labels and captions
        correspond one to one, else None."""
        pairs = np.unique(np.stack([self.labels.numpy(), self.caption_ids.numpy()], axis=1), axis=0)
        if len(np.unique(pairs[:, 0])) != len(pairs) or len(np.unique(pairs[:, 1])) != len(pairs):
            return None
        names = dict(pairs.tolist())
        return [self.captions[names[label]] if label in names else None for label in range(self.num_classes)]

    def fit_text(self, slots: int) -> TokenData:
        """This data with each batch's text states cut or zero-padded to ``slots`` positions (the prior's text
        prefix); warns once when captions are longer (their tail is ignored)."""
        if self.text_states is not None:
            longer = int((self.text_states.lengths() > slots).sum())
            if longer:
                logger.warning("%d captions have more than %d text tokens; the rest is ignored by the prior "
                               "(raise model.text_tokens to keep it)", longer, slots)
        return self._replace(text_slots=slots)

    def text(self, caption_ids: Tensor) -> tuple[Tensor, Tensor]:
        """States (B, P, D) float32 and mask (B, P) of one phrasing of each caption id (B,), drawn from the global
        RNG on the ids' device (as :func:`common.captions.draw_phrasings` draws), on that device; P is
        ``text_slots`` (or the longest of these captions). The states were stored in fp16."""
        if self.text_states is None:
            raise ValueError("this token cache holds no text states: it was built without a text encoder")
        ids = caption_ids
        if self.variants is not None:
            columns = torch.randint(self.variants.shape[1], ids.shape, device=ids.device)
            ids = self.variants[ids.cpu(), columns.cpu()].to(ids.device)
        return self.text_states.gather(ids, self.text_slots)


class TokenDataset(Dataset):
    """Items ``{"tokens": (N,) int64, "label": int64, "caption": int64 caption id}`` of a :class:`TokenData`."""

    def __init__(self, data: TokenData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.tokens)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"tokens": self.data.tokens[index].long(), "label": self.data.labels[index],
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


def load_or_build_tokens(config: TokensConfig, data: DataConfig, text: TextEncoderConfig | None = None,
                         device: torch.device | str = "cpu", accelerator: Any | None = None) -> TokenData:
    """Load the token cache for these settings, building it first if there is none.

    Args:
        config: autoencoder directory and cache location.
        data: the dataset to tokenise.
        text: the text encoder for text conditioning; None skips text encoding.
        device: where the encoders run.
        accelerator: with an ``accelerate.Accelerator``, every one of its processes must call this at once:
            each encodes its share of a missing cache (:mod:`common.cache_build`). Without, this process
            encodes all of it.
    """
    # Building initialises models and data loaders from the global RNG; a run that builds the cache
    # must draw the same random numbers afterwards as one that finds it (exact resume).
    with torch.random.fork_rng(devices=[]):
        dataset = build_dataset(data)
        templates = config.caption_templates if text is not None else ()
        key = cache_key(config.autoencoder, data, text, data_fingerprint(dataset), templates)
        directory = Path(config.cache_dir) / f"tokens-{key}"
        processes = Processes.of(accelerator)
        ensure_built(directory, processes,
                     lambda: build_token_cache(directory, config, dataset, text, device, processes))
    return read_token_cache(directory)


def build_token_cache(directory: Path, config: TokensConfig, dataset: Dataset, text: TextEncoderConfig | None,
                      device: torch.device | str, processes: Processes = Processes()) -> Path:
    """Tokenise ``dataset`` (and encode its unique captions) into the cache ``directory``, each of ``processes``
    its share (:func:`common.cache_build.build_cache`)."""
    autoencoder = Autoencoder.from_pretrained(config.autoencoder)
    if not isinstance(autoencoder, VQGAN):
        raise CheckpointError(f"{config.autoencoder} holds a {autoencoder.config.kind!r} autoencoder; the token "
                              "prior needs a vector-quantized one (kind: vq)")
    autoencoder = autoencoder.to(device).eval()
    encoder = load_text_encoder(text, device) if text is not None else None
    logger.info("extracting tokens of %d items with %s into %s", len(dataset), config.autoencoder, directory)

    @torch.no_grad()
    def items(indices: range) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
        for batch in DataLoader(Subset(dataset, indices), batch_size=config.batch_size, shuffle=False,
                                num_workers=config.num_workers):
            codes = autoencoder.encode_to_indices(batch["image"].to(device))
            yield (rearrange(codes, "b h w -> b (h w)").to("cpu", torch.int32),
                   torch.as_tensor(batch["label"], dtype=torch.long), list(batch["caption"]))

    def texts(captions: list[str]) -> tuple[Tensor, Tensor]:
        embedding = encoder.encode(captions)
        return embedding.states, embedding.mask

    spec = CacheSpec("tokens", items, lambda captions: list(dict.fromkeys(captions)),
                     texts if encoder is not None else None, config.caption_templates if encoder else ())
    build_cache(directory, len(dataset), spec, processes, {"format_version": CACHE_FORMAT})
    return directory


def read_token_cache(path: str | Path) -> TokenData:
    """Open a cache written by :func:`build_token_cache`; its arrays stay on disk (memory maps)."""
    meta = read_json(Path(path) / META_FILE)
    if meta.get("format_version") != CACHE_FORMAT:
        raise CheckpointError(f"{path} holds token cache format {meta.get('format_version')}, expected "
                              f"{CACHE_FORMAT}; delete it to tokenise again")
    stored = open_cache(path)
    return TokenData(tokens=stored.rows, labels=stored.labels, caption_ids=stored.caption_ids,
                     captions=stored.captions, text_states=stored.text, variants=stored.variants)
