"""What the bad-input tests share: file hashing, error-message checks, training CLIs and tiny parts."""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState

from common.training import run_cli
from test_autoencoder_train import TINY as TINY_AUTOENCODER
from test_latent_cache import make_tiny_pipeline

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
    try:
        run_cli(importlib.import_module(module).main, argv) if wrapped else importlib.import_module(module).main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no accelerate singleton behind


def cli(module: str, *argv: str) -> str:
    """The message a training script's command line exits with (``error: <message>``, no traceback)."""
    return refused(lambda: train(module, *argv), "error: ", error=SystemExit)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """A tiny diffusion pipeline saved as a run, its autoencoder and text encoder, and a stage-1 run."""
    root = tmp_path_factory.mktemp("parts")
    pipe = make_tiny_pipeline(root)
    pipe.save_pretrained(root / "diffusion_run" / "pipeline")
    stage1 = root / "stage1"
    (root / "ae.yaml").write_text(yaml.safe_dump(TINY_AUTOENCODER))
    train("autoencoder.train", str(root / "ae.yaml"), f"run.out_dir={stage1}", "run.steps=2", "run.save_every=1",
          "run.cpu_threads=1", wrapped=False)
    return {"root": root, "pipe": pipe, "ae": root / "ae", "text": root / "text", "stage1": stage1}
