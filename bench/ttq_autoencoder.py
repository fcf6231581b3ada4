"""Time to quality of stage 1: training minutes to a held-out PSNR, ours against taming's recipe and diffusers' VQModel.

    python -m bench.ttq_autoencoder --out runs/ttq_autoencoder --json docs/ttq_autoencoder.json [--minutes 40]
        [--every 1] [--threads 1] [--arms ours,taming,vqmodel] [--config configs/autoencoder/emoji32_quick.yaml]
    python -m bench.ttq_autoencoder --quick --out /tmp/ttq_quick --json /tmp/ttq_quick/ttq.json   # smoke test
    python -m bench.ttq_autoencoder --score-only --out runs/ttq_autoencoder --json docs/ttq_autoencoder.json

Three arms train on one config's data (train split), with its architecture and batch size, each for
``--minutes`` of training wall time on ``--threads`` CPU threads:

- ``ours``: ``accelerate launch autoencoder/train.py CONFIG`` (a subprocess through the public entry point,
  the config's recipe as is), checkpointing every ``--our-save-every`` steps; a snapshot's time is the
  ``seconds`` its step logged in ``metrics.jsonl`` (checkpoint saving counts against ours), and its
  weights are the EMA the run ships (the raw weights are scored too).
- ``taming``: :mod:`bench.taming_recipe` (taming's modules, loss and optimizer settings, fp32).
- ``vqmodel``: diffusers' ``VQModel`` as :mod:`bench.vqmodel_equal_time` trains it (our optimizer and
  precision, L1 + L2 + quantizer loss: diffusers ships no GAN or perceptual loss).

taming and VQModel snapshot their weights every ``--every`` minutes of training (saving is not training
time). Arms run concurrently, as many at once as ``--threads`` fits in the usable cores (the rest after).
Then every snapshot is scored by :func:`autoencoder.evaluate.evaluate` on the held-out split (taming and
VQModel weights converted exactly by :mod:`autoencoder.convert`), so all arms are measured by one function.
Minutes to ``--threshold`` dB: linear interpolation between the last snapshot below it and the first at or
above it; codebook use: that first snapshot's. Writes the results JSON that ``python -m bench.report``
renders (``--ttq-autoencoder``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from autoencoder.convert import from_diffusers, from_taming_state_dict
from autoencoder.evaluate import evaluate
from autoencoder.model import Autoencoder, build_autoencoder
from autoencoder.train_config import TrainConfig
from bench import vqmodel_equal_time as vq
from bench.taming_recipe import TamingTrainer
from common.config import load_config
from common.data import DataConfig
from common.training import read_metrics

ARMS = ("ours", "taming", "vqmodel")
LABELS = {"ours": "ours (latentgen VQ-GAN, the config's recipe)", "taming": "taming-transformers recipe",
          "vqmodel": "diffusers VQModel"}
QUICK = {"minutes": 0.25, "every": 0.05, "our_save_every": 2}
INTERPOLATION = ("Minutes to the threshold: linear interpolation between the last snapshot below it and the first "
                 "at or above it (the first crossing)")
GOAL_FACTOR = 2.0  # issue #17: ours should reach the threshold at least this many times sooner


@dataclass(frozen=True)
class Settings:
    """One measurement: the config every arm shares and how long, how often and on what each trains.

    ``minutes`` is each arm's training budget; ``every`` the minutes of training between taming / VQModel
    snapshots; ``our_save_every`` the steps between our run's checkpoints; ``threshold`` the PSNR in dB.
    """

    config: str
    out: Path
    minutes: float
    every: float
    our_save_every: int
    threads: int
    arms: tuple[str, ...]
    threshold: float
    device: str

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


# ------------------------------------------------------------------------------------ training (one process per arm)


def our_command(s: Settings) -> list[str]:
    """Our arm: the public training entry point with a time budget and every checkpoint kept. Every step logs
    its time (a line of JSON per step, nothing else), so each checkpoint, the last one included, has its time."""
    device = ["--cpu"] if s.device == "cpu" else []
    return ["accelerate", "launch", "--num_processes", "1", "--num_cpu_threads_per_process", str(s.threads), *device,
            "autoencoder/train.py", s.config, f"run.out_dir={s.out / 'ours'}", f"run.max_minutes={s.minutes}",
            f"run.cpu_threads={s.threads}", "run.keep_checkpoints=1000000", f"run.save_every={s.our_save_every}",
            "run.log_every=1", "run.progress=false"]


def worker_command(s: Settings, arm: str) -> list[str]:
    return ["python", "-m", "bench.ttq_autoencoder", "--worker", arm, "--config", s.config, "--out", str(s.out),
            "--minutes", str(s.minutes), "--every", str(s.every), "--threads", str(s.threads), "--device", s.device]


def launch(command: list[str], log: Path, threads: int) -> subprocess.Popen:
    """Start ``command`` with this interpreter (``accelerate`` / ``python`` as in the recorded command)."""
    head = [sys.executable, "-m", "accelerate.commands.launch"] if command[0] == "accelerate" else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "w") as handle:
        return subprocess.Popen(head + command[2 if command[0] == "accelerate" else 1:], stdout=handle,
                                stderr=subprocess.STDOUT, env=env)


def commands(s: Settings) -> dict[str, str]:
    """Each arm's training command, as run (from the repository root)."""
    return {arm: shlex.join(our_command(s) if arm == "ours" else worker_command(s, arm)) for arm in s.arms}


