"""What a result was produced with: versions, build and machine, and guards for newer torch APIs.

``environment_record()`` is written beside every run (``environment.json``) and into the benchmark
report, so that a number can be traced to the torch, transformers, diffusers, ... that produced it.
``accelerator_available()`` is ``torch.accelerator.is_available()`` on torch versions that have it
(2.6 and newer) and the CUDA / MPS / XPU checks on older ones.
"""
from __future__ import annotations

import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"

# Distribution names whose versions change results or speed: the runtime dependencies, the peers the
# benchmarks measure against, and what they pull in that does numerical work.
PACKAGES = ("torchvision", "accelerate", "transformers", "tokenizers", "huggingface-hub", "safetensors", "numpy",
            "pillow", "lpips", "diffusers", "taming-transformers")


def accelerator_available() -> bool:
    """Whether torch sees a GPU-like accelerator (CUDA, ROCm, MPS, XPU, ...), on any supported torch."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return accelerator_type() is not None


def accelerator_type() -> str | None:
    """The accelerator's device type ("cuda", "mps", "xpu", ...), or None on a CPU-only machine."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "current_accelerator"):
        # current_accelerator() names the build's accelerator even where no device is present (a CUDA wheel
        # on a CPU machine), so ask is_available() first.
        if not accelerator.is_available():
            return None
        device = accelerator.current_accelerator()
        return None if device is None else device.type
    if torch.cuda.is_available():  # ROCm builds answer here too
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "xpu"
    return None


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), or what ``platform`` knows elsewhere."""
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def torch_build() -> dict[str, Any]:
    """How the installed torch was built (CUDA / ROCm version, cuDNN) and which accelerator it sees."""
    kind = accelerator_type()
    build = {"cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             "accelerator": kind, "devices": []}
    if kind == "cuda":
        build["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return build


def latentgen_version() -> str | None:
    """The installed latentgen's version; from setup.cfg in a checkout that is not installed."""
    version = package_version("latentgen")
    if version is None and (REPO / "setup.cfg").is_file():
        match = re.search(r"^version\s*=\s*(\S+)", (REPO / "setup.cfg").read_text(), re.MULTILINE)
        version = match.group(1) if match else None
    return version


def git_revision() -> dict[str, Any] | None:
    """The checkout's commit and whether tracked files have uncommitted changes; None outside a git checkout."""
    if not (REPO / ".git").exists():
        return None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def read_constraints(path: Path | None = None) -> dict[str, str]:
    """``{normalised name: version}`` for the ``name==version`` lines of a pip constraints file."""
    return read_constraints_text((path or CONSTRAINTS).read_text())


def read_constraints_text(text: str) -> dict[str, str]:
    """``{normalised name: version}`` for the ``name==version`` lines of constraints (markers ignored)."""
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if match:
            pins[normalise(match.group(1))] = match.group(2)
    return pins


def normalise(name: str) -> str:
    """A distribution name in PEP 503 form (``Pillow`` and ``huggingface_hub`` as pip compares them)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def off_constraints(path: Path | None = None) -> dict[str, dict[str, str]] | None:
    """Installed packages whose version differs from the pin in ``constraints.txt`` (None without the file).

    Empty after ``make install``; not empty after an install that opted out (``make install CONSTRAINTS=``)
    or where the pins could not apply."""
    path = path or CONSTRAINTS
    if not path.is_file():
        return None
    differ = {}
    for name, pinned in read_constraints(path).items():
        installed = package_version(name)
        if installed is not None and installed.split("+")[0] != pinned.split("+")[0]:
            differ[name] = {"installed": installed, "pinned": pinned}
    return differ


def environment_record() -> dict[str, Any]:
    """The versions and machine behind a result, as a JSON-ready dict (see ``environment.json`` in a run)."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "torch_build": torch_build(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "latentgen": latentgen_version(),
        "git": git_revision(),
        "off_constraints": off_constraints(),
    }


def versions_line(record: dict[str, Any]) -> str:
    """One line for a report: ``torch 2.14.1+cu130 (CUDA 13.0), torchvision 0.29.1, ...`` (installed ones only)."""
    build = record["torch_build"]
    runtime = f"CUDA {build['cuda']}" if build["cuda"] else f"ROCm {build['hip']}" if build["hip"] else "CPU build"
    parts = [f"torch {record['torch']} ({runtime})"]
    parts += [f"{name} {version}" for name, version in record["packages"].items() if version]
    return ", ".join(parts)


def constraints_text(freeze: list[str]) -> str:
    """constraints.txt from the ``pip freeze`` lines of a fresh install (see ``make constraints``).

    Every pin carries the marker ``python_version >= "3.X"`` of the Python that resolved it: newer Pythons
    get the same wheels, older ones (whose Requires-Python many of these releases exclude) fall back to
    setup.cfg's bounds instead of failing to install."""
    marker = f'python_version >= "{sys.version_info.major}.{sys.version_info.minor}"'
    pins = sorted((line.strip() for line in freeze if "==" in line and not line.startswith(("#", "-e "))
                   and normalise(line.split("==")[0]) != "latentgen"), key=str.lower)
    width = max(len(pin) for pin in pins)
    today, python = time.strftime("%Y-%m-%d"), platform.python_version()
    system = f"{platform.system()} {platform.machine()}"
    header = f"""\
# The tested versions of everything `make install` installs: pip applies them with
# `pip install -c constraints.txt`, so every machine gets the same torch, transformers, diffusers, ...
#
# Produced by `make constraints` on {today}: a fresh venv with CPython {python} on {system},
# `pip install -e '.[dev]'` with no constraints (the newest releases that setup.cfg's bounds and pip's own
# configuration allow), then `pip freeze --all --exclude-editable`. Regenerate: `make constraints`, run
# `make test`, commit the file. Opt out: `make install CONSTRAINTS=` (or `export CONSTRAINTS=`) in a fresh
# checkout or after `rm -rf .venv`; pip then resolves within setup.cfg's bounds on its own.
#
# The pins are those of a {system} install; a package that another platform does not need
# (nvidia-*, triton, cuda-*) is simply not installed there, and a constraint on it has no effect.
# Each pin applies from Python {sys.version_info.major}.{sys.version_info.minor} up ({marker}): older Pythons \
cannot install
# several of these releases (their Requires-Python excludes them), so there pip resolves within
# setup.cfg's bounds.
"""
    return header + "".join(f"{pin:<{width}} ; {marker}\n" for pin in pins)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Print the environment record (JSON), or constraints.txt.")
    parser.add_argument("--constraints", action="store_true",
                        help="print constraints.txt for this interpreter's installed packages (pip freeze)")
    args = parser.parse_args(argv)
    if args.constraints:
        freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                                capture_output=True, text=True, check=True).stdout.splitlines()
        print(constraints_text(freeze), end="")
    else:
        print(json.dumps(environment_record(), indent=2))


if __name__ == "__main__":  # python -m common.environment [--constraints]
    main()
