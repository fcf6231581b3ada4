"""Encode a dataset once with the frozen autoencoder (and text encoder), and reuse it for every step.

Stage-2 training never runs the encoder: each item is encoded once into

- its latent: the QUANTIZED latent z_q (B, D, h, w) of a VQ autoencoder, or the posterior mean of a KL
  one, multiplied by ``latent_scale`` = 1 / std of all cached latents, so the diffusion model sees
  latents of unit variance (Rombach et al. 2022, §4.3.2);
- its caption id: captions repeat a lot (shapes has 324 distinct ones, emoji about 1.2k), so each
  UNIQUE caption is encoded once, plus the empty caption "" (id 0), the null condition of
  classifier-free guidance, and with caption templates each caption's phrasings
  (:mod:`common.captions`), of which training draws one per item and step;
- its label.

A cache for a U-Net without text (class-only) is built with ``text=None``: it stores the captions but
no text embeddings, and no text encoder is loaded to build it.

No flipped copies are stored: captions say "left" and "right".

On disk, under ``cache_root/<key>/``: ``cache.safetensors`` (tensors) and ``meta.json`` (captions,
latent_scale, what was encoded), written atomically, ``meta.json`` last. The key hashes the
autoencoder's weights and config, the data config, a fingerprint of the dataset's items and the text
encoder config, so a second run with the same inputs reuses the files and any change re-encodes.

Shapes: N items, D latent channels, h w latent grid, U unique captions, L tokens, E text width.
"""
from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from autoencoder.model import VQGAN, Autoencoder
from common.captions import add_phrasings, draw_phrasings
from common.checkpoint import CONFIG_FILE, WEIGHTS_FILE, atomic_write
from common.config import to_dict
from common.data import DataConfig, build_dataset
from common.text_encoder import BUNDLED_PACKAGE, TextEmbedding, TextEncoder, TextEncoderConfig

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
NULL_CAPTION = ""
NULL_ID = 0  # caption id of the null condition in every cache
TENSORS_FILE = "cache.safetensors"
META_FILE = "meta.json"


def resolve_autoencoder_dir(path: str | Path) -> Path:
    """The autoencoder component directory of ``path``: the directory itself, or a stage-1 run's ``autoencoder/``."""
    path = Path(path)
    for candidate in (path, path / "autoencoder"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"no autoencoder at {path}: expected a stage-1 run directory holding autoencoder/{CONFIG_FILE} "
        f"or a component directory holding {CONFIG_FILE} and {WEIGHTS_FILE} (train one with "
        f"`accelerate launch autoencoder/train.py configs/autoencoder/<name>.yaml`)")


