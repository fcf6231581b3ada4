"""Time to quality, diffusion: minutes of training until the shapes prompt accuracy reaches 90 %, for our
recipe as shipped and for diffusers' ``train_text_to_image.py`` recipe, on the same U-Net size, stage 1,
data and machine.

    python -m bench.ttq_diffusion --minutes 40 --interval 2 --out runs/ttq_diffusion --json docs/ttq_diffusion.json
    python -m bench.ttq_diffusion --quick --out /tmp/ttq --json /tmp/ttq/ttq_diffusion.json     # smoke (~5 min)
    python -m bench.report --sections ttq_diffusion --ttq-diffusion docs/ttq_diffusion.json  # the markdown

The two arms, each on ``--threads`` torch threads, both at once by default (so that both see the same
machine; ``--sequential`` runs one after the other), each for ``--minutes`` of wall clock counted from the
launch of its process (imports, model loading and, for ours, building the latent cache included):

- ours: ``accelerate launch diffusion/train_latent.py CONFIG`` as shipped (min-SNR, condition dropout, EMA,
  warm-up, batch 64, ``precision: auto``), into a fresh run directory and latent cache. Only what the
  measurement needs is overridden: the run folder, the cache folder, ``run.cpu_threads``,
  ``run.max_minutes`` (its budget starts after the cache is built, so the process outlives the arm's
  clock; what it trains afterwards is never scored) and ``run.save_every`` (``--save-every``; finer than
  the shipped 500 so that a checkpoint sits close before each mark, a few-percent cost charged to ours).
  At every ``--interval`` mark the driver copies the EMA weights of the newest complete checkpoint; a
  point's time is when that checkpoint was written, not the mark.
- diffusers: :mod:`bench.diffusers_recipe` (every default of the script, and where it must differ), which
  saves its U-Net at the first step after each mark.

Afterwards every snapshot becomes a pipeline of our format (a diffusers U-Net through
:func:`diffusion.convert.from_diffusers`, exact) with our run's autoencoder and sampling settings, and is
scored by the same entry point, ``python -m diffusion.evaluate_shapes`` (DPM-Solver++ 2M, ``--steps`` 20,
``--prompts`` x ``--samples`` images, fixed seed) at every guidance scale of ``--sweep``; a point's
accuracy is the best of the sweep. The sweep includes 1: the diffusers recipe trains no empty caption,
so guidance above 1 steers against a null condition it never saw. Minutes to the target: the time of
the first point at or above it (None when none is). The JSON (``--json``) holds the machine, the
settings, every point and sweep, and the verdict; ``bench.report`` renders it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench.diffusers_recipe import DEFAULTS, SNAPSHOTS
from bench.measure import machine_info
from common.evaluation import number_list
from common.run_state import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("ours", "diffusers")
EMA_FILE = "custom_checkpoint_0.pkl"  # the EMA, the one object train_latent.py registers for checkpointing
QUICK = dict(minutes=1.5, interval=0.5, save_every=20, sweep=[1.0, 4.0], prompts=4, samples=2,
             overrides=["data.size=256", "run.sample_every=100000"])


@dataclass(frozen=True)
class Settings:
    """What one measurement runs; recorded in its JSON."""

    config: str
    overrides: tuple[str, ...]
    minutes: float
    interval: float
    threads: int
    sequential: bool
    save_every: int
    sweep: tuple[float, ...]
    steps: int
    prompts: int
    samples: int
    target: float
    seed: int
    quick: bool


# ------------------------------------------------------------------------------------ training


def ours_command(s: Settings, out: Path) -> list[str]:
    """Our training script through ``accelerate launch``, one process, into ``out/ours``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--dynamo_backend", "no", "--mixed_precision", "no", "diffusion/train_latent.py", s.config,
            *s.overrides, f"run.out_dir={out / 'ours'}", f"cache_dir={out / 'latent_cache'}",
            f"run.cpu_threads={s.threads}", f"run.max_minutes={s.minutes}", f"run.save_every={s.save_every}",
            "run.keep_checkpoints=3", f"run.seed={s.seed}", "run.progress=false"]


