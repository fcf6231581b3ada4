"""How the data pipeline grows with the dataset: index time, start-up, memory, cache size and loader speed.

    python -m bench.data_growth --out docs/data_growth.json                     # 1k, 10k, 100k images (long)
    python -m bench.data_growth --sizes 200 1000 --out /tmp/growth.json --text none   # smoke test
    python -m bench.data_growth --sizes 10000 100000 --cache synthetic --out /tmp/rss.json  # memory, quickly

For each size N the script generates N small images with (distinct) captions, once as an image folder
(``metadata.jsonl``) and once as webdataset ``.tar`` shards, then measures, each in a fresh process:

- first index: constructing the dataset with no index yet (:mod:`common.data.index_store` builds it);
- start-up: constructing it again with the index: what every later run pays;
- cache build: ``load_or_build_cache`` encoding every image (a random tiny VQ autoencoder, weights do not
  change the cost) and every caption (the bundled text encoder, or none with ``--text none``). With
  ``--cache synthetic`` no model runs: random latents and text states of the same shapes (text lengths
  from the word count) go through the same cache writer, so every later figure (start-up, RSS, loader
  speed) reads a cache like the encoded one, minutes sooner; only the build time is not an encoder's;
- training process: constructing the dataset, opening the cache and drawing ``--batches`` batches of
  the training stream (latents, one phrasing per item, text states padded per batch): its peak RSS
  (``resource.getrusage``) and samples/s. The text encoder, which a training script loads whatever the
  data size, is not loaded here: the RSS is that of the data pipeline and torch;
- image loader samples/s: decoding images at random (what building a cache reads);
- sizes on disk: the cache and the index;
- text storage rule (:mod:`diffusion.latent_cache`): ms per caption to encode it with the text encoder
  against ms to read its stored states.

Goals (issue #16): start-up with an existing index under 5 s at 100k; peak RSS of the training process
within 20 % from 10k to 100k. The JSON (``--out``) is what ``python -m bench.report`` renders in its
"Data growth" section (``--data-growth``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("folder", "webdataset")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "white": (240, 240, 240), "black": (20, 20, 20)}
SHARD_ITEMS = 10_000
TEXT_WIDTH = 384  # the bundled MiniLM's, the width of a synthetic cache's text states
STARTUP_GOAL_S, RSS_GOAL = 5.0, 0.20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000], help="dataset sizes")
    parser.add_argument("--out", default="docs/data_growth.json", help="where the JSON goes")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    parser.add_argument("--text", choices=("bundled", "none"), default="bundled",
                        help="text encoder of the cache: the bundled MiniLM, or none (a class-only cache)")
    parser.add_argument("--cache", choices=("encoded", "synthetic"), default="encoded",
                        help="encode the cache with the models, or write random rows of the same shapes (fast)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=50, help="batches the training process draws")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the image loader")
    parser.add_argument("--device", default=None, help="where the cache is encoded (default: cuda if available)")
    parser.add_argument("--scratch", default=None, help="folder for the generated data (default: a temporary one)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------ synthetic data


def image_bytes(index: int, size: int) -> tuple[bytes, str]:
    """A PNG of a coloured square on a coloured background, placed by ``index``, and its distinct caption."""
    names = list(COLOURS)
    back, fore = names[index % len(names)], names[(index // len(names) + 1 + index % len(names)) % len(names)]
    pixels = np.empty((size, size, 3), np.uint8)
    pixels[:] = COLOURS[back]
    side = size // 2 - (index % 3) * size // 8
    x, y = (index * 7) % (size - side), (index * 13) % (size - side)
    pixels[y:y + side, x:x + side] = COLOURS[fore]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), f"picture {index}: a {fore} square on {back}"


def write_sources(root: Path, count: int, size: int) -> dict[str, Path]:
    """The same ``count`` images as a folder with ``metadata.jsonl`` and as tar shards of SHARD_ITEMS each."""
    folder, shards = root / "folder", root / "shards"
    folder.mkdir(parents=True)
    shards.mkdir()
    lines, tar = [], None
    for index in range(count):
        data, caption = image_bytes(index, size)
        name = f"{index:07d}"
        (folder / f"{name}.png").write_bytes(data)
        lines.append(json.dumps({"file_name": f"{name}.png", "text": caption}))
        if index % SHARD_ITEMS == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(shards / f"{index // SHARD_ITEMS:05d}.tar", "w")
        for suffix, payload in ((".png", data), (".txt", caption.encode())):
            info = tarfile.TarInfo(name + suffix)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    if tar is not None:
        tar.close()
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return {"folder": folder, "webdataset": shards}


def make_autoencoder(directory: Path, resolution: int) -> Path:
    """A random tiny VQ autoencoder (f = 4) saved as a component directory."""
    import torch

    from autoencoder.model import VQGAN, AutoencoderConfig
    from autoencoder.quantizer import QuantizerConfig

    torch.manual_seed(0)
    config = AutoencoderConfig(resolution=resolution, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                               attn_resolutions=(), z_channels=16, code_dim=4,
                               quantizer=QuantizerConfig(codebook_size=256))
    return VQGAN(config).eval().save_pretrained(directory)


# ------------------------------------------------------------------------------------ one measurement per process


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB). It counts the pages of memory-mapped cache
    files that were read (the kernel's file cache, shared and reclaimable) as well as the process's own."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def anon_rss_mb() -> float | None:
    """The process's own resident memory now (``RssAnon``: not file pages), where /proc tells it."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("RssAnon:")), None)
    return int(line.split()[1]) / 1024 if line else None


