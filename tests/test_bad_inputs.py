"""Bad files and configs at the entry points: each is refused with a message that names the problem and
the fix, or handled; and the files a case reads are left exactly as they were (hashed before and after).
Bad generation arguments are in test_bad_generation_inputs.py.

Tested elsewhere, not repeated: truncated, empty, non-image, CMYK, 16-bit, palette, LA/RGBA and I/F
images, empty / image-less / all-broken / missing folders (test_folder.py); misspelled and unknown keys,
nine wrong types, a missing or non-mapping config file (test_config.py); wrong kind, missing files,
invalid JSON, a raw pickle payload in load_component (test_checkpoint.py).
"""
from __future__ import annotations

import json
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
from PIL import Image

from autoencoder import convert, evaluate
from autoencoder.model import Autoencoder
from bad_inputs import ROOT, cli, refused, snapshot
from common.checkpoint import CheckpointError, save_component
from common.data.folder import FolderDataset
from common.training import latest_checkpoint
from diffusion.unet import UNet
from prior.token_prior import TokenPrior
from tiny import TINY_AUTOENCODER, tiny_unet_config

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


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
    "timestep_bias_not_positive": ("diffusion.train_latent", "", ("diffusion.timestep_bias=0",),
                                   ("diffusion: timestep_bias must be a finite number > 0", "1 = uniform t")),
    "unknown_grid_sampler": ("diffusion.train_latent", "", ("sample.sampler=plms",),
                             ("sample: sampler 'plms' is unknown", "valid samplers")),
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
        lambda d, _: _edit_config(d, lambda c: c["quantizer"].update(codebook_size=64)), Autoencoder.from_pretrained,
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
    for words in (f"cannot resume from {run / 'checkpoints' / 'step_00000002'}", "model.base_channels: 16 -> 8",
                  "run.out_dir=NEW"):
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
