"""What every training script shares: the run config, the accelerator, a resumable data stream,
atomic training checkpoints, metrics logs and the step/wall-clock budget.

A run directory looks like::

    run_dir/config.yaml                resolved config
    run_dir/metrics.jsonl              one JSON object per logged step
    run_dir/checkpoints/step_00001000  accelerate state: models, optimizers, schedulers, RNG, EMA, ...
    run_dir/checkpoints/latest         name of the newest complete checkpoint
    run_dir/.lock                      the run's writer (:mod:`common.run_control`)

Checkpoints on disk live in :mod:`common.run_state` (re-exported here), the lock and the stop signals in
:mod:`common.run_control`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar, Union

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, Sampler

from common.checkpoint import CheckpointError, atomic_write
from common.compile import CompileChoice, CompileMode, compile_in_place, resolve_compile
from common.config import ConfigError, load_config
from common.data import DataError
from common.environment import accelerator_available, accelerator_type, environment_record
from common.precision import Precision, resolve_precision
from common.progress import TrainingProgress
from common.run_control import (
    STOP,
    STOPPED_EXIT_CODE,
    RunDirLocked,
    TrainingStopped,
    main_process,
    release_run_locks,
    watch_stop_signals,
)
from common.run_state import checkpoint_root, claim_run_dir, latest_checkpoint, save_training_state  # noqa: F401 - API

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RunConfig:
    """How a training run is driven (shared by every stage).

    steps / max_minutes: stop at whichever comes first (max_minutes 0 = no wall-clock budget).
    batch_size: per process; the effective batch is batch_size * processes * grad_accum.
    precision: "auto" (the default) picks bf16 only where the device runs it natively faster, fp16 on a
        CUDA device without bf16, fp32 otherwise (:mod:`common.precision`); "fp32" (or accelerate's "no"),
        "bf16" and "fp16" force one. The choice and its reason are logged and saved with the run.
    max_skipped_steps: a step with a non-finite loss is skipped; one more than this many in a row stops
        the run (0: stop at the first), leaving the last checkpoint as it was.
    cpu_threads: torch threads per process when training on CPU; 0 = the usable cores divided among
        the processes on this machine (``accelerate launch`` alone would leave one thread per process).
    compile: "auto" (the default) compiles the trained network with torch.compile only on runs long enough
        to repay the compile time, never on short ones (the rule: :mod:`common.compile`); true / false force
        it. The choice and its reason are logged and saved with the run.
    """

    out_dir: str = "runs/default"
    steps: int = 1000
    max_minutes: float = 0.0
    batch_size: int = 32
    grad_accum: int = 1
    precision: Precision = "auto"
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    num_workers: int = 0
    ema_decay: float = 0.999
    max_skipped_steps: int = 10
    cpu_threads: int = 0
    progress: bool = True
    compile: CompileMode = "auto"

    def __post_init__(self) -> None:
        if self.compile not in ("auto", True, False):
            raise ConfigError(f"compile={self.compile!r} is not one of auto, true, false; set run.compile to one")
        check_ranges(self, steps=(0, None, "0 only builds what the run needs (e.g. the latent cache) and stops"),
                     max_minutes=(0, None, "0 = no wall-clock budget"), batch_size=(1, None, ""),
                     grad_accum=(1, None, ""), seed=(0, 2**32 - 1, ""), log_every=(1, None, ""),
                     sample_every=(1, None, "a number above run.steps never samples"),
                     save_every=(1, None, "a number above run.steps saves at the end only"),
                     keep_checkpoints=(1, None, "the newest checkpoint is always kept"), num_workers=(0, None, ""),
                     ema_decay=(0, 1, ""), max_skipped_steps=(0, None, ""), cpu_threads=(0, None, "0 = automatic"))


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up, then cosine decay to ``lr_floor`` x lr at ``decay_steps``.

    The schedule is its own setting rather than ``run.steps``, so where a run stops (step cap,
    wall-clock budget, interruption) never changes the learning rate it trains with.
    ``decay_steps: 0`` keeps the learning rate constant after the warm-up.
    """

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    decay_steps: int = 0
    lr_floor: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr!r} is out of range: it must be a finite number > 0; set lr to a value "
                              f"in that range, e.g. 2e-4")
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise ConfigError(f"betas[{i}]={beta!r} is out of range: each beta must be in [0, 1); set betas "
                                  f"to values in that range, e.g. [0.9, 0.99]")
        check_ranges(self, weight_decay=(0, None, ""), warmup_steps=(0, None, ""),
                     decay_steps=(0, None, "0 = constant after the warm-up"), lr_floor=(0, 1, ""),
                     grad_clip=(0, None, "0 = no clipping"))


