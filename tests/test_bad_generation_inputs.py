"""Bad generation arguments: sampler names, steps, guidance, sizes, masks, evaluator flags, prompts and
token-prior settings; each is refused with a message that names the problem and the fix, or handled.

Empty, non-ASCII, 256+ token and bare-string prompts at the MiniLM encoder are in test_text_encoder.py.
"""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from autoencoder.model import Autoencoder
from bad_inputs import refused
from common.text_encoder import TextEncoderConfig
from diffusion import evaluate_shapes
from diffusion.latent_diffusion import LatentDiffusion
from diffusion.samplers import sample_ddim
from diffusion.schedules import make_schedule
from diffusion.unet import UNet
from pipelines import ClassToImage, TextToImage, TokensToImage
from prior.token_prior import TokenPrior
from prior.transformer import GPT, PriorConfig
from tiny import tiny_unet_config

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- sampling (diffusion)
SAMPLING_CASES = {  # name -> (pipeline call arguments, error, words)
    "misspelled_sampler": (dict(sampler="dpmpp2m"), ValueError, ("sampler 'dpmpp2m' is unknown", "'dpmpp_2m'")),
    "zero_steps": (dict(num_inference_steps=0), ValueError, ("num_inference_steps must be >= 1", "got 0")),
    "negative_steps": (dict(num_inference_steps=-3), ValueError, ("num_inference_steps must be >= 1", "got -3")),
    "fractional_steps": (dict(num_inference_steps=2.5), TypeError, ("num_inference_steps must be an integer", "2.5")),
    "more_steps_than_timesteps": (dict(num_inference_steps=5000), ValueError, ("num_inference_steps must be <= 100",
                                                                               "got 5000")),
    "nan_guidance": (dict(guidance_scale=float("nan")), ValueError, ("guidance_scale must be a finite number", "nan")),
    "inf_guidance": (dict(guidance_scale=float("inf")), ValueError, ("guidance_scale must be a finite number", "inf")),
    "misspelled_sampler_option": (dict(sampler="ddim", etaa=0.5), TypeError, ("'etaa'",)),
    "guidance_rescale_above_one": (dict(guidance_rescale=2.0), ValueError, ("guidance_rescale must be a finite "
                                                                            "number in [0, 1]",)),
    "no_prompts": (dict(prompt=[]), ValueError, ("at least one prompt",)),
    "prompt_that_is_not_text": (dict(prompt=["a dog", None]), TypeError, ("prompt 1 is NoneType",)),
    "size_not_a_multiple_of_the_latent_grid": (dict(height=13), ValueError, ("height=13 is not a multiple of 4",
                                                                             "e.g. 12 or 16")),
    "negative_size": (dict(height=-16), ValueError, ("height=-16", "positive multiples of 4")),
    "more_negative_prompts_than_prompts": (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), ValueError,
                                           ("negative_prompt has 3 entries for 2 prompts", "give one")),
    "negative_prompts_for_a_text_free_pipeline": (dict(negative_prompt="x", text_free=True), ValueError,
                                                  ("negative_prompt: ClassToImage",)),
}


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_sampling(case, parts):
    arguments, error, words = SAMPLING_CASES[case]
    arguments = {"prompt": ["a small red circle at the top left"], "num_inference_steps": 2, "progress": False,
                 "seed": 0, **arguments}
    pipe = TextToImage(parts["pipe"])
    if arguments.pop("text_free", False):  # the same pipeline without its text encoder, fed class labels
        unet = UNet(dataclasses.replace(tiny_unet_config(context_dim=0), num_classes=2))
        model = parts["pipe"]
        pipe = ClassToImage(LatentDiffusion(model.autoencoder, unet, None, model.config, model.latent_scale))
        arguments["prompt"] = [0, 1]
    refused(lambda: pipe(arguments.pop("prompt"), **arguments), *words, error=error)


BUNDLE_CASES = {  # name -> (sample_latents arguments, error, words): the sampler's own preconditions
    "negative_ddim_eta": (dict(sampler="ddim", eta=-1.0), ValueError, ("eta must be >= 0",)),
    "misspelled_sampler_option": (dict(sampler="ddim", etaa=0.5), TypeError, ("'etaa'",)),
}


