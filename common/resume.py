"""Resuming a run: check that the command may continue its newest checkpoint, restore it, and record the
config it continues with.

Every training script calls :func:`resume_run` once, after ``accelerator.prepare`` and after registering
what else it checkpoints (the EMA), so that what is checked and applied on resume lives in one place:

1. The new resolved config is compared with the run's ``config.yaml``. What a resumed run may change is
   one table, :data:`RESUME_SAFE`; any other difference (the model, the data, the autoencoder, the text
   encoder, the diffusion, loss or quantizer settings, the batch or the seed) is refused before anything
   is loaded or written, naming each key with its old and new value and the two ways out: put the value
   back, or fork a new run from the checkpoint (:func:`fork_command`; a run directory without
   ``config.yaml`` resumes unchecked, which is what a fork is).
2. Every pickled file of the checkpoint is read with torch's weights-only unpickler and an explicit
   allow-list (:mod:`common.safe_pickle`) before accelerate reads it: accelerate unpickles
   ``custom_checkpoint_*.pkl`` with ``weights_only=False``, which would run code planted there.
3. The state is restored, then the command's optimizer settings and EMA decay are put back on the restored
   objects: accelerate restores the checkpoint's learning rates, betas and weight decay (and the EMA its
   decay), which would silently override what the command and ``config.yaml`` say.
4. ``config.yaml`` is rewritten, with a line listing what changed.
"""
from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from accelerate import Accelerator

from common.checkpoint import CheckpointError, atomic_write
from common.config import ConfigError, from_dict, to_dict
from common.ema import EMA
from common.safe_pickle import check_checkpoint_pickles
from common.training import latest_checkpoint, resolved_config

# What a resumed run may change (fnmatch patterns over dotted config keys), each with how the change is
# honoured. Anything else defines the weights, the data or the latents the checkpoint was trained on (or
# the position in the data stream: run.batch_size, run.grad_accum, run.seed) and is refused. One table:
# a new config field is refused on resume until it is added here.
RESUME_SAFE: dict[str, str] = {
    "run.out_dir": "the run directory was moved or copied",
    "run.steps": "budget", "run.max_minutes": "budget",
    "run.log_every": "cadence", "run.sample_every": "cadence", "run.save_every": "cadence",
    "run.keep_checkpoints": "checkpoint rotation", "run.progress": "display",
    "run.num_workers": "loader processes", "run.cpu_threads": "CPU threads",
    "run.max_skipped_steps": "non-finite tolerance",
    # auto picks bf16 or fp32 per machine, and a requeued job may land on another kind: weights and optimizer
    # state are fp32 in every precision, so the checkpoint continues unchanged (a switch to fp16, whose loss
    # scaler the checkpoint may not hold, is checked separately: check_loss_scaler).
    "run.precision": "this machine's precision",
    "run.compile": "speed only: compiled and eager steps agree to float rounding (common.compile)",
    "run.ema_decay": "applied to the restored EMA",
    "optim.*": "applied to the restored optimizers and schedulers",
    "sample.*": "sample grids (a prior's: also its pipeline's default sampling settings)",
    "eval.*": "the classifier's held-out evaluation",
    "cache_dir": "where latent caches live (named by what they hold)",
    "tokens.cache_dir": "where token caches live (named by what they hold)",
    "tokens.batch_size": "encoding batch", "tokens.num_workers": "encoding loader processes",
}
_ABSENT = "(absent)"


