"""Distribution scores of a generator (a pipeline directory) or an image folder against a training set.

    python -m bench.distribution_scores runs/emoji32_diffusion --reference emoji --count 500
    python -m bench.distribution_scores samples/ --reference emoji --count 500 --inception pt_inception.pth

Prints one JSON object: SWD (always; no pretrained network), FID and KID when Inception weights are given
(``--inception FILE`` or ``$LATENTGEN_INCEPTION_WEIGHTS``), and the same scores for a copy-the-training-set
baseline: the training images against the held-out split (emoji, shapes) or against the folder's other
half. A generator cannot be expected to score below that floor with this many images. For a pipeline, the
``stage1_floor`` scores those baseline images after a round trip through its autoencoder: what any generator
that decodes through it can reach; and ``within_stage1`` compares the generated images with the training
images after the same round trip, so that generators sharing one autoencoder are ranked by what they add.

Pipelines are prompted with the captions of randomly chosen training images (class pipelines with their
labels), ``--batch`` at a time, seeds ``seed + i``. Every record says its counts, resize, extractor,
weights hash and seed (:class:`common.distribution.ScoreRecord`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from common.checkpoint import CheckpointError
from common.config import ConfigError
from common.data import DataConfig, DataError, build_dataset
from common.distribution import DistributionScoreError, SWDConfig, check_images, sliced_wasserstein
from common.evaluation import whole_number
from common.inception_scores import WEIGHTS_ENV, InceptionFeatures, InceptionWeightsError, scores_from_features

REFERENCES = ("emoji", "shapes")


def is_pipeline(path: Path) -> bool:
    return (path / "pipeline.json").is_file() or (path / "pipeline" / "pipeline.json").is_file()


def stack(dataset, indices: list[int]) -> tuple[Tensor, list[str], list[int]]:
    items = [dataset[i] for i in indices]
    return (torch.stack([item["image"] for item in items]), [str(item["caption"]) for item in items],
            [int(item["label"]) for item in items])


def choose(length: int, count: int, seed: int) -> list[int]:
    """``count`` (at most ``length``) distinct indices, fixed by ``seed``."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:count].tolist()