def arms_at_once(s: Settings) -> int:
    """As many arms as ``--threads`` each fits in the usable cores (at least one)."""
    return max(1, len(os.sched_getaffinity(0)) // s.threads)


def train_arms(s: Settings, echo: Callable[[str], None]) -> None:
    """Train every arm, ``usable cores // threads`` at a time."""
    at_once = arms_at_once(s)
    for first in range(0, len(s.arms), at_once):
        wave = s.arms[first:first + at_once]
        echo(f"training {', '.join(wave)} for {s.minutes} min each ({s.threads} thread(s) each)")
        running = {arm: launch(shlex.split(commands(s)[arm]), s.out / f"{arm}.log", s.threads) for arm in wave}
        for arm, process in running.items():
            if process.wait() != 0:
                for other in running.values():  # the measurement is void: do not leave the others training
                    other.terminate()
                tail = (s.out / f"{arm}.log").read_text()[-2000:]
                raise SystemExit(f"error: the {arm} arm failed (exit {process.returncode}); "
                                 f"end of {s.out / f'{arm}.log'}:\n{tail}")


def save_snapshot(model: nn.Module, folder: Path, step: int, seconds: float, index: list[dict]) -> None:
    """The weights at ``seconds`` of training, and a line for them in ``index``."""
    name = f"step_{step:08d}.safetensors"
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, folder / name)
    index.append({"step": step, "seconds": seconds, "file": name})


def run_worker(s: Settings, arm: str) -> None:
    """Train the taming or VQModel arm in this process and write its snapshots and ``training.json``."""
    torch.set_num_threads(s.threads)
    cfg = load_config(TrainConfig, s.config)
    folder, index = s.out / arm / "snapshots", []
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.device(s.device)
    torch.manual_seed(cfg.run.seed)
    if arm == "taming":
        trainer = TamingTrainer(cfg.model, cfg.run.batch_size, device=device)
        clock = vq.TrainingClock(s.every * 60, lambda step, t: save_snapshot(trainer.generator, folder, step, t, index))
        record = {**train_taming(trainer, cfg, s.minutes * 60, device, clock),
                  "recipe": trainer.recipe.record(cfg.run.batch_size), "precision": "fp32"}
    else:
        model = vq.build_vqmodel(cfg.model).to(device)
        clock = vq.TrainingClock(s.every * 60, lambda step, t: save_snapshot(model, folder, step, t, index))
        record = vq.train_for(model, cfg, s.minutes * 60, device, clock=clock)
        record["precision"] = "bf16 autocast" if record.pop("bf16") else "fp32"
    (s.out / arm / "training.json").write_text(json.dumps({**record, "snapshots": index}, indent=2))


