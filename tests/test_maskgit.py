"""MaskGIT: the masked-token training objective, the bidirectional model and the parallel sampler.

Each known pitfall of open implementations has a test that fails when it is reintroduced: an inverted
mask ratio (1 - cos), a loss on every token, re-sampled fixed tokens, a confidence sign error, and
top-k turning sampling into argmax.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prior.maskgit import MaskGIT, mask_tokens, masked_token_loss
from prior.maskgit_sampling import draw_uniforms, guided_logits, masked_counts, sample_maskgit
from prior.transformer import Condition, Prefix, PriorConfig

K, GRID = 16, 4
N = GRID * GRID
pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_maskgit(condition: str = "class", **changes) -> MaskGIT:
    torch.manual_seed(0)
    options = dict(codebook_size=K, grid_size=GRID, condition=condition, num_classes=3, text_dim=12, text_tokens=4,
                   width=32, depth=2, heads=4, kind="maskgit")
    return MaskGIT(PriorConfig(**{**options, **changes})).eval()


class FixedLogits:
    """A test double of the model: per-position logits (N, K) for conditional rows (first embedding
    value 1) and ``uncond`` for the others; it records every input it is given."""

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> None:
        self.config = PriorConfig(codebook_size=cond.shape[-1], grid_size=math.isqrt(cond.shape[0]))
        self.cond, self.uncond = cond, cond if uncond is None else uncond
        self.inputs: list[torch.Tensor] = []

    def logits(self, prefix: Prefix, idx: torch.Tensor) -> torch.Tensor:
        self.inputs.append(idx.clone())
        is_cond = prefix.embeddings[:, 0, 0] == 1
        return torch.where(is_cond[:, None, None], self.cond, self.uncond).expand(len(idx), -1, -1)


def prefixes(batch: int) -> tuple[Prefix, Prefix]:
    return Prefix(torch.ones(batch, 1, 1), None), Prefix(torch.zeros(batch, 1, 1), None)


# ------------------------------------------------------------------------------------------ training
def test_training_masks_a_cosine_fraction_not_one_minus_cosine():
    tokens = torch.randint(0, K, (4000, 64), generator=seeded())
    inputs, masked = mask_tokens(tokens, K, generator=seeded(1))
    fraction = masked.float().mean(dim=1)
    assert (masked.sum(dim=1) >= 1).all(), "every row masks at least one token"
    assert torch.equal(inputs[masked], torch.full_like(inputs[masked], K)) and torch.equal(inputs[~masked],
                                                                                         tokens[~masked])
    # fraction = cos(pi/2 u), u ~ U(0, 1): mean 2/pi = 0.64 and P(fraction > 1/2) = 2/3 (1 - cos: 0.36, 1/3)
    assert abs(fraction.mean().item() - 2 / math.pi) < 0.03
    assert abs((fraction > 0.5).float().mean().item() - 2 / 3) < 0.03


def test_loss_is_taken_on_masked_tokens_only():
    logits = torch.randn(2, N, K, generator=seeded(), requires_grad=True)
    targets = torch.randint(0, K, (2, N), generator=seeded(1))
    masked = torch.zeros(2, N, dtype=torch.bool)
    masked[0, :3], masked[1, 5:7] = True, True
    terms = masked_token_loss(logits, targets, masked)
    torch.testing.assert_close(terms.loss, F.cross_entropy(logits[masked], targets[masked]))
    terms.loss.backward()
    assert (logits.grad[~masked] == 0).all(), "visible tokens must not enter the loss"
    changed = logits.detach().clone()
    changed[~masked] = torch.randn_like(changed[~masked])
    torch.testing.assert_close(masked_token_loss(changed, targets, masked).loss, terms.loss.detach())


def test_model_is_bidirectional_and_honours_condition_dropout():
    model = tiny_maskgit()
    tokens = torch.randint(0, K, (2, N), generator=seeded())
    cond = Condition(labels=torch.tensor([0, 2]))
    logits = model(tokens, cond)
    assert logits.shape == (2, N, K)
    later = tokens.clone()
    later[:, -1] = (later[:, -1] + 1) % K
    assert not torch.allclose(model(later, cond)[:, 0], logits[:, 0]), "the first token must see the last one"
    dropped = model(tokens, cond, drop=torch.tensor([True, False]))
    torch.testing.assert_close(dropped[0], model.logits(model.null_prefix(1), tokens[:1])[0])
    torch.testing.assert_close(dropped[1], logits[1])


def test_text_padding_is_never_attended():
    model = tiny_maskgit("text")
    states = torch.randn(1, 4, 12, generator=seeded())
    mask = torch.tensor([[True, True, False, False]])
    tokens = torch.full((1, N), model.mask_id)
    other = states.clone()
    other[:, 2:] = torch.randn(1, 2, 12, generator=seeded(1))
    torch.testing.assert_close(model(tokens, Condition(states=states, mask=mask)),
                               model(tokens, Condition(states=other, mask=mask)))


# ------------------------------------------------------------------------------------------ sampling
def test_masked_counts_follow_the_cosine_schedule_per_step():
    model = FixedLogits(torch.zeros(N, K))
    sample_maskgit(model, prefixes(2)[0], steps=4, generator=seeded())
    # floor(16 cos(pi/2 * t/4)) for t = 0..3: 16, 14.78, 11.31, 6.12
    assert [int((idx == K).sum(dim=1)[0]) for idx in model.inputs] == [16, 14, 11, 6]
    assert masked_counts(torch.tensor([16, 5, 0]), 4).tolist() == [[14, 4, 0], [11, 3, 0], [6, 1, 0], [0, 0, 0]]
    counts = masked_counts(torch.tensor([64]), 10)[:, 0]
    assert counts.tolist() == [int(64 * math.cos(math.pi / 2 * (t + 1) / 10)) for t in range(9)] + [0]


def test_fixed_tokens_never_change_and_are_never_masked():
    prefer = torch.full((N, K), -5.0)
    prefer[:, 3] = 5.0  # the model wants code 3 everywhere
    model = FixedLogits(prefer)
    given = torch.randint(4, K, (2, N), generator=seeded())
    fixed = torch.rand(2, N, generator=seeded(1)) < 0.5
    out = sample_maskgit(model, prefixes(2)[0], steps=5, given=given, fixed=fixed, generator=seeded())
    assert torch.equal(out[fixed], given[fixed])
    assert (out[~fixed] == 3).all() and (out < K).all()
    for idx in model.inputs:
        assert torch.equal(idx[fixed], given[fixed]), "a fixed token was re-masked or re-sampled"
    # the schedule runs over the free tokens of each row
    assert (model.inputs[0] == K).sum(dim=1).tolist() == (~fixed).sum(dim=1).tolist()


def test_same_generator_same_tokens():
    model = tiny_maskgit()
    cond, uncond = model.prefix(Condition(labels=torch.tensor([0, 1, 2]))), model.null_prefix(3)
    first = sample_maskgit(model, cond, uncond, guidance=2.0, top_k=8, generator=seeded(7))
    again = sample_maskgit(model, cond, uncond, guidance=2.0, top_k=8, generator=seeded(7))
    other = sample_maskgit(model, cond, uncond, guidance=2.0, top_k=8, generator=seeded(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (3, N) and ((first >= 0) & (first < K)).all()
    # the uniforms are drawn per image: the first row alone draws the same tokens
    uniforms = draw_uniforms(10, 3, N, seeded(7))
    alone = sample_maskgit(model, cond.rows(1), uncond.rows(1), guidance=2.0, top_k=8, uniforms=uniforms[:, :, :1])
    assert torch.equal(alone[0], first[0])


def test_cfg_is_uncond_plus_scale_times_difference_in_one_batch():
    c = torch.tensor([[1.0, 1.2, -3.0]])
    u = torch.tensor([[0.0, 1.5, 2.0]])
    torch.testing.assert_close(guided_logits(torch.cat([c, u]), 1, 3.0), torch.tensor([[3.0, 0.6, -13.0]]))
    torch.testing.assert_close(guided_logits(c, 1, 3.0), c)  # unguided rows pass through
    model = FixedLogits(c.expand(N, -1), u.expand(N, -1))
    cond, uncond = prefixes(2)
    guided = sample_maskgit(model, cond, uncond, guidance=3.0, steps=3, top_k=1, generator=seeded())
    assert (guided == 0).all(), "u + 3 (c - u) prefers code 0 (3.0 > 0.6)"
    assert all(len(idx) == 4 for idx in model.inputs) and len(model.inputs) == 3, "one [cond; uncond] batch a step"
    plain = sample_maskgit(FixedLogits(c.expand(N, -1), u.expand(N, -1)), cond, uncond, guidance=1.0, top_k=1)
    assert (plain == 1).all(), "without guidance the conditional logits prefer code 1"


def test_top_k_still_samples_within_the_k_best():
    logits = torch.linspace(1.0, 0.0, K).expand(N, -1)  # code 0 the most likely, all close
    out = sample_maskgit(FixedLogits(logits), prefixes(8)[0], steps=2, top_k=4, generator=seeded())
    assert (out < 4).all(), "only the 4 best codes may be drawn"
    assert len(out.unique()) == 4, "top-k must sample among the k codes, not take the argmax"


def test_the_most_confident_tokens_are_kept():
    # position i is uniform over ``width[i]`` codes: every draw there has log-probability -log(width[i])
    width = torch.tensor([1, 8, 2, 16, 4, 12, 3, 6, 5, 9, 7, 10, 11, 13, 14, 15])
    logits = torch.where(torch.arange(K)[None] < width[:, None], 0.0, -math.inf)
    model = FixedLogits(logits)
    sample_maskgit(model, prefixes(1)[0], steps=2, choice_temperature=0.0, generator=seeded())
    kept = model.inputs[1][0] != K  # decided at step 0: N - floor(16 cos(pi/4)) = 5 tokens
    assert torch.equal(kept, width <= 5), "higher log-probability must be kept, not re-masked"
