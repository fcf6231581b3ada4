"""A diffusers Stable Diffusion folder runs through our pipelines and matches diffusers' own pipeline: same prompt,
negative prompt, seed and guidance give the same images (tiny random SD 1.x-like and 2.x-like folders built here)."""
from __future__ import annotations

import json

import pytest
import torch

from common.checkpoint import CheckpointError
from diffusion.objectives import DiffusionConfig
from diffusion.stable_diffusion import diffusion_config_from_scheduler
from pipelines import TextToImage, load_pipeline
from tiny_sd import SD_SCHEDULER, make_tiny_stable_diffusion

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS, NEGATIVES = ["a dog", "a cat on a mat"], ["", "blurry"]
TOLERANCE = 1e-4  # the issue asks 1e-3; we measure about 7e-6


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def folder(request, tmp_path_factory):
    return make_tiny_stable_diffusion(tmp_path_factory.mktemp(request.param), prediction=request.param)


def theirs(folder, sampler: str, **options) -> torch.Tensor:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    if sampler == "dpmpp_2m":
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                           algorithm_type="dpmsolver++", solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=20, guidance_scale=7.5, output_type="pt",
                **options).images


def ours(folder, sampler: str, **options) -> torch.Tensor:
    pipe = TextToImage.from_pretrained(folder, precision="fp32")
    return pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=20, guidance_scale=7.5, sampler=sampler,
                output_type="pt", progress=False, **options).images


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_images_match_diffusers_stable_diffusion_pipeline(folder, sampler):
    """A seed means the same start noise in both libraries; 20 steps of each sampler at guidance 7.5."""
    expected = theirs(folder, sampler, generator=torch.Generator().manual_seed(0))
    got = ours(folder, sampler, seed=0)
    assert got.shape == expected.shape == (2, 3, 16, 16)
    difference = (got - expected).abs().max().item()
    assert difference <= TOLERANCE, f"{sampler}: max abs difference {difference:.3g}"
    assert (got - ours(folder, sampler, seed=1)).abs().max() > 0.01, "the seed matters"


def test_given_latents_replace_the_seed(folder):
    """``latents=`` as in diffusers: the same start noise gives the same images, whatever the generator."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = theirs(folder, "ddim", latents=noise.clone())
    got = ours(folder, "ddim", latents=noise.clone(), seed=123)
    assert (got - expected).abs().max().item() <= TOLERANCE
    with pytest.raises(ValueError, match=r"latents has shape \(1, 4, 8, 8\), but this call samples \(2, 4, 8, 8\)"):
        ours(folder, "ddim", latents=noise[:1])


def test_scheduler_config_maps_onto_ours():
    config = diffusion_config_from_scheduler({**SD_SCHEDULER, "_class_name": "PNDMScheduler", "skip_prk_steps": True,
                                              "prediction_type": "v_prediction", "num_train_timesteps": 1000})
    assert (config.schedule, config.prediction, config.spacing, config.steps_offset) == ("scaled_linear", "v",
                                                                                          "leading", 1)
    assert not config.set_alpha_to_one and config.beta_start == 0.00085
    with pytest.raises(CheckpointError, match=r"clip_sample=True \(needs False\); beta_schedule='sigmoid'"):
        diffusion_config_from_scheduler({**SD_SCHEDULER, "clip_sample": True, "beta_schedule": "sigmoid"})
    trailing = diffusion_config_from_scheduler({**SD_SCHEDULER, "timestep_spacing": "trailing"})
    assert trailing.steps_offset == 0, "diffusers ignores steps_offset unless the spacing is leading"
    with pytest.raises(ValueError, match="only shifts 'leading' spacing"):
        DiffusionConfig(spacing="trailing", steps_offset=1)


def test_the_cli_and_load_pipeline_run_the_folder(folder, tmp_path, capsys):
    from pipelines import generate

    assert isinstance(load_pipeline(folder), TextToImage)
    generate.main([str(folder), "a dog", "-n", "2", "--seed", "0", "--steps", "3", "-o", str(tmp_path / "grid.png"),
                   "--no-progress"])
    assert (tmp_path / "grid.png").is_file()
    settings = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert settings["seed"] == 0


def test_a_sigma_spacing_in_the_scheduler_config_is_named_not_dropped(caplog):
    config = dict(SD_SCHEDULER, use_karras_sigmas=True)
    with caplog.at_level("WARNING", logger="diffusion.stable_diffusion"):
        assert diffusion_config_from_scheduler(config) == diffusion_config_from_scheduler(SD_SCHEDULER)
    assert "use_karras_sigmas" in caplog.text and "sigma_spacing='karras'" in caplog.text
