"""Export our U-Net as a diffusers ``UNet2DConditionModel`` and our noise process as a ``DDIMScheduler`` config.

    unet = unet_to_diffusers(pipe.model.unet, sample_size=16)    # a UNet2DConditionModel with our weights
    scheduler = scheduler_to_diffusers(pipe.model.config)         # a DDIMScheduler

The inverse of :mod:`diffusion.convert` and of :func:`diffusion.stable_diffusion.diffusion_config_from_scheduler`,
derived from them: the diffusers config computed here must import back as our architecture (and the
scheduler config as our process), and the tensor names come from running the import rules on the
diffusers model's names (see :mod:`autoencoder.export`).

What diffusers cannot represent:

- Class embeddings: diffusers indexes its table by label, ours by ``label + 1`` with row 0 the null
  class. The export drops row 0 (diffusers' ``class_labels=y`` then equals our label ``y``) and warns:
  diffusers always adds a class, so classifier-free guidance against the null class is lost.
- A U-Net without text (``context_dim=0``): diffusers' cross-attention blocks require a
  ``cross_attention_dim`` and the U-Net importer reads no other middle block, so it is refused.
- ``pooled_context`` (the masked mean of the text states, through Linear -> SiLU -> Linear, added to
  the time embedding) is diffusers' ``class_embed_type="projection"``, marked for our importer
  (:data:`diffusion.convert.POOLED_MARK`): call the exported U-Net with ``class_labels`` = that mean.
  StableDiffusionPipeline passes no ``class_labels``, so it cannot run such a U-Net (warned). Beside
  class labels (one diffusers class embedding) it is refused.
- ``mid_attention=False``, and level widths that are not multiples of 32 (diffusers has one GroupNorm
  group count, 32) are refused by name.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from autoencoder.export import ExportError, build_on_meta, fill, import_diffusers, key_map
from common.checkpoint import CheckpointError
from diffusion.convert import (
    CROSS_DOWN,
    CROSS_UP,
    MID_BLOCK,
    PLAIN_DOWN,
    PLAIN_UP,
    POOLED_MARK,
    convert_diffusers_unet,
    unet_config_from_diffusers,
)
from diffusion.objectives import DiffusionConfig
from diffusion.stable_diffusion import PREDICTIONS, SCHEDULES, diffusion_config_from_scheduler
from diffusion.unet import UNet, UNetConfig

logger = logging.getLogger(__name__)

CLASS_TABLE = "class_embedding.weight"
NULL_ROW_WARNING = ("the class table's null row 0 is dropped: diffusers' UNet2DConditionModel indexes classes by "
                    "label and always adds one, so classifier-free guidance against the null class is not "
                    "representable there (pass class_labels=y for our label y)")
# The DiffusionConfig fields that describe the noise process and the sampling timesteps (the rest is training).
PROCESS_FIELDS = ("schedule", "num_steps", "beta_start", "beta_end", "zero_terminal_snr", "prediction", "spacing",
                  "steps_offset", "set_alpha_to_one")


def unet_config_to_diffusers(config: UNetConfig, sample_size: int | None = None) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of our architecture.

    Args:
        config: a resolved U-Net config.
        sample_size: the latent size diffusers derives its default image size from (our U-Net has none).

    Raises:
        ExportError: naming every option diffusers cannot represent (see the module doc).
    """
    widths = list(config.block_channels)
    problems = []
    if not config.context_dim:
        problems.append("context_dim=0 (a U-Net without text: diffusers' cross-attention blocks need a "
                        "cross_attention_dim)")
    if config.pooled_context and config.num_classes:
        problems.append("pooled_context=True beside num_classes (diffusers' U-Net has one class embedding)")
    if not config.mid_attention:
        problems.append("mid_attention=False (the importer reads only UNetMidBlock2DCrossAttn)")
    if any(width % 32 for width in widths):
        problems.append(f"block_channels={tuple(widths)} (diffusers' one norm_num_groups=32 needs multiples of 32)")
    if problems:
        raise ExportError("cannot export this U-Net to diffusers: unsupported " + "; ".join(problems))
    attended = list(config.attention_levels)
    heads = config.num_heads or [max(1, width // config.head_dim) for width in widths]  # diffusers' attention_head_dim
    shift = config.timestep_freq_shift
    return {
        "in_channels": config.in_channels, "out_channels": config.out_channels, "block_out_channels": widths,
        "down_block_types": [CROSS_DOWN if a else PLAIN_DOWN for a in attended],
        "up_block_types": [CROSS_UP if a else PLAIN_UP for a in reversed(attended)], "mid_block_type": MID_BLOCK,
        "layers_per_block": config.layers_per_block, "transformer_layers_per_block": config.transformer_depth,
        "attention_head_dim": heads, "cross_attention_dim": config.context_dim, "norm_num_groups": 32,
        "norm_eps": config.norm_eps, "dropout": config.dropout, "flip_sin_to_cos": True,
        "freq_shift": int(shift) if float(shift).is_integer() else shift,
        "use_linear_projection": config.use_linear_projection, "num_class_embeds": config.num_classes or None,
        **({"sample_size": sample_size} if sample_size else {}),
        **({"class_embed_type": "projection", "projection_class_embeddings_input_dim": config.context_dim,
            POOLED_MARK: True} if config.pooled_context else {}),
    }


def check_round_trip(config: UNetConfig, imported: UNetConfig) -> None:
    """Refuse an export that the importer would read as another network (a bug, not a user error)."""
    fields = ("in_channels", "out_channels", "block_channels", "layers_per_block", "attention_levels", "mid_attention",
              "transformer_depth", "context_dim", "num_classes", "norm_eps", "use_linear_projection",
              "timestep_freq_shift", "pooled_context")
    differ = [name for name in fields if getattr(imported, name) != getattr(config, name)]
    attended = [w for w, a in zip(config.block_channels, config.attention_levels) if a] + [config.block_channels[-1]]
    if [imported.heads(w) for w in attended] != [config.heads(w) for w in attended]:
        differ.append("attention heads")
    if differ:
        raise ExportError(f"internal: the exported U-Net config would import with other {', '.join(differ)}")


def unet_to_diffusers(unet: UNet, sample_size: int | None = None) -> nn.Module:
    """Our U-Net as a diffusers ``UNet2DConditionModel`` on CPU (a copy of our weights, eval mode).

    A class-conditional U-Net loses its null class row (logged as a warning, see the module doc).

    Raises:
        ExportError: an option diffusers cannot represent, or no diffusers installed.
    """
    diffusers = import_diffusers()
    config = unet_config_to_diffusers(unet.config, sample_size)
    try:
        check_round_trip(unet.config, unet_config_from_diffusers(config))
        peer = build_on_meta(diffusers.UNet2DConditionModel, {k: v for k, v in config.items() if k != POOLED_MARK})
        if POOLED_MARK in config:
            peer.register_to_config(**{POOLED_MARK: True})  # saved in config.json; diffusers' loader skips it
        names = key_map(peer.state_dict(), lambda state: convert_diffusers_unet(state, unet.config),
                        "UNet2DConditionModel export")
    except CheckpointError as error:  # the importer's strict name and shape check
        raise ExportError(f"internal: the exported U-Net would not import back: {error}") from None
    if unet.config.num_classes:
        logger.warning("%s", NULL_ROW_WARNING)
    return fill(peer, unet.state_dict(), names, "UNet2DConditionModel export", transform=_drop_null_row)


def _drop_null_row(name: str, tensor: Tensor) -> Tensor:
    return tensor[1:] if name == CLASS_TABLE else tensor


def scheduler_to_diffusers(config: DiffusionConfig) -> Any:
    """A ``DDIMScheduler`` with our noise schedule, prediction target and sampling timesteps.

    DDIM is the scheduler with every option we model (``set_alpha_to_one`` included); diffusers'
    other schedulers load from its config (``DPMSolverMultistepScheduler.from_config(...)``).

    Raises:
        ExportError: no diffusers installed, or a config that would not map back onto ``config``.
    """
    diffusers = import_diffusers()
    schedules = {ours: theirs for theirs, ours in SCHEDULES.items()}
    predictions = {ours: theirs for theirs, ours in PREDICTIONS.items()}
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=config.num_steps, beta_start=config.beta_start, beta_end=config.beta_end,
        beta_schedule=schedules[config.schedule], prediction_type=predictions[config.prediction],
        timestep_spacing=config.spacing, set_alpha_to_one=config.set_alpha_to_one,
        # diffusers ignores steps_offset unless the spacing is leading; 1 then spares a deprecation rewrite
        steps_offset=config.steps_offset if config.spacing == "leading" else 1,
        rescale_betas_zero_snr=config.zero_terminal_snr, clip_sample=False, thresholding=False)
    back = diffusion_config_from_scheduler(dict(scheduler.config))
    differ = [name for name in PROCESS_FIELDS if getattr(back, name) != getattr(config, name)]
    if differ:
        raise ExportError(f"internal: the DDIMScheduler config maps back with other {', '.join(differ)}")
    return scheduler