def train_taming(trainer: TamingTrainer, cfg: TrainConfig, seconds: float, device: torch.device,
                 clock: vq.TrainingClock) -> dict:
    """taming's steps on ``cfg``'s training batches for ``seconds`` of ``clock``'s training time."""
    data = vq.batches(dataclasses.replace(cfg.data, split="train"), cfg.run.batch_size, cfg.run.seed)
    curve, step = [], 0
    clock.begin()
    while clock.seconds < seconds:
        logs = trainer.step(next(data).to(device))
        step += 1
        if step == 1 or step % 10 == 0:
            curve.append({"step": step, "seconds": clock.seconds, **logs})
        clock.tick(step)
    clock.finish(step)
    return {"steps": step, "seconds": clock.seconds, "curve": curve}


# ------------------------------------------------------------------------------------ scoring


def our_snapshots(run_dir: Path) -> Iterator[tuple[int, float, dict[str, Autoencoder]]]:
    """(step, training seconds, {"ema": ..., "raw": ...}) per checkpoint (one whose step logged no time is
    left out: a run of another log cadence)."""
    cfg = load_config(TrainConfig, run_dir / "config.yaml")
    logged = {int(m["step"]): float(m["seconds"]) for m in read_metrics(run_dir) if "seconds" in m}
    for folder in sorted((run_dir / "checkpoints").glob("step_*[0-9]")):
        step = int(folder.name.split("_")[1])
        if step not in logged:
            continue
        models = {"ema": build_autoencoder(cfg.model), "raw": build_autoencoder(cfg.model)}
        models["raw"].load_state_dict(load_file(str(folder / "model.safetensors")))
        models["ema"].load_state_dict(torch.load(folder / "custom_checkpoint_0.pkl", weights_only=True)["shadow"])
        yield step, logged[step], models


def peer_snapshots(arm: str, folder: Path, cfg: TrainConfig) -> Iterator[tuple[int, float, dict[str, Autoencoder]]]:
    """The taming or VQModel snapshots, converted into our format (exact, by the parity tests)."""
    for item in json.loads((folder / "training.json").read_text())["snapshots"]:
        weights = load_file(str(folder / "snapshots" / item["file"]))
        if arm == "taming":
            model = from_taming_state_dict(weights, resolution=cfg.model.resolution)
        else:
            peer = vq.build_vqmodel(cfg.model)
            peer.load_state_dict(weights)
            model = from_diffusers(peer)
        yield item["step"], item["seconds"], {"model": model}


def score_arm(arm: str, s: Settings, cfg: TrainConfig, data: DataConfig, echo: Callable[[str], None]) -> list[dict]:
    """One row per snapshot: minutes, step and the held-out scores (ours: of the EMA, plus the raw weights')."""
    snapshots = our_snapshots(s.out / arm) if arm == "ours" else peer_snapshots(arm, s.out / arm, cfg)
    rows = []
    for step, seconds, models in snapshots:
        scores = {name: evaluate(model.eval(), data) for name, model in models.items()}
        main = scores.pop("ema" if "ema" in scores else "model")
        row = {"minutes": seconds / 60, "step": step, **{k: main[k] for k in ("psnr", "ssim", "codebook_used",
                                                                               "perplexity")}}
        if "raw" in scores:
            row["raw"] = {k: scores["raw"][k] for k in ("psnr", "codebook_used")}
        rows.append(row)
        echo(f"  {arm} {row['minutes']:5.2f} min, step {step}: PSNR {row['psnr']:.2f} dB, "
             f"codebook used {row['codebook_used']:.3f}")
    if not rows:
        raise SystemExit(f"error: the {arm} arm left no snapshots in {s.out / arm}; train longer (--minutes) or "
                         f"snapshot more often (--every / --our-save-every)")
    return rows


