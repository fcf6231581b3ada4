"""FID and KID with an Inception-v3 whose weights the user gives as a file; nothing is ever downloaded.

    extractor = InceptionFeatures.from_file("pt_inception.pth")   # or $LATENTGEN_INCEPTION_WEIGHTS
    fid = frechet_distance(extractor(generated), extractor(reference))   # plain numbers ...
    records = inception_scores(generated, reference, extractor, seed=0)  # ... or ScoreRecords

The network is torchvision's ``inception_v3`` architecture built with ``weights=None`` and loaded from a
state dict file (``torch.save`` or ``.safetensors``); its pool3 features (2048-d) are what FID and KID
compare. The weights' SHA-256 goes into every record: FIDs from different weights (torchvision's ImageNet
port vs the TF-FID port) are not comparable, and the hash says which one a number came from.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.distribution import DistributionScoreError, ScoreRecord, check_images

WEIGHTS_ENV = "LATENTGEN_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
# Bilinear with antialias is PIL's bilinear resize (a proper filter whose support grows with the scale
# factor); clean-fid (Parmar et al. 2022) showed that aliasing resizes (plain bilinear/nearest without a
# filter, as many FID ports did) shift FID by more than many published gaps. Upsampling 32 -> 299 is
# unaffected by antialias, but downsampling larger images is, so it is always on and always recorded.
RESIZE = "bilinear, antialias=True, align_corners=False, to 299x299 (PIL-equivalent; clean-fid)"
FEATURES = 2048


class InceptionWeightsError(FileNotFoundError):
    """No Inception weights file was given, or the one given is not an Inception-v3 state dict."""


def weights_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file: ``path`` if given, else ``$LATENTGEN_INCEPTION_WEIGHTS``; one error naming both ways."""
    chosen = path if path is not None else os.environ.get(WEIGHTS_ENV) or None
    if chosen is None:
        raise InceptionWeightsError(
            "KID/FID need Inception-v3 weights, which are never downloaded: pass the state dict file with "
            f"--inception FILE (or path=... in Python) or set {WEIGHTS_ENV}=FILE")
    resolved = Path(chosen).expanduser()
    if not resolved.is_file():
        raise InceptionWeightsError(f"Inception weights file {resolved} does not exist; pass an existing file with "
                                    f"--inception FILE or {WEIGHTS_ENV}=FILE")
    return resolved


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_state(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights only: no pickled code runs
    except Exception as error:  # noqa: BLE001 -- any unreadable file gets the same message
        raise InceptionWeightsError(f"cannot read {path} as a state dict ({type(error).__name__}: {error}); "
                                    "give a torch.save(model.state_dict()) or .safetensors file") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"{path} holds a {type(state).__name__}, not a state dict; "
                                    "give a torch.save(model.state_dict()) file")
    return state


def build_inception(state: dict[str, Tensor], source: str = "the weights file") -> nn.Module:
    """torchvision's Inception-v3 (``weights=None``) with ``state`` loaded strictly, returning pool3 features."""
    from torchvision.models import inception_v3

    aux = any(key.startswith("AuxLogits.") for key in state)  # torchvision's own files keep the aux head
    classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
    # transform_input=False: we feed [-1, 1] ourselves, which is exactly what transform_input=True makes of
    # ImageNet-normalised input (it undoes the normalisation and maps [0, 1] to [-1, 1]).
    model = inception_v3(weights=None, aux_logits=aux, init_weights=False, transform_input=False,
                         num_classes=classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0:3]
        raise InceptionWeightsError(f"{source} is not a torchvision Inception-v3 state dict ({' '.join(first)}); "
                                    "give the weights of torchvision.models.inception_v3") from error
    model.fc = nn.Identity()  # the 2048-d average-pooled features (pool3) are what FID/KID compare
    return model.eval().requires_grad_(False)


