"""Run a diffusers Stable Diffusion 1.x/2.x pipeline folder as a :class:`LatentDiffusion`, read in place.

    pipe = TextToImage.from_pretrained("path/to/stable-diffusion-folder")   # model_index.json, vae/, unet/, ...
    images = pipe("a dog", negative_prompt="blurry", guidance_scale=7.5, sampler="ddim", seed=0).images

Each part maps onto ours: ``vae/`` (``AutoencoderKL``) through :func:`autoencoder.convert.from_diffusers`,
``unet/`` through :func:`diffusion.convert.from_diffusers`, ``text_encoder/`` + ``tokenizer/`` as a CLIP
(or T5) :class:`common.text_encoder.TextEncoder` with the convention it was trained with, and
``scheduler/scheduler_config.json`` as the :class:`DiffusionConfig` of the noise schedule and the sampling
timesteps (:func:`diffusion_config_from_scheduler`): beta schedule, ``prediction_type`` (epsilon,
v_prediction, sample), ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one``. The VAE's
``scaling_factor`` becomes the latent scale. Our samplers run it: whichever scheduler class the folder
names (PNDM, DDIM, DPM-Solver, Euler, ...), ``sampler=`` picks ours, with diffusers' timesteps.
Options that change the process and that we do not model (``trained_betas``, ``clip_sample``,
``thresholding``, a VAE ``shift_factor``) are refused by name.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from autoencoder import convert as autoencoder_convert
from common.checkpoint import CheckpointError
from common.text_encoder import TextEncoder, TextEncoderConfig
from diffusion import convert as unet_convert
from diffusion.latent_diffusion import LatentDiffusion
from diffusion.objectives import DiffusionConfig

logger = logging.getLogger(__name__)

INDEX_FILE = "model_index.json"
SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
# Scheduler options that change the process, with the values at which they do not.
NEUTRAL = {"trained_betas": None, "clip_sample": False, "thresholding": False}


def is_diffusers_pipeline(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (it holds ``model_index.json``)."""
    return (Path(path) / INDEX_FILE).is_file()


def diffusion_config_from_scheduler(config: dict[str, Any]) -> DiffusionConfig:
    """Our noise schedule and sampling timesteps from a diffusers ``scheduler_config.json``.

    Raises:
        CheckpointError: an option we do not model, named with the value it must have.
    """
    problems = [f"{key}={config[key]!r} (needs {value!r})" for key, value in NEUTRAL.items()
                if key in config and config[key] != value]
    schedule, prediction = config.get("beta_schedule", "linear"), config.get("prediction_type", "epsilon")
    if schedule not in SCHEDULES:
        problems.append(f"beta_schedule={schedule!r} (supported: {', '.join(SCHEDULES)})")
    if prediction not in PREDICTIONS:
        problems.append(f"prediction_type={prediction!r} (supported: {', '.join(PREDICTIONS)})")
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        problems.append(f"timestep_spacing={spacing!r}")
    if problems:
        raise CheckpointError(f"cannot run this scheduler config ({config.get('_class_name', 'scheduler')}): "
                              + "; ".join(problems))
    _warn_about_sigma_spacing(config)
    return DiffusionConfig(
        schedule=SCHEDULES[schedule], num_steps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 0.0001)), beta_end=float(config.get("beta_end", 0.02)),
        zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)), prediction=PREDICTIONS[prediction],
        spacing=spacing, steps_offset=int(config.get("steps_offset", 0)) if spacing == "leading" else 0,
        set_alpha_to_one=bool(config.get("set_alpha_to_one", True)))


def _warn_about_sigma_spacing(config: dict[str, Any]) -> None:
    """A sigma spacing is a sampling option of ours, not part of the noise process: say how to ask for it."""
    for key, spacing in (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential")):
        if config.get(key):
            logger.warning("the scheduler config sets %s, which the pipelines do not apply by default: pass "
                           "sigma_spacing=%r (CLI: --sigma-spacing %s) to sample on those noise levels",
                           key, spacing, spacing)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Stable Diffusion folder holds model_index.json, vae/, unet/, "
                              f"text_encoder/, tokenizer/ and scheduler/scheduler_config.json")
    return json.loads(path.read_text())


def load_stable_diffusion(path: str | Path) -> LatentDiffusion:
    """A diffusers Stable Diffusion folder as a :class:`LatentDiffusion` on CPU, float32 (see the module doc)."""
    folder = Path(path)
    index = _read_json(folder / INDEX_FILE)
    missing = [part for part in ("vae", "unet", "text_encoder", "tokenizer", "scheduler") if part not in index]
    if missing:
        raise CheckpointError(f"{folder / INDEX_FILE} names no {', '.join(missing)}: only text-to-image pipelines "
                              f"with a VAE, a U-Net, a text encoder, a tokenizer and a scheduler can be run")
    config = diffusion_config_from_scheduler(_read_json(folder / "scheduler" / "scheduler_config.json"))
    vae_config = _read_json(folder / "vae" / "config.json")
    if vae_config.get("shift_factor") not in (None, 0, 0.0):
        raise CheckpointError(f"{folder / 'vae'}: shift_factor={vae_config['shift_factor']} is not supported")
    text = TextEncoderConfig(name_or_path=str(folder / "text_encoder"), tokenizer=str(folder / "tokenizer"))
    autoencoder = autoencoder_convert.from_diffusers(folder / "vae")
    return LatentDiffusion(autoencoder, unet_convert.from_diffusers(folder / "unet"), TextEncoder(text), config,
                           float(vae_config.get("scaling_factor", 0.18215)))
