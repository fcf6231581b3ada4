"""The prior's token cache and training entry point: cached once, exact resume, a loadable pipeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from autoencoder.model import VQGAN, AutoencoderConfig
from autoencoder.quantizer import QuantizerConfig
from common.data import DataConfig, shapes
from common.text_encoder import TextEncoderConfig
from common.training import read_metrics
from pipelines import TokensToImage
from prior.token_cache import TokensConfig, load_or_build_tokens
from prior.token_prior import TokenPrior
from tiny import tiny_prior_config as tiny_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = VQGAN(AutoencoderConfig(resolution=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attn_resolutions=(), z_channels=16, code_dim=4,
                                    quantizer=QuantizerConfig(codebook_size=32)))
    return model.eval().save_pretrained(tmp_path_factory.mktemp("stage1") / "autoencoder")


def train(tmp_path: Path, config: dict, *overrides: str) -> subprocess.CompletedProcess:
    path = tmp_path / "prior.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "prior/train.py", str(path), *overrides], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_token_cache_is_built_once_per_setting(autoencoder_dir, tmp_path):
    config = TokensConfig(autoencoder=str(autoencoder_dir), cache_dir=str(tmp_path), batch_size=16)
    data = DataConfig(name="shapes", resolution=16, size=40)
    first = load_or_build_tokens(config, data)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and first.tokens.shape == (40, 64) and first.tokens.max() < 32
    assert first.text_states is None and len(first.captions) == len(set(first.captions))
    assert [first.captions[i] for i in first.caption_ids[:3]] == [f"{c}" for c in _captions(data, 3)]
    stamp = files[0].stat().st_mtime_ns
    again = load_or_build_tokens(config, data)
    assert torch.equal(again.tokens, first.tokens) and files[0].stat().st_mtime_ns == stamp, "read, not rebuilt"
    load_or_build_tokens(config, DataConfig(name="shapes", resolution=16, size=41))
    assert len(list(tmp_path.iterdir())) == 2, "another data config is another cache"
    with pytest.MonkeyPatch.context() as patch:  # same config, but the dataset code draws other images
        patch.setitem(shapes._SIDE, "small", 0.5)
        load_or_build_tokens(config, data)
    assert len(list(tmp_path.iterdir())) == 3, "changed data is another cache"
    names = first.class_names()
    assert names is not None and all(names[first.labels[i]] == first.captions[first.caption_ids[i]] for i in range(40))


def _captions(data: DataConfig, count: int) -> list[str]:
    from common.data import build_dataset

    dataset = build_dataset(data)
    return [dataset[i]["caption"] for i in range(count)]


def losses_by_step(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["loss"], m["accuracy"]) for m in read_metrics(run_dir)}


def test_resume_reproduces_the_uninterrupted_run(autoencoder_dir, tmp_path):
    config = tiny_config(autoencoder_dir, tmp_path / "cache")
    train(tmp_path, config, f"run.out_dir={tmp_path / 'full'}", "run.steps=6")
    train(tmp_path, config, f"run.out_dir={tmp_path / 'split'}", "run.steps=3")
    second = train(tmp_path, config, f"run.out_dir={tmp_path / 'split'}", "run.steps=6")
    assert "resumed from" in second.stdout + second.stderr
    full, split = losses_by_step(tmp_path / "full"), losses_by_step(tmp_path / "split")
    assert set(full) == set(range(1, 7))
    for step in (4, 5, 6):
        assert split[step] == full[step], f"step {step}: {split[step]} != {full[step]}"
    assert len(list((tmp_path / "cache").iterdir())) == 1, "all three runs share one token cache"
    full_pipe, split_pipe = (TokenPrior.from_pretrained(tmp_path / name / "pipeline") for name in ("full", "split"))
    for a, b in zip(full_pipe.prior.state_dict().values(), split_pipe.prior.state_dict().values()):
        assert torch.equal(a, b)


def test_text_run_writes_a_complete_pipeline(autoencoder_dir, tmp_path):
    pytest.importorskip("transformers")
    run_dir = tmp_path / "text"
    train(tmp_path, tiny_config(autoencoder_dir, tmp_path / "cache", "text"), f"run.out_dir={run_dir}", "run.steps=4")
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert resolved["codebook_size"] == 32 and resolved["grid_size"] == 8 and resolved["text_dim"] == 384
    assert (run_dir / "samples" / "step_00000004.png").is_file() and (run_dir / "samples" / "final.png").is_file()
    meta = json.loads((run_dir / "pipeline" / "pipeline.json").read_text())
    assert meta["text_encoder"] == {"name_or_path": "", "max_length": 0, "tokenizer": ""}
    assert meta["prior"]["sampling"]["top_k"] == 8
    pipeline = TokensToImage.from_pretrained(run_dir)
    images = pipeline(["a small red circle at the top left"], seed=0, progress=False, output_type="pt").images
    assert images.shape == (1, 3, 16, 16)


def test_bad_override_fails_before_training(autoencoder_dir, tmp_path):
    path = tmp_path / "prior.yaml"
    path.write_text(yaml.safe_dump(tiny_config(autoencoder_dir, tmp_path / "cache")))
    result = subprocess.run([sys.executable, "prior/train.py", str(path), "loss.pkep=0.5"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Did you mean 'pkeep'" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_caption_templates_add_phrasings_that_training_draws_from(autoencoder_dir, tmp_path):
    """tokens.caption_templates: each caption is also encoded in every template's phrasing, and a text batch's
    condition is one of its caption's phrasings, drawn per item (so "a dog" is trained as well as "dog")."""
    from common.config import ConfigError
    from prior.train import batch_condition
    from tiny import make_tiny_text_encoder

    text = TextEncoderConfig(name_or_path=str(make_tiny_text_encoder(tmp_path / "text")))
    data = DataConfig(name="shapes", resolution=16, size=24)
    plain = load_or_build_tokens(TokensConfig(autoencoder=str(autoencoder_dir), cache_dir=str(tmp_path)), data, text)
    config = TokensConfig(autoencoder=str(autoencoder_dir), cache_dir=str(tmp_path), caption_templates=("a {}",))
    templated = load_or_build_tokens(config, data, text)
    unique = len(plain.captions)
    assert plain.variants is None and len(list(tmp_path.glob("tokens-*"))) == 2, "templates are another cache"
    assert templated.captions == list(plain.captions) + [f"a {c}" for c in plain.captions]
    assert templated.variants.tolist() == [[i, i + unique] for i in range(unique)]
    every = torch.arange(unique)  # the captions themselves: stored the same with or without templates
    assert all(torch.equal(a, b) for a, b in zip(templated.text_states.gather(every), plain.text_states.gather(every)))
    batch = {"caption": templated.caption_ids[:16], "label": templated.labels[:16]}
    torch.manual_seed(0)
    states = batch_condition(batch, templated.fit_text(20), "text").states
    assert states.shape == (16, 20, 32), "fit to the prior's text slots"
    rows = [[templated.text_states.gather(torch.tensor([v]), 20)[0][0] for v in templated.variants[c]]
            for c in batch["caption"].tolist()]
    chosen = [next(k for k, s in enumerate(row) if torch.equal(s, states[i])) for i, row in enumerate(rows)]
    assert set(chosen) == {0, 1}, "both phrasings are drawn"
    with pytest.raises(ConfigError, match="exactly one"):
        TokensConfig(caption_templates=("a dog",))
