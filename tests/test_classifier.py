"""The noisy-latent classifier, its training script end to end, and classifier guidance in LatentDiffusion."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from common.checkpoint import CheckpointError, save_component
from common.config import from_dict
from common.data.shapes import COLOURS, SHAPES, ShapeSpec
from diffusion import evaluate_shapes, train_classifier
from diffusion.classifier import (
    ClassifierConfig,
    NoisyLatentClassifier,
    attribute_classes,
    attribute_targets,
    caption_targets,
    classifier_loss,
    noisy_accuracy,
)
from diffusion.latent_diffusion import LatentDiffusion
from diffusion.objectives import DiffusionConfig
from diffusion.schedules import ScheduleConfig
from diffusion.unet import UNet
from pipelines import TextToImage
from tiny import CLASSIFIER_BACKBONE as BACKBONE
from tiny import make_tiny_pipeline, tiny_classifier, tiny_unet_config, train_in_process

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a small red circle at the top left", "a large blue square in the center",
           "a small green triangle at the bottom"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> LatentDiffusion:
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipe"))


def test_logits_log_prob_and_gradients_flow():
    model = tiny_classifier().train()
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    t = torch.tensor([0, 50, 99])
    logits = model(x, t)
    assert logits.shape == (3, 6) and torch.isfinite(logits).all()
    assert model(x, t.float() + 0.5).shape == (3, 6) and model(x, 10).shape == (3, 6)  # fractional, scalar t
    labels = torch.tensor([0, 3, 5])
    log_prob = model.log_prob(x, t, labels)
    torch.testing.assert_close(log_prob, torch.log_softmax(logits, -1)[torch.arange(3), labels])
    loss, accuracy = classifier_loss(model, DiffusionConfig(num_steps=100).make_schedule(), x.detach(), labels)
    (log_prob.sum() + loss).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert 0.0 <= float(accuracy) <= 1.0


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = tiny_classifier(seed=3)
    model.save_pretrained(tmp_path / "classifier")
    meta = json.loads((tmp_path / "classifier" / "config.json").read_text())
    assert meta["kind"] == "noisy_latent_classifier" and meta["config"]["attribute"] == "colour"
    assert meta["config"]["class_names"] == list(COLOURS)
    loaded = NoisyLatentClassifier.from_pretrained(tmp_path / "classifier")
    assert loaded.config == model.config and not loaded.training
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 70.5])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))
    save_component(tmp_path / "unet", "unet", BACKBONE, UNet(BACKBONE))
    with pytest.raises(CheckpointError, match="'unet' component"):
        NoisyLatentClassifier.from_pretrained(tmp_path / "unet")


def test_attributes_follow_shape_spec_and_bad_names_list_the_valid_ones():
    labels = torch.arange(324)
    for attribute in ("colour", "shape", "size", "position"):
        names = attribute_classes(attribute)
        targets = attribute_targets(attribute, labels)
        assert all(names[int(targets[i])] == getattr(ShapeSpec.from_label(i), attribute) for i in range(324))
    assert attribute_classes("shape") == SHAPES and torch.equal(attribute_targets("label", labels), labels)
    assert caption_targets("colour", PROMPTS).tolist() == [0, 2, 1]  # red, blue, green in COLOURS order
    assert attribute_classes("label", "emoji", torch.tensor([0, 4, 2])) == ("0", "1", "2", "3", "4")
    with pytest.raises(ValueError, match="'hue'.*valid attributes: colour, shape, size, position, label"):
        attribute_classes("hue")
    with pytest.raises(ValueError, match="for dataset 'emoji'.*valid attributes: label"):
        attribute_classes("colour", "emoji")
    with pytest.raises(ValueError, match="valid attributes: colour"):
        ClassifierConfig(attribute="color")
    with pytest.raises(ValueError, match="neither text nor classes"):
        ClassifierConfig(backbone=dataclasses.replace(BACKBONE, context_dim=32, attention_levels=(False, False)))


def test_noisy_accuracy_is_reproducible_and_clean_is_first():
    model, schedule = tiny_classifier(), DiffusionConfig(num_steps=100).make_schedule()
    latents, targets = torch.randn(10, 4, 8, 8), torch.randint(0, 6, (10,))
    first = noisy_accuracy(model, schedule, latents, targets, (0, 99), batch_size=4)
    assert list(first) == ["t=0", "t=99", "uniform"] and all(0 <= v <= 1 for v in first.values())
    assert noisy_accuracy(model, schedule, latents, targets, (0, 99), batch_size=3) == first


# ------------------------------------------------------------------------------- guidance in sampling
def sample(pipe: LatentDiffusion, cond_kind: str, seed: int = 0, **kwargs) -> torch.Tensor:
    """Latents of 3 samples: "text" (guidance 0 = unconditional), "none" (no context) or "class" (CFG 2)."""
    shape = pipe.latent_shape(3)
    generator = torch.Generator().manual_seed(seed)
    options = dict(steps=6, sampler="ddim", generator=generator, **kwargs)
    if cond_kind == "text":
        cond, uncond = pipe.encode_prompts(PROMPTS), pipe.encode_prompts([""])
        return pipe.sample_latents(cond, uncond, shape, guidance=0.0, **options)
    if cond_kind == "class":
        return pipe.sample_latents(None, None, shape, guidance=2.0, class_labels=torch.tensor([0, 1, 2]), **options)
    return pipe.sample_latents(None, None, shape, **options)


def variant(pipe: LatentDiffusion, cond_kind: str) -> LatentDiffusion:
    """The tiny pipeline with a text U-Net, a U-Net without context, or a class-conditional one."""
    if cond_kind == "text":
        return pipe
    config = dataclasses.replace(tiny_unet_config(context_dim=0), num_classes=3 if cond_kind == "class" else 0)
    torch.manual_seed(1)
    unet = UNet(config).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return LatentDiffusion(pipe.autoencoder, unet, None, pipe.config, pipe.latent_scale)


@pytest.mark.parametrize("cond_kind", ["text", "none", "class"])
def test_scale_zero_is_unguided_and_guidance_raises_log_prob(pipe, cond_kind):
    model = variant(pipe, cond_kind)
    classifier, labels = tiny_classifier(), torch.tensor([0, 2, 5])
    plain = sample(model, cond_kind)
    assert torch.equal(sample(model, cond_kind, classifier=classifier, classifier_labels=labels, classifier_scale=0.0),
                       plain)
    guided = sample(model, cond_kind, classifier=classifier, classifier_labels=labels, classifier_scale=3.0)
    assert (guided - plain).abs().max() > 1e-3
    with torch.no_grad():  # judged by the classifier itself on the clean result
        before, after = classifier.log_prob(plain, 0, labels), classifier.log_prob(guided, 0, labels)
    assert after.mean() > before.mean() + 0.05, (before, after)


def test_generate_with_classifier_and_checks(pipe):
    classifier = tiny_classifier()
    options = dict(num_inference_steps=3, guidance_scale=1.0, seed=0, progress=False, output_type="pt")
    images = TextToImage(pipe)(PROMPTS[:2], classifier=classifier, classifier_labels=classifier.targets_of(PROMPTS[:2]),
                               **options).images
    assert images.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="classifier_labels of shape"):
        sample(pipe, "none", classifier=classifier)
    with pytest.raises(ValueError, match=r"classifier_labels must be in \[0, 6\), got 6"):
        TextToImage(pipe)(PROMPTS[:2], classifier=classifier, classifier_labels=[0, 6], **options)
    with pytest.raises(ValueError, match="different noise schedule"):
        sample(pipe, "none", classifier=tiny_classifier(schedule=ScheduleConfig(num_steps=1000)),
               classifier_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="scaled by 3"):
        sample(pipe, "none", classifier=tiny_classifier(latent_scale=3.0), classifier_labels=torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------ the script
@pytest.fixture(scope="module")
def trained(tmp_path_factory, pipe) -> Path:
    """A tiny classifier run (6 steps) on the tiny pipeline's latents."""
    root = tmp_path_factory.mktemp("classifier")
    pipe.save_pretrained(root / "diffusion" / "pipeline")
    config = {
        "diffusion": str(root / "diffusion"),
        "cache_dir": str(root / "cache"),
        "target": "colour",
        "model": {"block_channels": [16, 32], "layers_per_block": 1, "attention_levels": [False, False],
                  "mid_attention": False, "context_dim": 0},
        "data": {"name": "shapes", "resolution": 16, "size": 32},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "eval": {"items": 8, "timesteps": [0, 99]},
        "run": {"out_dir": str(root / "run"), "steps": 6, "batch_size": 4, "precision": "no", "log_every": 1,
                "save_every": 3, "progress": False, "ema_decay": 0.9, "cpu_threads": 1},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    train(root)
    return root


def train(root: Path, *overrides: str) -> None:
    train_in_process(train_classifier.main, root / "tiny.yaml", *overrides)


def test_the_config_keeps_only_the_schedule_and_reads_old_diffusion_sections():
    narrowed = ClassifierConfig(schedule=DiffusionConfig(num_steps=100, prediction="v", zero_terminal_snr=True))
    assert type(narrowed.schedule) is ScheduleConfig
    assert narrowed.schedule == ScheduleConfig(num_steps=100, zero_terminal_snr=True)
    old = from_dict(ClassifierConfig, {"diffusion": {"num_steps": 100, "prediction": "v", "spacing": "leading"}})
    assert old.schedule == ScheduleConfig(num_steps=100)


def test_train_classifier_writes_a_loadable_component(trained):
    run = trained / "run"
    classifier = NoisyLatentClassifier.from_pretrained(run / "classifier")
    assert classifier.config.attribute == "colour" and classifier.config.class_names == tuple(COLOURS)
    assert classifier.config.backbone.in_channels == 4 and classifier.config.latent_scale == 2.5
    assert classifier.config.schedule.num_steps == 100  # the diffusion run's schedule
    scores = json.loads((run / "eval.json").read_text())
    assert scores["step"] == 6 and {"t=0", "t=99", "uniform"} <= set(scores)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["in_channels"] == 4


def test_train_classifier_rejects_bad_settings(trained):
    with pytest.raises(ValueError, match="valid attributes: colour, shape, size, position, label"):
        train(trained, "target=hue")
    with pytest.raises(ValueError, match="set diffusion="):
        train(trained, "diffusion=")


def test_train_classifier_counts_non_finite_losses_in_a_row(trained, monkeypatch, capsys):
    """Two bad losses, a good one, two bad ones: never more than 2 in a row, so max_skipped_steps=2 does not stop it."""
    real, calls = train_classifier.classifier_loss, iter(range(1, 100))

    def poisoned(*args, **kwargs):
        loss, accuracy = real(*args, **kwargs)
        return (loss * float("nan"), accuracy) if next(calls) in (2, 3, 5, 6) else (loss, accuracy)

    monkeypatch.setattr(train_classifier, "classifier_loss", poisoned)
    train(trained, f"run.out_dir={trained / 'spiky'}", "run.steps=3", "run.max_skipped_steps=2")
    out = capsys.readouterr().out
    assert out.count("update skipped") == 4 and "(2 in a row, 4 in this run" in out
    assert (trained / "spiky" / "checkpoints" / "latest").read_text() == "step_00000003"


def test_evaluate_shapes_with_a_classifier(trained, capsys):
    evaluate_shapes.main([str(trained / "diffusion"), "--steps", "2", "--prompts", "2", "--samples", "1",
                          "--guidance", "0", "--classifier", str(trained / "run"), "--classifier-sweep", "0,2",
                          "--attribute", "colour", "--sampler", "ddim", "--device", "cpu"])
    results = json.loads(capsys.readouterr().out)
    assert [r["classifier_scale"] for r in results] == [0.0, 2.0]
    assert all(r["attribute"] == "colour" and r["guided_accuracy"] == r["colour"] for r in results)
    with pytest.raises(SystemExit, match="predicts 'colour', not 'shape'"):
        evaluate_shapes.main([str(trained / "diffusion"), "--classifier", str(trained / "run"), "--attribute", "shape"])
    with pytest.raises(SystemExit, match=r"error: .*diffusion is neither a classifier directory nor a run directory "
                                         r"with classifier/config.json; train one with `accelerate launch "
                                         r"diffusion/train_classifier.py"):
        evaluate_shapes.main([str(trained / "diffusion"), "--classifier", str(trained / "diffusion")])
    with pytest.raises(SystemExit, match=r"error: .*run is neither a pipeline directory nor a run directory with "
                                         r"pipeline/pipeline.json; train one with"):
        evaluate_shapes.main([str(trained / "run")])
