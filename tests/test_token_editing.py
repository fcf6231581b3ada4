"""Token editing (#14 part 3): ImageToImage and Inpaint on token priors, AR and MaskGIT, through the calls of
diffusion's pipelines: the kept tokens stay exactly, strength counts the regenerated tokens, a seed
reproduces, an AR prior redraws the last tokens given the first, the CLI takes --init-image and --mask."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from autoencoder.model import Autoencoder
from common.text_encoder import TextEncoderConfig
from pipelines import ImageToImage, Inpaint, PipelineKindError, TextToImage, TokenImageToImage, TokenInpaint
from pipelines.generate import main as generate_main
from pipelines.token_editing import regenerated
from prior.maskgit import MaskGIT
from prior.sampling import SamplingConfig, sample_tokens
from prior.token_prior import TokenPrior
from prior.transformer import GPT, Condition, PriorConfig
from tiny import build_pipelines, make_tiny_autoencoder, make_tiny_text_encoder, perturbed

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE, GRID, N = 16, 8, 64  # the tiny f=2 autoencoder: 16 px images, an 8 x 8 token grid


def shaken(model: GPT, seed: int) -> GPT:
    """A random prior whose logits depend on its inputs (the N(0, 0.02) init is almost uniform)."""
    return perturbed(model, seed, scale=0.3)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny text AR prior run and a tiny text MaskGIT run over one autoencoder (and the diffusion runs)."""
    root = tmp_path_factory.mktemp("editing")
    built = build_pipelines(root)
    autoencoder = Autoencoder.from_pretrained(root / "ae")
    text = TextEncoderConfig(name_or_path=str(root / "text"))
    config = PriorConfig(codebook_size=32, grid_size=GRID, condition="text", text_dim=32, text_tokens=12, width=32,
                         depth=2, heads=4, kind="maskgit")
    TokenPrior(autoencoder, shaken(MaskGIT(config), 3), text, sampling=SamplingConfig(guidance=2.0)).save_pretrained(
        root / "maskgit_run" / "pipeline")
    return {**built, "maskgit": root / "maskgit_run"}