@torch.no_grad()
def encode_latents(autoencoder: Autoencoder, images: Tensor) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> unscaled latents (B, D, h, w) fp32: VQ z_q or the KL posterior mean.

    The VQ path goes through ``lookup``/``embed``, which touch no codebook statistic in any mode.
    """
    if isinstance(autoencoder, VQGAN):
        return autoencoder.indices_to_latents(autoencoder.encode_to_indices(images)).float()
    return autoencoder.encode(images).mean.float()


@torch.no_grad()
def decode_latents(autoencoder: Autoencoder, latents: Tensor) -> Tensor:
    """Unscaled latents (B, D, h, w) -> images (B, 3, H, W) clamped to [-1, 1].

    A VQ decoder was only trained on codebook vectors, so generated latents are snapped to their
    nearest code first (the quantizer's own lookup, l2-normalised if the codebook is).
    """
    if isinstance(autoencoder, VQGAN):
        latents = autoencoder.indices_to_latents(autoencoder.quantizer.lookup(latents.float()))
    return autoencoder.decode(latents.to(next(autoencoder.parameters()).dtype)).float().clamp(-1, 1)


class LatentCache(Dataset):
    """An encoded dataset; items are ``{"latent": (D, h, w), "caption_id": int, "label": int}``.

    Attributes:
        latents: (N, D, h, w) float32 scaled latents.
        caption_ids: (N,) int64 indices into ``captions``.
        labels: (N,) int64 dataset labels.
        captions: U unique captions; ``captions[NULL_ID]`` is "".
        text_states: (U, L, E) float32 token states, zero at padding; None in a cache built without text.
        text_mask: (U, L) bool, True for real tokens; None without text.
        latent_scale: the factor the latents were multiplied by.
        directory: where the cache lives on disk (None if it was never saved).
        variants: (U, 1 + templates) caption ids of each caption's phrasings; None without caption templates.
    """

    def __init__(self, latents: Tensor, caption_ids: Tensor, labels: Tensor, captions: list[str],
                 text_states: Tensor | None, text_mask: Tensor | None, latent_scale: float,
                 directory: Path | None = None, variants: Tensor | None = None) -> None:
        if captions[NULL_ID] != NULL_CAPTION:
            raise ValueError(f"caption {NULL_ID} of a latent cache must be the empty (null) caption")
        self.latents, self.caption_ids, self.labels = latents, caption_ids, labels
        self.captions, self.text_states, self.text_mask = captions, text_states, text_mask
        self.latent_scale, self.directory, self.variants = float(latent_scale), directory, variants

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"latent": self.latents[index], "caption_id": self.caption_ids[index], "label": self.labels[index]}

    def text(self, caption_ids: Tensor) -> TextEmbedding:
        """The cached embeddings of ``caption_ids`` (B,), on the device of the text tables."""
        if self.text_states is None:
            raise ValueError(f"the latent cache {self.directory} holds no text embeddings: it was built for a U-Net "
                             f"without text (model.context_dim: 0)")
        ids = caption_ids.to(self.text_states.device)
        return TextEmbedding(self.text_states[ids], self.text_mask[ids])

    def text_to(self, device: torch.device | str) -> LatentCache:
        """Move the (small) text tables to ``device``, where training gathers from them; returns self."""
        if self.text_states is not None:
            self.text_states, self.text_mask = self.text_states.to(device), self.text_mask.to(device)
        if self.variants is not None:
            self.variants = self.variants.to(device)
        return self

    def phrasings(self, caption_ids: Tensor) -> Tensor:
        """One phrasing of each caption id (B,), drawn from the global RNG; the ids without caption templates."""
        return draw_phrasings(caption_ids, self.variants)


def cache_key(autoencoder_dir: str | Path, data: DataConfig, text: TextEncoderConfig | None,
              dataset: Dataset | None = None, templates: tuple[str, ...] = ()) -> str:
    """A hex digest of everything the cached tensors depend on.

    The data config alone does not pin the images down (the procedural generator or the font may
    change with the code, a folder may gain files), so a ``dataset`` fingerprint is hashed too.
    """
    autoencoder_dir = Path(autoencoder_dir)
    digest = hashlib.sha256()
    if dataset is not None:
        digest.update(dataset_fingerprint(dataset).encode())
    with open(autoencoder_dir / WEIGHTS_FILE, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    package = None
    if text is not None and not text.name_or_path:  # the bundled model changes only with its package version
        try:
            package = metadata.version(BUNDLED_PACKAGE.replace("_", "-"))
        except metadata.PackageNotFoundError:
            package = "missing"
    inputs = {"format": CACHE_FORMAT, "autoencoder_config": json.loads((autoencoder_dir / CONFIG_FILE).read_text()),
              "data": to_dict(data), "text": to_dict(text) if text is not None else None, "text_package": package}
    if templates:  # only then, so that the caches built before templates existed keep their keys
        inputs["templates"] = list(templates)
    digest.update(json.dumps(inputs, sort_keys=True).encode())
    return digest.hexdigest()


def dataset_fingerprint(dataset: Dataset, probes: int = 4) -> str:
    """Hash of the length and the first and last ``probes`` items (image bytes, caption, label)."""
    digest = hashlib.sha256(str(len(dataset)).encode())
    count = len(dataset)
    for index in sorted(set(range(min(probes, count))) | set(range(max(count - probes, 0), count))):
        item = dataset[index]
        digest.update(item["image"].numpy().tobytes())
        digest.update(f"{item['caption']}\x00{item['label']}".encode())
    return digest.hexdigest()


def load_or_build_cache(autoencoder_path: str | Path, data: DataConfig, text: TextEncoderConfig | None,
                        cache_root: str | Path, *, autoencoder: Autoencoder | None = None,
                        text_encoder: TextEncoder | None = None, device: torch.device | str = "cpu",
                        batch_size: int = 64, progress: bool = False, templates: tuple[str, ...] = ()) -> LatentCache:
    """Return the cache for these inputs, encoding and saving it first if it does not exist yet.

    Args:
        autoencoder_path: a stage-1 run directory or an autoencoder component directory.
        data: which dataset to encode (for procedural shapes, its first ``data.size`` items).
        text: which text encoder embeds the captions; None for a cache without text embeddings (a
            class-only U-Net), which never loads a text encoder.
        cache_root: parent directory of all caches; each lives in a sub-directory named by its key.
        autoencoder, text_encoder: already loaded models to encode with (loaded from the paths otherwise).
        device: where to encode.
        batch_size: images per encoder call.
        progress: show a progress bar while encoding.
        templates: caption templates (:mod:`common.captions`) whose phrasings are encoded too; ignored without text.
    """
    autoencoder_dir = resolve_autoencoder_dir(autoencoder_path)
    dataset = build_dataset(data)
    templates = tuple(templates) if text is not None else ()
    key = cache_key(autoencoder_dir, data, text, dataset, templates)
    directory = Path(cache_root) / key[:20]
    if (directory / META_FILE).is_file():
        return load_cache(directory)
    logger.info("encoding %s into a latent cache at %s", data.name, directory)
    autoencoder = autoencoder if autoencoder is not None else Autoencoder.from_pretrained(autoencoder_dir)
    if text is None:
        text_encoder = None
    elif text_encoder is None:
        text_encoder = TextEncoder(text)
    cache = encode_dataset(dataset, autoencoder.to(device).eval(),
                           text_encoder.to(device) if text_encoder is not None else None, batch_size, progress,
                           templates)
    save_cache(cache, directory, {"key": key, "autoencoder": str(autoencoder_dir), "data": to_dict(data),
                                  "text": to_dict(text) if text is not None else None, "templates": list(templates)})
    cache.directory = directory
    return cache


def encode_dataset(dataset: Dataset, autoencoder: Autoencoder, text_encoder: TextEncoder | None,
                   batch_size: int = 64, progress: bool = False, templates: tuple[str, ...] = ()) -> LatentCache:
    """Encode every item of ``dataset`` (images in batches, each distinct caption and its ``templates``' phrasings
    once unless ``text_encoder`` is None) on the models' device."""
    device = next(autoencoder.parameters()).device
    latents, labels, captions = [], [], []
    # its own generator: starting a loader draws a seed, which must not move the global RNG
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, generator=torch.Generator())
    for batch in tqdm(loader, desc="latent cache", disable=not progress, dynamic_ncols=True):
        latents.append(encode_latents(autoencoder, batch["image"].to(device)).cpu())
        labels.append(torch.as_tensor(batch["label"]).long())
        captions.extend(batch["caption"])
    latents_all = torch.cat(latents)
    scale = 1.0 / float(latents_all.double().std())
    unique = [NULL_CAPTION] + sorted(set(captions) - {NULL_CAPTION})
    index = {caption: i for i, caption in enumerate(unique)}
    texts, variants = add_phrasings(unique, templates if text_encoder is not None else ())
    text = encode_captions(text_encoder, texts) if text_encoder is not None else None
    return LatentCache((latents_all * scale).float(), torch.tensor([index[c] for c in captions], dtype=torch.long),
                       torch.cat(labels), texts, text.states.cpu() if text is not None else None,
                       text.mask.cpu() if text is not None else None, scale, variants=variants)


