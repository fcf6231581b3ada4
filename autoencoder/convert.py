"""Import taming-transformers / latent-diffusion and diffusers autoencoder weights.

    python -m autoencoder.convert taming vqgan_imagenet_f16_1024.ckpt out/autoencoder --resolution 256
    python -m autoencoder.convert diffusers path/to/vqmodel_dir out/autoencoder

Every tensor of the peer model maps onto exactly one of ours (attention 1x1 convolutions become
linear weights); anything left over is an error that names it, except the training-only ``loss.*``
(discriminator, LPIPS, learned log-variance) and ``model_ema.*`` entries of taming/LDM checkpoints,
which are skipped and reported. Imported VQ models use the plain quantizer (no l2-normalisation,
k-means, restarts or EMA), which reproduces the peers' indices exactly.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from safetensors.torch import load_file
from torch import Tensor, nn

from autoencoder.model import Autoencoder, AutoencoderConfig, build_autoencoder
from autoencoder.quantizer import CLASSIC_QUANTIZER
from common.checkpoint import CheckpointError, load_legacy_checkpoint

logger = logging.getLogger(__name__)

IGNORED_PREFIXES = ("loss.", "model_ema.")
LDM_PREFIX = "first_stage_model."

# (pattern, replacement) pairs applied in order to every key.
TAMING_RULES = (
    (r"^quantize\.embedding\.weight$", "quantizer.codebook"),
    (r"\.mid\.attn_1\.", ".mid.attn."),
    (r"\.block\.(\d+)\.", r".blocks.\1."),
    (r"\.attn\.(\d+)\.", r".attns.\1."),
    (r"\.nin_shortcut\.", ".skip."),
    (r"\.(downsample|upsample)\.", ".resample."),
    (r"\.(q|k|v)\.(weight|bias)$", r".attn.to_\1.\2"),
    (r"\.proj_out\.(weight|bias)$", r".attn.to_out.\1"),
)
# diffusers' block names, the same in its VAE and U-Net (diffusion.convert uses them too); no pattern
# matches another's output, so they may stand anywhere after the mid-block rules.
DIFFUSERS_BLOCK_RULES = (
    (r"\.resnets\.(\d+)\.", r".blocks.\1."),
    (r"\.attentions\.(\d+)\.", r".attns.\1."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.(downsamplers|upsamplers)\.0\.", ".resample."),
)
DIFFUSERS_RULES = (
    (r"^quantize\.embedding\.weight$", "quantizer.codebook"),
    (r"^encoder\.down_blocks\.", "encoder.down."),
    (r"^decoder\.up_blocks\.", "decoder.up."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn."),
    *DIFFUSERS_BLOCK_RULES,
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.group_norm\.", ".norm."),
    (r"\.(to_q|to_k|to_v)\.", r".attn.\1."),
    (r"\.to_out\.0\.", ".attn.to_out."),
    # attention names of diffusers checkpoints written before 0.14
    (r"\.query\.", ".attn.to_q."), (r"\.key\.", ".attn.to_k."), (r"\.value\.", ".attn.to_v."),
    (r"\.proj_attn\.", ".attn.to_out."),
)


def _rename(state_dict: dict[str, Tensor], rules: Sequence[tuple[str, str]]) -> dict[str, Tensor]:
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        if re.search(r"\.attn\.to_(q|k|v|out)\.weight$", key) and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # a 1x1 convolution is a linear map over channels
        renamed[key] = tensor
    return renamed


def _indices(state_dict: dict[str, Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers that follow ``prefix`` in the keys (module list positions)."""
    found = {int(m.group(1)) for key in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))}
    return sorted(found)


