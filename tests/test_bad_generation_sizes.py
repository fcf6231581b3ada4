"""Bad generation sizes and counts, and what the generate command cannot write to or run on: each is refused
with one message that names the argument, the problem and the fix, before anything is allocated, loaded
or written.

Classes: sizes and counts against the memory estimate (the pipelines), chunk sizes (the options), the
``-o`` path, ``--device``, and a disk that fills while the grid is written (the command line).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import pipelines.options
from bad_inputs import refused, snapshot
from pipelines import generate
from tiny import build_pipelines, load_pipelines

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
GIB = 2**30
PROMPT = "a small red circle at the top left"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return build_pipelines(tmp_path_factory.mktemp("sizes"))


@pytest.fixture(scope="module")
def pipes(dirs) -> dict:
    return load_pipelines(dirs)


# ------------------------------------------------------------------------- sizes and counts (memory)
# name -> (pipeline, call arguments, error, words). Memory is 8 GiB here (patched), so the outcome does
# not depend on the machine; "real_memory" cases are too large for any machine and run unpatched.
SIZE_CASES = {
    "side_of_100000_px": ("text", dict(height=100_000, width=100_000), ValueError,
                          ("height=100000, width=100000: 1 image needs about", "TB at 100000x100000 px",
                           "is available on cpu", "lower height and width")),
    "a_billion_images_per_prompt": ("text", dict(num_images_per_prompt=10**9), ValueError,
                                    ("num_images_per_prompt=1000000000: 1000000000 images need about", "at 16x16 px",
                                     "8.0 GB is available", "make at most", "and call again for more")),
    "ten_thousand_prompts_at_512_px": ("text", dict(prompt=[PROMPT] * 10_000, height=512, width=512), ValueError,
                                       ("prompt (10000 of them): 10000 images need about", "make at most")),
    "ten_thousand_labels_at_512_px": ("class", dict(prompt=[0] * 10_000, height=512, width=512), ValueError,
                                      ("class_labels (10000 of them): 10000 images need",)),
    "a_chunk_that_does_not_fit": ("text", dict(height=512, width=512, num_images_per_prompt=100, chunk_size=100),
                                  ValueError, ("chunk_size=100: 100 images need about", "lower chunk_size to")),
    "img2img_resized_to_100000_px": ("img2img", dict(image=True, height=100_000, width=100_000), ValueError,
                                     ("height=100000, width=100000:", "lower height and width")),
    "a_billion_token_images": ("tokens", dict(num_images_per_prompt=10**9), ValueError,
                               ("num_images_per_prompt=1000000000:", "make at most")),
    "zero_chunk_size": ("text", dict(chunk_size=0), ValueError, ("chunk_size must be >= 1, got 0",)),
    "fractional_chunk_size": ("tokens", dict(chunk_size=2.5), TypeError, ("chunk_size must be an integer",)),
    "real_memory_side_of_100000_px": ("text", dict(height=100_000, width=100_000, real_memory=True), ValueError,
                                      ("height=100000, width=100000:", "is available on cpu")),
}


@pytest.mark.parametrize("case", SIZE_CASES)
def test_sizes_and_counts(case, pipes, monkeypatch):
    which, arguments, error, words = SIZE_CASES[case]
    arguments = {"prompt": [PROMPT], "num_inference_steps": 2, "progress": False, **arguments}
    if not arguments.pop("real_memory", False):
        monkeypatch.setattr(pipelines.options, "available_memory", lambda device: 8 * GIB)
    if which == "tokens":
        arguments.pop("num_inference_steps")
    pipe = pipes[which]
    positional = [arguments.pop("prompt")]
    if arguments.pop("image", False):
        positional.append(Image.new("RGB", (16, 16)))
    refused(lambda: pipe(*positional, **arguments), *words, error=error)


# ------------------------------------------------------------------------- the command line
def run_cli(argv: list[str], capsys, loaded: bool = False) -> str:
    """The command's ``error:`` line (exit status 2, no traceback): its only output on stderr, or after the
    progress bars of loading the text encoder where the pipeline was ``loaded`` first."""
    with pytest.raises(SystemExit) as exit_info:
        generate.main([*argv, "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err and (loaded or len(lines) == 1), lines
    return lines[-1]


def read_only_folder(tmp: Path) -> Path:
    """A folder nobody may write in: permission bits, or a read-only file system where root ignores them."""
    folder = tmp / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder if not os.access(folder, os.W_OK) else Path("/sys")


# name -> (arguments after the run directory, words); {tmp} is the test's folder. Each is refused before the
# pipeline is loaded (loading is patched to fail) and leaves {tmp} as it was.
CLI_CASES = {
    "output_is_a_folder": (["-o", "{tmp}"], ("-o {tmp} is a folder; give a file name, e.g. -o {tmp}/grid.png",)),
    "output_under_a_file": (["-o", "{tmp}/file.txt/grid.png"], ("{tmp}/file.txt is a file, so no folder can be made",)),
    "output_without_an_image_extension": (["-o", "{tmp}/grid"], ("no extension is not an image format PIL writes",
                                                                "end the name with .png")),
    "output_with_an_unknown_extension": (["-o", "{tmp}/grid.xyz"], (".xyz is not an image format",)),
    "output_in_a_read_only_folder": (["-o", "{read_only}/grid.png"], ("cannot write in", "choose another -o")),
    "cuda_without_a_gpu": (["--device", "cuda"], ("--device cuda: no CUDA GPU is visible here", "use --device cpu")),
    "a_gpu_index_that_is_not_there": (["--device", "cuda:7"], ("--device cuda:7: no CUDA GPU is visible here",)),
    "an_unknown_device_name": (["--device", "gpu"], ("--device 'gpu' is not a device name; use cpu, or cuda",)),
    "a_zero_chunk_size": (["--chunk-size", "0"], ("--chunk-size: chunk_size must be >= 1, got 0",)),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_command_line(case, dirs, tmp_path, capsys, monkeypatch):
    arguments, words = CLI_CASES[case]
    (tmp_path / "file.txt").write_text("keep")
    names = dict(tmp=tmp_path, read_only=read_only_folder(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same refusal on a GPU machine
    monkeypatch.setattr(generate, "load_pipeline", lambda path: pytest.fail("loaded before the arguments were checked"))
    before = snapshot(tmp_path)
    message = run_cli([str(dirs["text"]), PROMPT, *(a.format(**names) for a in arguments)], capsys)
    for word in words:
        assert word.format(**names) in message
    assert snapshot(tmp_path) == before


def test_a_gpu_index_beyond_the_gpus_there_are(dirs, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    message = run_cli([str(dirs["text"]), PROMPT, "--device", "cuda:7"], capsys)
    assert "--device cuda:7: this machine has 2 GPU(s), cuda:0 to cuda:1" in message


def test_too_many_images_from_the_command_line(dirs, capsys, monkeypatch):
    monkeypatch.setattr(pipelines.options, "available_memory", lambda device: 8 * GIB)
    message = run_cli([str(dirs["text"]), PROMPT, "-n", str(10**9), "--device", "cpu"], capsys, loaded=True)
    assert "-n: num_images_per_prompt=1000000000: " in message and "make at most" in message


def test_disk_full_while_writing_the_grid(dirs, tmp_path, capsys, monkeypatch):
    """ENOSPC, simulated where the kernel reports it (the flush to disk): one error line with the space
    needed, no partial file, and the grid an earlier run wrote is still there."""
    out = tmp_path / "grid.png"
    Image.new("RGB", (4, 4), "red").save(out)
    before = snapshot(tmp_path)

    def full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(generate.os, "fsync", full)
    message = run_cli([str(dirs["text"]), PROMPT, "-n", "2", "--steps", "2", "--device", "cpu", "-o", str(out)],
                      capsys, loaded=True)
    assert f"-o {out}: the disk is full: the grid needs " in message and " bytes and " in message
    assert "free some space or choose another -o (nothing was written)" in message
    assert snapshot(tmp_path) == before
