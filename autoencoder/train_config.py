"""The stage-1 training config (``autoencoder/train.py``'s), apart from the script so that benchmarks
and tests read the same YAML files without importing a training entry point."""
from __future__ import annotations

from dataclasses import dataclass, field

from autoencoder.discriminator import DiscriminatorConfig
from autoencoder.losses import LossConfig
from autoencoder.model_config import AutoencoderConfig, check_data_resolution
from common.data import DataConfig
from common.init_from import InitFrom
from common.training import OptimConfig, RunConfig


@dataclass(frozen=True)
class TrainConfig(InitFrom):
    """Everything an autoencoder run uses: the model, its discriminator, the losses, the optimizer
    (one setting for both optimizers), the data and the run. ``init_from`` starts the autoencoder (not the
    discriminator) from a trained one (:mod:`common.init_from`): a run, pipeline or component directory, a
    diffusers VQModel / AutoencoderKL folder or a taming ``.ckpt``."""

    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(name="emoji", resolution=256))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/autoencoder"))

    def __post_init__(self) -> None:
        check_data_resolution(self.model, self.data)
