"""Pickled training-checkpoint files read as weights and plain data only: pickled code is never run.

accelerate's ``load_state`` unpickles ``optimizer*.bin``, ``scheduler*.bin``, ``random_states_*.pkl`` and
``custom_checkpoint_*.pkl`` (the last with ``weights_only=False``, so a crafted file there runs code on
resume). :func:`check_checkpoint_pickles` reads every such file of a checkpoint first with torch's
weights-only unpickler and :data:`ALLOWED_GLOBALS`, the few numpy and codecs names accelerate's RNG states
need; anything else is refused with a :class:`~common.checkpoint.CheckpointError` that names the file and
the global. Zip-format files are memory-mapped, so the check reads the pickles and not the tensors.
"""
from __future__ import annotations

import codecs
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.torch_version import TorchVersion

from common.checkpoint import CheckpointError

# Suffixes of the files accelerate unpickles (models are read from .safetensors, step.json as JSON).
PICKLED_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


def _numpy_globals() -> list:
    """numpy's RNG state is a tuple holding a uint32 array, which rebuilds from these names. A checkpoint
    written under numpy 1 names ``numpy.core``, numpy 2's is ``numpy._core``: both are accepted where torch
    takes a name with the object (2.6 and later)."""
    core = np._core if hasattr(np, "_core") else np.core
    names: list = [np.ndarray, np.dtype, core.multiarray._reconstruct]
    if TorchVersion(torch.__version__) >= "2.6":
        names += [(core.multiarray._reconstruct, f"numpy.{module}.multiarray._reconstruct")
                  for module in ("core", "_core")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25 may pickle an array's dtype class by name
        names.append(dtypes.UInt32DType)
    return names


# Globals a checkpoint may name beyond torch's own weights-only set (tensors, storages, OrderedDict):
# codecs.encode rebuilds the bytes inside numpy's pickled arrays.
ALLOWED_GLOBALS: list = [*_numpy_globals(), codecs.encode]


def check_checkpoint_pickles(checkpoint: Path) -> None:
    """Read every pickled file of ``checkpoint`` as weights and plain data only.

    Raises:
        CheckpointError: a file names a global outside the allow-list (pickled code: never run) or does
            not load (damaged); the message names the file, the global or the reason, and the way out.
    """
    for path in sorted(p for p in Path(checkpoint).rglob("*") if p.suffix in PICKLED_SUFFIXES and p.is_file()):
        check_weights_only(path, checkpoint)


def check_weights_only(path: Path, checkpoint: Path) -> None:
    """Load ``path`` with the weights-only unpickler; refuse it when that fails for any reason, since any
    file that fails here would go to an unpickler that runs code."""
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            # mmap: the tensors are mapped, not read (a raw pickle has no zip container to map)
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - whatever the unpickler refused, the file is not loaded
        raise CheckpointError(refusal(path, checkpoint, error)) from None


def refusal(path: Path, checkpoint: Path, error: Exception) -> str:
    """The message for a pickled file that does not load as weights and plain data."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        what = (f"it names the Python object {found.group(1)}, which is neither weights nor plain data; pickled "
                f"code is never run, so this checkpoint is refused. latentgen never writes such an object: the "
                f"file was altered or comes from elsewhere")
    else:
        reason = " ".join(str(error).split())
        what = f"it does not load as weights and plain data ({type(error).__name__}: {reason[:300]})"
    return (f"cannot resume from {checkpoint}: {path.name}: {what}; delete {checkpoint} to resume from the "
            f"checkpoint before it, or choose a new run.out_dir")
