"""Class-conditional latent diffusion: class-only training that never loads a text encoder, its
pipelines and evaluation, and condition dropout that drops the caption and the class independently.

The runs call ``diffusion/train_latent.py``'s ``main`` in this process on tiny random models.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from common.config import ConfigError
from common.data.shapes import NUM_LABELS, ShapeSpec
from common.text_encoder import TextEncoder
from diffusion import evaluate_shapes, train_latent
from diffusion.latent_cache import NULL_ID, load_cache
from diffusion.train_latent import drop_conditions
from diffusion.unet import NULL_CLASS
from pipelines import ClassToImage, PipelineKindError, TextToImage
from tiny import make_tiny_autoencoder, make_tiny_text_encoder, train_in_process

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = [ShapeSpec.from_label(label).caption for label in range(NUM_LABELS)]
FAST = {"num_inference_steps": 2, "progress": False}


def tiny_config(root: Path, **model) -> Path:
    """A tiny shapes config (16 px, 32 items, a 16/32-wide U-Net) written to ``root/<name>.yaml``."""
    config = {
        "autoencoder": str(make_tiny_autoencoder(root / "ae")),
        "cache_dir": str(root / "cache"),
        "model": {"block_channels": [16, 32], "attention_levels": [False, True], "layers_per_block": 1,
                  "head_dim": 8, "num_classes": NUM_LABELS, **model},
        "diffusion": {"num_steps": 100, "cond_drop_prob": 0.5},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "data": {"name": "shapes", "resolution": 16, "size": 32},
        "run": {"batch_size": 4, "precision": "no", "log_every": 1, "sample_every": 100, "save_every": 100,
                "progress": False, "ema_decay": 0.9, "cpu_threads": 1, "steps": 3, "out_dir": str(root / "run")},
        "sample": {"prompts": NAMES[:2], "per_prompt": 1, "steps": 2},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, *overrides: str) -> None:
    train_in_process(train_latent.main, config, *overrides)


@pytest.fixture
def no_text_encoder(monkeypatch) -> list:
    """Make constructing any TextEncoder fail (and record the attempt, should something swallow the error)."""
    attempts = []

    def refuse(self, *args, **kwargs):
        attempts.append(args)
        raise AssertionError("a text encoder was constructed for a model without text")

    monkeypatch.setattr(TextEncoder, "__init__", refuse)
    return attempts


@pytest.fixture(scope="module")
def class_run(tmp_path_factory) -> Path:
    """A 3-step class-only run (``model.context_dim: 0``) trained with text encoders made impossible."""
    root = tmp_path_factory.mktemp("class_only")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TextEncoder, "__init__", lambda *a, **k: pytest.fail("a text encoder was constructed"))
        train(tiny_config(root, context_dim=0))
    return root / "run"


def test_class_only_training_loads_no_text_encoder_and_saves_none(class_run):
    meta = json.loads((class_run / "pipeline" / "pipeline.json").read_text())
    assert meta["text_encoder"] is None and meta["class_names"] == NAMES
    saved = yaml.safe_load((class_run / "config.yaml").read_text())
    assert saved["model"]["context_dim"] == 0 and saved["model"]["num_classes"] == NUM_LABELS
    [cache_dir] = (class_run.parent / "cache").iterdir()
    cache = load_cache(cache_dir)
    assert cache.text_states is None and cache.text_mask is None and len(cache) == 32
    assert json.loads((cache_dir / "meta.json").read_text())["inputs"]["text"] is None
    with pytest.raises(ValueError, match="holds no text embeddings.*model.context_dim: 0"):
        cache.text(torch.tensor([NULL_ID]))


def test_class_to_image_runs_the_class_only_model(class_run, no_text_encoder):
    pipe = ClassToImage.from_pretrained(class_run)
    by_name = pipe([NAMES[0], NAMES[5]], seed=0, output_type="pt", **FAST).images
    assert by_name.shape == (2, 3, 16, 16)
    assert torch.equal(pipe([0, 5], seed=0, output_type="pt", **FAST).images, by_name)
    with pytest.raises(PipelineKindError, match="TextToImage needs a text-conditioned U-Net.*load it with "
                                                 "ClassToImage"):
        TextToImage.from_pretrained(class_run)
    # names and ids give the same images; other names and negative prompts are refused, naming the argument
    by_label = pipe(torch.tensor([0, 1]), num_inference_steps=2, seed=1, progress=False, output_type="pt").images
    assert torch.equal(pipe(NAMES[:2], num_inference_steps=2, seed=1, progress=False, output_type="pt").images,
                       by_label)
    with pytest.raises(ValueError, match="class_labels: 'a dog' is not a class of this pipeline; valid names: "):
        pipe(["a dog"], **FAST)
    with pytest.raises(ValueError, match="negative_prompt: ClassToImage has no text condition"):
        pipe(NAMES[:1], negative_prompt="a red square", **FAST)
    assert no_text_encoder == []


def test_evaluate_shapes_scores_a_class_only_run_by_class(class_run, capsys, no_text_encoder):
    evaluate_shapes.main([str(class_run), "--steps", "2", "--prompts", "2", "--samples", "2", "--sweep", "0,2",
                          "--device", "cpu"])
    results = json.loads(capsys.readouterr().out)
    assert [(r["guidance"], r["condition"]) for r in results] == [(0.0, "class"), (2.0, "class")]
    assert all(0 <= r["accuracy"] <= 1 and r["diversity"] > 0 for r in results)
    with pytest.raises(SystemExit, match="--negative needs a text-conditioned model"):
        evaluate_shapes.main([str(class_run), "--negative", "a red circle", "--device", "cpu"])


def test_a_unet_without_any_condition_is_refused(tmp_path, no_text_encoder):
    config = tiny_config(tmp_path, context_dim=0, num_classes=0)
    with pytest.raises(ConfigError, match="model.context_dim=0 and model.num_classes=0 leave the U-Net without a "
                                          "condition"):
        train(config)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_caption_and_class_are_dropped_independently():
    count, prob = 200_000, 0.2
    ids, labels = torch.arange(1, count + 1), torch.arange(count) % NUM_LABELS
    dropped_ids, classes = drop_conditions(ids, labels, prob, torch.Generator().manual_seed(0))
    no_caption, no_class = dropped_ids == NULL_ID, classes == NULL_CLASS
    expected = {(False, False): (1 - prob) ** 2, (True, False): prob * (1 - prob),
                (False, True): prob * (1 - prob), (True, True): prob ** 2}
    for (caption_dropped, class_dropped), fraction in expected.items():
        seen = float(((no_caption == caption_dropped) & (no_class == class_dropped)).float().mean())
        assert abs(seen - fraction) < 0.004, (caption_dropped, class_dropped, seen, fraction)
    assert torch.equal(dropped_ids[~no_caption], ids[~no_caption])  # the kept ones are untouched
    assert torch.equal(classes[~no_class], labels[~no_class] + 1)  # and fed as label + 1
    text_only, class_only = drop_conditions(ids, None, prob), drop_conditions(None, labels, prob)
    assert text_only[1] is None and class_only[0] is None
    assert abs(float((class_only[1] == NULL_CLASS).float().mean()) - prob) < 0.004


def test_class_and_text_training_shows_each_condition_without_the_other(tmp_path, monkeypatch):
    seen = []  # (caption dropped, class dropped) of every trained item

    def spy(unet, schedule, config, latents, text=None, class_labels=None):
        null_caption = text.mask.sum(1) == 2  # "" is [CLS] [SEP]; every shapes caption has more tokens
        seen.extend(zip(null_caption.tolist(), (class_labels == NULL_CLASS).tolist()))
        return original(unet, schedule, config, latents, text, class_labels)

    original = train_latent.training_loss
    monkeypatch.setattr(train_latent, "training_loss", spy)
    config = tiny_config(tmp_path, context_dim=32)
    train(config, f"text.name_or_path={make_tiny_text_encoder(tmp_path / 'text')}", "run.steps=6")
    assert len(seen) == 24
    assert (True, False) in seen and (False, True) in seen, seen  # ClassToImage's (class, "") is trained
    pipe = ClassToImage.from_pretrained(tmp_path / "run")
    assert pipe.model.text_encoder is not None
    assert pipe([0, 1], seed=0, output_type="pt", **FAST).images.shape == (2, 3, 16, 16)
