"""torch.compile where it pays: the ``run.compile`` rule, a compiled training run that checkpoints,
resumes and keeps its EMA like an eager one, and ``pipe.compile()`` with the eager pipeline's results.

Compiling with inductor on a CPU takes minutes even for the tiny models, so the default run traces
with the ``aot_eager`` backend (dynamo and AOTAutograd: the same capture, forward and backward graphs,
without generated C++); the inductor parity tests and the compiled GAN autoencoder run are marked slow.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bad_inputs import cli, train
from common import compile as compiling
from common import training
from common.config import ConfigError, load_config
from common.training import RunConfig
from tiny import TINY_AUTOENCODER, build_pipelines, tiny_prior_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def aot_eager(monkeypatch):
    """Training compiles with the aot_eager backend (seconds, not minutes); returns the modules it compiled."""
    compiled = []

    def compile_in_place(module, **options):
        compiled.append(module)
        return compiling.compile_in_place(module, backend="aot_eager", **options)

    monkeypatch.setattr(training, "compile_in_place", compile_in_place)
    return compiled


# ------------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("config", ["autoencoder/shapes32_quick", "autoencoder/emoji32_quick",
                                    "diffusion/shapes32_quick", "diffusion/lora_quick", "prior/shapes32_quick",
                                    "prior/emoji32_maskgit"])
def test_auto_trains_the_quick_cpu_configs_eagerly(config, monkeypatch):
    monkeypatch.setattr(compiling, "inductor_problem", lambda device: None)
    run = RunConfig(**yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())["run"])
    for precision in ("bf16", "fp32"):
        choice = compiling.resolve_compile(run.compile, "cpu", run.steps, run.max_minutes, precision)
        assert run.compile == "auto" and not choice.compile
        needed = compiling.break_even_minutes("cpu", "bf16")
        assert any(why in choice.reason for why in (f"minute budget is under the {needed:.0f} minutes", "short run",
                                                    "does not speed up fp32 training"))


@pytest.mark.parametrize("steps, minutes, device, precision, expected", [
    (4, 0.0, "cpu", "bf16", False),  # every test's run
    (9_999, 0.0, "cuda", "bf16", False),
    (100_000, 65.0, "cpu", "bf16", False),
    (100_000, 67.0, "cpu", "bf16", True),
    (20_000, 0.0, "cpu", "bf16", True),  # no time budget: the step count decides
    (20_000, 0.0, "cpu", "fp32", False),  # measured slower compiled in fp32 on a CPU
    (100_000, 600.0, "cpu", "fp16", False),  # a CPU in fp16 as in fp32
    (200_000, 0.0, "cuda", "fp16", True),
    (200_000, 14.0, "cuda", "bf16", True),
    (200_000, 12.0, "cuda", "fp32", False),
])
def test_auto_compiles_only_runs_long_enough_to_repay_it(steps, minutes, device, precision, expected, monkeypatch):
    monkeypatch.setattr(compiling, "inductor_problem", lambda device: None)
    choice = compiling.resolve_compile("auto", device, steps, minutes, precision)
    assert choice.compile is expected and choice.requested == "auto" and choice.reason


def test_the_break_even_follows_from_the_measured_estimate():
    bf16 = compiling.ESTIMATES[("cpu", "bf16")]
    # 113 s of compiling, then each eager second costs 1/1.06 s: 113 / (1 - 1/1.06) s saved back, twice
    assert compiling.break_even_minutes("cpu", "bf16") == pytest.approx(2 * bf16.compile_seconds / (1 - 1 / 1.06) / 60)
    assert 65 < compiling.break_even_minutes("cpu", "bf16") < 67
    assert compiling.break_even_minutes("cpu", "fp32") is None  # slower compiled: never pays


def test_auto_without_a_compiler_trains_eagerly_and_true_is_refused_naming_why(monkeypatch, tmp_path):
    monkeypatch.setattr(compiling, "inductor_problem", lambda device: "no C++ compiler for inductor on the CPU")
    choice = compiling.resolve_compile("auto", "cpu", 100_000, 0.0, "bf16")
    assert not choice.compile and "no C++ compiler" in choice.reason
    with pytest.raises(compiling.CompileError, match="no C.. compiler.*run.compile=auto or false"):
        compiling.resolve_compile(True, "cpu", 4, 0.0)
    config = tmp_path / "prior.yaml"
    config.write_text(yaml.safe_dump(tiny_prior_config(tmp_path / "missing", tmp_path / "cache")))
    message = cli("prior.train", str(config), f"run.out_dir={tmp_path / 'run'}", "run.compile=true")
    assert "run.compile=true, but no C++ compiler" in message and not (tmp_path / "run").exists()


def test_compile_setting_is_parsed_from_yaml_and_overrides():
    assert load_config(RunConfig, None, ["compile=true"]).compile is True
    assert load_config(RunConfig, None, ["compile=false"]).compile is False
    assert load_config(RunConfig).compile == "auto"
    with pytest.raises(ConfigError, match="compile.*'maybe'"):
        load_config(RunConfig, None, ["compile=maybe"])


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def prior_yaml(tmp_path_factory) -> Path:
    from tiny import make_tiny_autoencoder

    root = tmp_path_factory.mktemp("compile_prior")
    config = tiny_prior_config(make_tiny_autoencoder(root / "ae"), root / "cache")
    config["run"].update(save_every=2, sample_every=100)
    path = root / "prior.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "pipeline" / "prior" / "model.safetensors")


def test_a_compiled_resume_matches_the_eager_run_and_saves_plain_weights(prior_yaml, tmp_path, aot_eager, capsys):
    eager, split = tmp_path / "eager", tmp_path / "split"
    train("prior.train", str(prior_yaml), f"run.out_dir={eager}", "run.steps=4")
    train("prior.train", str(prior_yaml), f"run.out_dir={split}", "run.steps=2")
    assert not aot_eager, "a short auto run never compiles"
    capsys.readouterr()
    train("prior.train", str(prior_yaml), f"run.out_dir={split}", "run.steps=4", "run.compile=true")
    assert len(aot_eager) == 1 and compiling.is_compiled(aot_eager[0])
    assert "compile: yes (requested explicitly)" in capsys.readouterr().out
    assert yaml.safe_load((split / "config.yaml").read_text())["run"]["compile"] is True
    assert json.loads((split / "environment.json").read_text())["compile"]["chosen"] is True

    # checkpoints and the saved prior hold plain parameter names: no torch.compile wrapper's "_orig_mod."
    checkpoint = training.latest_checkpoint(split)
    keys = [*load_file(checkpoint / "model.safetensors"), *_weights(split)]
    assert keys and not any("_orig_mod" in key for key in keys)
    # the EMA (the saved prior) followed the compiled steps as it follows eager ones
    reference, resumed = _weights(eager), _weights(split)
    assert reference.keys() == resumed.keys()
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-4, rtol=0, msg=name)
    losses = {m["step"]: m["loss"] for m in training.read_metrics(eager)}
    assert all(abs(m["loss"] - losses[m["step"]]) < 1e-4 for m in training.read_metrics(split))


@pytest.mark.slow  # 45 s: tracing the autoencoder's forward and backward
def test_a_compiled_gan_autoencoder_run_matches_the_eager_one(tmp_path, aot_eager):
    """The quantizer stays eager (its statistics rewrite the codebook mid-step), and the adaptive GAN weight's
    extra gradient (retain_graph) works through the compiled graph."""
    config = tmp_path / "ae.yaml"
    config.write_text(yaml.safe_dump(TINY_AUTOENCODER))
    for name, compile_ in (("eager", "false"), ("compiled", "true")):
        train("autoencoder.train", str(config), f"run.out_dir={tmp_path / name}", "run.steps=3", "loss.disc_start=0",
              "loss.gan_start=1", f"run.compile={compile_}")
    assert len(aot_eager) == 1
    reference, result = (load_file(tmp_path / run / "autoencoder" / "model.safetensors")
                         for run in ("eager", "compiled"))
    for name, value in reference.items():
        torch.testing.assert_close(result[name], value, atol=1e-4, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------ sampling
@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    return build_pipelines(tmp_path_factory.mktemp("compile_pipelines"))


def _latents(pipe) -> torch.Tensor:
    return pipe("a red circle", num_inference_steps=3, output_type="latent", progress=False,
                generator=torch.Generator().manual_seed(0)).images


def _parity(dirs, backend: str) -> None:
    from pipelines import TextToImage

    pipe = TextToImage.from_pretrained(dirs["text"], precision="fp32")  # bf16 would differ by its rounding
    expected, images = _latents(pipe), pipe.model.decode(_latents(pipe))
    assert pipe.compile(backend=backend) is pipe
    assert compiling.is_compiled(pipe.model.unet) and compiling.is_compiled(pipe.model.autoencoder.decoder)
    latents = _latents(pipe)
    assert (latents - expected).abs().max() <= 1e-4
    assert (pipe.model.decode(expected) - images).abs().max() <= 1e-4
    assert not any("_orig_mod" in key for key in pipe.model.unet.state_dict())


def test_pipe_compile_gives_the_eager_results(dirs):
    _parity(dirs, "aot_eager")


@pytest.mark.slow
def test_pipe_compile_with_inductor_gives_the_eager_results(dirs):
    _parity(dirs, "inductor")


@pytest.mark.slow
def test_a_run_compiled_with_inductor_matches_the_eager_run(prior_yaml, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train("prior.train", str(prior_yaml), f"run.out_dir={eager}", "run.steps=4")
    train("prior.train", str(prior_yaml), f"run.out_dir={compiled}", "run.steps=4", "run.compile=true")
    reference, result = _weights(eager), _weights(compiled)
    for name, value in reference.items():
        torch.testing.assert_close(result[name], value, atol=1e-4, rtol=0, msg=name)


def test_the_report_renders_the_measured_json_and_states_the_auto_rule(tmp_path):
    import argparse

    from bench import compile_report
    from bench.measure import Context
    from bench.report import Report

    result = {"command": "python -m bench.compile_speed --precision fp32,bf16", "backend": "inductor", "batch": 32,
              "repeats": 10, "threads": 2, "device": "cpu", "caches": "disabled",
              "results": [{"workload": "unet_train", "precision": "bf16", "eager_s": 0.2, "compiled_s": 0.16,
                           "speedup": 1.25, "compile_s": 120.0, "break_even_eager_minutes": 10.0,
                           "first_output_max_abs_diff": 0.04},
                          {"workload": "sampling", "precision": "fp32", "eager_s": 2.0, "compiled_s": 2.1,
                           "speedup": 0.95, "compile_s": 90.0, "break_even_eager_minutes": None,
                           "first_output_max_abs_diff": 2e-6}]}
    path = tmp_path / "compile_speed.json"
    path.write_text(json.dumps(result))
    report = Report(Context(args=argparse.Namespace(), profile={}, out=tmp_path, argv=[]))
    compile_report.section(report, path)
    text = "\n".join(report.lines)
    assert "| unet_train | bf16 | 200.0 ms | 160.0 ms | 1.25x | 120.00 s | 10.0 min | 4.0e-02 |" in text
    assert "| sampling | fp32 | 2.00 s | 2.10 s | 0.95x | 90.00 s | never | 2.0e-06 |" in text
    assert f"at least {compiling.MIN_STEPS:,} steps" in text
    assert f"{compiling.break_even_minutes('cpu', 'bf16'):.0f} minutes" in text and "fp32 never" in text
    missing = Report(Context(args=argparse.Namespace(), profile={}, out=tmp_path, argv=[]))
    compile_report.section(missing, tmp_path / "none.json")
    assert "_Not run: " in "\n".join(missing.lines) and "bench.compile_speed" in "\n".join(missing.lines)
