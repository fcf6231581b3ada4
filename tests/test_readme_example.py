"""The README's "## Python API" example really runs, on tiny random pipelines in place of trained runs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tiny import build_pipelines

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
README = Path(__file__).resolve().parents[1] / "README.md"
RUNS = {"runs/emoji32_diffusion": "text", "runs/emoji32_quick_prior": "prior"}


def python_api_example() -> str:
    """The first ```python block of the README's "## Python API" section."""
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "the Python API section has no python example"
    return blocks[0]


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    code = python_api_example()
    assert all(run in code for run in RUNS), "the example no longer loads the runs this test substitutes"
    dirs = build_pipelines(tmp_path / "runs")
    for run, name in RUNS.items():
        code = code.replace(f'"{run}"', repr(str(dirs[name])))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "dog.png").is_file()
    assert len(namespace["result"].images) == 4 and len(namespace["tokens_result"].images) == 4
    assert tuple(namespace["batch"].shape) == (1, 3, 16, 16)
    assert namespace["filled"].size == namespace["variation"].size == namespace["token_filled"].size == (16, 16)
    assert type(namespace["same"]).__name__ == "TextToImage"
