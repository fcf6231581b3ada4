"""Every YAML file under configs/ loads into its training script's config, strictly."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_class(stage: str):
    if stage == "autoencoder":
        from autoencoder.train_config import TrainConfig
    elif stage == "diffusion":
        from diffusion.train_config import TrainConfig
    elif stage == "classifier":
        from diffusion.train_classifier import TrainConfig
    else:
        assert stage == "prior", f"configs/{stage}/ has no training script"
        from prior.train import TrainConfig
    return TrainConfig


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads(path):
    cfg = load_config(config_class(path.parent.name), path)
    assert cfg.run.out_dir.startswith("runs/"), "configs write under runs/ by default"
