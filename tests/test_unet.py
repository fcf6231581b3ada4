from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from common import layers
from common.checkpoint import CheckpointError, save_component
from common.config import ConfigError
from diffusion.unet import NULL_CLASS, UNet, UNetConfig, UNetEncoder

TINY = UNetConfig(in_channels=4, out_channels=4, block_channels=(32, 64), layers_per_block=1,
                  attention_levels=(True, False), head_dim=16, context_dim=24)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, so zero-initialised branches cannot hide a wrong path."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def inputs(config: UNetConfig, batch: int = 2, size: int = 8, tokens: int = 5):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, tokens, config.context_dim, generator=generator) if config.context_dim else None
    return x, t, context


@pytest.mark.parametrize("config,size", [
    (TINY, 8),
    (UNetConfig(in_channels=8, out_channels=4, block_channels=(32, 64, 64), layers_per_block=2,
                attention_levels=(False, True, True), num_heads=2, context_dim=16, use_linear_projection=False), 16),
    (UNetConfig(in_channels=4, out_channels=8, block_channels=(32, 32), attention_levels=(False, False),
                mid_attention=False, context_dim=0, num_classes=3, transformer_depth=2), 16),
])
def test_output_shapes(config: UNetConfig, size: int) -> None:
    model = UNet(config).eval()
    x, t, context = inputs(config, size=size)
    with torch.no_grad():
        out = model(x, t, context)
        assert out.shape == (2, config.out_channels, size, size)
        assert model(x, t.float() + 0.5, context).shape == out.shape  # fractional timesteps
        assert model(x, 10, context).shape == out.shape                # a scalar is broadcast


def test_fresh_model_outputs_zero_and_blocks_start_as_identity() -> None:
    model = UNet(TINY)
    x, t, context = inputs(TINY)
    assert torch.count_nonzero(model(x, t, context)) == 0
    transformer = model.encoder.down[0].attns[0]
    assert all(torch.count_nonzero(p) == 0 for p in transformer.proj_out.parameters())
    h = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(transformer(h, context), h)


@pytest.mark.parametrize("pooled", [False, True])
def test_padding_tokens_do_not_change_the_output(pooled: bool) -> None:
    config = dataclasses.replace(TINY, pooled_context=pooled)
    model = randomize(UNet(config)).eval()
    x, t, context = inputs(config, tokens=6)
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    with torch.no_grad():
        out = model(x, t, context, mask)
        changed = context.clone()
        changed[0, 3:] = 50.0
        torch.testing.assert_close(model(x, t, changed, mask), out)
        alone = model(x[:1], t[:1], context[:1, :3])  # the same prompt without padding
        torch.testing.assert_close(alone, out[:1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x, t, context), out)  # the mask is used at all


def test_pooled_context_reaches_a_unet_without_cross_attention() -> None:
    config = dataclasses.replace(TINY, attention_levels=(False, False), mid_attention=False, pooled_context=True)
    model = randomize(UNet(config)).eval()
    x, t, context = inputs(config)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, context), model(x, t, context.flip(0)))
        plain = randomize(UNet(dataclasses.replace(config, pooled_context=False))).eval()
        torch.testing.assert_close(plain(x, t, context), plain(x, t, context.flip(0)))  # the text had no way in
    with pytest.raises(ValueError, match="context"):
        model(x, t)
    with pytest.raises(ConfigError, match="pooled_context needs text"):
        dataclasses.replace(config, context_dim=0)


def test_context_is_required_when_the_model_has_cross_attention() -> None:
    x, t, _ = inputs(TINY)
    with pytest.raises(ValueError, match="context"):
        UNet(TINY)(x, t)


