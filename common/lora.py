"""LoRA adapters through ``peft``: the ``lora`` config section, training-time injection, the adapter file,
and attaching / detaching a saved adapter on a network.

An adapter directory (``<run>/lora/``, written by the diffusion and prior training scripts)::

    adapter_model.safetensors  the adapter alone, in peft's key format ("<module>.lora_A.weight",
                               "<module>.lora_B.weight", as ``peft.get_peft_model_state_dict`` gives);
                               its metadata names the component it adapts ("unet" / "prior") and the
                               fingerprint of the base weights it was trained on
    adapter_config.json        peft's ``LoraConfig`` (r, lora_alpha, target_modules, ...;
                               ``base_model_name_or_path`` is the run's ``init_from``)

Adapters are never merged into the weights: peft's layers compute ``base(x) + scale * B(A(x))`` beside
the untouched base layer, so :func:`detach` (putting the base layers back) restores the network bit for
bit, and the scale can change at any time.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from common.checkpoint import CheckpointError, atomic_write, read_json_object
from common.config import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig

ADAPTER_DIR = "lora"  # a training run's adapter sub-directory
ADAPTER_FILE = "adapter_model.safetensors"  # peft's names, so peft tools read the directory
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"
# The query/key/value/output projections of common.layers.Attention, used by the U-Net's and the priors'
# transformer blocks alike.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


class AdapterError(CheckpointError):
    """An adapter file that cannot be read, or that does not fit the network it is loaded on."""


@dataclass(frozen=True)
class LoraConfig:
    """The ``lora`` section of the diffusion and prior training configs.

    rank: the adapters' rank r; 0 trains the whole network as usual (no adapters). With r > 0 the
        network's ``targets`` get LoRA adapters, everything else is frozen, and only the adapters
        train; it needs ``init_from`` (adapters on random weights adapt nothing).
    alpha: the adapters' scale is alpha / rank; 0 means alpha = rank (scale 1).
    targets: module names (peft matches them against the ends of the dotted names) of linear layers.
    dropout: dropout on the adapters' input during training.
    """

    rank: int = 0
    alpha: float = 0.0
    targets: tuple[str, ...] = ATTENTION_PROJECTIONS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"rank={self.rank} is out of range: it must be >= 0 (0 = no adapters)")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ConfigError(f"alpha={self.alpha!r} is out of range: it must be a finite number >= 0 (0 = rank)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} is out of range: it must be in [0, 1)")
        if self.rank and not self.targets:
            raise ConfigError(f"targets is empty; name the layers to adapt, e.g. {list(ATTENTION_PROJECTIONS)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def peft_config(self) -> PeftLoraConfig:
        from peft import LoraConfig as PeftLoraConfig  # peft (and transformers) take seconds to import: lazily

        return PeftLoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, target_modules=list(self.targets),
                              lora_dropout=self.dropout)


def check_lora(lora: LoraConfig, init_from: str) -> None:
    """Refuse adapters without a base to adapt: ``lora.rank`` > 0 needs ``init_from``."""
    if lora.enabled and not init_from:
        raise ConfigError(f"lora.rank={lora.rank} trains adapters on a trained model, but init_from is empty; set "
                          "init_from=<pipeline or run directory> (or lora.rank=0 to train the whole network)")


# ----------------------------------------------------------------------------------------------- training
def add_adapters(network: nn.Module, lora: LoraConfig, where: str = "lora.targets") -> nn.Module:
    """Inject fresh adapters into ``network`` in place (peft freezes every other parameter); returns it.

    Raises:
        ConfigError: a target matches no linear layer; the message lists the names that would.
    """
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(lora.peft_config(), network, ADAPTER_NAME)
    except ValueError as error:
        raise ConfigError(f"{where}={list(lora.targets)} does not fit {type(network).__name__} "
                          f"({' '.join(str(error).split())[:300]}); its linear layers are named "
                          f"{', '.join(linear_names(network)[:12])}") from None
    layers = {name: network.get_submodule(name).base_layer for name in adapted_names(network)}
    other = [name for name, layer in layers.items() if not isinstance(layer, nn.Linear)]
    if other:  # pipelines load adapters on linear layers only
        detach(network)
        raise ConfigError(f"{where}={list(lora.targets)} matches layers that are not linear ({', '.join(other[:5])}); "
                          f"name linear layers only: {', '.join(linear_names(network)[:12])}")
    return network


def linear_names(network: nn.Module) -> list[str]:
    """The distinct last names of the network's linear layers (what ``targets`` may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in network.named_modules() if isinstance(m, nn.Linear)})


