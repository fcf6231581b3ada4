"""The user-facing pipelines on tiny random components (``tiny.build_pipelines``): loading, seeding,
argument checks, outputs."""
from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoint import CheckpointError
from pipelines import ClassToImage, ImageToImage, Inpaint, PipelineKindError, TextToImage, TokensToImage, load_pipeline
from pipelines.latent import LatentPipeline
from pipelines.options import GenerationOptions
from tiny import CLASS_NAMES, build_pipelines, tiny_classifier

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a small red circle at the top left", "a large blue square in the center"]
FAST = {"num_inference_steps": 3, "progress": False}  # diffusion only: the token prior warns that it ignores steps
COLOURS = "red, green, blue, yellow, purple, orange"  # the tiny classifier's class names, in order


def fast(generator) -> dict:
    """Quick, quiet settings for either generator."""
    return FAST if not isinstance(generator, TokensToImage) else {"progress": False}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return build_pipelines(tmp_path_factory.mktemp("pipelines"))


@pytest.fixture(scope="module")
def pipe(dirs) -> TextToImage:
    return TextToImage.from_pretrained(dirs["text"])


@pytest.fixture(scope="module")
def prior(dirs) -> TokensToImage:
    return TokensToImage.from_pretrained(dirs["prior"])


@pytest.fixture(scope="module")
def classes(dirs) -> ClassToImage:
    return ClassToImage.from_pretrained(dirs["class"])


def pixels(seed: int, count: int = 1, height: int = 16, width: int = 16) -> torch.Tensor:
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ loading
def test_save_load_round_trip_gives_identical_images(pipe, prior, tmp_path):
    for name, original in (("text", pipe), ("prior", prior)):
        original.save_pretrained(tmp_path / name)
        component = "unet" if name == "text" else "prior"
        for part in ("autoencoder", component):
            assert {p.name for p in (tmp_path / name / part).iterdir()} == {"config.json", "model.safetensors"}
        loaded = type(original).from_pretrained(tmp_path / name)
        first = original(PROMPTS, seed=4, output_type="pt", **fast(original)).images
        assert torch.equal(loaded(PROMPTS, seed=4, output_type="pt", **fast(original)).images, first)
    assert json.loads((tmp_path / "text" / "pipeline.json").read_text())["kind"] == "text_to_image"


def test_load_pipeline_picks_the_class_and_wrong_kinds_name_the_right_one(dirs, pipe):
    assert type(load_pipeline(dirs["text"])) is TextToImage
    assert type(load_pipeline(dirs["class"] / "pipeline")) is ClassToImage
    assert type(load_pipeline(dirs["prior"])) is TokensToImage
    with pytest.raises(PipelineKindError, match=r"holds a 'tokens_to_image' pipeline.*load it with TokensToImage"):
        TextToImage.from_pretrained(dirs["prior"])
    with pytest.raises(PipelineKindError, match=r"holds a 'text_to_image' pipeline.*load it with TextToImage"):
        TokensToImage.from_pretrained(dirs["text"])
    with pytest.raises(PipelineKindError, match="no text encoder; load it with ClassToImage"):
        ImageToImage.from_pretrained(dirs["class"])
    with pytest.raises(PipelineKindError, match="num_classes > 0.*load it with TextToImage"):
        ClassToImage.from_pretrained(dirs["text"])
    with pytest.raises(CheckpointError, match=r"missing is neither a pipeline directory nor a run directory with "
                                              r"pipeline/pipeline.json \(it does not exist\); train one with "
                                              r"`accelerate launch diffusion/train_latent.py .* prior/train.py"):
        TextToImage.from_pretrained(dirs["text"] / "missing")
    assert pipe.to("cpu") is pipe and pipe.device.type == "cpu"


# ------------------------------------------------------------------------------------------ seeding
def test_same_seed_same_images_different_seed_different_images(pipe, prior):
    for generator in (pipe, prior):
        first = generator(PROMPTS, seed=1, output_type="pt", **fast(generator)).images
        assert torch.equal(generator(PROMPTS, seed=1, output_type="pt", **fast(generator)).images, first)
        seeded = torch.Generator().manual_seed(1)
        same = generator(PROMPTS, generator=seeded, output_type="pt", **fast(generator)).images
        assert torch.equal(same, first)
        assert not torch.equal(generator(PROMPTS, seed=2, output_type="pt", **fast(generator)).images, first)


