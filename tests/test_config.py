"""Config building: YAML (flat or sectioned) + flags, aliases, coercion, and --resume reading a run's config back."""
from __future__ import annotations

import pytest

from lorafit.config import Config, build_config, field_names
from lorafit.errors import ConfigError


def test_yaml_sections_flags_and_aliases(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {model: m, load_in_4bit: true}\nlora: {lora_r: 8}\nlearning_rate: 1e-4\n"
                      "target_modules: [q_proj, v_proj]\n")
    cfg = build_config(recipe, {"lr": "3e-4", "batch_size": "2", "report_to": "tensorboard,wandb", "bf16": "none"})
    assert cfg.model.load_in_4bit is True and cfg.lora.lora_r == 8
    assert cfg.train.learning_rate == 3e-4 and cfg.train.per_device_train_batch_size == 2
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.report_to == ["tensorboard", "wandb"] and cfg.train.bf16 is None


def test_every_field_is_settable_from_a_string():
    """Every field of every section takes its own default back as a flag string (what the CLI passes)."""
    cfg = Config()
    for key in field_names():
        value = cfg.get(key)
        if isinstance(value, list):
            text = ",".join(map(str, value))
        elif isinstance(value, dict):
            text = ",".join(f"{k}={v}" for k, v in value.items())
        else:
            text = str(value)
        cfg.set(key, text)
        assert cfg.get(key) in (value, [value]), key  # a str|list field may come back as a one-item list


@pytest.mark.parametrize("key,value,match", [
    ("save_total_limit", "0", "'save_total_limit' must be >= 1"),
    ("eval_steps", "0", "'eval_steps' must be > 0"),
    ("nan_policy", "ignore", "'nan_policy' is 'ignore'"),
    ("report_to", "tensorboard,comet", "'report_to' holds 'comet'"),
    ("max_grad_norm", "-1", "'max_grad_norm' must be >= 0"),
])
def test_range_checks(key, value, match):
    with pytest.raises(ConfigError, match=match):
        build_config(None, {key: value})


def test_resume_reads_the_run_config_back(tmp_path, monkeypatch):
    """`lorafit train --output_dir RUN --resume` continues with RUN/config.yaml; flags still win."""
    import lorafit.train as T
    from lorafit.cli import main
    from lorafit.rundir import save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(run, build_config(None, {"output_dir": str(run), "lora_r": "4", "learning_rate": "1e-3",
                                         "max_steps": "7"}))
    seen = {}
    monkeypatch.setattr(T, "train", lambda cfg: seen.setdefault("cfg", cfg))
    assert main(["train", "--output_dir", str(run), "--resume", "--max_steps", "9"]) == 0
    cfg = seen["cfg"]
    assert (cfg.lora.lora_r, cfg.train.learning_rate, cfg.train.max_steps, cfg.train.resume) == (4, 1e-3, 9, True)
