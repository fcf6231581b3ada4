"""Generate ``docs/BENCHMARKS.md`` (and its PNG figures) by running the benchmarks and evaluators.

    python -m bench.report                                  # full settings (about 20 minutes on 2 cores)
    python -m bench.report --quick --out /tmp/bench_quick   # smoke settings (a few minutes)
    python -m bench.report --diffusion-run runs/shapes32_diffusion --prior-run runs/shapes32_quick_prior \\
                           --maskgit-run runs/shapes32_maskgit_prior --autoencoder-run outputs/demo/autoencoder_run \\
                           --emoji-runs "diffusion=outputs/demo/pipeline,MaskGIT=runs/emoji32_maskgit_prior" --threads 2

Run it from the repository root (the bench scripts read ``configs/``). Every number in the output is
measured by this command: speed ratios against the peers (the ``bench/`` scripts), sampler steps
against prompt accuracy, autoencoder quality against diffusers' ``VQModel`` at equal wall time,
shapes prompt accuracy of the three generators (diffusion, AR, MaskGIT) over a guidance sweep, emoji
distribution scores (``bench.distribution_scores``) and training curves from the runs' ``metrics.jsonl``.
The machine, the package versions (``common.environment``) and the command are recorded in the
markdown; the raw results go to ``benchmarks.json`` beside it, under the same header.
A missing run directory skips its sections with the command that trains it; a measurement that fails
is reported in the markdown and makes the exit status 1. The markdown is written atomically at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bench import compile_report, growth_report, measure, plots, ttq_autoencoder_report, ttq_diffusion_report
from bench.markdown import code, percent, seconds, splice, table
from bench.measure import PROFILES, Context, machine_info
from common.environment import environment_record, versions_line

STAGE_ONE = "`accelerate launch autoencoder/train.py configs/autoencoder/shapes32_quick.yaml` (stage 1), then "
TRAIN = {  # markdown, with the run directory for {}
    "diffusion": STAGE_ONE + "`accelerate launch diffusion/train_latent.py configs/diffusion/shapes32_quick.yaml "
                             "run.out_dir={}`",
    "prior": STAGE_ONE + "`accelerate launch prior/train.py configs/prior/shapes32_quick.yaml run.out_dir={}`",
    "maskgit": STAGE_ONE + "`accelerate launch prior/train.py configs/prior/shapes32_maskgit.yaml run.out_dir={}`",
    "emoji": "`make demo` (diffusion: `outputs/demo/pipeline`), then `accelerate launch prior/train.py "
             "configs/prior/emoji32_quick.yaml tokens.autoencoder=outputs/demo/autoencoder_run run.out_dir={}` "
             "(or `emoji32_maskgit.yaml`)",
    "autoencoder": "`accelerate launch autoencoder/train.py configs/autoencoder/emoji32_quick.yaml run.out_dir={}` "
                   "(`make demo` trains `outputs/demo/autoencoder_run`)",
}
# Sections measured apart from the report (long runs on a quiet machine): the option naming their JSON, its default
# and the renderer.
APART: dict[str, tuple[str, str, Callable[[Any, Path], None]]] = {
    "growth": ("--data-growth", "docs/data_growth.json", growth_report.section),
    "ttq_diffusion": ("--ttq-diffusion", "docs/ttq_diffusion.json", ttq_diffusion_report.section),
    "ttq_autoencoder": ("--ttq-autoencoder", "docs/ttq_autoencoder.json", ttq_autoencoder_report.section),
    "compile": ("--compile-speed", "docs/compile_speed.json", compile_report.section),
}
SECTIONS = ("speed", "samplers", "autoencoder", "shapes", "distribution", "curves", *APART)
EMOJI_RUNS = "diffusion=outputs/demo/pipeline,AR prior=runs/emoji32_quick_prior,MaskGIT=runs/emoji32_maskgit_prior"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test, not representative numbers")
    parser.add_argument("--out", default="docs", help="folder for BENCHMARKS.md, the PNGs and benchmarks.json")
    parser.add_argument("--diffusion-run", default="runs/shapes32_diffusion", help="shapes latent diffusion run")
    parser.add_argument("--prior-run", default="runs/shapes32_quick_prior", help="shapes AR prior run")
    parser.add_argument("--maskgit-run", default="runs/shapes32_maskgit_prior", help="shapes MaskGIT prior run")
    parser.add_argument("--emoji-runs", default=EMOJI_RUNS,
                        help="NAME=PATH,...: emoji generators (pipelines or runs) for the distribution scores")
    parser.add_argument("--autoencoder-run", default="outputs/demo/autoencoder_run", help="emoji VQ autoencoder run")
    for option, default, _ in APART.values():
        producer = option[2:].replace("-", "_")
        parser.add_argument(option, default=default, help=f"the JSON of `python -m bench.{producer}` (measured apart)")
    parser.add_argument("--vq-minutes", type=float, default=None,
                        help="VQModel training minutes (default: the autoencoder run's recorded time; --quick: 0.5)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--update", action="store_true",
                        help="re-render only the chosen --sections (measured apart) into the existing BENCHMARKS.md")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
    apart = [*APART, *(["samplers"] if (Path(args.out) / "sampler_table.json").is_file() else [])]
    if args.update and (set(args.sections.split(",")) - set(apart) or args.sections == ",".join(SECTIONS)):
        parser.error(f"--update re-renders sections measured apart only: pass --sections with some of "
                     f"{', '.join(apart)} (samplers: with OUT/sampler_table.json)")
    if args.update and not (Path(args.out) / "BENCHMARKS.md").is_file():
        parser.error(f"--update needs an existing {Path(args.out) / 'BENCHMARKS.md'}; run without --update first")
    return args


# ------------------------------------------------------------------------------------ markdown helpers


@dataclass
class Report:
    """The markdown being assembled, the raw results, the figures and what failed."""

    ctx: Context
    lines: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def attempt(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one measurement; on error, log the traceback, note the failure and return None."""
        self.ctx.log(f"{name} ...")
        start = time.perf_counter()
        try:
            result = fn()
        except (Exception, SystemExit) as error:  # one broken measurement must not lose the others
            traceback.print_exc()
            self.failures.append(f"{name}: {type(error).__name__}: {error}")
            self.lines += [f"**{name} failed:** `{type(error).__name__}: {error}`", ""]
            return None
        self.ctx.log(f"{name} done in {time.perf_counter() - start:.0f} s")
        self.results[name] = result
        return result

    def missing(self, kind: str, path: str, what: str) -> bool:
        """True (and a "not run" line) when the run directory ``path`` lacks ``what``."""
        if measure.run_has(path, what):
            return False
        where = f"`{path}` has no {what}" if Path(path).is_dir() else f"`{path}` missing"
        self.lines += [f"_Not run: {where}; train it with {TRAIN[kind].format(path)}._", ""]
        self.ctx.log(f"skipping: {path} has no {what}")
        return True


