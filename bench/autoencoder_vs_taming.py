"""Training-step speed of our VQ-GAN against taming-transformers' at identical architecture and weights.

    python -m bench.autoencoder_vs_taming [--device cpu] [--batch 8] [--resolution 64] [--repeats 10]

Both models run forward + backward (L1 reconstruction + quantizer loss) on the same batch in one
process, alternating run by run so that drifting clocks and caches hit both alike; the medians are
compared (ratio = taming / ours, so > 1 means ours is faster), in fp32 and under bf16 autocast (our
training default), then our model alone: fp32 against bf16 autocast and the channels-last format.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from autoencoder.convert import from_taming_state_dict
from bench import device_timer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from taming.modules.diffusionmodules.model import Decoder as TamingDecoder
    from taming.modules.diffusionmodules.model import Encoder as TamingEncoder
    from taming.modules.vqvae.quantize import VectorQuantizer as TamingQuantizer


class TamingVQGAN(nn.Module):
    """taming's VQModel generator path (encoder, quant convs, quantizer, decoder) without Lightning."""

    def __init__(self, resolution: int, codebook_size: int, code_dim: int) -> None:
        super().__init__()
        arch = dict(ch=64, out_ch=3, ch_mult=(1, 1, 2, 2), num_res_blocks=2, attn_resolutions=(resolution // 4,),
                    dropout=0.0, in_channels=3, resolution=resolution, z_channels=64, double_z=False)
        self.encoder, self.decoder = TamingEncoder(**arch), TamingDecoder(**arch)
        self.quantize = TamingQuantizer(codebook_size, code_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(64, code_dim, 1)
        self.post_quant_conv = nn.Conv2d(code_dim, 64, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z_q, loss, _ = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(z_q)), loss


def taming_step(model: TamingVQGAN, x: Tensor, autocast: bool = False) -> None:
    context = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        recon, q_loss = model(x)
        loss = (recon.float() - x).abs().mean() + q_loss
    loss.backward()


def our_step(model: nn.Module, x: Tensor, autocast: bool = False) -> None:
    context = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        out = model(x)
        loss = (out.recon.float() - x).abs().mean() + out.quantizer_loss
    loss.backward()


def timed(step: Callable[[], None], model: nn.Module, device: torch.device) -> float:
    model.zero_grad(set_to_none=True)
    return device_timer.seconds(step, device)


def alternate(runs: dict[str, tuple[Callable[[], None], nn.Module]], repeats: int, warmup: int,
              device: torch.device) -> dict[str, float]:
    """Median seconds per step of each run, timed in round-robin order."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(warmup + repeats):
        for name, (step, model) in runs.items():
            elapsed = timed(step, model, device)
            if index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


RATIOS = (("taming fp32", "ours fp32"), ("ours fp32", "ours bf16 autocast"), ("ours fp32", "ours fp32 channels_last"),
          ("taming bf16 autocast", "ours bf16 autocast"), ("taming fp32", "ours bf16 autocast"))


def run(device: str = "cpu", batch: int = 8, resolution: int = 64, repeats: int = 10, warmup: int = 2,
        echo: Callable[[str], None] = lambda line: None) -> dict:
    """Measure every variant; ``echo`` receives the lines the command line prints. Returns the medians
    (seconds per forward + backward step) and the ratios baseline / candidate (> 1: candidate faster)."""
    device = torch.device(device)
    torch.manual_seed(0)
    theirs = TamingVQGAN(resolution, codebook_size=1024, code_dim=8).to(device).train()
    ours = from_taming_state_dict(theirs.state_dict(), resolution=resolution).to(device).train()
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    config = ours.config
    parameters = sum(p.numel() for p in ours.parameters())
    echo(f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    echo(f"config: {resolution}px, base {config.base_channels}, channel_mult {config.channel_mult}, "
         f"res blocks {config.num_res_blocks}, attention at {config.attn_resolutions} + mid, "
         f"K={config.codebook_size}, D={config.code_dim}, batch {batch}, "
         f"{parameters / 1e6:.1f} M parameters")

    with torch.no_grad():
        same = (theirs(x)[0] - ours.eval()(x).recon).abs().max().item()
    ours.train()
    echo(f"identical weights: max |recon difference| {same:.1e}")

    channels_last = from_taming_state_dict(theirs.state_dict(), resolution=resolution).to(device).train()
    channels_last = channels_last.to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)
    medians = alternate({"taming fp32": (lambda: taming_step(theirs, x), theirs),
                         "taming bf16 autocast": (lambda: taming_step(theirs, x, autocast=True), theirs),
                         "ours fp32": (lambda: our_step(ours, x), ours),
                         "ours bf16 autocast": (lambda: our_step(ours, x, autocast=True), ours),
                         "ours fp32 channels_last": (lambda: our_step(channels_last, x_last), channels_last)},
                        repeats, warmup, device)
    for name, seconds in medians.items():
        echo(f"  {name:<24} median {seconds * 1e3:8.1f} ms / step (forward + backward)")
    ratios = {f"{baseline} / {candidate}": medians[baseline] / medians[candidate] for baseline, candidate in RATIOS}
    for name, ratio in ratios.items():
        echo(f"  {name} = {ratio:.2f}")
    echo("  (ratio > 1: the second is faster)")
    return {"device": str(device), "threads": torch.get_num_threads(), "batch": batch, "resolution": resolution,
            "repeats": repeats, "warmup": warmup, "parameters": parameters, "max_recon_difference": same,
            "median_seconds": medians, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    run(args.device, args.batch, args.resolution, args.repeats, args.warmup, echo=print)


if __name__ == "__main__":
    main()
