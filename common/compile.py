"""Compile a network with ``torch.compile`` where it pays: long training runs, and sampling on request.

Compiling costs minutes before the first step and buys a modest steady-state speed-up, so it only pays
on runs long enough to earn the compile time back. ``run.compile`` says what to do:

- ``true`` / ``false``: compile, or not (``true`` fails with the reason where inductor cannot run);
- ``auto`` (the default) compiles only when all of these hold:

  1. inductor can run here (on a CPU: a C++ compiler; on CUDA: triton), see :func:`inductor_problem`;
  2. ``run.steps >= MIN_STEPS``: a short run (every test, a smoke run) never compiles;
  3. compiling speeds training up on this device in this precision at all (:data:`ESTIMATES`);
  4. the run may last long enough: no time budget (``run.max_minutes`` 0, the step count decides), or a
     budget of at least :func:`break_even_minutes` = ``PAYBACK`` x compile time / (1 - 1 / speed-up),
     the eager time after which the saved time is ``PAYBACK`` times the compile time.

The speed-up and compile time are not known before compiling, so the rule uses the estimates in
:data:`ESTIMATES`, per device and precision, from ``python -m bench.compile_speed``: on a 2-core Xeon
with native bf16 (1 thread, batch 32) the emoji U-Net's training step ran 2.03x as fast in bf16 after
166 s of compiling but 0.80x (slower) in fp32, and the autoencoder's 1.06x in bf16 after 113 s (1.81x in
fp32). An
estimate is the least gain among the trained networks, so ``auto`` never compiles CPU training in fp32
and compiles bf16 CPU training only from about 67 minutes; every quick CPU config (5-20 minutes) trains eagerly.

A module class may set ``compile_eager = True`` to stay eager inside the compiled network (the VQ
quantizer does; ``autoencoder/quantizer.py`` says why). The module is compiled in place
(:meth:`torch.nn.Module.compile`), so it stays the same object with the same parameter names: checkpoints,
``state_dict`` and the EMA see no ``_orig_mod.`` prefix, and a resumed run may switch between compiled and
eager (the weights then match to float rounding, not bit for bit: a resume that must be exact keeps the setting).
"""
from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import nn

from common.config import ConfigError

CompileMode = Union[Literal["auto"], bool]
MIN_STEPS = 10_000
PAYBACK = 2.0


@dataclass(frozen=True)
class CompileEstimate:
    """What compiling a training step is expected to give on a kind of device, and where the figures come from."""

    speedup: float
    compile_seconds: float
    source: str


ESTIMATES = {  # (device type, precision) -> the least gain among the trained networks
    ("cpu", "bf16"): CompileEstimate(1.06, 113.0, "measured: the autoencoder's training step; the U-Net's 2.03x "
                                                  "after 166 s"),
    ("cpu", "fp32"): CompileEstimate(0.80, 143.0, "measured: the U-Net's training step ran slower compiled; the "
                                                  "autoencoder's 1.81x after 104 s"),
    # Not measured on this project's machines (no GPU lent): the usual range for convolutional U-Nets.
    ("cuda", "any"): CompileEstimate(1.3, 90.0, "assumed for a CUDA device"),
}


def estimate_for(device_type: str, precision: str) -> CompileEstimate:
    """The estimate for ``device_type`` and ``precision`` (a CPU in fp16 as in fp32; other devices as CUDA)."""
    if device_type == "cpu":
        return ESTIMATES[("cpu", "bf16" if precision == "bf16" else "fp32")]
    return ESTIMATES[("cuda", "any")]


class CompileError(ConfigError):
    """``run.compile: true`` where torch.compile cannot run."""


@dataclass(frozen=True)
class CompileChoice:
    """Whether a run compiles its network, and why (logged, and saved in ``environment.json``)."""

    compile: bool
    reason: str
    requested: str = "auto"

    def as_record(self) -> dict[str, object]:
        return {"requested": self.requested, "chosen": self.compile, "reason": self.reason}


