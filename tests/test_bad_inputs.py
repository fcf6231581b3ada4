"""Bad inputs at the entry points: each is refused with a message that names the problem and the fix,
or handled; and the files a case reads are left exactly as they were (hashed before and after).

Tested elsewhere, not repeated: truncated, empty, non-image, CMYK, 16-bit, palette, LA/RGBA and I/F
images, empty / image-less / all-broken / missing folders (test_folder.py); misspelled and unknown keys,
nine wrong types, a missing or non-mapping config file (test_config.py); wrong kind, missing files,
invalid JSON, a raw pickle payload in load_component (test_checkpoint.py); empty, non-ASCII, 256+ token
and bare-string prompts at the MiniLM encoder (test_text_encoder.py). Cases marked xfail (strict) are
defects in files owned elsewhere; each reason names the fix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from PIL import Image

from autoencoder import convert, evaluate
from autoencoder.model import Autoencoder
from common.checkpoint import CheckpointError, save_component
from common.data.folder import FolderDataset
from common.text_encoder import TextEncoderConfig
from common.training import latest_checkpoint, run_cli
from diffusion import evaluate_shapes
from diffusion.latent_diffusion import LatentDiffusion
from diffusion.samplers import sample_ddim
from diffusion.schedules import make_schedule
from diffusion.unet import UNet
from prior.generate import TokenPrior
from prior.transformer import GPT, PriorConfig
from test_autoencoder_train import TINY as TINY_AUTOENCODER
from test_latent_cache import make_tiny_pipeline, single_thread, tiny_unet_config  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("transformers")


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) with its SHA-256; folders as "dir"."""
    entries = [path] if path.is_file() else sorted(path.rglob("*"))
    return {p.as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in entries}


def refused(call, *words: str, error: type[BaseException] = Exception) -> str:
    """Run ``call``, which must fail with ``error``; the message must hold every one of ``words``."""
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value.code if isinstance(caught.value, SystemExit) else caught.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


def train(module: str, *argv: str, wrapped: bool = True) -> None:
    """A training script's ``main`` in this process, through its command-line wrapper (``run_cli``)."""
    try:
        run_cli(importlib.import_module(module).main, argv) if wrapped else importlib.import_module(module).main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no accelerate singleton behind


def cli(module: str, *argv: str) -> str:
    """The message a training script's command line exits with (``error: <message>``, no traceback)."""
    return refused(lambda: train(module, *argv), "error: ", error=SystemExit)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """A tiny diffusion pipeline saved as a run, its autoencoder and text encoder, and a stage-1 run."""
    root = tmp_path_factory.mktemp("parts")
    pipe = make_tiny_pipeline(root)
    pipe.save_pretrained(root / "diffusion_run" / "pipeline")
    stage1 = root / "stage1"
    (root / "ae.yaml").write_text(yaml.safe_dump(TINY_AUTOENCODER))
    train("autoencoder.train", str(root / "ae.yaml"), f"run.out_dir={stage1}", "run.steps=2", "run.save_every=1",
          "run.cpu_threads=1", wrapped=False)
    return {"root": root, "pipe": pipe, "ae": root / "ae", "text": root / "text", "stage1": stage1}


