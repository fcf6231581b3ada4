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

On disk, under ``cache_root/<key>/`` (layout and parallel build: :mod:`common.cache_build`):
``latents.npy``, ``labels.npy``, ``caption_ids.npy``, the captions, ``variants.npy``, each distinct
caption's (and phrasing's) text states unpadded in fp16, and ``meta.json`` (latent_scale, what was
encoded), written last. Training memory-maps them, so a process holds the pages it reads, not the
dataset, and only each batch goes to the GPU. The key hashes the autoencoder's weights and config, the
data config, a fingerprint of the dataset's items and the text encoder config, so a second run with
the same inputs reuses the files and any change re-encodes.

Text states are stored, never encoded on the fly, even when captions are mostly unique. The rule:
storing costs one encoding of each distinct text (U (1 + templates)), once per cache; on the fly costs
one encoding per item drawn, N per epoch, in every run; a stored batch costs a gather from the page
cache, far less than a text-encoder call (``bench.data_growth`` measures both per caption). So storing
is slower only for a single run of fewer than U (1 + templates) / N epochs, which no training does.

Shapes: N items, D latent channels, h w latent grid, U unique captions, L tokens, E text width.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from autoencoder.model import VQGAN, Autoencoder
from common.array_store import Processes, TextStore, read_json
from common.cache_build import META_FILE, CacheSpec, build_cache, ensure_built, open_cache
from common.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from common.config import to_dict
from common.data import DataConfig, build_dataset
from common.integrity import update_with_file
from common.text_encoder import BUNDLED_PACKAGE, TextEmbedding, TextEncoder, TextEncoderConfig

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 1: one safetensors file in RAM, text states padded fp32
NULL_CAPTION = ""
NULL_ID = 0  # caption id of the null condition in every cache


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
    """An encoded dataset on disk; items are ``{"latent": (D, h, w), "caption_id": int, "label": int}``.

    Every array is a memory map of the cache's files (:mod:`common.array_store`): a process holds the
    pages it reads, not the dataset, and :meth:`text` pads the text states of each batch, on its device.

    Attributes:
        latents: (N, D, h, w) float32 scaled latents.
        caption_ids: (N,) int64 indices into ``captions``.
        labels: (N,) int64 dataset labels.
        captions: U unique captions; ``captions[NULL_ID]`` is "".
        text_states: the captions' token states, unpadded fp16 (:class:`TextStore`); None in a cache built
            without text.
        latent_scale: the factor the latents were multiplied by.
        directory: where the cache lives on disk.
        variants: (U, 1 + templates) caption ids of each caption's phrasings; None without caption templates.
    """

    def __init__(self, latents: Tensor, caption_ids: Tensor, labels: Tensor, captions: Sequence[str],
                 text_states: TextStore | None, latent_scale: float, directory: Path | None = None,
                 variants: Tensor | None = None) -> None:
        if captions[NULL_ID] != NULL_CAPTION:
            raise ValueError(f"caption {NULL_ID} of a latent cache must be the empty (null) caption")
        self.latents, self.caption_ids, self.labels = latents, caption_ids, labels
        self.captions, self.text_states = captions, text_states
        self.latent_scale, self.directory, self.variants = float(latent_scale), directory, variants

    @property
    def text_mask(self) -> Tensor | None:
        """None in a cache without text, else each caption's token count (U,): masks are made per batch by
        :meth:`text` (kept for callers that test for text)."""
        return None if self.text_states is None else torch.from_numpy(self.text_states.lengths())

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"latent": self.latents[index], "caption_id": self.caption_ids[index], "label": self.labels[index]}

    def text(self, caption_ids: Tensor) -> TextEmbedding:
        """The cached embeddings of ``caption_ids`` (B,) on their device: float32 states (B, L, E), zero at
        padding, and mask (B, L), with L the longest of these captions (the U-Net's attention masks the rest).
        The states were stored in fp16: within 2^-11 relative of a fresh fp32 encoding."""
        if self.text_states is None:
            raise ValueError(f"the latent cache {self.directory} holds no text embeddings: it was built for a U-Net "
                             f"without text (model.context_dim: 0)")
        return TextEmbedding(*self.text_states.gather(caption_ids))

    def text_to(self, device: torch.device | str) -> LatentCache:
        """Returns self and moves nothing: the text states stay on disk and :meth:`text` sends each batch's
        to the batch's device (kept so that callers written for an in-memory cache work unchanged)."""
        return self

    def phrasings(self, caption_ids: Tensor) -> Tensor:
        """One phrasing of each caption id (B,), drawn from the global RNG on the ids' device (the same draw as
        :func:`common.captions.draw_phrasings`); the ids themselves without caption templates."""
        if self.variants is None:
            return caption_ids
        columns = torch.randint(self.variants.shape[1], caption_ids.shape, device=caption_ids.device)
        return self.variants[caption_ids.cpu(), columns.cpu()].to(caption_ids.device)


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
    update_with_file(digest, autoencoder_dir / WEIGHTS_FILE)
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
                        batch_size: int = 64, progress: bool = False, templates: tuple[str, ...] = (),
                        accelerator: Any | None = None) -> LatentCache:
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
        accelerator: with an ``accelerate.Accelerator``, every one of its processes must call this at once:
            each encodes its share of a missing cache (:mod:`common.cache_build`). Without, this process
            encodes all of it (other processes wait, e.g. in ``accelerator.main_process_first()``).
    """
    autoencoder_dir = resolve_autoencoder_dir(autoencoder_path)
    dataset = build_dataset(data)
    templates = tuple(templates) if text is not None else ()
    key = cache_key(autoencoder_dir, data, text, dataset, templates)
    directory = Path(cache_root) / key[:20]
    processes = Processes.of(accelerator)

    def build() -> None:
        logger.info("encoding %s into a latent cache at %s", data.name, directory)
        model = autoencoder if autoencoder is not None else Autoencoder.from_pretrained(autoencoder_dir)
        encoder = None if text is None else text_encoder if text_encoder is not None else TextEncoder(text)
        inputs = {"key": key, "autoencoder": str(autoencoder_dir), "data": to_dict(data),
                  "text": to_dict(text) if text is not None else None, "templates": list(templates)}
        encode_dataset(dataset, directory, model.to(device).eval(), encoder.to(device) if encoder is not None else None,
                       batch_size=batch_size, progress=progress, templates=templates, processes=processes,
                       inputs=inputs)

    ensure_built(directory, processes, build)
    return load_cache(directory)


def encode_dataset(dataset: Dataset, directory: Path, autoencoder: Autoencoder, text_encoder: TextEncoder | None,
                   *, batch_size: int = 64, progress: bool = False, templates: tuple[str, ...] = (),
                   processes: Processes = Processes(), inputs: dict | None = None) -> None:
    """Encode every item of ``dataset`` into the cache ``directory`` on the models' device: images in batches,
    each distinct caption and its ``templates``' phrasings once unless ``text_encoder`` is None. Each of
    ``processes`` encodes its share (:func:`common.cache_build.build_cache`)."""
    device = next(autoencoder.parameters()).device

    def items(indices: range) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
        # its own generator: starting a loader draws a seed, which must not move the global RNG
        loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=0,
                            generator=torch.Generator())
        for batch in loader:
            yield (encode_latents(autoencoder, batch["image"].to(device)).cpu(),
                   torch.as_tensor(batch["label"]).long(), list(batch["caption"]))

    def texts(captions: list[str]) -> tuple[Tensor, Tensor]:
        embedding = text_encoder.encode(captions)
        return embedding.states, embedding.mask

    spec = CacheSpec("latents", items, lambda captions: [NULL_CAPTION] + sorted(set(captions) - {NULL_CAPTION}),
                     texts if text_encoder is not None else None, templates, unit_variance=True)
    build_cache(directory, len(dataset), spec, processes, {"format_version": CACHE_FORMAT, "inputs": inputs or {}},
                progress)


def pad_tokens(text: TextEmbedding, length: int) -> TextEmbedding:
    """Pad (B, L, E) states and (B, L) mask to ``length`` tokens with masked-out zeros."""
    extra = length - text.states.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {text.states.shape[1]} tokens down to {length}")
    if extra == 0:
        return text
    states = torch.nn.functional.pad(text.states, (0, 0, 0, extra))
    return TextEmbedding(states, torch.nn.functional.pad(text.mask, (0, extra), value=False))


def load_cache(directory: str | Path) -> LatentCache:
    """Open a cache written by :func:`encode_dataset`; its arrays stay on disk (memory maps)."""
    directory = Path(directory)
    meta = read_json(directory / META_FILE)
    if meta.get("format_version") != CACHE_FORMAT:
        raise ValueError(f"{directory} holds latent cache format {meta.get('format_version')}, "
                         f"expected {CACHE_FORMAT}; delete it to re-encode")
    stored = open_cache(directory)
    return LatentCache(stored.rows, stored.caption_ids, stored.labels, stored.captions, stored.text, meta["scale"],
                       directory, stored.variants)