def minutes_to(rows: list[dict], threshold: float) -> dict[str, Any]:
    """Minutes to ``threshold`` dB, interpolated linearly between the snapshots around the first crossing;
    the codebook use of the first snapshot at or above it. Reached at the first snapshot: an upper bound."""
    previous = None
    for row in sorted(rows, key=lambda r: r["minutes"]):
        if row["psnr"] >= threshold:
            if previous is None:
                return {"minutes": row["minutes"], "upper_bound": True, "codebook_used": row["codebook_used"],
                        "step": row["step"]}
            share = (threshold - previous["psnr"]) / (row["psnr"] - previous["psnr"])
            minutes = previous["minutes"] + share * (row["minutes"] - previous["minutes"])
            return {"minutes": minutes, "upper_bound": False, "codebook_used": row["codebook_used"],
                    "step": row["step"]}
        previous = row
    return {"minutes": None, "upper_bound": False, "codebook_used": None, "step": None}


def goal(arms: dict[str, dict]) -> dict[str, Any]:
    """Ours against each peer: peer minutes / our minutes (a lower bound, from the peer's training time, when the
    peer never got there)."""
    ours = arms.get("ours", {}).get("to_threshold", {}).get("minutes")
    verdicts = {}
    for peer in (a for a in arms if a != "ours"):
        theirs = arms[peer]["to_threshold"]["minutes"]
        if ours is None:
            verdicts[peer] = {"ratio": None, "lower_bound": False, "met": False if theirs is not None else None}
            continue
        ratio = (theirs if theirs is not None else arms[peer]["seconds"] / 60) / ours
        met = ratio >= GOAL_FACTOR if theirs is not None or ratio >= GOAL_FACTOR else None
        verdicts[peer] = {"ratio": ratio, "lower_bound": theirs is None, "met": met}
    return {"factor": GOAL_FACTOR, "ours_minutes": ours, "peers": verdicts}


# ------------------------------------------------------------------------------------ the command


def arm_record(arm: str, s: Settings, rows: list[dict]) -> dict[str, Any]:
    folder = s.out / arm
    if arm == "ours":
        metrics = [m for m in read_metrics(folder) if "seconds" in m]
        precision = load_config(TrainConfig, folder / "config.yaml").run.precision
        training = {"steps": int(metrics[-1]["step"]), "seconds": metrics[-1]["seconds"], "precision": precision,
                    "scored_weights": "EMA (what the run ships; raw weights under 'raw')"}
    else:
        training = json.loads((folder / "training.json").read_text())
        training.pop("snapshots")
    return {"label": LABELS[arm], "command": commands(s)[arm], **training, "snapshots": rows,
            "to_threshold": minutes_to(rows, s.threshold)}


