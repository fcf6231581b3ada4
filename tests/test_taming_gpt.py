"""Parity with taming-transformers' Net2NetTransformer: its minGPT (random weights) and VQ-GAN, saved as a
Lightning checkpoint, converted by ``python -m prior.convert taming`` and sampled through our pipeline."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import Tensor, nn

from common.checkpoint import CheckpointError
from pipelines import TokensToImage
from pipelines import generate as generate_cli
from prior.convert import TamingPrior, facts_from_project, from_taming_state_dict, load_taming_checkpoint, main
from prior.sampling import draw_uniforms, sample_tokens
from prior.token_prior import TokenPrior
from prior.transformer import Condition

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    # taming's modules import with plain torch; its cond_transformer needs a pytorch_lightning it predates,
    # so the test builds the Net2NetTransformer's tensors from its parts
    from taming.modules.diffusionmodules.model import Decoder as TamingDecoder
    from taming.modules.diffusionmodules.model import Encoder as TamingEncoder
    from taming.modules.transformer.mingpt import GPT as TamingGPT
    from taming.modules.transformer.mingpt import sample as taming_greedy_sample
    from taming.modules.transformer.mingpt import top_k_logits
    from taming.modules.vqvae.quantize import VectorQuantizer as TamingQuantizer

TOLERANCE = 1e-5
CODES, GRID, RESOLUTION, CODE_DIM = 64, 4, 16, 4  # a VQ-GAN downsampling 4x at 16 px: 16 tokens
VQGAN = dict(ch=32, out_ch=3, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
             in_channels=3, resolution=RESOLUTION, z_channels=8, double_z=False)
TOKENS = GRID * GRID
NAMES = ["goldfish", "tabby cat", "tree frog", "", "red fox"]  # "" : a class without a name (id 3)
SOS = 5


def taming_gpt(seed: int, vocab: int = CODES) -> TamingGPT:
    """A tiny minGPT with spread-out random weights (its own init gives near-uniform logits)."""
    torch.manual_seed(seed)
    gpt = TamingGPT(vocab_size=vocab, block_size=TOKENS + 2, n_layer=2, n_head=2, n_embd=32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in gpt.named_parameters():
            scale = 0.2 if "ln" in name else 0.3
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return gpt.eval()


class TamingVQModel(nn.Module):
    """taming's VQModel without Lightning and its loss: the tensors it saves, with spread-out random codes."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = TamingEncoder(**VQGAN), TamingDecoder(**VQGAN)
        self.quantize = TamingQuantizer(CODES, CODE_DIM, beta=0.25)
        self.quant_conv = nn.Conv2d(VQGAN["z_channels"], CODE_DIM, 1)
        self.post_quant_conv = nn.Conv2d(CODE_DIM, VQGAN["z_channels"], 1)
        nn.init.normal_(self.quantize.embedding.weight)


