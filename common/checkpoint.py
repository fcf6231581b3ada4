"""Components on disk: a directory with ``config.json`` and ``model.safetensors``.

Writes are atomic (temporary file, fsync, rename), so a save killed half-way leaves the previous
files intact. ``config.json`` records the weights' size and SHA-256 (:mod:`common.integrity`); loading
checks them, then checks the config against the weights' header before building anything
(:mod:`common.component_check`), then loads strictly: a missing or unexpected key, or a shape that
differs, is an error that names them. Legacy pickled ``.ckpt`` files are read with ``torch.load(weights_only=True)``,
which refuses pickled code instead of running it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from common.component_check import describe, header_shapes, implied_shapes, non_finite_fields, shape_differences
from common.config import ConfigError, from_dict, to_dict
from common.integrity import IntegrityError, verify_weights, weights_record

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PIPELINE_FILE = "pipeline.json"  # the record of a pipeline directory (diffusion and token prior alike)
FORMAT_VERSION = 1
TRAIN_PIPELINE = ("`accelerate launch diffusion/train_latent.py configs/diffusion/<config>.yaml` or "
                  "`accelerate launch prior/train.py configs/prior/<config>.yaml` (each writes <run.out_dir>/pipeline)")
T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


class CheckpointError(RuntimeError):
    """A component directory or checkpoint that cannot be loaded as asked."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers (safetensors) create 0600; components are shared files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return path


def find_pipeline_dir(path: str | Path, how_to_train: str = TRAIN_PIPELINE, part: str = "pipeline",
                      marker: str = PIPELINE_FILE) -> Path:
    """``path`` if it holds ``marker``, else ``path/part`` (a training run directory's ``pipeline/``).

    The one finder for every kind of pipeline (diffusion, token prior) and, with ``part`` and
    ``marker``, for other parts a run directory holds (a classifier run's ``classifier/config.json``).

    Args:
        path: the directory itself, or a training run directory that holds it as ``part``.
        how_to_train: the command the error suggests for making one.
        part: the sub-directory of a run directory, also the name of what is looked for.
        marker: the file that makes a directory one.

    Raises:
        CheckpointError: "PATH is neither a pipeline directory nor a run directory with
            pipeline/pipeline.json (it does not exist); train one with ...".
    """
    path = Path(path)
    for candidate in (path, path / part):
        if (candidate / marker).is_file():
            return candidate
    missing = " (it does not exist)" if not path.exists() else ""
    raise CheckpointError(f"{path} is neither a {part} directory nor a run directory with {part}/{marker}"
                          f"{missing}; train one with {how_to_train}")


def save_component(directory: str | Path, kind: str, config: Any, state: nn.Module | dict[str, Tensor]) -> Path:
    """Save one component: its weights as safetensors, then its kind, config and the weights' hash as JSON
    (see :mod:`common.integrity`; the JSON is written last, so it only ever describes complete weights)."""
    directory = Path(directory)
    state_dict = state.state_dict() if isinstance(state, nn.Module) else state
    # Copies to CPU so tied or non-contiguous tensors serialise; safetensors refuses shared storage.
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state_dict.items()}
    weights = atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"kind": kind}))
    meta = {"kind": kind, "format_version": FORMAT_VERSION, "config": to_dict(config),
            "weights": weights_record(weights)}
    atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``, or one CheckpointError naming the file: unreadable, not JSON (truncated,
    edited) or JSON of another type. ``fix`` ends the message."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read ({type(error).__name__}: {error}); {fix}") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}; truncated or edited?); {fix}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object of keys; {fix}")
    return data


def read_pipeline_json(directory: str | Path) -> dict[str, Any]:
    """The record of a pipeline directory (``pipeline.json``) as a dict; malformed files name themselves."""
    return read_json_object(Path(directory) / PIPELINE_FILE, "save the pipeline again (save_pretrained) or copy "
                            "it again from its source")


def _read_component_meta(directory: Path, kind: str) -> tuple[Path, dict[str, Any]]:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} is not a latentgen component directory: {CONFIG_FILE} is missing. "
            f"Point to a directory written by save_component / save_pretrained (it holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE})."
        )
    meta = read_json_object(config_path, "re-save the component, or copy it again from its source")
    found = meta.get("kind")
    if found != kind:
        raise CheckpointError(f"{directory} holds a {found!r} component, but a {kind!r} was expected.")
    return config_path, meta


def read_component_config(directory: str | Path, kind: str, config_cls: type[T]) -> T:
    """Read and validate the config of a component directory that must hold ``kind``."""
    return _parse_config(*_read_component_meta(Path(directory), kind), kind, config_cls)