# ------------------------------------------------------------------------------------ sections


def speed_section(report: Report) -> None:
    ctx, rows, sources = report.ctx, [], []
    report.lines += ["## Speed against the peers", "",
                     f"Medians over repeats, timed in one process, alternating the contenders where the script does "
                     f"({ctx.machine_tag}). Speed-up = peer time / our time (> 1: ours is faster).", ""]
    ae = report.attempt("autoencoder vs taming", lambda: measure.autoencoder_vs_taming(ctx))
    if ae:
        for precision in ("fp32", "bf16 autocast"):
            ours, theirs = ae["median_seconds"][f"ours {precision}"], ae["median_seconds"][f"taming {precision}"]
            rows.append(["VQ-GAN vs taming-transformers", f"training step {precision} ({ae['resolution']} px, batch "
                         f"{ae['batch']})", seconds(ours), seconds(theirs), f"{theirs / ours:.2f}x", "[1]"])
        sources.append(f"[1] {code(ae['command'])}: median of {ae['repeats']} after {ae['warmup']} warm-up")
    unet = report.attempt("unet vs diffusers", lambda: measure.unet_vs_diffusers(ctx))
    if unet:
        for workload, result in unet["workloads"].items():
            kind = "training step (fwd, loss, bwd, AdamW)" if workload.startswith("train") else "inference forward"
            shape = f"batch {unet['batch']}, {unet['channels']}x{unet['size']}x{unet['size']}"
            rows.append(["U-Net vs diffusers UNet2DConditionModel", f"{kind} {workload.split()[1]} ({shape})",
                         seconds(result["ours_median"]),
                         seconds(result["diffusers_median"]), f"{result['speedup']:.2f}x", "[2]"])
        sources.append(f"[2] {code(unet['command'])}: median of {unet['repeats']} after {unet['warmup']} warm-up")
    prior = report.attempt("prior sampling vs taming", lambda: measure.prior_sampling(ctx))
    if prior:
        s, median = prior["settings"], prior["median_seconds"]
        rows.append(["AR prior sampling vs taming minGPT `sample()`", f"{s['tokens']} tokens x batch {s['batch']}, "
                     f"{s['layers']} layers x {s['width']} (KV cache)", seconds(median["cached"]),
                     seconds(median["taming"]), f"{prior['ratio_taming_over_cached']:.2f}x", "[3]"])
        for peer, name in (("cached", "our AR prior (KV cache)"), ("taming", "taming minGPT `sample()`")):
            rows.append([f"MaskGIT sampling vs {name}", f"{s['tokens']} tokens x batch {s['batch']}, "
                         f"{s['layers']} layers x {s['width']}, {s['maskgit_steps']} parallel steps",
                         seconds(median["maskgit"]), seconds(median[peer]),
                         f"{prior[f'ratio_{peer}_over_maskgit']:.2f}x", "[3]"])
        sources.append(f"[3] {code(prior['command'])}: median of {s['repeats']} after {s['warmup']} warm-up")
    cache = report.attempt("latent caching", lambda: measure.latent_caching(ctx))
    if cache:
        rows.append(["Latent cache vs encoding on the fly", f"diffusion training throughput (batch "
                     f"{cache['batch_size']}, {cache['steps_per_run']} steps per run)",
                     f"{cache['cached_samples_per_s']:.1f} samples/s",
                     f"{cache['on_the_fly_samples_per_s']:.1f} samples/s",
                     f"{cache['speedup']:.2f}x", "[4]"])
        sources.append(f"[4] {code(cache['command'])}: median of {cache['repeats']} runs; one-off cache build "
                       f"{cache['cache_build_seconds']} s for {cache['cache_items']} items")
    if rows:
        report.lines += table(["comparison", "workload", "ours", "peer / baseline", "speed-up", "source"], rows)
        report.lines += ["Sources (equivalent standalone commands):", ""] + [f"- {s}" for s in sources] + [""]


