"""Speed of our U-Net against diffusers' UNet2DConditionModel at the same architecture and weights.

    python -m bench.unet_vs_diffusers [--device cpu] [--batch 32] [--size 16] [--repeats 5]

The diffusers model is built with random weights and converted into ours, so both have exactly the
same parameters (the counts are printed and checked). Four workloads run in one process: a training
step (forward, MSE loss, backward, AdamW step) and an inference forward, each in fp32 and under bf16
autocast. Within a workload the two models alternate run by run, so drifting clocks and caches hit
both alike; medians are compared as speed-up = diffusers time / our time (> 1: ours is faster), and
so are the fastest runs, which are the least disturbed by other processes on a shared machine.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from bench import device_timer
from diffusion.convert import from_diffusers

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers import UNet2DConditionModel


def build_pair(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The diffusers U-Net (quick-config scale) and ours converted from it."""
    reference = UNet2DConditionModel(
        sample_size=args.size, in_channels=args.channels, out_channels=args.channels,
        block_out_channels=(64, 128, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=args.context_dim, attention_head_dim=4, norm_num_groups=32,
        use_linear_projection=True,
    )
    ours = from_diffusers(reference)
    return ours.to(device), reference.to(device)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def make_steps(model: nn.Module, is_ours: bool, batch: dict[str, Tensor], device: torch.device,
               ) -> dict[str, Callable[[], None]]:
    """The four workloads for one model, as closures."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def predict() -> Tensor:
        if is_ours:
            return model(batch["x"], batch["t"], batch["context"], batch["mask"])
        return model(batch["x"], batch["t"], batch["context"], encoder_attention_mask=batch["mask"]).sample

    def train(bf16: bool) -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            loss = (predict().float() - batch["noise"]).square().mean()
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer(bf16: bool) -> None:
        model.eval()
        with autocast(device, bf16):
            predict()

    return {"train fp32": lambda: train(False), "train bf16": lambda: train(True),
            "infer fp32": lambda: infer(False), "infer bf16": lambda: infer(True)}


def alternate(steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device,
              ) -> dict[str, tuple[float, float]]:
    """Median and fastest seconds per call of each step, timed in round-robin order."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(warmup + repeats):
        for name, step in steps.items():
            elapsed = device_timer.seconds(step, device)
            if index >= warmup:
                times[name].append(elapsed)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


WORKLOADS = ("train fp32", "train bf16", "infer fp32", "infer bf16")


def run(device: str = "cpu", batch: int = 32, size: int = 16, channels: int = 4, tokens: int = 16,
        context_dim: int = 384, repeats: int = 5, warmup: int = 1, workloads: tuple[str, ...] = WORKLOADS,
        echo: Callable[[str], None] = lambda line: None) -> dict:
    """Time each workload for both models; ``echo`` receives the lines the command line prints. Returns
    per workload the median and fastest seconds of each model and the speed-ups diffusers / ours."""
    settings = argparse.Namespace(size=size, channels=channels, context_dim=context_dim)
    device = torch.device(device)
    torch.manual_seed(0)
    ours, reference = build_pair(settings, device)
    pair = (("ours", ours), ("diffusers", reference))
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in pair}
    echo(f"parameters: ours {counts['ours']:,}  diffusers {counts['diffusers']:,}")
    assert abs(counts["ours"] - counts["diffusers"]) <= 0.01 * counts["diffusers"], "architectures differ"
    inputs = {"x": torch.randn(batch, channels, size, size, device=device),
              "t": torch.randint(0, 1000, (batch,), device=device),
              "context": torch.randn(batch, tokens, context_dim, device=device),
              "mask": torch.ones(batch, tokens, dtype=torch.bool, device=device)}
    inputs["mask"][::2, tokens // 2:] = False  # half the prompts padded, as in a real batch
    inputs["noise"] = torch.randn_like(inputs["x"])
    our_steps, their_steps = make_steps(ours, True, inputs, device), make_steps(reference, False, inputs, device)
    echo(f"device {device}, {torch.get_num_threads()} threads, batch {batch}, latents "
         f"{channels}x{size}x{size}, context {tokens}x{context_dim}, "
         f"median of {repeats} (after {warmup} warm-up)")
    echo(f"{'workload':<12} {'ours (s)':>10} {'diffusers (s)':>14} {'speed-up':>9}   {'(fastest runs)':>14}")
    results = {}
    for workload in workloads:
        timings = alternate({"ours": our_steps[workload], "diffusers": their_steps[workload]}, repeats, warmup, device)
        (ours_median, ours_min), (their_median, their_min) = timings["ours"], timings["diffusers"]
        results[workload] = {"ours_median": ours_median, "diffusers_median": their_median, "ours_min": ours_min,
                             "diffusers_min": their_min, "speedup": their_median / ours_median,
                             "speedup_fastest": their_min / ours_min}
        echo(f"{workload:<12} {ours_median:>10.4f} {their_median:>14.4f} {their_median / ours_median:>9.2f}   "
             f"{their_min / ours_min:>14.2f}")
    return {"device": str(device), "threads": torch.get_num_threads(), "batch": batch, "size": size,
            "channels": channels, "tokens": tokens, "context_dim": context_dim, "repeats": repeats,
            "warmup": warmup, "parameters": counts, "workloads": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--channels", type=int, default=4, help="latent channels")
    parser.add_argument("--tokens", type=int, default=16, help="context length")
    parser.add_argument("--context-dim", type=int, default=384, help="context width (MiniLM: 384)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: torch's default); 1 gives steadier numbers on a shared machine")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.device, args.batch, args.size, args.channels, args.tokens, args.context_dim, args.repeats, args.warmup,
        tuple(args.workloads.split(",")), echo=print)


if __name__ == "__main__":
    main()