def _parse_config(config_path: Path, meta: dict[str, Any], kind: str, config_cls: type[T]) -> T:
    try:
        config = from_dict(config_cls, meta.get("config", {}))
    except ConfigError as error:
        raise CheckpointError(f"{config_path} does not describe a valid {kind!r}: {error} "
                              "Was it written by another version of latentgen, or edited?") from None
    bad = non_finite_fields(config, "config.")
    if bad:
        raise CheckpointError(f"{config_path} holds non-finite values ({', '.join(bad)}); every number in a component "
                              "config must be finite. Restore the file saved with the weights.")
    return config


def load_component(directory: str | Path, kind: str, config_cls: type[T], build: Callable[[T], nn.Module] | None = None,
                   **overrides: Any) -> tuple[T, dict[str, Tensor]]:
    """Return the validated config and the weights of a component directory.

    In order, before any tensor is loaded: the config is validated (with ``overrides`` applied), the
    weights file's header is read, with ``build`` (config -> module) every parameter and buffer shape the
    config implies is compared with the header (:mod:`common.component_check`; the module is built on the
    meta device, so an absurd config allocates nothing), and the file's size and hash are compared with
    the ones ``config.json`` recorded (:mod:`common.integrity`).
    """
    directory = Path(directory)
    config_path, meta = _read_component_meta(directory, kind)
    config = _parse_config(config_path, meta, kind, config_cls)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has a {CONFIG_FILE} but no {WEIGHTS_FILE}; the save did not finish.")
    stored = _read_header(weights)
    if build is not None:  # before the hash: a file of other tensors is better named by what differs
        check_config_fits(config_path, config, build, stored)
    try:
        verify_weights(weights, meta.get("weights"), config_path)
    except IntegrityError as error:
        raise CheckpointError(str(error)) from None
    try:
        return config, load_file(str(weights))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise _damaged(weights, error) from None


def load_module(directory: str | Path, kind: str, config_cls: type[T], build: Callable[[T], M],
                **overrides: Any) -> M:
    """Build and load a component strictly (see :func:`load_component` for what is checked first)."""
    config, state = load_component(directory, kind, config_cls, build, **overrides)
    module = build(config)
    load_state_strict(module, state, str(directory))
    return module


def check_config_fits(config_path: Path, config: Any, build: Callable[[Any], nn.Module],
                      stored: dict[str, tuple[int, ...]]) -> None:
    """Refuse a config whose module (built on the meta device) has other tensors than the weights file."""
    weights = config_path.with_name(WEIGHTS_FILE)
    try:
        implied = implied_shapes(config, build)
    except (ConfigError, ValueError, TypeError) as error:
        raise CheckpointError(f"{config_path} describes no buildable model: {error}") from None
    differences = shape_differences(implied, stored, WEIGHTS_FILE, f"the model {CONFIG_FILE} describes")
    if differences:
        raise CheckpointError(
            f"{config_path} does not fit {weights} ({describe(differences)}). "
            f"The weights were saved from a model with a different config: restore the {CONFIG_FILE} saved with "
            "them, or point to the directory whose weights it describes.")


def _read_header(weights: Path) -> dict[str, tuple[int, ...]]:
    try:
        return header_shapes(weights)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise _damaged(weights, error) from None


def _damaged(weights: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{weights} cannot be read ({type(error).__name__}: {error}): the file is damaged or "
                           "truncated. Save the component again, or copy it again from its source.")


def load_state_strict(module: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Load weights, failing with the names of missing, unexpected and mis-shaped tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = [
        f"{k}: {tuple(state_dict[k].shape)} in {source}, {tuple(own[k].shape)} in the model"
        for k in sorted(set(own) & set(state_dict))
        if own[k].shape != state_dict[k].shape
    ]
    problems = []
    for label, names in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped)):
        if names:
            shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
            problems.append(f"{len(names)} {label}: {shown}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit {type(module).__name__}: " + "; ".join(problems)
            + ". Was it saved from a model with a different config?"
        )
    module.load_state_dict(state_dict, strict=True)


def load_legacy_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a pickled ``.ckpt``/``.pt`` for conversion, refusing anything but tensors and plain data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the download or copy did not finish")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError depending on the payload
        if "weights only load failed" not in str(error).lower():  # not a refusal: the file itself is broken
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]}): "
                "it is truncated, damaged or not a PyTorch checkpoint. Download or copy it again.") from error
        # torch's own text advises weights_only=False; keep only the line that names the offending object.
        lines = str(error).splitlines()
        reason = next((line.strip() for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[0])
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain data ({reason}). "
            "Only weights are read from legacy checkpoints; pickled code is never executed. "
            "If you trust the file, extract its 'state_dict' in a separate script and save it as safetensors."
        ) from error
