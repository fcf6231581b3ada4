"""precision: auto on each kind of machine (faked), explicit choices, the probe cache, the run record,
and the time-budget progress bar."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from common import precision
from common.precision import PrecisionError, resolve_precision
from common.progress import TrainingProgress

SAPPHIRE_RAPIDS = ("Intel(R) Xeon(R) Platinum 8480+", ("avx512_bf16", "amx_bf16"))
SKYLAKE = ("Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz", ())  # AVX-512, but no AVX512_BF16 / AMX


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """Pretend to be a CPU with the given model/flags whose bf16 probe measures ``speedup``; counts probes."""
    monkeypatch.setenv("LATENTGEN_CACHE_DIR", str(tmp_path))
    probes = []

    def install(description, speedup):
        monkeypatch.setattr(precision, "cpu_description", lambda: description)
        monkeypatch.setattr(precision, "measure_cpu_bf16_speedup", lambda: probes.append(1) or speedup)
        precision.clear_cache()
        return probes

    yield install
    precision.clear_cache()


def test_auto_picks_bf16_on_a_cpu_with_native_bf16_that_measures_faster(fake_cpu):
    fake_cpu(SAPPHIRE_RAPIDS, speedup=2.6)
    choice = resolve_precision("auto", "cpu")
    assert choice.precision == "bf16" and choice.accelerate_name == "bf16" and choice.autocast_dtype == torch.bfloat16
    assert "avx512_bf16" in choice.reason and "2.60x" in choice.reason


def test_auto_picks_fp32_on_a_cpu_that_emulates_bf16_without_probing(fake_cpu):
    probes = fake_cpu(SKYLAKE, speedup=0.2)
    choice = resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and choice.accelerate_name == "no" and choice.autocast_dtype is None
    assert "no native bf16" in choice.reason and probes == []


def test_auto_keeps_fp32_when_the_flags_promise_bf16_but_the_probe_disagrees(fake_cpu):
    fake_cpu(SAPPHIRE_RAPIDS, speedup=0.9)
    assert resolve_precision("auto", "cpu").precision == "fp32"


def test_the_probe_is_cached_on_disk_per_cpu_and_torch_version(fake_cpu, tmp_path):
    probes = fake_cpu(SAPPHIRE_RAPIDS, speedup=2.0)
    resolve_precision("auto", "cpu")
    precision.clear_cache()  # a new process: only the disk cache is left
    resolve_precision("auto", "cpu")
    assert len(probes) == 1
    (key, value), = json.loads((tmp_path / "precision_probe.json").read_text()).items()
    assert SAPPHIRE_RAPIDS[0] in key and torch.__version__ in key and value == 2.0


def test_a_capped_onednn_is_probed_apart_from_the_same_cpu_uncapped(fake_cpu, monkeypatch):
    # ONEDNN_MAX_CPU_ISA=AVX512_CORE makes oneDNN emulate bf16 on a CPU with AVX512_BF16 (measured here:
    # the probe 1.5x uncapped, 0.5x capped), so the cached uncapped reading must not decide for it.
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    probes = fake_cpu(SAPPHIRE_RAPIDS, speedup=2.0)
    assert resolve_precision("auto", "cpu").precision == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    monkeypatch.setattr(precision, "measure_cpu_bf16_speedup", lambda: probes.append(1) or 0.5)
    precision.clear_cache()
    choice = resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and "0.50x" in choice.reason and len(probes) == 2


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_devices_with_and_without_bf16(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100" if not bf16_supported else "A100")
    precision.clear_cache()
    try:
        choice = resolve_precision("auto", "cuda")
    finally:
        precision.clear_cache()
    assert choice.precision == expected and choice.accelerate_name == expected


def test_explicit_choices_are_obeyed_with_a_warning_for_emulated_bf16(fake_cpu):
    fake_cpu(SKYLAKE, speedup=0.2)
    with pytest.warns(RuntimeWarning, match="emulated"):
        assert resolve_precision("bf16", "cpu").precision == "bf16"
    assert resolve_precision("no", "cpu").precision == "fp32"  # accelerate's name for fp32
    assert resolve_precision("fp32", "cpu").reason == "requested explicitly"
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(PrecisionError, match="use one of auto, fp32, bf16, fp16"):
        resolve_precision("bf61", "cpu")


def test_the_real_probe_returns_a_positive_ratio_quickly():
    assert precision.measure_cpu_bf16_speedup() > 0


def test_a_pipelines_first_call_on_a_cold_cache_runs_the_real_probe(monkeypatch, tmp_path):
    """On a fresh machine with native bf16 flags, the first image resolves ``auto`` inside the pipeline's
    no_grad: the probe (a backward pass) must run there, and under a caller's inference_mode."""
    from pipelines import TextToImage
    from tiny import make_tiny_pipeline

    directory = make_tiny_pipeline(tmp_path).save_pretrained(tmp_path / "pipe")
    monkeypatch.setenv("LATENTGEN_CACHE_DIR", str(tmp_path / "cold"))
    monkeypatch.setattr(precision, "cpu_description", lambda: SAPPHIRE_RAPIDS)
    precision.clear_cache()
    try:
        with torch.inference_mode():
            image = TextToImage.from_pretrained(directory)("a dog", num_inference_steps=1, seed=0, output_type="pt",
                                                           progress=False).images
        assert torch.isfinite(image).all()
        assert len(json.loads((tmp_path / "cold" / "precision_probe.json").read_text())) == 1
    finally:
        precision.clear_cache()


