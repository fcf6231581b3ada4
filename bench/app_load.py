"""The web app under load: concurrent requests all get their images, and memory stays flat across requests.

    python bench/app_load.py [--requests 50] [--concurrent 4] [--steps 20]

Not a timing benchmark. It saves a tiny random class-conditional pipeline (``bench.generation_memory``'s,
16 px) in a temporary folder, starts ``python -m pipelines.app`` on it in a subprocess on a free local
port, and drives it with gradio's own client (one client per simulated browser tab):

1. ``--concurrent`` clients submit a request at the same moment; every one must get its PNG back;
2. ``--requests`` requests one after another; the server's resident memory (RSS, read with psutil) is
   sampled after each, and the report gives it after the first request, after each tenth, and the
   growth from the tenth to the last (after the first few, gradio's caches and torch's allocator are warm).

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from gradio_client import Client
from PIL import Image

from bench.generation_memory import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(pipeline: Path, port: int, outputs: Path) -> subprocess.Popen:
    """``python -m pipelines.app`` in a subprocess, returned once it answers on ``port``."""
    server = subprocess.Popen([sys.executable, "-m", "pipelines.app", str(pipeline), "--port", str(port),
                               "--device", "cpu", "--outputs", str(outputs)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with status {server.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the app did not answer within 120 s")


def request(client: Client, seed: int, steps: int) -> str:
    """One generation through the app's API (class 0, seed ``seed``); returns the PNG's path."""
    _, files, _, _ = client.predict("0", seed, False, 1, 16, 16, steps, api_name="/p0_t0")
    return files[0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        pipeline = tiny_pipeline("class", 16).save_pretrained(Path(folder) / "pipeline")
        port = free_port()
        server = start_server(pipeline, port, Path(folder) / "outputs")
        url = f"http://127.0.0.1:{port}/"
        try:
            rss = psutil.Process(server.pid)
            start = time.monotonic()
            with ThreadPoolExecutor(args.concurrent) as pool:
                tabs = [Client(url, verbose=False) for _ in range(args.concurrent)]  # one session each
                files = list(pool.map(lambda seed: request(tabs[seed], seed, args.steps), range(args.concurrent)))
            concurrent = {"requests": args.concurrent, "images": sum(Image.open(f).format == "PNG" for f in files),
                          "seeds_recorded": sorted(json.loads(Image.open(f).text["parameters"])["options"]["seed"]
                                                   for f in files),
                          "seconds": round(time.monotonic() - start, 1)}
            samples, tab = [], Client(url, verbose=False)
            for i in range(args.requests):
                request(tab, 100 + i, args.steps)
                samples.append(rss.memory_info().rss / MB)
        finally:
            server.terminate()
            server.wait(timeout=30)
    tenth = samples[min(9, len(samples) - 1)]
    report = {"concurrent": concurrent, "sequential_requests": args.requests,
              "rss_mb": {"after_1": round(samples[0], 1),
                         **{f"after_{i + 1}": round(samples[i], 1) for i in range(9, len(samples), 10)}},
              "growth_mb_10_to_last": round(samples[-1] - tenth, 1), "max_mb": round(max(samples), 1)}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
