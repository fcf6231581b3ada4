"""Peak memory of one pipeline call against the number of images it makes: flat beyond the chunk size.

    python bench/generation_memory.py [--counts 1,16,100,1000] [--chunk-size 16] [--size 32] [--steps 2]
                                      [--pipelines class,tokens] [--unchunked]

Each measurement runs in a fresh subprocess (peak RSS, ``ru_maxrss``, only grows): it builds a tiny random
pipeline (a 16-channel f=2 VQ autoencoder under a class-conditional U-Net, or under a class token prior),
generates ``count`` images of ``--size`` pixels in one call (``output_type="pt"``, so the result is the
float images it returns) and prints its peak RSS. ``--unchunked`` also runs every count with
``chunk_size=count``, which is what a call did before chunking. The JSON report gives MB per count and
the ratio of each peak to the peak at ``count = chunk_size`` (1.0 = flat), and the pipeline's own
estimate (:meth:`image_cost`) for comparison.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from autoencoder.model import AutoencoderConfig, build_autoencoder
from autoencoder.quantizer import QuantizerConfig
from diffusion.latent_diffusion import LatentDiffusion
from diffusion.objectives import DiffusionConfig
from diffusion.unet import UNet, UNetConfig
from pipelines import ClassToImage, TokensToImage
from pipelines.options import GenerationOptions
from prior.sampling import SamplingConfig
from prior.token_prior import TokenPrior
from prior.transformer import GPT, PriorConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_pipeline(kind: str, size: int) -> ClassToImage | TokensToImage:
    """A random tiny pipeline of ``kind`` ("class" or "tokens") making ``size`` px images."""
    torch.manual_seed(0)
    autoencoder = build_autoencoder(AutoencoderConfig(
        resolution=size, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=16,
        code_dim=4, kind="vq", quantizer=QuantizerConfig(codebook_size=32))).eval()
    if kind == "class":
        unet = UNet(UNetConfig(in_channels=4, out_channels=4, block_channels=(16, 32), attention_levels=(False, True),
                               layers_per_block=1, head_dim=8, context_dim=0, num_classes=3)).eval()
        return ClassToImage(LatentDiffusion(autoencoder, unet, None, DiffusionConfig(num_steps=100), 2.5))
    prior = GPT(PriorConfig(codebook_size=32, grid_size=size // 2, condition="class", num_classes=3, width=32,
                            depth=2, heads=4)).eval()
    return TokensToImage(TokenPrior(autoencoder, prior, None, sampling=SamplingConfig(guidance=2.0)))


def child(kind: str, count: int, chunk: int, size: int, steps: int) -> None:
    """One measurement: print the peak RSS in MB of generating ``count`` images in one call."""
    torch.set_num_threads(1)
    pipe = tiny_pipeline(kind, size)
    options = dict(num_images_per_prompt=count, chunk_size=chunk, seed=0, progress=False, output_type="pt")
    if kind == "class":
        options["num_inference_steps"] = steps
    images = (pipe([0], **options) if kind == "class" else pipe(class_labels=[0], **options)).images
    assert images.shape[0] == count
    cost = pipe.image_cost(pipe.options(options), size, size) if kind == "class" else pipe.image_cost(
        pipe.options(options))
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "estimate_working_kb": cost.working / 1024, "estimate_kept_kb": cost.kept / 1024}))


def measure(kind: str, count: int, chunk: int, size: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, str(count), str(chunk), str(size), str(steps)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        child(argv[1], *map(int, argv[2:]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,16,100,1000")
    parser.add_argument("--chunk-size", type=int, default=GenerationOptions.chunk_size)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--pipelines", default="class,tokens")
    parser.add_argument("--unchunked", action="store_true", help="also measure chunk_size = count (no chunking)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    report: dict = {"chunk_size": args.chunk_size, "size": args.size, "steps": args.steps}
    for kind in args.pipelines.split(","):
        modes = {"chunked": lambda n: args.chunk_size} | ({"unchunked": lambda n: n} if args.unchunked else {})
        for mode, chunk_of in modes.items():
            rows = {n: measure(kind, n, chunk_of(n), args.size, args.steps) for n in counts}
            base = rows[min(counts, key=lambda n: abs(n - args.chunk_size))]["peak_mb"]
            report[f"{kind}_{mode}"] = {n: dict(row, peak_mb=round(row["peak_mb"], 1),
                                                vs_chunk=round(row["peak_mb"] / base, 3)) for n, row in rows.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
