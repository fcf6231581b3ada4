"""Parity with the peers: taming-transformers and diffusers models with random weights, converted into ours."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

from autoencoder import VQGAN, Autoencoder, KLAutoencoder
from autoencoder.convert import from_diffusers, from_taming_state_dict, load_taming_checkpoint, main
from common.checkpoint import CheckpointError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from taming.modules.diffusionmodules.model import Decoder as TamingDecoder
    from taming.modules.diffusionmodules.model import Encoder as TamingEncoder
    from taming.modules.vqvae.quantize import VectorQuantizer as TamingQuantizer
    diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-5
TAMING = dict(ch=32, out_ch=3, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0,
              in_channels=3, resolution=32, z_channels=8)


def perturb(module: nn.Module) -> nn.Module:
    """Random GroupNorm affines and a spread-out codebook, so every tensor matters; eval mode."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "norm" in name:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
            if "embedding" in name:
                parameter.normal_(generator=generator)
    return module.eval()


class TamingVQModel(nn.Module):
    """taming's VQModel without Lightning and its loss: the tensors it saves, and its forward."""

    def __init__(self, double_z: bool = False, codebook_size: int = 64, code_dim: int = 4) -> None:
        super().__init__()
        moments = 2 if double_z else 1
        self.encoder = TamingEncoder(**TAMING, double_z=double_z)
        self.decoder = TamingDecoder(**TAMING)
        self.quantize = TamingQuantizer(codebook_size, code_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(moments * TAMING["z_channels"], moments * code_dim, 1)
        self.post_quant_conv = nn.Conv2d(code_dim, TAMING["z_channels"], 1)


@pytest.fixture(scope="module")
def taming_model() -> TamingVQModel:
    torch.manual_seed(0)
    return perturb(TamingVQModel())


def images(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_matches_taming(ours: VQGAN, theirs: TamingVQModel) -> None:
    x = images()
    with torch.no_grad():
        z_e = theirs.quant_conv(theirs.encoder(x))
        z_q, _, (perplexity, _, indices) = theirs.quantize(z_e)
        recon = theirs.decoder(theirs.post_quant_conv(z_q))
        out = ours.quantize(ours.encode(x))
        assert perplexity > 2, "the test needs several codes in use"
        assert max_diff(ours.encode(x), z_e) <= TOLERANCE
        assert torch.equal(out.indices.flatten(), indices.flatten())
        assert max_diff(ours.decode(out.z_q), recon) <= TOLERANCE
        assert max_diff(ours.decode_indices(out.indices), recon) <= TOLERANCE


def test_taming_vqgan_converts_to_identical_outputs(taming_model):
    ours = from_taming_state_dict(taming_model.state_dict(), resolution=32)
    assert isinstance(ours, VQGAN)
    config = ours.config
    assert (config.channel_mult, config.attn_resolutions, config.num_res_blocks) == ((1, 2, 2), (16,), 1)
    quantizer = config.quantizer
    assert not (quantizer.l2_normalize or quantizer.kmeans_init or quantizer.dead_code_threshold or quantizer.ema_decay)
    assert_matches_taming(ours, taming_model)


def test_ldm_style_kl_autoencoder_converts_to_identical_posterior():
    torch.manual_seed(0)
    theirs = perturb(TamingVQModel(double_z=True))
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("quantize.")}
    ours = from_taming_state_dict(state, resolution=32)
    assert isinstance(ours, KLAutoencoder)
    x = images()
    with torch.no_grad():
        mean, logvar = theirs.quant_conv(theirs.encoder(x)).chunk(2, dim=1)
        posterior = ours.encode(x)
        assert max_diff(posterior.mean, mean) <= TOLERANCE
        assert max_diff(posterior.logvar, logvar.clamp(-30, 20)) <= TOLERANCE
        assert max_diff(ours.decode(mean), theirs.decoder(theirs.post_quant_conv(mean))) <= TOLERANCE


def test_lightning_checkpoint_round_trips_through_the_cli(taming_model, tmp_path, caplog):
    state = dict(taming_model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    checkpoint = {"state_dict": state, "epoch": 3, "global_step": 1200, "optimizer_states": [{"lr": 4.5e-6}]}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="autoencoder.convert"):
        out = main(["taming", str(tmp_path / "last.ckpt"), str(tmp_path / "converted"), "--resolution", "32"])
    assert "skipped 2 training-only tensors" in caplog.text and "loss.discriminator" in caplog.text
    loaded = Autoencoder.from_pretrained(out)
    assert isinstance(loaded, VQGAN)
    assert_matches_taming(loaded, taming_model)


def _never_run(path: str) -> None:
    with open(path, "w") as handle:
        handle.write("pickled code ran")


class Payload:
    """Pickles as a call to ``_never_run``: what a malicious checkpoint smuggles in."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return _never_run, (self.marker,)


def test_checkpoint_with_pickled_code_is_refused_unexecuted(taming_model, tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": taming_model.state_dict(), "callbacks": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_taming_checkpoint(path)
    with pytest.raises(SystemExit, match="refused"):  # the CLI reports the error without a traceback
        main(["taming", str(path), str(tmp_path / "out")])
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unknown_taming_tensors_are_named(taming_model):
    state = dict(taming_model.state_dict())
    state["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"encoder\.extra\.weight"):
        from_taming_state_dict(state, resolution=32)


def small_vqmodel(attention_level: bool) -> nn.Module:
    torch.manual_seed(0)
    down = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D" if attention_level else "DownEncoderBlock2D")
    up = tuple(kind.replace("Down", "Up").replace("Encoder", "Decoder") for kind in reversed(down))
    model = diffusers.VQModel(block_out_channels=(32, 64), down_block_types=down, up_block_types=up,
                              layers_per_block=1, latent_channels=4, num_vq_embeddings=32, vq_embed_dim=3,
                              sample_size=32)
    return perturb(model)


@pytest.mark.parametrize("attention_level", [False, True])
def test_diffusers_vqmodel_converts_to_identical_outputs(attention_level, tmp_path):
    theirs = small_vqmodel(attention_level)
    x = images()
    with torch.no_grad():
        z_e = theirs.encode(x).latents
        _, _, (_, _, indices) = theirs.quantize(z_e)
        recon = theirs.decode(z_e).sample
    theirs.save_pretrained(tmp_path / "vqmodel")
    for ours in (from_diffusers(theirs), from_diffusers(tmp_path / "vqmodel")):
        assert ours.config.attn_resolutions == ((16,) if attention_level else ())
        with torch.no_grad():
            out = ours.quantize(ours.encode(x))
            assert max_diff(ours.encode(x), z_e) <= TOLERANCE
            assert torch.equal(out.indices.flatten(), indices.flatten())
            assert out.indices.unique().numel() > 2
            assert max_diff(ours.decode(out.z_q), recon) <= TOLERANCE


def test_diffusers_autoencoder_kl_converts_to_identical_posterior():
    torch.manual_seed(0)
    theirs = perturb(diffusers.AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, sample_size=32,
                                             down_block_types=("DownEncoderBlock2D",) * 2,
                                             up_block_types=("UpDecoderBlock2D",) * 2))
    ours = from_diffusers(theirs)
    x = images()
    with torch.no_grad():
        expected = theirs.encode(x).latent_dist
        posterior = ours.encode(x)
        assert max_diff(posterior.mean, expected.mean) <= TOLERANCE
        assert max_diff(posterior.logvar, expected.logvar) <= TOLERANCE
        assert max_diff(ours.decode(expected.mean), theirs.decode(expected.mean).sample) <= TOLERANCE


def test_unsupported_diffusers_options_fail_by_name():
    model = diffusers.VQModel(block_out_channels=(32,), norm_num_groups=8, latent_channels=4)
    with pytest.raises(CheckpointError, match="norm_num_groups=8"):
        from_diffusers(model)
