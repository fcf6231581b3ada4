"""LoRA adapters on a pipeline: :meth:`pipelines.base.Pipeline.load_lora` and ``unload_lora`` delegate here.

The adapter goes on the pipeline's generator network, the one its file names (``unet`` of a diffusion
pipeline, ``prior`` of a token pipeline), unmerged: the base layers stay as they were, so unloading puts
them back bit for bit and ``scale`` only sets the adapter's strength (0: the base's images exactly).
One adapter at a time: loading another replaces it. Pipelines made with ``from_pipe`` share the network,
and so share its adapter.

    pipe = TextToImage.from_pretrained("runs/emoji32_diffusion")
    pipe.load_lora("runs/emoji_lora", scale=0.8)   # the run directory, its lora/ or the .safetensors file
    pipe.unload_lora()
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from common.lora import Adapter, AdapterError, attach, detach, fingerprint, read_adapter

# The attribute of each bundle that holds a network adapters may go on.
NETWORKS = ("unet", "prior")


def network_for(bundle: Any, adapter: Adapter) -> nn.Module:
    """The network of ``bundle`` the adapter is for (its file's ``component``; else the one the bundle has)."""
    names = [adapter.component] if adapter.component else [name for name in NETWORKS if hasattr(bundle, name)]
    network = getattr(bundle, names[0], None) if names else None
    if not isinstance(network, nn.Module):
        have = [name for name in NETWORKS if isinstance(getattr(bundle, name, None), nn.Module)]
        raise AdapterError(f"{adapter.path} adapts a {adapter.component or 'generator'} network, which this pipeline "
                           f"lacks (it has {', '.join(have) or 'none'}); load it on a pipeline of the kind it was "
                           "trained on")
    return network


def load_lora(bundle: Any, path: str | Path, scale: float = 1.0) -> Path:
    """Attach the adapter at ``path`` to the bundle's network at ``scale``; returns the adapter file.

    A base that differs from the one the adapter was trained on (same shapes, other weights) is allowed,
    as in diffusers, with a warning; one whose modules or shapes do not fit raises
    :class:`common.lora.AdapterError` naming them.
    """
    adapter = read_adapter(path)
    network = network_for(bundle, adapter)
    attach(network, adapter, scale)
    if adapter.base_fingerprint and fingerprint(network, adapter.modules) != adapter.base_fingerprint:
        warnings.warn(f"{adapter.path} was trained on other base weights than this pipeline's (its "
                      "adapter_config.json names its base); the images may differ from what it was trained for",
                      UserWarning, stacklevel=3)
    return adapter.path


def unload_lora(bundle: Any) -> None:
    """Remove the adapter from every network of the bundle, restoring their weights bit for bit."""
    for name in NETWORKS:
        network = getattr(bundle, name, None)
        if isinstance(network, nn.Module):
            detach(network)
