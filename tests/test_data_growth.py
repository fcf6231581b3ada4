"""``bench.data_growth --cache synthetic``: the cache it writes without running a model is the one the
training process of the benchmark finds (same key, nothing encoded), with the encoders' shapes."""
from __future__ import annotations

import pytest
import torch

import diffusion.latent_cache as latent_cache
from bench import data_growth
from common.data import DataConfig, build_dataset
from common.text_encoder import TextEncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_synthetic_cache_is_found_by_the_training_process(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTGEN_CACHE_DIR", str(tmp_path / "index"))
    sources = data_growth.write_sources(tmp_path / "data", 30, 16)
    autoencoder = data_growth.make_autoencoder(tmp_path / "autoencoder", 16)
    data = DataConfig(name="webdataset", path=str(sources["webdataset"]), resolution=16)
    task = {"text": "bundled", "autoencoder": str(autoencoder), "cache_root": str(tmp_path / "cache")}
    written = data_growth._synthetic_cache(build_dataset(data), data, task)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the training process encoded the cache instead of finding it")

    monkeypatch.setattr(latent_cache, "encode_dataset", no_encoding)
    cache = latent_cache.load_or_build_cache(autoencoder, data, TextEncoderConfig(), tmp_path / "cache")
    assert str(cache.directory) == written["cache_dir"] and len(cache) == 30
    assert cache.latents.shape == (30, 4, 4, 4)  # the tiny autoencoder's code_dim, resolution / 4
    assert float(cache.latents.double().std()) == pytest.approx(1.0, abs=1e-3)
    states = cache.text(cache.caption_ids[:3])
    caption = cache.captions[int(cache.caption_ids[0])]
    assert states.states.shape[-1] == data_growth.TEXT_WIDTH and caption.startswith("picture ")
    assert int(states.mask[0].sum()) == len(caption.split()) + 4
    assert torch.isfinite(states.states).all()
