"""Markdown pieces shared by ``bench.report`` and its sections that render results measured apart."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows] + [""]


def seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def code(command: str) -> str:
    return f"`{command}`"


def measured_apart(report: Any, title: str, path: Path, command: str) -> dict | None:
    """Start the section ``title`` of ``report`` (a :class:`bench.report.Report`) and read its JSON from ``path``.

    Long measurements (many minutes of training on a quiet machine) run apart from the report and leave a
    JSON file; a missing file gives a "not run" line naming ``command``, which writes it. Returns the result,
    or None (missing, or unreadable: the report notes the failure).
    """
    report.lines += [f"## {title}", ""]
    if not path.is_file():
        report.lines += [f"_Not run: `{path}` missing; measure it with `{command.format(path)}` on a quiet machine._",
                         ""]
        return None
    return report.attempt(title.lower(), lambda: json.loads(path.read_text()))


def splice(document: str, sections: list[list[str]], note: str) -> str:
    """``document`` (a generated BENCHMARKS.md) with each of ``sections`` (markdown lines starting ``## Title``) in
    place of its same-titled section, or appended where it had none, and ``note`` added to the header list."""
    blocks: list[list[str]] = [[]]
    for line in document.rstrip("\n").split("\n"):
        if line.startswith("## "):
            blocks.append([])
        blocks[-1].append(line)
    titles = [block[0] for block in blocks[1:]]
    tail = [blocks.pop()] if titles and titles[-1] == "## Failures" else []
    for lines in sections:
        at = next((i for i, block in enumerate(blocks) if i and block[0] == lines[0]), None)
        if at is None:
            blocks.append(lines)
        else:
            blocks[at] = lines
    head = blocks[0]
    last_item = max((i for i, line in enumerate(head) if line.startswith("- **")), default=len(head) - 1)
    blocks[0] = head[:last_item + 1] + [note] + head[last_item + 1:]
    return "\n".join(line for block in blocks + tail for line in block).rstrip("\n") + "\n"