def diffusers_command(s: Settings, out: Path, start: float) -> list[str]:
    return [sys.executable, "-m", "bench.diffusers_recipe", s.config, *s.overrides, "--out", str(out / "diffusers"),
            "--minutes", str(s.minutes), "--snapshot-minutes", str(s.interval), "--threads", str(s.threads),
            "--seed", str(s.seed), "--start", repr(start)]


def launch(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=child_env())


def child_env() -> dict[str, str]:
    """This environment with the repository importable (``accelerate launch`` puts only the script's folder first)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}


def wait(process: subprocess.Popen, name: str, log: Path, ok: tuple[int, ...] = (0,)) -> None:
    if process.wait() not in ok:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"the {name} arm exited with status {process.returncode}; see {log}:\n{tail}")


def grab_ema(run_dir: Path, into: Path, start: float, taken: list[dict]) -> None:
    """Copy the EMA of ``run_dir``'s newest complete checkpoint (if new) and list it with its time."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or any(t["checkpoint"] == checkpoint.name for t in taken):
        return
    source = checkpoint / EMA_FILE
    target = into / f"ema_{checkpoint.name}.pkl"
    try:
        shutil.copyfile(source, target)
    except FileNotFoundError:  # rotated away between reading ``latest`` and copying: the next mark takes a newer one
        return
    step = json.loads((checkpoint / "step.json").read_text())["step"] if (checkpoint / "step.json").is_file() else 0
    taken.append({"minutes": (source.stat().st_mtime - start) / 60, "step": step, "checkpoint": checkpoint.name,
                  "ema": target.name})


def train_ours(s: Settings, out: Path, start: float) -> list[dict]:
    """Run our arm from ``start``, taking an EMA snapshot at every mark; returns the snapshots taken."""
    into, log, taken = out / "ours_snapshots", out / "ours.log", []
    into.mkdir(parents=True)
    process = launch(ours_command(s, out), log)
    for mark in marks(s):
        while time.time() < start + 60 * mark and process.poll() is None:
            time.sleep(0.5)
        if process.poll() not in (None, 0):
            break
        grab_ema(out / "ours", into, start, taken)
    wait(process, "ours", log)
    (into / SNAPSHOTS).write_text("".join(json.dumps(t) + "\n" for t in taken))
    return taken


def train_diffusers(s: Settings, out: Path, start: float) -> None:
    log = out / "diffusers.log"
    wait(launch(diffusers_command(s, out, start), log), "diffusers", log)


def marks(s: Settings) -> list[float]:
    count = max(1, round(s.minutes / s.interval))
    return [min(s.minutes, s.interval * k) for k in range(1, count + 1)]


def train_arms(s: Settings, out: Path) -> None:
    """Both arms, at once (one clock) or one after the other (each its own)."""
    if s.sequential:
        train_ours(s, out, time.time())
        train_diffusers(s, out, time.time())
        return
    start = time.time()
    with ThreadPoolExecutor(1) as pool:
        baseline = pool.submit(train_diffusers, s, out, start)
        train_ours(s, out, start)
        baseline.result()


# ------------------------------------------------------------------------------------ snapshots -> pipelines


def ours_pipelines(out: Path) -> list[dict]:
    """A pipeline directory per EMA snapshot of our arm: the run's pipeline with that U-Net."""
    from diffusion.unet import UNet

    base, points = out / "ours" / "pipeline", []
    unet = UNet.from_pretrained(base / "unet")
    for snap in read_jsonl(out / "ours_snapshots" / SNAPSHOTS):
        unet.load_state_dict(torch.load(out / "ours_snapshots" / snap["ema"], weights_only=True)["shadow"])
        points.append({**snap, "pipeline": str(assemble(base, out / "eval" / "ours" / snap["checkpoint"], unet))})
    return points


