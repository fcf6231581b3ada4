"""A component's config checked against its weights file's header before the module is built for real.

A ``config.json`` is a small text file anyone can edit; building the module it describes allocates every
parameter (a ``codebook_size`` of 8·10⁷ held 4.2 GB before the old shape check could fail). Here the
module is built on PyTorch's ``meta`` device (shapes only, no memory), and every parameter and buffer
name and shape is compared with the safetensors header (read without any tensor data). Only a config
that fits the weights on disk is then built for real, so the memory a load takes is bounded by the size
of the weights file.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.overrides import TorchFunctionMode

SHOWN = 5  # differing keys named in an error


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in a safetensors file, from its header only (no tensor data read)."""
    with safe_open(str(path), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


class _SkipRandomInit(TorchFunctionMode):
    """Random initialisation as a no-op: on the meta device it sets no values anyway, and PyTorch's first
    meta ``normal_`` loads its reference decompositions (2 s and 150 MB per process, measured)."""

    SKIPPED = frozenset({"normal_", "uniform_", "trunc_normal_", "orthogonal_", "kaiming_normal_",
                         "kaiming_uniform_", "xavier_normal_", "xavier_uniform_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - PyTorch's protocol
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]  # Tensor.normal_(self, ...) or nn.init.normal_(tensor=...)
        return func(*args, **kwargs)


def implied_shapes(config: Any, build: Callable[[Any], nn.Module]) -> dict[str, tuple[int, ...]]:
    """The state dict's names and shapes of ``build(config)``, built on the meta device (nothing allocated)."""
    with torch.device("meta"), _SkipRandomInit():
        module = build(config)
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def shape_differences(implied: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]],
                      file: str, model: str) -> dict[str, list[str]]:
    """The differing keys by kind, each sorted: ``"shape mismatches"`` (``"name: (32, 4) in <file>,
    (64, 4) in <model>"``), ``"missing keys"`` (in the model, not the file) and ``"unexpected keys"``."""
    groups = {
        "shape mismatches": [f"{name}: {stored[name]} in {file}, {implied[name]} in {model}"
                             for name in sorted(set(implied) & set(stored)) if implied[name] != stored[name]],
        "missing keys": [f"{name} {implied[name]}" for name in sorted(set(implied) - set(stored))],
        "unexpected keys": [f"{name} {stored[name]}" for name in sorted(set(stored) - set(implied))],
    }
    return {label: names for label, names in groups.items() if names}


def describe(differences: dict[str, list[str]]) -> str:
    """``"2 missing keys: a (3,), b (4,); 1 shape mismatches: ..."``, SHOWN names of each kind at most."""
    parts = []
    for label, names in differences.items():
        more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
        parts.append(f"{len(names)} {label}: " + ", ".join(names[:SHOWN]) + more)
    return "; ".join(parts)


def non_finite_fields(config: Any, where: str = "") -> list[str]:
    """``"key=value"`` for every NaN or infinite float in a (nested) config dataclass.

    JSON as Python reads it accepts ``NaN`` and ``Infinity`` (and ``1e999`` becomes inf), and no field of
    any config here means anything when it is not finite; a dataclass check of ``x < 1`` lets NaN through.
    """
    found = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        values = value if isinstance(value, tuple) else (value,)
        if dataclasses.is_dataclass(value):
            found += non_finite_fields(value, f"{where}{field.name}.")
        elif any(isinstance(v, float) and not math.isfinite(v) for v in values):
            found.append(f"{where}{field.name}={value}")
    return found


def over_limits(values: dict[str, int | float], limits: dict[str, int]) -> list[str]:
    """``"name=value is above limit"`` for each of ``values`` above its entry in ``limits``.

    Config dataclasses bound each size that allocates memory or builds modules in proportion to it, at
    values no real model comes near (each ``LIMITS`` says why), so that a typo or an edited file fails
    with the key named instead of in the allocator or the OOM killer.
    """
    return [f"{name}={value} is above {limits[name]:,}, beyond any real model (a typo?)"
            for name, value in values.items() if value > limits[name]]