class Net2Net(nn.Module):
    """The tensors a Net2NetTransformer checkpoint holds: Labelator/SOSProvider and the identity permuter
    have none, so the state dict is ``transformer.*`` and ``first_stage_model.*``."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.transformer = taming_gpt(seed)
        torch.manual_seed(seed)
        self.first_stage_model = TamingVQModel().eval()


def save_checkpoint(model: Net2Net, path: Path, extra: dict[str, Tensor] | None = None) -> Path:
    torch.save({"state_dict": {**model.state_dict(), **(extra or {})}, "global_step": 7, "epoch": 1}, path)
    return path


def project_yaml(path: Path, cond_stage: dict | str) -> Path:
    """What taming's main.py writes next to a run (configs/*-project.yaml), cut to what the converter reads."""
    params = {"transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                                     "params": {"vocab_size": CODES, "block_size": TOKENS + 2, "n_layer": 2,
                                                "n_head": 2, "n_embd": 32}},
              "first_stage_config": {"target": "taming.models.vqgan.VQModel",
                                     "params": {"ddconfig": {"resolution": RESOLUTION}, "n_embed": CODES}},
              "cond_stage_config": cond_stage, "first_stage_key": "image", "cond_stage_key": "class_label",
              "permuter_config": {"target": "taming.modules.transformer.permuter.Identity"}}
    model = {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": params}
    path.write_text(yaml.safe_dump({"model": model}))
    return path


@pytest.fixture(scope="module")
def class_model() -> Net2Net:
    return Net2Net(seed=0)


@pytest.fixture(scope="module")
def sos_model() -> Net2Net:
    return Net2Net(seed=1)


@pytest.fixture(scope="module")
def class_dir(class_model, tmp_path_factory) -> Path:
    """The class-conditional model converted through the command line, with its project yaml and names."""
    root = tmp_path_factory.mktemp("taming_cin")
    ckpt = save_checkpoint(class_model, root / "last.ckpt")
    config = project_yaml(root / "project.yaml", {"target": "taming.modules.util.Labelator",
                                                  "params": {"n_classes": len(NAMES)}})
    (root / "names.txt").write_text("\n".join(NAMES) + "\n")
    return main(["taming", str(ckpt), str(root / "converted"), "--config", str(config),
                 "--class-names", str(root / "names.txt")])


@pytest.fixture(scope="module")
def sos_prior(sos_model, tmp_path_factory) -> TokenPrior:
    """The unconditional model converted through the Python API, its facts given as arguments."""
    ckpt = save_checkpoint(sos_model, tmp_path_factory.mktemp("taming_uncond") / "last.ckpt")
    return load_taming_checkpoint(ckpt, heads=2, condition="sos", sos_token=SOS, resolution=RESOLUTION)


def random_tokens(batch: int, seed: int) -> Tensor:
    return torch.randint(0, CODES, (batch, TOKENS), generator=torch.Generator().manual_seed(seed))


def first_tokens(labels: list[int]) -> Tensor:
    """taming's condition: the class id (Labelator) or the sos token, one token before the image's."""
    return torch.tensor(labels)[:, None]


def taming_decisions(gpt: TamingGPT, first: Tensor, uniforms: Tensor, temperature: float, top_k: int) -> Tensor:
    """Net2NetTransformer.sample's loop (temperature, then top-k, softmax), drawing each token by inverting
    the CDF at the given uniforms instead of torch.multinomial: the same decisions as ours get."""
    x = first
    with torch.no_grad():
        for step in range(TOKENS):
            logits, _ = gpt(x)
            probs = F.softmax(top_k_logits(logits[:, -1] / temperature, top_k), dim=-1)
            cdf = probs.cumsum(dim=-1)
            index = torch.searchsorted(cdf, uniforms[step][:, None] * cdf[:, -1:], right=True)
            x = torch.cat([x, index.clamp(max=CODES - 1)], dim=1)
    return x[:, 1:]


def taming_images(vqgan: TamingVQModel, tokens: Tensor) -> Tensor:
    """Net2NetTransformer.decode_to_img (identity permuter): codes (B, N) -> images in [0, 1]."""
    with torch.no_grad():
        z_q = vqgan.quantize.get_codebook_entry(tokens.reshape(-1), shape=(len(tokens), GRID, GRID, CODE_DIM))
        images = vqgan.decoder(vqgan.post_quant_conv(z_q))
    return ((images.clamp(-1, 1) + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------- logits


def test_class_conditional_logits_match_taming(class_model, class_dir):
    prior = TokenPrior.from_pretrained(class_dir).prior
    assert prior.config.condition == "class" and prior.config.num_classes == len(NAMES)
    labels, tokens = [0, 4, 2], random_tokens(3, seed=1)
    with torch.no_grad():
        theirs, _ = class_model.transformer(torch.cat([first_tokens(labels), tokens[:, :-1]], dim=1))
        ours = prior.logits(prior.prefix(Condition(labels=torch.tensor(labels))), tokens[:, :-1])
    assert theirs.shape == ours.shape == (3, TOKENS, CODES)
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    assert theirs.std().item() > 1, "the test needs spread-out logits"


def test_unconditional_sos_logits_match_taming(sos_model, sos_prior):
    prior = sos_prior.prior
    assert prior.config.condition == "none"
    tokens = random_tokens(2, seed=2)
    with torch.no_grad():
        theirs, _ = sos_model.transformer(torch.cat([first_tokens([SOS, SOS]), tokens[:, :-1]], dim=1))
        ours = prior.logits(prior.null_prefix(2), tokens[:, :-1])
    assert (ours - theirs).abs().max().item() <= TOLERANCE


def test_class_ids_beyond_the_codebook_keep_the_code_logits(class_model, caplog):
    """A vocabulary with room for more classes than codes: class ids past K import, the K code logits match."""
    gpt = taming_gpt(seed=2, vocab=CODES + 8)
    state = {**class_model.state_dict(), **{f"transformer.{k}": v for k, v in gpt.state_dict().items()}}
    prior = from_taming_state_dict(state, spec(num_classes=CODES + 8)).prior
    assert "8 tokens that are no code" in caplog.text
    labels, tokens = [CODES + 7, 1], random_tokens(2, seed=4)
    with torch.no_grad():
        theirs, _ = gpt(torch.cat([first_tokens(labels), tokens[:, :-1]], dim=1))
        ours = prior.logits(prior.prefix(Condition(labels=torch.tensor(labels))), tokens[:, :-1])
    assert (ours - theirs[..., :CODES]).abs().max().item() <= TOLERANCE


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("kind", ["class", "sos"])
def test_greedy_sampling_matches_taming_sample(kind, class_model, sos_model, class_dir, sos_prior):
    """taming's own loop (mingpt.sample, most likely token) and ours with top_k=1 and the KV cache."""
    model, bundle = (class_model, TokenPrior.from_pretrained(class_dir)) if kind == "class" else (sos_model, sos_prior)
    first = first_tokens([1, 3] if kind == "class" else [SOS, SOS])
    prefix = (bundle.prior.prefix(Condition(labels=first[:, 0])) if kind == "class"
              else bundle.prior.null_prefix(2))
    theirs = taming_greedy_sample(model.transformer, first, steps=TOKENS, sample=False)[:, 1:]
    ours = sample_tokens(bundle.prior, prefix, top_k=1)
    assert torch.equal(ours, theirs)
    assert len(ours.unique()) > 2, "the test needs varied tokens"


def test_seeded_pipeline_makes_the_same_decisions_and_images_as_taming(class_model, class_dir):
    """Ours through TokensToImage (prompts name classes) vs taming's loop fed the pipeline's uniforms."""
    pipe = TokensToImage.from_pretrained(class_dir, precision="fp32")  # "auto" may pick bf16 on this CPU
    prompts, seed = ["goldfish", "red fox", "tree frog"], 3
    settings = dict(seed=seed, temperature=0.9, top_k=20)
    ours = pipe(prompts, output_type="latent", **settings).images.reshape(3, TOKENS)
    uniforms = draw_uniforms(TOKENS, 3, torch.Generator().manual_seed(seed))
    theirs = taming_decisions(class_model.transformer, first_tokens([0, 4, 2]), uniforms, 0.9, 20)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, sample_tokens(pipe.model.prior, pipe.model.prior.prefix(
        Condition(labels=torch.tensor([0, 4, 2]))), top_k=1)), "the test needs sampling, not the greedy tokens"
    images = ((pipe.model.decode(ours) + 1) / 2).clamp(0, 1)  # what output_type="pt" returns for these tokens
    assert images.shape == (3, 3, RESOLUTION, RESOLUTION)
    assert (images - taming_images(class_model.first_stage_model, theirs)).abs().max().item() <= TOLERANCE


def test_generate_cli_writes_a_grid_for_class_prompts(class_dir, tmp_path):
    out = tmp_path / "fish.png"
    report = generate_cli.main([str(class_dir), "goldfish", "red fox", "-n", "2", "--seed", "0", "--top-k", "10",
                                "-o", str(out)])
    assert report["pipeline"] == "TokensToImage"
    width, height = Image.open(out).size  # a 2 x 2 grid, with padding between the images
    assert 2 * RESOLUTION <= width < 3 * RESOLUTION and 2 * RESOLUTION <= height < 3 * RESOLUTION


def test_unconditional_pipeline_generates_from_empty_prompts(sos_prior, tmp_path):
    sos_prior.save_pretrained(tmp_path / "uncond")
    pipe = TokensToImage.from_pretrained(tmp_path / "uncond", precision="fp32")
    images = pipe(["", ""], seed=0, output_type="pt").images
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION)


def test_guidance_and_null_prompts_are_refused_without_a_null_class(class_dir):
    pipe = TokensToImage.from_pretrained(class_dir, precision="fp32")
    assert pipe.default_guidance_scale == 1.0
    with pytest.raises(ValueError, match="never learned a null condition.*guidance_scale=1"):
        pipe(["goldfish"], guidance_scale=3.0, seed=0)
    with pytest.raises(ValueError, match="never learned a null condition"):
        pipe([""], seed=0)


# ---------------------------------------------------------------- bad checkpoints


def spec(**changes) -> TamingPrior:
    return TamingPrior(**{"heads": 2, "condition": "class", "num_classes": len(NAMES), "resolution": RESOLUTION,
                          **changes})


@pytest.mark.parametrize("key, words", [
    ("transformer.blocks.0.attn.extra.weight", "transformer.blocks.0.attn.extra.weight"),
    ("model_ema.decay", "model_ema.decay"),
    ("cond_stage_model.encoder.conv_in.weight", "conditioned by a trained stage"),
    ("permuter.forward_shuffle_idx", "identity permuter"),
])
def test_leftover_or_unsupported_tensors_are_named(class_model, key, words):
    state = {**class_model.state_dict(), key: torch.arange(TOKENS).flip(0)}
    with pytest.raises(CheckpointError, match=words.replace(".", r"\.")):
        from_taming_state_dict(state, spec())


def test_non_causal_attention_mask_is_refused(class_model):
    state = dict(class_model.state_dict())
    state["transformer.blocks.1.attn.mask"] = state["transformer.blocks.1.attn.mask"].clone().fill_(1)
    with pytest.raises(CheckpointError, match="blocks.1.attn.mask is not a causal mask"):
        from_taming_state_dict(state, spec())


def test_facts_the_weights_lack_are_asked_for(class_model, tmp_path, capsys):
    ckpt = save_checkpoint(class_model, tmp_path / "last.ckpt")
    with pytest.raises(SystemExit, match="--heads N.*--num-classes N or --class-names FILE"):
        main(["taming", str(ckpt), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="sees 18 positions, a 64x64 grid needs 4096"):
        main(["taming", str(ckpt), str(tmp_path / "out"), "--heads", "2", "--num-classes", "5"])
    depth = project_yaml(tmp_path / "depth.yaml", {"target": "taming.models.vqgan.VQModel"})
    with pytest.raises(SystemExit, match="taming.models.vqgan.VQModel' is not supported"):
        main(["taming", str(ckpt), str(tmp_path / "out"), "--config", str(depth)])
    assert not (tmp_path / "out").exists()


def test_project_yaml_gives_the_condition_kind(tmp_path):
    unconditional = facts_from_project(project_yaml(tmp_path / "u.yaml", "__is_unconditional__"))
    assert unconditional == {"heads": 2, "resolution": RESOLUTION, "condition": "sos", "sos_token": 0}
    labeller = {"target": "taming.modules.util.Labelator", "params": {"n_classes": 9}}
    labelled = project_yaml(tmp_path / "c.yaml", labeller)
    assert facts_from_project(labelled)["num_classes"] == 9
