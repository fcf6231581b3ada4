"""How ``python -m pipelines.generate`` writes its grid and ends on errors met while generating; the refusals
of bad ``-o`` paths, devices and sizes are catalogued in test_bad_generation_sizes.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines import TextToImage, generate
from tiny import build_pipelines

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["a dog", "-n", "2", "--steps", "2", "--seed", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return build_pipelines(tmp_path_factory.mktemp("cli_errors"))


def test_the_grid_is_renamed_into_place_in_folders_made_for_it(dirs, tmp_path):
    out = tmp_path / "new" / "deeper" / "grid.png"
    generate.main([str(dirs["text"]), *COMMON, "-o", str(out)])
    first = Image.open(out).copy()
    Image.new("RGB", (4, 4), "red").save(out)  # an earlier file is replaced, whole
    generate.main([str(dirs["text"]), *COMMON, "-o", str(out)])
    assert Image.open(out).tobytes() == first.tobytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid.png"], "no partial file is left behind"


def test_running_out_of_memory_while_generating_is_one_error_line(dirs, tmp_path, capsys, monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TextToImage, "__call__", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        generate.main([str(dirs["text"]), *COMMON, "-o", str(tmp_path / "grid.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "error: out of memory on cpu while generating; lower --chunk-size (images made at once), or --height/--width")
    assert not list(tmp_path.iterdir())