@pytest.mark.parametrize("case", BUNDLE_CASES)
def test_sampler_options_at_the_bundle(case, parts):
    arguments, error, words = BUNDLE_CASES[case]
    pipe = parts["pipe"]
    cond = pipe.encode_prompts(["a small red circle at the top left"])
    refused(lambda: pipe.sample_latents(cond, None, (1, 4, 8, 8), steps=2, guidance=1.0,
                                        generator=torch.Generator().manual_seed(0), **arguments), *words, error=error)


def test_a_bare_string_is_one_prompt(parts):
    """"a dog" is one prompt (not one per character), and so is a bare negative prompt."""
    pipe = TextToImage(parts["pipe"])
    options = dict(num_inference_steps=2, seed=0, progress=False, output_type="pt")
    images = pipe("a dog", negative_prompt="a cat", **options).images
    assert images.shape == (1, 3, 16, 16)
    torch.testing.assert_close(images, pipe(["a dog"], negative_prompt=["a cat"], **options).images)


MASK_CASES = {  # name -> (mask, known latents, error, words); the latents are (1, 4, 8, 8)
    "mask_without_known_latents": (torch.ones(1, 1, 8, 8), None, ValueError, ("needs known_latents",)),
    "nan_in_the_mask": (torch.full((1, 1, 8, 8), float("nan")), torch.zeros(1, 4, 8, 8), ValueError,
                        ("mask holds NaN/inf", "finite numbers in [0, 1]")),
    "mask_of_another_size": (torch.ones(1, 1, 5, 5), torch.zeros(1, 4, 8, 8), ValueError,
                             ("mask has shape (1, 1, 5, 5)", "must be (1, 1, 8, 8)")),
    "mask_with_a_channel_per_latent": (torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), ValueError,
                                       ("mask has shape (1, 4, 8, 8)",)),
    "mask_scaled_to_255": (torch.full((1, 1, 8, 8), 255.0), torch.zeros(1, 4, 8, 8), ValueError,
                           ("mask values must lie in [0, 1]", "[255, 255]", "divide it by 255")),
    "negative_mask": (torch.full((1, 1, 8, 8), -0.5), torch.zeros(1, 4, 8, 8), ValueError,
                      ("mask values must lie in [0, 1]", "[-0.5, -0.5]")),
    "known_latents_of_another_shape": (torch.ones(1, 1, 8, 8), torch.zeros(1, 3, 8, 8), ValueError,
                                       ("known_latents has shape (1, 3, 8, 8)", "(1, 4, 8, 8)")),
    "known_latents_without_a_mask": (None, torch.zeros(1, 4, 8, 8), ValueError, ("known_latents were given without "
                                                                                 "mask",)),
}


@pytest.mark.parametrize("case", MASK_CASES)
def test_inpainting_inputs(case, parts):
    mask, known, error, words = MASK_CASES[case]
    pipe = parts["pipe"]
    cond = pipe.encode_prompts(["a small red circle at the top left"])
    refused(lambda: pipe.sample_latents(cond, None, (1, 4, 8, 8), steps=2, guidance=1.0, mask=mask,
                                        known_latents=known, generator=torch.Generator().manual_seed(0)),
            *words, error=error)


def test_sampler_with_ascending_timesteps():
    schedule = make_schedule("linear", 100)
    refused(lambda: sample_ddim(lambda x, t: x, torch.zeros(1, 4, 8, 8), schedule, torch.tensor([10, 50])),
            "strictly descending", error=ValueError)


