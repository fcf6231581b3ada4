"""Stage-1 losses: GAN losses, warm-up, adaptive weight, weight wiring, PatchGAN, offline LPIPS."""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoencoder import perceptual as perceptual_module
from autoencoder.discriminator import DiscriminatorConfig, PatchDiscriminator
from autoencoder.losses import (
    LossConfig,
    adaptive_gan_weight,
    autoencoder_loss,
    disc_factor,
    discriminator_loss,
    gan_factor,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from autoencoder.perceptual import (
    VGG16_FILENAME,
    WEIGHTS_ENV,
    PerceptualWeightsError,
    build_perceptual,
    resolve_vgg16_weights,
    vgg16_features_to_lpips,
)
from common.config import from_dict


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


# ---------------------------------------------------------------- GAN losses and schedule

REAL, FAKE = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.5, 1.0])


def test_gan_losses_match_hand_values() -> None:
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1.5 + 2) / 3))
    assert hinge_g_loss(FAKE).item() == pytest.approx(-(-2 + 0.5 + 1) / 3)
    ns_d = 0.5 * (sum(softplus(-r) for r in REAL.tolist()) / 3 + sum(softplus(f) for f in FAKE.tolist()) / 3)
    assert non_saturating_d_loss(REAL, FAKE).item() == pytest.approx(ns_d, rel=1e-6)
    assert non_saturating_g_loss(FAKE).item() == pytest.approx(sum(softplus(-f) for f in FAKE.tolist()) / 3)


def test_gan_loss_signs() -> None:
    confident_real, confident_fake = torch.full((4,), 10.0), torch.full((4,), -10.0)
    assert hinge_d_loss(confident_real, confident_fake).item() == 0.0  # a perfect D pays nothing
    assert non_saturating_d_loss(confident_real, confident_fake).item() < 1e-4
    for g_loss in (hinge_g_loss, non_saturating_g_loss):
        fooled, caught = g_loss(torch.full((4,), 5.0)), g_loss(torch.full((4,), -5.0))
        assert caught > fooled  # G pays when D sees through it
        logits = torch.zeros(4, requires_grad=True)
        g_loss(logits).backward()
        assert (logits.grad < 0).all()  # descending G's loss raises the fake logits


def test_disc_and_gan_factor_schedule() -> None:
    cfg = LossConfig(disc_start=10, gan_start=20, gan_ramp=4)
    assert [disc_factor(s, cfg) for s in (0, 9, 10, 500)] == [0.0, 0.0, 1.0, 1.0]
    assert [gan_factor(s, cfg) for s in (0, 19, 20, 21, 23, 24, 500)] == [0, 0, 0.25, 0.5, 1.0, 1.0, 1.0]
    assert gan_factor(20, dataclasses.replace(cfg, gan_ramp=0)) == 1.0
    with pytest.raises(ValueError, match="disc_start <= gan_start"):
        LossConfig(disc_start=20, gan_start=10)
    with pytest.raises(ValueError, match="kl_weight"):
        LossConfig(kl_weight=-1.0)


def test_discriminator_loss_is_zero_before_disc_start() -> None:
    cfg = LossConfig(disc_start=10, gan_start=20)
    real, fake = REAL.clone().requires_grad_(), FAKE.clone().requires_grad_()
    loss, logs = discriminator_loss(real, fake, 9, cfg)
    loss.backward()
    assert loss.item() == 0.0 and (real.grad == 0).all() and logs["disc_factor"].item() == 0.0
    assert logs["disc_loss"].item() == pytest.approx(hinge_d_loss(REAL, FAKE).item())  # still logged
    loss, logs = discriminator_loss(REAL, FAKE, 10, cfg)
    assert loss.item() == pytest.approx(hinge_d_loss(REAL, FAKE).item())
    assert logs["logits_real"].item() == pytest.approx(REAL.mean().item())


# ---------------------------------------------------------------- adaptive weight

def test_adaptive_weight_equals_hand_computed_ratio() -> None:
    torch.manual_seed(0)
    layer, h, target = nn.Linear(5, 3), torch.randn(8, 5), torch.randn(8, 3)
    out = layer(h)
    rec, gan = (out - target).abs().mean(), -out.mean()
    weight = adaptive_gan_weight(rec, gan, layer.weight)
    # d mean|out - t| / dW = sign(out - t)^T h / N;  d(-mean(out)) / dW = -1^T h / N   (N = 8 * 3)
    rec_grad = torch.sign(out.detach() - target).T @ h / out.numel()
    gan_grad = -torch.ones(8, 3).T @ h / out.numel()
    assert weight.item() == pytest.approx((rec_grad.norm() / (gan_grad.norm() + 1e-4)).item(), rel=1e-5)
    assert weight.item() > 0 and math.isfinite(weight.item())
    assert not weight.requires_grad and weight.grad_fn is None and layer.weight.grad is None
    assert adaptive_gan_weight(rec, gan, layer.weight, max_weight=1e-3).item() == pytest.approx(1e-3)
    assert adaptive_gan_weight(rec, 0.0 * gan, layer.weight, max_weight=100.0).item() == 100.0  # no G gradient
    (rec + gan).backward()  # the graph was retained for the real backward pass