def shapes_section(report: Report) -> dict[str, list[dict]]:
    """The guidance sweeps of both generators; returns them for the samplers section and the plot."""
    ctx, sweeps = report.ctx, {}
    report.lines += ["## Shapes prompt accuracy per generator", "",
                     "The fraction of generated images whose colour, shape and position the analytic shapes "
                     "scorer finds right, on the fixed evaluation prompts; diversity is the mean pairwise RMS "
                     f"distance among the samples of one prompt ({ctx.machine_tag}).", ""]
    trained = {}
    for kind, path, title in (("diffusion", ctx.args.diffusion_run, "latent diffusion"),
                              ("prior", ctx.args.prior_run, "AR prior"), ("maskgit", ctx.args.maskgit_run, "MaskGIT")):
        if report.missing(kind, path, "pipeline"):
            continue
        evaluator = "diffusion" if kind == "diffusion" else "prior"
        result = report.attempt(f"{title} guidance sweep", lambda: measure.guidance_sweep(ctx, evaluator, path))
        if result:
            sweeps[title] = result["results"]
            trained[title] = training(path)
            report.lines += [f"### {title[0].upper() + title[1:]}: `{path}`", "",
                             f"Command: {code(result['command'])}", ""]
            report.lines += table(["guidance", "accuracy", "colour", "shape", "position", "size", "diversity",
                                   "s / image"], [sweep_row(r) for r in result["results"]])
    if sweeps:
        report.lines += ["### Best guidance", ""]
        report.lines += ["Training as logged in each run's `metrics.jsonl` (by the machine that trained it).", ""]
        report.lines += table(["generator", "training", "best guidance", "accuracy", "diversity", "prompts x samples"],
                              [[name, trained[name], best(results)["guidance"], percent(best(results)["accuracy"]),
                                f"{best(results)['diversity']:.3f}",
                                f"{results[0]['prompts']} x {results[0]['samples_per_prompt']}"]
                               for name, results in sweeps.items()])
        figure = plots.guidance_sweep(sweeps, ctx.out / "guidance_sweep.png")
        report.lines += [f"![guidance sweep]({figure.name})", ""]
    return sweeps


def training(path: str) -> str:
    """A run's steps and minutes from its metrics log (a bare pipeline directory has none)."""
    if not measure.run_has(path, "metrics.jsonl"):
        return "not logged"
    summary = measure.training_curve(path)[1]
    return f"{summary['steps']:,} steps in {summary['minutes']:.1f} min"