def break_even_minutes(device_type: str, precision: str) -> float | None:
    """The eager run length (minutes) from which compiling saves ``PAYBACK`` times its compile time; None: never."""
    estimate = estimate_for(device_type, precision)
    if estimate.speedup <= 1:
        return None
    return PAYBACK * estimate.compile_seconds / (1 - 1 / estimate.speedup) / 60


@functools.lru_cache(maxsize=None)
def inductor_problem(device_type: str) -> str | None:
    """Why inductor (torch.compile's default backend) cannot run on ``device_type`` here; None when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version or platform"
    if device_type == "cpu":
        from torch._inductor import cpp_builder

        try:
            compiler = cpp_builder.get_cpp_compiler()
        except Exception as error:  # noqa: BLE001 - inductor raises its own types for a missing compiler
            return f"no C++ compiler for inductor on the CPU ({type(error).__name__}); install g++ or set CXX"
        return None if shutil.which(compiler) else f"the C++ compiler {compiler!r} is not on PATH"
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not installed (pip install triton)"
    return None


def resolve_compile(requested: CompileMode, device_type: str, steps: int, max_minutes: float,
                    precision: str = "fp32") -> CompileChoice:
    """Whether a run of ``steps`` steps and ``max_minutes`` budget on ``device_type`` in ``precision`` compiles
    (module docstring).

    Raises:
        CompileError: ``requested`` is True where inductor cannot run, or not one of auto / True / False.
    """
    requested = {"true": True, "false": False}.get(requested, requested) if isinstance(requested, str) else requested
    if requested != "auto" and not isinstance(requested, bool):
        raise CompileError(f"unknown compile setting {requested!r}; use auto, true or false")
    if requested is False:
        return CompileChoice(False, "run.compile is false", "false")
    if requested is True:
        problem = inductor_problem(device_type)
        if problem:
            raise CompileError(f"run.compile=true, but {problem}; fix that, or set run.compile=auto or false")
        return CompileChoice(True, "requested explicitly", "true")
    if steps < MIN_STEPS:
        return CompileChoice(False, f"a short run ({steps} steps < {MIN_STEPS}) would not earn back the compile time")
    needed, estimate = break_even_minutes(device_type, precision), estimate_for(device_type, precision)
    if needed is None:
        return CompileChoice(False, f"compiling does not speed up {precision} training on {device_type} "
                                    f"({estimate.speedup}x, {estimate.source})")
    if 0 < max_minutes < needed:
        return CompileChoice(False, f"a {max_minutes:g}-minute budget is under the {needed:.0f} minutes in which "
                                    f"compiling {precision} training on {device_type} ({estimate.speedup}x after "
                                    f"{estimate.compile_seconds:.0f} s, {estimate.source}) repays itself "
                                    f"{PAYBACK:g} times")
    problem = inductor_problem(device_type)  # last: it imports inductor, which a short run never needs
    if problem:
        return CompileChoice(False, f"the run is long enough to compile, but {problem}")
    length = f"{max_minutes:g} minutes" if max_minutes else "no time budget"
    return CompileChoice(True, f"a long run ({steps} steps, {length}) repays compiling {precision} on {device_type} "
                               f"(break-even x{PAYBACK:g}: {needed:.0f} minutes)")


def compile_in_place(module: nn.Module, **options: object) -> nn.Module:
    """Compile ``module``'s forward in place and return it (same object, same parameter names and state dict)."""
    # The autoencoder's adaptive GAN weight takes a gradient of the loss before its backward pass
    # (retain_graph=True), which AOTAutograd's donated buffers (a memory saving) refuse at run time. The
    # setting is process-wide, and read when the backward graph is compiled, lazily, at the first backward.
    torch._functorch.config.donated_buffer = False
    for part in module.modules():
        if getattr(type(part), "compile_eager", False):  # stays eager inside the compiled graph (it says why)
            part.forward = torch.compiler.disable(part.forward)
    module.compile(**options)
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module``'s calls go through ``torch.compile`` (:func:`compile_in_place`)."""
    return getattr(module, "_compiled_call_impl", None) is not None