def test_adaptive_weight_under_bf16_autocast_and_ddp(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    last = model[2].weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        weight = adaptive_gan_weight(F.l1_loss(out.float(), x), -out.mean(), last)
    assert out.dtype == torch.bfloat16 and weight.dtype == torch.float32 and math.isfinite(weight.item())
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        out = ddp(x)
        rec, gan = F.l1_loss(out, x), -out.mean()
        weight_ddp = adaptive_gan_weight(rec, gan, ddp.module[2].weight)
        (rec + weight_ddp * gan).backward()  # DDP's own backward still works afterwards
        plain = model(x)
        expected = adaptive_gan_weight(F.l1_loss(plain, x), -plain.mean(), last)
        assert weight_ddp.item() == pytest.approx(expected.item(), rel=1e-5) and last.grad is not None
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- assembly: every weight is applied

class ToyPerceptual(nn.Module):
    """A cheap stand-in for LPIPS: (B,) mean squared difference of a fixed random projection."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.proj(x) - self.proj(y)).square().mean(dim=(1, 2, 3))


@functools.lru_cache(maxsize=None)
def _total(cfg: LossConfig, step: int = 100) -> float:
    torch.manual_seed(0)
    decoder = nn.Conv2d(4, 3, 3, padding=1)
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=8, num_layers=2))
    x, z = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 16, 16)
    recon = decoder(z)
    perceptual = None if cfg.perceptual == "none" else ToyPerceptual()
    terms = autoencoder_loss(x, recon, torch.tensor(0.3), torch.tensor([2.0, 4.0]), disc(recon),
                             decoder.weight, step, cfg, perceptual)
    return terms.total.item()


BASE = LossConfig(l1_weight=1.0, l2_weight=0.5, perceptual_weight=1.0, disc_weight=0.8, codebook_weight=1.0,
                  kl_weight=0.1, adaptive_weight_max=1e4, disc_start=0, gan_start=50, gan_ramp=100)
CHANGES = {"l1_weight": 2.0, "l2_weight": 2.0, "perceptual_weight": 3.0, "disc_weight": 2.0,
           "codebook_weight": 2.0, "kl_weight": 1.0, "adaptive_weight_max": 1e-6,
           "gan_start": 200, "gan_ramp": 10, "gan_loss": "non_saturating", "perceptual": "none"}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_every_config_weight_changes_the_total(field: str) -> None:
    assert _total(dataclasses.replace(BASE, **{field: CHANGES[field]})) != pytest.approx(_total(BASE), rel=1e-6)


def test_every_float_field_is_covered_by_the_weight_test() -> None:
    floats = {f.name for f in dataclasses.fields(LossConfig) if f.type == "float"}
    assert floats <= set(CHANGES), f"add new weights to CHANGES: {floats - set(CHANGES)}"


def test_autoencoder_loss_terms_during_warmup() -> None:
    cfg = dataclasses.replace(BASE, gan_start=50)
    x, recon = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5, requires_grad=True)
    terms = autoencoder_loss(x, recon, torch.tensor(0.3), None, None, None, 10, cfg, ToyPerceptual())
    assert terms.gan_weight.item() == 0.0 and terms.gan.item() == 0.0 and terms.kl.item() == 0.0
    assert terms.l1.item() == pytest.approx(0.5) and terms.l2.item() == pytest.approx(0.25)
    assert terms.total.item() == pytest.approx(terms.rec.item() + 0.3)
    with pytest.raises(ValueError, match="logits_fake is required"):
        autoencoder_loss(x, recon, None, None, None, None, 50, cfg, ToyPerceptual())
    with pytest.raises(ValueError, match="no perceptual module"):
        autoencoder_loss(x, recon, None, None, None, None, 10, cfg, None)
    with torch.no_grad():  # evaluation: last_layer=None gives a fixed adaptive weight of 1
        terms = autoencoder_loss(x, recon, None, None, torch.ones(2, 1, 2, 2), None, 200, cfg, ToyPerceptual())
    assert terms.gan_weight.item() == pytest.approx(0.8)


# ---------------------------------------------------------------- discriminator

@pytest.mark.parametrize("norm", ["group", "none"])
def test_discriminator_has_no_batchnorm_and_patch_shapes(norm: str) -> None:
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=16, norm=norm))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in disc.modules()) == (norm == "group")
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_discriminator_bf16_autocast_and_config_loading() -> None:
    disc = PatchDiscriminator(from_dict(DiscriminatorConfig, {"base_channels": 16, "norm": "group"}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = disc(torch.randn(2, 3, 32, 32))
        loss = hinge_d_loss(logits, -logits)
    loss.backward()
    assert torch.isfinite(logits.float()).all() and loss.dtype == torch.float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.parameters())


# ---------------------------------------------------------------- perceptual (offline LPIPS)

@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    return tmp_path / "torch_home" / "hub"


def test_missing_weights_raise_a_helpful_error(empty_hub: Path) -> None:
    for call in (lambda: resolve_vgg16_weights(None), lambda: build_perceptual("lpips", None)):
        with pytest.raises(PerceptualWeightsError) as info:
            call()
        message = str(info.value)
        for needle in (VGG16_FILENAME, WEIGHTS_ENV, "perceptual_weights_path", "perceptual=none", str(empty_hub)):
            assert needle in message


def test_resolver_order(empty_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = empty_hub / "checkpoints" / VGG16_FILENAME
    cached.parent.mkdir(parents=True)
    cached.touch()
    assert resolve_vgg16_weights(None) == cached
    (tmp_path / "env").mkdir()
    env_file = tmp_path / "env" / VGG16_FILENAME
    env_file.touch()
    monkeypatch.setenv(WEIGHTS_ENV, str(env_file))
    assert resolve_vgg16_weights(None) == env_file
    assert resolve_vgg16_weights(tmp_path / "env") == env_file  # a folder holding the file
    with pytest.raises(PerceptualWeightsError, match="does not exist"):
        resolve_vgg16_weights(tmp_path / "typo.pth")  # an explicit path never falls through


def test_vgg16_key_mapping_and_checksum(tmp_path: Path) -> None:
    w = torch.zeros(1)
    mapped = vgg16_features_to_lpips({"features.0.weight": w, "features.28.bias": w, "classifier.0.weight": w})
    assert set(mapped) == {"slice1.0.weight", "slice5.28.bias"}
    assert set(vgg16_features_to_lpips({"5.weight": w, "16.bias": w})) == {"slice2.5.weight", "slice4.16.bias"}
    with pytest.raises(PerceptualWeightsError, match="unexpected key"):
        vgg16_features_to_lpips({"lin0.model.1.weight": w})
    wrong = tmp_path / VGG16_FILENAME
    torch.save({"0.weight": w}, wrong)
    with pytest.raises(PerceptualWeightsError, match="corrupt or incomplete"):
        perceptual_module._verify_checksum(wrong)


def test_none_and_random_backbone_warn(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    with caplog.at_level(logging.WARNING, logger="autoencoder.perceptual"):
        assert build_perceptual("none") is None
    assert "WITHOUT the LPIPS" in caplog.text
    monkeypatch.setattr(perceptual_module, "LPIPSLoss", lambda path: ("stub", path))  # skip the 1 s VGG build
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autoencoder.perceptual"):
        assert build_perceptual("lpips_random", "/ignored") == ("stub", None)
    assert "RANDOMLY INITIALISED" in caplog.text


@pytest.fixture(scope="module")
def offline_lpips(tmp_path_factory: pytest.TempPathFactory):
    """Build LPIPS from a fake torchvision file and a random one, with no network and an empty hub."""
    import torchvision

    root = tmp_path_factory.mktemp("lpips")
    features = torchvision.models.vgg16(weights=None).features.state_dict()
    torch.save(features, root / "fake_vgg16.pth")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(root / "torch_home"))
        patch.delenv(WEIGHTS_ENV, raising=False)
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        loaded = build_perceptual("lpips", root / "fake_vgg16.pth")
        random = build_perceptual("lpips_random")
    return loaded, random, features, root


def test_lpips_builds_offline_without_downloading(offline_lpips) -> None:
    loaded, random, features, root = offline_lpips
    assert not (root / "torch_home").exists()  # nothing was cached, so nothing was downloaded
    assert torch.equal(getattr(loaded.lpips.net.slice5, "28").weight, features["28.weight"])
    assert not torch.equal(getattr(random.lpips.net.slice1, "0").weight, features["0.weight"])
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not loaded.train().training and not loaded.lpips.lin0.training


def test_lpips_distance_behaves(offline_lpips) -> None:
    loaded = offline_lpips[0]
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loaded(x, x).abs().max().item() < 1e-6
    small, large = (loaded((x + s * torch.randn_like(x)).clamp(-1, 1), x) for s in (0.05, 0.5))
    assert small.shape == (2,) and (small > 1e-6).all() and (large > small).all()
    noisy = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance = loaded(noisy, x)
    assert distance.dtype == torch.float32
    distance.sum().backward()
    assert noisy.grad is not None and torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0
