"""The "time to quality" section of ``docs/BENCHMARKS.md``: renders the JSON of :mod:`bench.ttq_autoencoder`.

Measured apart from ``bench.report`` (three arms train for many minutes each on a quiet machine) and read
from ``--ttq-autoencoder`` (default ``docs/ttq_autoencoder.json``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import plots
from bench.markdown import code, measured_apart, percent, table

COMMAND = "python -m bench.ttq_autoencoder --out runs/ttq_autoencoder --json {}"


def section(report: Any, path: Path) -> None:
    """Append the section to ``report`` (a :class:`bench.report.Report`): the newest measurement with its plot,
    then those kept under ``also`` (other machines: minutes compare only within one machine)."""
    result = measured_apart(report, "Autoencoder time to quality", path, COMMAND)
    if not result:
        return
    report.lines += measurement(result, path)
    curves = {record["label"]: record["snapshots"] for record in result["arms"].values()}
    figure = plots.autoencoder_time_to_quality(curves, result["threshold_db"],
                                               report.ctx.out / "autoencoder_time_to_quality.png")
    report.lines += [f"![held-out PSNR and codebook use vs training minutes]({figure.name})", ""]
    for earlier in result.get("also", []):
        report.lines += [f"Also measured on {earlier['machine']['cpu']}:", "", *measurement(earlier, path)]


def measurement(result: dict, path: Path) -> list[str]:
    """The description, table and verdicts of one run of the benchmark (all its arms on one machine)."""
    s, machine, threshold = result["settings"], result["machine"], result["threshold_db"]
    lines = [
        f"Training minutes until the held-out PSNR reaches {threshold:g} dB ({result['data']['name']} "
        f"{result['data']['resolution']} px, batch {result['data']['batch_size']}, the architecture of "
        f"`{s['config']}` in every arm), each arm trained for a fixed budget (the table's third column) on "
        f"{s['threads']} CPU thread(s), up to {s['arms_at_once']} arm(s) at a time on {machine['cpu']} (bf16 flags: "
        f"{', '.join(machine['bf16_flags']) or 'none'}; torch {machine['torch']}). Every snapshot is scored by "
        f"`autoencoder.evaluate.evaluate` (taming and VQModel weights converted exactly by `autoencoder.convert`); "
        f"ours is the EMA the run ships. "
        f"{result['interpolation']}; codebook use is that of the first snapshot at or above it. Measured apart "
        f"from this report by {code(result['command'])} (read from `{path}`).", ""]
    rows = [arm_row(record, threshold) for record in result["arms"].values()]
    lines += table(["arm", "precision", "training in the budget", f"minutes to {threshold:g} dB",
                    "codebook used then", "best PSNR (dB)", "final PSNR (dB)"], rows)
    return lines + goal_lines(result["goal"], threshold) + [""]


def arm_row(record: dict, threshold: float) -> list[str]:
    to, snapshots = record["to_threshold"], record["snapshots"]
    if to["minutes"] is None:
        minutes = f"not reached in {snapshots[-1]['minutes']:.1f}"
    else:
        minutes = ("<= " if to["upper_bound"] else "") + f"{to['minutes']:.2f}"
    return [record["label"], record["precision"], f"{record['steps']:,} steps in {record['seconds'] / 60:.1f} min",
            minutes, percent(to["codebook_used"]), f"{max(r['psnr'] for r in snapshots):.2f}",
            f"{snapshots[-1]['psnr']:.2f}"]


def goal_lines(goal: dict, threshold: float) -> list[str]:
    """One line per peer: how many times sooner ours got there, against the goal factor."""
    lines = []
    for peer, verdict in goal["peers"].items():
        if verdict["ratio"] is None:
            lines.append(f"- **vs {peer}:** ours did not reach {threshold:g} dB; goal {goal['factor']:g}x sooner: "
                         + ("missed" if verdict["met"] is False else "undecided (neither reached it)"))
            continue
        bound = "at least " if verdict["lower_bound"] else ""
        state = {True: "met", False: "missed", None: "undecided (the peer needs a longer budget)"}[verdict["met"]]
        lines.append(f"- **vs {peer}:** ours reached {threshold:g} dB {bound}{verdict['ratio']:.2f}x sooner "
                     f"(goal {goal['factor']:g}x: {state})")
    return lines
