"""Settings in every PNG (``parameters`` chunk) and ``python -m pipelines.generate --from-png``: the same
pixels bit for bit, and clear refusals of PNGs that cannot be made again."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import generate
from pipelines.png_info import FORMAT, read_parameters
from tiny import build_pipelines

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return build_pipelines(tmp_path_factory.mktemp("png"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def regenerate(png: Path, *extra: str) -> Path:
    out = png.with_name(f"{png.stem}.again.png")
    generate.main(["--from-png", str(png), "-o", str(out), "--no-progress", "--device", "cpu", *extra])
    return out


@pytest.mark.parametrize("run_dir, args", [
    ("text", ["a red circle", "a blue square", "-n", "3", "--seed", "4", "--steps", "3", "--negative", "green",
              "--sampler", "ddim", "--eta", "0.5", "--scale", "2", "--chunk-size", "2"]),
    ("class", ["circle", "2", "-n", "2", "--steps", "2", "--guidance", "2.5"]),
    ("prior", ["a dog", "-n", "2", "--temperature", "0.8", "--top-k", "5"]),
])
def test_a_grid_from_the_command_line_comes_back_bit_for_bit(dirs, tmp_path, capsys, run_dir, args):
    png = tmp_path / "grid.png"
    generate.main([str(dirs[run_dir]), *args, "-o", str(png), "--no-progress"])
    parameters = read_parameters(png)
    assert json.loads(Image.open(png).text["parameters"])["format"] == FORMAT
    assert parameters.pipeline.name == f"{run_dir}_run" and len(parameters.pipeline.hash) == 16
    assert parameters.options["seed"] is not None and parameters.layout.columns == int(args[args.index("-n") + 1])
    again = regenerate(png)
    assert np.array_equal(pixels(again), pixels(png))
    assert again.read_bytes() == png.read_bytes()  # the same chunk too: nothing in it depends on the run
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["from_png"] == str(png) and report["seed"] == parameters.options["seed"]


def test_inpainting_comes_back_from_its_recorded_input_files(dirs, tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "in.png")
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    mask.save(tmp_path / "mask.png")
    png = tmp_path / "inpaint.png"
    generate.main([str(dirs["text"]), "a dog", "-n", "2", "--steps", "4", "--strength", "0.5", "--init-image",
                   str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "-o", str(png), "--no-progress"])
    parameters = read_parameters(png)
    assert parameters.task == "Inpaint" and parameters.image == str(tmp_path / "in.png")
    assert parameters.options["strength"] == 0.5
    assert np.array_equal(pixels(regenerate(png)), pixels(png))


def test_the_demo_grid_with_its_row_labels_comes_back(dirs, tmp_path):
    from pipelines.demo import render_prompts

    outputs = render_prompts(tmp_path, dirs["text"], ["a dog", "red apple"], per_prompt=2, seed=3)
    png = Path(outputs["text_to_image"])
    parameters = read_parameters(png)
    assert parameters.layout.labels and parameters.layout.scale == 3
    assert parameters.pipeline.path == str(tmp_path / "pipeline")
    assert np.array_equal(pixels(regenerate(png)), pixels(png))


def test_a_moved_pipeline_is_found_with_path_and_other_weights_are_refused(dirs, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(dirs["text"], moved)
    png = tmp_path / "grid.png"
    generate.main([str(moved), "a dog", "-n", "1", "--seed", "1", "--steps", "2", "-o", str(png), "--no-progress"])
    shutil.rmtree(moved)
    with pytest.raises(SystemExit):
        regenerate(png)
    err = capsys.readouterr().err
    assert f"the pipeline directory {moved} (recorded in the PNG) does not exist; pass --path" in err
    assert np.array_equal(pixels(regenerate(png, "--path", str(dirs["text"]))), pixels(png))
    with pytest.raises(SystemExit):
        regenerate(png, "--path", str(dirs["prior"]))
    err = capsys.readouterr().err
    assert "has hash" in err and "and the PNG was made by 'moved' with hash" in err and "pass --path" in err


@pytest.mark.parametrize("make, message", [
    (lambda path: Image.new("RGB", (4, 4)).save(path), "has no 'parameters' text chunk"),
    (lambda path: Image.new("RGB", (4, 4)).save(path, format="JPEG"), "is a JPEG file"),
    (lambda path: path.write_text("not an image"), "cannot be read as an image"),
])
def test_pngs_without_settings_are_refused_with_one_line(tmp_path, capsys, make, message):
    png = tmp_path / "image.png"
    make(png)
    with pytest.raises(SystemExit) as exit_info:
        regenerate(png)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: ") and message in err[-1]


def test_a_foreign_parameters_chunk_is_refused(tmp_path, capsys):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1")  # another tool's
    Image.new("RGB", (4, 4)).save(tmp_path / "other.png", pnginfo=info)
    with pytest.raises(SystemExit):
        regenerate(tmp_path / "other.png")
    assert f"its parameters chunk is not latentgen's ({FORMAT})" in capsys.readouterr().err