def diffusers_pipelines(out: Path) -> list[dict]:
    """A pipeline directory per U-Net snapshot of the diffusers arm: imported exactly, at its own latent scale,
    with our run's autoencoder and sampling settings."""
    from diffusion.convert import from_diffusers

    arm, points = out / "diffusers", []
    scale = json.loads((arm / "recipe.json").read_text())["latent_scale"]
    for snap in read_jsonl(arm / SNAPSHOTS):
        target = out / "eval" / "diffusers" / snap["unet"]
        assemble(out / "ours" / "pipeline", target, from_diffusers(arm / snap["unet"]), latent_scale=scale)
        points.append({**snap, "pipeline": str(target)})
    return points


def assemble(base: Path, target: Path, unet: torch.nn.Module, latent_scale: float | None = None) -> Path:
    """``base``'s pipeline (autoencoder, sampling settings, text encoder) with ``unet``, written to ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base / "autoencoder", target / "autoencoder", dirs_exist_ok=True)
    unet.save_pretrained(target / "unet")
    meta = json.loads((base / "pipeline.json").read_text())
    if latent_scale is not None:
        meta["latent_scale"] = latent_scale
    (target / "pipeline.json").write_text(json.dumps(meta, indent=2) + "\n")
    return target


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ------------------------------------------------------------------------------------ scoring


def score(s: Settings, point: dict, threads: int) -> dict:
    """``point`` with the sweep of ``diffusion.evaluate_shapes`` on its pipeline and the best accuracy of it."""
    command = [sys.executable, "-m", "diffusion.evaluate_shapes", point["pipeline"], "--sweep",
               ",".join(f"{g:g}" for g in s.sweep), "--steps", str(s.steps), "--sampler", "dpmpp_2m",
               "--prompts", str(s.prompts), "--samples", str(s.samples), "--threads", str(threads), "--device", "cpu"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=child_env())
    if done.returncode:
        raise RuntimeError(f"scoring {point['pipeline']} failed:\n{done.stderr[-2000:]}")
    sweep = [{"guidance": r["guidance"], "accuracy": r["accuracy"], "diversity": r["diversity"]}
             for r in json.loads(done.stdout)]
    best = max(sweep, key=lambda r: r["accuracy"])
    return {**point, "accuracy": best["accuracy"], "guidance": best["guidance"], "sweep": sweep}


def score_arms(s: Settings, points: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Score both arms' points, the arms in parallel at ``threads`` each unless sequential (then 2x threads)."""
    threads = s.threads * (2 if s.sequential else 1)
    workers = 1 if s.sequential else len(points)

    def arm(name: str) -> list[dict]:
        return [score(s, p, threads) for p in points[name]]

    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(arm, name) for name in points}
        return {name: future.result() for name, future in futures.items()}


def minutes_to(points: list[dict], target: float) -> float | None:
    """The time of the first point whose accuracy reaches ``target`` (None: none does)."""
    return next((p["minutes"] for p in sorted(points, key=lambda p: p["minutes"]) if p["accuracy"] >= target), None)


def verdict(scored: dict[str, list[dict]], s: Settings) -> dict[str, Any]:
    """Minutes to the target per arm and the speed-up (diffusers / ours); a lower bound when only ours got there."""
    ours, theirs = (minutes_to(scored[arm], s.target) for arm in ARMS)
    if ours is None:
        return {"ours": None, "diffusers": theirs, "speedup": None, "speedup_is_lower_bound": False, "met": False}
    bound = theirs is None
    speedup = (theirs if theirs is not None else s.minutes) / ours
    return {"ours": ours, "diffusers": theirs, "speedup": speedup, "speedup_is_lower_bound": bound,
            "met": speedup >= 2.0}


# ------------------------------------------------------------------------------------ assembly


def precisions(out: Path) -> dict[str, Any]:
    """The precision each arm trained in: ours as its run recorded it, the baseline's the script's default."""
    environment = out / "ours" / "environment.json"
    chosen = json.loads(environment.read_text())["precision"] if environment.is_file() else None
    return {"ours": chosen, "diffusers": {"chosen": "fp32", "reason": "the script's default "
                                          f"mixed_precision={DEFAULTS.mixed_precision!r}"}}


