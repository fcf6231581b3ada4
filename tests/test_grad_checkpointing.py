"""Gradient checkpointing in the autoencoder and the transformer prior (the U-Net's is in test_unet.py).

Each model is built twice with the same weights, with and without ``gradient_checkpointing``; one
backward pass must give the same gradients, checkpoint must actually be called (non-reentrant) in
training mode, and never in eval mode or under ``no_grad``.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from autoencoder import Autoencoder, AutoencoderConfig, QuantizerConfig, build_autoencoder
from autoencoder.model import COMPONENT_KIND as AE_KIND
from common import layers
from common.checkpoint import CONFIG_FILE, load_component, save_component
from prior.transformer import COMPONENT_KIND as PRIOR_KIND
from prior.transformer import GPT, Condition, PriorConfig

AE = AutoencoderConfig(resolution=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(8,), z_channels=8, code_dim=4, dropout=0.1,
                       quantizer=QuantizerConfig(codebook_size=16, dead_code_threshold=0, kmeans_init=False))
PRIOR = PriorConfig(codebook_size=16, grid_size=3, condition="class", num_classes=3, width=32, depth=2, heads=2,
                    dropout=0.1)
# checkpointed blocks: encoder 16 px ResBlock, 8 px ResBlock + attention, mid ResBlock + attention + ResBlock;
# decoder mid 3, 8 px 2 x (ResBlock + attention), 16 px 2 ResBlocks
AE_CALLS = (1 + 2 + 3) + (3 + 4 + 2)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every torch.utils.checkpoint call made by the shared helper."""
    seen: list[dict] = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **k: seen.append(k) or real(*a, **k))
    return seen


def twins(build, config) -> tuple[nn.Module, nn.Module]:
    """The model without and with checkpointing, sharing random (not zero-initialised) weights."""
    torch.manual_seed(0)
    plain = build(config)
    checkpointed = build(dataclasses.replace(config, gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    return plain.train(), checkpointed.train()


def gradients(model: nn.Module, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both models: checkpointing replays the RNG state
    loss_fn(model).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(plain: nn.Module, checkpointed: nn.Module, loss_fn) -> None:
    expected, got = gradients(plain, loss_fn), gradients(checkpointed, loss_fn)
    assert expected.keys() == got.keys() and len(expected) > 10
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def ae_loss(model: nn.Module) -> torch.Tensor:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = model(x)
    return (out.recon - x).abs().mean() + (out.quantizer_loss if out.quantizer_loss is not None else out.kl)


def prior_loss(model: nn.Module) -> torch.Tensor:
    tokens = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(3))
    logits = model(tokens[:, :-1], Condition(labels=torch.tensor([0, 2])))
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_autoencoder_checkpointing_gives_the_same_gradients(kind, calls) -> None:
    plain, checkpointed = twins(build_autoencoder, dataclasses.replace(AE, kind=kind))
    assert_same_gradients(plain, checkpointed, ae_loss)
    # plain made no call; the checkpointed model wrapped every ResBlock and attention block once
    assert len(calls) == AE_CALLS and all(k == {"use_reentrant": False} for k in calls)


def test_prior_checkpointing_gives_the_same_gradients(calls) -> None:
    plain, checkpointed = twins(GPT, PRIOR)
    assert_same_gradients(plain, checkpointed, prior_loss)
    assert len(calls) == PRIOR.depth and all(k == {"use_reentrant": False} for k in calls)


@pytest.mark.parametrize("which", ["autoencoder", "prior"])
def test_flag_is_honoured_only_in_training_mode_with_gradients(which, calls) -> None:
    build, config, loss_fn = ((build_autoencoder, AE, ae_loss) if which == "autoencoder"
                              else (GPT, PRIOR, prior_loss))
    _, model = twins(build, config)
    model.eval()
    loss_fn(model).backward()  # eval mode: gradients flow, nothing is checkpointed
    model.train()
    with torch.no_grad():
        loss_fn(model)  # no backward pass to save memory for
    assert calls == []
    loss_fn(model)
    assert calls


def test_prior_decoding_with_a_cache_is_never_checkpointed(calls) -> None:
    _, model = twins(GPT, PRIOR)  # training mode on purpose: the cached path must still not replay
    cache = model.new_cache(2)
    logits = model.prefill(model.prefix(Condition(labels=torch.tensor([0, 1]))), cache)
    model.decode(logits.argmax(-1), 0, cache)
    assert calls == []


def test_components_saved_before_the_flag_load_with_it_off(tmp_path) -> None:
    for kind, model in ((AE_KIND, build_autoencoder(AE)), (PRIOR_KIND, GPT(PRIOR))):
        directory = save_component(tmp_path / kind, kind, model.config, model)
        meta = json.loads((directory / CONFIG_FILE).read_text())
        del meta["config"]["gradient_checkpointing"]  # as written before the field existed
        (directory / CONFIG_FILE).write_text(json.dumps(meta))
        config, _ = load_component(directory, kind, type(model.config))
        assert config == model.config and not config.gradient_checkpointing
    # a saved autoencoder can be fine-tuned with checkpointing switched on
    assert Autoencoder.from_pretrained(tmp_path / AE_KIND, gradient_checkpointing=True).decoder.gradient_checkpointing