def distribution_section(report: Report) -> None:
    """Emoji distribution scores (SWD) of each generator, with the copy-the-training-set and stage-1 floors."""
    ctx, rows, commands = report.ctx, [], []
    report.lines += ["## Emoji distribution scores", "",
                     "Sliced Wasserstein distance on Laplacian-pyramid patches (lower is closer; no pretrained "
                     "network), generated images against emoji training images prompted with their captions. "
                     "Baseline: held-out emoji against the same training images. Stage-1 floor: those held-out "
                     "images after a round trip through the generator's autoencoder. Within stage 1: generated "
                     "images against the training images after that round trip, floor in brackets: it ranks "
                     f"generators that share one autoencoder ({ctx.machine_tag}).", ""]
    for item in ctx.args.emoji_runs.split(","):
        name, _, path = item.partition("=")
        if report.missing("emoji", path, "pipeline"):
            continue
        result = report.attempt(f"{name} distribution scores", lambda: measure.distribution_scores(ctx, path))
        if result:
            within = result["within_stage1"]
            swd = [scores["swd"]["score"] for scores in (result["scores"], result["baseline"]["scores"],
                                                        result["stage1_floor"]["scores"], within["scores"],
                                                        within["floor"])]
            rows.append([name, f"`{path}`", training(path), *(f"{v:.1f}" for v in swd[:3]),
                         f"{swd[3]:.1f} ({swd[4]:.1f})", result["scores"]["swd"]["counts"][0]])
            commands.append(f"- {name}: {code(result['command'])}")
    if rows:
        report.lines += table(["generator", "directory", "training", "SWD", "baseline", "stage-1 floor",
                               "within stage 1 (floor)", "images"], rows)
        report.lines += ["Commands:", "", *commands, ""]


def sweep_row(r: dict) -> list[Any]:
    images = r["prompts"] * r["samples_per_prompt"]
    return [r["guidance"], percent(r["accuracy"]), percent(r["colour"]), percent(r["shape"]), percent(r["position"]),
            percent(r["size"]), f"{r['diversity']:.3f}", f"{r['seconds'] / images:.3f}"]


def best(results: list[dict]) -> dict:
    """The most accurate setting; ties go to the more diverse one."""
    return max(results, key=lambda r: (r["accuracy"], r["diversity"]))


def samplers_section(report: Report, sweeps: dict[str, list[dict]]) -> None:
    """Prompt accuracy per sampler, sigma spacing and step count against DDPM: from ``<out>/sampler_table.json``
    (``python -m bench.sampler_table``, measured apart) when it is there, else measured here."""
    ctx, path = report.ctx, report.ctx.args.diffusion_run
    report.lines += ["## Sampler steps vs quality", ""]
    saved = ctx.out / "sampler_table.json"
    if saved.is_file():
        result = report.attempt("sampler table", lambda: json.loads(saved.read_text()))
        source = f"measured apart by {code(result['command'])}, read from `{saved}`" if result else ""
    else:
        if report.missing("diffusion", path, "pipeline"):
            return
        guidance, why = 4.0, "the evaluator's default: no guidance sweep ran"
        if "latent diffusion" in sweeps:
            guidance, why = best(sweeps["latent diffusion"])["guidance"], "the sweep's best"
        result = report.attempt("sampler steps", lambda: {"why": why, **measure.sampler_steps(ctx, path, guidance)})
        source = ctx.machine_tag
    if not result:
        return
    rows, reference = result["results"], result["reference"]
    steps, name = sorted({r["steps"] for r in rows}), reference["sampler"].upper()
    report.lines += [f"Shapes prompt accuracy of each sampler and sigma spacing at {', '.join(map(str, steps))} "
                     f"steps (model evaluations: one batched guided call each) against {name} at {reference['steps']} "
                     f"steps on `{reference.get('run_dir', path)}`, guidance {reference['guidance']} "
                     f"({result['why']}), {reference['prompts']} prompts x {reference['samples_per_prompt']} "
                     f"samples, same seeds ({source}). In brackets: the difference to {name} in points.", ""]
    report.lines += table(["sampler", "sigma spacing", *(f"{n} steps" for n in steps)], sampler_rows(rows, reference))
    report.lines += table(["reference", "steps", "accuracy", "colour", "shape", "position", "diversity"],
                          [[reference["sampler"], reference["steps"], *sweep_row(reference)[1:5],
                            sweep_row(reference)[6]]])
    report.lines += [f"Commands: each cell is {code(rows[0]['command'])} with its `--sampler`, `--sigma-spacing` and "
                     f"`--steps`; the reference is {code(reference['command'])}.", ""]
    figure = plots.sampler_steps(rows, reference, ctx.out / "sampler_steps.png")
    report.lines += [f"![sampler steps vs accuracy]({figure.name})", ""]


