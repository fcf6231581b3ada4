"""The token prior's transformer (causality, cache parity, padding invariance, condition handling)
and its pkeep input corruption."""
from __future__ import annotations

import pytest
import torch

from common.config import ConfigError, from_dict
from prior.losses import LossConfig, corrupt_tokens
from prior.transformer import GPT, Condition, PriorConfig, parameter_groups

K, GRID, CLASSES, TEXT_DIM, SLOTS = 32, 4, 5, 12, 5
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(condition: str, **changes) -> GPT:
    torch.manual_seed(0)
    config = PriorConfig(codebook_size=K, grid_size=GRID, condition=condition, num_classes=CLASSES,
                         text_dim=TEXT_DIM, text_tokens=SLOTS, width=32, depth=2, heads=4, **changes)
    return GPT(config).eval()


def condition(kind: str, batch: int = 3) -> Condition:
    generator = torch.Generator().manual_seed(1)
    if kind == "class":
        return Condition(labels=torch.arange(batch) % CLASSES)
    if kind == "text":
        lengths = torch.tensor([3, 5, 1, 2])[:batch]
        mask = torch.arange(SLOTS)[None, :] < lengths[:, None]
        return Condition(states=torch.randn(batch, SLOTS, TEXT_DIM, generator=generator) * mask[..., None], mask=mask)
    return Condition()


