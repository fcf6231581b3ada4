"""bench.report assembles BENCHMARKS.md and its PNGs from (here: stubbed) measurements and run dirs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import measure, report


def shapes_result(guidance: float, accuracy: float, sampler: str = "dpmpp_2m", steps: int = 20) -> dict:
    return {"guidance": guidance, "accuracy": accuracy, "colour": 1.0, "shape": accuracy, "position": 1.0,
            "size": 1.0, "diversity": 0.3 - accuracy / 10, "prompts": 4, "samples_per_prompt": 2, "seconds": 0.8,
            "sampler": sampler, "steps": steps, "command": f"python -m diffusion.evaluate_shapes --steps {steps}"}


def autoencoder_scores(steps: int, psnr: float) -> dict:
    return {"parameters": 2_800_000, "steps": steps, "train_seconds": 30.0, "images": 147, "psnr": psnr, "ssim": 0.5,
            "lpips": None, "codebook_used": 0.9, "perplexity": 500.0, "codebook_size": 1024}


STUBS = {
    "autoencoder_vs_taming": lambda ctx: {
        "resolution": 32, "batch": 2, "repeats": 3, "warmup": 1, "command": "python -m bench.autoencoder_vs_taming",
        "median_seconds": {"ours fp32": 0.1, "taming fp32": 0.2, "ours bf16 autocast": 0.1,
                           "taming bf16 autocast": 0.3}},
    "unet_vs_diffusers": lambda ctx: {
        "batch": 4, "channels": 4, "size": 8, "repeats": 3, "warmup": 1, "command": "python -m bench.unet_vs_diffusers",
        "workloads": {"train fp32": {"ours_median": 0.05, "diffusers_median": 0.1, "speedup": 2.0},
                      "infer fp32": {"ours_median": 0.02, "diffusers_median": 0.03, "speedup": 1.5}}},
    "prior_sampling": lambda ctx: {
        "settings": {"tokens": 64, "batch": 2, "layers": 2, "width": 128, "repeats": 3, "warmup": 1,
                     "maskgit_steps": 4},
        "median_seconds": {"cached": 0.1, "taming": 1.2, "maskgit": 0.01}, "ratio_taming_over_cached": 12.0,
        "ratio_cached_over_maskgit": 10.0, "ratio_taming_over_maskgit": 120.0,
        "command": "python -m bench.prior_sampling"},
    "latent_caching": lambda ctx: {
        "batch_size": 16, "steps_per_run": 2, "cached_samples_per_s": 300.0, "on_the_fly_samples_per_s": 60.0,
        "speedup": 5.0, "repeats": 3, "cache_build_seconds": 1.0, "cache_items": 128,
        "command": "python -m bench.latent_caching"},
    "guidance_sweep": lambda ctx, kind, path: {
        "command": f"python -m {kind}.evaluate_shapes {path}",
        "results": [shapes_result(0.0, 0.25), shapes_result(2.0, 0.75), shapes_result(4.0, 0.75)]},
    "sampler_steps": lambda ctx, path, guidance: {
        "results": [shapes_result(guidance, a, steps=s) for s, a in ((5, 0.5), (10, 0.75), (20, 0.875))],
        "reference": shapes_result(guidance, 0.875, "ddpm", 100)},
    "autoencoder_quality": lambda ctx, path: {
        "data": "emoji", "split": "heldout", "resolution": 32, "command": "python -m bench.vqmodel_equal_time",
        "ours": autoencoder_scores(2350, 23.7),
        "vqmodel": {**autoencoder_scores(2000, 15.0),
                    "curve": [{"step": 1, "seconds": 1.0, "loss": 1.0, "rec": 0.9},
                              {"step": 50, "seconds": 20.0, "loss": 0.5, "rec": 0.4}]}},
    "distribution_scores": lambda ctx, path: {
        "command": f"python -m bench.distribution_scores {path}",
        "scores": {"swd": {"score": 120.0, "counts": [32, 32]}}, "baseline": {"scores": {"swd": {"score": 30.0}}},
        "stage1_floor": {"scores": {"swd": {"score": 125.0}}},
        "within_stage1": {"scores": {"swd": {"score": 60.0}}, "floor": {"swd": {"score": 20.0}}}},
}


def make_run(path: Path, pipeline: bool = False, autoencoder: bool = False) -> str:
    path.mkdir(parents=True)
    lines = [{"step": step, "loss": 1.0 / step, "total": 2.0 / step, "rec": 1.5 / step, "seconds": step * 0.5}
             for step in (1, 50, 100)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if pipeline:
        (path / "pipeline").mkdir()
        (path / "pipeline" / "pipeline.json").write_text("{}")
    if autoencoder:
        (path / "config.yaml").write_text("{}\n")
        (path / "autoencoder").mkdir()
        (path / "autoencoder" / "config.json").write_text("{}")
    return str(path)


@pytest.fixture
def runs(tmp_path, monkeypatch) -> list[str]:
    for name, stub in STUBS.items():
        monkeypatch.setattr(measure, name, stub)
    return ["--diffusion-run", make_run(tmp_path / "diffusion", pipeline=True),
            "--autoencoder-run", make_run(tmp_path / "ae", autoencoder=True),
            "--prior-run", str(tmp_path / "no_prior"), "--maskgit-run", make_run(tmp_path / "maskgit", pipeline=True),
            "--emoji-runs", f"diffusion={tmp_path / 'diffusion'},MaskGIT={tmp_path / 'no_emoji_maskgit'}"]


def test_quick_report_has_every_section_and_figure(runs, tmp_path):
    out = tmp_path / "docs"
    assert report.main(["--quick", "--out", str(out), *runs]) == 0
    text = (out / "BENCHMARKS.md").read_text()
    for heading in ("# Benchmarks", "## Speed against the peers", "## Sampler steps vs quality",
                    "## Autoencoder quality vs diffusers VQModel at equal wall time",
                    "## Shapes prompt accuracy per generator", "## Training curves", "**Machine:**", "**Command:**",
                    "## Emoji distribution scores", "### MaskGIT: "):
        assert heading in text
    assert "python -m bench.report --quick" in text and "--quick**: smoke-test" in text
    assert "| VQ-GAN vs taming-transformers | training step fp32" in text and "2.00x" in text
    assert "12.00x" in text and "5.00x" in text  # prior sampling and latent caching ratios
    assert "guidance 2.0 (the sweep's best)" in text  # ties go to the more diverse setting
    # one table for every generator on the shapes stage 1, with the training each run logged
    assert "| MaskGIT | 100 steps in 0.8 min | 2.0 | 75.0 % |" in text
    scores = "| 100 steps in 0.8 min | 120.0 | 30.0 | 125.0 | 60.0 (20.0) | 32 |"
    assert f"| diffusion | `{tmp_path / 'diffusion'}` {scores}" in text
    assert f"`{tmp_path / 'no_emoji_maskgit'}` missing; train it with `make demo`" in text
    assert f"Not run: `{tmp_path / 'no_prior'}` missing; train it with `accelerate launch autoencoder/train.py" in text
    prior_command = "accelerate launch prior/train.py configs/prior/shapes32_quick.yaml run.out_dir="
    assert f"`{prior_command}{tmp_path / 'no_prior'}`" in text
    for figure in ("guidance_sweep.png", "sampler_steps.png", "training_curves.png", "autoencoder_equal_time.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({figure})" in text
    raw = json.loads((out / "benchmarks.json").read_text())
    assert raw["machine"]["torch"] and raw["results"]["latent caching"]["speedup"] == 5.0
    # the package versions behind the numbers, in the markdown header and the JSON
    import numpy
    import torch
    versions = next(line for line in text.splitlines() if line.startswith("- **Versions:**"))
    assert f"torch {torch.__version__} (" in versions and f"numpy {numpy.__version__}" in versions
    assert "transformers " in versions and "accelerate " in versions and "latentgen 0.1.0" in versions
    assert raw["environment"]["torch"] == torch.__version__
    assert raw["environment"]["packages"]["numpy"] == numpy.__version__
    assert not list(out.glob(".*partial"))


def test_a_failing_measurement_is_reported_not_fatal(runs, tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("taming is not installed")

    monkeypatch.setattr(measure, "autoencoder_vs_taming", broken)
    out = tmp_path / "docs"
    assert report.main(["--quick", "--out", str(out), "--sections", "speed,curves", *runs]) == 1
    text = (out / "BENCHMARKS.md").read_text()
    assert "**autoencoder vs taming failed:** `RuntimeError: taming is not installed`" in text
    assert "## Failures" in text and "U-Net vs diffusers" in text and "## Training curves" in text
    assert "## Sampler steps" not in text


def growth_row(source: str, items: int, rss: float) -> dict:
    return {"source": source, "items": items, "first_index_s": items / 5e4, "startup_s": items / 1e5,
            "cache_build_s": items / 1e3, "build_peak_rss_mb": 900.0, "startup_with_cache_s": items / 9e4,
            "train_peak_rss_mb": rss, "cache_mb": items / 100, "index_mb": items / 1e4,
            "image_samples_per_s": 1500.0, "cache_samples_per_s": 30000.0, "encode_ms_per_caption": 0.5,
            "read_ms_per_caption": 0.002}


def test_data_growth_section_renders_the_json_of_bench_data_growth(runs, tmp_path, monkeypatch):
    from bench.data_growth import goals

    monkeypatch.setattr(measure, "other_busy_cores", lambda seconds=2.0: 0.0)  # not under test: 2 s per call

    rows = [growth_row(s, n, rss) for s in ("folder", "webdataset") for n, rss in ((1_000, 500.0), (10_000, 510.0),
                                                                                 (100_000, 520.0 if s == "folder"
                                                                                  else 700.0))]
    path = tmp_path / "growth.json"
    path.write_text(json.dumps({"command": "python -m bench.data_growth --sizes 1000 10000 100000", "device": "cuda",
                                "text": "bundled", "resolution": 32, "batch_size": 64, "rows": rows,
                                "goals": goals(rows)}))
    out = tmp_path / "docs"
    assert report.main(["--quick", "--out", str(out), "--sections", "growth", "--data-growth", str(path), *runs]) == 0
    text = (out / "BENCHMARKS.md").read_text()
    assert "## Data growth" in text and "`python -m bench.data_growth --sizes 1000 10000 100000`" in text
    assert "| folder | 100,000 | 2.00 s | 1.00 s | 100.00 s | 1.11 s | 520 MB | 900 MB | 1000.0 MB |" in text
    assert "- **folder:** start-up at 100,000 images 1.00 s (goal < 5 s: met); peak RSS 2.0 % from 10,000" in text
    assert "- **webdataset:**" in text and "37.3 % from 10,000 images (goal within 20.0 %: missed)" in text
    assert (out / "data_growth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](data_growth.png)" in text
    missing = tmp_path / "none.json"
    assert report.main(["--quick", "--out", str(out), "--sections", "growth", "--data-growth", str(missing),
                        *runs]) == 0
    assert f"_Not run: `{missing}` missing; measure it with `python -m bench.data_growth" in (
        out / "BENCHMARKS.md").read_text()


def test_update_splices_sections_measured_apart_into_the_existing_document(runs, tmp_path, monkeypatch):
    from bench.markdown import splice

    document = "\n".join(["# Benchmarks", "", "- **Command:** `x`", "- **Machine:** m", "", "## Speed", "", "fast", "",
                          "## Data growth", "", "old growth", "", "## Failures", "", "- one", ""])
    growth = ["## Data growth", "", "new growth", ""]
    ttq = ["## Diffusion time to quality", "", "4x", ""]
    text = splice(document, [growth, ttq], "- **Updated:** growth")
    assert text.split("\n") == ["# Benchmarks", "", "- **Command:** `x`", "- **Machine:** m", "- **Updated:** growth",
                                "", "## Speed", "", "fast", "", "## Data growth", "", "new growth", "",
                                "## Diffusion time to quality", "", "4x", "", "## Failures", "", "- one", ""]
    monkeypatch.setattr(measure, "other_busy_cores", lambda seconds=2.0: 0.0)
    out = tmp_path / "docs"
    out.mkdir()
    with pytest.raises(SystemExit):  # nothing to update yet
        report.parse_args(["--out", str(out), "--sections", "growth", "--update"])
    (out / "BENCHMARKS.md").write_text(document)
    with pytest.raises(SystemExit):  # a section measured by the report itself cannot be spliced in
        report.parse_args(["--out", str(out), "--sections", "speed", "--update"])
    with pytest.raises(SystemExit):  # the sampler table only when it was measured apart
        report.parse_args(["--out", str(out), "--sections", "samplers", "--update"])
    (out / "sampler_table.json").write_text("{}")
    assert report.parse_args(["--out", str(out), "--sections", "samplers,growth", "--update"]).update
    missing = tmp_path / "none.json"
    assert report.main(["--out", str(out), "--sections", "growth", "--update", "--data-growth", str(missing)]) == 0
    text = (out / "BENCHMARKS.md").read_text()
    assert "## Speed\n\nfast" in text and "old growth" not in text and f"_Not run: `{missing}` missing" in text
    assert "- **Updated:** growth by `python -m bench.report" in text and "- one" in text