def test_empty_prompt_is_the_unconditional_prompt(pipe, prior):
    """With "" in both branches of guidance, the guidance scale cannot matter."""
    for generator in (pipe, prior):
        low = generator("", seed=0, guidance_scale=1.0, output_type="pt", **fast(generator)).images
        high = generator("", seed=0, guidance_scale=5.0, output_type="pt", **fast(generator)).images
        torch.testing.assert_close(low, high, atol=1e-4, rtol=0)
        conditioned = generator(PROMPTS[0], seed=0, guidance_scale=5.0, output_type="pt", **fast(generator)).images
        assert not torch.equal(conditioned, high)


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("changes, message", [
    ({"prompt": []}, "prompt is an empty list"),
    ({"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
    ({"guidance_rescale": 1.5}, r"guidance_rescale must be a finite number in \[0, 1\]"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be >= 1"),
    ({"seed": 0, "generator": torch.Generator()}, "generator and seed were both given"),
    ({"sampler": "plms"}, "sampler 'plms' is unknown; valid samplers: ddim, ddpm, dpmpp_2m, euler"),
    ({"output_type": "np"}, "output_type must be one of"),
    ({"negative_prompt": ["a", "b", "c"]}, "negative_prompt has 3 entries for 2 prompts"),
])
def test_bad_arguments_raise_value_errors_naming_them(pipe, prior, changes, message):
    for generator in (pipe, prior):
        arguments = {"prompt": PROMPTS, **changes}
        with pytest.raises(ValueError, match=message):
            generator(arguments.pop("prompt"), **arguments)


def test_sizes_must_fit_the_generator(pipe, prior):
    with pytest.raises(ValueError, match=r"height=15 is not a multiple of 4 \(the autoencoder downsamples by 2"):
        pipe("a dog", height=15)
    with pytest.raises(ValueError, match="width=18 is not a multiple of 4"):
        pipe("a dog", width=18)
    with pytest.raises(ValueError, match="height=32: this prior's token grid fixes the image size at 16x16"):
        prior("a dog", height=32)
    assert prior("a dog", height=16, width=16, seed=0, output_type="pt", progress=False).images.shape == (1, 3, 16, 16)


def test_eta_reaches_ddim_and_is_checked_with_the_other_options(pipe):
    def ddim(**options) -> torch.Tensor:
        return pipe(PROMPTS, sampler="ddim", seed=0, output_type="pt", **FAST, **options).images
    assert torch.equal(ddim(eta=0.0), ddim()) and not torch.equal(ddim(eta=1.0), ddim())
    with pytest.raises(ValueError, match="eta must be a finite number >= 0, got -1.0"):
        ddim(eta=-1.0)
    with pytest.raises(ValueError, match="eta=0.5 is an option of sampler 'ddim', and the sampler is 'dpmpp_2m'"):
        pipe(PROMPTS, eta=0.5, **FAST)


def test_token_prior_refuses_a_callback_and_warns_about_diffusion_only_settings(prior):
    with pytest.raises(ValueError, match="callback: TokensToImage"):
        prior("a dog", callback=lambda *args: None)
    with pytest.warns(UserWarning, match="ignores num_inference_steps=3, sampler='ddim'"):
        prior("a dog", sampler="ddim", seed=0, **FAST)


# ------------------------------------------------------------------------------------------ outputs
def test_output_types_and_non_square_sizes(pipe):
    pt = pipe(PROMPTS, num_images_per_prompt=2, height=16, width=32, seed=0, output_type="pt", **FAST).images
    assert pt.shape == (4, 3, 16, 32) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    pil = pipe(PROMPTS, num_images_per_prompt=2, height=16, width=32, seed=0, **FAST).images
    assert len(pil) == 4 and all(image.size == (32, 16) and image.mode == "RGB" for image in pil)
    torch.testing.assert_close(torch.from_numpy(np.array(pil[3])).float(), (pt[3] * 255).permute(1, 2, 0),
                               atol=0.51, rtol=0)
    latent = pipe(PROMPTS, height=16, width=32, seed=0, output_type="latent", **FAST).images
    assert latent.shape == (2, 4, 8, 16)


def test_text_and_token_generators_take_the_same_call(pipe, prior):
    call = dict(negative_prompt="a green triangle", guidance_scale=2.0, num_images_per_prompt=2, seed=3,
                output_type="pt", progress=False)
    for generator in (pipe, prior):
        assert generator(PROMPTS, **call).images.shape == (4, 3, 16, 16)
    assert prior(PROMPTS, output_type="latent", progress=False).images.shape == (2, 8, 8)


def test_callback_is_called_once_per_step(pipe):
    calls = []
    pipe(PROMPTS, num_inference_steps=5, seed=0, progress=False,
         callback=lambda i, latents, x0_hat: calls.append((i, latents.shape, x0_hat.shape)))
    assert [i for i, _, _ in calls] == list(range(5))
    assert all(shape == x0_shape == (2, 4, 8, 8) for _, shape, x0_shape in calls)
    calls.clear()
    ImageToImage.from_pipe(pipe)("a dog", pixels(0), strength=0.5, num_inference_steps=6, seed=0, progress=False,
                                 callback=lambda i, *tensors: calls.append(i))
    assert calls == [0, 1, 2]


def test_progress_false_prints_nothing_and_true_shows_a_bar(pipe, prior, capfd):
    for generator in (pipe, prior):
        generator(PROMPTS, seed=0, **fast(generator))
        assert capfd.readouterr() == ("", "")
        generator(PROMPTS, seed=0, **{**fast(generator), "progress": True})
        output = capfd.readouterr()
        assert output.out == "" and "100%" in output.err


# ------------------------------------------------------------------------------------------ classes
def test_class_to_image_guides_against_the_null_class(classes):
    images = classes([0, 2], num_images_per_prompt=2, seed=0, output_type="pt", **FAST).images
    assert images.shape == (4, 3, 16, 16)
    unconditional = [classes(label, guidance_scale=0.0, seed=5, output_type="pt", **FAST).images for label in (0, 1)]
    torch.testing.assert_close(unconditional[0], unconditional[1])
    guided = [classes(label, guidance_scale=3.0, seed=5, output_type="pt", **FAST).images for label in (0, 1)]
    assert not torch.equal(guided[0], guided[1])
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\), got 3"):
        classes([0, 3])


def test_class_to_image_takes_the_saved_class_names(dirs, classes):
    meta = json.loads((dirs["class"] / "pipeline" / "pipeline.json").read_text())
    assert meta["class_names"] == list(CLASS_NAMES) and classes.class_names == CLASS_NAMES
    assert json.loads((dirs["text"] / "pipeline" / "pipeline.json").read_text())["class_names"] is None
    by_id = classes([0, 2], seed=1, output_type="latent", **FAST).images
    assert torch.equal(classes(["circle", "triangle"], seed=1, output_type="latent", **FAST).images, by_id)
    assert torch.equal(classes(["circle", 2], seed=1, output_type="latent", **FAST).images, by_id)
    with pytest.raises(ValueError, match="class_labels: 'hexagon' is not a class of this pipeline; valid names: "
                                         "circle, square, triangle"):
        classes(["circle", "hexagon"])
    with pytest.raises(ValueError, match="class_labels is empty"):
        classes([])


# ------------------------------------------------------------------------------------------ classifier guidance
def spy_on_sampling(monkeypatch, generator: LatentPipeline) -> list[dict]:
    """Record the keyword arguments of every LatentDiffusion.sample_latents call the pipeline makes."""
    calls, original = [], generator.model.sample_latents
    monkeypatch.setattr(generator.model, "sample_latents", lambda *args, **kwargs: calls.append(kwargs)
                        or original(*args, **kwargs))
    return calls


@pytest.mark.parametrize("which", ["text", "class"])
def test_classifier_guidance_scale_zero_is_no_classifier_and_labels_are_per_prompt(pipe, classes, dirs, which,
                                                                                   monkeypatch):
    generator, first = (pipe, PROMPTS) if which == "text" else (classes, [0, 2])
    classifier = tiny_classifier()
    call = dict(seed=3, guidance_scale=2.0, output_type="latent", **FAST)
    plain = generator(first, **call).images
    steered = dict(classifier=classifier, classifier_labels=["red", "blue"])
    assert torch.equal(generator(first, **steered, classifier_scale=0.0, **call).images, plain)
    guided = generator(first, **steered, classifier_scale=3.0, **call).images
    assert (guided - plain).abs().max() > 1e-3
    # ids and names, the object and its saved run directory: the same guidance
    again = generator(first, classifier=dirs["classifier"], classifier_labels=[0, 2], classifier_scale=3.0, **call)
    assert torch.equal(again.images, guided)
    calls = spy_on_sampling(monkeypatch, generator)
    generator(first, classifier=classifier, classifier_labels=["red", "blue"], num_images_per_prompt=2, **call)
    generator(first, classifier=classifier, classifier_labels="purple", num_images_per_prompt=2, **call)
    assert calls[0]["classifier_labels"].tolist() == [0, 0, 2, 2], "each prompt's label, repeated per image"
    assert calls[1]["classifier_labels"].tolist() == [4] * 4, "one label steers every prompt"
    assert calls[0]["classifier"] is classifier and calls[0]["classifier_scale"] == 1.0


@pytest.mark.parametrize("changes, message", [
    ({"classifier_labels": ["red", "violet"]},
     f"classifier_labels: 'violet' is not a class of the classifier \\(it predicts 'colour'\\); "
     f"valid names: {COLOURS}"),
    ({"classifier_labels": None}, f"classifier_labels: classifier guidance needs the colour .* valid names: {COLOURS}"),
    ({"classifier_labels": [0, 6]}, r"classifier_labels must be in \[0, 6\), got 6"),
    ({"classifier_labels": ["red"] * 3}, "classifier_labels has 3 entries for 2 prompts"),
    ({"classifier_labels": [0.5]}, r"classifier_labels must be class ids or names \(int or str\), got 0.5"),
    ({"classifier_scale": -1.0}, "classifier_scale must be a finite number >= 0, got -1.0"),
    ({"classifier_scale": float("nan")}, "classifier_scale must be a finite number >= 0, got nan"),
    ({"classifier_scale": float("inf")}, "classifier_scale must be a finite number >= 0, got inf"),
    ({"classifier": None}, "classifier_labels needs a classifier: pass classifier="),
    ({"classifier": None, "classifier_labels": None, "classifier_scale": 3.0}, "classifier_scale=3 needs a classifier"),
    ({"latent_scale": 3.0}, "classifier: the classifier was trained on latents scaled by 3"),
])
def test_classifier_guidance_rejects_bad_arguments(pipe, classes, changes, message):
    changes = dict(changes)
    classifier = tiny_classifier(**({"latent_scale": changes.pop("latent_scale")} if "latent_scale" in changes else {}))
    arguments = {"classifier": classifier, "classifier_labels": "red", **changes}
    for generator, first in ((pipe, PROMPTS), (classes, [0, 1])):
        with pytest.raises(ValueError, match=message):
            generator(first, **arguments, **FAST)


def test_classifier_guidance_needs_a_classifier_directory_and_a_diffusion_pipeline(pipe, prior, dirs):
    with pytest.raises(CheckpointError, match=r"is neither a classifier directory nor a run directory with "
                                              r"classifier/config.json; train one with .*train_classifier.py"):
        pipe(PROMPTS, classifier=dirs["text"], classifier_labels="red", **FAST)
    with pytest.raises(TypeError, match="classifier must be a NoisyLatentClassifier or the path of its directory"):
        pipe(PROMPTS, classifier=object(), classifier_labels="red", **FAST)
    with pytest.raises(ValueError, match="classifier: TokensToImage cannot use classifier guidance"):
        prior(PROMPTS, classifier=tiny_classifier(), classifier_labels="red", progress=False)
    with pytest.raises(ValueError, match="classifier_scale must be a finite number >= 0"):
        prior(PROMPTS, classifier_scale=-2.0, progress=False)


# ------------------------------------------------------------------------------------------ img2img, inpainting
def test_image_to_image_strength_zero_returns_the_decoded_input(pipe):
    edit = ImageToImage.from_pipe(pipe)
    images = pixels(0, 2)
    kept = edit(PROMPTS, images, strength=0.0, num_images_per_prompt=2, output_type="pt", progress=False).images
    expected = (pipe.model.decode(pipe.model.encode_images(images * 2 - 1)) + 1) / 2
    torch.testing.assert_close(kept, expected.repeat_interleave(2, dim=0))  # prompt by prompt, images in order
    redrawn = edit(PROMPTS, images, strength=1.0, seed=0, output_type="pt", **FAST).images
    assert (redrawn - expected).abs().mean() > 0.01
    pil = edit("a dog", Image.new("RGB", (20, 20), "red"), height=16, width=32, seed=0, **FAST).images
    assert pil[0].size == (32, 16)


@pytest.mark.parametrize("changes, message", [
    ({"strength": 1.5}, r"strength must be a finite number in \[0, 1\]"),
    ({"strength": -0.1}, "strength must be"),
    ({"strength": 0.01}, "strength=0.01 with num_inference_steps=20 runs no step"),
    ({"image": pixels(0, 3)}, "image holds 3 images for 2 prompts"),
    ({"image": pixels(0) * 2 - 1}, r"image tensor values must be in \[0, 1\]"),
    ({"image": pixels(0, 1, 18, 16)}, "height=18 is not a multiple of 4"),
])
def test_image_to_image_rejects_bad_inputs(pipe, changes, message):
    arguments = {"image": pixels(0), **changes}
    with pytest.raises(ValueError, match=message):
        ImageToImage.from_pipe(pipe)(PROMPTS, arguments.pop("image"), **arguments)


def test_inpaint_keeps_the_unmasked_latents_exactly(pipe):
    inpaint = Inpaint.from_pipe(pipe)
    images = pixels(1)
    mask = torch.zeros(16, 16)
    mask[:, 9] = 1.0  # one pixel column regenerates the whole latent column 4, and only it
    known = pipe.model.encode_images(images * 2 - 1)
    out = inpaint(PROMPTS, images, mask, seed=0, guidance_scale=2.0, output_type="latent", **FAST).images
    keep = torch.ones(8, dtype=torch.bool)
    keep[4] = False
    assert torch.equal(out[..., keep], known.expand(2, -1, -1, -1)[..., keep])
    assert (out[..., 4] - known[..., 4]).abs().mean() > 0.05
    pil_mask = Image.fromarray((mask.numpy() * 255).astype("uint8"), mode="L")
    same = inpaint(PROMPTS, images, pil_mask, seed=0, guidance_scale=2.0, output_type="latent", **FAST).images
    assert torch.equal(same, out)
    with pytest.raises(ValueError, match="mask_image is 8x16 .* but the image is 16x16"):
        inpaint(PROMPTS, images, torch.zeros(8, 16))


def test_every_pipeline_shares_one_options_type(pipe, prior):
    """The options are named, defaulted and documented once: every call takes them as keywords."""
    for cls in (TextToImage, ClassToImage, ImageToImage, Inpaint, TokensToImage):
        options = inspect.signature(cls.__call__).parameters["options"]
        assert options.kind is inspect.Parameter.VAR_KEYWORD
    assert all(f"    {f.name}: " in GenerationOptions.__doc__ for f in dataclasses.fields(GenerationOptions))
    for generator in (pipe, prior):
        with pytest.raises(TypeError, match="unexpected keyword argument 'num_inference_step'; did you mean "
                                            "'num_inference_steps'"):
            generator(PROMPTS, num_inference_step=3)
    with pytest.raises(ValueError, match="strength: TextToImage takes no input image"):
        pipe(PROMPTS, strength=0.5, **FAST)
    with pytest.raises(ValueError, match="temperature: TextToImage samples no tokens"):
        pipe(PROMPTS, temperature=0.5, **FAST)
