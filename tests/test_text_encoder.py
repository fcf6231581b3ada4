from __future__ import annotations

import logging
import socket

import pytest
import torch

from common.text_encoder import TextEmbedding, TextEncoder, TextEncoderConfig, bundled_model_dir

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    """The default encoder, loaded once, offline, with every network connection refused."""
    def refuse(*args, **kwargs):
        raise OSError("network access during the text encoder load")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", refuse)
        return TextEncoder(TextEncoderConfig())


def test_loads_the_bundled_minilm(encoder: TextEncoder) -> None:
    assert (bundled_model_dir() / "model.safetensors").is_file()
    assert encoder.width == 384
    assert encoder.max_length == 256  # the length all-MiniLM-L6-v2 was trained with
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training  # frozen: dropout never switches on


def test_shapes_mask_empty_and_non_ascii_prompts(encoder: TextEncoder) -> None:
    prompts = ["", "a small red circle at the top left", "un chien rouge à Zürich, 日本の犬 🐶"]
    text = encoder.encode(prompts)
    assert isinstance(text, TextEmbedding)
    length = int(text.mask.sum(1).max())
    assert text.states.shape == (3, length, 384) and text.states.dtype == torch.float32
    assert text.mask.dtype == torch.bool and text.mask.shape == (3, length)
    assert text.mask[0].sum() == 2  # "" is [CLS] [SEP]: the null condition
    assert text.mask[:, 0].all() and torch.isfinite(text.states).all()
    assert torch.count_nonzero(text.states[~text.mask]) == 0  # padding positions hold zeros
    assert not text.states.requires_grad
    with pytest.raises(TypeError, match="list"):
        encoder.encode("a dog")


def test_padding_does_not_change_real_tokens(encoder: TextEncoder) -> None:
    alone = encoder.encode(["a red apple"])
    batched = encoder.encode(["a red apple", "a very large blue square in the bottom right corner of the image"])
    length = alone.states.shape[1]
    assert batched.states.shape[1] > length
    torch.testing.assert_close(batched.states[0, :length], alone.states[0], atol=1e-5, rtol=0)
    assert not batched.mask[0, length:].any()


def test_long_prompts_are_truncated_with_one_warning(encoder: TextEncoder, caplog) -> None:
    prompts = ["word " * 300, "word " * 400, "short"]  # 302 and 402 tokens with [CLS]/[SEP]
    with caplog.at_level(logging.WARNING, logger="common.text_encoder"):
        text = encoder.encode(prompts)
    warnings = [r for r in caplog.records if r.name == "common.text_encoder"]
    assert len(warnings) == 1
    assert "2 of 3 prompts" in warnings[0].getMessage() and "192 tokens dropped" in warnings[0].getMessage()
    assert text.states.shape[1] == encoder.max_length
