"""Preemption: SIGTERM/SIGINT finish the current optimizer step, save a checkpoint and exit with
``common.run_control.STOPPED_EXIT_CODE``; under ``accelerate launch`` (one process, and two with gloo
DDP) the signal sent to the launcher reaches the training processes and none is left behind; the
resumed run equals the uninterrupted one.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from bad_inputs import train
from common import training
from common.run_control import STOP, STOPPED_EXIT_CODE
from common.training import read_metrics
from tiny import TINY_AUTOENCODER

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# endless unless stopped: the signal ends these runs
# run.compile=false: these runs are long by run.steps (stopped by a signal), which `auto` would compile;
# a resume must stay bit-exact, and a compiled stretch matches eager only to float rounding.
RUN = ("run.log_every=1", "run.save_every=1000", "run.sample_every=100000", "run.cpu_threads=1", "run.compile=false")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preemption") / "ae.yaml"
    path.write_text(yaml.safe_dump(TINY_AUTOENCODER))
    return path


def cli_run(config: Path, run_dir: Path, *overrides: str) -> int:
    """The autoencoder's command line in this process; its exit code."""
    try:
        train("autoencoder.train", config, f"run.out_dir={run_dir}", *RUN, *overrides)
    except SystemExit as exited:
        return exited.code
    return 0


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    return {f"{path.name}:{k}": v for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after the resume: {different[:5]}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_exits_with_the_stop_code(sig, config, tmp_path, monkeypatch, capfd):
    real_log = training.MetricsLog.log
    # what the run must put back: a shell's background job (CI started with `&`, nohup) inherits an ignored SIGINT
    STOP.restore()  # a test before this one may have called a script's main directly and ended in an error
    handler_before = signal.getsignal(sig)

    def log(self, step, values):  # the signal arrives during step 4's logging, i.e. mid-loop
        if step == 4:
            os.kill(os.getpid(), sig)
        return real_log(self, step, values)

    monkeypatch.setattr(training.MetricsLog, "log", log)
    assert cli_run(config, tmp_path / "split", "run.steps=100") == STOPPED_EXIT_CODE
    err = capfd.readouterr().err
    saved = tmp_path / "split" / "checkpoints" / "step_00000004"
    assert f"{sig.name} received: finishing the current optimizer step" in err
    assert f"stopped by {sig.name}: saved step 4 to {saved}; re-running the same command resumes" in err
    assert (saved.parent / "latest").read_text() == saved.name
    assert signal.getsignal(sig) == handler_before, "the handlers end with the run"

    monkeypatch.undo()
    assert cli_run(config, tmp_path / "split", "run.steps=6") == 0
    assert cli_run(config, tmp_path / "full", "run.steps=6") == 0
    assert [m["step"] for m in read_metrics(tmp_path / "split")] == list(range(1, 7)), "each step logged once"
    assert_same_weights(weights(tmp_path / "split", 6), weights(tmp_path / "full", 6))


def free_port() -> int:
    """A TCP port nobody listens on now (other test sessions may share this machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(run_dir: Path, config: Path, *args: str, steps: int = 100_000) -> subprocess.Popen:
    command = [sys.executable, "-m", "accelerate.commands.launch", *args, "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "autoencoder/train.py", str(config),
               f"run.out_dir={run_dir}", f"run.steps={steps}", *RUN]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not any(m["step"] >= step for m in read_metrics(run_dir) if "step" in m):
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < end, "the run did not reach its first steps"
        time.sleep(0.05)


def stop_launcher(process: subprocess.Popen) -> tuple[int, str, list[psutil.Process]]:
    """SIGTERM to the launcher; its exit code, output, and the processes it started that are still alive."""
    family = psutil.Process(process.pid).children(recursive=True)
    assert family, "the launcher started no training process"
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    gone, alive = psutil.wait_procs(family, timeout=60)
    return process.returncode, output, alive


def stopped_step(run_dir: Path, output: str) -> int:
    latest = (run_dir / "checkpoints" / "latest").read_text()
    step = int(latest.removeprefix("step_"))
    assert f"stopped by SIGTERM: saved step {step} to {run_dir / 'checkpoints' / latest}" in output, output[-3000:]
    assert output.count("stopped by SIGTERM") == 1, "one message, from the main process"
    return step


def test_sigterm_to_a_one_process_launch_reaches_the_script(config, tmp_path):
    # accelerate's single-process launcher forwards nothing and dies of the signal (exit 143); the script
    # learns of it through PR_SET_PDEATHSIG, saves and exits instead of training on as an orphan
    run_dir = tmp_path / "run"
    process = launch(run_dir, config, "--num_processes", "1")
    wait_for_step(run_dir, 2, process)
    code, output, alive = stop_launcher(process)
    assert not alive, f"orphaned: {alive}"
    assert code == -signal.SIGTERM
    assert stopped_step(run_dir, output) >= 2


def test_sigterm_to_a_two_process_launch_saves_and_the_resume_equals_the_uninterrupted_run(config, tmp_path):
    ddp = ("--multi_gpu", "--num_processes", "2")
    split, full = tmp_path / "split", tmp_path / "full"
    process = launch(split, config, *ddp, "--main_process_port", str(free_port()))
    wait_for_step(split, 2, process)
    code, output, alive = stop_launcher(process)
    assert not alive, f"orphaned: {alive}"
    assert code != 0  # torchrun's agent re-raises the signal after its workers have stopped
    step = stopped_step(split, output)
    # the same command resumes; the uninterrupted run trains alongside (two launches at once save time)
    resumed = launch(split, config, *ddp, "--main_process_port", str(free_port()), steps=step + 2)
    uninterrupted = launch(full, config, *ddp, "--main_process_port", str(free_port()), steps=step + 2)
    outputs = [run.communicate(timeout=300)[0] for run in (resumed, uninterrupted)]
    assert resumed.returncode == 0 and uninterrupted.returncode == 0, outputs[0][-2000:] + outputs[1][-2000:]
    assert f"resumed from {split / 'checkpoints' / f'step_{step:08d}'}" in outputs[0]
    assert_same_weights(weights(split, step + 2), weights(full, step + 2))
    assert [m["step"] for m in read_metrics(split)] == list(range(1, step + 3)), "each step logged once"


def test_a_run_called_from_python_gives_the_signals_back(config, tmp_path):
    """A notebook that calls a script's ``main`` must get its Ctrl-C (and SIGTERM) back when the run ends."""
    STOP.restore()
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    train("autoencoder.train", config, f"run.out_dir={tmp_path / 'run'}", *RUN, "run.steps=2", wrapped=False)
    assert {sig: signal.getsignal(sig) for sig in before} == before
