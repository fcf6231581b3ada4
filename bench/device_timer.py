"""The one wall-clock timer of the benchmarks: a CUDA device runs asynchronously, so the clock starts and
stops only once the device has finished its queued work."""
from __future__ import annotations

import time
from typing import Callable

import torch


def seconds(fn: Callable[[], object], device: torch.device | str) -> float:
    """Wall-clock seconds of one ``fn()`` call on ``device``, its CUDA work included."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start
