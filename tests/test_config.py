from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from autoencoder.model_config import AutoencoderConfig, check_data_resolution
from common.config import ConfigError, ConfigUpgradeWarning, dump_config, from_dict, load_config, to_dict
from common.data import DataConfig


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass(frozen=True)
class Model:
    codebook_size: int = 1024
    channel_mult: tuple[int, ...] = (1, 2)
    weights: str | None = None


@dataclass(frozen=True)
class Train:
    optim: Optim = field(default_factory=Optim)
    model: Model = field(default_factory=Model)
    steps: int = 10
    bf16: bool = False


def write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_yaml_then_dotted_overrides(tmp_path):
    path = write(tmp_path, {"optim": {"lr": 1e-3}, "steps": 3})
    cfg = load_config(Train, path, ["optim.lr=2e-4", "model.codebook_size=8192", "model.channel_mult=[1,2,4]"])
    assert cfg.optim.lr == 2e-4 and cfg.steps == 3
    assert cfg.model.codebook_size == 8192 and cfg.model.channel_mult == (1, 2, 4)
    assert cfg.optim.betas == (0.5, 0.9)


def test_misspelled_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError) as error:
        load_config(Train, None, ["optim.lrr=1"])
    message = str(error.value)
    assert "optim.lrr" in message and "Did you mean 'lr'" in message
    assert "betas" in message and "schedule" in message  # the valid keys are listed


def test_unknown_section_key_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match="'optimizer'"):
        load_config(Train, write(tmp_path, {"optimizer": {"lr": 1}}))


@pytest.mark.parametrize("override, fragment", [
    ("steps=1.5", "expected int"),
    ("steps=true", "expected int"),
    ("bf16=3", "expected bool"),
    ("optim.lr=fast", "expected float"),
    ("optim.schedule=linear", "not one of"),
    ("optim.betas=[0.5]", "expected 2 values"),
    ("model.channel_mult=4", "expected a list"),
    ("optim=3", "must be a mapping"),
    ("no_equals_sign", "key.sub=value"),
])
def test_type_errors_name_the_key_and_expectation(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(Train, None, [override])


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 2e-4 as a string; a float field accepts it.
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 2e-4\n")
    assert load_config(Train, tmp_path / "c.yaml").optim.lr == pytest.approx(2e-4)


def test_optional_and_int_to_float():
    cfg = load_config(Train, None, ["model.weights=/x.pt", "optim.lr=1"])
    assert cfg.model.weights == "/x.pt" and isinstance(cfg.optim.lr, float)
    assert load_config(Train, None, ["model.weights=null"]).model.weights is None


def test_dump_round_trip(tmp_path):
    cfg = load_config(Train, None, ["optim.lr=3e-4", "model.channel_mult=[1,1,2]"])
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Train, path) == cfg
    assert from_dict(Train, to_dict(cfg)) == cfg


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Train, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Train, tmp_path / "list.yaml")


@dataclass(frozen=True)
class Run:
    precision: Literal["no", "bf16", "fp16"] = "bf16"
    name: str = "x"
    path: str | None = "p"


def test_override_text_keeps_its_string_meaning():
    # YAML 1.1 reads no/on/off/yes as booleans; string fields must get the text as written.
    cfg = load_config(Run, None, ["precision=no", "name=off", "path=null"])
    assert cfg.precision == "no" and cfg.name == "off" and cfg.path is None
    assert load_config(Run, None, ["name=123", "path=yes"]) == Run(name="123", path="yes")


@dataclass(frozen=True)
class StageOne:
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)


def test_old_flat_quantizer_keys_load_with_a_warning_that_says_how_to_update(tmp_path):
    path = write(tmp_path, {"model": {"codebook_size": 512, "dead_code_threshold": 7}})
    with pytest.warns(ConfigUpgradeWarning, match=r"model.codebook_size, model.dead_code_threshold now go under "
                                                  r"model.quantizer \(e.g. model.quantizer.codebook_size\); update"):
        old = load_config(StageOne, path)
    assert old == load_config(StageOne, None, ["model.quantizer.codebook_size=512",
                                                "model.quantizer.dead_code_threshold=7"])
    with pytest.warns(ConfigUpgradeWarning, match="update the overrides"):
        assert load_config(StageOne, None, ["model.codebook_size=512", "model.dead_code_threshold=7"]) == old
    with pytest.raises(ConfigError, match="keep model.quantizer.codebook_size and remove model.codebook_size"):
        load_config(StageOne, write(tmp_path, {"model": {"quantizer": {"codebook_size": 512}}}),
                    ["model.codebook_size=8192"])


def test_stage_one_data_must_have_the_model_resolution():
    check_data_resolution(AutoencoderConfig(resolution=32), DataConfig(resolution=32))
    with pytest.raises(ConfigError, match="model.resolution=32 but data.resolution=64"):
        check_data_resolution(AutoencoderConfig(resolution=32), DataConfig(resolution=64))