def sampler_rows(rows: list[dict], reference: dict) -> list[list[str]]:
    """One table row per sampler and sigma spacing: the accuracy at each step count and its gap to the reference."""
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for r in rows:
        gap = 100 * (r["accuracy"] - reference["accuracy"])
        cells.setdefault((r["sampler"], r.get("sigma_spacing", "default")), {})[r["steps"]] = (
            f"{percent(r['accuracy'])} ({gap:+.1f})")
    steps = sorted({r["steps"] for r in rows})
    return [[sampler, spacing, *(by_steps.get(n, "") for n in steps)] for (sampler, spacing), by_steps in cells.items()]


def autoencoder_section(report: Report) -> None:
    ctx, path = report.ctx, report.ctx.args.autoencoder_run
    report.lines += ["## Autoencoder quality vs diffusers VQModel at equal wall time", ""]
    if report.missing("autoencoder", path, "autoencoder"):
        return
    result = report.attempt("autoencoder vs VQModel", lambda: measure.autoencoder_quality(ctx, path))
    if not result:
        return
    ours, theirs = result["ours"], result["vqmodel"]
    report.lines += [f"Both have the architecture of `{path}` and are scored by `autoencoder.evaluate.evaluate` on the "
                     f"{result['data']} {result['split']} split ({ours['images']} images, {result['resolution']} px). "
                     f"Our training time is the one recorded in the run's `metrics.jsonl` (possibly on another "
                     f"machine); the VQModel trained in this command ({ctx.machine_tag}) with the same data, batch "
                     f"size, optimizer, precision and L1 + L2 + quantizer loss. Command: {code(result['command'])}", ""]
    rows = [[name, f"{r['parameters'] / 1e6:.2f} M", f"{r['steps']:,} steps in {r['train_seconds'] / 60:.1f} min",
             f"{r['psnr']:.2f}", f"{r['ssim']:.3f}", percent(r["codebook_used"]), f"{r['perplexity']:.1f}"]
            for name, r in (("ours (latentgen VQ-GAN)", ours), ("diffusers VQModel", theirs))]
    report.lines += table(["model", "parameters", "training", "PSNR (dB)", "SSIM", "codebook used",
                           "perplexity"], rows)
    ours_curve = [(m["seconds"], m["rec"]) for m in measure.read_metrics(path) if "seconds" in m and "rec" in m]
    theirs_curve = [(m["seconds"], m["rec"]) for m in theirs.get("curve", []) if "rec" in m]
    if ours_curve and theirs_curve:
        figure = plots.loss_vs_time({"ours (metrics.jsonl)": ours_curve, "diffusers VQModel": theirs_curve},
                                    ctx.out / "autoencoder_equal_time.png")
        report.lines += [f"![reconstruction loss vs wall time]({figure.name})", ""]


def curves_section(report: Report) -> None:
    ctx, curves = report.ctx, {}
    report.lines += ["## Training curves", "", "Loss against step, read from each run's `metrics.jsonl` "
                     "(`common.training.read_metrics`), as logged by the machine that trained each run.", ""]
    rows = []
    for kind, path, title in (("autoencoder", ctx.args.autoencoder_run, "autoencoder"),
                              ("diffusion", ctx.args.diffusion_run, "latent diffusion"),
                              ("prior", ctx.args.prior_run, "AR prior"), ("maskgit", ctx.args.maskgit_run, "MaskGIT")):
        if report.missing(kind, path, "metrics.jsonl"):
            continue
        series, summary = measure.training_curve(path)
        curves[f"{title}\n{Path(path).name}"] = series
        rows.append([title, f"`{path}`", f"{summary['steps']:,}", f"{summary['minutes']:.1f}",
                     ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())])
    if curves:
        report.lines += table(["run", "directory", "steps", "minutes", "last logged loss"], rows)
        figure = plots.training_curves(curves, ctx.out / "training_curves.png")
        report.lines += [f"![training curves]({figure.name})", ""]


# ------------------------------------------------------------------------------------ assembly


def fmt_busy(cores: float | None) -> str:
    return "an unknown number of" if cores is None else f"{cores:.2f}"