def trainable(params: Any) -> list:
    """Only the parameters (or AdamW param groups) that train: with adapters, only theirs."""
    if params and isinstance(params[0], dict):
        groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in params]
        return [group for group in groups if group["params"]]
    return [p for p in params if p.requires_grad]


def lora_layers(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that carry an adapter, with their names. None can before peft is imported (an adapter is
    added or attached through it), so a run or pipeline without adapters never imports peft: 6 s saved."""
    peft_lora = sys.modules.get("peft.tuners.lora")
    if peft_lora is None:
        return []
    return [(name, module) for name, module in network.named_modules() if isinstance(module, peft_lora.LoraLayer)]


def adapted_names(network: nn.Module) -> list[str]:
    """The names of the modules that carry an adapter."""
    return [name for name, _ in lora_layers(network)]


def without_adapters(network: nn.Module) -> nn.Module:
    """A copy of ``network`` with its base layers back in place of the adapted ones (what a pipeline saves)."""
    return detach(copy.deepcopy(network))


def fingerprint(network: nn.Module, names: list[str]) -> str:
    """SHA-256 of the base weights of the modules ``names`` (adapted or not): the identity of the base an
    adapter was trained on, checked when it is loaded."""
    modules = dict(network.named_modules())
    digest = hashlib.sha256()
    for name in sorted(names):
        module = modules[name]
        weight = getattr(module, "base_layer", module).weight.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode() + weight.numpy().tobytes())
    return digest.hexdigest()


def save_adapter(network: nn.Module, directory: str | Path, lora: LoraConfig, component: str, base: str) -> Path:
    """Write ``network``'s adapter alone to ``directory`` (see the module docstring); returns the weights file."""
    from peft import get_peft_model_state_dict

    directory = Path(directory)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(network).items()}
    names = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    meta = {"format": "latentgen-lora", "component": component, "base_fingerprint": fingerprint(network, names)}
    path = atomic_write(directory / ADAPTER_FILE, lambda tmp: save_file(state, str(tmp), metadata=meta))
    config = {**lora.peft_config().to_dict(), "base_model_name_or_path": base}
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    text = json.dumps(config, indent=2, default=str) + "\n"
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: tmp.write_text(text))
    return path


# ------------------------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class Adapter:
    """A saved adapter: its tensors (peft keys), rank and alpha, the component it adapts and its base's fingerprint."""

    path: Path
    state: dict[str, Tensor]
    rank: int
    alpha: float
    component: str
    base_fingerprint: str

    @property
    def modules(self) -> list[str]:
        return sorted({key.rsplit(".lora_", 1)[0] for key in self.state})


def find_adapter(path: str | Path) -> Path:
    """The adapter file given it, its directory, or a training run directory holding ``lora/``."""
    path = Path(path)
    for candidate in (path, path / ADAPTER_FILE, path / ADAPTER_DIR / ADAPTER_FILE):
        if candidate.is_file():
            return candidate
    missing = " (it does not exist)" if not path.exists() else ""
    raise AdapterError(f"{path} is neither a LoRA adapter file nor a directory with {ADAPTER_FILE} or "
                       f"{ADAPTER_DIR}/{ADAPTER_FILE}{missing}; train one with `accelerate launch "
                       f"diffusion/train_latent.py CONFIG init_from=BASE lora.rank=8` (it writes <run>/{ADAPTER_DIR})")


