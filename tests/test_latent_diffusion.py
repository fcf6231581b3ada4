"""LatentDiffusion: pipeline directory round trip, seeding, guidance, img2img and inpainting."""
from __future__ import annotations

import json

import pytest
import torch

from diffusion.latent_diffusion import DiffusionConfig, LatentDiffusion, training_loss
from diffusion.objectives import Denoiser
from diffusion.samplers import sample_dpmpp_2m
from diffusion.unet import UNet
from test_latent_cache import make_tiny_pipeline, single_thread, tiny_unet_config  # noqa: F401 (fixture)

pytest.importorskip("transformers")
PROMPTS = ["a small red circle at the top left", "a large blue square in the center"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> LatentDiffusion:
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipe"))


def generate(pipe: LatentDiffusion, seed: int, **kwargs) -> torch.Tensor:
    options = {"steps": 4, "guidance": 3.0, **kwargs}
    return pipe.generate(PROMPTS, generator=torch.Generator().manual_seed(seed), **options)


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
    stronger = pipe.sample_latents(cond, uncond, shape, steps=5, guidance=4.0, generator=torch.Generator().manual_seed(3))
    assert (stronger - guided).abs().max() > 1e-3
    negative = generate(pipe, 0, negative_prompts=["a large green triangle at the bottom"])
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
