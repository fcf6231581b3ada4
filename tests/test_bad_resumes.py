"""Bad resumes: a command that changes what a run's checkpoint was trained with, a damaged run config, and
pickled code planted in a checkpoint. Each is refused through the training command line with one message
that names the problem and the ways out, and the run's config, metrics and checkpoints are left exactly as
they were (hashed before and after); a planted payload never runs.

Allowed changes (recorded, optimizer settings applied) and the fork are in test_resume.py.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from bad_inputs import cli, refused, snapshot, train
from common.config import ConfigError
from common.resume import check_loss_scaler
from tiny import make_tiny_autoencoder, tiny_prior_config

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
KEPT = ("config.yaml", "metrics.jsonl", "checkpoints")  # what a refused resume must leave as it was
QUIET = ("run.steps=3", "run.cpu_threads=1")


@pytest.fixture(scope="module")
def runs(tiny_parts) -> dict[str, Path]:
    """A 2-step tiny diffusion run and a 2-step tiny prior run, each with its checkpoint at step 2."""
    root = tiny_parts["root"]
    diffusion = {
        "autoencoder": str(tiny_parts["ae"]), "cache_dir": str(root / "latents"),
        "model": {"block_channels": [16, 32], "attention_levels": [False, True], "layers_per_block": 1,
                  "head_dim": 8},
        "diffusion": {"num_steps": 100}, "text": {"name_or_path": tiny_parts["text"].name_or_path},
        "optim": {"lr": 1e-3, "warmup_steps": 2}, "data": {"name": "shapes", "resolution": 16, "size": 16},
        "run": {"batch_size": 4, "precision": "no", "progress": False, "save_every": 2, "sample_every": 100,
                "cpu_threads": 1},
        "sample": {"prompts": ["a small red circle"], "per_prompt": 1, "steps": 2},
    }
    prior = tiny_prior_config(tiny_parts["ae"], root / "tokens")
    prior["run"].update(save_every=2, sample_every=100)
    configs = {"diffusion.train_latent": diffusion, "prior.train": prior}
    made = {}
    for module, config in configs.items():
        (root / f"{module}.yaml").write_text(yaml.safe_dump(config))
        train(module, str(root / f"{module}.yaml"), f"run.out_dir={root / module}", "run.steps=2")
        made[module] = root / module
    made["other_ae"] = make_tiny_autoencoder(root / "other_ae", kind="kl")  # another latent space, same shape
    made["other_vq"] = make_tiny_autoencoder(root / "other_vq")  # the same weights in another directory
    return made


def _resume(runs: dict, tmp_path: Path, module: str, *overrides: str, plant=None) -> tuple[str, Path]:
    """The refusal message of resuming a copy of ``module``'s run with ``overrides``; asserts the copy's
    config, metrics and checkpoints are unchanged."""
    run = Path(shutil.copytree(runs[module], tmp_path / "run"))
    if plant is not None:
        plant(run / "checkpoints" / "step_00000002")
    kept = {name: snapshot(run / name) for name in KEPT if (run / name).exists()}
    message = cli(module, str(runs[module].parent / f"{module}.yaml"), f"run.out_dir={run}", *QUIET, *overrides)
    assert {name: snapshot(run / name) for name in kept} == kept, "a refused resume must not touch the run's files"
    return message, run


# ------------------------------------------------------------------------- changed config (common/resume.py)
CHANGED = {  # name -> (module, overrides, words of the refusal besides the common ones)
    "another_autoencoder": ("diffusion.train_latent", lambda r: [f"autoencoder={r['other_ae']}"],
                            lambda r: ["autoencoder: '", f"-> '{r['other_ae']}'"]),
    "another_dataset_size": ("diffusion.train_latent", lambda r: ["data.size=24"], lambda r: ["data.size: 16 -> 24"]),
    "another_dataset": ("diffusion.train_latent", lambda r: ["data.name=emoji"],
                        lambda r: ["data.name: 'shapes' -> 'emoji'"]),
    "model_shape": ("diffusion.train_latent", lambda r: ["model.layers_per_block=2"],
                    lambda r: ["model.layers_per_block: 1 -> 2"]),
    "noise_schedule": ("diffusion.train_latent", lambda r: ["diffusion.num_steps=50"],  # loads, then trains wrong
                       lambda r: ["diffusion.num_steps: 100 -> 50"]),
    "text_encoder": ("diffusion.train_latent", lambda r: ["text.max_length=8"], lambda r: ["text.max_length: 0 -> 8"]),
    "batch_size": ("diffusion.train_latent", lambda r: ["run.batch_size=2"], lambda r: ["run.batch_size: 4 -> 2"]),
    "two_keys_at_once": ("diffusion.train_latent", lambda r: ["data.seed=3", "run.seed=5", "run.steps=9"],
                         lambda r: ["data.seed: 0 -> 3", "run.seed: 0 -> 5", "(data.seed: 0 -> 3, run.seed: 0 -> 5)"]),
    "prior_tokens_autoencoder": ("prior.train", lambda r: [f"tokens.autoencoder={r['other_vq']}"],
                                 lambda r: ["tokens.autoencoder: '", f"-> '{r['other_vq']}'"]),
    "prior_loss": ("prior.train", lambda r: ["loss.pkeep=0.5"], lambda r: ["loss.pkeep: 0.8 -> 0.5"]),
}


@pytest.mark.parametrize("case", CHANGED)
def test_resume_with_a_changed_config_is_refused(case, runs, tmp_path):
    module, overrides, words = CHANGED[case]
    message, run = _resume(runs, tmp_path, module, *overrides(runs))
    checkpoint = run / "checkpoints" / "step_00000002"
    for word in (f"cannot resume from {checkpoint} with this command: the config changed", "put the old values back",
                 f"{run / 'config.yaml'}", "fork a new run",
                 f"cp -r {checkpoint} NEW/checkpoints/", "run.out_dir=NEW",
                 *words(runs)):
        assert word in message, f"{word!r} not in: {message}"
    assert "run.steps:" not in message, "an allowed change is not named as refused"


def test_unreadable_run_config_is_refused(runs, tmp_path):
    damage = lambda checkpoint: (checkpoint.parents[1] / "config.yaml").write_text("model: [unclosed")  # noqa: E731
    message, run = _resume(runs, tmp_path, "diffusion.train_latent", plant=damage)
    for word in (f"{run / 'config.yaml'} is not a readable config", "restore the file", "delete it"):
        assert word in message


def test_fp16_from_a_checkpoint_without_a_loss_scaler(tmp_path):
    """A requeued job whose precision=auto now resolves to fp16 (a GPU without bf16); no GPU needed."""
    refused(lambda: check_loss_scaler(SimpleNamespace(scaler=object()), tmp_path), "now trains in fp16",
            "run.precision=fp32", error=ConfigError)
    check_loss_scaler(SimpleNamespace(scaler=None), tmp_path)  # fp32 / bf16: nothing to check


# ------------------------------------------------------------------------- pickled code (common/safe_pickle.py)
class Payload:
    """Creates ``marker`` when unpickled by an unpickler that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _torch_payload(name: str, marker: Path):
    """``name`` of a checkpoint rewritten with torch.save, its plain data plus one payload object."""
    def plant(checkpoint: Path) -> None:
        state = torch.load(checkpoint / name, weights_only=False) if (checkpoint / name).exists() else {}
        torch.save({"state": state, "extra": Payload(marker)}, checkpoint / name)
    return plant


