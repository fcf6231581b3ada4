"""Distribution scores: SWD on Laplacian-pyramid patches, FID and KID formulas, the Inception extractor from a
weights file (a random-weights one saved by the test; nothing is downloaded), and the benchmark command."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision.transforms.functional as TF

from common.distribution import SWDConfig, laplacian_pyramid, sliced_wasserstein
from common.inception_scores import (
    FEATURES,
    InceptionFeatures,
    frechet_distance,
    frechet_from_stats,
    inception_scores,
    kernel_inception_distance,
    polynomial_mmd2,
    trace_sqrt_product,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = SWDConfig(patches_per_image=32, directions=128, repeats=2)


@pytest.fixture(scope="module")
def shapes() -> tuple[torch.Tensor, torch.Tensor]:
    from common.data.shapes import ShapesDataset

    data = ShapesDataset(32, size=128, seed=0)
    images = torch.stack([data[i]["image"] for i in range(128)])
    return images[:64], images[64:]


# ----------------------------------------------------------------------------------------------- SWD
def test_pyramid_reconstructs_the_image(shapes):
    """Band-pass levels plus the low-pass residual add back up to the image (the pyramid loses nothing)."""
    from common.distribution import _up

    levels = laplacian_pyramid(shapes[0][:4], min_resolution=8)
    assert [level.shape[-1] for level in levels] == [32, 16, 8]
    image = levels[-1]
    for band in reversed(levels[:-1]):
        image = band + _up(image, band.shape[-2:])
    assert torch.allclose(image, shapes[0][:4], atol=1e-5)


def test_swd_identical_sets_zero_and_record(shapes):
    record = sliced_wasserstein(shapes[0], shapes[0], FAST)
    assert record.score == pytest.approx(0.0, abs=1e-9)
    assert len(record.per_level) == 2 and record.counts == (64, 64)
    assert record.weights_sha256 == "none" and record.seed == 0 and "native" in record.resize
    assert json.loads(json.dumps(record.to_dict()))["name"] == "swd"


def test_swd_blur_is_monotonic_and_worse_than_another_real_sample(shapes):
    """More blur, higher SWD; even a mild blur costs the finest level more than a fresh real sample does."""
    real, other = shapes
    blurred = [sliced_wasserstein(TF.gaussian_blur(real, 7, sigma), real, FAST) for sigma in (0.6, 1.0, 1.6, 2.5)]
    scores = [record.score for record in blurred]
    assert scores == sorted(scores) and len(set(scores)) == 4
    assert sliced_wasserstein(other, real, FAST).per_level[0] < 0.7 * blurred[0].per_level[0]


def test_swd_sees_a_colour_shift(shapes):
    real, other = shapes

    def redder(amount: float) -> torch.Tensor:  # green and blue pulled towards -1: white turns pink
        shifted = real.clone()
        shifted[:, 1:] = shifted[:, 1:] * (1 - amount) - amount
        return shifted

    scores = [sliced_wasserstein(redder(amount), real, FAST).score for amount in (0.0, 0.1, 0.2, 0.4)]
    assert scores[0] == 0 and scores == sorted(scores) and len(set(scores)) == 4
    assert scores[-1] > 1.5 * sliced_wasserstein(other, real, FAST).score


def test_swd_ignores_image_order_and_is_deterministic(shapes):
    real, other = shapes
    first = sliced_wasserstein(other, real, FAST)
    shuffled = sliced_wasserstein(other[torch.randperm(64)], real[torch.randperm(64)], FAST)
    assert shuffled.per_level == first.per_level
    assert sliced_wasserstein(other, real, FAST).per_level == first.per_level
    reseeded = sliced_wasserstein(other, real, SWDConfig(patches_per_image=32, directions=128, repeats=2, seed=1))
    assert reseeded.per_level != first.per_level and reseeded.seed == 1


# ----------------------------------------------------------------------------------------------- FID
def test_trace_sqrt_against_scipy_and_commuting_case():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    b = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    sigma_a, sigma_b = a @ a.T, b @ b.T + 0.1 * torch.eye(12, dtype=torch.float64)
    diagonal_a, diagonal_b = torch.diag(torch.arange(1.0, 5.0)), torch.diag(torch.arange(4.0, 0.0, -1))
    assert float(trace_sqrt_product(diagonal_a, diagonal_b)) == pytest.approx(float((diagonal_a @ diagonal_b)
                                                                                    .diagonal().sqrt().sum()))
    scipy_linalg = pytest.importorskip("scipy.linalg")
    expected = scipy_linalg.sqrtm((sigma_a @ sigma_b).numpy()).trace().real
    assert float(trace_sqrt_product(sigma_a, sigma_b)) == pytest.approx(expected, rel=1e-8)


def test_fid_formula_on_known_gaussians():
    """Diagonal covariances: FID = |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2."""
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s_a, s_b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    expected = float((mu_a - mu_b).square().sum() + (s_a.sqrt() - s_b.sqrt()).square().sum())
    assert frechet_from_stats(mu_a, torch.diag(s_a), mu_b, torch.diag(s_b)) == pytest.approx(expected)
    # ... and from samples whose mean and covariance are exactly those (whitened draws)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(400, 3, generator=generator, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # mean 0, covariance I exactly
    x, y = mu_a + z * s_a.sqrt(), mu_b + z.flip(0) * s_b.sqrt()
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------------------------- KID
def test_mmd_against_a_direct_double_loop():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 4, generator=generator, dtype=torch.float64) + 0.5

    def k(a, b):
        return (float(a @ b) / 4 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert polynomial_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_kid_is_unbiased_and_sees_a_shift():
    """Two samples of one Gaussian: the estimates centre on 0 (a biased V-statistic would be > 0 every time)."""
    generator = torch.Generator().manual_seed(0)
    same = [polynomial_mmd2(torch.randn(20, 8, generator=generator), torch.randn(20, 8, generator=generator))
            for _ in range(300)]
    values = torch.tensor(same)
    assert abs(float(values.mean())) < 3 * float(values.std()) / 300 ** 0.5
    assert (values < 0).any() and (values > 0).any()
    a, b = torch.randn(200, 8, generator=generator), torch.randn(200, 8, generator=generator) + 0.5
    mean, std = kernel_inception_distance(a, b, subsets=10, subset_size=100)
    assert mean > 5 * std > 0
    assert kernel_inception_distance(a, b, subsets=10, subset_size=100) == (mean, std)  # seeded


# ----------------------------------------------------------------------------------------------- Inception
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(model.state_dict(), path)
    return path


def test_inception_from_file_features_and_records(inception_file, monkeypatch, shapes):
    extractor = InceptionFeatures.from_file(inception_file, batch_size=2)
    images = shapes[0][:3]
    features = extractor(images)
    assert features.shape == (3, FEATURES) and features.dtype == torch.float64
    monkeypatch.setenv("LATENTGEN_INCEPTION_WEIGHTS", str(inception_file))
    from_env = InceptionFeatures.from_file(batch_size=3)
    assert from_env.sha256 == extractor.sha256 and len(extractor.sha256) == 64
    assert torch.allclose(from_env(images), features, atol=1e-4)
    # one forward pass per set: record the scores of the same 3 images from the features computed above
    records = inception_scores(images, images, from_env, kid_subsets=2)
    assert records["fid"].score == pytest.approx(0.0, abs=1e-3)
    for record in records.values():
        assert record.counts == (3, 3) and record.weights_sha256 == extractor.sha256
        assert "antialias=True" in record.resize and record.extractor.startswith("torchvision-inception")
