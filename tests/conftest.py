"""Fixtures that several test modules share; the factories behind them are in ``tiny.py``.

``tiny`` is imported inside the fixtures, so that collecting a module that needs none of them (and a
library module in the middle of a change) costs nothing.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import yaml


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared machine makes more threads much slower.

    Not autouse: a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory) -> dict:
    """A saved tiny autoencoder (``ae``), the tiny text encoder's config (``text``) and the encoder itself."""
    from common.text_encoder import TextEncoder, TextEncoderConfig
    from tiny import make_tiny_autoencoder, make_tiny_text_encoder

    root = tmp_path_factory.mktemp("parts")
    text_dir = make_tiny_text_encoder(root / "text")
    text = TextEncoderConfig(name_or_path=str(text_dir))
    return {"root": root, "ae": make_tiny_autoencoder(root / "ae"), "text": text, "text_encoder": TextEncoder(text)}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """A tiny diffusion pipeline saved as a run, its autoencoder and text encoder, and a stage-1 run."""
    from tiny import TINY_AUTOENCODER, make_tiny_pipeline, train_in_process

    root = tmp_path_factory.mktemp("parts")
    pipe = make_tiny_pipeline(root)
    pipe.save_pretrained(root / "diffusion_run" / "pipeline")
    stage1 = root / "stage1"
    (root / "ae.yaml").write_text(yaml.safe_dump(TINY_AUTOENCODER))
    train_in_process(importlib.import_module("autoencoder.train").main, root / "ae.yaml", f"run.out_dir={stage1}",
                     "run.steps=2", "run.save_every=1", "run.cpu_threads=1")
    return {"root": root, "pipe": pipe, "ae": root / "ae", "text": root / "text", "stage1": stage1}

