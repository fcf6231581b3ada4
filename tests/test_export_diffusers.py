"""Export to the diffusers layout: diffusers' own classes load every exported part and compute what ours compute
(tiny random models built here), StableDiffusionPipeline reproduces our images, and the folder reads back as ours."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys

import pytest
import torch

from autoencoder.convert import config_from_diffusers
from autoencoder.export import ExportError, diffusers_config, to_diffusers
from autoencoder.model import AutoencoderConfig, build_autoencoder
from autoencoder.quantizer import QuantizerConfig
from common.text_encoder import TextEncoder, TextEncoderConfig
from diffusion.convert import unet_config_from_diffusers
from diffusion.export import PROCESS_FIELDS, scheduler_to_diffusers, unet_config_to_diffusers, unet_to_diffusers
from diffusion.latent_diffusion import LatentDiffusion
from diffusion.objectives import DiffusionConfig
from diffusion.stable_diffusion import diffusion_config_from_scheduler
from diffusion.unet import UNet, UNetConfig
from pipelines import ClassToImage, TextToImage
from tiny import make_tiny_text_encoder
from tiny_sd import randomized

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-4
PROMPTS, NEGATIVES = ["a red dog", "a blue cat"], ["a green box", "a small sun"]  # equal token counts: no padding
# SD 1.x's process (leading spacing, offset 1, DDIM ending at t = 0), and an SD 2.x-like v-prediction one
PROCESSES = {
    "epsilon": DiffusionConfig(spacing="leading", steps_offset=1, set_alpha_to_one=False),
    "v": DiffusionConfig(prediction="v", spacing="trailing"),
}
TINY_KL = AutoencoderConfig(resolution=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(8,), z_channels=4, code_dim=4, kind="kl")
TINY_UNET = UNetConfig(in_channels=4, out_channels=4, block_channels=(32, 64), attention_levels=(False, True),
                       layers_per_block=1, head_dim=16, context_dim=32)


def tiny_vq(l2_normalize: bool) -> AutoencoderConfig:
    return dataclasses.replace(TINY_KL, kind="vq", z_channels=8, code_dim=4,
                               quantizer=QuantizerConfig(codebook_size=32, l2_normalize=l2_normalize))


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    return TextEncoder(TextEncoderConfig(name_or_path=str(make_tiny_text_encoder(tmp_path_factory.mktemp("text")))))


@pytest.fixture(scope="module", params=list(PROCESSES))
def exported(request, text_encoder, tmp_path_factory):
    """Our tiny KL + text U-Net pipeline and the diffusers folder it exports to."""
    model = LatentDiffusion(randomized(build_autoencoder(TINY_KL), seed=2, scale=0.05),
                            randomized(UNet(TINY_UNET), seed=1), text_encoder, PROCESSES[request.param], 0.7)
    pipe = TextToImage(model).to("cpu", precision="fp32")
    return pipe, pipe.save_pretrained(tmp_path_factory.mktemp(request.param) / "sd", format="diffusers")


def ours(pipe, **options) -> torch.Tensor:
    return pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=20, guidance_scale=7.5, sampler="ddim",
                output_type="pt", progress=False, **options).images


def test_the_folder_has_the_stable_diffusion_layout(exported):
    _, folder = exported
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["safety_checker"] == [None, None] and index["text_encoder"] == ["transformers", "BertModel"]
    for part in ("vae", "unet"):
        assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {p.name for p in (folder / part).iterdir()}
    assert (folder / "scheduler" / "scheduler_config.json").is_file() and (folder / "tokenizer").is_dir()


def test_diffusers_unet_and_vae_compute_ours(exported):
    pipe, folder = exported
    model = pipe.model
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    text = model.text_encoder.encode(["a dog", "a cat on a mat"])  # different lengths: the mask matters
    with torch.no_grad():
        expected = model.unet(x, t, context=text.states, context_mask=text.mask)
        got = unet(x, t, encoder_hidden_states=text.states, encoder_attention_mask=text.mask).sample
    assert (got - expected).abs().max().item() <= TOLERANCE
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    assert vae.config.scaling_factor == model.latent_scale
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean = model.autoencoder.encode(images).mean
        assert (vae.encode(images).latent_dist.mean - mean).abs().max().item() <= TOLERANCE
        assert (vae.decode(mean).sample - model.autoencoder.decode(mean)).abs().max().item() <= TOLERANCE


def test_stable_diffusion_pipeline_reproduces_our_images(exported):
    """Same start latents, our text encoder's states as prompt embeddings, 20 DDIM steps at guidance 7.5."""
    pipe, folder = exported
    cond, uncond = (pipe.model.text_encoder.encode(p) for p in (PROMPTS, NEGATIVES))
    assert cond.mask.all() and uncond.mask.all() and cond.states.shape == uncond.states.shape, "no padding"
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(prompt_embeds=cond.states, negative_prompt_embeds=uncond.states, latents=noise.clone(),
                      num_inference_steps=20, guidance_scale=7.5, height=16, width=16, output_type="pt").images
    got = ours(pipe, latents=noise.clone())
    assert got.shape == expected.shape == (2, 3, 16, 16)
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert (got - ours(pipe, latents=noise.clone() + 0.5)).abs().max().item() > 0.01, "the latents matter"


