"""What torch.compile costs and buys here: compile time and steady-state speed-up, eager against compiled.

    python -m bench.compile_speed [--workloads unet_train,autoencoder_train,sampling] [--batch 32]
                                  [--repeats 10] [--threads 0] [--device cpu] [--warm-cache] [--out FILE]
                                  [--backend inductor] [--precision fp32,bf16]

Three workloads on the shipped emoji32 quick configs' networks with random weights (the speed does not
depend on the weights): a U-Net training step (forward, epsilon MSE, backward, AdamW), an autoencoder
training step (forward, L1 + codebook loss, backward, AdamW; no discriminator or perceptual term), and
text-to-image sampling through the pipeline (``pipe.compile()``: U-Net and decoder; 20 guided DDIM
steps, the MiniLM text encoder stays eager). Each is timed eagerly, then compiled in place: the first
compiled call minus an eager call is the compile time, the median of ``--repeats`` later calls the
steady state, in ``--precision`` (fp32, or bf16: autocast for training, the pipeline's bf16 for sampling).
The JSON printed also holds the parity of the first outputs (exact only in fp32) and the break-even:
the eager minutes after which compiling has paid for itself (``common.compile`` asks for twice that).

Caches are off unless ``--warm-cache``: a first compile on a machine is what a new run pays.
``--backend aot_eager`` (no generated code, seconds to compile) checks the script itself quickly.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import yaml

from bench import device_timer

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = ("unet_train", "autoencoder_train", "sampling")
TEXT_TOKENS = 16  # the emoji captions' length in MiniLM tokens, about


def _model_config(stage: str, cls: type):
    from common.config import from_dict

    data = yaml.safe_load((REPO / "configs" / stage / "emoji32_quick.yaml").read_text())["model"]
    return from_dict(cls, data, "model.")


def build_autoencoder_net():
    from autoencoder.model import build_autoencoder
    from autoencoder.model_config import AutoencoderConfig

    torch.manual_seed(0)
    return build_autoencoder(_model_config("autoencoder", AutoencoderConfig))


def build_unet(code_dim: int):
    from diffusion.unet import UNet, UNetConfig

    torch.manual_seed(0)
    return UNet(_model_config("diffusion", UNetConfig).resolve(code_dim, 384))


def unet_step(model, batch: int, device: torch.device, bf16: bool) -> Callable[[], torch.Tensor]:
    """One U-Net training step on fixed random latents (under bf16 autocast with ``bf16``); returns the prediction."""
    generator = torch.Generator().manual_seed(1)
    channels = model.config.in_channels
    x = torch.randn(batch, channels, 8, 8, generator=generator).to(device)
    noise = torch.randn(x.shape, generator=generator).to(device)
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    context = torch.randn(batch, TEXT_TOKENS, 384, generator=generator).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            prediction = model(x, t, context)
        torch.nn.functional.mse_loss(prediction.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return prediction.detach()

    return step


def autoencoder_step(model, batch: int, device: torch.device, bf16: bool) -> Callable[[], torch.Tensor]:
    """One autoencoder training step (no GAN, no LPIPS) on fixed random images; returns the reconstruction."""
    images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
        loss = (out.recon.float() - images).abs().mean() + (out.quantizer_loss if out.quantizer_loss is not None else 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.recon.detach()

    return step


def measure(name: str, make_step: Callable[[bool], tuple[Callable[[], torch.Tensor], Callable[[], None]]],
            repeats: int, device: torch.device) -> dict:
    """Eager and compiled timings of one workload. ``make_step(compiled)`` builds a fresh step from the
    same initial weights and returns it with the function that compiles its network in place."""
    eager, _ = make_step(False)
    first_eager = eager()
    for _ in range(2):
        eager()  # warm-up: kernels picked, memory allocated
    eager_s = statistics.median(device_timer.seconds(eager, device) for _ in range(repeats))
    compiled, compile_now = make_step(True)
    compile_now()
    holder: dict[str, torch.Tensor] = {}
    first_s = device_timer.seconds(lambda: holder.update(out=compiled()), device)
    compiled()  # a second call may still specialise (e.g. a changed quantizer state)
    compiled_s = statistics.median(device_timer.seconds(compiled, device) for _ in range(repeats))
    compile_s = max(0.0, first_s - eager_s)
    saved = eager_s - compiled_s
    break_even = compile_s / saved * eager_s / 60 if saved > 0 else None
    return {"workload": name, "eager_s": eager_s, "compiled_s": compiled_s, "speedup": eager_s / compiled_s,
            "compile_s": compile_s, "break_even_eager_minutes": break_even,
            "first_output_max_abs_diff": float((holder["out"].float() - first_eager.float()).abs().max())}


def training_workload(name: str, batch: int, device: torch.device, backend: str, precision: str):
    from common.compile import compile_in_place

    def make_step(_: bool):
        model = build_unet(8) if name == "unet_train" else build_autoencoder_net()
        model = model.to(device).train()
        step = (unet_step if name == "unet_train" else autoencoder_step)(model, batch, device, precision == "bf16")
        return step, lambda: compile_in_place(model, backend=backend)

    return make_step


def sampling_workload(batch: int, device: torch.device, backend: str, precision: str, steps: int = 20):
    from common.text_encoder import TextEncoder, TextEncoderConfig
    from diffusion.latent_diffusion import LatentDiffusion
    from diffusion.objectives import DiffusionConfig
    from pipelines import TextToImage

    text_encoder = TextEncoder(TextEncoderConfig())
    autoencoder = build_autoencoder_net().eval()
    unet = build_unet(autoencoder.config.code_dim).eval()
    prompts = ["dog", "red apple", "rocket", "ghost"] * (batch // 4 or 1)

    def make_step(_: bool):
        bundle = LatentDiffusion(copy.deepcopy(autoencoder), copy.deepcopy(unet), text_encoder,
                                 DiffusionConfig(schedule="scaled_linear", spacing="trailing"), latent_scale=1.0)
        pipe = TextToImage(bundle).to(device, precision=precision)

        def step() -> torch.Tensor:
            return pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, output_type="pt", progress=False,
                        generator=torch.Generator().manual_seed(0)).images

        return step, lambda: pipe.compile(backend=backend)

    return make_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk caches")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick check)")
    parser.add_argument("--precision", default="fp32",
                        help="fp32 and/or bf16, comma-separated (bf16: training under autocast, sampling in the "
                             "pipeline's bf16)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    workloads = args.workloads.split(",")
    precisions = args.precision.split(",")
    unknown = sorted(set(workloads) - set(WORKLOADS)) + sorted(set(precisions) - {"fp32", "bf16"})
    if unknown:
        parser.error(f"unknown workloads or precisions {unknown}; choose from {', '.join(WORKLOADS)}, fp32, bf16")
    if not args.warm_cache:  # before inductor is imported: it reads this once
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from common.compile import inductor_problem
    from common.environment import environment_record

    problem = inductor_problem(device.type) if args.backend == "inductor" else None
    if problem:
        raise SystemExit(f"error: cannot measure torch.compile here: {problem}")
    results = []
    for precision in precisions:
        for name in workloads:
            torch._dynamo.reset()
            make_step = (sampling_workload(args.batch, device, args.backend, precision) if name == "sampling"
                         else training_workload(name, args.batch, device, args.backend, precision))
            results.append({**measure(name, make_step, args.repeats, device), "precision": precision})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    record = {"command": "python -m bench.compile_speed " + " ".join(sys.argv[1:] if argv is None else argv),
              "backend": args.backend, "batch": args.batch, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "device": str(device),
              "caches": "warm" if args.warm_cache else "disabled", "results": results,
              "environment": environment_record()}
    text = json.dumps(record, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
