"""Build a Config: defaults, then a YAML recipe, then `--FIELD VALUE` flags; validated before anything loads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafit.config.checks import validate
from lorafit.config.schema import _FIELDS, SECTIONS, Config, canonical_key
from lorafit.errors import ConfigError, path_problem
from lorafit.parsing import BadInput, yaml_load


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe: a flat or sectioned mapping of field names to values."""
    p = Path(path)
    problem = path_problem(p)
    if problem:
        raise ConfigError(f"config file '{path}' {problem}", fix="pass an existing YAML file to --config")
    data = read_yaml_mapping(p, "config file") or {}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        # `model` names both a section and the field in it: `model: org/name` (a string) is the field.
        if key in SECTIONS and not (key in _FIELDS and not isinstance(value, dict)):
            if not isinstance(value, dict):
                raise ConfigError(f"section '{key}' in '{path}' must be a mapping")
            flat.update(value)
        else:
            flat[key] = value
    for key in flat:
        if not isinstance(key, str):
            raise ConfigError(f"config file '{path}' has a field named {key!r}, not a word",
                              fix="field names are words such as lora_r or learning_rate")
    return flat


def read_yaml_mapping(p: Path, what: str) -> dict[str, Any] | None:
    """A YAML file that must hold a mapping (or nothing: None); every way it can fail is one ConfigError."""
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} '{p}' is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); it may be "
                          "a binary file", fix="pass a YAML text file") from None
    try:
        data = yaml_load(text)
    except BadInput as e:
        raise ConfigError(f"{what} '{p}': {e}", fix="fix the file, or write it again") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{what} '{p}' must hold a mapping of field names to values, not a "
                          f"{type(data).__name__}", fix="write `field: value` lines (e.g. `lora_r: 16`)")
    return data


def build_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file, then overrides (flags); validated before anything loads."""
    cfg = Config()
    layers = [(f"'{yaml_path}'", load_yaml(yaml_path) if yaml_path else {}), ("the flags", overrides or {})]
    for where, values in layers:
        _no_two_names(values, where)
        for key, value in values.items():
            cfg.set(key, value)
    validate(cfg)
    return cfg


def _no_two_names(values: dict[str, Any], where: str) -> None:
    """Two names of one field in one place (--model and --model_name) with different values: which one was meant?"""
    seen: dict[str, str] = {}
    for key, value in values.items():
        field_name = canonical_key(key)
        other = seen.setdefault(field_name, key)
        if other != key and values[other] != value:
            raise ConfigError(f"{where} set '{field_name}' twice: {other}={values[other]!r} and {key}={value!r}",
                              fix=f"keep one of '{other}' and '{key}'")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (a run directory's config.yaml)."""
    cfg = Config()
    for section, values in data.items():
        if section not in SECTIONS or not isinstance(values, dict):
            continue
        for key, value in values.items():
            if key in _FIELDS:
                cfg.set(key, value)
    return cfg
