"""One config loader: YAML data + dotted command-line overrides -> a frozen, type-checked dataclass.

The YAML files in ``configs/`` hold data only (no class paths). Every key is checked against the
dataclass fields: an unknown key fails with the list of valid keys and the closest match, and a
value of the wrong type fails with the expected type.

    cfg = load_config(TrainConfig, "configs/autoencoder/emoji32_quick.yaml", ["optim.lr=2e-4"])

Old layouts: a dataclass may define ``upgrade_legacy(data, where) -> (data, notes)``, which
:func:`from_dict` calls before it checks the keys. Saved ``config.json`` files are upgraded quietly
(saving again writes the new layout); YAML files and overrides get one :class:`ConfigUpgradeWarning`
that says what to rename.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
import warnings
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass."""


class ConfigUpgradeWarning(UserWarning):
    """A config in an old layout that still loads; the message says how to update it."""


# The notes of the load_config call in progress (None: upgrade quietly, as for saved config.json files).
_UPGRADE_NOTES: ContextVar[list[str] | None] = ContextVar("_UPGRADE_NOTES", default=None)


class _Override(str):
    """Command-line text, parsed only once the field's type is known: ``run.precision=no`` must stay
    the string "no" for a string field, where YAML alone would read it as False."""

    def parse(self) -> Any:
        return yaml.safe_load(self) if self else ""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file, then apply ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML ({error}); fix the file: configs/*.yaml show the format"
                              ) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values, got {type(loaded).__name__}")
        data = loaded
    for override in overrides:
        _apply_override(data, override)
    notes: list[str] = []
    token = _UPGRADE_NOTES.set(notes)
    try:
        config = from_dict(cls, data)
    finally:
        _UPGRADE_NOTES.reset(token)
    if notes:
        source = f"update {path}" if path is not None else "update the overrides"
        warnings.warn(f"old config layout (read for now): {'; '.join(notes)}; {source}",
                      ConfigUpgradeWarning, stacklevel=2)
    return config


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build the dataclass ``cls`` from a nested dict, strictly (unknown keys and bad types fail)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping (a section of keys), got {data!r}")
    upgrade = getattr(cls, "upgrade_legacy", None)
    if upgrade is not None:
        data, notes = upgrade(data, where)
        collected = _UPGRADE_NOTES.get()
        if collected is not None:
            collected.extend(notes)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(f"{where}{key}", key, sorted(fields)))
    values = {key: _coerce(hints[key], value, f"{where}{key}") for key, value in data.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:  # the dataclass's own checks (__post_init__): name the section
        raise ConfigError(f"{where.rstrip('.')}: {error}" if where else str(error)) from None


def nest_flat_keys(data: dict[str, Any], section: str, names: Sequence[str],
                   where: str = "") -> tuple[dict[str, Any], list[str]]:
    """Move the top-level keys ``names`` of ``data`` into its ``section`` mapping: the upgrade of a
    layout that had them flat. A key given both ways is an error, since the two values may disagree."""
    flat = [name for name in names if name in data]
    nested = data.get(section, {})
    if not flat or not isinstance(nested, dict):  # nothing to move, or a bad section from_dict reports
        return data, []
    for name in flat:
        if name in nested:
            raise ConfigError(f"{where}{name} and {where}{section}.{name} are both given; keep "
                              f"{where}{section}.{name} and remove {where}{name}")
    upgraded = {key: value for key, value in data.items() if key not in flat}
    upgraded[section] = {**nested, **{name: data[name] for name in flat}}
    moved = ", ".join(f"{where}{name}" for name in flat)
    return upgraded, [f"{moved} now go under {where}{section} (e.g. {where}{section}.{flat[0]})"]


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a config dataclass (tuples become lists, for YAML and JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def dump_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML, so a run records exactly what it used."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is a value, not a section")
    node[leaf] = _Override(raw)


def _unknown_key_message(full_key: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {full_key!r}.{hint} Valid keys here: {', '.join(valid)}."


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``hint``; convert only where it is lossless."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, _Override) and origin not in (Union, types.UnionType):
        wants_text = hint is str or (origin is Literal and all(isinstance(a, str) for a in args))
        value = str(value) if wants_text else value.parse()
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{where}.")
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or isinstance(value, _Override) and value.parse() is None):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}: {value!r} fits none of {hint}: " + "; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        return _coerce_sequence(origin, args, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    return _coerce_scalar(hint, value, where)


def _coerce_sequence(origin: type, args: tuple, value: Any, where: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "2e-4" (no dot) as a string; accept it as the number it plainly is.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