def measure(s: Settings, out: Path, train: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (unless ``train`` is False: score the snapshots already in ``out``), score, and return the JSON."""
    begin, before = time.time(), machine_info()
    if train:
        log(f"training both arms for {s.minutes} min each ({'sequential' if s.sequential else 'concurrent'}, "
            f"{s.threads} thread(s) each) into {out}")
        train_arms(s, out)
    points = {"ours": ours_pipelines(out), "diffusers": diffusers_pipelines(out)}
    log(f"scoring {sum(map(len, points.values()))} snapshots")
    scored = score_arms(s, points)
    recipe = json.loads((out / "diffusers" / "recipe.json").read_text())
    return {"command": "python -m bench.ttq_diffusion " + " ".join(sys.argv[1:]), "settings": asdict(s),
            "machine": {**before, "precision": precisions(out)}, "arms": {name: scored[name] for name in ARMS},
            "diffusers_recipe": {"defaults": recipe["defaults"], "scheduler": recipe["scheduler"],
                                 "latent_scale": recipe["latent_scale"]},
            "minutes_to_target": verdict(scored, s), "target": s.target, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "total_minutes": (time.time() - begin) / 60}


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/diffusion/shapes32_quick.yaml", help="our shipped config")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a dotted override for both arms (repeatable), e.g. --set data.size=1000")
    parser.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget per arm")
    parser.add_argument("--interval", type=float, default=2.0, help="minutes between snapshots")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    parser.add_argument("--sequential", action="store_true", help="one arm after the other (default: both at once)")
    parser.add_argument("--save-every", type=int, default=100, help="our run's checkpoint interval in steps")
    parser.add_argument("--sweep", type=number_list, default="1,2,4,8", help="guidance scales; the best counts")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    parser.add_argument("--prompts", type=int, default=32, help="evaluation prompts")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--target", type=float, default=0.9, help="the accuracy to reach")
    parser.add_argument("--seed", type=int, default=0, help="training seed of both arms")
    parser.add_argument("--quick", action="store_true", help="smoke settings (" + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()) + "); not a measurement")
    parser.add_argument("--out", default="runs/ttq_diffusion", help="folder for both runs and their snapshots")
    parser.add_argument("--json", default="docs/ttq_diffusion.json", help="where the results go")
    parser.add_argument("--score-only", action="store_true", help="score the snapshots already in --out")
    args = parser.parse_args(argv)
    values = {k: getattr(args, k) for k in ("minutes", "interval", "save_every", "sweep", "prompts", "samples")}
    values["overrides"] = args.overrides
    if args.quick:
        values.update(QUICK, overrides=QUICK["overrides"] + args.overrides)
    if not (values["minutes"] > 0 and values["interval"] > 0 and args.threads > 0 and values["sweep"]):
        parser.error("--minutes, --interval and --threads must be > 0 and --sweep must name a scale")
    settings = Settings(config=args.config, overrides=tuple(values["overrides"]), minutes=values["minutes"],
                        interval=values["interval"], threads=args.threads, sequential=args.sequential,
                        save_every=values["save_every"], sweep=tuple(values["sweep"]), steps=args.steps,
                        prompts=values["prompts"], samples=values["samples"], target=args.target, seed=args.seed,
                        quick=args.quick)
    return settings, args


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    out = Path(args.out)
    if not args.score_only and out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty; a new measurement needs fresh run directories and latent "
                         f"cache (pass another --out, delete it, or --score-only to score its snapshots again)")
    out.mkdir(parents=True, exist_ok=True)
    result = measure(settings, out, train=not args.score_only)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    found = result["minutes_to_target"]
    print(f"minutes to {settings.target:.0%}: ours {found['ours']}, diffusers {found['diffusers']}; "
          f"speed-up {found['speedup']}{' (lower bound)' if found['speedup_is_lower_bound'] else ''}; "
          f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
