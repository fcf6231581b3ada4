"""Tiny random Stable Diffusion parts built and saved locally (nothing downloaded): a CLIP text model with a
BPE vocabulary written here, and a whole diffusers ``StableDiffusionPipeline`` folder around it."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CLIP_WIDTH = 32
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)  # Stable Diffusion 1.x's scheduler_config.json


def make_clip_tokenizer(directory: Path) -> Path:
    """A CLIP BPE tokenizer over single characters and a few merges (CLIP's special tokens, 77 positions)."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-")
    merges = [("d", "o"), ("do", "g</w>"), ("a", "p"), ("c", "a"), ("ca", "t</w>")]
    vocab = ["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols),
             *(a + b for a, b in merges)]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(directory)
    return directory


def make_clip_text_model(directory: Path, vocab_size: int, seed: int = 0) -> Path:
    """A random two-layer, 32-wide ``CLIPTextModel`` (its final layer norm included), saved to ``directory``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=CLIP_WIDTH, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    CLIPTextModel(config).eval().save_pretrained(directory)
    return directory


def randomized(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter drawn at random (a fresh U-Net's zero output layer would hide every mistake)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # norms scale around 1
            parameter.copy_(gain + scale * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def make_tiny_stable_diffusion(directory: Path, prediction: str = "epsilon") -> Path:
    """A diffusers Stable Diffusion folder (``model_index.json``, vae/, unet/, text_encoder/, tokenizer/,
    scheduler/) with tiny random components; ``prediction`` "v_prediction" makes it SD 2.x-like."""
    import diffusers

    tokenizer_dir = make_clip_tokenizer(directory / "tokenizer_src")
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel.from_pretrained(make_clip_text_model(directory / "text_src", len(tokenizer)))
    unet = randomized(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CLIP_WIDTH, attention_head_dim=8, norm_num_groups=32), seed=1)
    vae = randomized(diffusers.AutoencoderKL(
        block_out_channels=(32, 64), latent_channels=4, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2), seed=2, scale=0.05)
    scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(directory / "sd")
    return directory / "sd"