@pytest.fixture(scope="module", params=["prior", "maskgit"])
def kind(request):
    return request.param


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def top_half_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[: SIZE // 2] = 255
    return Image.fromarray(mask)


def codes_of(pipe, image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    return pipe.model.autoencoder.encode_to_indices(pixels).flatten(1)


def tokens(pipe, *args, **options) -> torch.Tensor:
    return pipe(*args, progress=False, output_type="latent", **options).images.flatten(1)


def test_the_diffusion_class_names_load_the_token_variants(dirs, kind):
    edit, fill = ImageToImage.from_pretrained(dirs[kind]), Inpaint.from_pretrained(dirs[kind])
    assert type(edit) is TokenImageToImage and type(fill) is TokenInpaint
    assert type(Inpaint.from_pipe(edit)) is TokenInpaint and Inpaint.from_pipe(edit).model is edit.model
    with pytest.raises(PipelineKindError, match="needs a token pipeline"):
        TokenInpaint.from_pipe(TextToImage.from_pretrained(dirs["text"]))


def test_inpainting_keeps_the_unmasked_tokens_exactly_and_changes_the_masked(dirs, kind):
    pipe = Inpaint.from_pretrained(dirs[kind])
    image = picture()
    original = codes_of(pipe, image)
    out = tokens(pipe, ["a dog", "a cat"], image, top_half_mask(), seed=0, num_images_per_prompt=2)
    assert out.shape == (4, N)
    top = torch.arange(N) < N // 2
    assert torch.equal(out[:, ~top], original.expand(4, -1)[:, ~top]), "an unmasked token changed"
    assert (out[:, top] != original[:, top]).float().mean() > 0.5, "the masked tokens were not regenerated"
    assert torch.equal(out, tokens(pipe, ["a dog", "a cat"], image, top_half_mask(), seed=0, num_images_per_prompt=2))
    assert torch.equal(out, tokens(pipe, ["a dog", "a cat"], image, top_half_mask(), seed=0, num_images_per_prompt=2,
                                   chunk_size=1)), "the tokens depend on the chunk size"


def test_strength_counts_the_regenerated_tokens(dirs, kind):
    pipe = ImageToImage.from_pretrained(dirs[kind])
    image = picture(1)
    original = codes_of(pipe, image)
    assert torch.equal(tokens(pipe, "a dog", image, strength=0.0, seed=0), original), "strength 0 changed tokens"
    out = tokens(pipe, "a dog", image, strength=0.25, seed=0)
    changed = out != original
    assert changed.sum() <= N // 4 and changed.sum() >= 4, "strength 0.25 may change at most 16 of 64 tokens"
    if kind == "prior":  # AR: the last 16 tokens in raster order are redrawn, the first 48 fed as given
        assert not changed[:, : N - N // 4].any()
    full = tokens(pipe, "a dog", image, strength=1.0, seed=0)
    assert (full != original).float().mean() > 0.5


def test_ar_inpainting_draws_each_free_token_given_the_tokens_before_it():
    """sample_tokens with fixed tokens: the fixed ones are fed, the free ones equal a plain sampling run whose
    earlier tokens were those same fixed tokens (taming's completion)."""
    config = PriorConfig(codebook_size=16, grid_size=4, condition="class", num_classes=2, width=32, depth=2, heads=4)
    model = shaken(GPT(config), 5)
    cond = model.prefix(Condition(labels=torch.tensor([1])))
    uniforms = torch.rand(16, 1, generator=torch.Generator().manual_seed(0))
    free_run = sample_tokens(model, cond, uniforms=uniforms)
    fixed = torch.zeros(1, 16, dtype=torch.bool)
    fixed[:, :6] = True
    given = (free_run + 1) % 16  # different tokens for the first six
    edited = sample_tokens(model, cond, uniforms=uniforms, given=given, fixed=fixed)
    assert torch.equal(edited[:, :6], given[:, :6])
    # the same as sampling with the first six forced: recompute token by token without the cache
    again = sample_tokens(model, cond, uniforms=uniforms, given=given, fixed=fixed, use_cache=False)
    assert torch.equal(edited, again)
    assert not torch.equal(edited[:, 6:], free_run[:, 6:]), "the free tokens ignored the fixed ones before them"
    everything = torch.ones_like(fixed)
    assert torch.equal(sample_tokens(model, cond, uniforms=uniforms, given=given, fixed=everything), given)


def test_regenerated_picks_the_lowest_keys_within_the_region():
    region = torch.tensor([[True, True, False, True, True, False, True, True, True, True]])
    order = torch.arange(10, dtype=torch.float32)[None]
    assert regenerated(region, 0.3, order).nonzero()[:, 1].tolist() == [0, 1, 3]  # ceil(0.3 x 8) = 3, not 4
    assert regenerated(region, 0.0, order).sum() == 0 and torch.equal(regenerated(region, 1.0, order), region)


def test_token_editing_refuses_what_it_cannot_do(dirs, kind):
    pipe = ImageToImage.from_pretrained(dirs[kind])
    with pytest.raises(ValueError, match="token grid makes 16x16"):
        pipe("a dog", Image.new("RGB", (24, 24)))
    with pytest.raises(ValueError, match="strength"):
        pipe("a dog", picture(), strength=1.5)
    # the size of the grid may be given, and then the input is resized to it
    out = tokens(pipe, "a dog", Image.new("RGB", (24, 24)), height=SIZE, width=SIZE, seed=0)
    assert out.shape == (1, N)


def test_the_cli_edits_with_a_token_prior(dirs, tmp_path):
    picture().save(tmp_path / "in.png")
    top_half_mask().save(tmp_path / "mask.png")
    report = generate_main([str(dirs["maskgit"]), "a dog", "--init-image", str(tmp_path / "in.png"), "--mask",
                            str(tmp_path / "mask.png"), "-n", "2", "--seed", "0", "--no-progress",
                            "-o", str(tmp_path / "grid.png")])
    assert report["pipeline"] == "TokenInpaint" and report["strength"] == 1.0 and report["mask"].endswith("mask.png")
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * SIZE  # two images side by side


def test_a_class_prior_edits_by_class_name(tmp_path):
    """A class prior's prompts are its class names in editing as in generation."""
    autoencoder = Autoencoder.from_pretrained(make_tiny_autoencoder(tmp_path / "ae"))
    make_tiny_text_encoder(tmp_path / "text")
    config = PriorConfig(codebook_size=32, grid_size=GRID, condition="class", num_classes=2, width=32, depth=2,
                         heads=4)
    bundle = TokenPrior(autoencoder, shaken(GPT(config), 1), class_names=["circle", "square"])
    pipe = TokenInpaint(bundle)
    out = tokens(pipe, ["square"], picture(), top_half_mask(), seed=0)
    assert torch.equal(out[:, N // 2:], codes_of(pipe, picture())[:, N // 2:])
    with pytest.raises(ValueError, match="circle"):
        pipe(["hexagon"], picture(), top_half_mask())
