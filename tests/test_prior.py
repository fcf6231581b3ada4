"""The token prior's transformer: causality, cache parity, padding invariance, condition handling."""
from __future__ import annotations

import pytest
import torch

from common.config import ConfigError
from prior.transformer import GPT, Condition, PriorConfig, parameter_groups

K, GRID, CLASSES, TEXT_DIM, SLOTS = 32, 4, 5, 12, 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not stall on a busy machine's thread barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
