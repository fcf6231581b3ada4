"""Component configs are checked against their weights' header before any module is built for real, and
the config dataclasses bound every size that allocates memory."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autoencoder.model import Autoencoder, AutoencoderConfig
from autoencoder.quantizer import QuantizerConfig
from common.checkpoint import CheckpointError
from common.config import ConfigError
from diffusion.classifier import ClassifierConfig
from diffusion.unet import UNet, UNetConfig
from prior.transformer import PriorConfig
from tiny import make_tiny_autoencoder, tiny_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]

# In a fresh interpreter (ru_maxrss is the process's peak, and a test process has had larger peaks): load the
# intact autoencoder once (so that lazily imported parts of PyTorch are in place), then the one whose
# config.json says base_channels=8192 (within the bound; its 3x3 convolutions alone would take ~20 GB).
# RLIMIT_AS keeps a build that does allocate from taking the machine down: it fails in the allocator instead.
PEAK_SCRIPT = """
import json, resource, sys
from pathlib import Path
from autoencoder.model import Autoencoder
from common.checkpoint import CheckpointError
good, bad = Path(sys.argv[1]), Path(sys.argv[2])
Autoencoder.from_pretrained(good)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, hard))
try:
    Autoencoder.from_pretrained(bad)
    message = "loaded"
except CheckpointError as error:
    message = "CheckpointError: " + str(error)
except Exception as error:
    message = type(error).__name__ + ": " + str(error)[:200]
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"message": message, "grown_mb": grown}))
"""


def test_an_absurd_config_is_refused_without_allocating(tmp_path):
    good = make_tiny_autoencoder(tmp_path / "good")
    bad = Path(shutil.copytree(good, tmp_path / "bad"))
    meta = json.loads((bad / "config.json").read_text())
    meta["config"]["base_channels"] = 8192
    (bad / "config.json").write_text(json.dumps(meta))
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(good), str(bad)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin"})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["message"].startswith("CheckpointError: ") and "bad/config.json does not fit" in result["message"]
    assert "decoder.conv_out.weight: (3, 16, 3, 3) in model.safetensors, (3, 8192, 3, 3) in the model" \
        in result["message"], result["message"]
    assert result["grown_mb"] < 100, result


def test_overrides_are_checked_against_the_weights_too(tmp_path):
    UNet(tiny_unet_config()).save_pretrained(tmp_path / "unet")
    assert UNet.from_pretrained(tmp_path / "unet", dropout=0.1).config.dropout == 0.1  # weights unchanged: fine
    with pytest.raises(CheckpointError, match="unet/config.json does not fit .* 2 missing keys|missing keys"):
        UNet.from_pretrained(tmp_path / "unet", layers_per_block=2)


def test_an_autoencoder_class_mismatch_is_still_named(tmp_path):
    from autoencoder.model import KLAutoencoder

    with pytest.raises(CheckpointError, match="holds a 'vq' autoencoder, not a KLAutoencoder"):
        KLAutoencoder.from_pretrained(make_tiny_autoencoder(tmp_path / "ae"))
    assert isinstance(Autoencoder.from_pretrained(tmp_path / "ae"), Autoencoder)


BOUNDS = {  # name -> (build the config, words)
    "autoencoder_base_channels": (lambda: AutoencoderConfig(base_channels=10**6), "base_channels=1000000 is above"),
    "autoencoder_codebook": (lambda: AutoencoderConfig(quantizer=QuantizerConfig(codebook_size=10**12)),
                             "quantizer.codebook_size=1000000000000 is above 16,777,216"),
    "autoencoder_levels": (lambda: AutoencoderConfig(resolution=2**14, channel_mult=(1,) * 13),
                           "channel_mult (levels)=13 is above 12"),
    "unet_width": (lambda: UNetConfig(block_channels=(2**20,), attention_levels=(False,)),
                   "block_channels (max)=1048576 is above 16,384"),
    "unet_classes": (lambda: UNetConfig(num_classes=10**9), "num_classes=1000000000 is above"),
    "prior_codebook": (lambda: PriorConfig(codebook_size=10**12), "codebook_size=1000000000000 is above"),
    "prior_depth": (lambda: PriorConfig(depth=10**6), "depth=1000000 is above 1,024"),
    "prior_mlp_ratio": (lambda: PriorConfig(mlp_ratio=0.0), "mlp_ratio must be > 0"),
    "classifier_latent_scale": (lambda: ClassifierConfig(latent_scale=float("nan")), "latent_scale must be a finite"),
}


@pytest.mark.parametrize("case", BOUNDS)
def test_config_dataclasses_bound_their_sizes(case):
    make, words = BOUNDS[case]
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_the_shipped_defaults_are_within_the_bounds():
    AutoencoderConfig(), UNetConfig(), PriorConfig(codebook_size=16384, grid_size=32, text_dim=384), ClassifierConfig()
