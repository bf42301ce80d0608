"""The run directory: everything a run needs to describe itself and be picked up again.

Layout of `output_dir` (a.k.a. `adapter_path`):
  adapter_config.json, adapter_model.safetensors   the final adapter, PEFT's format
  config.yaml        resolved config (sectioned), read back by eval/chat/merge/serve/resume
  template.json      the prompt template training used (chat, eval, serve use exactly this)
  versions.json      package versions and the machine
  data.json          data fingerprint and the data report's numbers
  metrics.jsonl      one JSON object per logged step / validation
  previews.jsonl     preview generations during training
  checkpoints/step-000100/ ...   resumable checkpoints (see checkpoint.py)
  tb/                TensorBoard event files
  loss.png, eval.json, eval.md   after training / evaluation
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from lorafit.config.checks import validate
from lorafit.config.load import config_from_dict, read_yaml_mapping
from lorafit.config.schema import Config, DataArgs, canonical_key
from lorafit.errors import UserError, path_problem

CONFIG_FILE = "config.yaml"
TEMPLATE_FILE = "template.json"
VERSIONS_FILE = "versions.json"
DATA_FILE = "data.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "safetensors", "gguf",
            "triton", "flash-attn", "lorafit")
"""The distributions whose versions a run records (versions.json) and `lorafit doctor` shows."""


def installed_versions(names) -> dict[str, str | None]:
    """Installed version of each distribution in `names` (None when absent)."""

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def package_versions() -> dict[str, Any]:
    """What a run records in versions.json: Python, the platform and the packages that matter."""
    return {"python": platform.python_version(), "platform": platform.platform(), **installed_versions(PACKAGES)}


def new_temp_file(path: Path) -> Path:
    """A new empty file beside `path`, at a random name, created exclusively (O_EXCL), to be renamed onto `path`.

    A fixed name such as `path.tmp` could be a symlink someone planted, and writing it would follow the link.
    """
    fd, name = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=Path(path).parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the file ends up where a plain open() would have put one
    finally:
        os.close(fd)
    return Path(name)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = new_temp_file(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_config(run_dir: Path, cfg: Config) -> None:
    import yaml

    write_text_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_run_config(adapter_path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """The config a run was trained with, with `overrides` (eval/chat flags) applied on top."""
    run = Path(adapter_path)
    problem = path_problem(run, want="dir")
    if problem:
        raise UserError(f"adapter path '{run}' {problem}",
                        fix="train first (`lorafit train --output_dir DIR`) or pass the run directory it wrote")
    cfg_file = run / CONFIG_FILE
    if not cfg_file.is_file():
        raise UserError(f"'{run}' holds no {CONFIG_FILE}: it is not a lorafit run directory",
                        fix="pass the output_dir of a `lorafit train` run")
    cfg = read_run_config(cfg_file)
    overrides = overrides or {}
    given = {canonical_key(k) for k in overrides}
    if "dataset" in given:
        _forget_source_settings(cfg, next(v for k, v in overrides.items() if canonical_key(k) == "dataset"), given)
    for key, value in overrides.items():
        cfg.set(key, value)
    validate(cfg)
    return cfg


def read_run_config(cfg_file: Path) -> Config:
    """A run's config.yaml as a Config; a damaged file is one UserError that says how to get a good one back."""
    try:
        return config_from_dict(read_yaml_mapping(cfg_file, "run config") or {})
    except UserError as e:
        raise UserError(e.message, fix="write it again as `lorafit train` does (sections model, lora, data, train, "
                        "eval, generate; `model: PATH` at least), or train the run again") from None


# How the run's own data file was read; another file has its own fields, splits and format.
# (The template, how prompts are rendered, is the run's whatever the data.)
SOURCE_SETTINGS = ("dataset_format", "dataset_split", "column_map", "dataset_text_field")


def _forget_source_settings(cfg: Config, dataset: Any, given: set[str]) -> None:
    """Back to the defaults (format auto) for the settings of SOURCE_SETTINGS that this command did not give,
    when --dataset names other data than the run's."""

    if same_source(str(dataset), cfg.data.dataset):
        return
    defaults = DataArgs()
    for key in SOURCE_SETTINGS:
        if key not in given:
            setattr(cfg.data, key, getattr(defaults, key))


def same_source(a: str, b: str) -> bool:
    """Whether two `dataset` values name the same data (equal, or paths to one file or folder)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def has_adapter(run_dir: Path) -> bool:
    return (run_dir / ADAPTER_CONFIG).is_file() and (run_dir / ADAPTER_WEIGHTS).is_file()


def require_adapter(run_dir: Path) -> None:
    if not has_adapter(run_dir):
        raise UserError(f"'{run_dir}' holds no trained adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})",
                        fix="let `lorafit train` finish, or resume it with --resume")