def encode_captions(text_encoder: TextEncoder, captions: list[str], chunk: int = 256) -> TextEmbedding:
    """Encode captions in chunks and pad them all to the longest (zero states, False mask)."""
    parts = [text_encoder.encode(captions[i:i + chunk]) for i in range(0, len(captions), chunk)]
    length = max(part.states.shape[1] for part in parts)
    return TextEmbedding(torch.cat([pad_tokens(part, length).states for part in parts]),
                         torch.cat([pad_tokens(part, length).mask for part in parts]))


def pad_tokens(text: TextEmbedding, length: int) -> TextEmbedding:
    """Pad (B, L, E) states and (B, L) mask to ``length`` tokens with masked-out zeros."""
    extra = length - text.states.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {text.states.shape[1]} tokens down to {length}")
    if extra == 0:
        return text
    states = torch.nn.functional.pad(text.states, (0, 0, 0, extra))
    return TextEmbedding(states, torch.nn.functional.pad(text.mask, (0, extra), value=False))


def save_cache(cache: LatentCache, directory: str | Path, inputs: dict) -> Path:
    """Write the tensors, then ``meta.json`` (its presence marks a complete cache), both atomically."""
    directory = Path(directory)
    tensors = {"latents": cache.latents.contiguous(), "caption_ids": cache.caption_ids.contiguous(),
               "labels": cache.labels.contiguous()}
    if cache.text_states is not None:  # a cache for a U-Net without text has none
        tensors.update(text_states=cache.text_states.contiguous(), text_mask=cache.text_mask.contiguous())
    if cache.variants is not None:
        tensors["variants"] = cache.variants.contiguous()
    meta = {"format_version": CACHE_FORMAT, "latent_scale": cache.latent_scale, "count": len(cache),
            "latent_shape": list(cache.latents.shape[1:]), "captions": cache.captions, "inputs": inputs}
    atomic_write(directory / TENSORS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write(directory / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))
    return directory


def load_cache(directory: str | Path) -> LatentCache:
    """Read a cache written by :func:`save_cache`."""
    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text())
    if meta.get("format_version") != CACHE_FORMAT:
        raise ValueError(f"{directory} holds latent cache format {meta.get('format_version')}, "
                         f"expected {CACHE_FORMAT}; delete it to re-encode")
    tensors = load_file(str(directory / TENSORS_FILE))
    mask = tensors.get("text_mask")
    return LatentCache(tensors["latents"], tensors["caption_ids"], tensors["labels"], meta["captions"],
                       tensors.get("text_states"), mask.bool() if mask is not None else None, meta["latent_scale"],
                       directory, tensors.get("variants"))
