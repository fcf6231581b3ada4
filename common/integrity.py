"""The hash of a component's weights file, recorded in its ``config.json`` and checked on every load.

A flipped bit in a ``model.safetensors`` still parses and loads; without a hash it decodes wrong images
(a constant one, for an autoencoder) without a word. :func:`weights_record` is what ``save_component``
writes under ``"weights"``::

    {"file": "model.safetensors", "bytes": 1234, "sha256": "<of the whole file, as `sha256sum` prints>",
     "sampled_sha256": "<only for files over FULL_CHECK_BYTES>"}

Loading (:func:`verify_weights`) always compares the size, then

- files up to :data:`FULL_CHECK_BYTES` (256 MiB, every model this project trains): the SHA-256 of the whole
  file (about 0.3 s per 256 MiB on one core);
- larger files (imported multi-GB U-Nets): the fast path, the SHA-256 of the safetensors header (every
  name, dtype, shape and offset) plus :data:`SAMPLE_BLOCKS` blocks of 64 KiB at evenly strided offsets
  (16 MiB read whatever the size). It catches truncation, a changed header and damage in the sampled
  blocks, not every flipped bit; ``verify_weights(path, record, full=True)`` checks the whole file, and
  ``sha256`` lets anyone check it by hand with ``sha256sum``.

Components saved before hashes were recorded carry no ``"weights"`` entry: they load unverified with an
:class:`UnverifiedWeightsWarning` that says how to add one (load it and ``save_pretrained`` it again).
"""
from __future__ import annotations

import hashlib
import struct
import warnings
from pathlib import Path
from typing import Any

FULL_CHECK_BYTES = 256 * 2**20
SAMPLE_BLOCKS = 256
BLOCK_BYTES = 64 * 2**10
_CHUNK = 8 * 2**20


class IntegrityError(RuntimeError):
    """A weights file whose size or hash differs from the one its ``config.json`` recorded."""


class UnverifiedWeightsWarning(UserWarning):
    """A component saved before weights hashes were recorded: it loads, unchecked."""


def update_with_file(digest: Any, path: Path) -> None:
    """Feed the whole file at ``path`` to a hashlib ``digest``, a chunk at a time."""
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)


def full_sha256(path: Path) -> str:
    """SHA-256 of the whole file (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    update_with_file(digest, path)
    return digest.hexdigest()


def sampled_sha256(path: Path) -> str:
    """SHA-256 of the safetensors header and SAMPLE_BLOCKS evenly strided 64 KiB blocks (the fast path)."""
    size = path.stat().st_size
    digest = hashlib.sha256(struct.pack("<Q", size))
    with open(path, "rb") as handle:
        head = handle.read(8)
        digest.update(head)
        if len(head) == 8:  # the header: a little-endian u64 length, then that many bytes of JSON
            digest.update(handle.read(min(struct.unpack("<Q", head)[0], size)))
        stride = max(BLOCK_BYTES, size // SAMPLE_BLOCKS)
        for offset in range(0, size, stride):
            handle.seek(offset)
            digest.update(handle.read(BLOCK_BYTES))
    return digest.hexdigest()


def weights_record(path: Path) -> dict[str, Any]:
    """What ``config.json`` records about its weights file (see the module docstring)."""
    size = path.stat().st_size
    record: dict[str, Any] = {"file": path.name, "bytes": size, "sha256": full_sha256(path)}
    if size > FULL_CHECK_BYTES:
        record["sampled_sha256"] = sampled_sha256(path)
    return record


def verify_weights(path: Path, record: Any, config_path: Path, full: bool = False) -> None:
    """Compare ``path`` with the ``record`` that ``config_path`` holds; warn when there is none.

    Raises:
        IntegrityError: naming the file, what differs, and the fix.
    """
    if record is None:
        warnings.warn(f"{path} carries no hash in {config_path} (saved before latentgen recorded one), so it is "
                      "loaded unverified; load it and save_pretrained it again to record one",
                      UnverifiedWeightsWarning, stacklevel=3)
        return
    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) or \
            not isinstance(record.get("sha256"), str):
        raise IntegrityError(f"{config_path} has a malformed 'weights' entry {record!r}; it needs 'bytes' and "
                             "'sha256'. Save the component again, or copy it again from its source.")
    fix = "the file is damaged or was replaced: copy it again from its source, or save the component again"
    size = path.stat().st_size
    if size != record["bytes"]:
        raise IntegrityError(f"{path} has {size} bytes but {config_path} recorded {record['bytes']}; {fix}")
    fast = size > FULL_CHECK_BYTES and not full and isinstance(record.get("sampled_sha256"), str)
    key, found = ("sampled_sha256", sampled_sha256(path)) if fast else ("sha256", full_sha256(path))
    if found != record[key]:
        what = "header and sampled blocks" if fast else "SHA-256"
        raise IntegrityError(f"{path}: its {what} ({found[:12]}...) differ from the {key} {config_path} recorded "
                             f"({record[key][:12]}...); {fix}")
