"""No code runs from a file latentgen reads: every reader in the library is a data-only one.

A source scan (the runtime checks, a payload planted in each kind of checkpoint file, are in
test_bad_resumes.py): torch.load only with weights_only=True, no pickle-family module, YAML only through
safe_load/safe_dump, no np.load(allow_pickle=True), no trust_remote_code=True, no eval/exec, and
accelerate's load_state only in common/resume.py, behind its pickle check.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from common.safe_pickle import check_checkpoint_pickles

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("autoencoder", "bench", "common", "diffusion", "pipelines", "prior")
PICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
YAML_SAFE = {"safe_load", "safe_dump", "YAMLError", "safe_load_all", "safe_dump_all"}


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _keyword(call: ast.Call, name: str) -> object:
    """The constant value of keyword ``name`` of ``call`` (None when absent or not a constant)."""
    found = [k.value for k in call.keywords if k.arg == name]
    return found[0].value if found and isinstance(found[0], ast.Constant) else None


def _problems(path: Path, root: Path = ROOT) -> list[str]:
    """Each unsafe reader in ``path`` as 'file:line: what' (``file`` relative to ``root``)."""
    where = path.relative_to(root).as_posix()
    problems = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"{where}:{node.lineno}: imports {n}" for n in names if n and n.split(".")[0] in PICKLERS]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "yaml" \
                and node.attr not in YAML_SAFE:
            problems.append(f"{where}:{node.lineno}: yaml.{node.attr} (only safe_load/safe_dump)")
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        owner = getattr(getattr(node.func, "value", None), "id", "")
        if owner == "torch" and name == "load" and _keyword(node, "weights_only") is not True:
            problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
        if name == "load" and owner in ("np", "numpy") and _keyword(node, "allow_pickle") is not False \
                and any(k.arg == "allow_pickle" for k in node.keywords):
            problems.append(f"{where}:{node.lineno}: np.load(allow_pickle=...)")
        if _keyword(node, "trust_remote_code") is True:
            problems.append(f"{where}:{node.lineno}: trust_remote_code=True")
        if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
            problems.append(f"{where}:{node.lineno}: {name}()")
        if name in ("load_state", "load_custom_state", "load_accelerator_state") and where != "common/resume.py":
            problems.append(f"{where}:{node.lineno}: accelerate {name} outside common/resume.py's checked path")
    return problems


def test_every_reader_in_the_library_is_data_only():
    problems = [problem for path in _sources() for problem in _problems(path)]
    assert not problems, "readers that could run code from a file:\n" + "\n".join(problems)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scan is not vacuous: each pattern it refuses is found in a planted file."""
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport yaml\nimport torch\ntorch.load('x')\nyaml.load('x')\neval('1')\n"
                   "AutoModel.from_pretrained('x', trust_remote_code=True)\naccelerator.load_state('x')\n")
    found = "\n".join(_problems(bad, tmp_path))
    for word in ("imports pickle", "torch.load without", "yaml.load", "eval()", "trust_remote_code", "load_state"):
        assert word in found, f"{word!r} not found in:\n{found}"


def test_rng_states_as_accelerate_writes_them_pass_the_check(tmp_path):
    """The allow-list holds what a real checkpoint's RNG states need (numpy's state pickles numpy globals)."""
    import random

    from accelerate.utils import save

    states = {"step": 0, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
              "torch_manual_seed": torch.get_rng_state()}
    save(states, tmp_path / "random_states_0.pkl", safe_serialization=False)
    check_checkpoint_pickles(tmp_path)


@pytest.mark.parametrize("state", [{"lr": [0.1]}, np.arange(3, dtype=np.uint32)])
def test_plain_data_passes_the_check(state, tmp_path):
    torch.save(state, tmp_path / "custom_checkpoint_0.pkl")
    check_checkpoint_pickles(tmp_path)
