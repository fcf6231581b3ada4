"""Evaluate a trained autoencoder on a dataset split and print JSON.

    python -m autoencoder.evaluate RUN_DIR --data emoji --split heldout
    python -m autoencoder.evaluate RUN_DIR --data webdataset --path '/data/{00000..00099}.tar' heldout_fraction=0.05
    python -m autoencoder.evaluate RUN_DIR --data hf --path /data/saved image_column=img caption_column=txt

RUN_DIR is a training run (its ``autoencoder/`` component is used) or a component directory. The data
are any the training configs accept, built by the same front door (:func:`common.data.build_dataset`):
the flags set the common fields, and ``key=value`` arguments (or ``data.key=value``) any other field of
``DataConfig``. ``--split heldout`` of a source without a held-out split is refused with the setting
that gives it one (scores on training images would pass for held-out ones).
Reports PSNR, SSIM, LPIPS (null when the VGG weights are not available: never a made-up number),
the fraction of the codebook used on the split, and the code perplexity.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import torch
from torch import Tensor

from autoencoder.model import Autoencoder, AutoencoderOutput, KLAutoencoder
from autoencoder.perceptual import PerceptualWeightsError, build_perceptual
from common.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError
from common.config import ConfigError, load_config
from common.data import DataConfig, DataError, build_dataset, has_heldout, no_heldout_message
from common.metrics import codebook_stats, psnr, ssim


def component_dir(path: str | Path) -> Path:
    """Accept a run directory or the component directory itself."""
    path = Path(path)
    for candidate in (path / "autoencoder", path):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise CheckpointError(
        f"{path} is neither a stage-1 run directory (holding autoencoder/{CONFIG_FILE}) nor an autoencoder "
        f"component directory ({CONFIG_FILE} + {WEIGHTS_FILE}); pass the run.out_dir of an autoencoder/train.py "
        f"run, or the directory autoencoder.convert wrote")


def reconstruct(model: Autoencoder, x: Tensor) -> AutoencoderOutput:
    """The model's deterministic reconstruction of ``x``: a KL model decodes its posterior mean.

    A posterior sample would add the encoder's noise to the figures, so two runs would disagree and
    the scores would understate what the decoder does with the latents stage 2 is trained on.
    """
    if isinstance(model, KLAutoencoder):
        return model(x, sample=False)
    return model(x)


@torch.no_grad()
def evaluate(model: Autoencoder, data: DataConfig, batch_size: int = 64, lpips_weights: str = "") -> dict:
    """Reconstruction quality and codebook use of ``model`` on ``data``.

    Runs in eval mode whatever mode the model is in (a training-mode quantizer would update its codebook
    statistics and restart codes while being scored), and restores the mode afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        return _scores(model, build_dataset(data), batch_size, _perceptual_or_none(lpips_weights))
    finally:
        model.train(was_training)


def _perceptual_or_none(lpips_weights: str) -> torch.nn.Module | None:
    """LPIPS, or None when its VGG weights are not available (reported as null, never a made-up number)."""
    try:
        return build_perceptual("lpips", lpips_weights)
    except PerceptualWeightsError:
        return None


def _scores(model: Autoencoder, dataset, batch_size: int, perceptual: torch.nn.Module | None) -> dict:
    """Per-image PSNR / SSIM / LPIPS averaged over ``dataset``, and the codebook statistics of its codes."""
    device = next(model.parameters()).device
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    indices = []
    for start in range(0, len(dataset), batch_size):
        x = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))]).to(device)
        out = reconstruct(model, x)
        recon = out.recon.float().clamp(-1, 1)
        sums["psnr"] += psnr(recon, x).sum().item()
        sums["ssim"] += ssim(recon, x).sum().item()
        if perceptual is not None:
            sums["lpips"] += perceptual.to(device)(recon, x).sum().item()
        if out.quant is not None:
            indices.append(out.quant.indices.flatten().cpu())
    count = len(dataset)
    result = {"images": count, "psnr": sums["psnr"] / count, "ssim": sums["ssim"] / count,
              "lpips": sums["lpips"] / count if perceptual is not None else None,
              "codebook_used": None, "perplexity": None}
    if indices:
        used, perplexity = codebook_stats(torch.cat(indices), model.config.codebook_size)
        result.update(codebook_used=used, perplexity=perplexity, codebook_size=model.config.codebook_size)
    return result


def data_config(args: argparse.Namespace, resolution: int) -> DataConfig:
    """The DataConfig of the flags and the ``key=value`` settings (checked like a training config's ``data``)."""
    settings = [setting.removeprefix("data.") for setting in args.data_settings]
    flags = {"name": args.data, "resolution": resolution, "split": args.split, "path": args.path, "size": args.size}
    bad = [s for s in settings if "=" not in s or s.split("=", 1)[0] in flags]
    if bad:
        raise ConfigError(f"data settings {bad}: each must be key=value with a key other than {', '.join(flags)} "
                          "(set those with --data, --resolution, --split, --path, --size)")
    return dataclasses.replace(load_config(DataConfig, None, settings), **flags)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--data", default="emoji", choices=get_args(get_type_hints(DataConfig)["name"]))
    parser.add_argument("--split", default="heldout", choices=get_args(get_type_hints(DataConfig)["split"]))
    parser.add_argument("--path", default="", help="data.path: the image folder, shards or saved hf dataset")
    parser.add_argument("--resolution", type=int, default=0, help="default: the model's training resolution")
    parser.add_argument("--size", type=int, default=1000, help="number of images for --data shapes")
    parser.add_argument("--lpips-weights", default="", help="path to vgg16-397923af.pth, if not in the torch cache")
    parser.add_argument("data_settings", nargs="*", metavar="key=value",
                        help="other data settings (DataConfig fields): heldout_fraction=0.05, heldout_path=..., "
                             "image_column=..., caption_column=..., label_column=...")
    args = parser.parse_intermixed_args(argv)  # key=value settings may follow the flags
    try:  # a wrong directory or data option ends with its message, not a traceback
        model = Autoencoder.from_pretrained(component_dir(args.run_dir)).eval()
        data = data_config(args, args.resolution or model.config.resolution)
        if data.split == "heldout" and not has_heldout(data):
            raise ConfigError(f"--split heldout: {no_heldout_message(data)}; or pass --split all")
        scores = evaluate(model, data, lpips_weights=args.lpips_weights)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    result = {"run": str(args.run_dir), "data": args.data, "split": args.split, "resolution": data.resolution,
              **scores}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
