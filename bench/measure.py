"""The measurements behind ``bench.report``: each function runs one benchmark or evaluator through its
importable API and returns its structured result plus the equivalent standalone ``command``.

Heavy imports (taming, diffusers, the pipelines) happen inside the functions, so importing this module
is cheap and tests can replace any measurement with a stub.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.training import read_metrics

REPO = Path(__file__).resolve().parents[1]

# Settings per mode. "full" keeps each bench script's own defaults where they fit the ~20 minute budget.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "autoencoder_vs_taming": {"batch": 2, "resolution": 32, "repeats": 3, "warmup": 1},
        "unet_vs_diffusers": {"batch": 4, "size": 8, "repeats": 3, "warmup": 1,
                              "workloads": ("train fp32", "infer fp32")},
        "prior_sampling": {"layers": 2, "width": 128, "heads": 4, "tokens": 64, "batch": 2, "repeats": 3, "warmup": 1,
                           "maskgit_steps": 4},
        "latent_caching": ["--items", "128", "--steps", "2", "--repeats", "3", "run.batch_size=16"],
        "vq_minutes": 0.5,
        "sweep": {"prompts": 8, "samples": 2, "steps": 20, "diffusion": "0,2,4", "prior": "0,1.5,3"},
        "samplers": {"prompts": 8, "samples": 2, "steps": (5, 10, 20), "ddpm_steps": 100},
        "distribution": {"count": 32, "batch": 32},
    },
    "full": {
        "autoencoder_vs_taming": {"batch": 8, "resolution": 64, "repeats": 10, "warmup": 2},
        "unet_vs_diffusers": {"batch": 32, "size": 16, "repeats": 5, "warmup": 1,
                              "workloads": ("train fp32", "train bf16", "infer fp32", "infer bf16")},
        # width 256 and batch 4, not the script's 512 and 8: taming's sample() recomputes the whole sequence at
        # every token (about 80 s per call at width 256, batch 8 on one core), and it runs 4 times
        "prior_sampling": {"layers": 8, "width": 256, "heads": 8, "tokens": 256, "batch": 8, "repeats": 3, "warmup": 1,
                           "maskgit_steps": 10},
        "latent_caching": ["--items", "2048", "--steps", "10", "--repeats", "5"],
        "vq_minutes": 0.0,  # the autoencoder run's recorded training time
        "sweep": {"prompts": 32, "samples": 4, "steps": 20, "diffusion": "0,1,2,4,8", "prior": "0,1,1.5,2,4"},
        # 16 prompts, not 32: DDPM makes 1000 guided U-Net calls per batch
        "samplers": {"prompts": 16, "samples": 2, "steps": (5, 10, 20, 50), "ddpm_steps": 1000},
        "distribution": {"count": 500, "batch": 64},
    },
}


@dataclass
class Context:
    """What every measurement needs: the command-line options, the mode's settings, the output folder."""

    args: argparse.Namespace
    profile: dict[str, Any]
    out: Path
    argv: list[str]
    machine_tag: str = ""
    started: float = field(default_factory=time.perf_counter)

    @property
    def command(self) -> str:
        return shlex.join(["python", "-m", "bench.report", *self.argv])

    @property
    def device(self) -> str:
        return self.args.device

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, message: str) -> None:
        minutes, secs = divmod(int(self.elapsed()), 60)
        print(f"[bench.report {minutes:02d}:{secs:02d}] {message}", file=sys.stderr, flush=True)

    def threads_flag(self) -> list[str]:
        return ["--threads", str(self.args.threads)] if self.args.threads else []


# ------------------------------------------------------------------------------------ machine


def _first_match(pattern: str, text: str, default: str = "unknown") -> str:
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1).strip() if match else default


def cpu_model() -> str:
    try:
        return _first_match(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), platform.processor() or
                            platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes" if dirty else "")


def other_busy_cores(seconds: float = 2.0) -> float | None:
    """CPU cores kept busy by everything on the machine over the next ``seconds``, while we sleep.

    Read from /proc/stat (Linux; None elsewhere). Unlike the load average, which trails by minutes,
    this says whether anything else is running right now."""
    def ticks() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values) - idle, sum(values)
    try:
        busy0, total0 = ticks()
        time.sleep(seconds)
        busy1, total1 = ticks()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def machine_info() -> dict[str, Any]:
    """The machine, collected automatically: CPU (and its native bf16 flags), cores, GPU, OS, torch build and
    threads, load."""
    from common.precision import cpu_description

    config = torch.__config__.show()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(), "bf16_flags": list(cpu_description()[1]), "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "blas": _first_match(r"BLAS_INFO=(\w+)", config),
        "cpu_capability": _first_match(r"CPU capability usage: (\w+)", config),
        "threads": torch.get_num_threads(), "load_start": os.getloadavg()[0], "busy_start": other_busy_cores(),
        "git": git_revision(),
    }


# ------------------------------------------------------------------------------------ run directories


def run_has(path: str | Path, what: str) -> bool:
    """Whether the run directory ``path`` holds ``what``: "pipeline", "autoencoder" or "metrics.jsonl"."""
    path = Path(path)
    if what == "pipeline":
        return (path / "pipeline.json").is_file() or (path / "pipeline" / "pipeline.json").is_file()
    if what == "autoencoder":
        return (path / "config.yaml").is_file() and (path / "autoencoder" / "config.json").is_file()
    return (path / what).is_file()


def training_curve(path: str | Path) -> tuple[dict[str, list[tuple[float, float]]], dict[str, Any]]:
    """The loss series of a run's ``metrics.jsonl`` and a summary (last step, minutes, last values)."""
    metrics = read_metrics(path)
    keys = [k for k in ("loss", "total", "rec") if any(k in m for m in metrics)]
    series = {k: [(m["step"], m[k]) for m in metrics if k in m] for k in keys}
    last = metrics[-1] if metrics else {}
    summary = {"steps": int(last.get("step", 0)), "minutes": last.get("seconds", 0.0) / 60,
               "final": {k: points[-1][1] for k, points in series.items() if points}}
    return series, summary


