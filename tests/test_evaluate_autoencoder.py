"""``python -m autoencoder.evaluate`` on tiny trained models: its figures against an independent computation.

The expected figures are computed here from the reconstructions the model is meant to be scored on
(the VQ model's decoded codes, the KL model's decoded posterior mean): PSNR and the codebook figures in
numpy from their definitions; SSIM through ``common.metrics.ssim``, which test_metrics.py checks against
scikit-image. LPIPS is replaced by a stand-in distance so that its path is checked without VGG weights.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

import autoencoder.evaluate as evaluate_module
from autoencoder import Autoencoder, AutoencoderConfig, QuantizerConfig, build_autoencoder
from autoencoder.perceptual import PerceptualWeightsError
from common.data import DataConfig, build_dataset
from common.metrics import ssim

TINY = AutoencoderConfig(resolution=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                         z_channels=8, code_dim=4, quantizer=QuantizerConfig(codebook_size=256, dead_code_threshold=0))
HELDOUT = DataConfig(name="shapes", resolution=16, split="heldout", size=6)
pytestmark = pytest.mark.usefixtures("one_thread")


class MeanAbsDistance(nn.Module):
    """Stands in for LPIPS: one distance per image, (B,)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().flatten(1).mean(1)


@pytest.fixture(autouse=True)
def fake_lpips(monkeypatch):
    monkeypatch.setattr(evaluate_module, "build_perceptual", lambda kind, weights="": MeanAbsDistance())


def heldout_images() -> torch.Tensor:
    dataset = build_dataset(HELDOUT)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def train_tiny(kind: str, steps: int = 8) -> Autoencoder:
    """A few Adam steps of reconstruction on the shapes train split (the data evaluate never sees)."""
    torch.manual_seed(0)
    model = build_autoencoder(dataclasses.replace(TINY, kind=kind)).train()
    train = build_dataset(dataclasses.replace(HELDOUT, split="train", size=8))
    x = torch.stack([train[i]["image"] for i in range(len(train))])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        out = model(x)
        regulariser = out.quantizer_loss if kind == "vq" else 1e-6 * out.kl
        loss = (out.recon - x).abs().mean() + regulariser
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def run_evaluate(model: Autoencoder, tmp_path, capsys) -> dict:
    """Save ``model`` as a training run and score it through the command-line entry point."""
    model.save_pretrained(tmp_path / "run" / "autoencoder")
    result = evaluate_module.main([str(tmp_path / "run"), "--data", "shapes", "--split", "heldout", "--size", "6"])
    assert json.loads(capsys.readouterr().out) == result  # what is printed is what is returned
    return result


def expected_image_figures(recon: torch.Tensor, x: torch.Tensor) -> dict:
    recon = recon.clamp(-1, 1)
    a, b = ((recon.numpy() + 1) / 2).astype(np.float64), ((x.numpy() + 1) / 2).astype(np.float64)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return {"psnr": float(np.mean(10 * np.log10(1.0 / mse))), "ssim": ssim(recon, x).mean().item(),
            "lpips": float(np.abs(a - b).reshape(len(a), -1).mean(1).mean() * 2)}


def assert_figures(result: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_vq_figures_match_an_independent_computation(tmp_path, capsys):
    model = train_tiny("vq")
    result = run_evaluate(model, tmp_path, capsys)
    loaded = Autoencoder.from_pretrained(tmp_path / "run" / "autoencoder")
    x = heldout_images()
    with torch.no_grad():
        indices = loaded.encode_to_indices(x)
        expected = expected_image_figures(loaded.decode_indices(indices), x)
    counts = np.bincount(indices.flatten().numpy(), minlength=TINY.codebook_size)
    probs = counts[counts > 0] / counts.sum()
    expected.update(codebook_used=(counts > 0).sum() / TINY.codebook_size,
                    perplexity=float(np.exp(-(probs * np.log(probs)).sum())))
    assert_figures(result, expected)
    assert result["images"] == 6 and result["codebook_size"] == 256 and result["resolution"] == 16
    assert 10 < result["psnr"] < 60 and 0 < result["codebook_used"] < 1  # a real, imperfect model


def test_kl_model_is_scored_on_its_posterior_mean(tmp_path, capsys):
    model = train_tiny("kl")
    result = run_evaluate(model, tmp_path, capsys)
    x = heldout_images()
    with torch.no_grad():
        expected = expected_image_figures(model.decode(model.encode(x).mean), x)
    assert_figures(result, expected)
    assert result["codebook_used"] is None and result["perplexity"] is None
    assert run_evaluate(model, tmp_path, capsys) == result  # deterministic: no posterior noise


def test_batches_average_per_image_and_the_model_mode_is_kept():
    model = train_tiny("vq", steps=1).train()
    step = model.quantizer.step.clone()
    whole = evaluate_module.evaluate(model, HELDOUT, batch_size=64)
    batched = evaluate_module.evaluate(model, HELDOUT, batch_size=4)  # batches of 4 and 2 images
    assert batched == pytest.approx(whole, rel=1e-5)
    # scoring never trains the quantizer (no statistics update, no code restart) and leaves the mode alone
    assert torch.equal(model.quantizer.step, step) and model.training


def test_lpips_is_null_without_vgg_weights(monkeypatch):
    def missing(kind, weights=""):
        raise PerceptualWeightsError("no VGG16 weights here")

    monkeypatch.setattr(evaluate_module, "build_perceptual", missing)
    result = evaluate_module.evaluate(train_tiny("vq", steps=1), HELDOUT)
    assert result["lpips"] is None and result["psnr"] > 0
