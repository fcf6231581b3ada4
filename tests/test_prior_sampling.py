"""The prior's one sampling path: filters, guidance batching, cache parity, determinism, pipeline, evaluation."""
from __future__ import annotations

import json

import pytest
import torch

from autoencoder.model import VQGAN, AutoencoderConfig
from autoencoder.quantizer import QuantizerConfig
from common.checkpoint import CheckpointError, find_pipeline_dir
from common.data.shapes import NUM_LABELS, ShapeSpec
from pipelines import TokensToImage
from prior import evaluate_shapes
from prior.sampling import SamplingConfig, draw, filter_logits, sample_tokens
from prior.text import TextEncoderConfig
from prior.token_prior import TRAIN_PRIOR, TokenPrior
from prior.transformer import GPT, Condition, PriorConfig

K, GRID = 32, 4
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_prior(condition: str = "class", grid: int = GRID, **changes) -> GPT:
    torch.manual_seed(0)
    options = dict(codebook_size=K, grid_size=grid, condition=condition, num_classes=5, text_dim=12, text_tokens=4,
                   width=32, depth=2, heads=4)
    config = PriorConfig(**{**options, **changes})
    return GPT(config).eval()


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def generate(bundle: TokenPrior, *args, seed: int = 0, **options) -> torch.Tensor:
    """Images in [0, 1] of the bundle through its pipeline."""
    return TokensToImage(bundle)(*args, seed=seed, progress=False, output_type="pt", **options).images


# ------------------------------------------------------------------------------------------ filters
def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(4, 50, generator=seeded())
    kept = filter_logits(logits, top_k=7).isfinite()
    assert (kept.sum(dim=-1) == 7).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(7).indices, True))
    assert filter_logits(logits, top_k=0).isfinite().all() and filter_logits(logits, top_k=999).isfinite().all()


@pytest.mark.parametrize("top_p, kept", [(0.5, 1), (0.79, 2), (0.8, 2), (0.81, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_the_minimal_nucleus(top_p, kept):
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05 (shuffled on purpose)
    filtered = filter_logits(probs.log()[None], top_p=top_p)[0]
    order = probs.argsort(descending=True)
    assert filtered.isfinite().sum() == kept
    assert filtered[order[:kept]].isfinite().all(), "the nucleus is made of the most likely codes"
    torch.testing.assert_close(filtered.softmax(-1)[order[:kept]], probs[order[:kept]] / probs[order[:kept]].sum())


def test_temperature_scales_logits_and_combines_with_filters():
    logits = torch.randn(3, 20, generator=seeded(1))
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits * 2)
    sharp = filter_logits(logits, temperature=0.01).softmax(-1)
    assert torch.equal(sharp.argmax(-1), logits.argmax(-1)) and (sharp.max(-1).values > 0.99).all()
    both = filter_logits(logits, temperature=2.0, top_k=5, top_p=0.5)
    assert (both.isfinite().sum(-1) <= 5).all() and (both.isfinite().sum(-1) >= 1).all()
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, temperature=0)


# ------------------------------------------------------------------------------------------ drawing
def test_draw_follows_the_probabilities_and_never_draws_filtered_codes():
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, float("-inf")]).expand(40000, -1)
    codes = draw(logits, seeded(0))
    assert codes.shape == (40000,) and codes.dtype == torch.long
    frequencies = torch.bincount(codes, minlength=5).float() / len(codes)
    torch.testing.assert_close(frequencies, logits[0].softmax(-1), atol=0.01, rtol=0)
    assert frequencies[4] == 0
    assert torch.equal(draw(logits[:50], seeded(1)), draw(logits[:50], seeded(1)))
    assert not torch.equal(draw(logits[:50], seeded(1)), draw(logits[:50], seeded(2)))
    torch.manual_seed(0)
    assert ((draw(logits[:1000]) >= 0) & (draw(logits[:1000]) < 4)).all(), "without a generator: the global RNG"
    for only in (0, 2, 5):
        single = torch.full((100, 6), float("-inf"))
        single[:, only] = 0.0
        assert (draw(single, seeded()) == only).all()


