"""The latent cache: encoded once and reused, captions deduplicated, latents scaled to unit variance."""
from __future__ import annotations

import threading

import pytest
import torch

from autoencoder.model import Autoencoder
from common.data import DataConfig, build_dataset, shapes
from diffusion import latent_cache
from diffusion.latent_cache import NULL_ID, load_cache, load_or_build_cache, pad_tokens
from diffusion.latent_diffusion import DiffusionConfig, LatentDiffusion
from diffusion.unet import UNet
from tiny import TINY_DATA, make_tiny_autoencoder, perturbed, tiny_unet_config

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
FP16 = {"rtol": 2 ** -11, "atol": 1e-6}  # text states are stored in fp16: rounding within half an fp16 ulp


def build(tiny_parts: dict, data: DataConfig = TINY_DATA, **kwargs) -> latent_cache.LatentCache:
    return load_or_build_cache(tiny_parts["ae"], data, tiny_parts["text"], tiny_parts["root"] / "cache",
                               text_encoder=tiny_parts["text_encoder"], **kwargs)


def test_cache_holds_scaled_quantized_latents_and_unique_captions(tiny_parts):
    cache = build(tiny_parts)
    dataset = build_dataset(TINY_DATA)
    captions = [dataset[i]["caption"] for i in range(len(dataset))]
    assert len(cache) == 48 and cache.latents.shape == (48, 4, 8, 8)
    assert cache.captions[NULL_ID] == "" and len(cache.captions) == 1 + len(set(captions)) < 1 + 48
    assert [cache.captions[i] for i in cache.caption_ids.tolist()] == captions
    assert cache.labels.tolist() == [dataset[i]["label"] for i in range(len(dataset))]
    assert float(cache.latents.double().std()) == pytest.approx(1.0, abs=1e-5)
    autoencoder = Autoencoder.from_pretrained(tiny_parts["ae"])
    images = torch.stack([dataset[i]["image"] for i in range(4)])
    z_q = autoencoder.quantize(autoencoder.encode(images)).z_q
    torch.testing.assert_close(cache.latents[:4] / cache.latent_scale, z_q, atol=1e-5, rtol=0)


def test_cached_text_matches_a_fresh_encoding(tiny_parts):
    cache = build(tiny_parts)
    fresh = tiny_parts["text_encoder"].encode(cache.captions[:5])
    cached = cache.text(torch.arange(5))
    fresh = pad_tokens(fresh, cached.states.shape[1])  # both padded to the longest of these five
    assert torch.equal(cached.mask, fresh.mask)
    torch.testing.assert_close(cached.states, fresh.states, **FP16)
    assert cached.mask[NULL_ID].sum() == 2  # "" is [CLS] [SEP]


def test_second_build_reuses_the_files_and_new_inputs_re_encode(tiny_parts, monkeypatch):
    first = build(tiny_parts)
    files = {path: path.stat().st_mtime_ns for path in first.directory.iterdir()}

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset was encoded again")

    monkeypatch.setattr(latent_cache, "encode_dataset", refuse)
    second = build(tiny_parts)
    assert second.directory == first.directory and torch.equal(second.latents, first.latents)
    assert {path: path.stat().st_mtime_ns for path in second.directory.iterdir()} == files
    assert second.latent_scale == first.latent_scale and second.captions == first.captions
    with pytest.raises(AssertionError, match="encoded again"):
        build(tiny_parts, DataConfig(name="shapes", resolution=16, size=40))
    monkeypatch.setitem(shapes._SIDE, "large", 0.7)  # the generator changed: same config, other images
    with pytest.raises(AssertionError, match="encoded again"):
        build(tiny_parts)
    assert not list(first.directory.glob(".*tmp*"))  # atomic writes leave no temporary files
    assert load_cache(first.directory).latents.shape == first.latents.shape


def test_latent_scale_round_trip_equals_the_autoencoder_reconstruction(tiny_parts):
    cache = build(tiny_parts)
    autoencoder = Autoencoder.from_pretrained(tiny_parts["ae"])
    unet = UNet(tiny_unet_config())
    pipe = LatentDiffusion(autoencoder, unet, tiny_parts["text_encoder"], DiffusionConfig(), cache.latent_scale)
    images = torch.stack([build_dataset(TINY_DATA)[i]["image"] for i in range(4)])
    latents = pipe.encode_images(images)
    torch.testing.assert_close(latents, cache.latents[:4], atol=1e-5, rtol=0)
    with torch.no_grad():
        reconstruction = autoencoder(images).recon.clamp(-1, 1)
    torch.testing.assert_close(pipe.decode(latents), reconstruction, atol=1e-5, rtol=0)