def read_adapter(path: str | Path) -> Adapter:
    """Read an adapter (see :func:`find_adapter` for ``path``), checking its keys and its config."""
    file = find_adapter(path)
    try:
        with safe_open(str(file), "pt") as handle:
            meta = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise AdapterError(f"{file} cannot be read ({type(error).__name__}: {error}): it is damaged or not a "
                           "safetensors file; copy it again from its run") from None
    odd = [key for key in state if not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight"))]
    if odd or not state:
        raise AdapterError(f"{file} is not a LoRA adapter in peft's format: keys must end in .lora_A.weight / "
                           f".lora_B.weight{f', found {odd[:5]}' if odd else ' (it holds none)'}")
    config = read_json_object(file.with_name(ADAPTER_CONFIG), f"copy {ADAPTER_CONFIG} from the adapter's run "
                              "directory beside the adapter file")
    rank = int(config.get("r", 0))
    if rank <= 0:
        raise AdapterError(f"{file.with_name(ADAPTER_CONFIG)} gives no rank r > 0")
    return Adapter(file, state, rank, float(config.get("lora_alpha") or rank), meta.get("component", ""),
                   meta.get("base_fingerprint", ""))


def check_fits(network: nn.Module, adapter: Adapter) -> None:
    """Refuse an adapter whose modules ``network`` lacks, or whose shapes do not fit its linear layers."""
    modules = {name: getattr(module, "base_layer", module) for name, module in network.named_modules()}  # adapted too
    missing = [name for name in adapter.modules if not isinstance(modules.get(name), nn.Linear)]
    wrong = []
    for name in adapter.modules:
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            continue
        want = {"lora_A": (adapter.rank, layer.in_features), "lora_B": (layer.out_features, adapter.rank)}
        for part, shape in want.items():
            got = tuple(adapter.state[f"{name}.{part}.weight"].shape)
            if got != shape:
                wrong.append(f"{name}.{part}.weight: {got} in the adapter, {shape} fits the model")
    if missing or wrong:
        problems = ([f"{len(missing)} target modules missing (or not linear): {', '.join(missing[:8])}"]
                    if missing else []) + ([f"{len(wrong)} shape mismatches: {', '.join(wrong[:8])}"] if wrong else [])
        raise AdapterError(f"{adapter.path} does not fit this {type(network).__name__}: {'; '.join(problems)}. "
                           "It was trained on another base model: load it on the pipeline its run started from "
                           "(its adapter_config.json names it as base_model_name_or_path)")


def attach(network: nn.Module, adapter: Adapter, scale: float = 1.0) -> None:
    """Put ``adapter`` on ``network`` (replacing any adapter it carries) at ``scale`` x alpha / rank."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    check_fits(network, adapter)
    detach(network)
    config = PeftLoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, target_modules=adapter.modules)
    inject_adapter_in_model(config, network, ADAPTER_NAME, state_dict=adapter.state)
    result = set_peft_model_state_dict(network, adapter.state, ADAPTER_NAME)
    if getattr(result, "unexpected_keys", None):
        detach(network)
        raise AdapterError(f"{adapter.path}: keys {result.unexpected_keys[:5]} found no place in the model")
    network.requires_grad_(False)
    set_scale(network, scale)


def set_scale(network: nn.Module, scale: float) -> None:
    """Set the strength of the adapter ``network`` carries (0: the base's outputs exactly)."""
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite number (1.0: as trained, 0.0: off)")
    for _, module in lora_layers(network):
        module.set_scale(ADAPTER_NAME, scale)


def detach(network: nn.Module) -> nn.Module:
    """Put each adapted layer's untouched base layer back in its place and forget the adapter; returns ``network``."""
    for name in adapted_names(network):
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        setattr(parent, child, network.get_submodule(name).base_layer)
    if "peft_config" in vars(network):
        del network.peft_config
    return network