def run_worker(task: dict[str, Any]) -> dict[str, Any]:
    """One measurement (``task["mode"]``) in this process; returns what it measured."""
    import torch

    from common.data import DataConfig, build_dataset

    torch.set_num_threads(task.get("threads") or torch.get_num_threads())
    data = DataConfig(name=task["source"], path=task["path"], resolution=task["resolution"])
    start = time.perf_counter()
    dataset = build_dataset(data)
    result: dict[str, Any] = {"dataset_seconds": time.perf_counter() - start, "items": len(dataset)}
    if task["mode"] == "images":
        result["samples_per_s"] = _image_rate(dataset, task)
    elif task["mode"] == "synthetic":
        result.update(_synthetic_cache(dataset, data, task))
    elif task["mode"] in ("build", "train", "text"):
        result.update(_cache_task(data, task))
    result["peak_rss_mb"], result["anon_rss_mb"] = peak_rss_mb(), anon_rss_mb()
    return result


def _image_rate(dataset, task: dict[str, Any]) -> float:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=task["batch_size"], shuffle=True, num_workers=task["workers"],
                        generator=torch.Generator().manual_seed(0))
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    start, seen = time.perf_counter(), 0
    for _, batch in zip(range(task["batches"]), batches):
        seen += len(batch["image"])
    return seen / (time.perf_counter() - start)


