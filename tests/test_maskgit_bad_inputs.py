"""MaskGIT's refusals, each naming the problem and the fix: sampler arguments, the model's input, training
settings that MaskGIT would silently ignore, pipeline calls, and damaged pipeline.json records (refused
before any weights are read, the files left untouched)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from autoencoder.model import Autoencoder
from bad_inputs import ROOT, cli, refused, snapshot
from common.checkpoint import CheckpointError
from pipelines import TokensToImage
from prior.maskgit import MaskGIT
from prior.maskgit_sampling import MaskGITSampling, sample_maskgit
from prior.sampling import SamplingConfig
from prior.token_prior import TokenPrior
from prior.transformer import Condition, PriorConfig
from tiny import make_tiny_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = ROOT / "configs/prior/shapes32_maskgit.yaml"


@pytest.fixture(scope="module")
def model() -> MaskGIT:
    torch.manual_seed(0)
    return MaskGIT(PriorConfig(codebook_size=32, grid_size=8, condition="class", num_classes=2, width=32, depth=1,
                               heads=4, kind="maskgit")).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("maskgit_pipe")
    autoencoder = Autoencoder.from_pretrained(make_tiny_autoencoder(root / "ae"))
    bundle = TokenPrior(autoencoder, model, class_names=["circle", "square"], sampling=SamplingConfig(guidance=2.0),
                        maskgit=MaskGITSampling(steps=3))
    return bundle.save_pretrained(root / "pipe")


# ------------------------------------------------------------------------------------------ sampler, model
def cond(model: MaskGIT, batch: int = 2):
    return model.prefix(Condition(labels=torch.zeros(batch, dtype=torch.long)))


SAMPLER = {  # keyword arguments -> words of the message
    "steps=0": (dict(steps=0), ["steps=0", ">= 1", "8-12"]),
    "guidance=nan": (dict(guidance=math.nan), ["guidance=nan", "finite", "1 = no guidance"]),
    "choice_temperature=-1": (dict(choice_temperature=-1.0), ["choice_temperature=-1", ">= 0"]),
    "given without fixed": (dict(given=torch.zeros(2, 64, dtype=torch.long)), ["give both", "fixed"]),
    "fixed of another shape": (dict(given=torch.zeros(2, 64, dtype=torch.long), fixed=torch.zeros(2, 16).bool()),
                               ["(2, 64)", "(2, 16)"]),
    "uniforms of another shape": (dict(steps=2, uniforms=torch.rand(2, 2, 1, 64)), ["(2, 2, 2, 64)", "(2, 2, 1, 64)"]),
}


@pytest.mark.parametrize("case", list(SAMPLER))
def test_sampler_arguments(case, model):
    options, words = SAMPLER[case]
    refused(lambda: sample_maskgit(model, cond(model), **options), *words, error=ValueError)


def test_model_takes_all_tokens_and_has_no_cache(model):
    refused(lambda: model.logits(cond(model), torch.zeros(2, 63, dtype=torch.long)), "all N = 64", "got 63",
            error=ValueError)
    refused(lambda: model.new_cache(2), "no KV cache", "sample_maskgit", error=TypeError)


# ------------------------------------------------------------------------------------------ training CLI
TRAINING = {  # override -> words of the message
    "loss.pkeep=0.9": ["loss.pkeep=0.9", "set loss.pkeep=1.0 for model.kind=maskgit"],
    "sample.guidance_tokens=4": ["sample.guidance_tokens=4", "set it to 0"],
    "maskgit.steps=0": ["maskgit.steps=0", ">= 1"],
    "maskgit.choice_temperature=-1": ["maskgit.choice_temperature=-1", ">= 0"],
    "model.kind=ar maskgit.steps=4": ["model.kind is 'ar'", "remove the section or set model.kind=maskgit"],
    "model.kind=diffusion": ["kind", "maskgit"],
}


@pytest.mark.parametrize("override", list(TRAINING))
def test_training_settings_maskgit_would_ignore_are_refused_before_anything_is_written(override, tmp_path):
    run_dir = tmp_path / "run"
    # a case that is not refused fails fast on the missing autoencoder instead of training
    message = cli("prior.train", CONFIG, f"run.out_dir={run_dir}", f"tokens.cache_dir={tmp_path / 'cache'}",
                  f"tokens.autoencoder={tmp_path / 'none'}", *override.split())
    for words in TRAINING[override]:
        assert words in message, f"{words!r} not in: {message}"
    assert not run_dir.exists() and not (tmp_path / "cache").exists(), "nothing is created for a refused run"


# ------------------------------------------------------------------------------------------ pipeline calls
CALLS = {
    "guidance_tokens=3": (dict(guidance_tokens=3), ["guidance_tokens=3", "guides every decoding step",
                                                   "leave guidance_tokens out"]),
    "num_inference_steps=0": (dict(num_inference_steps=0), ["num_inference_steps", ">= 1"]),
    "num_inference_steps=2.5": (dict(num_inference_steps=2.5), ["num_inference_steps", "2.5"]),
}


@pytest.mark.parametrize("case", list(CALLS))
def test_pipeline_calls(case, saved):
    options, words = CALLS[case]
    pipe = TokensToImage.from_pretrained(saved)
    refused(lambda: pipe(class_labels=torch.tensor([0]), progress=False, **options), *words)


# ------------------------------------------------------------------------------------------ pipeline.json
RECORDS = {  # change of meta["prior"] -> words of the message
    "kind says ar": (lambda p: (p.update(kind="ar"), p.pop("maskgit")), ["prior.kind='ar'", "'maskgit' prior",
                                                                         "restore the pipeline.json"]),
    "kind unknown": (lambda p: p.update(kind="diffusion"), ["prior.kind must be 'ar' or 'maskgit'"]),
    "maskgit section missing": (lambda p: p.pop("maskgit"), ["prior.maskgit present exactly for 'maskgit'"]),
    "steps=0": (lambda p: p["maskgit"].update(steps=0), ["prior.maskgit.steps=0", ">= 1", "section maskgit"]),
    "unknown maskgit key": (lambda p: p["maskgit"].update(stpes=4), ["prior.maskgit.", "stpes"]),
}


@pytest.mark.parametrize("case", list(RECORDS))
def test_damaged_records_are_refused_and_left_untouched(case, saved, tmp_path):
    pipe_dir = tmp_path / "pipe"
    shutil.copytree(saved, pipe_dir)
    meta = json.loads((pipe_dir / "pipeline.json").read_text())
    change, words = RECORDS[case]
    change(meta["prior"])
    (pipe_dir / "pipeline.json").write_text(json.dumps(meta))
    before = snapshot(pipe_dir)
    refused(lambda: TokensToImage.from_pretrained(pipe_dir), *words, error=CheckpointError)
    assert snapshot(pipe_dir) == before
