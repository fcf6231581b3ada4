from __future__ import annotations

import math

import pytest
import torch

from common.metrics import codebook_stats, psnr, ssim


def test_psnr_known_value_and_identity():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.2  # 0.1 on the [0, 1] scale -> mse 0.01 -> 20 dB
    assert torch.allclose(psnr(x, y), torch.full((2,), 20.0))
    assert psnr(x, x).min() > 90


def test_ssim_against_scikit_image():
    skimage = pytest.importorskip("skimage.metrics")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    ours = ssim(x, y).item()
    ref = skimage.structural_similarity(
        ((x[0] + 1) / 2).permute(1, 2, 0).numpy(), ((y[0] + 1) / 2).permute(1, 2, 0).numpy(),
        channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert abs(ours - ref) < 1e-3
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)


def test_codebook_stats():
    used, perplexity = codebook_stats(torch.tensor([0, 1, 2, 3]), 8)
    assert used == 0.5 and perplexity == pytest.approx(4.0)
    assert codebook_stats(torch.zeros(10, dtype=torch.long), 4) == (0.25, pytest.approx(1.0))
    assert not math.isnan(codebook_stats(torch.tensor([1, 1, 2]), 3)[1])
