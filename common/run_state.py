"""A run directory's training checkpoints on disk: claiming the directory, saving the full training
state atomically, finding the newest complete one, and saying what a failed save needs.

    run_dir/.lock                      who writes this run (:func:`common.run_control.lock_run_dir`)
    run_dir/checkpoints/step_00001000  accelerate state: models, optimizers, schedulers, RNG, EMA, ...
    run_dir/checkpoints/latest         name of the newest complete checkpoint
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator

from common.checkpoint import CheckpointError, atomic_write
from common.run_control import RunDirLocked, lock_run_dir


def claim_run_dir(run_dir: str, accelerator: Accelerator) -> None:
    """The main process locks ``run_dir`` (:func:`common.run_control.lock_run_dir`) and every process learns
    whether it did. Holding the lock, and before writing anything, it removes the ``step_*.tmp`` a killed
    save left (only the lock's holder may: they could be another writer's save in progress), whose
    space a full disk needs for the run's first files."""
    refusal = None
    if accelerator.is_main_process:
        try:
            lock_run_dir(run_dir, tidy=lambda: _remove_stale_saves(checkpoint_root(run_dir)))
        except RunDirLocked as error:
            refusal = error
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(refusal is not None)], device=accelerator.device)
        torch.distributed.broadcast(flag, src=0)
        refusal = refusal or (RunDirLocked(f"{run_dir} is in use by another run") if flag.item() else None)
    if refusal is not None:
        raise refusal


def _remove_stale_saves(root: Path) -> None:
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_training_state(accelerator: Accelerator, run_dir: str | Path, step: int, keep: int = 2) -> Path:
    """Save everything accelerate tracks (models, optimizers, schedulers, RNG, registered objects).

    The state is written to ``step_N.tmp`` and renamed only once complete, then ``latest`` is
    switched atomically, so a crash mid-save leaves the previous checkpoint as the one resumed. A
    failed write (disk full, any OSError, on any process) removes the ``.tmp`` and raises
    :class:`CheckpointError` naming the directory, its free space and the space needed, with the previous
    checkpoint and ``latest`` as they were. Rotation keeps the ``keep`` newest, never fewer than this one.
    """
    root = checkpoint_root(run_dir)
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if accelerator.is_main_process:  # this save's directory, and any left by a save that was killed
        _remove_stale_saves(root)
    accelerator.wait_for_everyone()
    failure, free = None, _free_bytes(root)
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "step.json").write_text(json.dumps({"step": step}))
    except (OSError, RuntimeError) as error:
        if not isinstance(error, OSError) and not any(text in str(error) for text in _WRITE_FAILURES):
            raise
        failure = _without_frames(error)
    if _any_process(failure is not None, accelerator):  # in place of a barrier: all learn of any failure
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        gc.collect()  # the failed writer sits in a reference cycle: collected, it closes its file and frees the space
        raise CheckpointError(save_failure_message(failure, root, step, latest_checkpoint(run_dir), free,
                                                   accelerator)) from failure
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(root / "latest", lambda path: path.write_text(final.name))
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-max(1, keep)]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _without_frames(error: BaseException) -> BaseException:
    """``error`` and the exceptions it chains with their tracebacks dropped: the frames of a failed
    torch.save hold its zip writer, whose file stays open (its space used) while they live."""
    link: BaseException | None = error
    while link is not None:
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return error


# How torch.save reports a write the disk refused (its zip writer raises RuntimeError, not OSError).
_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def _any_process(flag: bool, accelerator: Accelerator) -> bool:
    """Whether ``flag`` holds on any process (all processes call this together)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete training checkpoint of a run, or None.

    ``latest`` names it. Should that name be missing or stale (a checkpoint deleted by hand, a run
    killed between the rename and the switch), the newest complete ``step_N`` is used, with a warning:
    starting again from step 0 would rotate the good checkpoints away.
    """
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "step.json").is_file():
            return path
    complete = sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp") and (p / "step.json").is_file())
    if not complete:
        return None
    warnings.warn(f"{pointer} is missing or names no complete checkpoint; using the newest complete one, "
                  f"{complete[-1].name}", RuntimeWarning, stacklevel=2)
    return complete[-1]


def save_failure_message(error: Exception | None, root: Path, step: int, previous: Path | None, free: int | None,
                         accelerator: Accelerator) -> str:
    """What a failed save says: the directory, its free space before the save, the space a checkpoint needs
    (the previous checkpoint's size, else the size of the tracked state) and that the previous one is intact."""
    if error is None:
        reason = "a write failed on another process"
    elif isinstance(error, OSError):
        reason = error.strerror or str(error)
    else:  # torch's zip writer: "[enforce fail at inline_container.cc:672] . unexpected pos 1318592 vs 1318480"
        reason = f"a write failed ({str(error).split('] . ')[-1][:200]})"
    space = f"{_size(free)} free there before this save" if free is not None else "free space unknown"
    if previous is not None:
        needed, basis = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()), f"the size of {previous}"
    else:
        needed, basis = _state_bytes(accelerator), "an estimate from the models and optimizers"
    kept = (f"{previous} and latest are intact: re-running the same command resumes from it" if previous is not None
            else "no checkpoint was written before this: re-running the same command starts again")
    return (f"cannot save the checkpoint of step {step} in {root}: {reason}; {space}, about {_size(needed)} "
            f"needed ({basis}). Free some space or choose a run.out_dir on a larger disk; {kept}.")


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _state_bytes(accelerator: Accelerator) -> int:
    """Bytes of the tensors a checkpoint holds: model weights and buffers, and optimizer states."""
    states = [model.state_dict() for model in accelerator._models]
    states += [opt.state_dict()["state"] for opt in accelerator._optimizers]
    return sum(t.numel() * t.element_size() for tensor in _tensors(states) for t in [tensor])


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count} TB"
