"""The latent cache: encoded once and reused, captions deduplicated, latents scaled to unit variance.

Also home of the tiny models the latent diffusion tests share (a 16 px VQ autoencoder, a one-layer
BERT with MiniLM's tokenizer, a small U-Net), all built with random weights in a temporary directory.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from autoencoder.model import Autoencoder, AutoencoderConfig, build_autoencoder
from common.data import DataConfig, build_dataset, shapes
from diffusion import latent_cache
from diffusion.latent_cache import NULL_ID, load_cache, load_or_build_cache, pad_tokens
from diffusion.latent_diffusion import DiffusionConfig, LatentDiffusion
from common.text_encoder import TextEncoder, TextEncoderConfig, bundled_model_dir
from diffusion.unet import UNet, UNetConfig

pytest.importorskip("transformers")

TINY_DATA = DataConfig(name="shapes", resolution=16, size=48)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_autoencoder(directory: Path, kind: str = "vq") -> Path:
    """A random 16 px, f=2, 4-channel autoencoder saved as a component directory."""
    torch.manual_seed(0)
    config = AutoencoderConfig(resolution=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               attn_resolutions=(), z_channels=16, codebook_size=32, code_dim=4, kind=kind)
    build_autoencoder(config).save_pretrained(directory)
    return directory


def make_tiny_text_encoder(directory: Path) -> Path:
    """A random one-layer, 32-wide BERT with the bundled MiniLM's tokenizer, saved for ``name_or_path``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(bundled_model_dir() / name, directory / name)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    return directory


def tiny_unet_config(code_dim: int = 4, context_dim: int = 32) -> UNetConfig:
    return UNetConfig(in_channels=code_dim, out_channels=code_dim, block_channels=(16, 32),
                      attention_levels=(False, True), layers_per_block=1, head_dim=8, context_dim=context_dim)


def make_tiny_pipeline(root: Path, seed: int = 0) -> LatentDiffusion:
    """A LatentDiffusion of tiny random parts; the U-Net is perturbed so that it depends on its inputs
    (a fresh U-Net's zero-initialised output layer would predict 0 whatever the prompt)."""
    autoencoder = Autoencoder.from_pretrained(make_tiny_autoencoder(root / "ae"))
    text_encoder = TextEncoder(TextEncoderConfig(name_or_path=str(make_tiny_text_encoder(root / "text"))))
    torch.manual_seed(seed)
    unet = UNet(tiny_unet_config()).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return LatentDiffusion(autoencoder, unet, text_encoder, DiffusionConfig(num_steps=100), latent_scale=2.5)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread, and a busy shared machine makes more threads much slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parts")
    text_dir = make_tiny_text_encoder(root / "text")
    return {"root": root, "ae": make_tiny_autoencoder(root / "ae"), "text": TextEncoderConfig(name_or_path=str(text_dir)),
            "text_encoder": TextEncoder(TextEncoderConfig(name_or_path=str(text_dir)))}


def build(parts: dict, data: DataConfig = TINY_DATA, **kwargs) -> latent_cache.LatentCache:
    return load_or_build_cache(parts["ae"], data, parts["text"], parts["root"] / "cache",
                               text_encoder=parts["text_encoder"], **kwargs)


def test_cache_holds_scaled_quantized_latents_and_unique_captions(parts):
    cache = build(parts)
    dataset = build_dataset(TINY_DATA)
    captions = [dataset[i]["caption"] for i in range(len(dataset))]
    assert len(cache) == 48 and cache.latents.shape == (48, 4, 8, 8)
    assert cache.captions[NULL_ID] == "" and len(cache.captions) == 1 + len(set(captions)) < 1 + 48
    assert [cache.captions[i] for i in cache.caption_ids.tolist()] == captions
    assert cache.labels.tolist() == [dataset[i]["label"] for i in range(len(dataset))]
    assert float(cache.latents.double().std()) == pytest.approx(1.0, abs=1e-5)
    autoencoder = Autoencoder.from_pretrained(parts["ae"])
    images = torch.stack([dataset[i]["image"] for i in range(4)])
    z_q = autoencoder.quantize(autoencoder.encode(images)).z_q
    torch.testing.assert_close(cache.latents[:4] / cache.latent_scale, z_q, atol=1e-5, rtol=0)


def test_cached_text_matches_a_fresh_encoding(parts):
    cache = build(parts)
    fresh = parts["text_encoder"].encode(cache.captions[:5])
    cached = cache.text(torch.arange(5))
    fresh = pad_tokens(fresh, cached.states.shape[1])
    assert torch.equal(cached.mask, fresh.mask)
    torch.testing.assert_close(cached.states, fresh.states, atol=1e-5, rtol=0)
    assert cached.mask[NULL_ID].sum() == 2  # "" is [CLS] [SEP]


def test_second_build_reuses_the_files_and_new_inputs_re_encode(parts, monkeypatch):
    first = build(parts)
    files = {path: path.stat().st_mtime_ns for path in first.directory.iterdir()}

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset was encoded again")

    monkeypatch.setattr(latent_cache, "encode_dataset", refuse)
    second = build(parts)
    assert second.directory == first.directory and torch.equal(second.latents, first.latents)
    assert {path: path.stat().st_mtime_ns for path in second.directory.iterdir()} == files
    assert second.latent_scale == first.latent_scale and second.captions == first.captions
    with pytest.raises(AssertionError, match="encoded again"):
        build(parts, DataConfig(name="shapes", resolution=16, size=40))
    monkeypatch.setitem(shapes._SIDE, "large", 0.7)  # the generator changed: same config, other images
    with pytest.raises(AssertionError, match="encoded again"):
        build(parts)
    assert not list(first.directory.glob(".*tmp*"))  # atomic writes leave no temporary files
    assert load_cache(first.directory).latents.shape == first.latents.shape


def test_latent_scale_round_trip_equals_the_autoencoder_reconstruction(parts):
    cache = build(parts)
    autoencoder = Autoencoder.from_pretrained(parts["ae"])
    unet = UNet(tiny_unet_config())
    pipe = LatentDiffusion(autoencoder, unet, parts["text_encoder"], DiffusionConfig(), cache.latent_scale)
    images = torch.stack([build_dataset(TINY_DATA)[i]["image"] for i in range(4)])
    latents = pipe.encode_images(images)
    torch.testing.assert_close(latents, cache.latents[:4], atol=1e-5, rtol=0)
    with torch.no_grad():
        reconstruction = autoencoder(images).recon.clamp(-1, 1)
    torch.testing.assert_close(pipe.decode(latents), reconstruction, atol=1e-5, rtol=0)


def test_kl_autoencoder_caches_the_posterior_mean(parts, tmp_path):
    kl_dir = make_tiny_autoencoder(tmp_path / "kl", kind="kl")
    data = DataConfig(name="shapes", resolution=16, size=8)
    cache = load_or_build_cache(kl_dir, data, parts["text"], tmp_path / "cache", text_encoder=parts["text_encoder"])
    autoencoder = Autoencoder.from_pretrained(kl_dir)
    images = torch.stack([build_dataset(data)[i]["image"] for i in range(8)])
    with torch.no_grad():
        mean = autoencoder.encode(images).mean
    torch.testing.assert_close(cache.latents, mean * cache.latent_scale, atol=1e-5, rtol=1e-5)