def run(s: Settings, train: bool = True, echo: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Train (unless ``train`` is False: score what ``s.out`` holds) and score every arm; returns the results."""
    cfg = load_config(TrainConfig, s.config)
    if cfg.model.kind != "vq":
        raise SystemExit(f"error: {s.config} configures a {cfg.model.kind!r} autoencoder; this compares VQ models")
    if train:
        s.out.mkdir(parents=True, exist_ok=True)
        train_arms(s, echo)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # scoring is not timed
    data = DataConfig(name=cfg.data.name, resolution=cfg.model.resolution, split="heldout", path=cfg.data.path,
                      size=cfg.data.size)
    echo(f"scoring every snapshot on {cfg.data.name} heldout")
    arms = {arm: arm_record(arm, s, score_arm(arm, s, cfg, data, echo)) for arm in s.arms}
    from bench.measure import machine_info

    machine = machine_info()
    data = {"name": cfg.data.name, "split": "heldout", "resolution": cfg.model.resolution,
            "batch_size": cfg.run.batch_size}
    return {"settings": {**s.record(), "arms_at_once": arms_at_once(s)}, "threshold_db": s.threshold, "data": data,
            "machine": machine, "arms": arms, "goal": goal(arms), "interpolation": INTERPOLATION}


def merge(result: dict[str, Any], earlier: dict[str, Any]) -> None:
    """Add the arms of an ``earlier`` results file that ``result`` did not measure (its own arms win)."""
    taken = [arm for arm in earlier["arms"] if arm not in result["arms"]]
    arms = {**{arm: earlier["arms"][arm] for arm in taken}, **result["arms"]}
    result["arms"] = {arm: arms[arm] for arm in ARMS if arm in arms}
    result["goal"] = goal(result["arms"])
    result["command"] += f"; arms {', '.join(taken)} from `{earlier['command']}`"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/autoencoder/emoji32_quick.yaml", help="our stage-1 config")
    parser.add_argument("--out", default="runs/ttq_autoencoder", help="a new folder for the arms' runs and snapshots")
    parser.add_argument("--json", default="", help="results file (default: OUT/ttq_autoencoder.json)")
    parser.add_argument("--minutes", type=float, default=40.0, help="training minutes per arm")
    parser.add_argument("--every", type=float, default=1.0, help="minutes between taming / VQModel snapshots")
    parser.add_argument("--our-save-every", type=int, default=50, help="steps between our arm's checkpoints")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per arm")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--threshold", type=float, default=22.0, help="held-out PSNR (dB) to reach")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 15 s per arm, snapshots every 3 s")
    parser.add_argument("--score-only", action="store_true", help="score the snapshots OUT already holds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--merge", default="", help="a results file whose arms join this run's: those this run "
                                                    "did not measure (e.g. train one peer longer with --arms X "
                                                    "and merge the earlier file for the other arms)")
    parser.add_argument("--also", default="", help="a results file measured on another machine, kept beside "
                                                   "this run's (minutes compare only within one machine)")
    parser.add_argument("--worker", choices=("taming", "vqmodel"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.every, args.our_save_every = QUICK["minutes"], QUICK["every"], QUICK["our_save_every"]
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; valid: {', '.join(ARMS)}")
    if min(args.minutes, args.every, args.our_save_every, args.threads) <= 0:
        parser.error("--minutes, --every, --our-save-every and --threads must be > 0")
    out = Path(args.out)
    if not args.worker and not args.score_only and out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty (our arm would resume from its checkpoints); pass a new folder, "
                     f"delete it, or add --score-only to score what it holds")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    s = Settings(config=args.config, out=Path(args.out), minutes=args.minutes, every=args.every,
                 our_save_every=args.our_save_every, threads=args.threads,
                 arms=tuple(a for a in ARMS if a in args.arms.split(",")), threshold=args.threshold, device=args.device)
    if args.worker:
        run_worker(s, args.worker)
        return None
    started = time.perf_counter()
    result = run(s, train=not args.score_only, echo=lambda line: print(line, file=sys.stderr, flush=True))
    result["command"] = shlex.join(["python", "-m", "bench.ttq_autoencoder", *(sys.argv[1:] if argv is None else argv)])
    result["total_minutes"] = (time.perf_counter() - started) / 60
    if args.merge:
        merge(result, json.loads(Path(args.merge).read_text()))
    if args.also:
        earlier = json.loads(Path(args.also).read_text())
        result["also"] = [{k: v for k, v in earlier.items() if k != "also"}, *earlier.get("also", [])]
    path = Path(args.json) if args.json else s.out / "ttq_autoencoder.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, path)
    for arm, record in result["arms"].items():
        to = record["to_threshold"]
        when = "not reached" if to["minutes"] is None else f"{to['minutes']:.2f} min"
        print(f"{arm}: {s.threshold:g} dB {when}; best PSNR {max(r['psnr'] for r in record['snapshots']):.2f} dB")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
