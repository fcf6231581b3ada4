"""Bad component and pipeline files: configs that do not fit their weights or are absurd, damaged weights,
out-of-range or non-finite pipeline values, malformed JSON. Each is refused before any module is built
for real, with one CheckpointError that names the file, the key and the fix, and leaves the files as
they were. (Missing files, truncated weights, a wrong component kind and an unknown config key are in
test_bad_inputs.py.)
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from autoencoder.model import Autoencoder
from bad_inputs import refused, snapshot
from common.checkpoint import CheckpointError
from diffusion.classifier import NoisyLatentClassifier
from diffusion.unet import UNet
from pipelines import TextToImage, TokensToImage, generate, load_pipeline
from prior.token_prior import TokenPrior

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    from tiny import build_pipelines

    return build_pipelines(tmp_path_factory.mktemp("pipelines"))


def edit(relative: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    """An edit of the JSON file ``relative`` (``change`` edits the parsed object in place, or returns a new one)."""
    def apply(root: Path) -> None:
        path = root / relative
        data = json.loads(path.read_text())
        changed = change(data)
        path.write_text(json.dumps(data if changed is None else changed))  # NaN and Infinity as Python writes them
    return apply


def config(relative: str, **values: Any) -> Callable[[Path], None]:
    """Set keys of a component's ``config.json`` (``a__b`` is ``config.a.b``)."""
    def change(meta: dict) -> None:
        for key, value in values.items():
            *sections, name = key.split("__")
            target = meta["config"]
            for section in sections:
                target = target[section]
            target[name] = value
    return edit(f"{relative}/config.json", change)


def pipeline_value(key: str, value: Any, section: str | None = None) -> Callable[[Path], None]:
    def change(meta: dict) -> None:
        (meta[section] if section else meta)[key] = value
    return edit("pipeline/pipeline.json", change)


def flip_bit(relative: str, from_end: int = 1000) -> Callable[[Path], None]:
    """Flip one bit inside the tensor data of a weights file (same size, still a valid safetensors file)."""
    def apply(root: Path) -> None:
        path = root / relative
        data = bytearray(path.read_bytes())
        data[len(data) - from_end] ^= 0x10
        path.write_bytes(bytes(data))
    return apply


