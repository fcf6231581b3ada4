"""Write a latent diffusion pipeline as a diffusers Stable Diffusion folder.

    pipe.save_pretrained("out/sd", format="diffusers")           # any text-conditioned diffusion pipeline
    python -m pipelines.export runs/emoji32_diffusion out/sd     # a run directory, its pipeline/, or an SD folder

The folder::

    model_index.json              StableDiffusionPipeline; safety_checker and feature_extractor null
    vae/                          AutoencoderKL (VQModel for a VQ latent space); scaling_factor = our latent_scale
    unet/                         UNet2DConditionModel
    scheduler/scheduler_config.json   DDIMScheduler: our schedule, prediction, timestep spacing and offset
    text_encoder/, tokenizer/     the transformers model and tokenizer (tokenizer.model_max_length = our limit)

Each component folder holds ``config.json`` + ``diffusion_pytorch_model.safetensors`` (transformers'
own files for the text parts). ``TextToImage.from_pretrained(folder)`` reads it back as the same
pipeline. What diffusers cannot hold is refused or warned about by :mod:`autoencoder.export` and
:mod:`diffusion.export`; at the pipeline level:

- Our text encoders keep their own conventions (a BERT-like encoder masks its padding); diffusers'
  ``StableDiffusionPipeline`` runs any text encoder as it runs CLIP (padded to the tokenizer's limit,
  no mask into the U-Net). For our images, give it ``prompt_embeds`` / ``negative_prompt_embeds``
  from our text encoder; prompt strings give the same images only for CLIP folders.
- A VQ latent space exports as a ``VQModel``: ``StableDiffusionPipeline`` decodes only with an
  ``AutoencoderKL``, so decode its ``output_type="latent"`` with ``VQModel.decode`` (which snaps to the
  codebook, as ours does).
- Class labels (a class + text U-Net), and the pooled prompt of a ``pooled_context`` U-Net (its
  ``class_labels``), are not passed by ``StableDiffusionPipeline``: call the U-Net.
- Token priors (AR GPT, MaskGIT) have no diffusers pipeline; only their autoencoder exports
  (:func:`autoencoder.export.to_diffusers`).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from autoencoder.export import ExportError, import_diffusers, to_diffusers
from common.checkpoint import CheckpointError, atomic_write, find_pipeline_dir, read_pipeline_json
from diffusion.export import scheduler_to_diffusers, unet_to_diffusers
from diffusion.latent_diffusion import PIPELINE_KIND, LatentDiffusion
from diffusion.stable_diffusion import INDEX_FILE, is_diffusers_pipeline, load_stable_diffusion

logger = logging.getLogger(__name__)

FORMATS = ("latentgen", "diffusers")
TOKEN_PRIOR_REFUSAL = ("diffusers has no pipeline for token priors (AR GPT, MaskGIT), so it cannot be exported as "
                       "a diffusers folder; its autoencoder can be: "
                       "autoencoder.export.to_diffusers(pipe.model.autoencoder).save_pretrained(dir)")


def model_index(parts: dict[str, Any], version: str) -> dict[str, Any]:
    """``model_index.json`` of a StableDiffusionPipeline over ``parts`` (folder name -> object)."""
    def library(part: Any) -> str:
        return type(part).__module__.split(".")[0]

    index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": version}
    index.update({name: [library(part), type(part).__name__] for name, part in parts.items()})
    index.update({name: [None, None] for name in ("safety_checker", "feature_extractor", "image_encoder")})
    index["requires_safety_checker"] = False
    return dict(sorted(index.items()))


def bundle_of(source: Any) -> LatentDiffusion:
    """The :class:`LatentDiffusion` of a pipeline (or the bundle itself); other bundles are refused."""
    model = getattr(source, "model", source)
    if isinstance(model, LatentDiffusion):
        return model
    raise ExportError(f"{type(source).__name__} runs a {type(model).__name__}: {TOKEN_PRIOR_REFUSAL}")


def load_bundle(path: str | Path) -> LatentDiffusion:
    """The latent diffusion bundle of a run directory, its ``pipeline/``, or a diffusers folder."""
    if is_diffusers_pipeline(path):
        return load_stable_diffusion(path)
    directory = find_pipeline_dir(path)  # its error names the training commands
    kind = read_pipeline_json(directory).get("kind")
    if kind != PIPELINE_KIND:
        raise ExportError(f"{directory} holds a {kind!r} pipeline: {TOKEN_PRIOR_REFUSAL}")
    return LatentDiffusion.from_pretrained(directory)


def export_diffusers(source: Any, directory: str | Path) -> Path:
    """Write ``source`` (a latent diffusion pipeline or :class:`LatentDiffusion`) as a diffusers Stable Diffusion
    folder (see the module doc). Everything is converted before anything is written.

    Raises:
        ExportError: a token prior, a pipeline without text, an option diffusers cannot represent
            (named), or no diffusers installed.
    """
    model = bundle_of(source)
    if model.text_encoder is None:
        raise ExportError("this pipeline has no text encoder (a class-only U-Net, context_dim=0): diffusers' "
                          "UNet2DConditionModel and StableDiffusionPipeline need text cross-attention")
    diffusers = import_diffusers()
    parts = {
        "unet": unet_to_diffusers(model.unet, model.autoencoder.config.latent_size),
        "vae": to_diffusers(model.autoencoder, model.latent_scale),
        "scheduler": scheduler_to_diffusers(model.config),
        "text_encoder": model.text_encoder.model,
        "tokenizer": copy.deepcopy(model.text_encoder.tokenizer),
    }
    parts["tokenizer"].model_max_length = model.text_encoder.max_length  # our token limit travels with it
    _warn_about_diffusers_pipeline(model)
    directory = Path(directory)
    for name, part in parts.items():
        part.save_pretrained(directory / name)
    index = model_index(parts, diffusers.__version__)
    atomic_write(directory / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))
    logger.info("wrote a diffusers StableDiffusionPipeline folder to %s", directory)
    return directory


def _warn_about_diffusers_pipeline(model: LatentDiffusion) -> None:
    """Say where diffusers' own StableDiffusionPipeline will not run the folder as we do."""
    config = model.config
    if model.autoencoder.config.kind == "vq":
        logger.warning("the latent space is a VQ autoencoder's: vae/ is a VQModel, which StableDiffusionPipeline "
                       "cannot decode with; decode its output_type='latent' / scaling_factor with VQModel.decode")
    if model.unet.config.pooled_context:
        logger.warning("the U-Net adds the pooled prompt to its time embedding: StableDiffusionPipeline passes no "
                       "class_labels, so call the exported UNet2DConditionModel with class_labels = the masked mean "
                       "of encoder_hidden_states (diffusion.unet.pooled)")
    if model.unet.config.num_classes:
        logger.warning("the U-Net is class-conditional: StableDiffusionPipeline passes no class_labels; call the "
                       "exported UNet2DConditionModel with class_labels")
    if config.spacing == "leading" and config.steps_offset != 1:
        logger.warning("StableDiffusionPipeline resets steps_offset=%d to 1 when it loads the scheduler; load it with "
                       "DDIMScheduler.from_pretrained(folder, subfolder='scheduler') to keep ours", config.steps_offset)


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: export a latent diffusion pipeline (run directory, pipeline directory or SD folder)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a training run directory, its pipeline/, or a diffusers folder")
    parser.add_argument("out_dir", type=Path, help="the diffusers folder to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = export_diffusers(load_bundle(args.source), args.out_dir)
    except (ExportError, CheckpointError) as error:
        raise SystemExit(f"error: {error}") from error
    print(out)
    return out


if __name__ == "__main__":
    main()