def versions(environment: dict) -> str:
    """The package versions, and whether they are constraints.txt's pins (`make install`) or not."""
    text = f"{versions_line(environment)}; latentgen {environment['latentgen']}"
    differ = environment["off_constraints"]
    if differ is None:
        return text + " (no constraints.txt to compare with)"
    if not differ:
        return text + "; every installed package at its constraints.txt pin"
    return text + "; **not at constraints.txt's pins:** " + ", ".join(
        f"{name} {v['installed']} (pinned {v['pinned']})" for name, v in sorted(differ.items()))


def header(ctx: Context, machine: dict, finished: dict, environment: dict) -> list[str]:
    lines = ["# Benchmarks", "", "Generated by one command; every number below was measured by it.", "",
             f"- **Command:** `{ctx.command}` (git {machine['git']})",
             f"- **Machine:** {machine['cpu']}, {machine['usable_cores']} usable of {machine['logical_cores']} "
             f"logical cores, {machine['gpu'] or 'no GPU'}; {machine['os']}, Python {machine['python']}",
             f"- **Torch:** {machine['torch']} ({machine['blas']}, {machine['cpu_capability']}), "
             f"torch threads: {machine['threads']}, device `{ctx.args.device}`",
             f"- **Versions:** {versions(environment)}",
             f"- **Other processes** kept {fmt_busy(machine['busy_start'])} CPU cores busy just before the "
             f"measurements and {fmt_busy(finished['busy_end'])} just after (sampled from /proc/stat over 2 s); "
             f"1-minute load average {machine['load_start']:.2f} at start, {finished['load_end']:.2f} at end; "
             f"total time {finished['minutes']:.1f} min, {finished['date']}", ""]
    busy = max(b for b in (machine["busy_start"], finished["busy_end"], 0.0) if b is not None)
    if busy > 0.25 * machine["usable_cores"]:
        lines += [f"> **Busy machine:** other processes kept {busy:.1f} cores busy; the timings are unreliable. "
                  "Regenerate on a quiet machine.", ""]
    if ctx.args.quick:
        lines += ["> **--quick**: smoke-test settings (tiny models, few repeats, few prompts). The numbers show that "
                  "the pipeline works, not how fast or good anything is.", ""]
    return lines


def write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args=args, profile=PROFILES["quick" if args.quick else "full"], out=out, argv=argv)
    machine, environment = machine_info(), environment_record()
    threads = machine["threads"]
    ctx.machine_tag = (f"{machine['cpu']}, {machine['usable_cores']} cores, torch {machine['torch']}, "
                       f"{threads} thread{'s' if threads != 1 else ''}")
    report, chosen, parts = Report(ctx), args.sections.split(","), {}

    def section(name: str, build: Callable[[], Any]) -> Any:
        report.lines = []
        value = build() if name in chosen else None
        parts[name] = report.lines
        return value

    ctx.log(f"machine: {ctx.machine_tag}; output to {out}")
    section("speed", lambda: speed_section(report))
    sweeps = section("shapes", lambda: shapes_section(report)) or {}
    section("samplers", lambda: samplers_section(report, sweeps))
    section("autoencoder", lambda: autoencoder_section(report))
    section("distribution", lambda: distribution_section(report))
    section("curves", lambda: curves_section(report))
    for name, (option, _, render) in APART.items():
        section(name, lambda: render(report, Path(getattr(args, option[2:].replace("-", "_")))))
    report.lines = [line for name in SECTIONS for line in parts[name]]
    finished = {"load_end": os.getloadavg()[0], "busy_end": measure.other_busy_cores(), "minutes": ctx.elapsed() / 60,
                "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    if report.failures:
        report.lines += ["## Failures", ""] + [f"- {failure}" for failure in report.failures] + [""]
    if args.update:  # the other sections and the header stay those of the run that measured them
        note = f"- **Updated:** {', '.join(chosen)} by `{ctx.command}` (git {machine['git']}), {finished['date']}"
        document = splice((out / "BENCHMARKS.md").read_text(), [parts[name] for name in chosen], note)
        write_atomic(out / "BENCHMARKS.md", document)
        return 1 if report.failures else 0
    write_atomic(out / "benchmarks.json", json.dumps({"command": ctx.command, "machine": machine,
                                                      "environment": environment, **finished,
                                                      "results": report.results}, indent=2, default=str) + "\n")
    write_atomic(out / "BENCHMARKS.md", "\n".join(header(ctx, machine, finished, environment) + report.lines) + "\n")
    ctx.log(f"wrote {out / 'BENCHMARKS.md'} in {finished['minutes']:.1f} min"
            + (f" with {len(report.failures)} failures" if report.failures else ""))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
