"""LoRA adapters: a ``lora.rank`` run trains only the adapters on ``init_from``'s U-Net (or prior), resumes
exactly and saves the adapter alone in peft's key format; a pipeline loads it, scales it and unloads it
back to its exact images; an adapter that does not fit fails naming what is missing."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from common.config import ConfigError
from common.lora import ADAPTER_FILE, AdapterError, LoraConfig, add_adapters, save_adapter
from common.training import read_metrics
from diffusion import train_latent
from diffusion.unet import UNet
from pipelines import TextToImage, TokensToImage
from prior import train as prior_train
from tiny import build_pipelines, make_tiny_pipeline, tiny_prior_config, tiny_unet_config, train_in_process

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
RUN = {"batch_size": 4, "precision": "no", "log_every": 1, "sample_every": 100, "save_every": 2, "progress": False,
       "ema_decay": 0.5, "cpu_threads": 1}
CALL = dict(prompt=["a small red circle", "a large blue square"], num_inference_steps=3, seed=0, output_type="pt",
            progress=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny base pipeline (``base/pipeline``), a LoRA config over it, and a 4-step rank-2 run (``run``)."""
    root = tmp_path_factory.mktemp("lora")
    make_tiny_pipeline(root).save_pretrained(root / "base" / "pipeline")
    config = {
        "init_from": str(root / "base"), "autoencoder": str(root / "base" / "pipeline"),
        "cache_dir": str(root / "cache"), "lora": {"rank": 2, "alpha": 4.0},
        "model": {"block_channels": [16, 32], "attention_levels": [False, True], "layers_per_block": 1,
                  "head_dim": 8, "context_dim": 32},
        "diffusion": {"num_steps": 100}, "text": {"name_or_path": str(root / "text")},
        "optim": {"lr": 1e-2, "warmup_steps": 1}, "data": {"name": "shapes", "resolution": 16, "size": 16},
        "run": RUN, "sample": {"prompts": ["a small red circle"], "steps": 2},
    }
    (root / "lora.yaml").write_text(yaml.safe_dump(config))
    train(root, "run.steps=4", f"run.out_dir={root / 'run'}")
    return root


def train(root: Path, *overrides: str) -> None:
    train_in_process(train_latent.main, root / "lora.yaml", *overrides)


def unet_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "unet" / "model.safetensors"))


