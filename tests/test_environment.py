"""common.environment: the version record, the torch.accelerator guard, and constraints.txt against setup.cfg."""
from __future__ import annotations

import configparser
import json
import types
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from common import environment

REPO = Path(__file__).resolve().parents[1]


def setup_cfg_requirements(section: str, key: str) -> list[Requirement]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return [Requirement(line) for line in parser[section][key].splitlines() if line.strip()]


RUNTIME = setup_cfg_requirements("options", "install_requires")
DEV = setup_cfg_requirements("options.extras_require", "dev")


def test_environment_record_has_the_versions_and_is_json():
    record = environment.environment_record()
    for key in ("python", "platform", "cpu", "torch", "torch_build", "packages", "latentgen", "git"):
        assert key in record
    assert record["torch"] == torch.__version__
    assert record["torch_build"]["cuda"] == torch.version.cuda
    for name in ("torchvision", "accelerate", "transformers", "numpy", "safetensors", "diffusers"):
        assert name in record["packages"]
    import numpy
    import torchvision
    assert record["packages"]["torchvision"].split("+")[0] == torchvision.__version__.split("+")[0]
    assert record["packages"]["numpy"] == numpy.__version__
    assert record["latentgen"] == "0.1.0" or record["latentgen"]
    assert json.loads(json.dumps(record)) == record  # what a run writes to environment.json
    line = environment.versions_line(record)
    assert line.startswith(f"torch {torch.__version__} (") and f"numpy {numpy.__version__}" in line


def test_record_outside_a_git_checkout(monkeypatch, tmp_path):
    monkeypatch.setattr(environment, "REPO", tmp_path)
    monkeypatch.setattr(environment, "CONSTRAINTS", tmp_path / "constraints.txt")
    record = environment.environment_record()
    assert record["git"] is None and record["off_constraints"] is None and record["torch"] == torch.__version__


def test_accelerator_guard_without_torch_accelerator(monkeypatch):
    """torch < 2.6 has no torch.accelerator: the guard falls back to the CUDA / MPS / XPU checks."""
    monkeypatch.delattr(torch, "accelerator", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert environment.accelerator_available() is False and environment.accelerator_type() is None
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert environment.accelerator_available() is True and environment.accelerator_type() == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert environment.accelerator_type() == "cuda"


def test_accelerator_guard_uses_torch_accelerator_where_present(monkeypatch):
    fake = types.SimpleNamespace(is_available=lambda: True, current_accelerator=lambda: torch.device("xpu"))
    monkeypatch.setattr(torch, "accelerator", fake, raising=False)
    assert environment.accelerator_available() is True and environment.accelerator_type() == "xpu"
    monkeypatch.setattr(torch, "accelerator", types.SimpleNamespace(
        is_available=lambda: False, current_accelerator=lambda: torch.device("cuda")), raising=False)
    assert environment.accelerator_available() is False and environment.accelerator_type() is None


@pytest.mark.parametrize("requirement", RUNTIME + DEV, ids=str)
def test_constraints_pin_every_requirement_within_setup_cfg_bounds(requirement):
    """constraints.txt and setup.cfg cannot drift apart: every dependency is pinned, inside its bounds."""
    pins = environment.read_constraints(REPO / "constraints.txt")
    name = environment.normalise(requirement.name)
    assert name in pins, f"constraints.txt pins no {requirement.name}: run `make constraints`"
    assert requirement.specifier, f"setup.cfg gives {requirement.name} no version bounds"
    assert requirement.specifier.contains(Version(pins[name]), prereleases=True), (
        f"constraints.txt pins {requirement.name}=={pins[name]}, outside setup.cfg's {requirement}")


def test_runtime_requirements_have_lower_and_upper_bounds():
    for requirement in RUNTIME + DEV:
        operators = {spec.operator for spec in requirement.specifier}
        assert operators & {">=", "==", "~="} and operators & {"<", "==", "~="}, (
            f"setup.cfg: {requirement} needs a tested lower and upper bound")


def test_constraints_file_parses_as_requirements():
    lines = [line for line in (REPO / "constraints.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) == len(environment.read_constraints(REPO / "constraints.txt"))
    for line in lines:
        requirement = Requirement(line)  # name==version ; marker: what pip reads
        assert [spec.operator for spec in requirement.specifier] == ["=="], line
        assert "latentgen" != environment.normalise(requirement.name)


def test_constraints_text_marks_pins_with_the_python_version():
    text = environment.constraints_text(["torch==2.14.1", "latentgen==0.1.0", "Pillow==13.0.0", "# comment"])
    pins = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(pins) == 2 and pins[0].startswith("Pillow==13.0.0") and "latentgen" not in text
    assert all(Requirement(pin).marker.evaluate() for pin in pins)  # this Python is the one that resolved them
    assert environment.read_constraints_text(text) == {"pillow": "13.0.0", "torch": "2.14.1"}
