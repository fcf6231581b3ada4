"""The sampler table: shapes prompt accuracy of each sampler and sigma spacing at few steps, against DDPM.

    python -m bench.sampler_table runs/shapes32_diffusion --threads 1      # writes docs/sampler_table.json

1. A small guidance sweep (DPM-Solver++(2M), 20 steps, as the report's shapes section runs it) picks
   the best guidance scale: the most accurate, ties to the more diverse.
2. At that scale, DDPM with 1000 steps is the reference, and every sampler of ``--samplers`` with every
   sigma spacing of ``--spacings`` runs at each step count of ``--steps``, on the same prompts and seeds
   (DDPM and DDIM take no sigma spacing: they get the "default" rows only).

Each setting is one ``python -m diffusion.evaluate_shapes`` call (run in-process through its
``evaluate``), recorded with its equivalent command. This measures accuracy, not speed: the seconds
in the JSON only say what the run took. ``bench.report`` renders ``sampler_table.json`` from its
output folder in its "Sampler steps vs quality" section when the file is there, and otherwise
measures the table itself with its profile's settings.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffusion.samplers import SAMPLERS as SAMPLER_NAMES
from diffusion.samplers import SIGMA_SPACING_SAMPLERS
from diffusion.schedules import SIGMA_SPACINGS

STEPS = (5, 10, 20)
SAMPLERS = ("dpmpp_2m", "euler", "unipc")
SPACINGS = ("default", "karras", "exponential")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="runs/shapes32_diffusion", help="shapes diffusion run")
    parser.add_argument("--out", default="docs/sampler_table.json", help="where the JSON goes")
    parser.add_argument("--sweep", default="2,4,8", help="guidance scales of the sweep that picks the best one")
    parser.add_argument("--sweep-prompts", type=int, default=32, help="prompts of the sweep")
    parser.add_argument("--sweep-samples", type=int, default=4, help="samples per prompt of the sweep")
    parser.add_argument("--prompts", type=int, default=16, help="prompts of each table row (the report's 16)")
    parser.add_argument("--samples", type=int, default=2, help="samples per prompt of each table row")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="step counts")
    parser.add_argument("--ddpm-steps", type=int, default=1000, help="the reference DDPM's steps")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help="samplers to tabulate")
    parser.add_argument("--spacings", default=",".join(SPACINGS), help="sigma spacings to tabulate")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    args.steps = [int(n) for n in args.steps.split(",")]
    args.sweep = [float(g) for g in args.sweep.split(",")]
    args.samplers, args.spacings = args.samplers.split(","), args.spacings.split(",")
    unknown = [name for name in args.samplers if name not in SAMPLER_NAMES] + [
        spacing for spacing in args.spacings if spacing not in SIGMA_SPACINGS]
    if unknown:  # before the sweep, not after it
        parser.error(f"unknown {unknown}; samplers: {', '.join(SAMPLER_NAMES)}; spacings: {', '.join(SIGMA_SPACINGS)}")
    return args


def scorer(run_dir: str, device: str, threads_flag: Sequence[str] = (),
           log: Callable[[str], None] = print) -> Callable[..., dict]:
    """``score(guidance, sampler, steps, spacing, prompts, samples)``: one evaluate_shapes setting on the
    pipeline of ``run_dir`` (loaded once), with its equivalent command."""
    from diffusion import evaluate_shapes

    pipe = evaluate_shapes.load(run_dir, device)

    def score(guidance: float, sampler: str, steps: int, spacing: str, prompts: int, samples: int) -> dict:
        argv = [run_dir, "--guidance", str(guidance), "--steps", str(steps), "--sampler", sampler,
                *(["--sigma-spacing", spacing] if spacing != "default" else []), "--prompts", str(prompts),
                "--samples", str(samples), f"--device={device}"]
        result = evaluate_shapes.evaluate(pipe, evaluate_shapes.parse_args(argv), guidance)
        log(f"  guidance {guidance} {sampler} {spacing} {steps} steps: accuracy {result['accuracy']:.3f} "
            f"({result['seconds']:.0f} s)")
        return {**result, "command": shlex.join(["python", "-m", "diffusion.evaluate_shapes", *argv, *threads_flag])}

    return score


def best(results: list[dict]) -> dict:
    """The most accurate setting; ties go to the more diverse one (as bench.report picks)."""
    return max(results, key=lambda r: (r["accuracy"], r["diversity"]))


def table(score: Callable[..., dict], guidance: float, *, prompts: int, samples: int, steps: Sequence[int],
          ddpm_steps: int, samplers: Sequence[str] = SAMPLERS, spacings: Sequence[str] = SPACINGS) -> dict:
    """DDPM at ``ddpm_steps`` and every sampler x spacing x step count at ``guidance``, same prompts and seeds."""
    rows = [score(guidance, sampler, n, spacing, prompts, samples)
            for sampler in samplers for spacing in spacings for n in steps
            if spacing == "default" or sampler in SIGMA_SPACING_SAMPLERS]
    return {"guidance": guidance, "results": rows, "reference": score(guidance, "ddpm", ddpm_steps, "default",
                                                                      prompts, samples)}


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """The sweep, then the table at its best guidance; returns the JSON-ready result."""
    threads = [f"--threads={args.threads}"] if args.threads else []
    score = scorer(args.run_dir, args.device, threads, log)
    sweep = [score(g, "dpmpp_2m", 20, "default", args.sweep_prompts, args.sweep_samples) for g in args.sweep]
    guidance = best(sweep)["guidance"]
    log(f"best guidance {guidance}")
    result = table(score, guidance, prompts=args.prompts, samples=args.samples, steps=args.steps,
                   ddpm_steps=args.ddpm_steps, samplers=args.samplers, spacings=args.spacings)
    return {**result, "why": f"the best of a sweep over {', '.join(map(str, args.sweep))} (DPM-Solver++(2M), 20 steps, "
                             f"{args.sweep_prompts} prompts x {args.sweep_samples} samples)", "sweep": sweep}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    minutes = round((time.perf_counter() - start) / 60, 1)
    record: dict[str, Any] = {"command": shlex.join(["python", "-m", "bench.sampler_table", *argv]),
                              "threads": torch.get_num_threads(), "minutes": minutes,
                              "date": time.strftime("%Y-%m-%d %H:%M %Z"), **result}
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, out)
    print(f"wrote {out} in {record['minutes']} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
