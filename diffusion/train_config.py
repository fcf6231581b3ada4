"""The latent diffusion training config (``diffusion/train_latent.py``'s), apart from the script so that
benchmarks and tests read the same YAML files without importing a training entry point."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.captions import check_templates
from common.data import DataConfig
from common.init_from import InitFrom
from common.lora import LoraConfig, check_lora
from common.text_encoder import TextEncoderConfig
from common.training import OptimConfig, RunConfig
from diffusion.objectives import DiffusionConfig
from diffusion.unet import UNetConfig

SHAPES_PROMPTS = (
    "a large red circle in the center", "a small blue square at the top left", "a large green triangle at the bottom",
    "a small yellow circle at the right", "a large purple square at the top right",
    "a small orange triangle at the left", "a large blue circle at the bottom right", "a small red square at the top",
)


# Diffusion settings that only shape the training loss: a fine-tune may change them (e.g. no condition
# dropout, so that the null prompt of guidance keeps the base's meaning), not the process itself. As keyword
# values that neutralise them, for comparing two processes.
TRAINING_ONLY = dict(weighting="none", snr_gamma=0.0, cond_drop_prob=0.0, timestep_bias=1.0)


@dataclass(frozen=True)
class SampleConfig:
    """The periodic sample grid: one column per prompt, ``per_prompt`` rows, a fixed seed.

    ``sampler``, ``steps`` and ``guidance`` left out (None) take the pipelines' defaults
    (:class:`pipelines.options.GenerationOptions`); the pipelines check the values given.
    """

    prompts: tuple[str, ...] = SHAPES_PROMPTS
    per_prompt: int = 2
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig(InitFrom):
    """Everything a latent diffusion run uses.

    init_from: start the U-Net from a trained one (:mod:`common.init_from`): a pipeline or run directory,
        a ``unet`` component, or a diffusers U-Net / Stable Diffusion folder. From a pipeline, training
        uses its latent scale, and ``autoencoder`` must be its autoencoder.
    lora: train LoRA adapters on ``init_from``'s U-Net instead of the whole network (:mod:`common.lora`).

    autoencoder: a stage-1 run directory (holding ``autoencoder/``) or an autoencoder component directory.
    cache_dir: parent directory of the latent caches (one sub-directory per autoencoder/data/text combination).
    model: the U-Net. ``in_channels``/``out_channels`` come from the autoencoder's ``code_dim`` and
        ``context_dim`` from the text encoder's width (leave them out; a value given must agree), or
        ``context_dim: 0`` for a U-Net without text, which then needs ``num_classes`` (the number of
        dataset labels).
    text: the text encoder; unused (never loaded) when ``model.context_dim`` is 0.
    caption_templates: phrasings of each caption to train on as well, one drawn per item and step
        (``["a {}", "{} emoji"]``; :mod:`common.captions`): a model that saw only "dog" fails on "a dog".
    """

    autoencoder: str = "runs/shapes32_quick"
    cache_dir: str = "runs/latent_cache"
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/diffusion"))
    sample: SampleConfig = field(default_factory=SampleConfig)
    caption_templates: tuple[str, ...] = ()
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        check_templates(self.caption_templates, "caption_templates")
        check_lora(self.lora, self.init_from)
