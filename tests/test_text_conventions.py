"""Text encoders run the way the generators they came with ran them: CLIP as Stable Diffusion does, T5's encoder
alone with its mask (tiny random models built here; nothing downloaded)."""
from __future__ import annotations

import shutil

import pytest
import torch

from common.text_encoder import TextEncoder, TextEncoderConfig, bundled_model_dir
from tiny import TOKENIZER_FILES
from tiny_sd import make_tiny_stable_diffusion

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_clip_encodes_prompts_exactly_as_stable_diffusion(tmp_path):
    """77 positions for every prompt, no attention mask into CLIP, every position attended (mask all True), the
    tokenizer from its own folder: the embeddings equal StableDiffusionPipeline.encode_prompt's."""
    folder = make_tiny_stable_diffusion(tmp_path)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    config = TextEncoderConfig(name_or_path=str(folder / "text_encoder"), tokenizer=str(folder / "tokenizer"))
    ours = TextEncoder(config)
    prompts, negatives = ["a dog", "a cat sat on a mat, 2 dogs!"], ["", "blurry"]
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=negatives)
    got, got_negative = ours.encode(prompts), ours.encode(negatives)
    assert got.states.shape == (2, 77, ours.width) and bool(got.mask.all()) and bool(got_negative.mask.all())
    torch.testing.assert_close(got.states, cond, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_negative.states, uncond, atol=1e-6, rtol=0)
    assert ours.max_length == 77


def test_t5_runs_its_encoder_alone_with_the_padding_masked(tmp_path):
    """A T5 folder loads as T5EncoderModel (AutoModel would build the encoder-decoder, which needs decoder
    inputs); prompts pad to the longest and the padding is masked out, as T5-conditioned generators do."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    folder = tmp_path / "t5"
    T5EncoderModel(T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)).save_pretrained(
        folder)
    for name in TOKENIZER_FILES:  # any tokenizer will do for the convention; MiniLM's is on disk
        shutil.copy(bundled_model_dir() / name, folder / name)
    ours = TextEncoder(TextEncoderConfig(name_or_path=str(folder)))
    assert type(ours.model).__name__ == "T5EncoderModel"
    got = ours.encode(["a dog", "a much longer prompt about a dog"])
    batch = ours.tokenizer(["a dog", "a much longer prompt about a dog"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = ours.model(**batch).last_hidden_state * batch["attention_mask"][..., None]
    assert torch.equal(got.mask, batch["attention_mask"].bool()) and not bool(got.mask[0].all())
    torch.testing.assert_close(got.states, expected, atol=1e-6, rtol=0)