def check_ranges(config: Any, **ranges: tuple[float, float | None, str]) -> None:
    """Raise :class:`ConfigError` for the first field of ``config`` outside its ``(low, high, note)``
    (``high`` None: unbounded; both ends included; NaN and inf always refused)."""
    for name, (low, high, note) in ranges.items():
        value = getattr(config, name)
        if math.isfinite(value) and low <= value and (high is None or value <= high):
            continue
        valid = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name}={value!r} is out of range: it must be {valid}{f' ({note})' if note else ''}; "
                          f"set {name} to a value in that range")


def make_optimizer(params: Any, optim: OptimConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """An AdamW optimizer over ``params`` and its warm-up + cosine schedule (stepped once per step).

    Fused where every parameter allows it: torch's CPU default loops over the tensors in Python (emoji
    U-Net, 1 thread: 10.6 ms a step against 2.9 ms fused, 8 % of the training step). Same update to rounding.
    """
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors) or None
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
                                  fused=fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_warmup(step, optim.warmup_steps, optim.decay_steps, optim.lr_floor))
    return optimizer, schedule


def make_accelerator(run: RunConfig) -> Accelerator:
    """An Accelerator for ``run`` with tensorboard logging into the run directory, seeded, in the
    precision :func:`common.precision.resolve_precision` picks for this machine (logged, and written
    with the package versions to ``run_dir/environment.json``)."""
    on_cpu = not accelerator_available()
    device_type = "cpu" if on_cpu else _accelerator_device().type
    compile_choice(run, device_type, "fp32")  # an impossible run.compile=true fails before anything is written
    Path(run.out_dir).mkdir(parents=True, exist_ok=True)
    if on_cpu:  # before the precision probe, which must time the thread count training will use
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(run.cpu_threads or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    choice = resolve_precision(run.precision, "cpu" if on_cpu else _accelerator_device())
    compiled = compile_choice(run, device_type, choice.precision)
    # Schedulers step once per optimizer step whatever the process count (accelerate's default
    # steps them once per process, which silently changes the schedule with the cluster size).
    # cpu=True when there is no accelerator: only then does `accelerate launch --multi_gpu` on a CPU
    # machine give real multi-process training (gloo) instead of N independent single processes.
    accelerator = Accelerator(mixed_precision=choice.accelerate_name, gradient_accumulation_steps=run.grad_accum,
                              log_with="tensorboard", project_dir=run.out_dir, step_scheduler_with_optimizer=False,
                              cpu=on_cpu)
    claim_run_dir(run.out_dir, accelerator)  # before the first file is written there
    watch_stop_signals()
    accelerator.init_trackers("tensorboard")
    accelerator.print(f"precision: {choice.precision} ({choice.reason})")
    accelerator.print(f"compile: {'yes' if compiled.compile else 'no'} ({compiled.reason})")
    if accelerator.is_main_process:
        record = {"precision": choice.as_record(), "compile": compiled.as_record(), **environment_record()}
        atomic_write(Path(run.out_dir) / "environment.json", lambda path: path.write_text(json.dumps(record, indent=1)))
    set_seed(run.seed, device_specific=True)
    return accelerator


def _accelerator_device() -> torch.device:
    """The device accelerate will pick when an accelerator is present (its type; the index follows LOCAL_RANK)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device(accelerator_type() or "cpu")


def compile_choice(run: RunConfig, device_type: str, precision: str) -> CompileChoice:
    """Whether this run compiles its network on ``device_type`` (:func:`common.compile.resolve_compile`)."""
    return resolve_compile(run.compile, device_type, run.steps, run.max_minutes, precision)


def trained_precision(accelerator: Accelerator) -> str:
    """The precision ``accelerator`` trains in: fp32, bf16 or fp16."""
    return {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)


def resolved_config(cfg: Any, accelerator: Accelerator) -> Any:
    """``cfg`` with ``run.precision`` and ``run.compile`` replaced by what this run actually does, for config.yaml."""
    chosen = trained_precision(accelerator)
    compiled = compile_choice(cfg.run, accelerator.device.type, chosen).compile
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, precision=chosen, compile=compiled))


class StreamSampler(Sampler[int]):
    """An endless, seeded stream of dataset indices, sharded over processes, that can start mid-way.

    Epoch e is a permutation drawn from ``seed + e``; process r takes every ``world``-th index from
    position r. Starting at ``start`` (counted in this process's samples) reproduces exactly the
    indices an uninterrupted run would have seen, which is what makes resume bit-exact.
    """

    def __init__(self, length: int, seed: int = 0, rank: int = 0, world: int = 1, start: int = 0) -> None:
        if length < world:
            raise ValueError(f"the dataset has {length} items, fewer than the {world} processes")
        self.length, self.seed, self.rank, self.world, self.start = length, seed, rank, world, start

    def __iter__(self) -> Iterator[int]:
        per_epoch = self.length // self.world
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from order[self.rank::self.world][offset:per_epoch].tolist()
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2**62


def make_loader(dataset: Dataset, run: RunConfig, accelerator: Accelerator, step: int = 0) -> Iterator[dict]:
    """Endless batches for this process, positioned at optimizer step ``step``."""
    samples_done = step * run.batch_size * run.grad_accum
    sampler = StreamSampler(len(dataset), run.seed, accelerator.process_index, accelerator.num_processes, samples_done)
    # The loader gets its own generator: starting an iterator draws a worker seed, and drawing it from
    # the global RNG would shift the RNG stream a resumed run restores.
    loader = DataLoader(dataset, batch_size=run.batch_size, sampler=sampler, num_workers=run.num_workers,
                        drop_last=True, pin_memory=accelerator.device.type == "cuda",
                        persistent_workers=run.num_workers > 0,
                        generator=torch.Generator().manual_seed(run.seed + accelerator.process_index))
    for batch in loader:
        yield {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Budget:
    """Stop after ``steps`` optimizer steps, after ``max_minutes`` of wall time or at a stop request
    (SIGTERM/SIGINT, :data:`common.run_control.STOP`; ``stopped_by`` then names it), whichever comes first.

    Under several processes the clock and the request are agreed on (either one on any process stops
    all), so all processes stop at the same step.
    """

    def __init__(self, run: RunConfig, accelerator: Accelerator) -> None:
        self.steps, self.seconds = run.steps, run.max_minutes * 60
        self.run, self.accelerator, self.stopped_by = run, accelerator, None
        self.start = time.monotonic()
        self.show = run.progress and accelerator.is_main_process

    def progress(self, step: int, desc: str) -> TrainingProgress:
        """The progress bar for this budget (drawn by the main process only, unless ``run.progress`` is off)."""
        return TrainingProgress(self, step, desc, self.show)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def done(self, step: int) -> bool:
        if step >= self.steps:
            return True
        clock, signalled = bool(self.seconds) and self.elapsed >= self.seconds, STOP.reason is not None
        if self.accelerator.num_processes > 1:
            flags = torch.tensor([float(clock), float(signalled)], device=self.accelerator.device)
            clock, signalled = (bool(f) for f in self.accelerator.reduce(flags, reduction="sum").tolist())
        if signalled:
            self.stopped_by = STOP.reason or "a stop signal on another process"
        return clock or signalled


class MetricsLog:
    """Append metrics to ``metrics.jsonl`` (main process) and to the accelerator's trackers.

    A run resumed at ``step`` first drops the lines an interrupted run logged after that step: they
    are logged again, and a step must appear once.
    """

    def __init__(self, accelerator: Accelerator, run_dir: str | Path, step: int = 0) -> None:
        self.accelerator = accelerator
        self.path = Path(run_dir) / "metrics.jsonl"
        if accelerator.is_main_process and self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if _logged_step(line) <= step]
            if len(kept) < len(lines):
                atomic_write(self.path, lambda path: path.write_text("".join(kept)))

    def log(self, step: int, values: dict[str, Any]) -> dict[str, float]:
        clean = {k: float(v.detach().float().mean()) if torch.is_tensor(v) else float(v) for k, v in values.items()}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, **clean}) + "\n")
        self.accelerator.log(clean, step=step)
        return clean


def _logged_step(line: str) -> float:
    """The step a metrics line was logged at; infinite for a line cut short by a kill (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The logged metrics of a run, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class NonFiniteLossError(RuntimeError):
    """A run stopped after more than ``run.max_skipped_steps`` non-finite losses in a row."""


class NonFiniteSkips:
    """Skip optimizer steps whose loss is not finite; stop past ``run.max_skipped_steps`` in a row.

    Skipping (rather than stepping) keeps NaN/inf out of the weights, the EMA and every checkpoint.
    A finite step (:meth:`ok`) resets the count, so rare spikes in a long run never stop it, while a
    run that has diverged stops at once, with its last checkpoint as it was.
    """

    def __init__(self, run: RunConfig, accelerator: Accelerator) -> None:
        self.limit, self.run_dir, self.accelerator = run.max_skipped_steps, run.out_dir, accelerator
        self.count = self.total = 0

    def ok(self) -> None:
        """A finite step: the count of consecutive skips starts again."""
        self.count = 0

    def skip(self, step: int, loss: torch.Tensor) -> None:
        """Report a skipped step; raise :class:`NonFiniteLossError` when there were too many in a row."""
        self.count += 1
        self.total += 1
        self.accelerator.print(f"step {step}: non-finite loss ({float(loss.detach().float().mean())}), update "
                               f"skipped ({self.count} in a row, {self.total} in this run; "
                               f"run.max_skipped_steps={self.limit})")
        if self.count > self.limit:
            last = latest_checkpoint(self.run_dir)
            kept = (f"The last checkpoint, {last}, is intact: re-running the same command resumes from it"
                    if last is not None else "No checkpoint was written before this")
            raise NonFiniteLossError(
                f"stopping at step {step}: {self.count} non-finite losses in a row, more than "
                f"run.max_skipped_steps={self.limit}. {kept}. To avoid it, lower optim.lr or raise "
                f"optim.warmup_steps, train with run.precision=no or bf16 rather than fp16, and check the data "
                f"for NaN/inf values.")


# An LR scheduler, or (scheduler, active) where active(step) says whether it steps after an update at ``step``.
Sched = Union[Any, tuple[Any, Callable[[int], bool]]]


def optimizer_steps(accelerator: Accelerator, models: torch.nn.Module | Sequence[torch.nn.Module],
                    batches: Iterator[dict], update: Callable[[dict, int], tuple[torch.Tensor, bool, Any]], *,
                    step: int, budget: Budget, skips: NonFiniteSkips, scheds: Sched | Sequence[Sched], ema: Any,
                    bar: Any) -> Iterator[tuple[int, torch.Tensor, Any]]:
    """The training loop every script shares; yields ``(step, loss, extras)`` after each optimizer step,
    for the caller to log, sample and save.

    ``update(batch, step) -> (loss, finite, extras)`` runs one (micro-)step of every optimizer under
    gradient accumulation of ``models`` (the first is the one the EMA follows). A non-finite ``loss``
    is reported to ``skips`` (which raises after too many in a row) and does not count as a step; nor
    does an accumulation micro-step. ``scheds`` is one scheduler or a sequence of them; after a real
    step each one whose ``active(step)`` holds steps (a bare scheduler always does), then the EMA,
    ``step`` and the progress bar advance. Kept in one place so that the order of these calls, which
    a bit-exact resume depends on, cannot drift between scripts. Stops when ``budget`` is spent, only
    between optimizer steps (never within an accumulation); stopped by a signal, it saves the training
    state and raises :class:`common.run_control.TrainingStopped`. The first of ``models`` is compiled in
    place first when ``run.compile`` says so (after the EMA copied it: the shadow stays eager).
    """
    models = (models,) if isinstance(models, torch.nn.Module) else tuple(models)
    if compile_choice(budget.run, accelerator.device.type, trained_precision(accelerator)).compile:
        compile_in_place(models[0])
    scheds = [sched if isinstance(sched, tuple) else (sched, None)
              for sched in ((scheds,) if hasattr(scheds, "step") else scheds)]
    between_steps = True
    while not (between_steps and budget.done(step)):
        with accelerator.accumulate(*models):
            loss, finite, extras = update(next(batches), step)
        between_steps = accelerator.sync_gradients
        if not finite:
            skips.skip(step, loss)
            continue
        skips.ok()
        if not between_steps:
            continue  # gradient accumulation: the optimizers have not stepped yet
        for sched, active in scheds:
            if active is None or active(step):
                sched.step()
        ema.update(accelerator.unwrap_model(models[0]))
        step += 1
        bar.update(1)
        yield step, loss, extras
    if budget.stopped_by is not None:
        bar.close()
        saved = save_training_state(accelerator, budget.run.out_dir, step, budget.run.keep_checkpoints)
        accelerator.end_training()
        raise TrainingStopped(budget.stopped_by, step, saved)


def load_run_config(cls: type[T], argv: Sequence[str] | None, doc: str | None, stage: str, example: str) -> T:
    """A training script's command line, ``CONFIG [key=value ...]``, read into its config class ``cls``.

    ``doc`` (the script's docstring) is the help text, ``stage`` names the folder under ``configs/`` the
    YAML files live in and ``example`` is a sample override for the help.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help=f"YAML file under configs/{stage}/")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides)


def end_run(accelerator: Accelerator) -> None:
    """A finished run lets go of what it took: trackers, the run-directory lock, the stop-signal handlers
    (so a notebook that called a script's ``main`` gets its Ctrl-C back)."""
    accelerator.end_training()
    release_run()


def release_run() -> None:
    """Give back the run-directory lock and the stop-signal handlers (idempotent: a run ends here once or twice)."""
    release_run_locks()
    STOP.restore()


def run_cli(main: Callable[[Sequence[str]], Any], argv: Sequence[str], *user_errors: type[Exception]) -> None:
    """Run a training script's ``main(argv)``; a mistake in its input ends it with the message alone.

    Config, data, checkpoint, lock and missing-file errors (plus ``user_errors``) exit with status 1 and
    ``error: <message>`` on stderr; a traceback would only hide the message, which names the fix. A run
    stopped by a signal exits with :data:`common.run_control.STOPPED_EXIT_CODE` after one message. Under
    several processes only the main one prints. The run-directory lock and the signal handlers end with it.
    """
    try:
        main(list(argv))
    except TrainingStopped as stopped:
        if main_process():
            print(stopped, file=sys.stderr)
        raise SystemExit(STOPPED_EXIT_CODE) from None
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, NonFiniteLossError, RunDirLocked,
            *user_errors) as error:
        raise SystemExit(f"error: {error}" if main_process() else 1) from None
    finally:
        release_run()


def all_finite(value: torch.Tensor, accelerator: Accelerator) -> bool:
    """True when ``value`` is finite on every process (so all processes skip or stop together)."""
    flag = torch.isfinite(value.detach()).all().float().reshape(1)
    return bool(accelerator.reduce(flag, reduction="min").item()) if accelerator.num_processes > 1 else bool(flag)


def apply_update(loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer, accelerator: Accelerator,
                 grad_clip: float) -> tuple[bool, torch.Tensor | None]:
    """Backward, clip and step on a finite ``loss``; on a non-finite one only clear the gradients.

    Returns (whether the loss was finite, the gradient norm before clipping or None). The finiteness
    check runs before backward so that NaN never reaches the weights, on any process.
    """
    if not all_finite(loss, accelerator):
        opt.zero_grad(set_to_none=True)
        return False, None
    accelerator.backward(loss)
    norm = None
    if accelerator.sync_gradients and grad_clip:
        norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return True, norm


def cosine_warmup(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up for ``warmup`` steps, then cosine decay to ``floor`` at ``total``
    (``total`` 0: constant after the warm-up)."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= 0:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