def test_the_folder_reads_back_as_the_same_pipeline(exported):
    pipe, folder = exported
    again = TextToImage.from_pretrained(folder, precision="fp32")
    assert again.model.text_encoder.max_length == pipe.model.text_encoder.max_length
    assert all(getattr(again.model.config, f) == getattr(pipe.model.config, f) for f in PROCESS_FIELDS)
    assert torch.equal(ours(again, seed=3), ours(pipe, seed=3))


@pytest.mark.parametrize("l2_normalize", [False, True])
def test_vq_autoencoder_exports_as_vq_model(l2_normalize, tmp_path):
    """An l2-normalised codebook exports as its unit codes: Euclidean nearest = highest cosine among them."""
    ours_model = randomized(build_autoencoder(tiny_vq(l2_normalize)), seed=3, scale=0.05)
    to_diffusers(ours_model).save_pretrained(tmp_path)
    vq = diffusers.VQModel.from_pretrained(tmp_path).eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latents = vq.encode(images).latents
        quantized, _, (_, _, indices) = vq.quantize(latents)
        expected = ours_model.quantize(ours_model.encode(images))
        assert torch.equal(indices.view(2, 8, 8), expected.indices)
        assert (quantized - expected.z_q).abs().max().item() <= TOLERANCE
        assert (vq.decode(latents).sample - ours_model.decode(expected.z_q)).abs().max().item() <= TOLERANCE


def test_a_vq_latent_space_runs_through_stable_diffusion_latents_and_vq_model(text_encoder, tmp_path, caplog):
    """StableDiffusionPipeline cannot decode with a VQModel; its latents, decoded by VQModel.decode (which snaps to
    the codebook as ours does), are our images."""
    model = LatentDiffusion(randomized(build_autoencoder(tiny_vq(True)), seed=5, scale=0.05),
                            randomized(UNet(TINY_UNET), seed=6), text_encoder, PROCESSES["v"], 1.3)
    pipe = TextToImage(model).to("cpu", precision="fp32")
    with caplog.at_level(logging.WARNING, logger="pipelines.export"):
        folder = pipe.save_pretrained(tmp_path / "sd", format="diffusers")
    assert "vae/ is a VQModel" in caplog.text
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    cond, uncond = (text_encoder.encode(p) for p in (PROMPTS, NEGATIVES))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    latents = theirs(prompt_embeds=cond.states, negative_prompt_embeds=uncond.states, latents=noise.clone(),
                     num_inference_steps=20, guidance_scale=7.5, height=16, width=16, output_type="latent").images
    with torch.no_grad():
        images = theirs.vae.decode(latents / theirs.vae.config.scaling_factor).sample
    expected = ours(pipe, latents=noise.clone())
    assert ((images / 2 + 0.5).clamp(0, 1) - expected).abs().max().item() <= TOLERANCE


def test_configs_and_scheduler_map_back_onto_ours():
    for config in (TINY_UNET, dataclasses.replace(TINY_UNET, num_heads=4, head_dim=0, use_linear_projection=False)):
        back = unet_config_from_diffusers(unet_config_to_diffusers(config))
        assert back.heads(64) == config.heads(64)  # the attended width (level 1 and the middle)
        heads_apart = dict(num_heads=0, head_dim=1)  # the same heads may come back as a count or a width
        assert dataclasses.replace(back, **heads_apart) == dataclasses.replace(config, **heads_apart)
    for config in (TINY_KL, tiny_vq(False)):
        kind, raw = diffusers_config(config)
        assert config_from_diffusers(raw, kind).code_dim == config.code_dim
    for process in (*PROCESSES.values(), DiffusionConfig(schedule="cosine", prediction="x0"),
                    DiffusionConfig(schedule="linear", prediction="v", zero_terminal_snr=True, spacing="linspace")):
        back = diffusion_config_from_scheduler(dict(scheduler_to_diffusers(process).config))
        assert [getattr(back, f) for f in PROCESS_FIELDS] == [getattr(process, f) for f in PROCESS_FIELDS]