def write(relative: str, text: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        (root / relative).write_text(text)
    return apply


def truncate(relative: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / relative
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
    return apply


AE = "pipeline/autoencoder"
text_pipeline = lambda root: TextToImage.from_pretrained(root)  # noqa: E731
class_pipeline = lambda root: load_pipeline(root)  # noqa: E731
prior_pipeline = lambda root: TokensToImage.from_pretrained(root)  # noqa: E731
autoencoder = lambda root: Autoencoder.from_pretrained(root / AE)  # noqa: E731
unet = lambda root: UNet.from_pretrained(root / "pipeline/unet")  # noqa: E731
classifier = lambda root: NoisyLatentClassifier.from_pretrained(root / "classifier")  # noqa: E731

CASES = {  # name -> (run directory, edit, load, words the message must hold)
    # --- configs that are absurd or do not fit their weights: refused before any module is built
    "codebook_size_1e12": ("text", config(AE, quantizer__codebook_size=10**12), autoencoder,
                           ("quantizer.codebook_size=1000000000000 is above 16,777,216", "config.json")),
    "base_channels_1e6": ("text", config(AE, base_channels=10**6), text_pipeline,
                          ("base_channels=1000000 is above 8,192", "autoencoder/config.json")),
    "codebook_that_does_not_fit": ("text", config(AE, quantizer__codebook_size=2**20), autoencoder, (
        "config.json does not fit", "model.safetensors", "quantizer.codebook: (32, 4) in model.safetensors, "
        "(1048576, 4) in the model config.json describes", "restore the config.json saved with them")),
    "unet_width_that_does_not_fit": ("text", config("pipeline/unet", block_channels=[32, 64]), unet, (
        "unet/config.json does not fit", "shape mismatches", "decoder.conv_out.weight: (4, 16, 3, 3) in",
        "different config")),
    "unet_depth_absurd": ("text", config("pipeline/unet", transformer_depth=10**6), unet,
                          ("transformer_depth=1000000 is above 128",)),
    "prior_width_that_does_not_fit": ("prior", config("pipeline/prior", width=64), prior_pipeline,
                                      ("prior/config.json does not fit", "blocks.0.attn.to_k.weight: (32, 32) in")),
    "prior_grid_absurd": ("prior", config("pipeline/prior", grid_size=10**5), prior_pipeline,
                          ("grid_size=100000 is above 512",)),
    "classifier_extra_class": ("classifier", config("classifier", class_names=list("abcdefgh")), classifier,
                               ("classifier/config.json does not fit", "head.weight", "different config")),
    "nan_in_component_config": ("text", config(AE, norm_eps=float("nan")), autoencoder,
                                ("non-finite values (config.norm_eps=nan)", "autoencoder/config.json")),
    # --- damaged weights: the hash recorded in config.json
    "flipped_bit_in_autoencoder": ("text", flip_bit(f"{AE}/model.safetensors"), autoencoder,
                                   ("autoencoder/model.safetensors: its SHA-256", "differ from the sha256",
                                    "copy it again from its source")),
    "flipped_bit_in_unet_via_pipeline": ("text", flip_bit("pipeline/unet/model.safetensors"), text_pipeline,
                                         ("unet/model.safetensors: its SHA-256",)),
    "flipped_bit_in_prior": ("prior", flip_bit("pipeline/prior/model.safetensors", 50), prior_pipeline,
                             ("prior/model.safetensors: its SHA-256",)),
    "weights_entry_malformed": ("text", edit(f"{AE}/config.json", lambda m: m.update(weights="sha")), autoencoder,
                                ("malformed 'weights' entry", "'bytes' and 'sha256'")),
    # --- pipeline.json values
    "latent_scale_zero": ("text", pipeline_value("latent_scale", 0), text_pipeline,
                          ("pipeline.json: latent_scale=0 must be a finite number > 0",)),
    "latent_scale_nan": ("text", pipeline_value("latent_scale", float("nan")), text_pipeline, ("latent_scale=nan",)),
    "latent_scale_negative": ("text", pipeline_value("latent_scale", -2.5), text_pipeline, ("latent_scale=-2.5",)),
    "latent_scale_inf": ("text", pipeline_value("latent_scale", float("inf")), text_pipeline, ("latent_scale=inf",)),
    "latent_scale_text": ("text", pipeline_value("latent_scale", "2.5"), text_pipeline, ("latent_scale='2.5'",)),
    "latent_scale_missing": ("text", edit("pipeline/pipeline.json", lambda m: m.pop("latent_scale") and None),
                             text_pipeline, ("lacks ['latent_scale']",)),
    "train_timesteps_zero": ("text", pipeline_value("num_steps", 0, "diffusion"), text_pipeline,
                             ("diffusion.num_steps=0 must be in [1, 100000]",)),
    "train_timesteps_1e12": ("text", pipeline_value("num_steps", 10**12, "diffusion"), text_pipeline,
                             ("diffusion.num_steps=1000000000000",)),
    "beta_end_nan": ("text", pipeline_value("beta_end", float("nan"), "diffusion"), text_pipeline,
                     ("diffusion.beta_end=nan must be finite",)),
    "beta_start_above_beta_end": ("text", pipeline_value("beta_start", 0.5, "diffusion"), text_pipeline,
                                  ("0 < beta_start <= beta_end < 1",)),
    "diffusion_not_an_object": ("text", pipeline_value("diffusion", [1, 2]), text_pipeline,
                                ("pipeline.json", "must be a mapping")),
    "class_names_of_another_count": ("class", pipeline_value("class_names", ["circle"]), class_pipeline,
                                     ("pipeline.json", "1 class_names for a U-Net with num_classes=3")),
    "class_names_repeated": ("class", pipeline_value("class_names", ["a", "a", "b"]), class_pipeline,
                             ("class_names must be distinct",)),
    "prior_temperature_zero": ("prior", pipeline_value("sampling", {"temperature": 0}, "prior"), prior_pipeline,
                               ("prior.sampling.temperature=0.0 must be > 0",)),
    "prior_guidance_nan": ("prior", pipeline_value("sampling", {"guidance": float("nan")}, "prior"),
                           prior_pipeline, ("prior.sampling.guidance=nan",)),
    "prior_guidance_negative": ("prior", pipeline_value("sampling", {"guidance": -1.0}, "prior"), prior_pipeline,
                                ("prior.sampling.guidance=-1.0 must be >= 0",)),
    "prior_top_p_above_one": ("prior", pipeline_value("sampling", {"top_p": 2.0}, "prior"), prior_pipeline,
                              ("prior.sampling.top_p=2.0 must be in (0, 1]",)),
    "prior_class_names_not_a_list": ("prior", pipeline_value("class_names", "cat", "prior"), prior_pipeline,
                                     ("prior.class_names must be a list of strings",)),
    "prior_section_not_an_object": ("prior", pipeline_value("prior", 3), prior_pipeline,
                                    ("'prior' must be an object",)),
    # --- malformed files: one CheckpointError naming the file
    "pipeline_json_not_json": ("text", write("pipeline/pipeline.json", "kind: text_to_image"), load_pipeline,
                               ("pipeline/pipeline.json is not valid JSON", "save the pipeline again")),
    "pipeline_json_truncated": ("prior", truncate("pipeline/pipeline.json"), load_pipeline,
                                ("pipeline/pipeline.json is not valid JSON", "truncated")),
    "pipeline_json_a_list": ("text", write("pipeline/pipeline.json", "[1, 2]"), text_pipeline,
                             ("pipeline.json holds a JSON list, not an object",)),
    "pipeline_json_not_utf8": ("text", lambda root: (root / "pipeline/pipeline.json").write_bytes(b"\xff\xfe{"),
                               load_pipeline, ("pipeline/pipeline.json cannot be read",)),
    "config_json_truncated": ("text", truncate(f"{AE}/config.json"), text_pipeline,
                              ("autoencoder/config.json is not valid JSON", "re-save the component")),
    "config_json_a_string": ("text", write("pipeline/unet/config.json", '"unet"'), unet,
                             ("unet/config.json holds a JSON str, not an object",)),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_component_files_are_refused(case, dirs, tmp_path):
    run, change, load, words = CASES[case]
    root = Path(shutil.copytree(dirs[run], tmp_path / "run"))
    change(root)
    before = snapshot(root)
    refused(lambda: load(root), *words, error=CheckpointError)
    assert snapshot(root) == before


@pytest.mark.parametrize("case", ["pipeline_json_not_json", "pipeline_json_a_list", "latent_scale_nan",
                                  "flipped_bit_in_unet_via_pipeline", "codebook_size_1e12"])
def test_the_cli_prints_one_error_line(case, dirs, tmp_path, capsys):
    run, change, _, words = CASES[case]
    root = Path(shutil.copytree(dirs[run], tmp_path / "run"))
    change(root)
    with pytest.raises(SystemExit) as caught:
        generate.main([str(root), "a dog", "-o", str(tmp_path / "out.png"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert caught.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert all(word in errors[0] for word in words), err
    assert not (tmp_path / "out.png").exists()


def test_token_prior_from_pretrained_checks_before_loading(dirs, tmp_path):
    """TokenPrior (the bundle under TokensToImage) refuses the same values itself."""
    root = Path(shutil.copytree(dirs["prior"], tmp_path / "run"))
    pipeline_value("sampling", {"top_k": -1}, "prior")(root)
    refused(lambda: TokenPrior.from_pretrained(root / "pipeline"), "prior.sampling.top_k=-1 must be >= 0",
            error=CheckpointError)
