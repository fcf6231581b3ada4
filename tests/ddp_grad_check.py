"""Two-process DDP gradients against one process on the full batch (a helper of ``tests/test_faults.py``).

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_grad_check.py OUT_FILE

Each process sets itself up with our ``make_accelerator`` (gloo on CPU), builds the same tiny
autoencoder, U-Net and GPT prior, wraps each with ``accelerator.prepare`` (DDP), and runs one
backward pass on ITS HALF of a fixed batch. DDP averages the gradients over the processes, which must
give the gradient of the loss averaged over the whole batch. Process 0 writes every model's gathered
gradients, ``{name: (processes, parameters) tensor}``, to OUT_FILE; the test computes the full-batch
gradient in one process with :func:`build`, :func:`full_batch` and :func:`loss_of` from this file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when run by hand

from autoencoder.model import AutoencoderConfig, build_autoencoder  # noqa: E402
from autoencoder.quantizer import QuantizerConfig  # noqa: E402
from diffusion.unet import UNet, UNetConfig  # noqa: E402
from prior.losses import next_token_loss  # noqa: E402
from prior.transformer import GPT, Condition, PriorConfig  # noqa: E402

MODELS = ("autoencoder", "unet", "prior")
BATCH = 4  # split into two halves of 2


def build(name: str) -> nn.Module:
    """A tiny model with seeded weights, perturbed so that no layer starts at zero (zero-initialised
    output layers would leave every other gradient at exactly 0, and the check vacuous)."""
    torch.manual_seed(0)
    if name == "autoencoder":  # the plain quantizer: no k-means or restarts, which look at the batch
        model = build_autoencoder(AutoencoderConfig(
            resolution=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            z_channels=8, code_dim=4, quantizer=QuantizerConfig(codebook_size=16, kmeans_init=False,
                                                                dead_code_threshold=0)))
    elif name == "unet":
        model = UNet(UNetConfig(in_channels=4, out_channels=4, block_channels=(16, 32), attention_levels=(False, True),
                                layers_per_block=1, head_dim=8, context_dim=12))
    else:
        model = GPT(PriorConfig(codebook_size=16, grid_size=4, condition="class", num_classes=3, width=32, depth=2,
                                heads=4))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point():
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model.train()


def full_batch(name: str) -> dict[str, Tensor]:
    """The fixed batch of BATCH items (the same in every process)."""
    generator = torch.Generator().manual_seed(1)
    if name == "autoencoder":
        return {"x": torch.rand(BATCH, 3, 16, 16, generator=generator) * 2 - 1}
    if name == "unet":
        return {"x": torch.randn(BATCH, 4, 8, 8, generator=generator),
                "t": torch.randint(0, 1000, (BATCH,), generator=generator),
                "context": torch.randn(BATCH, 5, 12, generator=generator),
                "mask": torch.arange(5)[None, :] < torch.tensor([[5], [3], [1], [4]]),
                "target": torch.randn(BATCH, 4, 8, 8, generator=generator)}
    return {"tokens": torch.randint(0, 16, (BATCH, 16), generator=generator), "labels": torch.tensor([0, 2, 1, 2])}


def loss_of(name: str, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The mean loss of ``batch``: what training minimises for each model."""
    if name == "autoencoder":
        out = model(batch["x"])
        return (out.recon - batch["x"]).abs().mean() + out.quantizer_loss
    if name == "unet":
        prediction = model(batch["x"], batch["t"], context=batch["context"], context_mask=batch["mask"])
        return (prediction - batch["target"]).pow(2).mean()
    tokens = batch["tokens"]
    return next_token_loss(model(tokens[:, :-1], Condition(labels=batch["labels"])), tokens).loss


def flat_grads(model: nn.Module) -> Tensor:
    """Every parameter's gradient, flattened in parameter order (zeros where there is none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def main(out_file: str) -> None:
    from common.training import RunConfig, make_accelerator

    run = RunConfig(out_dir=str(Path(out_file).parent / "ddp_grad_run"), precision="no", cpu_threads=1)
    accelerator = make_accelerator(run)
    rank, world = accelerator.process_index, accelerator.num_processes
    gathered = {}
    for name in MODELS:
        model = accelerator.prepare(build(name))
        half = {key: value.chunk(world)[rank].to(accelerator.device) for key, value in full_batch(name).items()}
        accelerator.backward(loss_of(name, model, half))
        gathered[name] = accelerator.gather(flat_grads(accelerator.unwrap_model(model))[None]).cpu()
    if accelerator.is_main_process:
        torch.save({"processes": world, **gathered}, out_file)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
