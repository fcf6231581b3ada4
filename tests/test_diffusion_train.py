"""The latent diffusion training entry point end to end, condition dropout, and the evaluation CLI.

The runs call the entry points' ``main`` in this process; the (slow) two-process test launches
``diffusion/train_latent.py`` through ``accelerate launch`` as a user would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from common.config import ConfigError
from common.data import DataConfig
from common.data.shapes import NUM_LABELS, ShapeSpec
from common.training import read_metrics
from diffusion import evaluate_shapes, train_latent
from diffusion.latent_diffusion import LatentDiffusion, drop_condition
from diffusion.train_latent import class_names_for, unet_config_for
from diffusion.unet import UNetConfig
from tiny import make_tiny_autoencoder, make_tiny_text_encoder, train_in_process

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny config (autoencoder, text encoder and cache in a temporary directory) and a 6-step run of it."""
    root = tmp_path_factory.mktemp("train")
    config = {
        "autoencoder": str(make_tiny_autoencoder(root / "ae")),
        "cache_dir": str(root / "cache"),
        "model": {"block_channels": [16, 32], "attention_levels": [False, True], "layers_per_block": 1,
                  "head_dim": 8, "context_dim": 32},
        "diffusion": {"num_steps": 100, "cond_drop_prob": 0.25},
        "text": {"name_or_path": str(make_tiny_text_encoder(root / "text"))},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "data": {"name": "shapes", "resolution": 16, "size": 32},
        "run": {"batch_size": 4, "precision": "no", "log_every": 1, "sample_every": 4, "save_every": 3,
                "progress": False, "ema_decay": 0.9, "cpu_threads": 1},
        "sample": {"prompts": ["a small red circle at the top left", "a large blue square in the center"],
                   "steps": 3},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    train(root, f"run.out_dir={root / 'full'}", "run.steps=6")
    return root


def train(root: Path, *overrides: str) -> None:
    train_in_process(train_latent.main, root / "tiny.yaml", *overrides)


def test_resume_reproduces_the_uninterrupted_run(setup, capsys):
    train(setup, f"run.out_dir={setup / 'split'}", "run.steps=3")
    train(setup, f"run.out_dir={setup / 'split'}", "run.steps=6")
    assert "resumed from" in capsys.readouterr().out
    full = {m["step"]: m["loss"] for m in read_metrics(setup / "full")}
    split = {m["step"]: m["loss"] for m in read_metrics(setup / "split")}
    assert set(full) == set(range(1, 7))
    for step in (4, 5, 6):
        assert split[step] == full[step], f"step {step}: {split[step]} != {full[step]}"
    unet_full = LatentDiffusion.from_pretrained(setup / "full" / "pipeline").unet.state_dict()
    unet_split = LatentDiffusion.from_pretrained(setup / "split" / "pipeline").unet.state_dict()
    assert all(torch.equal(unet_full[k], unet_split[k]) for k in unet_full), "EMA weights differ after resume"


def test_caption_templates_train_and_resume_exactly(setup):
    """A run with caption templates draws one phrasing per item and step from the checkpointed RNG: a resumed run
    trains exactly like an uninterrupted one (its cache, with the phrasings, lives apart)."""
    templated = ('caption_templates=["a {}", "{} please"]', f"cache_dir={setup / 'cache_templates'}")
    train(setup, f"run.out_dir={setup / 'templates_full'}", "run.steps=4", *templated)
    train(setup, f"run.out_dir={setup / 'templates_split'}", "run.steps=2", *templated)
    train(setup, f"run.out_dir={setup / 'templates_split'}", "run.steps=4", *templated)
    full = {m["step"]: m["loss"] for m in read_metrics(setup / "templates_full")}
    split = {m["step"]: m["loss"] for m in read_metrics(setup / "templates_split")}
    assert full[3] == split[3] and full[4] == split[4]
    plain = {m["step"]: m["loss"] for m in read_metrics(setup / "full")}
    assert full[2] != plain[2], "the phrasings change what the U-Net is conditioned on"
    saved = yaml.safe_load((setup / "templates_full" / "config.yaml").read_text())
    assert saved["caption_templates"] == ["a {}", "{} please"]


def test_timestep_bias_changes_the_training_draw_and_is_saved(setup):
    """``diffusion.timestep_bias`` reaches the loss (same seed, other timesteps, other losses) and the pipeline."""
    train(setup, f"run.out_dir={setup / 'biased'}", "run.steps=2", "diffusion.timestep_bias=2")
    biased = {m["step"]: m["loss"] for m in read_metrics(setup / "biased")}
    plain = {m["step"]: m["loss"] for m in read_metrics(setup / "full")}
    assert biased[1] != plain[1]
    assert LatentDiffusion.from_pretrained(setup / "biased" / "pipeline").config.timestep_bias == 2.0
    assert LatentDiffusion.from_pretrained(setup / "full" / "pipeline").config.timestep_bias == 1.0


def test_run_directory_is_complete_and_the_cache_is_shared(setup):
    run_dir = setup / "full"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["in_channels"] == saved["model"]["out_channels"] == 4  # from the autoencoder
    pipe = LatentDiffusion.from_pretrained(run_dir / "pipeline")
    assert pipe.config.cond_drop_prob == 0.25 and pipe.latent_scale > 0
    assert (run_dir / "samples" / "step_00000004.png").is_file() and (run_dir / "samples" / "final.png").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    assert len(list((setup / "cache").iterdir())) == 1  # every run of this config encoded nothing anew


def test_evaluate_shapes_cli_prints_json(setup, capsys):
    evaluate_shapes.main([str(setup / "full"), "--steps", "2", "--prompts", "3", "--samples", "2", "--sweep", "0,2",
                          "--sampler", "ddim", "--device", "cpu"])
    results = json.loads(capsys.readouterr().out)
    assert [r["guidance"] for r in results] == [0.0, 2.0]
    for entry in results:
        assert {"accuracy", "diversity", "colour", "shape", "position", "steps", "sampler", "seed"} <= set(entry)
        assert 0 <= entry["accuracy"] <= 1 and entry["steps"] == 2 and entry["sampler"] == "ddim"
    evaluate_shapes.main([str(setup / "full" / "pipeline"), "--steps", "2", "--prompts", "2", "--samples", "1",
                          "--device", "cpu"])
    single = json.loads(capsys.readouterr().out)
    assert single["guidance"] == 4.0 and single["prompts"] == 2


@pytest.mark.slow
def test_two_process_ddp_trains_from_one_cache(setup, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29518", "diffusion/train_latent.py", str(setup / "tiny.yaml"), f"run.out_dir={tmp_path / 'ddp'}",
               "run.steps=4", f"cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "ddp")] == [1, 2, 3, 4]
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the main process encoded, the other one read it
    LatentDiffusion.from_pretrained(tmp_path / "ddp" / "pipeline")


def test_condition_dropout_fraction():
    ids = torch.arange(1, 200_001)
    dropped = drop_condition(ids, 0.1, null_id=0, generator=torch.Generator().manual_seed(0))
    fraction = float((dropped == 0).float().mean())
    assert abs(fraction - 0.1) < 0.003
    assert torch.equal(dropped[dropped != 0], ids[dropped != 0])  # the rest is untouched
    assert torch.equal(drop_condition(ids, 0.0, 0), ids)


def test_unet_channels_come_from_the_autoencoder_and_context_is_checked():
    derived = unet_config_for(UNetConfig(), code_dim=8, text_width=384)
    assert (derived.in_channels, derived.out_channels) == (8, 8)
    with pytest.raises(ConfigError, match="contradicts the autoencoder's code_dim=8"):
        unet_config_for(UNetConfig(in_channels=3), code_dim=8, text_width=384)
    with pytest.raises(ConfigError, match="model.context_dim=384 must equal the text encoder's width 32"):
        unet_config_for(UNetConfig(context_dim=384), code_dim=8, text_width=32)


def test_class_conditional_run_saves_the_label_names(setup):
    train(setup, f"run.out_dir={setup / 'classes'}", "run.steps=1", f"model.num_classes={NUM_LABELS}")
    pipe = LatentDiffusion.from_pretrained(setup / "classes" / "pipeline")
    assert pipe.unet.config.num_classes == NUM_LABELS
    assert pipe.class_names == tuple(ShapeSpec.from_label(label).caption for label in range(NUM_LABELS))
    assert pipe.class_names[0] == "a small red circle at the top left"


def test_class_names_come_from_the_data(tmp_path):
    shapes = DataConfig(name="shapes")
    assert class_names_for(UNetConfig(), shapes) is None  # no class conditioning
    assert len(class_names_for(UNetConfig(num_classes=NUM_LABELS), shapes)) == NUM_LABELS
    with pytest.raises(ConfigError, match=f"model.num_classes=5, but the shapes data has {NUM_LABELS} labels; "
                                          f"set model.num_classes={NUM_LABELS}"):
        class_names_for(UNetConfig(num_classes=5), shapes)
    for name in ("dogs/a.png", "red_cats/b.png", "red_cats/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    assert class_names_for(UNetConfig(num_classes=2), DataConfig(name="folder", path=str(tmp_path))) == [
        "dogs", "red_cats"]  # the folder names, in label order
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")  # an image at the root: no classes, no names
    assert class_names_for(UNetConfig(num_classes=2), DataConfig(name="folder", path=str(tmp_path))) is None
    assert class_names_for(UNetConfig(num_classes=9), DataConfig(name="emoji")) is None
