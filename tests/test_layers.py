from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.layers import Attention, Downsample, ResBlock, SpatialSelfAttention, Upsample, timestep_embedding


def naive_attention(module: Attention, x, context=None, mask=None, causal=False):
    source = x if context is None else context
    q, k, v = module.to_q(x), module.to_k(source), module.to_v(source)
    b, n, inner = q.shape
    h = module.heads
    q, k, v = (t.reshape(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(inner // h)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    if causal:
        scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, inner)
    return module.to_out(out)


def test_cross_attention_matches_naive_and_respects_padding():
    torch.manual_seed(0)
    attn = Attention(32, context_dim=16, heads=4)
    x, context = torch.randn(2, 6, 32), torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = attn(x, context, mask)
    torch.testing.assert_close(out, naive_attention(attn, x, context, mask), atol=1e-5, rtol=1e-5)
    # Changing padded tokens must not change the output.
    changed = context.clone()
    changed[0, 3:] = 100.0
    torch.testing.assert_close(attn(x, changed, mask), out)


def test_causal_self_attention_ignores_the_future():
    torch.manual_seed(0)
    attn = Attention(16, heads=2)
    x = torch.randn(1, 8, 16)
    out = attn(x, causal=True)
    torch.testing.assert_close(out, naive_attention(attn, x, causal=True), atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(1, 3, 16)
    torch.testing.assert_close(attn(x2, causal=True)[:, :5], out[:, :5])


def test_resblock_shapes_embedding_and_skip():
    block = ResBlock(8, 16, emb_dim=4)
    assert block(torch.randn(2, 8, 5, 5), torch.randn(2, 4)).shape == (2, 16, 5, 5)
    with pytest.raises(ValueError, match="embedding"):
        block(torch.randn(2, 8, 5, 5))
    same = ResBlock(8)
    assert isinstance(same.skip, torch.nn.Identity)


def test_spatial_attention_and_resampling_shapes():
    x = torch.randn(2, 8, 6, 6)
    assert SpatialSelfAttention(8)(x).shape == x.shape
    assert Downsample(8, asymmetric_padding=True)(x).shape == (2, 8, 3, 3)
    assert Downsample(8, 12)(x).shape == (2, 12, 3, 3)
    assert Upsample(8)(x).shape == (2, 8, 12, 12)


def test_layers_run_under_bf16_autocast():
    x = torch.randn(2, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = Upsample(8)(Downsample(8)(ResBlock(8, 8, emb_dim=4)(x, torch.randn(2, 4))))
        y = SpatialSelfAttention(8)(y)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 6)
    assert emb.shape == (2, 6)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    freqs = torch.exp(-math.log(10_000) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
    assert timestep_embedding(torch.tensor([1.0]), 7).shape == (1, 7)


def test_fully_masked_context_row_stays_finite():
    attn = Attention(8, context_dim=8, heads=2)
    out = attn(torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.tensor([[False] * 4, [True, False, False, False]]))
    assert torch.isfinite(out).all()


def test_short_reduced_precision_attention_runs_in_fp32_on_cpu():
    """attend() computes short bf16 attention on a CPU with the fp32 kernel (3-8x faster there, see
    common.layers) and returns bf16; long sequences keep the bf16 kernel."""
    from common.layers import FP32_ATTENTION_MAX, attend

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=generator).bfloat16() for _ in range(3))
    mask = torch.rand(2, 1, 1, 16, generator=generator) > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, mask)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference.bfloat16())
    long = int(FP32_ATTENTION_MAX ** 0.5) + 1
    q = torch.randn(1, 1, long, 8, generator=generator).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(attend(q, q, q, causal=True), F.scaled_dot_product_attention(q, q, q, is_causal=True))
