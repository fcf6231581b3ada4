"""The distribution scores' bad-input catalogue, and ``bench.distribution_scores`` end to end on tiny inputs.

Every refusal names the problem and the fix; a refused command leaves the scored folder untouched.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bad_inputs import refused, snapshot
from common.distribution import DistributionScoreError, SWDConfig, sliced_wasserstein
from common.images import tensor_to_pil
from common.inception_scores import InceptionFeatures, InceptionWeightsError, weights_path

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = "LATENTGEN_INCEPTION_WEIGHTS"


def images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n + size)) * 2 - 1


def bench(*argv: str) -> dict:
    from bench.distribution_scores import main

    return main(list(argv))


def bench_error(*argv: str) -> str:
    return refused(lambda: bench(*argv), error=SystemExit)


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Eight 16 px shapes images as PNGs (the 'generator output' a user would score)."""
    from common.data.shapes import ShapesDataset

    data = ShapesDataset(16, size=8, seed=3)
    out = tmp_path / "samples"
    out.mkdir()
    for i, image in enumerate(tensor_to_pil(torch.stack([data[i]["image"] for i in range(8)]))):
        image.save(out / f"{i}.png")
    return out


# ------------------------------------------------------------------------------------ weights (Python)
def test_missing_weights_names_both_ways(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    refused(weights_path, "--inception FILE", ENV, "never downloaded", error=InceptionWeightsError)


def test_weights_file_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "nope.pth"))
    refused(InceptionFeatures.from_file, "nope.pth", "does not exist", "--inception", error=InceptionWeightsError)


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    refused(lambda: InceptionFeatures.from_file(garbage), "cannot read", "state_dict()", error=InceptionWeightsError)


def test_weights_of_another_network(tmp_path):
    other = tmp_path / "linear.pth"
    torch.save(nn.Linear(3, 2).state_dict(), other)
    refused(lambda: InceptionFeatures.from_file(other), "not a torchvision Inception-v3 state dict",
            "inception_v3", error=InceptionWeightsError)


# ------------------------------------------------------------------------------------ image sets (Python)
@pytest.mark.parametrize(("generated", "words"), [
    (images(4, 16)[:, :1], ("generated", "(N, 3, H, W)")),
    (images(1, 16), ("at least 2 images", "more images")),
    (images(4, 16) * float("nan"), ("NaN", "generator's output")),
    (images(4, 32), ("differ in size", "one resolution")),
])
def test_bad_image_sets(generated, words):
    refused(lambda: sliced_wasserstein(generated, images(4, 16)), *words, error=DistributionScoreError)


def test_images_smaller_than_a_patch_and_bad_settings():
    refused(lambda: sliced_wasserstein(images(4, 5), images(4, 5)), "smaller than", "SWDConfig.patch",
            error=DistributionScoreError)
    refused(lambda: SWDConfig(directions=0), "SWDConfig.directions", "at least 1", error=DistributionScoreError)


# ------------------------------------------------------------------------------------ the command
def test_command_refusals_leave_the_folder_untouched(folder, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    before = snapshot(folder)
    assert "does not exist" in bench_error(str(folder), "--reference", "shapes", "--inception", str(tmp_path / "x"))
    assert "is not a directory" in bench_error(str(tmp_path / "missing"), "--reference", "shapes")
    assert "neither a built-in dataset" in bench_error(str(folder), "--reference", str(tmp_path / "nowhere"))
    monkeypatch.setenv(ENV, str(tmp_path / "gone.pth"))
    assert ENV in bench_error(str(folder), "--reference", "shapes")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv(ENV)
    assert "error:" in bench_error(str(empty), "--reference", "shapes")
    assert snapshot(folder) == before


def test_command_count_must_be_two_or_more(folder, capsys):
    refused(lambda: bench(str(folder), "--count", "1"), error=SystemExit)
    assert ">= 2" in capsys.readouterr().err


def test_command_scores_a_folder_with_its_baseline(folder, monkeypatch, capsys):
    """SWD always; FID/KID through the extractor the weights give (a stand-in network here, for speed)."""
    monkeypatch.delenv(ENV, raising=False)
    report = bench(str(folder), "--reference", "shapes", "--count", "8", "--resolution", "16")
    assert json.loads(capsys.readouterr().out) == report
    assert set(report["scores"]) == {"swd"} and set(report["baseline"]["scores"]) == {"swd"}
    swd = report["scores"]["swd"]
    assert swd["counts"] == [8, 8] and swd["weights_sha256"] == "none" and swd["score"] > 0
    assert "heldout" in report["baseline"]["what"] and report["command"].startswith("python -m bench.distribution")
    assert "stage1_floor" not in report, "a folder has no autoencoder to reconstruct through"

    stand_in = InceptionFeatures(nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 12)), "ab" * 32,
                                 "stand-in")
    monkeypatch.setattr(InceptionFeatures, "from_file", classmethod(lambda cls, path=None: stand_in))
    report = bench(str(folder), "--reference", "shapes", "--count", "8", "--resolution", "16", "--inception", "w")
    kid = report["scores"]["kid"]
    assert kid["weights_sha256"] == "ab" * 32 and "antialias=True" in kid["resize"] and "std" in kid
    assert {"fid", "kid", "swd"} == set(report["baseline"]["scores"])


def test_command_scores_a_pipeline(tmp_path, monkeypatch):
    """A saved (tiny, random) diffusion pipeline, prompted with the reference's captions at its own size."""
    from tiny import make_tiny_pipeline

    monkeypatch.delenv(ENV, raising=False)
    make_tiny_pipeline(tmp_path / "parts").save_pretrained(tmp_path / "run" / "pipeline")
    report = bench(str(tmp_path / "run"), "--reference", "shapes", "--count", "4", "--batch", "2")
    assert report["source"] == "pipeline" and report["scores"]["swd"]["counts"] == [4, 4]
    floor, baseline = report["stage1_floor"]["scores"]["swd"], report["baseline"]["scores"]["swd"]
    assert "reconstructed by the pipeline's autoencoder" in report["stage1_floor"]["what"]
    assert floor["counts"] == baseline["counts"] and floor["score"] != baseline["score"]
    within = report["within_stage1"]
    assert within["scores"]["swd"]["counts"] == [4, 4] and within["floor"]["swd"]["counts"] == [4, 4]
    # against the reconstructed training images, not the raw ones: both of its scores move
    assert within["scores"]["swd"]["score"] != report["scores"]["swd"]["score"]
    assert within["floor"]["swd"]["score"] != floor["score"]
