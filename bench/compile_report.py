"""The "Compilation" section of ``docs/BENCHMARKS.md``: renders the JSON of :mod:`bench.compile_speed` (run apart:
each first compile takes minutes on a CPU), and states the rule ``run.compile: auto`` follows."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.markdown import code, measured_apart, seconds, table
from common.compile import MIN_STEPS, PAYBACK, break_even_minutes, estimate_for

COMMAND = "python -m bench.compile_speed --precision fp32,bf16 --out {}"


def section(report: Any, path: Path) -> None:
    """Append the section to ``report`` (a :class:`bench.report.Report`)."""
    result = measured_apart(report, "Compilation", path, COMMAND)
    if not result:
        return
    report.lines += [f"`torch.compile` ({result['backend']}, inductor caches {result['caches']}: a first compile) "
                     f"against eager on the emoji quick configs' networks, batch {result['batch']}, "
                     f"{result['threads']} thread(s) on `{result['device']}`; medians of {result['repeats']} calls. "
                     "Compile time: the first compiled call minus an eager call; break-even: the eager minutes after "
                     f"which compiling has paid for itself. Measured apart by {code(result['command'])} "
                     f"(read from `{path}`).", ""]
    report.lines += table(["workload", "precision", "eager", "compiled", "speed-up", "compile time", "break-even",
                           "first output vs eager"], [row(r) for r in result["results"]])
    bf16, fp32 = (estimate_for("cpu", precision) for precision in ("bf16", "fp32"))
    report.lines += [f"`run.compile: auto` compiles a run of at least {MIN_STEPS:,} steps whose time budget (if any) "
                     f"is at least {PAYBACK:g} x its break-even, from the least gain among the trained networks "
                     f"(`common.compile.ESTIMATES`): on a CPU in bf16 {break_even_minutes('cpu', 'bf16'):.0f} minutes "
                     f"({bf16.speedup:g}x after {bf16.compile_seconds:.0f} s, {bf16.source}), in fp32 never "
                     f"({fp32.speedup:g}x, {fp32.source}).", ""]


def row(r: dict) -> list[str]:
    even = r["break_even_eager_minutes"]
    return [r["workload"], r.get("precision", "fp32"), seconds(r["eager_s"]), seconds(r["compiled_s"]),
            f"{r['speedup']:.2f}x", seconds(r["compile_s"]), "never" if even is None else f"{even:.1f} min",
            f"{r['first_output_max_abs_diff']:.1e}"]
