"""Who may write a run directory, and how a run stops when asked to: the run-directory lock and
preemption (SIGTERM / SIGINT).

Preemption: :func:`watch_stop_signals` turns the first SIGTERM or SIGINT into a request that the
training loop (:class:`common.training.Budget`) reads once per optimizer step; all processes agree on it
(an all-reduce), finish the same step, save a checkpoint and leave with :data:`STOPPED_EXIT_CODE`. A
second signal of the same kind stops at once, as it would without us.

Launchers, measured with accelerate 1.x and torch 2.x: under ``accelerate launch --multi_gpu`` torchrun's
agent catches SIGTERM/SIGINT/SIGHUP/SIGQUIT, sends SIGTERM to every worker and waits
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (30 by default: raise it when a checkpoint takes longer to
write) before SIGKILL; its workers run in their own sessions, so a terminal's Ctrl-C reaches them only
through it. The single-process ``accelerate launch`` forwards nothing: SIGTERM ends the launcher and
orphaned the script. So a process started by a launcher asks the kernel for SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``): whatever happens to the launcher, the training processes save and stop.
"""
from __future__ import annotations

import atexit
import ctypes
import datetime
import fcntl
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Callable

# EX_TEMPFAIL of sysexits.h, "temporary failure; the user is invited to retry": a stopped run is
# resumed by re-running the same command. Distinct from 0 (finished), 1 (an error: message on stderr)
# and 128+N (killed by signal N), so a job script can requeue on exactly this code.
STOPPED_EXIT_CODE = 75
LOCK_NAME = ".lock"
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


class TrainingStopped(Exception):
    """A run stopped by a signal after saving a checkpoint; re-running the same command resumes it."""

    def __init__(self, reason: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {reason}: saved step {step} to {checkpoint}; re-running the same command "
                         f"resumes from it (exit code {STOPPED_EXIT_CODE})")


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


class _StopRequest:
    """The first SIGTERM/SIGINT since :meth:`install`, as the name of the signal (None: none yet)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.pid = os.getpid()
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        self.reason, self.pid = None, os.getpid()  # a new run in this process starts without a request
        for sig in _SIGNALS:
            current = signal.getsignal(sig)
            if current != self._handle:
                self.previous[sig] = current
                signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a forked DataLoader worker, which inherited the handler: its parent stops
            return
        if self.reason is not None:  # asked twice: stop at once, as without this handler
            self.restore()
            signal.raise_signal(signum)
            return
        self.reason = signal.Signals(signum).name
        if main_process():  # os.write: print() may be the very call this signal interrupted
            os.write(2, f"{self.reason} received: finishing the current optimizer step, then saving a checkpoint "
                        f"(send it again to stop at once, without saving)\n".encode())


STOP = _StopRequest()


def main_process() -> bool:
    """Rank 0 by the launcher's environment (usable before, and without, an Accelerator)."""
    return os.environ.get("RANK", "0") == "0"


def launched() -> bool:
    """Whether ``accelerate launch`` or torchrun started this process."""
    return any(key in os.environ for key in ("TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION"))


def watch_stop_signals() -> None:
    """Turn SIGTERM/SIGINT into a stop request (:data:`STOP`); under a launcher, also the launcher's death."""
    STOP.install()
    if launched() and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the launcher died before the request took effect
            STOP.reason = "the launcher's exit"


# ---------------------------------------------------------------------------------------- the lock
_HELD: dict[str, int] = {}  # lock path -> descriptor held by this process


def lock_run_dir(run_dir: str | Path, tidy: Callable[[], None] = lambda: None) -> None:
    """Take ``run_dir/.lock`` for this process (``fcntl.flock``, released by the kernel when it dies).

    Raises :class:`RunDirLocked`, naming the holder, when a live process holds it. A lock file whose
    holder is gone (its flock went with it) is taken over with a message. Taking a lock this process
    already holds (a second run in one interpreter) is a no-op. ``tidy`` runs once the lock is held and
    before the lock records its holder: it removes what a killed run left, which may be what fills the disk.
    """
    path = Path(run_dir) / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _describe(_read(fd))
        os.close(fd)
        raise RunDirLocked(
            f"{run_dir} is in use by another run ({holder}); two runs writing one directory delete each other's "
            f"checkpoints. Wait for it to end, stop it (SIGTERM saves a checkpoint first), or give this run another "
            f"run.out_dir") from None
    tidy()
    previous = _read(fd)
    if previous:
        print(f"taking over the lock of {run_dir} from a run that is gone ({_describe(previous)})", file=sys.stderr)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _HELD[key] = fd


def release_run_locks() -> None:
    """Release the locks this process holds; an emptied lock file marks a clean end (not stale)."""
    for key in list(_HELD):
        fd = _HELD.pop(key)
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


atexit.register(release_run_locks)


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
        return {"pid": "?", "note": "unreadable lock file"}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}, "
            f"command: {holder.get('command', '?')}")