def _channel_mult(widths: Sequence[int], base: int) -> tuple[int, ...]:
    if any(width % base for width in widths):
        raise CheckpointError(f"level widths {list(widths)} are not multiples of the first width {base}")
    return tuple(width // base for width in widths)


# ---------------------------------------------------------------- taming-transformers / latent-diffusion


def config_from_taming(state_dict: dict[str, Tensor], resolution: int = 256) -> AutoencoderConfig:
    """Infer the architecture of a taming/LDM first-stage state dict from its tensor shapes.

    ``resolution`` cannot be read from the weights (the model is fully convolutional) but decides the
    attention resolutions; taming's released models use 256.
    """
    if "encoder.conv_in.weight" not in state_dict:
        raise CheckpointError("no encoder.conv_in.weight: this is not a taming/LDM first-stage state dict")
    if "quantize.embed.weight" in state_dict or "quantize.proj.weight" in state_dict:
        raise CheckpointError("this is a Gumbel-softmax VQ-GAN (quantize.embed / quantize.proj); only the "
                              "nearest-neighbour VectorQuantizer can be imported")
    if "quantize.used" in state_dict:
        raise CheckpointError("this checkpoint remaps indices (quantize.used); remapped models are not supported")
    levels = _indices(state_dict, "encoder.down.")
    base = state_dict["encoder.conv_in.weight"].shape[0]
    widths = [state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    attention = [f"encoder.down.{i}.attn.0.norm.weight" in state_dict for i in levels]
    decoder_attention = [f"decoder.up.{i}.attn.0.norm.weight" in state_dict for i in levels]
    if attention != decoder_attention:
        raise CheckpointError(f"encoder attention levels {attention} differ from the decoder's {decoder_attention}")
    conv_out = state_dict["encoder.conv_out.weight"].shape[0]
    if "quantize.embedding.weight" in state_dict:
        codebook_size, code_dim = state_dict["quantize.embedding.weight"].shape
        kind, z_channels = "vq", conv_out
    else:  # latent-diffusion's AutoencoderKL: the encoder emits mean and log-variance
        kind, z_channels = "kl", conv_out // 2
        codebook_size, code_dim = 1, state_dict["quant_conv.weight"].shape[0] // 2
    return AutoencoderConfig(
        resolution=resolution, in_channels=state_dict["encoder.conv_in.weight"].shape[1], base_channels=base,
        channel_mult=_channel_mult(widths, base), num_res_blocks=len(_indices(state_dict, "encoder.down.0.block.")),
        attn_resolutions=tuple(resolution // 2 ** i for i, has in enumerate(attention) if has),
        mid_attention="encoder.mid.attn_1.norm.weight" in state_dict, z_channels=z_channels, kind=kind,
        code_dim=code_dim, quantizer=replace(CLASSIC_QUANTIZER, codebook_size=codebook_size),
    )


def _taming_weights(state_dict: dict[str, Tensor], levels: int) -> dict[str, Tensor]:
    # taming stores decoder.up by level (0 = full resolution); ours is in execution order.
    def flip(match: re.Match) -> str:
        return f"decoder.up.{levels - 1 - int(match.group(1))}."

    flipped = {re.sub(r"^decoder\.up\.(\d+)\.", flip, key): value for key, value in state_dict.items()}
    return _rename(flipped, TAMING_RULES)


def _split_training_keys(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    kept = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
    return kept, sorted(set(state_dict) - set(kept))


def from_taming_state_dict(state_dict: dict[str, Tensor], config: AutoencoderConfig | None = None,
                           resolution: int = 256) -> Autoencoder:
    """Build our autoencoder from a taming ``VQModel`` (or LDM ``AutoencoderKL``) state dict.

    Args:
        state_dict: the Lightning module's ``state_dict`` (keys ``encoder.*``, ``decoder.*``,
            ``quant_conv.*``, ``post_quant_conv.*``, ``quantize.embedding.weight``; ``loss.*`` is skipped).
        config: the target config; inferred from the tensor shapes when None.
        resolution: the training resolution, used only when the config is inferred.

    Returns:
        A :class:`VQGAN` (or :class:`KLAutoencoder`) in eval mode.
    """
    weights, ignored = _split_training_keys(state_dict)
    if ignored:
        logger.warning("skipped %d training-only tensors (discriminator, LPIPS, EMA): %s%s", len(ignored),
                       ", ".join(ignored[:5]), " ..." if len(ignored) > 5 else "")
    config = config or config_from_taming(weights, resolution)
    return _build(config, _taming_weights(weights, len(config.channel_mult)), "taming state dict")


def load_taming_checkpoint(path: str | Path, resolution: int = 256) -> Autoencoder:
    """Read a taming/LDM ``.ckpt`` (weights only, never pickled code) and convert it.

    A full latent-diffusion checkpoint works too: its ``first_stage_model.*`` tensors are used.
    """
    checkpoint = load_legacy_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict (found {type(checkpoint).__name__})")
    if "encoder.conv_in.weight" not in state and f"{LDM_PREFIX}encoder.conv_in.weight" in state:
        logger.warning("using the %s* tensors of a full latent-diffusion checkpoint", LDM_PREFIX)
        state = {k[len(LDM_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    if "encoder.conv_in.weight" not in state:
        raise CheckpointError(f"{path} has no encoder.conv_in.weight: it is not a taming/LDM autoencoder")
    return from_taming_state_dict(state, resolution=resolution)


# ---------------------------------------------------------------- diffusers


def config_from_diffusers(config: dict[str, Any], class_name: str) -> AutoencoderConfig:
    """Translate a diffusers ``VQModel`` or ``AutoencoderKL`` config; unsupported options fail by name."""
    widths = list(config.get("block_out_channels", (64,)))
    down = list(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(config.get("up_block_types", ("UpDecoderBlock2D",)))
    attention = [kind.startswith("Attn") for kind in down]
    problems = []
    if class_name not in ("VQModel", "AutoencoderKL"):
        problems.append(f"class {class_name!r} (supported: VQModel, AutoencoderKL)")
    if set(down) - {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"} or len(down) != len(widths):
        problems.append(f"down_block_types {down}")
    if [kind.startswith("Attn") for kind in reversed(up)] != attention or len(up) != len(down):
        problems.append(f"up_block_types {up} do not mirror down_block_types {down}")
    if config.get("act_fn", "silu") != "silu" or config.get("norm_type", "group") != "group":
        problems.append(f"act_fn {config.get('act_fn')!r} / norm_type {config.get('norm_type')!r}")
    groups = config.get("norm_num_groups", 32)
    if any(math.gcd(32, width) != groups for width in widths):
        problems.append(f"norm_num_groups={groups} with widths {widths} (ours use gcd(32, width) groups)")
    if config.get("in_channels", 3) != config.get("out_channels", 3):
        problems.append("in_channels != out_channels")
    if not (config.get("use_quant_conv", True) and config.get("use_post_quant_conv", True)):
        problems.append("models without quant_conv / post_quant_conv")
    if problems:
        raise CheckpointError("cannot import this diffusers model: unsupported " + "; ".join(problems))
    size = config.get("sample_size", 32)
    resolution = int(size[0] if isinstance(size, (list, tuple)) else size)
    latent = config.get("latent_channels", 3)
    vq = class_name == "VQModel"
    return AutoencoderConfig(
        resolution=resolution, in_channels=config.get("in_channels", 3), base_channels=widths[0],
        channel_mult=_channel_mult(widths, widths[0]), num_res_blocks=config.get("layers_per_block", 1),
        attn_resolutions=tuple(resolution // 2 ** i for i, has in enumerate(attention) if has),
        mid_attention=config.get("mid_block_add_attention", True), z_channels=latent, kind="vq" if vq else "kl",
        code_dim=(config.get("vq_embed_dim") or latent) if vq else latent,
        quantizer=replace(CLASSIC_QUANTIZER, codebook_size=config.get("num_vq_embeddings", 256) if vq else 1),
    )


def _read_diffusers_directory(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if (directory / "model_index.json").is_file():  # a whole pipeline: use its autoencoder
        directory = next((directory / sub for sub in ("vqvae", "vae") if (directory / sub).is_dir()), directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; expected a diffusers model directory")
    weights = directory / "diffusion_pytorch_model.safetensors"
    if weights.is_file():
        state = load_file(str(weights))
    elif (directory / "diffusion_pytorch_model.bin").is_file():
        state = load_legacy_checkpoint(directory / "diffusion_pytorch_model.bin")
    else:
        raise CheckpointError(f"{directory} has no diffusion_pytorch_model.safetensors (or .bin)")
    return json.loads(config_path.read_text()), state


def from_diffusers(source: nn.Module | str | Path) -> Autoencoder:
    """Convert a diffusers ``VQModel``/``AutoencoderKL`` object, or a saved model (or pipeline) directory.

    Reading a directory needs no diffusers install: ``config.json`` and the safetensors file are read
    directly. Diffusers' ``scaling_factor`` is not carried over.
    """
    if isinstance(source, nn.Module):
        raw_config = dict(source.config)  # type: ignore[call-overload]
        class_name, state = type(source).__name__, source.state_dict()
    else:
        raw_config, state = _read_diffusers_directory(Path(source))
        class_name = raw_config.get("_class_name", "VQModel" if "num_vq_embeddings" in raw_config else "AutoencoderKL")
    config = config_from_diffusers(raw_config, class_name)
    return _build(config, _rename(state, DIFFUSERS_RULES), f"diffusers {class_name}")


# ---------------------------------------------------------------- shared


def _build(config: AutoencoderConfig, weights: dict[str, Tensor], source: str) -> Autoencoder:
    """Instantiate ``config`` and load ``weights`` strictly, completing the quantizer's own state."""
    model = build_autoencoder(config)
    own = model.state_dict()
    full = dict(weights)
    for key, value in own.items():
        # Training statistics have no peer counterpart: start them fresh, but mark the codebook as
        # initialised so k-means (if enabled for fine-tuning) never overwrites the imported codes.
        if key.startswith("quantizer.") and key != "quantizer.codebook" and key not in full:
            full[key] = value.clone()
    if "quantizer.initialized" in own:
        full["quantizer.initialized"].fill_(True)
    if "quantizer.ema_embed_sum" in own and "quantizer.codebook" in full:
        full["quantizer.ema_embed_sum"] = full["quantizer.codebook"].clone()  # cluster sizes start at 1
    model.load_weights(full, source=source)
    return model.eval()


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: convert a peer checkpoint into a latentgen component directory."""
    parser = argparse.ArgumentParser(prog="python -m autoencoder.convert", description=__doc__.split("\n")[0])
    parser.add_argument("source", choices=("taming", "diffusers"), help="where the weights come from")
    parser.add_argument("src", type=Path, help="taming/LDM .ckpt file, or diffusers model directory")
    parser.add_argument("out_dir", type=Path, help="the component directory to write")
    parser.add_argument("--resolution", type=int, default=256,
                        help="training resolution of a taming model (decides attention levels; default 256)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.source == "taming":
            model = load_taming_checkpoint(args.src, resolution=args.resolution)
        else:
            model = from_diffusers(args.src)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from error
    out = model.save_pretrained(args.out_dir)
    logger.info("wrote a %r autoencoder (%s) to %s", model.config.kind, type(model).__name__, out)
    return out


if __name__ == "__main__":
    main()
