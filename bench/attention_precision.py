"""Attention forward + backward on a CPU: PyTorch's bf16 kernel against the same bf16 inputs computed in fp32.

    python -m bench.attention_precision [--threads 2] [--repeats 10]

Why ``common.layers.attend`` runs short reduced-precision attention in fp32 on a CPU: for each shape
(batch, heads, query length, key length, head width), the median milliseconds of one forward + backward
under bf16 autocast with the default kernel, with the math kernel, and with the inputs upcast to fp32.
The shapes are those of the emoji demo's U-Net (16 tokens, 8 text tokens), its token priors (80) and
larger grids (256, 1024).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = ((64, 4, 16, 16, 32), (64, 4, 16, 8, 32), (64, 4, 64, 64, 32), (64, 4, 80, 80, 32), (16, 8, 256, 256, 64),
          (4, 8, 1024, 1024, 64))


def forward_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if mode == "bf16 kernel":
            out = F.scaled_dot_product_attention(q, k, v)
        elif mode == "bf16 math kernel":
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    out.float().sum().backward()


def median_ms(shape: tuple[int, ...], mode: str, repeats: int) -> float:
    batch, heads, queries, keys, width = shape
    q = torch.randn(batch, heads, queries, width).bfloat16().requires_grad_()
    k, v = (torch.randn(batch, heads, keys, width).bfloat16().requires_grad_() for _ in range(2))
    for _ in range(2):
        forward_backward(q, k, v, mode)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward_backward(q, k, v, mode)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for shape in SHAPES:
        row = {"shape": "x".join(map(str, shape)), **{mode: round(median_ms(shape, mode, args.repeats), 2)
                                                       for mode in ("bf16 kernel", "bf16 math kernel", "fp32")}}
        row["bf16 kernel / fp32"] = round(row["bf16 kernel"] / row["fp32"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
