"""Which floating-point precision to train and sample in, chosen by what the hardware runs fast.

bf16 is only a win where the hardware computes it natively: a CPU with AVX512_BF16 or AMX (or an
Arm CPU with BF16 instructions), or a CUDA device with bf16 support. Elsewhere PyTorch emulates it,
and a bf16 step is several times *slower* than fp32 (measured on an AVX-512 Xeon without AVX512_BF16:
matmul 4.7x, a 3x3 conv forward + backward 2.8x), so ``auto`` must never assume it.

``auto`` resolves as follows:

- CUDA: bf16 where ``torch.cuda.is_bf16_supported()``, else fp16 (accelerate adds loss scaling);
- CPU: fp32 unless the CPU advertises native bf16 instructions *and* a short measured probe (a conv
  forward + backward under bf16 autocast against fp32 on one thread, under a second, cached per
  CPU model, torch version and ``ONEDNN_MAX_CPU_ISA``) shows bf16 faster; the flags alone are not
  trusted because oneDNN may still pick an emulated kernel on some builds (or when capped by that variable);
- anything else (MPS, XPU): fp32, the precision every backend runs correctly.

An explicit ``bf16``/``fp32``/``fp16`` is obeyed, with a warning when bf16 would be emulated, and
fp16 on a CPU is refused (CPU autocast has no fp16 loss scaling).
"""
from __future__ import annotations

import functools
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from common.config import ConfigError
from common.environment import cpu_model

Precision = Literal["auto", "fp32", "bf16", "fp16", "no"]
CHOICES = ("fp32", "bf16", "fp16")
# A CPU's bf16 must be faster than fp32 in the probe. Emulated bf16 runs this conv 2.8x slower
# (0.36x); native measured 1.2-2.1x on an AMD EPYC with AVX512_BF16 (the low end with both cores
# busy with other work), so the line at 1.0 leaves a wide margin on both sides.
MIN_BF16_SPEEDUP = 1.0
_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class PrecisionError(ConfigError):
    """A precision the device cannot train in."""


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved precision and why it was chosen.

    Attributes:
        precision: "fp32", "bf16" or "fp16".
        reason: one sentence for the log and the run record.
        requested: what the config asked for ("auto" or an explicit precision).
    """

    precision: str
    reason: str
    requested: str = "auto"

    @property
    def accelerate_name(self) -> str:
        """accelerate's ``mixed_precision`` value."""
        return "no" if self.precision == "fp32" else self.precision

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for plain fp32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def as_record(self) -> dict[str, str]:
        return {"requested": self.requested, "chosen": self.precision, "reason": self.reason}


def canonical(precision: str) -> str:
    """accelerate's "no" and our "fp32" name the same thing; "auto" stays "auto"."""
    return "fp32" if precision == "no" else precision


def cpu_description() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, the native-bf16 feature flags it advertises), from /proc/cpuinfo on Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 / Arm spelling
            flags.update(value.split())
    native = [f for f in _X86_BF16_FLAGS if f in flags]
    if "bf16" in flags:  # Arm: FEAT_BF16
        native.append("bf16")
    return cpu_model(), tuple(native)