def test_class_table_exports_without_the_null_row(caplog):
    unet = randomized(UNet(dataclasses.replace(TINY_UNET, num_classes=3)), seed=4)
    with caplog.at_level(logging.WARNING, logger="diffusion.export"):
        theirs = unet_to_diffusers(unet)
    assert "null row 0 is dropped" in caplog.text and "classifier-free guidance" in caplog.text
    assert torch.equal(theirs.class_embedding.weight, unet.encoder.class_embed.weight[1:])
    x, context, labels = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 32), torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = unet(x, 50, context=context, class_labels=labels + 1)  # ours feeds label + 1
        got = theirs(x, 50, encoder_hidden_states=context, class_labels=labels).sample
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_unrepresentable_options_are_named(text_encoder, tmp_path):
    with pytest.raises(ExportError, match=r"block_channels=\(16, 32\) .*multiples of 32"):
        unet_config_to_diffusers(dataclasses.replace(TINY_UNET, block_channels=(16, 32)))
    with pytest.raises(ExportError, match=r"context_dim=0 \(a U-Net without text"):
        unet_config_to_diffusers(dataclasses.replace(TINY_UNET, context_dim=0))
    with pytest.raises(ExportError, match=r"unsupported mid_attention=False"):
        unet_config_to_diffusers(dataclasses.replace(TINY_UNET, pooled_context=True, mid_attention=False))
    with pytest.raises(ExportError, match=r"code_dim=2 != z_channels=4"):
        diffusers_config(dataclasses.replace(TINY_KL, code_dim=2))
    with pytest.raises(ExportError, match=r"different GroupNorm group counts \[16, 32\].*norm_eps=1e-05"):
        diffusers_config(dataclasses.replace(TINY_KL, base_channels=16, norm_eps=1e-5))
    class_only = LatentDiffusion(build_autoencoder(TINY_KL), UNet(dataclasses.replace(TINY_UNET, context_dim=0,
                                 num_classes=2)), None, DiffusionConfig(), 1.0)
    with pytest.raises(ExportError, match="no text encoder"):
        ClassToImage(class_only).save_pretrained(tmp_path / "out", format="diffusers")
    with pytest.raises(ValueError, match=r"unknown format 'onnx'; valid formats: 'latentgen', 'diffusers'"):
        ClassToImage(class_only).save_pretrained(tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()


def test_export_without_diffusers_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what an environment without the package gives
    with pytest.raises(ExportError, match=r"needs the diffusers package: pip install 'diffusers"):
        to_diffusers(build_autoencoder(TINY_KL))


def test_token_prior_pipelines_are_refused(tmp_path):
    from pipelines import TokensToImage, export
    from prior.token_prior import TokenPrior
    from prior.transformer import GPT, PriorConfig

    prior = GPT(PriorConfig(codebook_size=32, grid_size=8, condition="class", num_classes=2, width=32, depth=1,
                            heads=4))
    pipe = TokensToImage(TokenPrior(build_autoencoder(tiny_vq(False)), prior))
    with pytest.raises(ExportError, match="diffusers has no pipeline for token priors.*to_diffusers"):
        pipe.save_pretrained(tmp_path / "sd", format="diffusers")
    pipe.save_pretrained(tmp_path / "run" / "pipeline")
    with pytest.raises(SystemExit, match="'tokens_to_image' pipeline: diffusers has no pipeline for token priors"):
        export.main([str(tmp_path / "run"), str(tmp_path / "sd")])
    assert not (tmp_path / "sd").exists()


def test_command_line_exports_a_run_directory(exported, tmp_path, capsys):
    from pipelines import export

    pipe, _ = exported
    pipe.save_pretrained(tmp_path / "run" / "pipeline")
    assert export.main([str(tmp_path / "run"), str(tmp_path / "sd")]) == tmp_path / "sd"
    assert capsys.readouterr().out.strip() == str(tmp_path / "sd")
    assert json.loads((tmp_path / "sd" / "model_index.json").read_text())["unet"][1] == "UNet2DConditionModel"
    with pytest.raises(SystemExit, match="error: .*pipeline.json"):
        export.main([str(tmp_path / "nothing"), str(tmp_path / "sd2")])


def test_pooled_text_exports_as_a_marked_projection(text_encoder, tmp_path):
    """The demo's U-Net adds the pooled prompt: diffusers computes it with class_labels = the masked mean."""
    from diffusion.convert import from_diffusers
    from diffusion.unet import pooled

    unet = randomized(UNet(dataclasses.replace(TINY_UNET, pooled_context=True)), seed=3)
    unet_to_diffusers(unet, 8).save_pretrained(tmp_path / "unet")
    peer = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    text = text_encoder.encode(["a dog", "a cat on a mat"])
    with torch.no_grad():
        expected = unet(x, t, context=text.states, context_mask=text.mask)
        got = peer(x, t, encoder_hidden_states=text.states, encoder_attention_mask=text.mask,
                   class_labels=pooled(text.states, text.mask)).sample
        back = from_diffusers(tmp_path / "unet")(x, t, context=text.states, context_mask=text.mask)
    assert (got - expected).abs().max().item() <= TOLERANCE and torch.equal(back, expected)
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    del config["_latentgen_pooled_text"]  # someone else's projection U-Net: its class_labels are unknown
    with pytest.raises(Exception, match="class_embed_type='projection'"):
        unet_config_from_diffusers(config)
    with pytest.raises(ExportError, match="pooled_context=True beside num_classes"):
        unet_config_to_diffusers(dataclasses.replace(TINY_UNET, pooled_context=True, num_classes=3))
