"""The diffusion "time to quality" section of ``docs/BENCHMARKS.md``: renders the JSON of :mod:`bench.ttq_diffusion`.

Measured apart from ``bench.report`` (both arms train for many minutes on a quiet machine) and read from
``--ttq-diffusion`` (default ``docs/ttq_diffusion.json``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import plots
from bench.markdown import measured_apart

COMMAND = "python -m bench.ttq_diffusion --out runs/ttq_diffusion --json {}"


def section(report: Any, path: Path) -> None:
    """Append the section to ``report`` (a :class:`bench.report.Report`)."""
    result = measured_apart(report, "Diffusion time to quality", path, COMMAND)
    if result:
        report.lines += render(result, path, report.ctx.out)


def render(result: dict, path: Path, out: Path) -> list[str]:
    """The markdown lines for ``result`` (read from ``path``); writes ``ttq_diffusion.png`` into ``out``."""
    s, machine, found, target = result["settings"], result["machine"], result["minutes_to_target"], result["target"]
    lines = [f"Minutes of training until the shapes prompt accuracy (best over guidance {_scales(s['sweep'])}) "
             f"reaches {target:.0%}, our recipe against diffusers' `train_text_to_image.py` recipe, each for "
             f"{s['minutes']:g} min on {s['threads']} thread(s) ({machine['cpu']}, bf16 flags: "
             f"{', '.join(machine['bf16_flags']) or 'none'}, torch {machine['torch']}). Measured apart from this "
             f"report by `{result['command']}` (read from `{path}`, {result.get('date', 'undated')}).", ""]
    lines += ["| arm | points | minutes to target | best accuracy |", "|---|---|---|---|"]
    for arm, points in result["arms"].items():
        minutes = found.get(arm)
        reached = f"{minutes:.1f}" if minutes is not None else f"not within {s['minutes']:g}"
        best = max((p["accuracy"] for p in points), default=0.0)
        lines.append(f"| {arm} | {len(points)} | {reached} | {best:.0%} |")
    lines += ["", _verdict(found), ""]
    curves = {arm: [(p["minutes"], p["accuracy"]) for p in points] for arm, points in result["arms"].items()}
    figure = plots.time_to_quality(curves, target, out / "ttq_diffusion.png")
    return lines + [f"![diffusion time to quality]({figure.name})", ""]


def _scales(sweep: list[float]) -> str:
    return ", ".join(f"{g:g}" for g in sweep)


def _verdict(found: dict) -> str:
    if found["speedup"] is None:
        return "**Goal (2x sooner): missed** — ours did not reach the target in its budget."
    bound = "at least " if found["speedup_is_lower_bound"] else ""
    state = "met" if found["met"] else "missed"
    return f"**Goal (2x sooner): {state}** — ours reaches it {bound}{found['speedup']:.1f}x sooner."