def _synthetic_cache(dataset, data, task: dict[str, Any]) -> dict[str, Any]:
    """Write the cache that ``build`` encodes, where ``load_or_build_cache`` looks for it, with random latents
    (the autoencoder's shape) and random text states (TEXT_WIDTH wide, word count + 4 tokens) in its rows."""
    import torch

    from autoencoder.model import Autoencoder
    from common.array_store import Processes
    from common.cache_build import CacheSpec, build_cache, ensure_built
    from common.text_encoder import TextEncoderConfig
    from diffusion.latent_cache import CACHE_FORMAT, NULL_CAPTION, cache_key, encode_latents, resolve_autoencoder_dir

    start = time.perf_counter()
    autoencoder_dir = resolve_autoencoder_dir(task["autoencoder"])
    text = TextEncoderConfig() if task["text"] == "bundled" else None
    directory = Path(task["cache_root"]) / cache_key(autoencoder_dir, data, text, dataset)[:20]
    shape = encode_latents(Autoencoder.from_pretrained(autoencoder_dir).eval(), dataset[0]["image"][None]).shape[1:]
    generator = torch.Generator().manual_seed(0)

    def items(indices: range):
        for first in range(indices.start, indices.stop, 256):
            chunk = range(first, min(first + 256, indices.stop))
            yield (torch.randn((len(chunk), *shape), generator=generator),
                   torch.tensor([dataset.label(i) for i in chunk]), [dataset.caption(i) for i in chunk])

    def texts(captions: list[str]):
        lengths = torch.tensor([len(c.split()) + 4 if c else 2 for c in captions])
        states = torch.randn((len(captions), int(lengths.max()), TEXT_WIDTH), generator=generator)
        return states, torch.arange(states.shape[1])[None] < lengths[:, None]

    spec = CacheSpec("latents", items, lambda captions: [NULL_CAPTION] + sorted(set(captions) - {NULL_CAPTION}),
                     texts if text is not None else None, unit_variance=True)
    meta = {"format_version": CACHE_FORMAT, "inputs": {"synthetic": True}}
    ensure_built(directory, Processes(), lambda: build_cache(directory, len(dataset), spec, Processes(), meta))
    return {"cache_seconds": time.perf_counter() - start, "cache_dir": str(directory)}