def test_draw_stays_on_a_code_with_probability_when_the_uniform_rounds_up(monkeypatch):
    """u * total can round to the total, past the last code with probability when filtered codes follow it."""
    logits = torch.tensor([[0.0, 1.0, float("-inf"), float("-inf")]] * 3)
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *size, **options: real_rand(*size, **options).fill_(1.0))
    assert draw(logits, seeded()).tolist() == [1, 1, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_a_cpu_generator_draws_the_same_codes_on_any_device():
    logits = torch.randn(64, K, generator=seeded(3))
    on_cpu = draw(logits, seeded(4))
    assert torch.equal(draw(logits.cuda(), seeded(4)).cpu(), on_cpu)
    model = tiny_prior()
    cond, uncond = model.prefix(Condition(labels=torch.tensor([0, 1]))), model.null_prefix(2)
    tokens = sample_tokens(model, cond, uncond, guidance=2.0, generator=seeded(7))
    model.cuda()
    cond, uncond = model.prefix(Condition(labels=torch.tensor([0, 1]).cuda())), model.null_prefix(2)
    on_gpu = sample_tokens(model, cond, uncond, guidance=2.0, generator=seeded(7))
    assert (on_gpu.cpu() == tokens).float().mean() > 0.9, "the same seed, the same tokens up to float rounding"


# ------------------------------------------------------------------------------------------ sampling
def rows_per_forward(model: GPT) -> tuple[list[int], object]:
    seen: list[int] = []
    handle = model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    return seen, handle


def test_guidance_runs_cond_and_uncond_in_one_batch_then_drops_uncond_rows():
    model = tiny_prior()
    cond = model.prefix(Condition(labels=torch.tensor([1, 2, 3])))
    seen, handle = rows_per_forward(model)
    tokens = sample_tokens(model, cond, model.null_prefix(3), guidance=3.0, guidance_tokens=4, generator=seeded())
    handle.remove()
    assert tokens.shape == (3, GRID * GRID)
    assert seen == [6] * 4 + [3] * (GRID * GRID - 4), "one forward per token; uncond rows dropped after 4 tokens"
    seen, handle = rows_per_forward(model)
    sample_tokens(model, cond, model.null_prefix(3), guidance=1.0, generator=seeded())
    handle.remove()
    assert seen == [3] * (GRID * GRID), "guidance 1 computes no unconditional rows"


def test_guided_logits_are_u_plus_s_times_c_minus_u():
    model = tiny_prior()
    cond, uncond = model.prefix(Condition(labels=torch.tensor([0, 4]))), model.null_prefix(2)
    empty = torch.zeros(2, 0, dtype=torch.long)
    c, u = model.logits(cond, empty)[:, -1], model.logits(uncond, empty)[:, -1]
    for scale in (0.0, 2.5, 6.0):
        first = sample_tokens(model, cond, uncond, guidance=scale, top_k=1, generator=seeded())[:, 0]
        assert torch.equal(first, (u + scale * (c - u)).argmax(-1))


@pytest.mark.parametrize("kind", ["class", "text"])
def test_cached_and_uncached_sampling_give_the_same_tokens(kind):
    model = tiny_prior(kind)
    if kind == "class":
        cond = model.prefix(Condition(labels=torch.tensor([0, 1, 2, 3])))
    else:
        mask = torch.arange(4)[None] < torch.tensor([[1], [2], [4], [3]])
        cond = model.prefix(Condition(states=torch.randn(4, 4, 12, generator=seeded()) * mask[..., None], mask=mask))
    uncond = model.null_prefix(4)
    options = dict(guidance=2.0, guidance_tokens=6, temperature=1.3, top_k=20, top_p=0.95)
    fast = sample_tokens(model, cond, uncond, generator=seeded(5), **options)
    slow = sample_tokens(model, cond, uncond, generator=seeded(5), use_cache=False, **options)
    assert torch.equal(fast, slow)


def test_the_generator_alone_decides_the_tokens():
    model = tiny_prior()
    cond, uncond = model.prefix(Condition(labels=torch.tensor([0, 1]))), model.null_prefix(2)
    torch.manual_seed(123)
    a = sample_tokens(model, cond, uncond, guidance=2.0, generator=seeded(7))
    torch.manual_seed(456)  # the global RNG plays no part
    b = sample_tokens(model, cond, uncond, guidance=2.0, generator=seeded(7))
    c = sample_tokens(model, cond, uncond, guidance=2.0, generator=seeded(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------ pipeline
def tiny_pipeline(condition: str = "class") -> TokenPrior:
    torch.manual_seed(0)
    autoencoder = VQGAN(AutoencoderConfig(resolution=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                          attn_resolutions=(), z_channels=16, code_dim=4,
                                          quantizer=QuantizerConfig(codebook_size=K))).eval()
    if condition == "class":
        prior = tiny_prior("class", grid=8, num_classes=NUM_LABELS)
        names = [ShapeSpec.from_label(label).caption for label in range(NUM_LABELS)]
        return TokenPrior(autoencoder, prior, class_names=names, sampling=SamplingConfig(guidance=2.0, top_k=10))
    prior = tiny_prior("text", grid=8, text_dim=384)
    return TokenPrior(autoencoder, prior, TextEncoderConfig(), sampling=SamplingConfig(guidance=2.0))


def test_pipeline_directory_round_trip(tmp_path):
    pipeline = tiny_pipeline("class")
    pipeline.save_pretrained(tmp_path / "pipe")
    meta = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    assert meta["kind"] == "tokens_to_image" and meta["format_version"] == 1 and meta["text_encoder"] is None
    assert meta["prior"]["sampling"]["top_k"] == 10 and len(meta["prior"]["class_names"]) == NUM_LABELS
    assert {p.name for p in (tmp_path / "pipe").iterdir()} == {"pipeline.json", "autoencoder", "prior"}
    loaded = TokenPrior.from_pretrained(tmp_path / "pipe")
    prompts = ["a small red circle at the top left", "a large blue square in the center"]
    images = generate(loaded, prompts, seed=3)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    torch.testing.assert_close(images, generate(pipeline, prompts, seed=3))
    labels = torch.tensor([ShapeSpec.from_label(0).label, 5])
    assert generate(loaded, class_labels=labels, guidance_scale=1.0).shape == (2, 3, 16, 16)
    meta["kind"] = "text_to_image"
    (tmp_path / "pipe" / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="tokens_to_image"):
        TokenPrior.from_pretrained(tmp_path / "pipe")


def test_decode_keeps_no_autograd_graph():
    pipeline = tiny_pipeline("class")
    assert all(p.requires_grad for p in pipeline.autoencoder.parameters())
    images = pipeline.decode(torch.randint(0, K, (2, 64), generator=seeded()))
    assert images.shape == (2, 3, 16, 16) and not images.requires_grad and images.grad_fn is None


def test_find_pipeline_takes_a_pipeline_or_run_directory(tmp_path):
    tiny_pipeline("class").save_pretrained(tmp_path / "run" / "pipeline")
    pipeline_dir = tmp_path / "run" / "pipeline"
    assert find_pipeline_dir(tmp_path / "run") == find_pipeline_dir(pipeline_dir) == pipeline_dir
    with pytest.raises(CheckpointError, match=r"prior is neither a pipeline directory nor a run directory with "
                                              r"pipeline/pipeline.json; train one with `accelerate launch "
                                              r"prior/train.py"):
        find_pipeline_dir(tmp_path / "run" / "pipeline" / "prior", TRAIN_PRIOR)
    with pytest.raises(CheckpointError, match=r"nowhere is neither .* \(it does not exist\); train one with"):
        find_pipeline_dir(tmp_path / "nowhere", TRAIN_PRIOR)


def test_text_pipeline_with_negative_prompts(tmp_path):
    pytest.importorskip("transformers")
    pipeline = tiny_pipeline("text")
    pipeline.save_pretrained(tmp_path / "pipe")
    loaded = TokenPrior.from_pretrained(tmp_path / "pipe")
    prompts = ["a small red circle at the top left", "a large green triangle at the bottom"]
    a = generate(loaded, prompts, negative_prompt=["", "a red square"], seed=1)
    b = generate(pipeline, prompts, negative_prompt=["", "a red square"], seed=1)
    torch.testing.assert_close(a, b)
    # "" as the negative prompt is the learned null condition, the default unconditional branch
    torch.testing.assert_close(generate(loaded, prompts, negative_prompt=["", ""], seed=2),
                               generate(loaded, prompts, seed=2))


def test_evaluate_cli_prints_a_guidance_sweep(tmp_path, capsys):
    tiny_pipeline("class").save_pretrained(tmp_path / "run" / "pipeline")
    report = evaluate_shapes.main([str(tmp_path / "run"), "--sweep", "0,2", "--prompts", "3", "--samples", "2",
                                   "--top-k", "5"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == report and [r["guidance"] for r in printed] == [0.0, 2.0]
    for result in printed:
        assert 0 <= result["accuracy"] <= 1 and result["prompts"] == 3 and result["samples_per_prompt"] == 2
        assert result["top_k"] == 5 and result["top_p"] == 1.0, "given options win, the others are the pipeline's"
        assert {"colour", "shape", "position", "size", "diversity", "seconds", "run_dir", "seed"} <= set(result)
    single = evaluate_shapes.main([str(tmp_path / "run" / "pipeline"), "--prompts", "2", "--samples", "1"])
    assert json.loads(capsys.readouterr().out)["guidance"] == 2.0 == single["guidance"], "the pipeline's default"


@pytest.mark.parametrize("arguments, words", [
    (["--sweep", "1,x"], "argument --sweep: expected a number, got 'x'"),
    (["--guidance", "inf"], "argument --guidance: must be a finite number, got 'inf'"),
    (["--samples", "0"], "argument --samples: must be >= 1, got 0"),
    (["--top-k", "-5"], "argument --top-k: must be >= 0, got -5"),
])
def test_evaluate_cli_refuses_bad_numbers_before_loading(arguments, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate_shapes.main([str(tmp_path / "nowhere"), *arguments])  # no pipeline: parse_args stops first
    assert exit.value.code == 2 and words in capsys.readouterr().err
