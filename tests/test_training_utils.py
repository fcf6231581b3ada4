from __future__ import annotations

import itertools

import torch
from torch import nn

from common.ema import EMA
from common.training import StreamSampler, cosine_warmup


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_stream_sampler_resumes_exactly_and_shards_disjointly():
    full = take(StreamSampler(10, seed=3), 27)
    assert sorted(full[:10]) == list(range(10)) and full[:10] != full[10:20]  # epochs reshuffle
    assert take(StreamSampler(10, seed=3, start=13), 14) == full[13:]
    rank0, rank1 = take(StreamSampler(10, seed=3, rank=0, world=2), 5), take(StreamSampler(10, seed=3, rank=1, world=2), 5)
    assert sorted(rank0 + rank1) == list(range(10))
    assert take(StreamSampler(10, seed=3, rank=1, world=2, start=7), 3) == take(StreamSampler(10, seed=3, rank=1, world=2), 10)[7:]


def test_ema_tracks_with_warmup_and_round_trips():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # effective decay min(0.9, 2/11): mostly the new weights
    assert torch.allclose(ema.shadow.weight, torch.ones(2, 2), atol=0.5)
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.shadow.weight, torch.ones(2, 2), atol=1e-6)
    clone = EMA(nn.Linear(2, 2), decay=0.5)
    clone.load_state_dict(ema.state_dict())
    assert clone.updates == 201 and clone.decay == 0.9 and torch.equal(clone.shadow.weight, ema.shadow.weight)
    assert not any(p.requires_grad for p in ema.shadow.parameters())


def test_cosine_warmup_shape():
    assert cosine_warmup(0, 10, 100) == 0.1 and cosine_warmup(9, 10, 100) == 1.0
    assert abs(cosine_warmup(100, 10, 100) - 0.1) < 1e-9
    assert cosine_warmup(5000, 10, 0) == 1.0  # no decay configured