def _cache_task(data, task: dict[str, Any]) -> dict[str, Any]:
    """build: encode the cache; train: open it and draw batches of the training stream; text: encode vs read."""
    import torch
    from torch.utils.data import DataLoader

    from common.text_encoder import TextEncoder, TextEncoderConfig
    from common.training import StreamSampler
    from diffusion.latent_cache import load_or_build_cache

    text = TextEncoderConfig() if task["text"] == "bundled" else None
    device = task["device"]
    start = time.perf_counter()
    cache = load_or_build_cache(task["autoencoder"], data, text, task["cache_root"], device=device,
                                batch_size=256)
    result: dict[str, Any] = {"cache_seconds": time.perf_counter() - start, "cache_dir": str(cache.directory)}
    if task["mode"] == "build":
        return result
    ids = torch.arange(min(len(cache), task["batch_size"]))
    if task["mode"] == "text":
        if text is None:
            return result
        encoder = TextEncoder(text).to(device)
        captions = [cache.captions[i] for i in cache.caption_ids[ids].tolist()]
        result["encode_ms_per_caption"] = 1e3 * _best_of(lambda: encoder.encode(captions), device) / len(ids)
        result["read_ms_per_caption"] = 1e3 * _best_of(lambda: cache.text(cache.caption_ids[ids].to(device)),
                                                       device) / len(ids)
        return result
    sampler = StreamSampler(len(cache), seed=0)
    loader = DataLoader(cache, batch_size=task["batch_size"], sampler=sampler, num_workers=0, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    batches, seen = iter(loader), 0
    start = time.perf_counter()
    for _, batch in zip(range(task["batches"]), batches):
        latents = batch["latent"].to(device)
        if text is not None:
            states = cache.text(cache.phrasings(batch["caption_id"].to(device))).states
            latents = latents + states.sum() * 0  # both used, as a training step uses them
        seen += len(latents)
    result["samples_per_s"] = seen / (time.perf_counter() - start)
    return result


def _best_of(call, device: str, repeats: int = 5) -> float:
    import torch

    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


# ------------------------------------------------------------------------------------ driver


def measure(task: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run one measurement in a fresh process (``--worker``) and return its JSON."""
    command = [sys.executable, "-m", "bench.data_growth", "--worker", json.dumps(task)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{task['mode']} of {task['source']} ({task['path']}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def folder_mb(path: str | Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2 ** 20


def measure_source(source: str, path: Path, count: int, scratch: Path, args: argparse.Namespace,
                   autoencoder: Path) -> dict[str, Any]:
    """Every measurement of one source of ``count`` images; each with its own index and cache folders."""
    state = scratch / f"state-{source}-{count}"
    env = {**os.environ, "LATENTGEN_CACHE_DIR": str(state / "index"), "PYTHONPATH": str(REPO)}
    task = {"source": source, "path": str(path), "resolution": args.resolution, "batch_size": args.batch_size,
            "batches": args.batches, "workers": args.workers, "text": args.text, "device": args.device,
            "autoencoder": str(autoencoder), "cache_root": str(state / "cache")}
    first = measure({**task, "mode": "index"}, env)
    later = measure({**task, "mode": "index"}, env)
    build = measure({**task, "mode": "synthetic" if args.cache == "synthetic" else "build"}, env)
    train = measure({**task, "mode": "train"}, env)
    images = measure({**task, "mode": "images"}, env)
    text = measure({**task, "mode": "text"}, env)
    row = {"source": source, "items": first["items"], "first_index_s": first["dataset_seconds"],
           "startup_s": later["dataset_seconds"], "cache_build_s": build["cache_seconds"],
           "build_peak_rss_mb": build["peak_rss_mb"], "startup_with_cache_s": train["dataset_seconds"]
           + train["cache_seconds"], "train_peak_rss_mb": train["peak_rss_mb"],
           "train_anon_rss_mb": train["anon_rss_mb"],
           "cache_mb": folder_mb(build["cache_dir"]), "index_mb": folder_mb(state / "index"),
           "image_samples_per_s": images["samples_per_s"], "cache_samples_per_s": train["samples_per_s"],
           "encode_ms_per_caption": text.get("encode_ms_per_caption"),
           "read_ms_per_caption": text.get("read_ms_per_caption")}
    print(json.dumps(row), file=sys.stderr)
    return row


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two goals, per source: start-up at the largest size, RSS growth between the two largest."""
    verdicts = {}
    for source in SOURCES:
        mine = sorted((r for r in rows if r["source"] == source), key=lambda r: r["items"])
        if not mine:
            continue
        largest = mine[-1]
        verdict = {"items": largest["items"], "startup_s": largest["startup_s"],
                   "startup_met": largest["startup_s"] < STARTUP_GOAL_S}
        if len(mine) > 1:
            growth = largest["train_peak_rss_mb"] / mine[-2]["train_peak_rss_mb"] - 1
            verdict.update(rss_from=mine[-2]["items"], rss_growth=growth, rss_met=growth <= RSS_GOAL)
        verdicts[source] = verdict
    return {"startup_goal_s": STARTUP_GOAL_S, "rss_goal": RSS_GOAL, "sources": verdicts}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="data_growth-"))
    rows = []
    try:
        autoencoder = make_autoencoder(scratch / "autoencoder", args.resolution)
        for count in args.sizes:
            sources = write_sources(scratch / f"data-{count}", count, args.resolution)
            rows += [measure_source(source, sources[source], count, scratch, args, autoencoder)
                     for source in SOURCES]
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    command = ["python", "-m", "bench.data_growth", "--sizes", *map(str, args.sizes), "--text", args.text,
               *(["--cache", "synthetic"] if args.cache == "synthetic" else []),
               "--batch-size", str(args.batch_size), "--batches", str(args.batches), "--workers", str(args.workers),
               "--device", args.device]
    return {"command": " ".join(command), "device": args.device, "text": args.text, "cache": args.cache,
            "resolution": args.resolution, "batch_size": args.batch_size, "rows": rows, "goals": goals(rows)}


def table(result: dict[str, Any]) -> str:
    """The rows as an aligned plain-text table (the markdown one is bench.report's)."""
    lines = [f"{'source':<11}{'items':>8}{'index s':>9}{'start s':>9}{'build s':>9}{'RSS MB':>9}{'cache MB':>10}"
             f"{'img/s':>9}{'cache/s':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['source']:<11}{r['items']:>8}{r['first_index_s']:>9.2f}{r['startup_s']:>9.2f}"
                     f"{r['cache_build_s']:>9.1f}{r['train_peak_rss_mb']:>9.0f}{r['cache_mb']:>10.1f}"
                     f"{r['image_samples_per_s']:>9.0f}{r['cache_samples_per_s']:>10.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(json.dumps(result["goals"], indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