def reference_sets(reference: str, resolution: int, count: int, seed: int) -> tuple[dict, dict]:
    """(training images, captions, labels) and the baseline's images: the held-out split, or for a folder
    the images not in the training draw."""
    if reference in REFERENCES:
        train = build_dataset(DataConfig(name=reference, resolution=resolution, split="train", size=count))
        heldout = build_dataset(DataConfig(name=reference, resolution=resolution, split="heldout", size=count))
        images, captions, labels = stack(train, choose(len(train), count, seed))
        floor = stack(heldout, choose(len(heldout), count, seed))[0]
        return {"images": images, "captions": captions, "labels": labels, "name": f"{reference} train"}, {
            "images": floor, "name": f"{reference} heldout"}
    folder = Path(reference)
    if not folder.is_dir():
        raise DistributionScoreError(f"--reference {reference!r} is neither a built-in dataset "
                                     f"({', '.join(REFERENCES)}) nor an image folder; give one of those")
    data = build_dataset(DataConfig(name="folder", path=str(folder), resolution=resolution))
    order = choose(len(data), len(data), seed)
    half = min(count, len(data) // 2)
    images, captions, labels = stack(data, order[:half])
    floor = stack(data, order[half:2 * half])[0]
    return {"images": images, "captions": captions, "labels": labels, "name": f"{folder} (one half)"}, {
        "images": floor, "name": f"{folder} (other half)"}


def pipeline_resolution(pipe) -> int:
    """The side of the images a pipeline draws by default (token grid x factor, or the training resolution)."""
    size = getattr(pipe, "image_size", None)
    return int(size) if size is not None else int(pipe.model.autoencoder.config.resolution)


def generate(pipe, reference: dict, count: int, seed: int, batch: int) -> Tensor:
    """``count`` images of ``pipe``, prompted like ``reference``'s images (class pipelines: its labels), in [-1, 1]."""
    from pipelines.text_to_image import ClassToImage

    conditions = reference["labels"] if isinstance(pipe, ClassToImage) else reference["captions"]
    conditions = [conditions[i % len(conditions)] for i in range(count)]
    out = [pipe(conditions[i:i + batch], seed=seed + i, output_type="pt", progress=False).images.cpu()
           for i in range(0, count, batch)]
    return torch.cat(out).float() * 2 - 1


@torch.no_grad()
def reconstructions(pipe, images: Tensor, batch: int) -> Tensor:
    """``images`` (B, 3, H, W) in [-1, 1] through the pipeline's autoencoder (a KL one at its posterior mean):
    the best any generator that decodes through it can draw."""
    autoencoder = pipe.model.autoencoder
    device = next(autoencoder.parameters()).device
    options = {"sample": False} if autoencoder.config.kind == "kl" else {}
    parts = [autoencoder(part.to(device), **options).recon.float().clamp(-1, 1).cpu() for part in images.split(batch)]
    return torch.cat(parts)


def load_folder(path: Path, resolution: int, count: int, seed: int) -> Tensor:
    data = build_dataset(DataConfig(name="folder", path=str(path), resolution=resolution))
    return stack(data, choose(len(data), count, seed))[0]


def scores(generated: Tensor, reference: Tensor, seed: int, extractor: InceptionFeatures | None,
           reference_features: Tensor | None) -> dict[str, Any]:
    """SWD, plus FID and KID when there is an extractor (the reference's features computed once, by the caller)."""
    records = {"swd": sliced_wasserstein(generated, reference, SWDConfig(seed=seed))}
    if extractor is not None and reference_features is not None:
        features = extractor(check_images(generated, "generated"))
        records.update(scores_from_features(features, reference_features, extractor, seed=seed))
    return {name: record.to_dict() for name, record in records.items()}


def stage1_scores(pipe, reference: dict, floor: dict, generated: Tensor, args: argparse.Namespace,
                  extractor: InceptionFeatures | None, real_features: Tensor | None) -> dict[str, Any]:
    """Two views through the pipeline's autoencoder. ``stage1_floor``: the baseline's images after a round trip
    against the training images, the best any generator decoding through it can score. ``within_stage1``: the
    generated images against the *reconstructed* training images, with the reconstructed baseline as its floor;
    the autoencoder's blur is on both sides there, so this score ranks generators that share a stage 1."""
    heldout = reconstructions(pipe, floor["images"], args.batch)
    train = reconstructions(pipe, reference["images"], args.batch)
    train_features = extractor(check_images(train, "reconstructed reference")) if extractor is not None else None
    return {
        "stage1_floor": {
            "what": f"{floor['name']} reconstructed by the pipeline's autoencoder against {reference['name']}",
            "scores": scores(heldout, reference["images"], args.seed, extractor, real_features)},
        "within_stage1": {
            "what": f"generated against {reference['name']} reconstructed by the pipeline's autoencoder; floor: "
                    f"{floor['name']} reconstructed the same way",
            "scores": scores(generated, train, args.seed, extractor, train_features),
            "floor": scores(heldout, train, args.seed, extractor, train_features)},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON report; the weights and the target are checked before any image is rendered or generated."""
    extractor = None
    if args.inception or os.environ.get(WEIGHTS_ENV):
        extractor = InceptionFeatures.from_file(args.inception)
        extractor.model.to(args.device)
    target = Path(args.target)
    if not target.is_dir():
        raise DistributionScoreError(f"{target} is not a directory; give a pipeline directory (or its training run) "
                                     "or a folder of images")
    started = time.perf_counter()
    pipe = None
    if is_pipeline(target):
        from pipelines.loading import load_pipeline

        pipe = load_pipeline(target).to(args.device)
    resolution = args.resolution or (pipeline_resolution(pipe) if pipe is not None else 32)
    reference, floor = reference_sets(args.reference, resolution, args.count, args.seed)
    drawn_at = None
    if pipe is not None:
        generated = generate(pipe, reference, args.count, args.seed, args.batch)
        if generated.shape[-1] != resolution:  # --resolution overrides the pipeline's: say so in the report
            drawn_at = generated.shape[-1]
            generated = F.interpolate(generated, size=(resolution, resolution), mode="bilinear", antialias=True)
    else:
        generated = load_folder(target, resolution, args.count, args.seed)
    real = reference["images"]
    real_features = extractor(check_images(real, "reference")) if extractor is not None else None
    return {
        "target": str(target), "source": "pipeline" if pipe is not None else "image folder",
        "reference": reference["name"], "resolution": resolution,
        **({"generated_resized": f"{drawn_at} -> {resolution}, bilinear, antialias=True"} if drawn_at else {}),
        "scores": scores(generated, real, args.seed, extractor, real_features),
        "baseline": {"what": f"{floor['name']} against {reference['name']} (copy-the-training-set floor)",
                     "scores": scores(floor["images"], real, args.seed, extractor, real_features)},
        **(stage1_scores(pipe, reference, floor, generated, args, extractor, real_features)
           if pipe is not None and drawn_at is None else {}),
        "seconds": round(time.perf_counter() - started, 1),
        "command": shlex.join(["python", "-m", "bench.distribution_scores", *args.argv]),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.distribution_scores", description=__doc__.split("\n")[0])
    p.add_argument("target", help="a pipeline directory (or its training run directory) or a folder of images")
    p.add_argument("--reference", default="emoji", help=f"{', '.join(REFERENCES)} or a folder of images")
    p.add_argument("--count", type=whole_number(2), default=500, help="images per set (default 500)")
    p.add_argument("--inception", default=None,
                   help=f"Inception-v3 state dict file for FID/KID (or set {WEIGHTS_ENV}); never downloaded")
    p.add_argument("--resolution", type=whole_number(8), default=None,
                   help="side of the compared images (default: the pipeline's, else 32)")
    p.add_argument("--seed", type=whole_number(0), default=0)
    p.add_argument("--batch", type=whole_number(1), default=64, help="images per pipeline call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the Inception network runs (default: cuda when available)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, score, print the JSON; a refused input ends in ``error: <message>`` (exit 1), nothing written."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    try:
        report = run(args)
    except (DistributionScoreError, InceptionWeightsError, DataError, ConfigError, CheckpointError) as error:
        raise SystemExit(f"error: {error}") from None  # the message names the fix; a traceback would hide it
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