def test_kl_autoencoder_caches_the_posterior_mean(tiny_parts, tmp_path):
    kl_dir = make_tiny_autoencoder(tmp_path / "kl", kind="kl")
    data = DataConfig(name="shapes", resolution=16, size=8)
    cache = load_or_build_cache(kl_dir, data, tiny_parts["text"], tmp_path / "cache",
                                text_encoder=tiny_parts["text_encoder"])
    autoencoder = Autoencoder.from_pretrained(kl_dir)
    images = torch.stack([build_dataset(data)[i]["image"] for i in range(8)])
    with torch.no_grad():
        mean = autoencoder.encode(images).mean
    torch.testing.assert_close(cache.latents, mean * cache.latent_scale, atol=1e-5, rtol=1e-5)


def test_caption_templates_encode_phrasings_that_training_draws_from(tiny_parts):
    """caption_templates: every caption is encoded in each phrasing too (another cache, saved and reloaded); the
    null caption stays itself; ``phrasings`` draws one per item; without templates the ids pass unchanged."""
    plain = build(tiny_parts)
    templated = build(tiny_parts, templates=("a {}", "{} emoji"))
    assert templated.directory != plain.directory and plain.variants is None
    unique = len(plain.captions)
    named = plain.captions[1:]
    assert templated.captions == list(plain.captions) + [f"a {c}" for c in named] + [f"{c} emoji" for c in named]
    assert templated.variants[NULL_ID].tolist() == [NULL_ID] * 3, "the null condition has no phrasings"
    assert [templated.captions[i] for i in templated.variants[1].tolist()] == [named[0], f"a {named[0]}",
                                                                              f"{named[0]} emoji"]
    assert torch.equal(load_cache(templated.directory).variants, templated.variants)
    fresh = tiny_parts["text_encoder"].encode([f"a {named[0]}"])
    cached = templated.text(torch.tensor([unique]))
    torch.testing.assert_close(cached.states[:, :fresh.states.shape[1]], fresh.states, **FP16)
    ids = templated.caption_ids[:32]
    torch.manual_seed(0)
    drawn = templated.phrasings(ids)
    assert all(d in templated.variants[i].tolist() for i, d in zip(ids.tolist(), drawn.tolist()))
    assert len({int(d) for d in drawn}) > len({int(i) for i in ids}), "several phrasings are drawn"
    assert torch.equal(plain.phrasings(ids), ids)


def test_padding_each_batch_to_its_longest_caption_leaves_the_unet_output_unchanged(tiny_parts):
    """The old cache padded every caption to the longest of all; the U-Net masks padding, so the shorter
    per-batch padding gives the same prediction (up to float summation order)."""
    cache = build(tiny_parts)
    text = cache.text(torch.tensor([1, 2, 3, NULL_ID]))
    longer = pad_tokens(text, text.states.shape[1] + 7)
    unet = perturbed(UNet(tiny_unet_config()).eval(), seed=3)
    torch.manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([10, 200, 500, 900])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context=text.states, context_mask=text.mask),
                                   unet(x, t, context=longer.states, context_mask=longer.mask), rtol=0, atol=1e-6)


class ThreadProcesses:
    """What load_or_build_cache uses of an ``accelerate.Accelerator``, for threads standing in for processes."""

    def __init__(self, rank: int, barrier: threading.Barrier) -> None:
        self.process_index, self.num_processes, self.wait_for_everyone = rank, barrier.parties, barrier.wait


def test_every_process_encodes_its_share_and_the_result_equals_one_process_encoding_all(tiny_parts, tmp_path):
    alone = build(tiny_parts)
    barrier, caches, errors = threading.Barrier(2, timeout=60), {}, []

    def run(rank: int) -> None:
        try:
            caches[rank] = load_or_build_cache(tiny_parts["ae"], TINY_DATA, tiny_parts["text"], tmp_path,
                                               text_encoder=tiny_parts["text_encoder"], batch_size=7,
                                               accelerator=ThreadProcesses(rank, barrier))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    shared = caches[1]
    assert caches[0].directory == shared.directory and shared.directory.name == alone.directory.name
    assert torch.equal(shared.latents, alone.latents) and torch.equal(shared.caption_ids, alone.caption_ids)
    assert shared.latent_scale == pytest.approx(alone.latent_scale, rel=1e-12) and shared.captions == alone.captions
    every = torch.arange(len(alone.captions))
    torch.testing.assert_close(shared.text(every).states, alone.text(every).states, **FP16)
    assert len(list(shared.directory.glob("text-*.bin"))) == 2, "each process encoded its share of the captions"
    assert shared.text_to("cuda") is shared, "nothing is moved to a device"
