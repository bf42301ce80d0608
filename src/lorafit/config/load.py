"""Build a Config: defaults, then a YAML recipe, then `--FIELD VALUE` flags; validated before anything loads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafit.config.checks import validate
from lorafit.config.schema import _FIELDS, SECTIONS, Config, canonical_key
from lorafit.errors import ConfigError


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe: a flat or sectioned mapping of field names to values."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist", fix="pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of field names to values")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"section '{key}' in '{path}' must be a mapping")
            flat.update(value)
        else:
            flat[key] = value
    return flat


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
