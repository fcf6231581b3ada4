"""``init_from=PATH`` through each training script's ``main``: the weights of the source land in the trained
model (and its EMA: a 0-step run saves them unchanged), a run that resumes ignores the source and continues
exactly, and a config whose model differs from the source's fails before training, naming what differs."""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from autoencoder.model import Autoencoder
from common.checkpoint import CheckpointError
from common.training import read_metrics
from diffusion.latent_diffusion import LatentDiffusion
from tiny import TINY_AUTOENCODER, make_tiny_pipeline, tiny_prior_config, train_in_process

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
RUN = {"precision": "no", "log_every": 1, "sample_every": 100, "save_every": 2, "progress": False,
       "ema_decay": 0.9, "cpu_threads": 1}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(script: str, config: Path, *overrides: str) -> None:
    train_in_process(importlib.import_module(script).main, config, *overrides)


# ------------------------------------------------------------------------------------------- diffusion
@pytest.fixture(scope="module")
def diffusion(tmp_path_factory) -> Path:
    """A tiny saved pipeline (the source, ``base/pipeline``) and a training config of the same U-Net on it."""
    root = tmp_path_factory.mktemp("init_diffusion")
    pipe = make_tiny_pipeline(root)
    pipe.save_pretrained(root / "base" / "pipeline")
    config = {
        "autoencoder": str(root / "base" / "pipeline"), "cache_dir": str(root / "cache"),
        "model": {"block_channels": [16, 32], "attention_levels": [False, True], "layers_per_block": 1,
                  "head_dim": 8, "context_dim": 32},
        "diffusion": {"num_steps": 100}, "text": {"name_or_path": str(root / "text")},
        "optim": {"lr": 1e-3, "warmup_steps": 2}, "data": {"name": "shapes", "resolution": 16, "size": 16},
        "run": {**RUN, "batch_size": 4}, "sample": {"prompts": ["a small red circle"], "steps": 2},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root


def test_diffusion_starts_from_the_source_and_keeps_its_latent_scale(diffusion):
    out = diffusion / "zero"
    run("diffusion.train_latent", diffusion / "tiny.yaml", f"init_from={diffusion / 'base'}", "run.steps=0",
        f"run.out_dir={out}")
    assert_same(weights(out / "pipeline" / "unet"), weights(diffusion / "base" / "pipeline" / "unet"))
    assert LatentDiffusion.from_pretrained(out / "pipeline").latent_scale == 2.5, "the source's scale, not the data's"


def test_diffusion_resume_after_init_from_is_exact_without_the_source(diffusion):
    source = diffusion / "copy"
    shutil.copytree(diffusion / "base", source)
    common = (diffusion / "tiny.yaml", f"init_from={source}")
    run("diffusion.train_latent", *common, "run.steps=4", f"run.out_dir={diffusion / 'full'}")
    run("diffusion.train_latent", *common, "run.steps=2", f"run.out_dir={diffusion / 'split'}")
    shutil.rmtree(source)  # the checkpoint holds the weights
    run("diffusion.train_latent", *common, "run.steps=4", f"run.out_dir={diffusion / 'split'}")
    full, split = (read_metrics(diffusion / name) for name in ("full", "split"))
    assert [m["loss"] for m in full] == [m["loss"] for m in split]
    assert_same(weights(diffusion / "full" / "pipeline" / "unet"), weights(diffusion / "split" / "pipeline" / "unet"))
    fresh = diffusion / "fresh"
    run("diffusion.train_latent", diffusion / "tiny.yaml", "run.steps=1", f"run.out_dir={fresh}")
    assert read_metrics(fresh)[0]["loss"] != full[0]["loss"], "the source's weights, not a random U-Net"


def test_diffusion_mismatched_architecture_names_keys_and_fields(diffusion):
    with pytest.raises(CheckpointError) as error:
        run("diffusion.train_latent", diffusion / "tiny.yaml", f"init_from={diffusion / 'base'}",
            "model.block_channels=[16, 48]", f"run.out_dir={diffusion / 'bad'}")
    message = str(error.value)
    assert "shape mismatches: decoder.up.0.blocks.0.conv1.weight: (16, 48, 3, 3) in the source" in message
    assert "block_channels: [16, 32] in the source, [16, 48] here" in message and "Match the config" in message
    assert not (diffusion / "bad" / "checkpoints").exists(), "fails before training"
    other = Autoencoder.from_pretrained(diffusion / "base" / "pipeline" / "autoencoder")
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    other.save_pretrained(diffusion / "other_ae")
    with pytest.raises(CheckpointError, match="trained on the latents of .*another autoencoder; set autoencoder="):
        run("diffusion.train_latent", diffusion / "tiny.yaml", f"init_from={diffusion / 'base'}",
            f"autoencoder={diffusion / 'other_ae'}", f"run.out_dir={diffusion / 'bad3'}")
    with pytest.raises(CheckpointError, match="holds no 'unet' component"):
        run("diffusion.train_latent", diffusion / "tiny.yaml", f"init_from={diffusion / 'cache'}",
            f"run.out_dir={diffusion / 'bad2'}")


# ---------------------------------------------------------------------------- autoencoder, prior, classifier
def test_autoencoder_starts_from_a_trained_run(tmp_path):
    (tmp_path / "ae.yaml").write_text(yaml.safe_dump({**TINY_AUTOENCODER, "run": {**RUN, "batch_size": 4}}))
    run("autoencoder.train", tmp_path / "ae.yaml", "run.steps=2", f"run.out_dir={tmp_path / 'base'}")
    run("autoencoder.train", tmp_path / "ae.yaml", "run.steps=0", f"run.out_dir={tmp_path / 'next'}",
        f"init_from={tmp_path / 'base'}")
    assert_same(weights(tmp_path / "next" / "autoencoder"), weights(tmp_path / "base" / "autoencoder"))
    with pytest.raises(CheckpointError, match="z_channels: 16 in the source, 8 here"):
        run("autoencoder.train", tmp_path / "ae.yaml", "model.z_channels=8", f"run.out_dir={tmp_path / 'bad'}",
            f"init_from={tmp_path / 'base' / 'autoencoder'}")


def test_prior_starts_from_a_trained_pipeline(tmp_path):
    make_tiny_pipeline(tmp_path).autoencoder.save_pretrained(tmp_path / "stage1")
    config = tiny_prior_config(tmp_path / "stage1", tmp_path / "cache")
    config["run"] = {**RUN, "batch_size": 8}
    (tmp_path / "prior.yaml").write_text(yaml.safe_dump(config))
    run("prior.train", tmp_path / "prior.yaml", "run.steps=2", f"run.out_dir={tmp_path / 'base'}")
    run("prior.train", tmp_path / "prior.yaml", "run.steps=0", f"run.out_dir={tmp_path / 'next'}",
        f"init_from={tmp_path / 'base'}")
    assert_same(weights(tmp_path / "next" / "pipeline" / "prior"), weights(tmp_path / "base" / "pipeline" / "prior"))
    with pytest.raises(CheckpointError, match=r"width: 32 in the source, 48 here"):
        run("prior.train", tmp_path / "prior.yaml", "model.width=48", f"run.out_dir={tmp_path / 'bad'}",
            f"init_from={tmp_path / 'base' / 'pipeline'}")


def test_classifier_starts_from_a_trained_run(tmp_path):
    make_tiny_pipeline(tmp_path).save_pretrained(tmp_path / "diffusion" / "pipeline")
    config = {
        "diffusion": str(tmp_path / "diffusion"), "cache_dir": str(tmp_path / "cache"), "target": "colour",
        "model": {"block_channels": [16, 32], "layers_per_block": 1, "attention_levels": [False, False],
                  "mid_attention": False, "context_dim": 0},
        "data": {"name": "shapes", "resolution": 16, "size": 16}, "optim": {"lr": 1e-3, "warmup_steps": 2},
        "eval": {"items": 0}, "run": {**RUN, "batch_size": 4},
    }
    (tmp_path / "clf.yaml").write_text(yaml.safe_dump(config))
    run("diffusion.train_classifier", tmp_path / "clf.yaml", "run.steps=2", f"run.out_dir={tmp_path / 'base'}")
    run("diffusion.train_classifier", tmp_path / "clf.yaml", "run.steps=0", f"run.out_dir={tmp_path / 'next'}",
        f"init_from={tmp_path / 'base'}")
    assert_same(weights(tmp_path / "next" / "classifier"), weights(tmp_path / "base" / "classifier"))


def test_diffusers_unet_and_stable_diffusion_folders_are_imported(tmp_path):
    pytest.importorskip("diffusers")
    from common.init_from import read_source
    from diffusion import convert
    from diffusion.train_latent import UNET
    from tiny_sd import make_tiny_stable_diffusion

    folder = make_tiny_stable_diffusion(tmp_path / "sd")
    expected = convert.from_diffusers(folder / "unet").state_dict()
    for path in (folder, folder / "unet"):
        source, state, config = read_source(path, UNET)
        assert "imported" in source and config is not None
        assert_same(state, expected)