def budget(steps, seconds, elapsed):
    return SimpleNamespace(steps=steps, seconds=seconds, elapsed=elapsed)


def test_progress_counts_towards_the_time_budget_when_it_ends_the_run_first():
    clock = budget(steps=100_000, seconds=420, elapsed=0.0)
    bar = TrainingProgress(clock, step=0, desc="autoencoder", enabled=False)
    clock.elapsed = 210.0
    bar.update(1000)  # 4.8 steps/s: 1,000 more steps in the 3.5 minutes left, far from 100,000
    assert bar.limit() == "time budget" and bar.fraction() == pytest.approx(0.5)
    status = bar.status()
    assert "3.5/7.0 min" in status and "step 1000/100000" in status and "3.5 min left (time budget)" in status
    assert bar.metrics()["budget_used"] == pytest.approx(0.5)
    clock.elapsed = 420.0
    assert "stopped by the time budget" in bar.summary()


def test_progress_counts_steps_when_the_step_cap_comes_first_and_rates_only_this_session():
    clock = budget(steps=200, seconds=600, elapsed=0.0)
    bar = TrainingProgress(clock, step=100, desc="diffusion", enabled=False)  # resumed at step 100
    clock.elapsed = 10.0
    bar.update(50)
    assert bar.rate == pytest.approx(5.0) and bar.limit() == "step cap"
    assert bar.fraction() == pytest.approx(0.75) and "0.2 min left (step cap)" in bar.status()
    bar.update(50)
    assert "stopped by the step cap" in bar.summary()


@pytest.mark.parametrize("requested, cpu, expected", [("auto", SKYLAKE, "fp32"), ("auto", SAPPHIRE_RAPIDS, "bf16"),
                                                      ("no", SAPPHIRE_RAPIDS, "fp32")])
def test_a_run_trains_in_the_chosen_precision_and_records_it(fake_cpu, tmp_path, requested, cpu, expected):
    from accelerate.state import AcceleratorState

    from common.training import OptimConfig, RunConfig, make_accelerator, resolved_config

    @dataclasses.dataclass(frozen=True)
    class Train:
        optim: OptimConfig
        run: RunConfig

    fake_cpu(cpu, speedup=2.0)
    run = RunConfig(out_dir=str(tmp_path / "run"), precision=requested, cpu_threads=1)
    try:
        accelerator = make_accelerator(run)
        assert accelerator.mixed_precision == {"fp32": "no"}.get(expected, expected)
        assert resolved_config(Train(OptimConfig(), run), accelerator).run.precision == expected
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no accelerate singleton behind
    record = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert record["precision"]["requested"] == precision.canonical(requested)
    assert record["precision"]["chosen"] == expected and record["torch"] == torch.__version__


def test_pipelines_sample_in_the_chosen_precision(fake_cpu, tmp_path):
    from pipelines import TextToImage
    from tiny import make_tiny_pipeline

    directory = make_tiny_pipeline(tmp_path).save_pretrained(tmp_path / "pipe")
    seen = []

    def spy(module, args, output):
        seen.append(output.dtype)

    def sample(pipe):
        seen.clear()
        handle = pipe.model.unet.register_forward_hook(spy)
        image = pipe("a dog", num_inference_steps=2, seed=0, output_type="pt", progress=False).images
        handle.remove()
        return set(seen), image

    fake_cpu(SAPPHIRE_RAPIDS, speedup=2.0)
    native = TextToImage.from_pretrained(directory)
    assert native.precision.precision == "bf16" and sample(native)[0] == {torch.bfloat16}
    forced = TextToImage.from_pretrained(directory, precision="fp32")
    dtypes, image = sample(forced)
    assert dtypes == {torch.float32} and image.dtype == torch.float32 and torch.isfinite(image).all()
    fake_cpu(SKYLAKE, speedup=0.2)
    assert sample(TextToImage.from_pretrained(directory))[0] == {torch.float32}  # auto on an emulating CPU
    assert sample(native.to("cpu", precision="no"))[0] == {torch.float32}
    with pytest.raises(PrecisionError, match="unknown precision 'bf61'"):
        TextToImage.from_pretrained(directory, precision="bf61")
