"""``python -m pipelines.generate``: grids of the right shape, settings reported, bad arguments exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import generate
from tiny import build_pipelines

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
TILE = 16 + 2  # the tiny pipelines make 16 px images; save_grid pads each tile by 2 px


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return build_pipelines(tmp_path_factory.mktemp("cli"))


def grid_size(rows: int, columns: int) -> tuple[int, int]:
    return columns * TILE + 2, rows * TILE + 2


def run(args: list[str], capsys) -> tuple[dict, list[str]]:
    report = generate.main([*args, "--no-progress"])
    return report, capsys.readouterr().out.splitlines()


def test_writes_a_grid_of_prompts_by_images_and_reports_its_settings(dirs, tmp_path, capsys):
    out = tmp_path / "grid.png"
    report, lines = run([str(dirs["text"]), "a red circle", "a blue square", "-n", "3", "--seed", "7", "-o", str(out),
                         "--steps", "2", "--sampler", "ddim", "--negative", "a green triangle"], capsys)
    assert lines[0] == str(out) and json.loads(lines[1]) == report
    assert Image.open(out).size == grid_size(rows=2, columns=3)
    assert report["seed"] == 7 and report["num_images_per_prompt"] == 3 and report["sampler"] == "ddim"
    assert report["guidance_scale"] == 4.0 and report["pipeline"] == "TextToImage"
    again = tmp_path / "again.png"
    run([str(dirs["text"]), "a red circle", "a blue square", "-n", "3", "--seed", "7", "-o", str(again),
         "--steps", "2", "--sampler", "ddim", "--negative", "a green triangle"], capsys)
    assert np.array_equal(np.array(Image.open(again)), np.array(Image.open(out)))


def test_other_pipelines_img2img_and_inpainting(dirs, tmp_path, capsys):
    report, _ = run([str(dirs["prior"] / "pipeline"), "a dog", "-n", "2", "--seed", "0", "-o", str(tmp_path / "t.png")],
                    capsys)
    assert report["pipeline"] == "TokensToImage" and report["guidance_scale"] == 2.0
    assert Image.open(tmp_path / "t.png").size == grid_size(1, 2)
    run([str(dirs["class"]), "0", "2", "-n", "2", "--steps", "2", "-o", str(tmp_path / "c.png")], capsys)
    assert Image.open(tmp_path / "c.png").size == grid_size(2, 2)
    Image.new("RGB", (16, 16), "red").save(tmp_path / "in.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "mask.png")
    report, _ = run([str(dirs["text"]), "a dog", "-n", "2", "--steps", "4", "--init-image", str(tmp_path / "in.png"),
                     "--mask", str(tmp_path / "mask.png"), "--strength", "0.5", "-o", str(tmp_path / "i.png")], capsys)
    assert report["pipeline"] == "Inpaint" and report["strength"] == 0.5
    assert Image.open(tmp_path / "i.png").size == grid_size(1, 2)


@pytest.mark.parametrize("args, message", [
    (["--sampler", "plms"], "--sampler 'plms' is unknown; valid samplers: ddim, ddpm, dpmpp_2m, euler, unipc"),
    (["--height", "15"], "height=15 is not a multiple of 4"),
    (["--steps", "0"], "--steps: num_inference_steps must be >= 1, got 0"),
    (["-n", "0"], "--num-images and --scale must be >= 1"),
    (["--steps", "two"], "argument --steps: invalid int value: 'two'"),
    (["--mask", "mask.png"], "--strength and --mask need --init-image"),
    (["--guidance", "nan"], "guidance_scale must be a finite number"),
])
def test_bad_arguments_print_one_error_line_and_exit_2(dirs, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([str(dirs["text"]), "a dog", "--no-progress", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


@pytest.mark.parametrize("run_dir, args, message", [
    ("class", ["circle", "--init-image", "{tmp}/in.png"], "needs a text-to-image or token pipeline"),
    ("class", ["a dog"], "'a dog' is not a class of this pipeline; valid names: circle, square, triangle"),
    ("{tmp}/nowhere", ["a dog"], "path {tmp}/nowhere does not exist"),
    ("{tmp}", ["a dog"], "is neither a pipeline directory nor a run directory with pipeline/pipeline.json; train one"),
    ("prior", ["a dog", "--classifier", "{classifier}", "--classifier-label", "red"],
     "classifier: TokensToImage cannot use classifier guidance"),
    ("text", ["a dog", "--classifier", "{classifier}", "--classifier-label", "violet"],
     "'violet' is not a class of the classifier (it predicts 'colour'); valid names: red, green, blue, yellow"),
    ("text", ["a dog", "a cat", "--classifier", "{classifier}"] + ["--classifier-label", "red"] * 3,
     "classifier_labels has 3 entries for 2 prompts"),
    ("text", ["a dog", "--classifier-label", "red"], "--classifier-label and --classifier-scale need --classifier"),
    ("text", ["a dog", "--classifier", "{classifier}"], "--classifier needs --classifier-label"),
    ("text", ["a dog", "--classifier", "{classifier}", "--classifier-label", "red", "--classifier-scale", "-1"],
     "classifier_scale must be a finite number >= 0"),
    ("text", ["a dog", "--classifier", "{classifier}", "--classifier-label", "red", "--init-image", "{tmp}/in.png"],
     "--classifier works with text- and class-to-image pipelines, not with --init-image"),
])
def test_inputs_the_pipeline_cannot_take_exit_2(dirs, tmp_path, capsys, run_dir, args, message):
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    path = str(dirs.get(run_dir, run_dir)).format(tmp=tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        generate.main([path, *(a.format(tmp=tmp_path, classifier=dirs["classifier"]) for a in args), "--no-progress"])
    assert exit_info.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err


def test_classifier_guidance_from_the_command_line(dirs, tmp_path, capsys):
    common = ["-n", "2", "--seed", "5", "--steps", "2", "--guidance", "1"]
    plain, _ = run([str(dirs["text"]), "a dog", "a cat", *common, "-o", str(tmp_path / "plain.png")], capsys)
    assert "classifier" not in plain
    steer = ["--classifier", str(dirs["classifier"]), "--classifier-label", "red", "--classifier-label", "blue"]
    report, lines = run([str(dirs["text"]), "a dog", "a cat", *common, *steer, "--classifier-scale", "3",
                         "-o", str(tmp_path / "guided.png")], capsys)
    assert json.loads(lines[1]) == report
    assert report["classifier"] == str(dirs["classifier"]) and report["classifier_scale"] == 3.0
    assert report["classifier_labels"] == ["red", "blue"]
    run([str(dirs["text"]), "a dog", "a cat", *common, *steer, "--classifier-scale", "0",
         "-o", str(tmp_path / "zero.png")], capsys)
    pixels = {name: np.array(Image.open(tmp_path / f"{name}.png")) for name in ("plain", "guided", "zero")}
    assert np.array_equal(pixels["zero"], pixels["plain"]) and not np.array_equal(pixels["guided"], pixels["plain"])
    report, _ = run([str(dirs["class"]), "circle", "2", "-n", "1", "--steps", "2", "--classifier",
                     str(dirs["classifier"] / "classifier"), "--classifier-label", "4", "-o", str(tmp_path / "c.png")],
                    capsys)
    assert report["pipeline"] == "ClassToImage" and report["classifier_labels"] == [4]
    assert report["classifier_scale"] == 1.0 and Image.open(tmp_path / "c.png").size == grid_size(2, 1)


def test_the_real_command_exits_2_without_a_traceback(dirs):
    command = [sys.executable, "-m", "pipelines.generate", str(dirs["text"]), "a dog", "--sampler", "plms"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: --sampler 'plms' is unknown; valid samplers: ddim, ddpm, "
                                                   "dpmpp_2m, euler, unipc"]