def cached_logits(model: GPT, cond: Condition, idx: torch.Tensor) -> torch.Tensor:
    """Logits of every token through prefill + one-token decode steps: (B, T + 1, K)."""
    cache = model.new_cache(idx.shape[0])
    steps = [model.prefill(model.prefix(cond, batch=idx.shape[0]), cache)]
    steps += [model.decode(idx[:, i], i, cache) for i in range(idx.shape[1])]
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("kind", ["class", "text", "none"])
def test_changing_token_t_leaves_earlier_logits_unchanged(kind):
    model = tiny(kind)
    idx = torch.randint(0, K, (3, GRID * GRID - 1), generator=torch.Generator().manual_seed(2))
    logits = model(idx, condition(kind))
    assert logits.shape == (3, GRID * GRID, K)
    for t in (0, 5, idx.shape[1] - 1):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % K
        other = model(changed, condition(kind))
        # logits[:, s] predicts token s from tokens < s: positions 0..t never see token t
        torch.testing.assert_close(other[:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-6)
        assert (other[:, t + 1:] - logits[:, t + 1:]).abs().max() > 1e-4, "later positions must see token t"


@pytest.mark.parametrize("kind", ["class", "text", "none"])
def test_cached_logits_match_full_recomputation(kind):
    model = tiny(kind)
    idx = torch.randint(0, K, (3, GRID * GRID - 1), generator=torch.Generator().manual_seed(3))
    full = model(idx, condition(kind))
    cached = cached_logits(model, condition(kind), idx)
    assert (full - cached).abs().max() <= 1e-5


def test_text_padding_slots_do_not_affect_outputs():
    model = tiny("text")
    cond = condition("text")
    idx = torch.randint(0, K, (3, 7))
    noisy = cond.states + 5.0 * torch.randn_like(cond.states) * ~cond.mask[..., None]  # garbage at padding only
    torch.testing.assert_close(model(idx, cond._replace(states=noisy)), model(idx, cond), rtol=0, atol=1e-6)
    torch.testing.assert_close(cached_logits(model, cond._replace(states=noisy), idx), cached_logits(model, cond, idx),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["class", "text"])
def test_dropped_rows_get_the_learned_null_condition(kind):
    model = tiny(kind)
    idx = torch.randint(0, K, (3, 6))
    drop = torch.tensor([True, False, True])
    dropped = model(idx, condition(kind), drop)
    null = model.logits(model.null_prefix(3), idx)
    torch.testing.assert_close(dropped[drop], null[drop])
    torch.testing.assert_close(dropped[~drop], model(idx, condition(kind))[~drop])
    assert (dropped[0] - model(idx, condition(kind))[0]).abs().max() > 1e-4
    null_params = model.null_text if kind == "text" else model.class_embedding.weight
    dropped.sum().backward()
    assert null_params.grad is not None and null_params.grad.abs().sum() > 0, "the null condition is learned"


def test_config_validation_and_limits():
    with pytest.raises(ConfigError, match="codebook_size"):
        GPT(PriorConfig(grid_size=4, condition="none"))
    with pytest.raises(ConfigError, match="divisible"):
        GPT(PriorConfig(codebook_size=8, grid_size=2, condition="none", width=30, heads=4))
    model = tiny("class")
    with pytest.raises(ValueError, match="N - 1"):
        model(torch.zeros(1, GRID * GRID, dtype=torch.long), Condition(labels=torch.tensor([0])))
    assert model.config.max_len == 1 + GRID * GRID - 1 and tiny("text").config.prefix_len == SLOTS + 1


def test_parameter_groups_cover_every_parameter_once():
    model = tiny("text")
    groups = parameter_groups(model, 0.1)
    ids = [id(p) for group in groups for p in group["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert {id(model.null_text), id(model.text_start)} <= {id(p) for p in groups[1]["params"]}


def random_tokens(codebook_size: int, shape=(64, 256)) -> torch.Tensor:
    return torch.randint(0, codebook_size, shape, generator=torch.Generator().manual_seed(4))


def test_pkeep_one_turns_corruption_off():
    tokens = random_tokens(K)
    assert torch.equal(corrupt_tokens(tokens, 1.0, K), tokens)


@pytest.mark.parametrize("pkeep", [0.0, 0.5, 0.9])
def test_pkeep_replaces_that_fraction_by_other_valid_codes(pkeep):
    codes = 4  # a small codebook: a replacement drawn among all codes would often be the token itself
    tokens = random_tokens(codes)
    torch.manual_seed(0)  # training draws from the global RNG
    corrupted = corrupt_tokens(tokens, pkeep, codes)
    assert corrupted.shape == tokens.shape and corrupted.dtype == tokens.dtype
    assert corrupted.min() >= 0 and corrupted.max() < codes
    changed = (corrupted != tokens).float().mean().item()
    assert changed == pytest.approx(1 - pkeep, abs=0.015)  # 16384 tokens: the standard error is < 0.004


def test_replacement_codes_are_uniform_over_the_other_codes():
    tokens = torch.full((64, 256), 2)
    torch.manual_seed(0)
    counts = torch.bincount(corrupt_tokens(tokens, 0.0, 5).flatten(), minlength=5)
    assert counts[2] == 0 and counts.sum() == tokens.numel()
    others = counts[[0, 1, 3, 4]].float() / tokens.numel()
    assert torch.allclose(others, torch.full((4,), 0.25), atol=0.02)


def test_corruption_is_reproducible_with_a_generator():
    tokens = random_tokens(K)
    first, second = (corrupt_tokens(tokens, 0.5, K, torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(first, second) and not torch.equal(first, tokens)


def test_loss_config_rejects_probabilities_outside_zero_one():
    assert from_dict(LossConfig, {"pkeep": 0.8}).pkeep == 0.8
    for bad in ({"pkeep": 1.5}, {"pkeep": -0.1}, {"cond_drop": 2.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            from_dict(LossConfig, bad)


def test_pooled_text_slot_holds_the_prompts_masked_mean():
    """pooled_text adds one prefix slot: the projected masked mean of the prompt's states, blind to padding,
    masked out in the null condition, and kept by the cache like every other slot."""
    model = tiny("text", pooled_text=True)
    assert model.config.prefix_len == SLOTS + 2
    cond = condition("text")
    prefix = model.prefix(cond)
    weights = cond.mask[..., None].float()
    expected = model.pooled_proj((cond.states * weights).sum(dim=1) / weights.sum(dim=1))
    torch.testing.assert_close(prefix.embeddings[:, SLOTS], expected)
    assert prefix.valid[:, SLOTS].all() and not model.null_prefix(3).valid[:, SLOTS].any()
    idx = torch.randint(0, K, (3, 7), generator=torch.Generator().manual_seed(4))
    noisy = cond.states + 5.0 * torch.randn_like(cond.states) * ~cond.mask[..., None]
    torch.testing.assert_close(model(idx, cond._replace(states=noisy)), model(idx, cond), rtol=0, atol=1e-6)
    assert (model(idx, cond) - cached_logits(model, cond, idx)).abs().max() <= 1e-5
    drop = torch.tensor([True, False, True])
    torch.testing.assert_close(model(idx, cond, drop)[drop], model.logits(model.null_prefix(3), idx)[drop])
    with pytest.raises(ConfigError, match="pooled_text needs condition 'text'"):
        tiny("class", pooled_text=True)