def _cache_file() -> Path:
    root = os.environ.get("LATENTGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "latentgen")
    return Path(root) / "precision_probe.json"


def _fastest_times(steps, repeats: int = 7) -> list[float]:
    """The fastest of ``repeats`` timed calls of each function in ``steps``, taken in turns so that a
    burst of load from other processes hits both alike; the minimum is the least disturbed reading."""
    for step in steps:
        step()  # warm-up: first calls pick kernels and allocate
    best = [float("inf")] * len(steps)
    for _ in range(repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


# The first call may come from inside a pipeline's no_grad (or a caller's inference_mode, whose tensors
# cannot take part in autograd): a fresh machine's first image must not need a training run before it.
@torch.inference_mode(False)
@torch.enable_grad()
def measure_cpu_bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of a small conv forward + backward on the CPU (> 1: bf16 faster).

    A 3x3 conv 64->64 on 8x64x32x32 is the shape of the quick configs' work, so the probe measures
    the kernels training will use rather than a matmul alone.
    """
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(8, 64, 32, 32, generator=generator)

    def step(dtype: torch.dtype | None) -> None:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = conv(x)
        out.float().square().mean().backward()
        conv.zero_grad(set_to_none=True)

    # One thread: whether the kernels are native does not depend on the thread count, and a parallel
    # region waits for its slowest thread, so with other processes busy a multi-thread reading swings
    # between 0.6x and 7x where the one-thread reading stays within a few per cent.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32, bf16 = _fastest_times([lambda: step(None), lambda: step(torch.bfloat16)])
    finally:
        torch.set_num_threads(threads)
    return fp32 / bf16


def cpu_bf16_speedup() -> float:
    """:func:`measure_cpu_bf16_speedup`, cached on disk per CPU model, torch version and oneDNN ISA cap."""
    model, flags = cpu_description()
    key = f"{model}|{','.join(flags)}|torch={torch.__version__}"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if isa:  # a capped oneDNN (e.g. AVX512_CORE) emulates bf16 on a native CPU: a different machine to the probe
        key += f"|ONEDNN_MAX_CPU_ISA={isa}"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), (int, float)):
        return float(cache[key])
    speedup = measure_cpu_bf16_speedup()
    try:  # best effort: a read-only home only costs the probe again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**cache, key: speedup}, indent=1))
    except OSError:
        pass
    return speedup


def _cpu_choice(requested: str) -> PrecisionChoice:
    model, flags = cpu_description()
    if not flags:
        return PrecisionChoice("fp32", f"the CPU ({model}) has no native bf16 instructions (no AVX512_BF16/AMX), "
                                       f"so bf16 would be emulated and slower than fp32", requested)
    speedup = cpu_bf16_speedup()
    if speedup >= MIN_BF16_SPEEDUP:
        return PrecisionChoice("bf16", f"the CPU ({model}) has native bf16 ({', '.join(flags)}); measured bf16 "
                                       f"{speedup:.2f}x as fast as fp32", requested)
    return PrecisionChoice("fp32", f"the CPU ({model}) advertises {', '.join(flags)} but bf16 measured only "
                                   f"{speedup:.2f}x as fast as fp32 (needs {MIN_BF16_SPEEDUP}x)", requested)


def _auto(device: torch.device) -> PrecisionChoice:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", f"the CUDA device ({name}) supports bf16")
        return PrecisionChoice("fp16", f"the CUDA device ({name}) has no bf16: fp16 with loss scaling")
    if device.type == "cpu":
        return _cpu_choice("auto")
    return PrecisionChoice("fp32", f"{device.type} device: fp32 (no mixed precision chosen automatically)")


@functools.lru_cache(maxsize=None)
def _resolve(requested: str, device_type: str, device_index: int | None) -> PrecisionChoice:
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    if requested == "auto":
        return _auto(device)
    if requested == "fp16" and device.type == "cpu":
        raise PrecisionError("precision fp16 needs a CUDA device (CPU autocast has no fp16 loss scaling); "
                             "use auto, bf16 or fp32")
    model, native = cpu_description()
    if requested == "bf16" and device.type == "cpu" and not native:
        warnings.warn(f"precision bf16 was requested, but this CPU ({model}) has no native bf16 "
                      f"(AVX512_BF16/AMX): it is emulated and runs several times slower than fp32. Use precision "
                      f"auto (or fp32) on this machine.", RuntimeWarning, stacklevel=4)
    return PrecisionChoice(requested, "requested explicitly", requested)


def resolve_precision(requested: str, device: torch.device | str) -> PrecisionChoice:
    """The precision to run in on ``device`` for the config value ``requested`` (see the module docstring).

    Raises:
        PrecisionError: an unknown name, or fp16 on a CPU.
    """
    device = torch.device(device)
    return _resolve(check_name(requested), device.type, device.index)


def check_name(requested: str) -> str:
    """``requested`` in canonical form ("no" -> "fp32").

    Raises:
        PrecisionError: not one of auto, fp32 (or no), bf16, fp16.
    """
    if canonical(requested) not in ("auto", *CHOICES):
        raise PrecisionError(f"unknown precision {requested!r}; use one of auto, fp32, bf16, fp16")
    return canonical(requested)


def clear_cache() -> None:
    """Forget in-process decisions (tests that fake another machine call this)."""
    _resolve.cache_clear()