def resume_run(accelerator: Accelerator, cfg: Any, optimizers: Sequence[Any] = (),
               schedulers: Sequence[Any] = ()) -> int:
    """Check, then restore the newest checkpoint of ``cfg.run.out_dir`` (step 0 when there is none), apply
    the command's optimizer settings and EMA decay, and write the resolved config to ``config.yaml``;
    returns the step training continues from.

    ``optimizers`` and ``schedulers`` are the restored objects the run's ``optim`` settings apply to.

    Raises:
        ConfigError: the command changes a key that :data:`RESUME_SAFE` does not allow (nothing is loaded
            or written).
        CheckpointError: the checkpoint does not load, or holds more than weights and plain data.
    """
    out_dir, new = Path(cfg.run.out_dir), resolved_config(cfg, accelerator)
    path = latest_checkpoint(out_dir)
    changes: dict[str, tuple[Any, Any]] = {}
    step = 0
    if path is not None:
        changes = check_resume_config(new, out_dir, path)
        check_loss_scaler(accelerator, path)
        settings = optimizer_settings(optimizers)  # the checkpoint's values replace them on load
        step = resume_training_state(accelerator, out_dir, path)
        apply_settings(accelerator, new, optimizers, settings, schedulers)
    accelerator.wait_for_everyone()  # every process has read config.yaml before the main one rewrites it
    if accelerator.is_main_process:
        record = yaml.safe_dump(to_dict(new), sort_keys=False)
        atomic_write(out_dir / "config.yaml", lambda tmp: tmp.write_text(record))
    if changes:
        accelerator.print(f"resumed with changes (recorded in config.yaml): {describe_changes(changes)}")
    return step


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``key: old -> new`` for each change, grouped by how :data:`RESUME_SAFE` says it is honoured."""
    groups: dict[str, list[str]] = {}
    for key, (old, new) in changes.items():
        groups.setdefault(resume_safety(key) or "refused", []).append(f"{key}: {_show(old)} -> {_show(new)}")
    return "; ".join(f"{', '.join(items)} ({note})" for note, items in groups.items())


def resume_training_state(accelerator: Accelerator, run_dir: str | Path, path: Path | None = None) -> int:
    """Restore the checkpoint ``path`` (default: the newest of ``run_dir``, if there is one), its pickled
    files checked as weights and plain data first (:mod:`common.safe_pickle`); return its step (0 without one).

    Raises:
        CheckpointError: the checkpoint holds more than weights and plain data, or does not load (damaged
            files, or a config that changed the models' shapes); the message names it and the ways out.
    """
    path = path or latest_checkpoint(run_dir)
    if path is None:
        return 0
    check_checkpoint_pickles(path)
    try:
        accelerator.load_state(str(path))
        step = int(json.loads((path / "step.json").read_text())["step"])
    except Exception as error:  # noqa: BLE001 - whatever failed, the user needs the same advice
        reason = " ".join(str(error).split())
        reason = reason if len(reason) <= 600 else reason[:600] + " ..."
        raise CheckpointError(
            f"cannot resume from {path}: {type(error).__name__}: {reason}. If the model config changed since "
            f"this checkpoint was written (its config is {Path(run_dir) / 'config.yaml'}), put it back or choose "
            f"a new run.out_dir; if the checkpoint is damaged, delete {path} to resume from the one before it."
        ) from error
    accelerator.print(f"resumed from {path} at step {step}")
    return step


# ---------------------------------------------------------------------------------------- the config guard
def resume_safety(key: str) -> str | None:
    """How a change of the dotted config ``key`` is honoured on resume, or None when it is refused."""
    return next((note for pattern, note in RESUME_SAFE.items() if fnmatch.fnmatchcase(key, pattern)), None)


def check_resume_config(new: Any, run_dir: Path, checkpoint: Path) -> dict[str, tuple[Any, Any]]:
    """The differences between the resolved config ``new`` and ``run_dir/config.yaml`` that
    :data:`RESUME_SAFE` allows, as ``{key: (old, new)}``; none when the run has no ``config.yaml`` (a fork).

    Raises:
        ConfigError: any other difference, naming every such key with its old and new value, and the ways out.
    """
    saved = read_saved_config(type(new), run_dir / "config.yaml")
    if saved is None:
        return {}
    changes = config_changes(saved, flatten(to_dict(new)))
    refused = {key: values for key, values in changes.items() if resume_safety(key) is None}
    if refused:
        raise ConfigError(refusal_message(refused, run_dir, checkpoint))
    return changes


def read_saved_config(cls: type, path: Path) -> dict[str, Any] | None:
    """The flattened config of ``path`` (YAML, read as data only), upgraded from an old layout where one
    applies; None when there is no such file.

    A saved config the current code no longer accepts (a value out of a range added since) is compared
    as written, so that a run can always be resumed with the fixed value.
    """
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        data = error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a readable config ({' '.join(str(data).split())[:200]}), so this command "
                          f"cannot be checked against the run it resumes: restore the file, or delete it to "
                          f"resume without the check and record this command's config")
    try:
        data = to_dict(from_dict(cls, data))
    except ConfigError:
        pass
    return flatten(data)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as ``{"section.key": value}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every flattened key whose value differs, in key order."""
    keys = sorted(old.keys() | new.keys())
    pairs = ((key, old.get(key, _ABSENT), new.get(key, _ABSENT)) for key in keys)
    return {key: (a, b) for key, a, b in pairs if not _same(a, b)}


def _same(old: Any, new: Any) -> bool:
    """Equal values; two spellings of one path (relative and absolute, say) are the same value."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and old and new:
        try:
            return os.path.samefile(old, new)
        except OSError:  # either path does not exist
            return False
    return False


def refusal_message(refused: dict[str, tuple[Any, Any]], run_dir: Path, checkpoint: Path) -> str:
    """Every refused key with its old and new value, and the two ways out."""
    listed = ", ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in refused.items())
    return (f"cannot resume from {checkpoint} with this command: the config changed since it was written, in "
            f"keys that define what it was trained on ({listed}). Either put the old values back (the run's config "
            f"is {run_dir / 'config.yaml'}), or fork a new run that starts from this checkpoint with the new values: "
            f"{fork_command(checkpoint)} then run this command with run.out_dir=NEW ({run_dir} stays as it is). "
            f"A resume may change only: {', '.join(RESUME_SAFE)}.")


def fork_command(checkpoint: Path) -> str:
    """The shell command that copies ``checkpoint`` into a new run directory ``NEW`` (which has no
    ``config.yaml``, so the new command's config is recorded there without the resume check)."""
    return (f"mkdir -p NEW/checkpoints && cp -r {checkpoint} NEW/checkpoints/ && "
            f"echo {checkpoint.name} > NEW/checkpoints/latest;")


def _show(value: Any) -> str:
    return value if value == _ABSENT else repr(value)


def check_loss_scaler(accelerator: Accelerator, checkpoint: Path) -> None:
    """Refuse a run that now trains in fp16 from a checkpoint without a loss scaler (one trained in fp32 or
    bf16, e.g. a requeued job that landed on a GPU without bf16): accelerate would fail to find its state."""
    if getattr(accelerator, "scaler", None) is not None and not (checkpoint / "scaler.pt").is_file():
        raise ConfigError(f"this run now trains in fp16 (run.precision resolved to fp16 on this machine), but the "
                          f"checkpoint {checkpoint} was trained without fp16's loss scaler; set run.precision=fp32 "
                          f"(or bf16 where the device has it) to continue it")


# ---------------------------------------------------------------------------------------- applied settings
def optimizer_settings(optimizers: Sequence[Any]) -> list[list[dict[str, Any]]]:
    """Each optimizer's param-group hyperparameters (all but ``params``), as built from the command."""
    return [[{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
            for optimizer in optimizers]


def apply_settings(accelerator: Accelerator, cfg: Any, optimizers: Sequence[Any], settings: list[list[dict]],
                   schedulers: Sequence[Any]) -> None:
    """Put the command's optimizer settings and EMA decay back on the restored objects.

    ``settings`` are the optimizers' hyperparameters as built from ``cfg.optim`` before the checkpoint was
    loaded (:func:`optimizer_settings`); all but ``lr`` are copied back over the checkpoint's, then each
    schedule's base rates follow ``initial_lr`` and its current rates are recomputed at the restored step.
    With an unchanged config every value is the one restored, so a resume stays bit-exact.
    """
    for optimizer, groups in zip(optimizers, settings):
        for group, fresh in zip(optimizer.param_groups, groups):
            group.update({key: value for key, value in fresh.items() if key != "lr"})
    for scheduler in schedulers:
        _recompute_rates(getattr(scheduler, "scheduler", scheduler))  # accelerate's wrapper holds the schedule
    for obj in getattr(accelerator, "_custom_objects", ()):  # what register_for_checkpointing recorded
        if isinstance(obj, EMA):
            obj.decay = cfg.run.ema_decay


def _recompute_rates(scheduler: Any) -> None:
    """Base rates from the param groups' ``initial_lr`` and current rates at the restored step, for a
    LambdaLR (the schedule :func:`common.training.make_optimizer` builds)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"resume_run applies optim settings to LambdaLR schedules, not {type(scheduler).__name__}")
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [group["initial_lr"] for group in groups]
    rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(groups, rates):
        group["lr"] = lr
    scheduler._last_lr = rates  # what get_last_lr() reports until the next step
