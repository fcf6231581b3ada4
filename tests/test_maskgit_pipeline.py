"""MaskGIT through the shared machinery: prior/train.py trains it, pipeline.json records it, TokensToImage
samples it with num_inference_steps as its decoding steps, a seed reproduces it."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from pipelines import TokensToImage
from prior.maskgit import MaskGIT
from tiny import make_tiny_autoencoder, tiny_prior_config, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


def maskgit_config(autoencoder: Path, cache: Path) -> dict:
    config = tiny_prior_config(autoencoder, cache)
    config["model"]["kind"] = "maskgit"
    config["loss"]["pkeep"] = 1.0
    config["sample"]["guidance_tokens"] = 0
    config["maskgit"] = {"steps": 4, "choice_temperature": 2.0}
    return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("maskgit")
    (root / "prior.yaml").write_text(yaml.safe_dump(maskgit_config(make_tiny_autoencoder(root / "ae"), root / "cache")))
    train_in_process(importlib.import_module("prior.train").main, root / "prior.yaml", f"run.out_dir={root / 'run'}",
                     "run.steps=3")
    return root / "run"


def generate(pipe: TokensToImage, **options) -> torch.Tensor:
    return pipe(class_labels=torch.tensor([0, 3]), progress=False, output_type="latent", **options).images


def test_a_trained_maskgit_run_loads_and_samples_reproducibly(run_dir):
    meta = json.loads((run_dir / "pipeline" / "pipeline.json").read_text())
    assert meta["prior"]["kind"] == "maskgit" and meta["prior"]["maskgit"] == {"steps": 4, "choice_temperature": 2.0}
    assert (run_dir / "samples" / "final.png").is_file()
    pipe = TokensToImage.from_pretrained(run_dir)
    assert isinstance(pipe.model.prior, MaskGIT)
    first, again = generate(pipe, seed=0), generate(pipe, seed=0)
    assert first.shape == (2, 8, 8) and torch.equal(first, again)
    assert torch.equal(generate(pipe, seed=0, chunk_size=1), first), "tokens do not depend on the chunk size"


def test_num_inference_steps_is_the_number_of_decoding_steps(run_dir):
    pipe = TokensToImage.from_pretrained(run_dir)
    calls = []
    handle = pipe.model.prior.head.register_forward_hook(lambda *args: calls.append(1))
    try:
        generate(pipe, seed=0, guidance_scale=2.0)
        assert len(calls) == 4, "the saved maskgit.steps by default, one guided batch each"
        calls.clear()
        generate(pipe, seed=0, num_inference_steps=7)
        assert len(calls) == 7
    finally:
        handle.remove()


def test_a_pipeline_saved_before_maskgit_loads_as_an_ar_prior(tmp_path):
    from autoencoder.model import Autoencoder
    from prior.token_prior import TokenPrior
    from prior.transformer import GPT, PriorConfig

    autoencoder = Autoencoder.from_pretrained(make_tiny_autoencoder(tmp_path / "ae"))
    prior = GPT(PriorConfig(codebook_size=32, grid_size=8, condition="class", num_classes=2, width=32, depth=1,
                            heads=4)).eval()
    directory = TokenPrior(autoencoder, prior, class_names=["a", "b"]).save_pretrained(tmp_path / "pipe")
    meta = json.loads((directory / "pipeline.json").read_text())
    assert meta["prior"]["kind"] == "ar" and "maskgit" not in meta["prior"]
    del meta["prior"]["kind"]  # the layout of files written before MaskGIT
    (directory / "pipeline.json").write_text(json.dumps(meta))
    config = json.loads((directory / "prior" / "config.json").read_text())
    config.get("config", config).pop("kind", None)
    (directory / "prior" / "config.json").write_text(json.dumps(config))
    loaded = TokenPrior.from_pretrained(directory)
    assert type(loaded.prior) is GPT and loaded.kind == "ar"