# ------------------------------------------------------------------------------------ speed


def autoencoder_vs_taming(ctx: Context) -> dict:
    from bench import autoencoder_vs_taming as bench

    settings = ctx.profile["autoencoder_vs_taming"]
    result = bench.run(device=ctx.device, **settings)
    flags = [f"--{k}={v}" for k, v in settings.items()]
    prefix = f"OMP_NUM_THREADS={ctx.args.threads} " if ctx.args.threads else ""
    return {**result, "command": prefix + shlex.join(["python", "-m", "bench.autoencoder_vs_taming",
                                                      f"--device={ctx.device}", *flags])}


def unet_vs_diffusers(ctx: Context) -> dict:
    from bench import unet_vs_diffusers as bench

    settings = ctx.profile["unet_vs_diffusers"]
    result = bench.run(device=ctx.device, **settings)
    flags = [f"--{k}={','.join(v) if k == 'workloads' else v}" for k, v in settings.items()]
    return {**result, "command": shlex.join(["python", "-m", "bench.unet_vs_diffusers", f"--device={ctx.device}",
                                             *flags, *ctx.threads_flag()])}


def prior_sampling(ctx: Context) -> dict:
    from bench import prior_sampling as bench

    settings = ctx.profile["prior_sampling"]
    result = bench.run(**settings, device=ctx.device, variants=("cached", "taming", "maskgit"))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    return {**result, "command": shlex.join(["python", "-m", "bench.prior_sampling", *flags, f"--device={ctx.device}",
                                             "--variants=cached,taming,maskgit", *ctx.threads_flag()])}


def latent_caching(ctx: Context) -> dict:
    from bench import latent_caching as bench

    settings = ctx.profile["latent_caching"]
    overrides = [item for item in settings if "=" in item and not item.startswith("-")]
    argv = [*[item for item in settings if item not in overrides], f"--device={ctx.device}", *ctx.threads_flag(),
            *overrides]
    result = bench.run(bench.parse_args(argv))
    return {**result, "command": shlex.join(["python", "-m", "bench.latent_caching", *argv])}


# ------------------------------------------------------------------------------------ quality


def _shapes_evaluator(kind: str, path: str, device: str) -> tuple[Any, Any]:
    """The evaluator module of ``kind`` ("diffusion" or "prior") and the pipeline it loads."""
    from diffusion import evaluate_shapes as diffusion_evaluator
    from prior import evaluate_shapes as prior_evaluator

    module = diffusion_evaluator if kind == "diffusion" else prior_evaluator
    return module, module.load(path, device)


def guidance_sweep(ctx: Context, kind: str, path: str) -> dict:
    """``python -m {kind}.evaluate_shapes PATH --sweep ...`` through its ``evaluate`` function."""
    settings = ctx.profile["sweep"]
    argv = [path, "--sweep", settings[kind], "--prompts", str(settings["prompts"]),
            "--samples", str(settings["samples"]), f"--device={ctx.device}"]
    if kind == "diffusion":
        argv += ["--steps", str(settings["steps"]), "--sampler", "dpmpp_2m"]
    module, pipe = _shapes_evaluator(kind, path, ctx.device)
    args = module.parse_args(argv)
    results = []
    for scale in settings[kind].split(","):
        results.append(module.evaluate(pipe, args, float(scale)))
        ctx.log(f"  {kind} guidance {scale}: accuracy {results[-1]['accuracy']:.3f}")
    return {"command": shlex.join(["python", "-m", f"{kind}.evaluate_shapes", *argv, *ctx.threads_flag()]),
            "results": results}


def sampler_steps(ctx: Context, path: str, guidance: float) -> dict:
    """Every sampler and sigma spacing at each step count, and DDPM at its reference count, same prompts and
    seeds (:func:`bench.sampler_table.table`; ``python -m bench.sampler_table`` measures the same apart)."""
    from bench import sampler_table

    settings = ctx.profile["samplers"]
    score = sampler_table.scorer(path, ctx.device, ctx.threads_flag(), ctx.log)
    return sampler_table.table(score, guidance, prompts=settings["prompts"], samples=settings["samples"],
                               steps=settings["steps"], ddpm_steps=settings["ddpm_steps"])


def autoencoder_quality(ctx: Context, path: str) -> dict:
    """Our autoencoder run against a diffusers VQModel trained for the same wall time."""
    from bench import vqmodel_equal_time as bench

    minutes = ctx.args.vq_minutes if ctx.args.vq_minutes is not None else ctx.profile["vq_minutes"]
    result = bench.run(path, minutes, device=ctx.device, echo=ctx.log)
    argv = [path, *(["--minutes", str(minutes)] if minutes else []), f"--device={ctx.device}", *ctx.threads_flag()]
    return {**result, "command": shlex.join(["python", "-m", "bench.vqmodel_equal_time", *argv])}


def distribution_scores(ctx: Context, path: str) -> dict:
    """``python -m bench.distribution_scores PATH --reference emoji`` through its ``run`` function."""
    from bench import distribution_scores as bench

    settings = ctx.profile["distribution"]
    argv = [path, "--reference", "emoji", "--count", str(settings["count"]), "--batch", str(settings["batch"]),
            f"--device={ctx.device}"]
    args = bench.parser().parse_args(argv)
    args.argv = argv
    result = bench.run(args)
    prefix = f"OMP_NUM_THREADS={ctx.args.threads} " if ctx.args.threads else ""
    return {**result, "command": prefix + result["command"]}
