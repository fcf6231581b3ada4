from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from common.ema import EMA
from common.training import OptimConfig, StreamSampler, cosine_warmup, make_optimizer


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_stream_sampler_resumes_exactly_and_shards_disjointly():
    full = take(StreamSampler(10, seed=3), 27)
    assert sorted(full[:10]) == list(range(10)) and full[:10] != full[10:20]  # epochs reshuffle
    assert take(StreamSampler(10, seed=3, start=13), 14) == full[13:]
    rank0, rank1 = (take(StreamSampler(10, seed=3, rank=rank, world=2), 5) for rank in (0, 1))
    assert sorted(rank0 + rank1) == list(range(10))
    resumed = take(StreamSampler(10, seed=3, rank=1, world=2, start=7), 3)
    assert resumed == take(StreamSampler(10, seed=3, rank=1, world=2), 10)[7:]


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


def test_adamw_is_fused_on_cpu_and_updates_like_the_unfused_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4))
    reference = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4))
    reference.load_state_dict(model.state_dict())
    optim = OptimConfig(lr=1e-2, weight_decay=0.01, warmup_steps=0)
    opt, _ = make_optimizer(model.parameters(), optim)
    groups = [{"params": [reference[0].weight]}, {"params": list(reference.parameters())[1:], "weight_decay": 0.0}]
    grouped, _ = make_optimizer(groups, optim)  # parameter groups (the prior's form) are fused too
    assert opt.defaults["fused"] is True and grouped.defaults["fused"] is True
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=optim.betas, weight_decay=0.01)
    for _ in range(5):
        x = torch.randn(32, 8)
        for net, optimizer in ((model, opt), (reference, plain)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for fused, unfused in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)


def test_optimizer_steps_orders_schedulers_ema_and_bar_and_retries_a_skipped_update():
    """Each counted step: every scheduler (a gated one only where ``active(step)`` holds), then the EMA,
    then the bar; a non-finite update moves none of them and its step is tried again."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from common.training import Budget, NonFiniteSkips, RunConfig, optimizer_steps

    calls, seen, losses = [], [], iter([1.0, float("nan"), 1.0, 1.0])

    def update(batch: dict, step: int):
        seen.append(step)
        loss = torch.tensor(next(losses))
        return loss, bool(torch.isfinite(loss)), step

    def recorder(name: str):
        return lambda *args: calls.append(name)

    scheds = [SimpleNamespace(step=recorder("always")), (SimpleNamespace(step=recorder("gated")), lambda s: s >= 1)]
    try:
        accelerator = Accelerator(cpu=True)
        run = RunConfig(steps=3, progress=False, max_skipped_steps=1)
        out = list(optimizer_steps(accelerator, nn.Linear(1, 1), itertools.repeat({}), update, step=0,
                                   budget=Budget(run, accelerator), skips=NonFiniteSkips(run, accelerator),
                                   scheds=scheds, ema=SimpleNamespace(update=recorder("ema")),
                                   bar=SimpleNamespace(update=recorder("bar"))))
    finally:  # accelerate keeps its settings in process-wide singletons
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert [(step, extras) for step, _, extras in out] == [(1, 0), (2, 1), (3, 2)]
    assert seen == [0, 1, 1, 2], "the skipped update at step 1 is tried again at step 1"
    assert calls == ["always", "ema", "bar"] + ["always", "gated", "ema", "bar"] * 2


def test_a_stop_request_within_an_accumulation_finishes_the_optimizer_step_then_saves(tmp_path):
    """A signal during the first of two accumulated micro-steps: the second still runs, the optimizer
    steps, then the state is saved at that step and TrainingStopped ends the loop."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from common.run_control import STOP, TrainingStopped
    from common.training import Budget, NonFiniteSkips, RunConfig, optimizer_steps

    micro_steps = []

    def update(batch: dict, step: int):
        micro_steps.append(step)
        if len(micro_steps) == 3:  # the first micro-step of optimizer step 2
            STOP.reason = "SIGTERM"
        return torch.tensor(1.0), True, None

    noop = SimpleNamespace(update=lambda *args: None, close=lambda: None, step=lambda: None)
    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        run = RunConfig(steps=10, grad_accum=2, progress=False, out_dir=str(tmp_path))
        STOP.reason = None
        with pytest.raises(TrainingStopped, match="stopped by SIGTERM: saved step 2 to .*step_00000002"):
            for _ in optimizer_steps(accelerator, nn.Linear(1, 1), itertools.repeat({}), update, step=0,
                                     budget=Budget(run, accelerator), skips=NonFiniteSkips(run, accelerator),
                                     scheds=noop, ema=noop, bar=noop):
                pass
    finally:
        STOP.reason = None
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert micro_steps == [0, 0, 1, 1], "both micro-steps of step 2 ran"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"
