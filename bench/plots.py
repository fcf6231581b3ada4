"""The PNG figures of ``docs/BENCHMARKS.md``: matplotlib (Agg), one function per figure.

Each function takes the structured results that :mod:`bench.report` measured and writes one PNG,
returning its path; nothing here measures anything.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import NullFormatter, NullLocator  # noqa: E402

Curve = list[tuple[float, float]]


def _save(figure: plt.Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` through a temporary file, so a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    figure.tight_layout()
    figure.savefig(partial, dpi=110, bbox_inches="tight", format="png")
    plt.close(figure)
    os.replace(partial, path)
    return path


def guidance_sweep(sweeps: dict[str, list[dict]], path: Path) -> Path:
    """Accuracy and diversity against the guidance scale, one line per generator.

    ``sweeps`` maps a generator name to its results (dicts with guidance, accuracy, diversity)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, results in sweeps.items():
        scales = [r["guidance"] for r in results]
        left.plot(scales, [r["accuracy"] for r in results], marker="o", label=name)
        right.plot(scales, [r["diversity"] for r in results], marker="o", label=name)
    left.set(xlabel="guidance scale", ylabel="prompt accuracy", ylim=(-0.02, 1.02), title="Shapes prompt accuracy")
    right.set(xlabel="guidance scale", ylabel="mean pairwise RMS distance", title="Diversity (same prompt)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    return _save(figure, path)


def sampler_steps(results: list[dict], reference: dict | None, path: Path) -> Path:
    """Accuracy against the number of sampling steps, one line per sampler and sigma spacing; the reference
    sampler is a dashed line."""
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    lines: dict[str, list[dict]] = {}
    for r in results:
        spacing = r.get("sigma_spacing", "default")
        lines.setdefault(r["sampler"] + ("" if spacing == "default" else f" {spacing}"), []).append(r)
    for label, rows in lines.items():
        axis.plot([r["steps"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=label, alpha=0.8)
    steps = sorted({r["steps"] for r in results})
    if reference is not None:
        axis.axhline(reference["accuracy"], color="grey", linestyle="--",
                     label=f"{reference['sampler']} {reference['steps']} steps")
    axis.set_xscale("log")
    axis.set_xticks(steps, [str(s) for s in steps])
    axis.xaxis.set_minor_locator(NullLocator())
    axis.set(xlabel="sampling steps", ylabel="prompt accuracy", ylim=(-0.02, 1.02), title="Sampler steps vs accuracy")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def training_curves(curves: dict[str, dict[str, Curve]], path: Path) -> Path:
    """Loss against step: one panel per run, one line per logged loss.

    ``curves`` maps a panel title to ``{series name: [(step, value), ...]}``."""
    panels = max(len(curves), 1)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    for axis, (title, series) in zip(axes[0], curves.items()):
        for name, points in series.items():
            axis.plot([p[0] for p in points], [p[1] for p in points], label=name)
        axis.set(xlabel="step", ylabel="loss", title=title)
        _loss_axis(axis, series)
    return _save(figure, path)


def loss_vs_time(series: dict[str, Curve], path: Path) -> Path:
    """Training reconstruction loss against wall-clock minutes, one line per model."""
    figure, axis = plt.subplots(figsize=(5.2, 3.4))
    for name, points in series.items():
        axis.plot([p[0] / 60 for p in points], [p[1] for p in points], label=name)
    axis.set(xlabel="wall-clock minutes", ylabel="reconstruction loss (L1 + L2)", title="Equal-time training")
    _loss_axis(axis, series)
    return _save(figure, path)


def _loss_axis(axis, series: dict[str, Curve]) -> None:
    """Log scale when every value of ``series`` is positive (losses span decades), a light grid, the legend."""
    if all(p[1] > 0 for points in series.values() for p in points):
        axis.set_yscale("log")
        axis.yaxis.set_minor_formatter(NullFormatter())
    axis.grid(alpha=0.3)
    axis.legend()


def data_growth(rows: list[dict], path: Path) -> Path:
    """Start-up time, peak RSS, size on disk and loader speed against the number of images, one line per
    source (``rows`` as :mod:`bench.data_growth` writes them)."""
    panels = (("start-up (s)", (("first_index_s", "first index"), ("startup_s", "later start-up"))),
              ("peak RSS of training (MB)", (("train_peak_rss_mb", ""),)),
              ("on disk (MB)", (("cache_mb", "cache"), ("index_mb", "index"))),
              ("samples/s", (("cache_samples_per_s", "cache loader"), ("image_samples_per_s", "image loader"))))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.4))
    for axis, (title, series) in zip(axes, panels):
        for source in dict.fromkeys(r["source"] for r in rows):
            mine = sorted((r for r in rows if r["source"] == source), key=lambda r: r["items"])
            for key, name in series:
                axis.plot([r["items"] for r in mine], [r[key] for r in mine], marker="o",
                          label=f"{source} {name}".strip())
        axis.set_xscale("log")
        axis.set(xlabel="images", title=title)
        axis.set_ylim(bottom=0)  # growth read against the whole value, not a zoomed-in band
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return _save(figure, path)


def time_to_quality(curves: dict[str, Curve], target: float, path: Path) -> Path:
    """Prompt accuracy against wall-clock minutes, one line per training recipe, the target dashed."""
    figure, axis = plt.subplots(figsize=(6.0, 3.8))
    for name, points in curves.items():
        points = sorted(points)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    axis.axhline(target, color="grey", linestyle="--", label=f"target {target:.0%}")
    axis.set(xlabel="wall-clock minutes since launch", ylabel="best prompt accuracy", ylim=(-0.02, 1.02),
             title="Time to quality, shapes diffusion")
    axis.set_xlim(left=0)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def autoencoder_time_to_quality(arms: dict[str, list[dict]], threshold: float, path: Path) -> Path:
    """Held-out PSNR and codebook use against training minutes, one line per arm, the PSNR threshold dashed
    (``arms`` maps a name to its snapshots as :mod:`bench.ttq_autoencoder` writes them)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, rows in arms.items():
        minutes = [r["minutes"] for r in rows]
        left.plot(minutes, [r["psnr"] for r in rows], marker="o", markersize=3, label=name)
        right.plot(minutes, [r["codebook_used"] for r in rows], marker="o", markersize=3, label=name)
    left.axhline(threshold, color="grey", linestyle="--", label=f"{threshold:g} dB")
    left.set(xlabel="training minutes", ylabel="held-out PSNR (dB)", title="Reconstruction quality")
    right.set(xlabel="training minutes", ylabel="fraction of the codebook used", ylim=(-0.02, 1.02),
              title="Codebook use (held-out)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    return _save(figure, path)