# ------------------------------------------------------------------------- image folders (common/data/folder.py)
def _bomb(root: Path) -> str:
    """A valid 8x8 PNG whose header claims 30000 x 30000 pixels."""
    Image.new("RGB", (8, 8)).save(root / "bomb.png")
    data = bytearray((root / "bomb.png").read_bytes())
    data[16:24] = struct.pack(">II", 30000, 30000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    (root / "bomb.png").write_bytes(bytes(data))
    return "bomb.png"


def _save(name: str, image: Image.Image, **options) -> callable:
    return lambda root: image.save(root / name, **options) or name


def _metadata(root: Path) -> str:
    lines = ['{"file_name": "good.png", "text": "a teal square"}', "not json", '{"text": "no file name"}',
             '{"file_name": "good.png", "text": 5}', "[1, 2]"]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return "good.png"


FOLDER_CASES = {  # name -> (make the file, return its name; "skipped" or "used"; words of the reason / caption)
    "decompression_bomb_header": (_bomb, "skipped", "DecompressionBombError"),
    "dangling_symlink": (lambda root: os.symlink(root / "gone.png", root / "link.png") or "link.png", "skipped",
                         "No such file"),
    "one_bit_mode": (_save("bits.png", Image.new("1", (9, 9), 1)), "used", ""),
    "lab_mode_tiff": (_save("lab.tif", Image.new("LAB", (8, 8), (50, 0, 0))), "used", ""),
    "animated_gif": (_save("anim.gif", Image.new("P", (10, 10)), save_all=True,
                           append_images=[Image.new("P", (10, 10), i) for i in (1, 2)]), "used", ""),
    "one_by_five_hundred": (_save("sliver.png", Image.new("RGB", (1, 500), (255, 0, 0))), "used", ""),
    "single_pixel": (_save("dot.png", Image.new("RGB", (1, 1), (0, 255, 0))), "used", ""),
    "png_bytes_named_jpg": (_save("really_png.jpg", Image.new("RGB", (8, 8)), format="PNG"), "used", ""),
    "folder_named_like_an_image": (lambda root: (root / "dir.png").mkdir() or "good.png", "used", ""),
    "malformed_metadata_lines": (_metadata, "used", "a teal square"),
    "non_utf8_sidecar": (lambda root: (root / "good.txt").write_bytes("caf\xe9".encode("latin-1")) and "good.png",
                         "used", "caf\ufffd"),
}


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_image_folder(case, tmp_path):
    make, outcome, words = FOLDER_CASES[case]
    Image.new("RGB", (8, 8), (0, 128, 128)).save(tmp_path / "good.png")
    name = make(tmp_path)
    before = snapshot(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = FolderDataset(tmp_path, 16)
    reported = " ".join(str(w.message) for w in caught)
    if outcome == "skipped":
        reason = dict(dataset.skipped)[name]
        assert words in reason and name in reported and "Skipped 1 of 2" in reported
    else:
        index = [p.name for p in dataset.files].index(name)
        assert words in dataset.captions[index]
    if case == "malformed_metadata_lines":
        assert "ignored malformed lines [2, 3, 4, 5]" in reported
    for i in range(len(dataset)):
        image = dataset[i]["image"]
        assert image.shape == (3, 16, 16) and torch.isfinite(image).all() and image.abs().max() <= 1
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------- configs through the training CLIs
@pytest.mark.parametrize("script", ["autoencoder/train.py", "diffusion/train_classifier.py"])
def test_misspelled_key_on_the_command_line_exits_without_traceback(script, parts, tmp_path):
    config = parts["root"] / "ae.yaml"
    if script == "diffusion/train_classifier.py":
        config = tmp_path / "classifier.yaml"
        config.write_text(f"diffusion: {parts['root'] / 'diffusion_run'}\n")
    before = snapshot(config)
    result = subprocess.run([sys.executable, script, str(config), "optim.lrr=1",
                             f"run.out_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: unknown config key 'optim.lrr'. Did you mean 'lr'? Valid keys here: betas," in result.stderr
    assert not (tmp_path / "run").exists() and snapshot(config) == before


CONFIG_CASES = {  # name -> (script, YAML text, overrides, words of the message)
    "unknown_section_in_yaml": ("diffusion.train_latent", "optimiser:\n  lr: 1.0\n", (),
                                ("unknown config key 'optimiser'", "Did you mean 'optim'?", "Valid keys here")),
    "mistyped_integer": ("prior.train", "", ("run.steps=ten",), ("run.steps: expected int", "'ten'")),
    "misspelled_choice": ("autoencoder.train", "", ("run.precision=bf61",),
                          ("run.precision: 'bf61' is not one of", "'bf16'")),
    "value_out_of_range": ("diffusion.train_latent", "", ("diffusion.cond_drop_prob=1.5",),
                           ("diffusion: cond_drop_prob must be in [0, 1), got 1.5",)),
    "inconsistent_values": ("autoencoder.train", "loss:\n  disc_start: 5\n  gan_start: 2\n", (),
                            ("loss: need 0 <= disc_start <= gan_start",)),
    "yaml_syntax_error": ("prior.train", "run: {steps: [1, 2\n", (), ("is not valid YAML", "line 2")),
    "section_given_a_value": ("autoencoder.train", "", ("model=5",), ("model must be a mapping", "got 5")),
    "sub_key_of_a_value": ("prior.train", "", ("run.steps.max=3",), ("run.steps: expected int",)),
    "classifier_of_an_unknown_attribute": ("diffusion.train_classifier", "diffusion: somewhere\n", ("target=hue",),
                                           ("target: unknown classifier attribute 'hue'", "valid attributes: colour")),
    "classifier_without_a_diffusion_run": ("diffusion.train_classifier", "", (), ("set diffusion=",)),
    "folder_data_without_path": ("autoencoder.train", yaml.safe_dump(TINY_AUTOENCODER),  # fails in build_dataset
                                 ("data.name=folder", "run.cpu_threads=1"), ("data.path is empty", "data.path=/path")),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config(case, tmp_path):
    module, text, overrides, words = CONFIG_CASES[case]
    config = tmp_path / "config.yaml"
    config.write_text(text)
    before = snapshot(config)
    message = cli(module, str(config), *overrides, f"run.out_dir={tmp_path / 'run'}")
    assert all(word in message for word in words), message
    assert snapshot(config) == before and not (tmp_path / "run" / "checkpoints").exists()


def test_training_on_a_folder_of_broken_images(parts, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    before = snapshot(tmp_path / "images")
    with pytest.warns(UserWarning, match="broken.jpg"):
        message = cli("autoencoder.train", str(parts["root"] / "ae.yaml"), "data.name=folder", "run.cpu_threads=1",
                      f"data.path={tmp_path / 'images'}", f"run.out_dir={tmp_path / 'run'}")
    assert "None of the 1 image files" in message and "could be decoded" in message
    assert snapshot(tmp_path / "images") == before


def test_diffusion_training_without_an_autoencoder(parts, tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    message = cli("diffusion.train_latent", str(tmp_path / "empty.yaml"), f"autoencoder={tmp_path}",
                  "run.cpu_threads=1",
                  f"run.out_dir={tmp_path / 'run'}", f"text.name_or_path={parts['text']}")
    assert f"no autoencoder at {tmp_path}" in message and "autoencoder/train.py" in message


# ------------------------------------------------------------------------- component and run directories
def _edit_config(directory: Path, change) -> Path:
    meta = json.loads((directory / "config.json").read_text())
    change(meta["config"])
    (directory / "config.json").write_text(json.dumps(meta))
    return directory


def _truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path.parent


def _not_a_run(directory: Path) -> Path:
    shutil.rmtree(directory)
    directory.mkdir()
    (directory / "notes.txt").write_text("not a run")
    return directory


def _evaluate(directory: Path) -> None:
    evaluate.main([str(directory), "--data", "shapes", "--size", "4"])


CHECKPOINT_CASES = {  # name -> (make the bad directory from (a copy of the autoencoder, parts), load it, words)
    "wrong_component_kind": (
        lambda d, _: save_component(d.parent / "unet", "unet", tiny_unet_config(), UNet(tiny_unet_config())),
        Autoencoder.from_pretrained, ("holds a 'unet' component, but a 'autoencoder' was expected",)),
    "weights_of_another_shape": (
        lambda d, _: _edit_config(d, lambda c: c.update(codebook_size=64)), Autoencoder.from_pretrained,
        ("quantizer.codebook: (32, 4) in", "(64, 4) in the model", "different config")),
    "missing_weights_via_evaluate": (lambda d, _: (d / "model.safetensors").unlink() or d, _evaluate,
                                     ("no model.safetensors; the save did not finish",)),
    "missing_config_json": (lambda d, _: (d / "config.json").unlink() or d, Autoencoder.from_pretrained,
                            ("config.json is missing", "save_pretrained")),
    "truncated_weights": (lambda d, _: _truncate(d / "model.safetensors", 200), Autoencoder.from_pretrained,
                          ("model.safetensors cannot be read", "damaged or truncated")),
    "unknown_key_in_config_json": (lambda d, _: _edit_config(d, lambda c: c.update(flash=True)),
                                   Autoencoder.from_pretrained,
                                   ("unknown config key 'flash'", "another version of latentgen")),
    "evaluate_on_a_non_run_directory": (lambda d, _: _not_a_run(d), _evaluate, (
        "neither a stage-1 run directory", "run.out_dir of an autoencoder/train.py run")),
    "prior_pipeline_from_a_diffusion_run": (
        lambda _, parts: parts["root"] / "diffusion_run" / "pipeline", TokenPrior.from_pretrained,
        ("holds kind 'text_to_image'", "expected 'tokens_to_image'")),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpoint_directory(case, parts, tmp_path):
    make, load, words = CHECKPOINT_CASES[case]
    target = make(Path(shutil.copytree(parts["ae"], tmp_path / "ae")), parts)
    before = snapshot(target)
    refused(lambda: load(target), *words, error=(CheckpointError, SystemExit))
    assert snapshot(target) == before


def test_resume_with_a_changed_model_config_keeps_the_run(parts, tmp_path):
    run = Path(shutil.copytree(parts["stage1"], tmp_path / "run"))
    kept = {p: snapshot(run / p) for p in ("config.yaml", "metrics.jsonl", "checkpoints", "autoencoder")}
    message = cli("autoencoder.train", str(parts["root"] / "ae.yaml"), f"run.out_dir={run}", "model.base_channels=8",
                  "run.steps=3", "run.cpu_threads=1")
    for words in (f"cannot resume from {run / 'checkpoints' / 'step_00000002'}", "size mismatch",
                  "config changed", "new run.out_dir"):
        assert words in message
    assert {p: snapshot(run / p) for p in kept} == kept, "a failed resume must not touch the run's files"


def test_resume_from_a_damaged_checkpoint(parts, tmp_path):
    run = Path(shutil.copytree(parts["stage1"], tmp_path / "run"))
    optimizer = run / "checkpoints" / "step_00000002" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    message = cli("autoencoder.train", str(parts["root"] / "ae.yaml"), f"run.out_dir={run}", "run.steps=3",
                  "run.cpu_threads=1")
    assert "cannot resume from" in message and f"delete {optimizer.parent}" in message


def test_latest_pointer_naming_a_deleted_checkpoint(parts, tmp_path):
    run = Path(shutil.copytree(parts["stage1"], tmp_path / "run"))
    shutil.rmtree(run / "checkpoints" / "step_00000002")  # by hand; "latest" still names it
    with pytest.warns(RuntimeWarning, match="using the newest complete one, step_00000001"):
        assert latest_checkpoint(run) == run / "checkpoints" / "step_00000001"


# ------------------------------------------------------------------------- legacy checkpoints (autoencoder.convert)
class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


LEGACY_CASES = {  # name -> (write the .ckpt, words)
    "pickled_payload": (lambda path: torch.save({"state_dict": {}, "hook": Payload(path.parent / "PWNED")}, path),
                        ("refused to load", "pickled code is never executed")),
    "not_a_checkpoint": (lambda path: path.write_bytes(b"PK\x03\x04 garbage" * 10),
                         ("cannot be read", "not a PyTorch checkpoint")),
    "empty_file": (lambda path: path.write_bytes(b""), ("is empty (0 bytes)",)),
    "not_an_autoencoder": (lambda path: torch.save({"state_dict": {"w": torch.ones(2)}}, path),
                           ("not a taming/LDM autoencoder",)),
}


@pytest.mark.parametrize("case", LEGACY_CASES)
def test_convert_taming_checkpoint(case, tmp_path):
    write, words = LEGACY_CASES[case]
    write(tmp_path / "model.ckpt")
    before = snapshot(tmp_path)
    refused(lambda: convert.main(["taming", str(tmp_path / "model.ckpt"), str(tmp_path / "out")]), *words,
            error=SystemExit)
    assert not (tmp_path / "PWNED").exists(), "the payload ran"
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- sampling (diffusion)
DEFECTS: dict[str, str] = {  # case -> where a known defect is and its fix; strict xfail: a fix makes them fail
}


def named(table: dict) -> list:
    """The case names of ``table`` as parameters, the known defects marked xfail."""
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=DEFECTS[name])) if name in DEFECTS
            else name for name in table]


SAMPLING_CASES = {  # name -> (generate() arguments, error, words)
    "misspelled_sampler": (dict(sampler="dpmpp2m"), ValueError, ("unknown sampler 'dpmpp2m'", "'dpmpp_2m'")),
    "zero_steps": (dict(steps=0), ValueError, ("steps must be in [1, 100]", "got 0")),
    "negative_steps": (dict(steps=-3), ValueError, ("steps must be in [1, 100]", "got -3")),
    "fractional_steps": (dict(steps=2.5), TypeError, ("steps must be a whole number", "2.5")),
    "more_steps_than_timesteps": (dict(steps=5000), ValueError, ("steps must be in [1, 100]",)),
    "nan_guidance": (dict(guidance=float("nan")), ValueError, ("guidance scale must be a finite number", "nan")),
    "inf_guidance": (dict(guidance=float("inf")), ValueError, ("guidance scale must be a finite number", "inf")),
    "negative_ddim_eta": (dict(sampler="ddim", eta=-1.0), ValueError, ("eta must be >= 0",)),
    "misspelled_sampler_option": (dict(sampler="ddim", etaa=0.5), TypeError, ("'etaa'",)),
    "guidance_rescale_above_one": (dict(rescale=2.0), ValueError, ("rescale must be in [0, 1]",)),
    "no_prompts": (dict(prompts=[]), ValueError, ("at least one prompt",)),
    "prompt_that_is_not_text": (dict(prompts=["a dog", None]), TypeError, ("prompt 1 is NoneType",)),
    "size_not_a_multiple_of_the_latent_grid": (dict(size=13), ValueError, ("height=13 is not a multiple of 4",
                                                                           "e.g. 12 or 16")),
    "negative_size": (dict(size=-16), ValueError, ("height=-16", "positive multiples of 4")),
    "more_negative_prompts_than_prompts": (dict(prompts=["a", "b"], negative_prompts=["x", "y", "z"]), ValueError,
                                           ("negative_prompts has 3 entries for 2 prompts", "give one")),
    "negative_prompts_for_a_text_free_pipeline": (dict(negative_prompts="x", text_free=True), ValueError,
                                                  ("negative_prompts need a text encoder",)),
}


@pytest.mark.parametrize("case", named(SAMPLING_CASES))
def test_sampling(case, parts):
    arguments, error, words = SAMPLING_CASES[case]
    arguments = {"prompts": ["a small red circle at the top left"], "steps": 2, **arguments}
    pipe = parts["pipe"]
    if arguments.pop("text_free", False):  # the same pipeline without its text encoder, fed class labels
        unet = UNet(dataclasses.replace(tiny_unet_config(context_dim=0), num_classes=2))
        pipe = LatentDiffusion(pipe.autoencoder, unet, None, pipe.config, pipe.latent_scale)
        arguments.update(prompts=None, class_labels=torch.tensor([0, 1]))
    generator = torch.Generator().manual_seed(0)
    refused(lambda: pipe.generate(arguments.pop("prompts"), generator=generator, **arguments), *words, error=error)


def test_a_bare_string_is_one_prompt(parts):
    """As in the pipelines: "a dog" is one prompt (not one per character), and so is a bare negative prompt."""
    pipe, seed = parts["pipe"], lambda: torch.Generator().manual_seed(0)
    images = pipe.generate("a dog", negative_prompts="a cat", steps=2, generator=seed())
    assert images.shape == (1, 3, 16, 16)
    torch.testing.assert_close(images, pipe.generate(["a dog"], negative_prompts=["a cat"], steps=2, generator=seed()))
    torch.testing.assert_close(pipe.encode_prompts("a dog").states, pipe.encode_prompts(["a dog"]).states)


MASK_CASES = {  # name -> (mask, known latents, error, words); the latents are (1, 4, 8, 8)
    "mask_without_known_latents": (torch.ones(1, 1, 8, 8), None, ValueError, ("needs known_latents",)),
    "nan_in_the_mask": (torch.full((1, 1, 8, 8), float("nan")), torch.zeros(1, 4, 8, 8), ValueError,
                        ("mask holds NaN/inf", "finite numbers in [0, 1]")),
    "mask_of_another_size": (torch.ones(1, 1, 5, 5), torch.zeros(1, 4, 8, 8), ValueError,
                             ("mask has shape (1, 1, 5, 5)", "must be (1, 1, 8, 8)")),
    "mask_with_a_channel_per_latent": (torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), ValueError,
                                       ("mask has shape (1, 4, 8, 8)",)),
    "mask_scaled_to_255": (torch.full((1, 1, 8, 8), 255.0), torch.zeros(1, 4, 8, 8), ValueError,
                           ("mask values must lie in [0, 1]", "[255, 255]", "divide it by 255")),
    "negative_mask": (torch.full((1, 1, 8, 8), -0.5), torch.zeros(1, 4, 8, 8), ValueError,
                      ("mask values must lie in [0, 1]", "[-0.5, -0.5]")),
    "known_latents_of_another_shape": (torch.ones(1, 1, 8, 8), torch.zeros(1, 3, 8, 8), ValueError,
                                       ("known_latents has shape (1, 3, 8, 8)", "(1, 4, 8, 8)")),
    "known_latents_without_a_mask": (None, torch.zeros(1, 4, 8, 8), ValueError, ("known_latents were given without "
                                                                                 "mask",)),
}


@pytest.mark.parametrize("case", named(MASK_CASES))
def test_inpainting_inputs(case, parts):
    mask, known, error, words = MASK_CASES[case]
    pipe = parts["pipe"]
    cond = pipe.encode_prompts(["a small red circle at the top left"])
    refused(lambda: pipe.sample_latents(cond, None, (1, 4, 8, 8), steps=2, guidance=1.0, mask=mask,
                                        known_latents=known, generator=torch.Generator().manual_seed(0)),
            *words, error=error)


def test_sampler_with_ascending_timesteps():
    schedule = make_schedule("linear", 100)
    refused(lambda: sample_ddim(lambda x, t: x, torch.zeros(1, 4, 8, 8), schedule, torch.tensor([10, 50])),
            "strictly descending", error=ValueError)


EVALUATE_CASES = {  # name -> (arguments, words of the exit message)
    "cli_unknown_sampler": (["--sampler", "dpm"], "invalid choice: 'dpm' (choose from 'ddim', 'ddpm', 'dpmpp_2m'"),
    "cli_not_a_run_directory": (["--device", "cpu"], "neither a pipeline directory nor a run directory"),
    "cli_zero_steps": (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    "cli_fractional_prompts": (["--prompts", "2.5"], "argument --prompts: expected a whole number >= 1, got '2.5'"),
    "cli_zero_batch_size": (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    "cli_nan_guidance": (["--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
    "cli_rescale_above_one": (["--rescale", "2"], "argument --rescale: must be a finite number in [0, 1], got '2'"),
    "cli_sweep_with_a_word": (["--sweep", "1,x"], "argument --sweep: expected a number, got 'x'; give "
                                                  "comma-separated finite numbers, e.g. 0,1,2,4"),
    "cli_sweep_with_inf": (["--sweep", "1,inf"], "argument --sweep: must be a finite number, got 'inf'"),
    "cli_classifier_sweep_with_nan": (["--classifier-sweep", "nan"], "argument --classifier-sweep: must be a finite"),
}


@pytest.mark.parametrize("case", named(EVALUATE_CASES))
def test_evaluate_shapes_cli(case, parts, capsys):
    arguments, words = EVALUATE_CASES[case]
    run = parts["root"] / ("stage1" if case == "cli_not_a_run_directory" else "diffusion_run")
    base = [str(run), "--steps", "2", "--prompts", "2", "--samples", "1", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit:
        evaluate_shapes.main(base + arguments)
    message = str(exit.value.code) + capsys.readouterr().err
    assert exit.value.code != 0 and "Traceback" not in message and words in message


# ------------------------------------------------------------------------- prompts that are handled
PROMPTS = {
    "empty_prompt": "",
    "emoji_prompt": "🐶🌈 a dog under a rainbow 🎉",
    "cjk_prompt": "一只红色的圆形在左上角",
    "control_characters": "a red\x00 circle\t\n\r",
    "longer_than_the_token_limit": "a small red circle at the top left " * 40,
}


@pytest.mark.parametrize("case", PROMPTS)
def test_prompt_is_handled(case, parts, caplog):
    with caplog.at_level(logging.WARNING, logger="common.text_encoder"):
        images = parts["pipe"].generate([PROMPTS[case]], steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    truncated = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert bool(truncated) == (case == "longer_than_the_token_limit")
    if truncated:
        assert "exceed the text encoder's limit of 64 tokens" in truncated[0]


# ------------------------------------------------------------------------- the token prior
@pytest.fixture(scope="module")
def priors(parts) -> dict[str, TokenPrior]:
    autoencoder = Autoencoder.from_pretrained(parts["ae"])
    torch.manual_seed(0)
    common = dict(codebook_size=32, grid_size=8, width=32, depth=1, heads=4)
    by_class = GPT(PriorConfig(condition="class", num_classes=2, **common))
    by_text = GPT(PriorConfig(condition="text", text_dim=32, text_tokens=6, **common))
    return {"class": TokenPrior(autoencoder, by_class, class_names=["a red circle", "a blue square"]),
            "text": TokenPrior(autoencoder, by_text, TextEncoderConfig(name_or_path=str(parts["text"])))}


ONE = torch.tensor([0])
PRIOR_CASES = {  # name -> (prior, generate() arguments, words)
    "class_label_out_of_range": ("class", dict(labels=torch.tensor([0, 7])), ("class labels must lie in [0, 2)",)),
    "prompt_naming_no_class": ("class", dict(prompts=["a green star"]), ("name no class", "'a green star'")),
    "nan_guidance": ("class", dict(labels=ONE, guidance=float("nan")), ("guidance must be a finite number", "nan")),
    "zero_temperature": ("class", dict(labels=ONE, temperature=0.0), ("temperature", "top_k=1")),
    "top_p_above_one": ("class", dict(labels=ONE, top_p=1.5), ("top_p must be in (0, 1]",)),
    "negative_top_k": ("class", dict(labels=ONE, top_k=-5), ("top_k must be >= 0",)),
    "text_prior_without_prompts": ("text", dict(num_samples=2), ("a text prior needs prompts",)),
}


@pytest.mark.parametrize("case", PRIOR_CASES)
def test_prior_generation(case, priors):
    kind, arguments, words = PRIOR_CASES[case]
    refused(lambda: priors[kind].generate(**arguments, generator=torch.Generator().manual_seed(0)), *words,
            error=ValueError)


def test_prior_takes_a_bare_string_as_one_prompt(priors):
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    images = priors["class"].generate("a red circle", generator=seed())
    assert images.shape == (1, 3, 16, 16)
    torch.testing.assert_close(images, priors["class"].generate(["a red circle"], generator=seed()))


def test_prior_prompt_longer_than_its_text_slots(priors, caplog):
    with caplog.at_level(logging.WARNING, logger="prior.text"):
        images = priors["text"].generate(["a small red circle at the top left of the picture 🐶"], guidance=2.0,
                                         generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert any("raise model.text_tokens" in r.getMessage() for r in caplog.records)
