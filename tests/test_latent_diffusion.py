"""LatentDiffusion: pipeline directory round trip, seeding, guidance, img2img and inpainting, sizes, class names."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from common.checkpoint import CheckpointError, find_pipeline_dir
from diffusion.latent_diffusion import (
    TRAIN_DIFFUSION,
    DiffusionConfig,
    LatentDiffusion,
    find_classifier_dir,
    training_loss,
)
from diffusion.objectives import Denoiser
from diffusion.samplers import sample_dpmpp_2m
from diffusion.unet import UNet
from pipelines import TextToImage
from tiny import make_tiny_pipeline, tiny_unet_config

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a small red circle at the top left", "a large blue square in the center"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> LatentDiffusion:
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipe"))


def generate(pipe: LatentDiffusion, seed: int, **kwargs) -> torch.Tensor:
    """Images in [-1, 1] of the bundle through its pipeline (the latents, decoded by the bundle)."""
    options = {"num_inference_steps": 4, "guidance_scale": 3.0, "progress": False, **kwargs}
    return pipe.decode(TextToImage(pipe)(PROMPTS, seed=seed, output_type="latent", **options).images)


def test_pipeline_directory_round_trip_gives_identical_samples(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipeline")
    meta = json.loads((tmp_path / "pipeline" / "pipeline.json").read_text())
    assert meta["kind"] == "text_to_image" and meta["format_version"] == 1 and meta["latent_scale"] == 2.5
    assert meta["diffusion"]["num_steps"] == 100 and meta["text_encoder"]["name_or_path"]
    assert {p.name for p in (tmp_path / "pipeline").iterdir()} == {"pipeline.json", "autoencoder", "unet"}
    loaded = LatentDiffusion.from_pretrained(tmp_path / "pipeline")
    assert loaded.config == pipe.config
    images = generate(pipe, 0)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(generate(loaded, 0), images)


def test_same_seed_same_images_different_seed_different_images(pipe):
    for sampler in ("dpmpp_2m", "ddpm"):
        first = generate(pipe, 1, sampler=sampler)
        assert torch.equal(generate(pipe, 1, sampler=sampler), first)
        assert not torch.equal(generate(pipe, 2, sampler=sampler), first)


def test_guidance_one_is_the_conditional_model_and_guidance_matters(pipe):
    cond, uncond = pipe.encode_prompts(PROMPTS), pipe.encode_prompts([""])
    shape = pipe.latent_shape(2)
    guided = pipe.sample_latents(cond, uncond, shape, steps=5, guidance=1.0, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    denoiser = Denoiser(pipe.unet, pipe.schedule, pipe.config.prediction)
    manual = sample_dpmpp_2m(denoiser, noise, pipe.schedule, pipe.timesteps(5, "dpmpp_2m"),
                             cond={"context": cond.states, "context_mask": cond.mask})
    torch.testing.assert_close(guided, manual, atol=1e-5, rtol=0)
    stronger = pipe.sample_latents(cond, uncond, shape, steps=5, guidance=4.0,
                                   generator=torch.Generator().manual_seed(3))
    assert (stronger - guided).abs().max() > 1e-3
    negative = generate(pipe, 0, negative_prompt=["a large green triangle at the bottom"])
    assert (negative - generate(pipe, 0)).abs().max() > 1e-4


def test_img2img_strength_zero_returns_the_reconstruction_and_one_does_not(pipe):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = pipe.encode_images(images)
    kept = pipe.sample_latents(None, None, latents.shape, steps=10, init_latents=latents, strength=0.0)
    torch.testing.assert_close(pipe.decode(kept), pipe.decode(latents))
    cond = pipe.encode_prompts(PROMPTS)
    redone = pipe.sample_latents(cond, pipe.encode_prompts([""]), latents.shape, steps=10, guidance=2.0,
                                 init_latents=latents, strength=1.0, generator=torch.Generator().manual_seed(0))
    assert (redone - latents).abs().mean() > 0.1
    light = pipe.sample_latents(cond, None, latents.shape, steps=10, init_latents=latents, strength=0.3,
                                generator=torch.Generator().manual_seed(0))
    assert light.shape == latents.shape and torch.isfinite(light).all()


def test_inpainting_keeps_the_known_region(pipe):
    known = pipe.encode_images(torch.rand(2, 3, 16, 16) * 2 - 1)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0  # keep the left half
    out = pipe.sample_latents(pipe.encode_prompts(PROMPTS), pipe.encode_prompts([""]), known.shape, steps=6,
                              guidance=2.0, mask=mask, known_latents=known, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., :4], known[..., :4])
    assert (out[..., 4:] - known[..., 4:]).abs().mean() > 0.05


def test_latent_shape_takes_height_and_width_and_the_pipeline_checks_them(pipe):
    assert pipe.size_multiple == 4  # f=2 autoencoder, one U-Net downsampling
    assert pipe.latent_shape(2) == (2, 4, 8, 8)
    assert pipe.latent_shape(3, 16, 32) == (3, 4, 8, 16) and pipe.latent_shape(1, width=8) == (1, 4, 8, 4)
    assert generate(pipe, 0, num_inference_steps=2, height=16, width=24).shape == (2, 3, 16, 24)
    assert generate(pipe, 0, num_inference_steps=2, height=8, width=8).shape == (2, 3, 8, 8)
    check = TextToImage(pipe).check_size
    with pytest.raises(ValueError, match=r"height=13 is not a multiple of 4 \(the autoencoder downsamples by 2 and the "
                                         r"U-Net by 2 more\); image sizes must be multiples of 4, e.g. 12 or 16"):
        check(13, None)
    with pytest.raises(ValueError, match="width=2 is not a multiple of 4 .*, e.g. 4$"):
        check(16, 2)
    for bad in (0, -16):
        with pytest.raises(ValueError, match=f"height={bad}: image sizes must be positive multiples of 4 .*; leave "
                                             f"height out for the training resolution 16"):
            check(bad, None)
    with pytest.raises(TypeError, match="width must be an integer number of pixels, got 16.0"):
        check(16, 16.0)
    with pytest.raises(ValueError, match="height=10 is not a multiple of 4"):
        generate(pipe, 0, height=10)


def test_class_names_are_saved_loaded_and_checked(pipe, tmp_path):
    unet = UNet(dataclasses.replace(tiny_unet_config(context_dim=0), num_classes=2)).eval()
    parts = (pipe.autoencoder, unet, None, pipe.config, 2.5)
    LatentDiffusion(*parts, class_names=["cat", "dog"]).save_pretrained(tmp_path / "named")
    assert json.loads((tmp_path / "named" / "pipeline.json").read_text())["class_names"] == ["cat", "dog"]
    assert LatentDiffusion.from_pretrained(tmp_path / "named").class_names == ("cat", "dog")
    LatentDiffusion(*parts).save_pretrained(tmp_path / "unnamed")
    assert json.loads((tmp_path / "unnamed" / "pipeline.json").read_text())["class_names"] is None
    assert LatentDiffusion.from_pretrained(tmp_path / "unnamed").class_names is None
    with pytest.raises(ValueError, match="3 class_names for a U-Net with num_classes=2"):
        LatentDiffusion(*parts, class_names=["cat", "dog", "cow"])
    with pytest.raises(ValueError, match=r"class_names must be distinct, \['dog'\] repeat"):
        LatentDiffusion(*parts, class_names=["dog", "dog"])
    with pytest.raises(ValueError, match="class_names must be a list of strings"):
        LatentDiffusion(*parts, class_names=[0, 1])
    with pytest.raises(ValueError, match=r"num_classes=0 \(no class conditioning: leave class_names out\)"):
        LatentDiffusion(pipe.autoencoder, pipe.unet, pipe.text_encoder, pipe.config, 2.5, class_names=["cat"])
    meta = json.loads((tmp_path / "named" / "pipeline.json").read_text())
    (tmp_path / "named" / "pipeline.json").write_text(json.dumps({**meta, "class_names": ["cat"]}))
    with pytest.raises(CheckpointError, match="pipeline.json: 1 class_names for a U-Net with num_classes=2"):
        LatentDiffusion.from_pretrained(tmp_path / "named")


def test_pipeline_json_with_an_unknown_key_is_refused_naming_it(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipeline")
    path = tmp_path / "pipeline" / "pipeline.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "guidance_scale": 7.5}))  # e.g. a setting a newer version stores here
    with pytest.raises(CheckpointError, match=r"pipeline.json has unknown keys \['guidance_scale'\] \(valid keys: "
                                              r"class_names, diffusion, format_version, kind, latent_scale, "
                                              r"text_encoder\)"):
        LatentDiffusion.from_pretrained(tmp_path / "pipeline")
    with pytest.raises(CheckpointError, match="unknown keys"):
        TextToImage.from_pretrained(tmp_path / "pipeline")  # the pipelines load through the same check
    path.write_text(json.dumps(meta))
    LatentDiffusion.from_pretrained(tmp_path / "pipeline")  # what save_pretrained writes is accepted


def test_pipeline_and_classifier_directories_are_found_in_run_directories(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "run" / "pipeline")
    assert find_pipeline_dir(tmp_path / "run") == tmp_path / "run" / "pipeline"
    assert find_pipeline_dir(tmp_path / "run" / "pipeline") == tmp_path / "run" / "pipeline"
    assert find_classifier_dir(tmp_path / "run" / "pipeline" / "unet") == tmp_path / "run" / "pipeline" / "unet"
    with pytest.raises(CheckpointError, match=r"unet is neither a pipeline directory nor a run directory with "
                                              r"pipeline/pipeline.json; train one with `accelerate launch "
                                              r"diffusion/train_latent.py configs/diffusion/<config>.yaml`"):
        find_pipeline_dir(tmp_path / "run" / "pipeline" / "unet", TRAIN_DIFFUSION)
    with pytest.raises(CheckpointError, match=r"nowhere is neither a pipeline directory .* \(it does not exist\); "
                                              r"train one with my command"):
        find_pipeline_dir(tmp_path / "nowhere", how_to_train="my command")
    with pytest.raises(CheckpointError, match=r"is neither a classifier directory nor a run directory with "
                                              r"classifier/config.json; train one with `accelerate launch "
                                              r"diffusion/train_classifier.py"):
        find_classifier_dir(tmp_path / "run")


def test_mismatched_components_fail_clearly(pipe):
    with pytest.raises(ValueError, match="code_dim=4"):
        LatentDiffusion(pipe.autoencoder, UNet(tiny_unet_config(code_dim=8)), pipe.text_encoder, pipe.config, 1.0)
    with pytest.raises(ValueError, match="context_dim=384 does not match the text encoder width 32"):
        LatentDiffusion(pipe.autoencoder, UNet(tiny_unet_config(context_dim=384)), pipe.text_encoder, pipe.config, 1.0)
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        DiffusionConfig(zero_terminal_snr=True, prediction="epsilon")


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_training_loss_is_finite_and_trains_the_unet(pipe, prediction):
    config = DiffusionConfig(num_steps=100, prediction=prediction)
    unet = UNet(tiny_unet_config())
    latents = torch.randn(4, 4, 8, 8)
    text = pipe.encode_prompts(PROMPTS * 2)
    loss = training_loss(unet, config.make_schedule(), config, latents, text)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert unet.decoder.conv_out.weight.grad.abs().sum() > 0