@dataclass
class InceptionFeatures:
    """Images (N, 3, H, W) in [-1, 1] -> pool3 features (N, 2048), in batches, float64.

    ``name`` and ``sha256`` identify the extractor in the records.
    """

    model: nn.Module
    sha256: str
    name: str = "torchvision-inception_v3-pool3"
    batch_size: int = 32

    @classmethod
    def from_file(cls, path: str | os.PathLike[str] | None = None, batch_size: int = 32) -> InceptionFeatures:
        resolved = weights_path(path)
        return cls(build_inception(_read_state(resolved), str(resolved)), file_sha256(resolved),
                   batch_size=batch_size)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        out = []
        for batch in images.split(self.batch_size):
            resized = F.interpolate(batch.float().to(device), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                                    antialias=True, align_corners=False)
            out.append(self.model(resized.clamp(-1, 1)).double().cpu())
        return torch.cat(out)


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric PSD matrix; rounding's tiny negative eigenvalues count as 0."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def trace_sqrt_product(sigma_a: Tensor, sigma_b: Tensor) -> Tensor:
    """tr(sqrt(A B)) for symmetric PSD A, B, as tr(sqrt(sqrt(A) B sqrt(A))): that product is symmetric PSD,
    so ``eigh`` applies, where a general sqrtm of the non-symmetric A B can return complex rounding noise."""
    root_a = _sqrt_psd(sigma_a)
    middle = root_a @ sigma_b @ root_a
    return torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (unbiased) covariance of features (N, D), in float64."""
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def frechet_from_stats(mu_a: Tensor, sigma_a: Tensor, mu_b: Tensor, sigma_b: Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b)): the Fréchet distance of two Gaussians."""
    mu_a, sigma_a, mu_b, sigma_b = (t.double() for t in (mu_a, sigma_a, mu_b, sigma_b))
    value = (mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace() - 2 * trace_sqrt_product(sigma_a, sigma_b)
    return float(value.clamp_min(0))


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """FID of two feature sets (N, D), (M, D)."""
    return frechet_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


def polynomial_mmd2(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 with the cubic kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018): the within-set
    means leave out the diagonal, which is what makes its expectation 0 for two samples of one distribution."""
    x, y = x.double(), y.double()
    d = x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(features_a: Tensor, features_b: Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: mean and std of :func:`polynomial_mmd2` over ``subsets`` random subsets of each set, drawn
    without replacement, of ``subset_size`` (capped at the smaller set) images."""
    size = min(subset_size, len(features_a), len(features_b))
    if size < 2:
        raise DistributionScoreError(f"KID needs at least 2 images per set, got {len(features_a)} and "
                                     f"{len(features_b)}; score more images")
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([polynomial_mmd2(features_a[torch.randperm(len(features_a), generator=generator)[:size]],
                                           features_b[torch.randperm(len(features_b), generator=generator)[:size]])
                           for _ in range(subsets)], dtype=torch.float64)
    return float(values.mean()), float(values.std()) if subsets > 1 else 0.0


def scores_from_features(fake: Tensor, real: Tensor, extractor: InceptionFeatures, seed: int = 0,
                         kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict[str, ScoreRecord]:
    """FID and KID records of two feature sets that ``extractor`` computed (so a reference's features can be
    computed once and compared with several sets)."""
    common = {"counts": (len(fake), len(real)), "resize": RESIZE, "extractor": extractor.name,
              "weights_sha256": extractor.sha256, "seed": seed}
    kid, kid_std = kernel_inception_distance(fake, real, kid_subsets, kid_subset_size, seed)
    size = min(kid_subset_size, len(fake), len(real))
    return {"fid": ScoreRecord(name="fid", score=frechet_distance(fake, real), **common),
            "kid": ScoreRecord(name="kid", score=kid, std=kid_std, **common,
                               settings={"subsets": kid_subsets, "subset_size": size, "kernel": "(x.y/d + 1)^3"})}


def inception_scores(generated: Tensor, reference: Tensor, extractor: InceptionFeatures, seed: int = 0,
                     kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict[str, ScoreRecord]:
    """FID and KID records of two image sets (N, 3, H, W) in [-1, 1] through ``extractor``."""
    fake = extractor(check_images(generated, "generated"))
    real = extractor(check_images(reference, "reference"))
    return scores_from_features(fake, real, extractor, seed, kid_subsets, kid_subset_size)