EVALUATE_CASES = {  # name -> (arguments, words of the exit message)
    "cli_unknown_sampler": (["--sampler", "dpm"], "invalid choice: 'dpm' (choose from 'ddim', 'ddpm', 'dpmpp_2m'"),
    "cli_not_a_run_directory": (["--device", "cpu"], "neither a pipeline directory nor a run directory"),
    "cli_zero_steps": (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    "cli_fractional_prompts": (["--prompts", "2.5"], "argument --prompts: expected a whole number >= 1, got '2.5'"),
    "cli_zero_batch_size": (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    "cli_nan_guidance": (["--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
    "cli_rescale_above_one": (["--rescale", "2"], "argument --rescale: must be a finite number in [0, 1], got '2'"),
    "cli_sweep_with_a_word": (["--sweep", "1,x"], "argument --sweep: expected a number, got 'x'; give "
                                                  "comma-separated finite numbers, e.g. 0,1,2,4"),
    "cli_sweep_with_inf": (["--sweep", "1,inf"], "argument --sweep: must be a finite number, got 'inf'"),
    "cli_classifier_sweep_with_nan": (["--classifier-sweep", "nan"], "argument --classifier-sweep: must be a finite"),
}


@pytest.mark.parametrize("case", EVALUATE_CASES)
def test_evaluate_shapes_cli(case, parts, capsys):
    arguments, words = EVALUATE_CASES[case]
    run = parts["root"] / ("stage1" if case == "cli_not_a_run_directory" else "diffusion_run")
    base = [str(run), "--steps", "2", "--prompts", "2", "--samples", "1", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit:
        evaluate_shapes.main(base + arguments)
    message = str(exit.value.code) + capsys.readouterr().err
    assert exit.value.code != 0 and "Traceback" not in message and words in message


# ------------------------------------------------------------------------- prompts that are handled
PROMPTS = {
    "empty_prompt": "",
    "emoji_prompt": "🐶🌈 a dog under a rainbow 🎉",
    "cjk_prompt": "一只红色的圆形在左上角",
    "control_characters": "a red\x00 circle\t\n\r",
    "longer_than_the_token_limit": "a small red circle at the top left " * 40,
}


@pytest.mark.parametrize("case", PROMPTS)
def test_prompt_is_handled(case, parts, caplog):
    with caplog.at_level(logging.WARNING, logger="common.text_encoder"):
        images = TextToImage(parts["pipe"])([PROMPTS[case]], num_inference_steps=2, seed=0, progress=False,
                                            output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    truncated = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert bool(truncated) == (case == "longer_than_the_token_limit")
    if truncated:
        assert "exceed the text encoder's limit of 64 tokens" in truncated[0]


# ------------------------------------------------------------------------- the token prior
@pytest.fixture(scope="module")
def priors(parts) -> dict[str, TokensToImage]:
    autoencoder = Autoencoder.from_pretrained(parts["ae"])
    torch.manual_seed(0)
    common = dict(codebook_size=32, grid_size=8, width=32, depth=1, heads=4)
    by_class = GPT(PriorConfig(condition="class", num_classes=2, **common))
    by_text = GPT(PriorConfig(condition="text", text_dim=32, text_tokens=6, **common))
    text = TextEncoderConfig(name_or_path=str(parts["text"]))
    return {"class": TokensToImage(TokenPrior(autoencoder, by_class, class_names=["a red circle", "a blue square"])),
            "text": TokensToImage(TokenPrior(autoencoder, by_text, text))}


ONE = [0]
PRIOR_CASES = {  # name -> (prior, TokensToImage arguments, words)
    "class_label_out_of_range": ("class", dict(class_labels=[0, 7]), ("class_labels must be in [0, 2)", "got 7")),
    "prompt_naming_no_class": ("class", dict(prompt=["a green star"]), ("'a green star' is not a class",
                                                                        "valid names: a red circle, a blue square")),
    "nan_guidance": ("class", dict(class_labels=ONE, guidance_scale=float("nan")), ("guidance_scale must be a finite "
                                                                                    "number", "nan")),
    "zero_temperature": ("class", dict(class_labels=ONE, temperature=0.0), ("temperature", "top_k=1")),
    "top_p_above_one": ("class", dict(class_labels=ONE, top_p=1.5), ("top_p must be in (0, 1]",)),
    "negative_top_k": ("class", dict(class_labels=ONE, top_k=-5), ("top_k must be >= 0",)),
    "text_prior_without_prompts": ("text", dict(), ("give prompt or class_labels",)),
}


@pytest.mark.parametrize("case", PRIOR_CASES)
def test_prior_generation(case, priors):
    kind, arguments, words = PRIOR_CASES[case]
    refused(lambda: priors[kind](**arguments, seed=0, progress=False), *words, error=ValueError)


def test_prior_takes_a_bare_string_as_one_prompt(priors):
    options = dict(seed=0, progress=False, output_type="pt")
    images = priors["class"]("a red circle", **options).images
    assert images.shape == (1, 3, 16, 16)
    torch.testing.assert_close(images, priors["class"](["a red circle"], **options).images)


def test_prior_prompt_longer_than_its_text_slots(priors, caplog):
    with caplog.at_level(logging.WARNING, logger="prior.text"):
        images = priors["text"](["a small red circle at the top left of the picture 🐶"], guidance_scale=2.0, seed=0,
                                progress=False, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert any("raise model.text_tokens" in r.getMessage() for r in caplog.records)
