"""VQGAN / KLAutoencoder: shapes, index round trip, gradient routing, save/load, autocast, KL variant."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from autoencoder import VQGAN, Autoencoder, AutoencoderConfig, KLAutoencoder, QuantizerConfig, build_autoencoder
from common.checkpoint import CheckpointError
from common.config import ConfigError, from_dict

TINY = AutoencoderConfig(resolution=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                         attn_resolutions=(8,), z_channels=8, code_dim=4,
                         quantizer=QuantizerConfig(codebook_size=32, dead_code_threshold=0))


def images(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def vqgan() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(TINY)


def with_quantizer(**changes) -> AutoencoderConfig:
    return dataclasses.replace(TINY, quantizer=dataclasses.replace(TINY.quantizer, **changes))


def test_config_derived_values_validation_and_loading():
    factors = [AutoencoderConfig(channel_mult=m).downsample_factor for m in ((1, 2, 2), (1, 1, 2, 4), (1,) * 5)]
    assert factors == [4, 8, 16]
    assert TINY.latent_size == 8
    assert from_dict(AutoencoderConfig, {"channel_mult": [1, 2], "kind": "kl"}).channel_mult == (1, 2)
    with pytest.raises(ConfigError, match="not divisible"):
        AutoencoderConfig(resolution=100, channel_mult=(1, 1, 2, 2))
    with pytest.raises(ConfigError, match="kind"):
        from_dict(AutoencoderConfig, {"kind": "vae"})
    with pytest.raises(ConfigError, match="needs kind='kl'"):
        KLAutoencoder(TINY)


def test_the_quantizer_options_are_nested_and_old_flat_files_still_load(vqgan, tmp_path):
    assert TINY.codebook_size == TINY.quantizer.codebook_size == 32 and TINY.quantizer.code_dim is None
    assert vqgan.quantizer.config == dataclasses.replace(TINY.quantizer, code_dim=4)
    with pytest.raises(ConfigError, match="quantizer.code_dim=8 contradicts code_dim=4"):
        dataclasses.replace(TINY, quantizer=QuantizerConfig(code_dim=8))
    directory = vqgan.save_pretrained(tmp_path / "ae")
    meta = json.loads((directory / "config.json").read_text())
    assert meta["config"]["quantizer"]["codebook_size"] == 32 and "codebook_size" not in meta["config"]
    flat = {key: value for key, value in meta["config"].items() if key != "quantizer"}
    flat.update({key: value for key, value in meta["config"]["quantizer"].items() if key != "code_dim"})
    (directory / "config.json").write_text(json.dumps({**meta, "config": flat}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a saved file upgrades quietly
        assert Autoencoder.from_pretrained(directory).config == TINY
    with pytest.raises(ConfigError, match="keep quantizer.beta and remove beta"):
        from_dict(AutoencoderConfig, {"beta": 0.5, "quantizer": {"beta": 0.25}})


def test_forward_shapes_and_output_fields(vqgan):
    out = vqgan(images())
    assert out.recon.shape == (2, 3, 16, 16)
    assert out.quant.indices.shape == (2, 8, 8) and out.quant.indices.dtype == torch.int64
    assert out.quant.z_q.shape == (2, 4, 8, 8)
    assert out.posterior is None and out.kl is None and out.quantizer_loss is out.quant.loss
    assert vqgan.last_layer is vqgan.decoder.conv_out.weight


def test_decode_indices_inverts_encode_to_indices(vqgan):
    x = images()
    vqgan.train()
    vqgan(x)  # k-means initialisation from this first batch
    vqgan.eval()
    steps = vqgan.quantizer.step.clone()
    indices = vqgan.encode_to_indices(x)
    with torch.no_grad():
        expected = vqgan.decode(vqgan.quantize(vqgan.encode(x)).z_q)
        torch.testing.assert_close(vqgan.decode_indices(indices), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(indices, vqgan(x).quant.indices)
    assert torch.equal(vqgan.quantizer.step, steps)  # neither call recorded statistics


def test_commitment_gradient_reaches_only_the_encoder():
    torch.manual_seed(0)
    model = VQGAN(with_quantizer(ema_decay=0.9)).train()  # EMA: no codebook term
    model(images()).quant.loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.decoder.parameters())
    assert not model.quantizer.codebook.requires_grad


def test_codebook_gradient_reaches_only_the_codebook():
    torch.manual_seed(0)
    model = VQGAN(with_quantizer(beta=0.0)).train()  # beta 0: no commitment term
    model(images()).quant.loss.backward()
    assert model.quantizer.codebook.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())


def test_straight_through_carries_the_reconstruction_gradient_to_the_encoder(vqgan):
    vqgan(images()).recon.square().mean().backward()
    assert vqgan.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vqgan.last_layer.grad.abs().sum() > 0
    assert vqgan.quantizer.codebook.grad is None


def test_save_and_load_round_trip(vqgan, tmp_path):
    vqgan.train()
    vqgan(images())
    vqgan.eval()
    vqgan.save_pretrained(tmp_path / "ae")
    loaded = Autoencoder.from_pretrained(tmp_path / "ae")
    assert isinstance(loaded, VQGAN) and loaded.config == vqgan.config
    x = images(seed=1)
    assert torch.equal(loaded.encode_to_indices(x), vqgan.encode_to_indices(x))
    with torch.no_grad():
        assert torch.equal(loaded(x).recon, vqgan(x).recon)
    assert loaded.quantizer.step.item() == 1 and bool(loaded.quantizer.initialized)
    with pytest.raises(CheckpointError, match="not a KLAutoencoder"):
        KLAutoencoder.from_pretrained(tmp_path / "ae")


def test_strict_loading_names_the_offending_keys(vqgan, tmp_path):
    directory = vqgan.save_pretrained(tmp_path / "ae")
    weights = load_file(str(directory / "model.safetensors"))
    del weights["decoder.conv_out.bias"]
    weights["decoder.extra.weight"] = torch.zeros(1)
    save_file(weights, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.bias.*decoder\.extra\.weight"):
        VQGAN.from_pretrained(directory)


def test_bf16_autocast_forward_and_backward(vqgan):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vqgan(images())
    assert out.recon.dtype == torch.bfloat16 and torch.isfinite(out.recon.float()).all()
    assert out.quant.z_q.dtype == torch.float32
    (out.recon.float().square().mean() + out.quantizer_loss).backward()
    assert torch.isfinite(vqgan.encoder.conv_in.weight.grad).all()


def test_kl_variant_shapes_sampling_and_divergence(tmp_path):
    torch.manual_seed(0)
    model = build_autoencoder(dataclasses.replace(TINY, kind="kl"))
    assert isinstance(model, KLAutoencoder) and not hasattr(model, "quantizer")
    x = images()
    posterior = model.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 8, 8)
    assert (posterior.kl() >= 0).all() and posterior.kl().shape == (2,)
    zero = type(posterior)(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))
    assert zero.kl().item() == 0.0
    first = model(x, generator=torch.Generator().manual_seed(1))
    again = model(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first.recon, again.recon)
    assert not torch.equal(first.recon, model(x, sample=False).recon)
    torch.testing.assert_close(first.kl, posterior.kl().mean())
    assert first.quant is None and first.quantizer_loss is None and first.recon.shape == x.shape
    first.recon.mean().backward()
    assert model.encoder.conv_in.weight.grad is not None
    model.save_pretrained(tmp_path / "kl")
    assert isinstance(Autoencoder.from_pretrained(tmp_path / "kl"), KLAutoencoder)


def test_dropout_and_no_attention_configs_build():
    config = dataclasses.replace(TINY, dropout=0.1, attn_resolutions=(), mid_attention=False)
    model = VQGAN(config)
    assert not any("attn" in name for name, _ in model.named_parameters())
    assert model(images()).recon.shape == (2, 3, 16, 16)