def test_only_the_adapters_train_and_the_base_stays_as_it_was(root):
    base, saved = unet_weights(root / "base" / "pipeline"), unet_weights(root / "run" / "pipeline")
    assert base.keys() == saved.keys() and all(torch.equal(base[k], saved[k]) for k in base), "pipeline/ is the base"
    adapter = load_file(str(root / "run" / "lora" / ADAPTER_FILE))
    assert adapter and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapter)
    assert "decoder.up.1.attns.0.blocks.0.attn2.to_k.lora_A.weight" in adapter  # peft's key format, no adapter name
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k), "lora_B starts at 0 and trained"
    full, small = (root / "base" / "pipeline" / "unet" / "model.safetensors"), root / "run" / "lora" / ADAPTER_FILE
    assert small.stat().st_size * 5 < full.stat().st_size
    config = yaml.safe_load((root / "run" / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4.0 and config["base_model_name_or_path"] == str(root / "base")
    assert sorted(config["target_modules"]) == ["to_k", "to_out", "to_q", "to_v"]


def test_lora_resume_is_exact(root):
    train(root, "run.steps=2", f"run.out_dir={root / 'split'}")
    train(root, "run.steps=4", f"run.out_dir={root / 'split'}")
    assert [m["loss"] for m in read_metrics(root / "run")] == [m["loss"] for m in read_metrics(root / "split")]
    full, split = (load_file(str(root / name / "lora" / ADAPTER_FILE)) for name in ("run", "split"))
    assert all(torch.equal(full[k], split[k]) for k in full)


def test_bad_lora_settings_fail_before_training(root):
    with pytest.raises(ConfigError, match="init_from is empty"):
        train(root, "init_from=", f"run.out_dir={root / 'bad'}")
    with pytest.raises(ConfigError, match=r"lora.targets=\['to_qq'\] does not fit UNet .*to_q"):
        train(root, "lora.targets=[to_qq]", f"run.out_dir={root / 'bad'}")
    with pytest.raises(ConfigError, match="not linear .*conv_in"):
        train(root, "lora.targets=[to_q, conv_in]", f"run.out_dir={root / 'bad'}")


def test_load_scale_and_unload_on_a_pipeline(root):
    pipe = TextToImage.from_pretrained(root / "base")
    before = pipe(**CALL).images
    weights = {k: v.clone() for k, v in pipe.model.unet.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own base: no warning about other base weights
        pipe.load_lora(root / "run")
    trained = pipe(**CALL).images
    assert (trained - before).abs().max() > 1e-4, "the adapter changes the images"
    pipe.load_lora(root / "run" / "lora" / ADAPTER_FILE, scale=0.0)
    assert torch.equal(pipe(**CALL).images, before), "scale 0 is the base exactly"
    pipe.load_lora(root / "run" / "lora", scale=3.0)
    assert (pipe(**CALL).images - before).abs().max() > (trained - before).abs().max(), "scale sets the strength"
    pipe.unload_lora()
    assert torch.equal(pipe(**CALL).images, before), "unloading restores the images bit for bit"
    after = pipe.model.unet.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)


def test_an_adapter_that_does_not_fit_names_the_modules(root, tmp_path):
    wider = add_adapters(UNet(dataclasses.replace(tiny_unet_config(), block_channels=(16, 48))), LoraConfig(rank=2))
    save_adapter(wider, tmp_path / "wide", LoraConfig(rank=2), "unet", "elsewhere")
    pipe = TextToImage.from_pretrained(root / "base")
    with pytest.raises(AdapterError, match=r"shape mismatches: .*attn1.to_k.lora_A.weight: \(2, 48\) in the adapter, "
                                           r"\(2, 32\) fits"):
        pipe.load_lora(tmp_path / "wide")
    dirs = build_pipelines(tmp_path / "pipes")
    from pipelines import ClassToImage

    with pytest.warns(UserWarning, match="trained on other base weights"):
        TextToImage.from_pretrained(dirs["text"]).load_lora(root / "run")  # same shapes, other weights
    with pytest.raises(AdapterError, match=r"target modules missing \(or not linear\): .*attn2.to_k"):
        ClassToImage.from_pretrained(dirs["class"]).load_lora(root / "run")
    with pytest.raises(AdapterError, match="neither a LoRA adapter file"):
        pipe.load_lora(tmp_path / "nothing")


def test_prior_lora_trains_and_loads_on_a_token_pipeline(root, tmp_path):
    base = build_pipelines(tmp_path / "pipes")["prior"]
    config = tiny_prior_config(base / "pipeline" / "autoencoder", tmp_path / "cache", condition="text")
    text = yaml.safe_load((base / "pipeline" / "pipeline.json").read_text())["text_encoder"]
    config.update(init_from=str(base), lora={"rank": 2}, text={"name_or_path": text["name_or_path"]},
                  run={**RUN, "batch_size": 8, "ema_decay": 0.9})
    config["model"].update(text_tokens=12, width=32, depth=2, heads=4)
    (tmp_path / "prior.yaml").write_text(yaml.safe_dump(config))
    train_in_process(prior_train.main, tmp_path / "prior.yaml", "run.steps=2", f"run.out_dir={tmp_path / 'run'}",
                     "optim.lr=0.05")
    adapter = load_file(str(tmp_path / "run" / "lora" / ADAPTER_FILE))
    assert "blocks.0.attn.to_q.lora_A.weight" in adapter
    pipe = TokensToImage.from_pretrained(base)
    call = dict(prompt=["a small red circle"], seed=0, output_type="latent", progress=False)
    before = pipe(**call).images
    pipe.load_lora(tmp_path / "run")
    assert pipe(**call).images.shape == before.shape  # the cached-key sampling path runs the adapted layers
    pipe.unload_lora()
    assert torch.equal(pipe(**call).images, before)


def test_generate_cli_samples_with_an_adapter(root, tmp_path):
    from pipelines import generate

    args = [str(root / "base"), "a small red circle", "-n", "2", "--seed", "0", "--steps", "3", "--no-progress",
            "--precision", "fp32"]
    plain = generate.main([*args, "-o", str(tmp_path / "plain.png")])
    adapted = generate.main([*args, "-o", str(tmp_path / "lora.png"), "--lora", str(root / "run")])
    zero = generate.main([*args, "-o", str(tmp_path / "zero.png"), "--lora", str(root / "run"), "--lora-scale", "0"])
    assert adapted["lora"] == str(root / "run") and zero["lora_scale"] == 0 and plain["lora"] is None
    assert plain["precision"] == "fp32"
    pixels = {name: torch.from_numpy(np.array(Image.open(tmp_path / f"{name}.png"))) for name in ("plain", "lora",
                                                                                                     "zero")}
    assert not torch.equal(pixels["plain"], pixels["lora"]) and torch.equal(pixels["plain"], pixels["zero"])
    with pytest.raises(SystemExit):
        generate.main([*args, "-o", str(tmp_path / "x.png"), "--lora-scale", "2"])


def test_runs_and_pipelines_without_adapters_never_import_peft():
    """peft (with transformers) takes seconds to import; only adapters need it (``common.lora`` imports it where
    one is added, saved or attached), so the training scripts and the pipelines load without it."""
    code = ("import sys, prior.train, diffusion.train_latent, pipelines.generate\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'peft'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
