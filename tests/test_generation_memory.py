"""Many images in one call: sampled and decoded ``chunk_size`` at a time, with the same images for any chunk
size, and refused with the memory estimate when they cannot fit.

Peak RSS against the number of images is measured by ``bench/generation_memory.py`` (subprocesses, too slow
for a test); here the chunking is checked by what the networks are given.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pipelines.options
from pipelines.options import GenerationOptions
from tiny import build_pipelines, load_pipelines, tiny_classifier

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a small red circle at the top left", "a large blue square in the center"]
CHUNKS = (1, 3, 6)  # 2 prompts x 3 images: one image at a time, uneven chunks, all at once


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return build_pipelines(tmp_path_factory.mktemp("chunks"))


@pytest.fixture(scope="module")
def pipes(dirs) -> dict:
    return load_pipelines(dirs)


def image(seed: int, count: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def call(pipes: dict, which: str, **options):
    """A call of pipeline ``which`` on two prompts (labels), three images each."""
    options = {"num_images_per_prompt": 3, "progress": False, "output_type": "pt", **options}
    if which != "tokens":
        options.setdefault("num_inference_steps", 3)
    pipe = pipes[which]
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1
    arguments = {"text": (PROMPTS,), "class": ([0, 2],), "img2img": (PROMPTS, image(0, 2)),
                 "inpaint": (PROMPTS, image(0), mask), "tokens": (PROMPTS,)}[which]
    return pipe(*arguments, **options).images


def same_latents(first: torch.Tensor, second: torch.Tensor) -> bool:
    """The prior's codes bit for bit; diffusion latents to the float rounding of a U-Net run on another batch
    size (an AVX2 CPU's fp32 kernels round differently for batch 1 and 6, by up to 1.3e-5 here). Other start
    noise would differ by about 1."""
    if not first.is_floating_point():
        return torch.equal(first, second)
    return first.shape == second.shape and float((first - second).abs().max()) <= 1e-4


@pytest.mark.parametrize("which", ["text", "class", "img2img", "inpaint", "tokens"])
def test_images_do_not_depend_on_the_chunk_size(pipes, which):
    """The sampled latents are the same for any chunk size, for a seed and for a generator (the prior's codes
    bit for bit); the decoded images agree up to the float rounding of a decoder run on another batch size."""
    seeded = [call(pipes, which, chunk_size=chunk, seed=7, output_type="latent") for chunk in CHUNKS[::2]]
    generated = call(pipes, which, chunk_size=CHUNKS[1], generator=torch.Generator().manual_seed(7),
                     output_type="latent")
    for latents in (seeded[1], generated):
        assert same_latents(latents, seeded[0])
    decoded = [call(pipes, which, chunk_size=chunk, seed=7) for chunk in CHUNKS[1:]]
    torch.testing.assert_close(decoded[1], decoded[0], rtol=0, atol=1e-5)
    assert decoded[0].shape == (6, 3, 16, 16)


def test_classifier_guidance_and_negative_prompts_follow_their_images_across_chunks(pipes):
    steered = dict(classifier=tiny_classifier(), classifier_labels=["red", "blue"], classifier_scale=3.0)
    runs = [call(pipes, "text", chunk_size=chunk, seed=1, negative_prompt=["a dog", "a cat"], output_type="latent",
                 **steered) for chunk in CHUNKS]
    assert all(same_latents(images, runs[0]) for images in runs[1:])


def test_a_stochastic_sampler_repeats_itself_at_one_chunk_size(pipes):
    """Per-step noise comes in chunk order, so DDPM's images depend on chunk_size (recorded in the settings),
    but a seed and a chunk size always give the same images."""
    first = call(pipes, "text", sampler="ddpm", chunk_size=4, seed=3, output_type="latent")
    assert torch.equal(call(pipes, "text", sampler="ddpm", chunk_size=4, seed=3, output_type="latent"), first)


@pytest.mark.parametrize("which", ["text", "inpaint", "tokens"])
def test_networks_never_see_more_than_a_chunk(pipes, which, monkeypatch):
    pipe = pipes[which]
    batches = {"decode": [], "sample": []}
    decode = pipe.model.decode
    monkeypatch.setattr(pipe.model, "decode", lambda x: batches["decode"].append(len(x)) or decode(x))
    if which == "tokens":
        head = pipe.model.prior.head
        handle = head.register_forward_hook(lambda module, inputs, output: batches["sample"].append(len(output)))
    else:
        sample = pipe.model.sample_latents
        monkeypatch.setattr(pipe.model, "sample_latents",
                            lambda *args, **kwargs: batches["sample"].append(args[2][0]) or sample(*args, **kwargs))
    try:
        assert call(pipes, which, chunk_size=4, seed=0).shape[0] == 6
    finally:
        if which == "tokens":
            handle.remove()
    assert batches["decode"] == [4, 2]
    guided_rows = 2 if which == "tokens" else 1  # the prior runs [cond; uncond] rows through its head
    assert max(batches["sample"]) == 4 * guided_rows and min(batches["sample"]) >= 2


def test_the_default_chunk_is_a_bounded_batch():
    assert GenerationOptions().chunk_size == 16


def test_the_estimate_grows_with_the_chunk_and_the_count_not_with_anything_else(pipes, monkeypatch):
    pipe = pipes["text"]
    cost = pipe.image_cost(pipe.options({}), 16, 16)
    free = 20 * cost.working + 100 * cost.kept
    monkeypatch.setattr(pipelines.options, "available_memory", lambda device: free)
    with pytest.raises(ValueError, match="chunk_size=64: "):
        pipe(PROMPTS[0], num_images_per_prompt=40, chunk_size=64, progress=False)
    with pytest.raises(ValueError, match="num_images_per_prompt=100000: "):
        pipe(PROMPTS[0], num_images_per_prompt=100000, chunk_size=4, progress=False)
    bigger = pipe.image_cost(pipe.options({}), 64, 64)
    assert bigger.working > 10 * cost.working and bigger.kept > 10 * cost.kept, "both scale with the pixels"