def test_class_conditioning_and_the_null_class() -> None:
    config = UNetConfig(in_channels=4, out_channels=4, block_channels=(32, 32), attention_levels=(False, True),
                        head_dim=16, context_dim=0, num_classes=3, layers_per_block=1)
    model = randomize(UNet(config)).eval()
    assert model.encoder.class_embed.num_embeddings == 4  # labels 0..2 are fed as 1..3, 0 is null
    x, t, _ = inputs(config)
    with torch.no_grad():
        first, second = model(x, t, class_labels=torch.tensor([1, 1])), model(x, t, class_labels=torch.tensor([2, 2]))
        null = model(x, t, class_labels=torch.full((2,), NULL_CLASS))
        assert not torch.allclose(first, second)
        assert not torch.allclose(first, null)
        torch.testing.assert_close(model(x, t), null)  # no labels means the null class
    with pytest.raises(ValueError, match="num_classes=0"):
        randomize(UNet(TINY))(*inputs(TINY), class_labels=torch.tensor([1, 1]))


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch) -> None:
    calls = []
    real_checkpoint = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **k: calls.append(k) or real_checkpoint(*a, **k))
    base = UNetConfig(in_channels=4, out_channels=4, block_channels=(32, 32), attention_levels=(True, True),
                      head_dim=16, context_dim=8, layers_per_block=1, dropout=0.1)
    plain = randomize(UNet(base)).train()
    checkpointed = UNet(UNetConfig(**{**base.__dict__, "gradient_checkpointing": True})).train()
    checkpointed.load_state_dict(plain.state_dict())
    x, t, context = inputs(base)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(0)  # the same dropout masks; checkpointing replays the RNG state
        model(x, t, context).square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    # down 2 x (ResBlock + transformer), middle 3, up 2 x 2 x (ResBlock + transformer): each block once
    assert len(calls) == 4 + 3 + 8 and all(k == {"use_reentrant": False} for k in calls)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_forward_and_backward() -> None:
    model = randomize(UNet(TINY))
    x, t, context = inputs(TINY)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    with torch.no_grad():
        reference = model(x, t, context, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_save_load_round_trip_and_strict_mismatch(tmp_path) -> None:
    model = randomize(UNet(TINY)).eval()
    model.save_pretrained(tmp_path / "unet")
    loaded = UNet.from_pretrained(tmp_path / "unet")
    assert loaded.config == TINY
    x, t, context = inputs(TINY)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, context), model(x, t, context), atol=0, rtol=0)
    assert UNet.from_pretrained(tmp_path / "unet", gradient_checkpointing=True).config.gradient_checkpointing
    # weights of one architecture under the config of another
    other = UNetConfig(**{**TINY.__dict__, "layers_per_block": 2})
    save_component(tmp_path / "bad", "unet", other, model.state_dict())
    with pytest.raises(CheckpointError, match="missing keys"):
        UNet.from_pretrained(tmp_path / "bad")
    meta = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert meta["kind"] == "unet" and meta["config"]["head_dim"] == 16


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="attention_levels"):
        UNetConfig(block_channels=(32, 64), attention_levels=(True,))
    with pytest.raises(ConfigError, match="divisible"):
        UNetConfig(block_channels=(32, 48), attention_levels=(False, True), head_dim=32)
    assert TINY.time_embed_dim == 128 and TINY.heads(64) == 4
    with pytest.raises(ValueError, match="multiple of 2"):
        UNet(TINY)(torch.randn(1, 4, 7, 7), torch.tensor([1]), torch.randn(1, 2, 24))


def test_encoder_half_is_reusable() -> None:
    model = randomize(UNet(TINY)).eval()
    encoder = UNetEncoder(TINY)
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in model.state_dict().items()
                             if k.startswith("encoder.")})
    x, t, context = inputs(TINY)
    with torch.no_grad():
        encoded = encoder(x, t, context)
        assert encoded.h.shape == (2, 64, 4, 4)
        assert len(encoded.skips) == 1 + TINY.layers_per_block * 2 + 1
        torch.testing.assert_close(model.decoder(encoded), model(x, t, context))


def test_derived_fields_come_from_the_autoencoder_and_text_encoder() -> None:
    config = UNetConfig(block_channels=(32, 64), attention_levels=(False, True), head_dim=16)
    with pytest.raises(ConfigError, match="in_channels, out_channels, context_dim is None"):
        UNet(config)
    resolved = config.resolve(code_dim=8, text_width=32)
    assert (resolved.in_channels, resolved.out_channels, resolved.context_dim) == (8, 8, 32)
    assert dataclasses.replace(config, context_dim=0).resolve(8, 0).context_dim == 0  # 0: no text
    with pytest.raises(ConfigError, match="model.in_channels=3 contradicts the autoencoder's code_dim=8"):
        dataclasses.replace(config, in_channels=3).resolve(8, 32)
    with pytest.raises(ConfigError, match="model.context_dim=0 must equal the text encoder's width 32"):
        dataclasses.replace(config, context_dim=0).resolve(8, 32)
