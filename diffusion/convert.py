"""Import diffusers ``UNet2DConditionModel`` weights into :class:`diffusion.unet.UNet`.

    python -m diffusion.convert path/to/unet_dir out/unet     # or a pipeline dir with a unet/ folder

The supported family is the latent-diffusion / Stable Diffusion 1.x-2.x U-Net: CrossAttnDownBlock2D and
DownBlock2D levels, a UNetMidBlock2DCrossAttn middle, mirrored CrossAttnUpBlock2D / UpBlock2D levels,
positional timestep features and an optional plain class embedding (``num_class_embeds``). Every
other option must sit at its default; anything else is rejected with the names of the offending
options. Every tensor maps onto exactly one of ours; leftovers on either side are an error.

Class embeddings: diffusers indexes its table by label, ours by ``label + 1`` with row 0 the null
class, so the imported table gets a zero row 0 in front ("no class" adds nothing).

Pooled text (our ``pooled_context``): a ``class_embed_type="projection"`` U-Net whose projection reads
``cross_attention_dim`` features and whose config carries ``"_latentgen_pooled_text": true`` (written by
:mod:`diffusion.export`; diffusers ignores keys that start with "_"). Its ``class_labels`` are then the
masked mean of the text states. A projection U-Net without that mark feeds some other vector through
``class_labels`` (an image embedding, ...), which we cannot know, so it is refused.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from autoencoder.convert import DIFFUSERS_BLOCK_RULES
from common.checkpoint import CheckpointError, load_legacy_checkpoint, load_state_strict
from diffusion.unet import UNet, UNetConfig

logger = logging.getLogger(__name__)

CROSS_DOWN, PLAIN_DOWN, CROSS_UP, PLAIN_UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
MID_BLOCK = "UNetMidBlock2DCrossAttn"
# Options we do not model, with the values at which they change nothing.
REQUIRED_DEFAULTS: dict[str, Any] = {
    "center_input_sample": False, "flip_sin_to_cos": True, "only_cross_attention": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "dual_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "addition_time_embed_dim": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "num_attention_heads": None, "reverse_transformer_layers_per_block": None,
}
# Options that are read below, or that do not affect the network.
HANDLED = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "mid_block_type", "block_out_channels",
    "layers_per_block", "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim", "norm_eps",
    "dropout", "freq_shift", "use_linear_projection", "num_class_embeds", "sample_size",
    "addition_embed_type_num_heads", "upcast_attention",  # upcasting only changes fp16 rounding
}

# The config mark of a U-Net whose class_labels are the pooled text (see the module doc).
POOLED_MARK = "_latentgen_pooled_text"

# (pattern, replacement) pairs applied in order to every key (up-level indices are remapped first).
RULES = (
    (r"^class_embedding\.linear_1\.", "encoder.context_embed.0."),  # the pooled-text projection, before the table
    (r"^class_embedding\.linear_2\.", "encoder.context_embed.2."),
    (r"^conv_in\.", "encoder.conv_in."),
    (r"^time_embedding\.", "encoder.time_embed."),
    (r"^class_embedding\.", "encoder.class_embed."),
    (r"^down_blocks\.", "encoder.down."),
    (r"^mid_block\.resnets\.0\.", "encoder.mid.block_1."),
    (r"^mid_block\.resnets\.1\.", "encoder.mid.block_2."),
    (r"^mid_block\.attentions\.0\.", "encoder.mid.attn."),
    (r"^up_blocks\.", "decoder.up."),
    (r"^conv_norm_out\.", "decoder.norm_out."),
    (r"^conv_out\.", "decoder.conv_out."),
    *DIFFUSERS_BLOCK_RULES,
    (r"\.time_emb_proj\.", ".emb_proj."),
    (r"\.transformer_blocks\.(\d+)\.", r".blocks.\1."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.net\.2\.", ".ff.proj_out."),
)


def _per_level(config: Mapping[str, Any], key: str, default: Any, levels: int) -> list[Any]:
    value = config.get(key, default)
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _uniform(values: list[Any], name: str, problems: list[str]) -> Any:
    if len(set(map(str, values))) > 1:
        problems.append(f"{name}={values} (ours must be the same at every level)")
    return values[0]


def _is_default(key: str, value: Any, default: Any) -> bool:
    if key in ("only_cross_attention", "mid_block_only_cross_attention"):
        return not any(value if isinstance(value, (list, tuple)) else [value])  # False, None or all False
    return value == default


def _heads(widths: list[int], heads: list[int], attended: list[bool], problems: list[str]) -> dict[str, int]:
    """Our ``num_heads``/``head_dim`` from diffusers' per-level head counts (its ``attention_head_dim``)."""
    used = [(w, h) for w, h, a in zip(widths, heads, attended) if a] + [(widths[-1], heads[-1])]  # + the middle
    if len({h for _, h in used}) == 1:
        return {"num_heads": used[0][1]}
    if len({w // h for w, h in used}) == 1 and all(w % h == 0 for w, h in used):
        return {"num_heads": 0, "head_dim": used[0][0] // used[0][1]}
    problems.append(f"attention heads {heads} at widths {widths}: neither a fixed head count nor a fixed head width")
    return {}


def unet_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> UNetConfig:
    """Translate a ``UNet2DConditionModel`` config (its ``config.json`` as a dict) into a :class:`UNetConfig`.

    Raises:
        CheckpointError: naming every option this U-Net cannot represent.
    """
    config = {k: v for k, v in diffusers_config.items() if not k.startswith("_")}
    pooled = _pooled_text(diffusers_config, config)
    problems = [f"{key}={config[key]!r} (only {default!r} is supported)" for key, default in REQUIRED_DEFAULTS.items()
                if key in config and not _is_default(key, config[key], default)]
    unknown = sorted(k for k in config
                     if k not in REQUIRED_DEFAULTS and k not in HANDLED and config[k] not in (None, False))
    problems += [f"unknown option {key}={config[key]!r}" for key in unknown]
    down = list(config.get("down_block_types", (CROSS_DOWN,) * 3 + (PLAIN_DOWN,)))
    up = list(config.get("up_block_types", (PLAIN_UP,) + (CROSS_UP,) * 3))
    widths = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    problems += [f"down block type {t!r}" for t in down if t not in (CROSS_DOWN, PLAIN_DOWN)]
    problems += [f"up block type {t!r}" for t in up if t not in (CROSS_UP, PLAIN_UP)]
    attended = [t == CROSS_DOWN for t in down]
    if [t == CROSS_UP for t in reversed(up)] != attended or len(down) != len(widths):
        problems.append(f"up blocks {up} do not mirror down blocks {down} over {len(widths)} levels")
    if config.get("mid_block_type", MID_BLOCK) != MID_BLOCK:
        problems.append(f"mid_block_type={config.get('mid_block_type')!r} (only {MID_BLOCK!r})")
    levels = len(widths)
    layers = _uniform(_per_level(config, "layers_per_block", 2, levels), "layers_per_block", problems)
    depth = _uniform(_per_level(config, "transformer_layers_per_block", 1, levels), "transformer_layers_per_block",
                     problems)
    context_dim = _uniform(_per_level(config, "cross_attention_dim", 1280, levels), "cross_attention_dim", problems)
    heads = _heads(widths, _per_level(config, "attention_head_dim", 8, levels), attended, problems)
    if problems:
        raise CheckpointError("cannot import this diffusers UNet2DConditionModel: unsupported " + "; ".join(problems))
    return UNetConfig(
        in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        block_channels=tuple(widths), layers_per_block=layers, attention_levels=tuple(attended), mid_attention=True,
        transformer_depth=depth, context_dim=context_dim, num_classes=config.get("num_class_embeds") or 0,
        dropout=float(config.get("dropout", 0.0)), norm_eps=float(config.get("norm_eps", 1e-5)),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        timestep_freq_shift=float(config.get("freq_shift", 0)), pooled_context=pooled, **heads,
    )


def _pooled_text(diffusers_config: Mapping[str, Any], config: dict[str, Any]) -> bool:
    """Whether the U-Net adds the pooled text (our mark, a projection of ``cross_attention_dim`` features); if so,
    its projection options leave ``config`` (they are read here, not refused)."""
    width = config.get("projection_class_embeddings_input_dim")
    if diffusers_config.get(POOLED_MARK) is not True or config.get("class_embed_type") != "projection":
        return False
    if width != config.get("cross_attention_dim"):
        raise CheckpointError(f"{POOLED_MARK} with projection_class_embeddings_input_dim={width} != "
                              f"cross_attention_dim={config.get('cross_attention_dim')}: the pooled text has the "
                              "text states' width")
    for key in ("class_embed_type", "projection_class_embeddings_input_dim", "num_class_embeds"):
        config.pop(key, None)  # diffusers ignores num_class_embeds beside a projection
    return True


def convert_diffusers_unet(state_dict: Mapping[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Rename (and, for the class table, pad) a diffusers U-Net state dict into ours for ``config``.

    Raises:
        CheckpointError: if tensors are left over on either side, or shapes differ.
    """
    levels = len(config.block_channels)
    converted = {}
    for key, tensor in state_dict.items():
        # diffusers counts up blocks deepest first; our up[i] is the level of down[i]
        key = re.sub(r"^up_blocks\.(\d+)\.", lambda m: f"up_blocks.{levels - 1 - int(m.group(1))}.", key)
        for pattern, replacement in RULES:
            key = re.sub(pattern, replacement, key)
        converted[key] = tensor
    table = converted.get("encoder.class_embed.weight")
    if table is not None:
        converted["encoder.class_embed.weight"] = torch.cat([table.new_zeros(1, table.shape[1]), table])
    _check_fits(config, converted)
    return converted


def _check_fits(config: UNetConfig, state_dict: dict[str, Tensor]) -> None:
    """The strict name and shape check of :func:`load_state_strict`, on a model that allocates nothing."""
    with torch.device("meta"):
        model = UNet(config)
        shapes = {key: torch.empty(tensor.shape, dtype=tensor.dtype) for key, tensor in state_dict.items()}
    load_state_strict(model, shapes, source="the converted diffusers state dict")


def read_diffusers_unet(directory: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read ``config.json`` and the weights of a diffusers U-Net directory (or of a pipeline's ``unet/``)."""
    directory = Path(directory)
    if (directory / "model_index.json").is_file() and (directory / "unet").is_dir():
        directory = directory / "unet"
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; expected a diffusers UNet2DConditionModel directory")
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        if (directory / name).is_file():
            state = load_file(str(directory / name))
            break
    else:
        if not (directory / "diffusion_pytorch_model.bin").is_file():
            raise CheckpointError(f"{directory} has no diffusion_pytorch_model.safetensors (or .bin); "
                                  "sharded checkpoints are not supported")
        state = load_legacy_checkpoint(directory / "diffusion_pytorch_model.bin")
    return json.loads(config_path.read_text()), state


def from_diffusers(source: nn.Module | str | Path) -> UNet:
    """Build our U-Net from a diffusers ``UNet2DConditionModel`` object or saved directory (float32, eval mode).

    Reading a directory needs no diffusers install.
    """
    if isinstance(source, nn.Module):
        raw_config, state = dict(source.config), source.state_dict()  # type: ignore[call-overload]
    else:
        raw_config, state = read_diffusers_unet(source)
    config = unet_config_from_diffusers(raw_config)
    model = UNet(config)
    load_state_strict(model, {k: v.float() for k, v in convert_diffusers_unet(state, config).items()},
                      source="diffusers UNet2DConditionModel")
    return model.eval()


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: convert a diffusers U-Net directory into a latentgen ``unet`` component directory."""
    parser = argparse.ArgumentParser(prog="python -m diffusion.convert", description=__doc__.split("\n")[0])
    parser.add_argument("unet_dir", type=Path, help="diffusers UNet2DConditionModel directory (or pipeline directory)")
    parser.add_argument("out_dir", type=Path, help="the component directory to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        model = from_diffusers(args.unet_dir)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from error
    out = model.save_pretrained(args.out_dir)
    params = sum(p.numel() for p in model.parameters())
    logger.info("wrote a %.1fM-parameter U-Net to %s (config: %s)", params / 1e6, out, model.config)
    return out


if __name__ == "__main__":
    main()
