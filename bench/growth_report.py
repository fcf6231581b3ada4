"""The "Data growth" section of ``docs/BENCHMARKS.md``: renders the JSON of :mod:`bench.data_growth` (run apart:
at 100k images it generates, indexes and encodes for a long time)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import plots
from bench.markdown import code, measured_apart, percent, seconds, table

COMMAND = "python -m bench.data_growth --out {}"


def section(report: Any, path: Path) -> None:
    """Append the section to ``report`` (a :class:`bench.report.Report`)."""
    result = measured_apart(report, "Data growth", path, COMMAND)
    if not result:
        return
    text = ("latents and text states random, of the encoders' shapes (`--cache synthetic`: the cache build time "
            "is not an encoder's)" if result.get("cache") == "synthetic"
            else f"text states encoded with `{result['text']}`")
    report.lines += [f"Synthetic {result['resolution']} px images with distinct captions, as an image folder and as "
                     f"webdataset shards; every figure from a fresh process. Measured apart from this report by "
                     f"{code(result['command'])} (read from `{path}`). Start-up: constructing the dataset with its "
                     "index built; RSS: peak resident memory of a process that constructs the dataset, opens the "
                     f"latent cache and draws training batches of {result['batch_size']} ({text}); it counts the "
                     "cache pages read, which the kernel shares and reclaims, and \"own\" is the process's anonymous "
                     "memory alone.", ""]
    report.lines += table(["source", "images", "first index", "start-up", "cache build", "start-up with cache",
                           "peak RSS (train)", "peak RSS (build)", "cache", "index", "cache loader", "image loader",
                           "text: encode / read per caption"], [growth_row(r) for r in result["rows"]])
    for source, verdict in result["goals"]["sources"].items():
        line = (f"- **{source}:** start-up at {verdict['items']:,} images {seconds(verdict['startup_s'])} "
                f"(goal < {result['goals']['startup_goal_s']:.0f} s: {'met' if verdict['startup_met'] else 'missed'})")
        if "rss_growth" in verdict:
            line += (f"; peak RSS {percent(verdict['rss_growth'])} from {verdict['rss_from']:,} images (goal within "
                     f"{percent(result['goals']['rss_goal'])}: {'met' if verdict['rss_met'] else 'missed'})")
        report.lines.append(line)
    figure = plots.data_growth(result["rows"], report.ctx.out / "data_growth.png")
    report.lines += ["", f"![data growth]({figure.name})", ""]


def rss(r: dict) -> str:
    """The training process's peak RSS, and its own memory (not mapped cache pages) where measured."""
    own = r.get("train_anon_rss_mb")
    return f"{r['train_peak_rss_mb']:.0f} MB" + (f" (own {own:.0f} MB)" if own is not None else "")


def growth_row(r: dict) -> list[Any]:
    encode, read = r.get("encode_ms_per_caption"), r.get("read_ms_per_caption")
    text = "n/a" if encode is None else f"{encode:.3f} / {read:.4f} ms"
    return [r["source"], f"{r['items']:,}", seconds(r["first_index_s"]), seconds(r["startup_s"]),
            seconds(r["cache_build_s"]), seconds(r["startup_with_cache_s"]), rss(r),
            f"{r['build_peak_rss_mb']:.0f} MB", f"{r['cache_mb']:.1f} MB", f"{r['index_mb']:.2f} MB",
            f"{r['cache_samples_per_s']:,.0f}/s", f"{r['image_samples_per_s']:,.0f}/s", text]
