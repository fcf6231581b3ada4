"""Export our autoencoders as diffusers ``AutoencoderKL`` / ``VQModel`` (the inverse of :mod:`autoencoder.convert`).

    vae = to_diffusers(Autoencoder.from_pretrained("runs/shapes32_quick/autoencoder"), scaling_factor=2.5)
    vae.save_pretrained("out/vae")       # config.json + diffusion_pytorch_model.safetensors

No second set of renaming rules: the diffusers model is built (on the meta device, nothing allocated)
from a config computed from ours, its tensor names are renamed with the import rules, and each one
takes the tensor of ours it names. The importer's own checks then guarantee that the export reads
back: :func:`autoencoder.convert.config_from_diffusers` must give our architecture again, and every
tensor of ours must be taken, except the quantizer's training statistics (step counter, last-use
steps, EMA sums), which diffusers has no place for and inference does not read.

What diffusers cannot represent fails with :class:`ExportError` naming the option: level widths whose
GroupNorm group counts differ (diffusers has one ``norm_num_groups``), a GroupNorm epsilon other than
diffusers' fixed 1e-6, and a KL posterior narrower than ``z_channels``. An l2-normalised quantizer is
representable: with unit-length codes, the nearest code in Euclidean distance is the code of highest
cosine similarity, so the exported codebook holds the normalised codes and diffusers' plain lookup
picks our indices and returns our (unit-length) latents. Only training differs (diffusers has no
normalised commitment loss, k-means initialisation, dead-code restart or EMA updates).

Needs diffusers (a development extra); without it the error says how to install it.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from autoencoder.convert import DIFFUSERS_RULES, _rename, config_from_diffusers
from autoencoder.model import Autoencoder, AutoencoderConfig

logger = logging.getLogger(__name__)

DIFFUSERS_NORM_EPS = 1e-6  # diffusers' encoder and decoder blocks hard-code this GroupNorm epsilon
DIFFUSERS_LOGVAR_CLAMP = (-30.0, 20.0)  # and its Gaussian posterior clamps the log-variance to this
# Tensors of ours that are training state, not part of the network diffusers runs.
TRAINING_STATE = ("quantizer.initialized", "quantizer.step", "quantizer.last_used", "quantizer.ema_cluster_size",
                  "quantizer.ema_embed_sum")


class ExportError(ValueError):
    """A model (or an option of it) that the diffusers format cannot represent; the message names it."""


def import_diffusers() -> Any:
    """The ``diffusers`` module, or an :class:`ExportError` that says how to install it."""
    try:
        import diffusers
    except ImportError:
        raise ExportError("exporting to the diffusers format needs the diffusers package: "
                          "pip install 'diffusers>=0.30,<0.43' (or pip install -e '.[dev]')") from None
    return diffusers


def diffusers_config(config: AutoencoderConfig, scaling_factor: float = 1.0) -> tuple[str, dict[str, Any]]:
    """The diffusers class name (``VQModel`` or ``AutoencoderKL``) and config that build our architecture.

    Raises:
        ExportError: naming every option diffusers cannot represent.
    """
    widths = [config.base_channels * m for m in config.channel_mult]
    groups = {math.gcd(32, width) for width in widths}  # our GroupNorm's group count at each width
    problems = []
    if len(groups) > 1:
        problems.append(f"level widths {widths} use different GroupNorm group counts {sorted(groups)} (diffusers has "
                        "one norm_num_groups: make every width a multiple of the same power of two up to 32)")
    if config.norm_eps != DIFFUSERS_NORM_EPS:
        problems.append(f"norm_eps={config.norm_eps} (diffusers' autoencoder blocks use {DIFFUSERS_NORM_EPS})")
    if config.kind == "kl" and config.code_dim != config.z_channels:
        problems.append(f"a KL posterior of code_dim={config.code_dim} != z_channels={config.z_channels} "
                        "(AutoencoderKL's latent_channels is both)")
    if problems:
        raise ExportError(f"cannot export this {config.kind!r} autoencoder to diffusers: " + "; ".join(problems))
    attended = [config.resolution // 2 ** i in config.attn_resolutions for i in range(len(widths))]
    shared = {
        "in_channels": config.in_channels, "out_channels": config.in_channels, "block_out_channels": widths,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attended],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attended)],
        "layers_per_block": config.num_res_blocks, "act_fn": "silu", "latent_channels": config.z_channels,
        "norm_num_groups": groups.pop(), "sample_size": config.resolution, "scaling_factor": scaling_factor,
        "mid_block_add_attention": config.mid_attention,
    }
    if config.kind == "vq":
        return "VQModel", {**shared, "num_vq_embeddings": config.codebook_size, "vq_embed_dim": config.code_dim}
    return "AutoencoderKL", shared


def build_on_meta(cls: type[nn.Module], config: Mapping[str, Any]) -> nn.Module:
    """A diffusers model of ``config`` whose tensors live on the meta device (named and shaped, not allocated)."""
    with torch.device("meta"):
        return cls.from_config(dict(config))  # type: ignore[attr-defined]


def fill(peer: nn.Module, ours: Mapping[str, Tensor], our_key: Mapping[str, str], what: str,
         transform: Callable[[str, Tensor], Tensor] | None = None, skipped: tuple[str, ...] = ()) -> nn.Module:
    """Give every tensor of the (meta) diffusers model ``peer`` the tensor of ours that ``our_key`` names.

    Args:
        peer: the diffusers model, built by :func:`build_on_meta`.
        ours: our state dict.
        our_key: diffusers tensor name -> our tensor name (from the import rules).
        what: the model, for error messages.
        transform: ``(diffusers name, our tensor) -> tensor to store`` where the layouts differ.
        skipped: our tensors that are training state and are left behind.

    Raises:
        ExportError: a tensor of ours missing or left over, or a shape that does not fit.
    """
    slots = peer.state_dict()
    missing = sorted(our_key[name] for name in slots if our_key[name] not in ours)
    if missing:  # e.g. a network wrapped by an adapter, whose tensors have other names
        raise ExportError(f"{what}: our model has no {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                          "export a plain model (a LoRA adapter must be merged or unloaded first)")
    state = {}
    for name, slot in slots.items():
        tensor = ours[our_key[name]].detach().to("cpu", copy=True)  # the peer must not share our storage
        tensor = transform(name, tensor) if transform is not None else tensor
        if tensor.shape != slot.shape:
            if tensor.numel() != slot.numel():
                raise ExportError(f"{what}: {our_key[name]} has shape {tuple(tensor.shape)} but diffusers' {name} "
                                  f"needs {tuple(slot.shape)}")
            tensor = tensor.reshape(slot.shape)  # a linear map stored as a 1x1 convolution, or back
        state[name] = tensor.contiguous()
    left = sorted(set(ours) - set(our_key.values()) - set(skipped))
    if left:
        raise ExportError(f"{what}: diffusers has no place for {', '.join(left)}")
    peer.load_state_dict(state, strict=True, assign=True)
    return peer.eval()


def key_map(peer_state: Mapping[str, Tensor], rename: Callable[[dict[str, Tensor]], dict[str, Tensor]],
            what: str) -> dict[str, str]:
    """diffusers name -> our name, by running the importer's renaming on the peer's (meta) state dict.

    The importers rename tensor by tensor and keep the order, so the two key lists pair up.
    """
    renamed = rename(dict(peer_state))
    if len(renamed) != len(peer_state):
        raise ExportError(f"{what}: the import rules map two diffusers tensors onto one of ours")
    return dict(zip(peer_state, renamed))


def to_diffusers(model: Autoencoder, scaling_factor: float = 1.0) -> nn.Module:
    """Our autoencoder as a diffusers ``VQModel`` / ``AutoencoderKL`` on CPU (a copy of our weights, eval mode).

    Args:
        model: a :class:`VQGAN` or :class:`KLAutoencoder`.
        scaling_factor: diffusers' ``scaling_factor`` (a pipeline's ``latent_scale``; 1: none).

    Raises:
        ExportError: an option diffusers cannot represent (see the module doc), or no diffusers installed.
    """
    diffusers = import_diffusers()
    class_name, config = diffusers_config(model.config, scaling_factor)
    check_round_trip(model.config, config_from_diffusers(config, class_name))
    clamp = (model.config.logvar_min, model.config.logvar_max)
    if model.config.kind == "kl" and clamp != DIFFUSERS_LOGVAR_CLAMP:
        logger.warning("the posterior log-variance clamp %s becomes diffusers' fixed %s: the posterior mean is "
                       "unchanged, its spread may differ", clamp, DIFFUSERS_LOGVAR_CLAMP)
    peer = build_on_meta(getattr(diffusers, class_name), config)
    names = key_map(peer.state_dict(), lambda state: _rename(state, DIFFUSERS_RULES), f"{class_name} export")
    ours = model.state_dict()
    if model.config.kind == "vq":
        ours["quantizer.codebook"] = model.quantizer.normalized_codebook()  # unit codes: see the module doc
    return fill(peer, ours, names, f"{class_name} export", skipped=TRAINING_STATE)


def check_round_trip(config: AutoencoderConfig, imported: AutoencoderConfig) -> None:
    """Refuse an export whose config the importer would read as another network (a bug, not a user error)."""
    fields = ("resolution", "in_channels", "base_channels", "channel_mult", "num_res_blocks", "mid_attention",
              "z_channels", "kind", "code_dim") + (("codebook_size",) if config.kind == "vq" else ())
    differ = [name for name in fields if getattr(imported, name) != getattr(config, name)]
    levels = {config.resolution // 2 ** i for i in range(len(config.channel_mult))}
    if set(imported.attn_resolutions) != set(config.attn_resolutions) & levels:  # sizes no level has are inert
        differ.append("attn_resolutions")
    if differ:
        raise ExportError(f"internal: the exported config would import with other {', '.join(differ)}")
