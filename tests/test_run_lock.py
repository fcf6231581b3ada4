"""One writer per run directory: a second launch is refused and changes nothing, a stale lock is taken
over with a message, and ``metrics.jsonl`` holds each step once, also after a resume."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bad_inputs import cli, snapshot, train
from common.run_control import STOPPED_EXIT_CODE
from common.training import read_metrics
from tiny import TINY_AUTOENCODER

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
RUN = ("run.log_every=1", "run.sample_every=100000", "run.cpu_threads=1", "run.compile=false")  # long: no compile


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lock") / "ae.yaml"
    path.write_text(yaml.safe_dump(TINY_AUTOENCODER))
    return path


def test_a_second_launch_is_refused_naming_the_holder_and_changes_nothing(config, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "autoencoder/train.py", str(config), f"run.out_dir={run_dir}",
                              "run.steps=100000", "run.save_every=2", *RUN],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 240
        while len(read_metrics(run_dir)) < 3:
            assert first.poll() is None and time.monotonic() < end, first.communicate()[0][-3000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # frozen, so that any change to its files is the second launch's
        before = snapshot(run_dir)
        message = cli("autoencoder.train", config, f"run.out_dir={run_dir}", "run.steps=3", *RUN)
        assert snapshot(run_dir) == before, "the refused launch changed the run directory"
        for words in (f"{run_dir} is in use by another run", f"pid {first.pid} on host {socket.gethostname()}",
                      "since 20", "train.py", "another run.out_dir"):
            assert words in message, f"{words!r} not in: {message}"
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)  # a plain `python` launch shows the stop code itself
        output = first.communicate(timeout=120)[0]
    finally:
        first.kill()
        first.wait()
    assert first.returncode == STOPPED_EXIT_CODE, output[-3000:]
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1)), "each step once"
    assert (run_dir / ".lock").read_text() == "", "released at the end of the run"


def test_a_stale_lock_is_taken_over_with_a_message(config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = {"pid": 4_000_000, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00", "command": "x"}
    (run_dir / ".lock").write_text(json.dumps(dead))  # its writer died: no process holds the flock
    train("autoencoder.train", config, f"run.out_dir={run_dir}", "run.steps=2", *RUN)
    err = capsys.readouterr().err
    assert f"taking over the lock of {run_dir} from a run that is gone (pid 4000000 on host" in err
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"


def test_a_resume_drops_the_metrics_logged_after_its_checkpoint(config, tmp_path):
    run_dir = tmp_path / "run"
    train("autoencoder.train", config, f"run.out_dir={run_dir}", "run.steps=5", "run.save_every=3", *RUN)
    checkpoints = run_dir / "checkpoints"  # as if killed at step 5, before its checkpoint was written
    (checkpoints / "latest").write_text("step_00000003")
    for path in sorted((checkpoints / "step_00000005").iterdir()):
        path.unlink()
    (checkpoints / "step_00000005").rmdir()
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "total": 0.')  # and cut short while writing a line
    train("autoencoder.train", config, f"run.out_dir={run_dir}", "run.steps=5", "run.save_every=3", *RUN)
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
