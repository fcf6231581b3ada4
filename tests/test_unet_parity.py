"""Our U-Net against diffusers' UNet2DConditionModel with the same (random) weights."""
from __future__ import annotations

import pytest
import torch

from common.checkpoint import CheckpointError
from diffusion.convert import convert_diffusers_unet, from_diffusers, main, unet_config_from_diffusers
from diffusion.unet import UNet

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-4


def reference_unet(**overrides) -> torch.nn.Module:
    """A small diffusers U-Net with every parameter drawn at random (nothing left zero or one)."""
    options = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                   cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    options.update(overrides)
    model = diffusers.UNet2DConditionModel(**options).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def sample_inputs(batch: int = 3, tokens: int = 7, size: int = 8):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=generator)
    t = torch.tensor([0.0, 417.5, 999.0][:batch])
    context = torch.randn(batch, tokens, 32, generator=generator)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 5:] = False
    return x, t, context, mask


def max_diff(reference, ours, x, t, context, mask=None, labels=None) -> float:
    with torch.no_grad():
        expected = reference(x, t, context, encoder_attention_mask=None if mask is None else mask.long(),
                             class_labels=labels).sample
        got = ours(x, t, context, mask, None if labels is None else labels + 1)
    return (expected - got).abs().max().item()


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
def test_outputs_match_diffusers(linear: bool, layers: int) -> None:
    reference = reference_unet(use_linear_projection=linear, layers_per_block=layers)
    ours = from_diffusers(reference)
    assert ours.config.use_linear_projection is linear and ours.config.num_heads == 8
    x, t, context, mask = sample_inputs()
    assert max_diff(reference, ours, x, t, context) <= TOLERANCE
    assert max_diff(reference, ours, x, t, context, mask) <= TOLERANCE


def test_class_embedding_and_head_width_layout_match_diffusers() -> None:
    # attention_head_dim (diffusers' head *count*) per level with a fixed head width of 16, a deeper
    # transformer, attention on the last level too, a timestep frequency shift and a class table.
    reference = reference_unet(block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4),
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
                               transformer_layers_per_block=2, num_class_embeds=5, freq_shift=1)
    ours = from_diffusers(reference)
    assert (ours.config.num_heads, ours.config.head_dim) == (0, 16)
    assert ours.config.attention_levels == (True, False, True)
    x, t, context, mask = sample_inputs()
    assert max_diff(reference, ours, x, t, context, mask, labels=torch.tensor([0, 4, 2])) <= TOLERANCE


def test_directory_and_command_line_conversion(tmp_path) -> None:
    reference = reference_unet(num_class_embeds=3)
    reference.save_pretrained(tmp_path / "diffusers_unet")
    main([str(tmp_path / "diffusers_unet"), str(tmp_path / "ours")])
    ours = UNet.from_pretrained(tmp_path / "ours").eval()
    assert torch.count_nonzero(ours.encoder.class_embed.weight[0]) == 0  # the null row added in front
    x, t, context, mask = sample_inputs()
    assert max_diff(reference, ours, x, t, context, mask, labels=torch.tensor([0, 1, 2])) <= TOLERANCE


@pytest.fixture(scope="module")
def supported_config() -> dict:
    config = dict(reference_unet().config)
    unet_config_from_diffusers(config)  # the unchanged config imports
    return config


@pytest.mark.parametrize("option,value", [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text"),
    ("time_cond_proj_dim", 16),
    ("resnet_time_scale_shift", "scale_shift"),
    ("norm_num_groups", 16),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ("AttnDownBlock2D", "DownBlock2D")),
    ("layers_per_block", (1, 2)),
    ("attention_head_dim", (2, 8)),
    ("some_future_option", 3),
])
def test_unsupported_options_are_named(supported_config: dict, option: str, value) -> None:
    config = dict(supported_config)
    config[option] = value
    with pytest.raises(CheckpointError, match=option.split("_")[0] if option != "attention_head_dim" else "heads"):
        unet_config_from_diffusers(config)


def test_leftover_or_missing_tensors_are_named() -> None:
    reference = reference_unet()
    config = unet_config_from_diffusers(reference.config)
    state = reference.state_dict()
    with pytest.raises(CheckpointError, match="unexpected keys: stray.weight"):
        convert_diffusers_unet({**state, "stray.weight": torch.zeros(1)}, config)
    del state["conv_in.bias"]
    with pytest.raises(CheckpointError, match="missing keys: encoder.conv_in.bias"):
        convert_diffusers_unet(state, config)
