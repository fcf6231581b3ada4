"""What the bad-input tests share: file hashing, error-message checks and training CLIs (``parts`` is in conftest)."""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import pytest

from common.training import run_cli
from tiny import train_in_process

ROOT = Path(__file__).resolve().parents[1]


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) with its SHA-256; folders as "dir"."""
    entries = [path] if path.is_file() else sorted(path.rglob("*"))
    return {p.as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in entries}


def refused(call, *words: str, error: type[BaseException] = Exception) -> str:
    """Run ``call``, which must fail with ``error``; the message must hold every one of ``words``."""
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value.code if isinstance(caught.value, SystemExit) else caught.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


def train(module: str, *argv: str, wrapped: bool = True) -> None:
    """A training script's ``main`` in this process, through its command-line wrapper (``run_cli``)."""
    main = importlib.import_module(module).main
    train_in_process((lambda args: run_cli(main, args)) if wrapped else main, *argv)


def cli(module: str, *argv: str) -> str:
    """The message a training script's command line exits with (``error: <message>``, no traceback)."""
    return refused(lambda: train(module, *argv), "error: ", error=SystemExit)