def _raw_payload(name: str, marker: Path):
    """``name`` replaced by a bare pickle (no torch zip container) of a payload."""
    return lambda checkpoint: (checkpoint / name).write_bytes(pickle.dumps(Payload(marker), protocol=2))


PAYLOADS = {  # every kind of pickled file accelerate reads from a checkpoint
    "optimizer": (_torch_payload, "optimizer.bin"),
    "scheduler": (_torch_payload, "scheduler.bin"),
    "rng_states": (_torch_payload, "random_states_0.pkl"),
    "custom_state_ema": (_torch_payload, "custom_checkpoint_0.pkl"),  # accelerate: weights_only=False
    "custom_state_raw_pickle": (_raw_payload, "custom_checkpoint_0.pkl"),
    "scaler_of_fp16": (_torch_payload, "scaler.pt"),  # read only in fp16; refused whatever the precision
}


@pytest.mark.parametrize("case", PAYLOADS)
def test_pickled_code_in_a_checkpoint_is_refused_and_never_runs(case, runs, tmp_path):
    make, name = PAYLOADS[case]
    marker = tmp_path / "payload_ran"
    message, run = _resume(runs, tmp_path, "diffusion.train_latent", plant=make(name, marker))
    assert not marker.exists(), "the planted payload ran"
    checkpoint = run / "checkpoints" / "step_00000002"
    for word in (f"cannot resume from {checkpoint}: {name}", "io.open", "pickled code is never run",
                 f"delete {checkpoint}"):
        assert word in message, f"{word!r} not in: {message}"
