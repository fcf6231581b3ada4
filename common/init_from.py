"""``init_from=PATH``: start a training run from a trained (or imported) component instead of random weights.

Every training config has the field (:class:`InitFrom`); each training script names the component it
trains (:class:`Component`: the U-Net, the prior, the autoencoder, the classifier) and calls
:func:`init_weights` on its freshly built model before the optimizer and the EMA are made, so the EMA
starts from the loaded weights too and the optimizer starts fresh. ``PATH`` may be

- a component directory (``config.json`` of that kind + ``model.safetensors``),
- a pipeline directory holding the component as a sub-folder (``pipeline/unet``),
- a training run directory (``run/pipeline/unet``, or ``run/autoencoder`` / ``run/classifier``),
- for stages with an importer, a foreign format (a diffusers U-Net, VAE or Stable Diffusion folder).

A run that resumes ignores ``init_from``: its checkpoint holds the weights (so the source may be gone).
The model the config builds must match the source's: any missing, unexpected or mis-shaped tensor fails
before training, naming them and the config fields that differ.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from common.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    find_pipeline_dir,
    load_component,
    load_state_strict,
    read_json_object,
)
from common.config import to_dict
from common.run_state import latest_checkpoint


class InitFromError(CheckpointError):
    """An ``init_from`` source that cannot be found, read, or loaded into the model the config builds."""


@dataclass(frozen=True)
class InitFrom:
    """The ``init_from`` field every training config inherits (see the module docstring): "" trains from
    scratch; a path starts from that component's weights with a fresh optimizer."""

    init_from: str = ""


# A foreign-format importer: the path -> a built module whose state dict is loaded.
Importer = Callable[[Path], nn.Module]


@dataclass(frozen=True)
class Component:
    """What a training script trains, as ``init_from`` looks for it.

    name: its sub-folder in a pipeline or run directory ("unet", "prior", "autoencoder", "classifier").
    kind: the ``kind`` in its ``config.json``.
    config_cls: its config dataclass, to read the source's config.
    importer: reads the foreign formats the stage has an importer for (diffusers folders), or None.
    """

    name: str
    kind: str
    config_cls: type
    importer: Importer | None = None


def is_foreign(path: Path) -> bool:
    """A diffusers folder (``model_index.json``, or a ``config.json`` with ``_class_name``) or a single
    legacy checkpoint file, which the stage's importer reads."""
    if path.is_file():
        return path.suffix in (".ckpt", ".pt", ".pth", ".bin")
    if (path / "model_index.json").is_file():
        return True
    config = path / CONFIG_FILE
    return config.is_file() and "_class_name" in read_json_object(config, "copy the folder again from its source")


def component_dir(path: str | Path, component: Component) -> Path:
    """The directory holding ``component`` in ``path`` (see the module docstring for what ``path`` may be)."""
    path = Path(path)
    candidates = [path, path / component.name]
    try:
        candidates.append(find_pipeline_dir(path) / component.name)
    except CheckpointError:
        pass
    for candidate in candidates:
        config = candidate / CONFIG_FILE
        if config.is_file() and read_json_object(config, "re-save the component").get("kind") == component.kind:
            return candidate
    missing = " (it does not exist)" if not path.exists() else ""
    raise InitFromError(f"init_from={path} holds no {component.kind!r} component{missing}: give a {component.name} "
                        f"component directory ({CONFIG_FILE} with kind {component.kind!r}), a pipeline directory "
                        f"with {component.name}/, or a training run directory with pipeline/{component.name}/ or "
                        f"{component.name}/" + (", or a diffusers folder" if component.importer else ""))


def read_source(path: str | Path, component: Component) -> tuple[str, dict[str, Tensor], Any]:
    """(a description of the source, its weights, its config or None) for ``init_from=path``."""
    path = Path(path)
    if component.importer is not None and path.exists() and is_foreign(path):
        module = component.importer(path)
        return f"init_from={path} (imported)", module.state_dict(), getattr(module, "config", None)
    directory = component_dir(path, component)
    config, state = load_component(directory, component.kind, component.config_cls)
    return f"init_from={directory}", state, config


def init_weights(model: nn.Module, cfg: Any, component: Component, config: Any = None,
                 print_fn: Callable[[str], Any] = print) -> str | None:
    """Load ``cfg.init_from``'s ``component`` into ``model`` unless the run resumes (returns the source
    directory or description, None when nothing was loaded).

    ``config`` is the model's config, compared field by field with the source's when they do not fit.

    Raises:
        InitFromError: no such component, or tensors that do not fit the model (naming them, the config
            fields that differ, and the fix).
    """
    if not cfg.init_from:
        return None
    if latest_checkpoint(cfg.run.out_dir) is not None:
        print_fn(f"init_from={cfg.init_from} ignored: the run resumes from its checkpoint, which holds the weights")
        return None
    source, state, source_config = read_source(cfg.init_from, component)
    try:
        load_state_strict(model, state, "the source")
    except CheckpointError as error:
        found = str(error).rsplit(". Was it", 1)[0]
        raise InitFromError(f"{source}: {found}. {mismatch_advice(config, source_config)}") from None
    print_fn(f"{source}: {component.name} weights loaded ({len(state)} tensors); fresh optimizer")
    return source


def mismatch_advice(ours: Any, theirs: Any) -> str:
    """How to make the config build the source's model: the fields that differ, when both configs are known."""
    fix = ("Match the config's model section to the source's (or take it from the source's config.json); "
           "init_from needs the same architecture")
    if ours is None or theirs is None or type(ours) is not type(theirs):
        return fix + "."
    mine, source = _flat(to_dict(ours)), _flat(to_dict(theirs))
    differ = [f"{key}: {source.get(key)!r} in the source, {mine.get(key)!r} here" for key in sorted(mine | source)
              if mine.get(key) != source.get(key)]
    return fix + (f"; fields that differ: {'; '.join(differ[:12])}." if differ else ".")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def source_pipeline(path: str | Path) -> Path | None:
    """The pipeline directory of an ``init_from`` source (a pipeline or run directory), None for others."""
    try:
        return find_pipeline_dir(path)
    except CheckpointError:
        return None


def check_same_autoencoder(path: str | Path, autoencoder_dir: Path, setting: str) -> None:
    """Refuse a run whose stage 1 differs from the one the ``init_from`` pipeline's generator was trained on:
    its latents (or tokens) would mean something else. Compares the weights' SHA-256 recorded in each
    autoencoder's ``config.json``; a source that is not a pipeline is not checked."""
    pipeline = source_pipeline(path)
    if pipeline is None or not (pipeline / "autoencoder" / CONFIG_FILE).is_file():
        return
    theirs = _weights_sha(pipeline / "autoencoder")
    ours = _weights_sha(autoencoder_dir)
    if theirs and ours and theirs != ours:
        raise InitFromError(f"init_from={path} was trained on the latents of {pipeline / 'autoencoder'}, but "
                            f"{setting} is {autoencoder_dir}, another autoencoder; set {setting}={pipeline} "
                            "(a pipeline directory holds its autoencoder)")


def _weights_sha(directory: Path) -> str | None:
    """The recorded SHA-256 of an autoencoder's weights (given its component or the run holding it), if any."""
    for config in (directory / CONFIG_FILE, directory / "autoencoder" / CONFIG_FILE):
        if config.is_file():
            return (json.loads(config.read_text()).get("weights") or {}).get("sha256")
    return None
