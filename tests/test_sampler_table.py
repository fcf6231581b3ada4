"""bench.sampler_table's rows, and bench.report rendering a saved table (stubbed scores: no model runs)."""
from __future__ import annotations

import json

from bench import report, sampler_table


def fake_score(guidance: float, sampler: str, steps: int, spacing: str, prompts: int, samples: int) -> dict:
    accuracy = 1.0 if sampler == "ddpm" else min(1.0, steps / 20 + (0.1 if spacing == "karras" else 0.0))
    return {"run_dir": "runs/x", "guidance": guidance, "sampler": sampler, "steps": steps, "sigma_spacing": spacing,
            "accuracy": accuracy, "colour": 1.0, "shape": accuracy, "position": 1.0, "size": 1.0, "diversity": 0.1,
            "prompts": prompts, "samples_per_prompt": samples, "seconds": 1.0,
            "command": f"python -m diffusion.evaluate_shapes runs/x --sampler {sampler} --steps {steps}"}


def test_table_rows_and_the_report_section(tmp_path) -> None:
    result = sampler_table.table(fake_score, 4.0, prompts=4, samples=2, steps=(5, 10), ddpm_steps=100,
                                 samplers=("ddim", "unipc"), spacings=("default", "karras"))
    rows = [(r["sampler"], r["sigma_spacing"], r["steps"]) for r in result["results"]]
    assert rows == [("ddim", "default", 5), ("ddim", "default", 10), ("unipc", "default", 5),
                    ("unipc", "default", 10), ("unipc", "karras", 5), ("unipc", "karras", 10)]  # no DDIM spacing
    assert result["reference"]["steps"] == 100 and result["guidance"] == 4.0
    (tmp_path / "sampler_table.json").write_text(json.dumps(
        {**result, "why": "the best of a sweep", "command": "python -m bench.sampler_table runs/x"}))
    args = ["--out", str(tmp_path), "--sections", "samplers", "--diffusion-run", str(tmp_path / "missing")]
    assert report.main(args) == 0
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "measured apart by `python -m bench.sampler_table runs/x`" in text
    assert "| unipc | karras | 35.0 % (-65.0) | 60.0 % (-40.0) |" in text
    assert "| ddpm | 100 | 100.0 % |" in text and (tmp_path / "sampler_steps.png").is_file()
