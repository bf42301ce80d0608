"""Config building: YAML (flat or sectioned) + flags, aliases, coercion, and --resume reading a run's config back."""
from __future__ import annotations

import pytest

from lorafit.config.load import build_config
from lorafit.config.schema import Config, field_names
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
    import lorafit.train.loop as T
    from lorafit.cli import main
    from lorafit.run_dir import save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(run, build_config(None, {"output_dir": str(run), "lora_r": "4", "learning_rate": "1e-3",
                                         "max_steps": "7"}))
    seen = {}
    monkeypatch.setattr(T, "train", lambda cfg: seen.setdefault("cfg", cfg))
    assert main(["train", "--output_dir", str(run), "--resume", "--max_steps", "9"]) == 0
    cfg = seen["cfg"]
    assert (cfg.lora.lora_r, cfg.train.learning_rate, cfg.train.max_steps, cfg.train.resume) == (4, 1e-3, 9, True)


def test_the_seeds_constant_names_and_transformers_switches(tmp_path):
    """A seed's config.py constants (NUM_EPOCHS = 3, DO_SAMPLE, USE_FP16) pasted as YAML keys or flags work."""
    recipe = tmp_path / "seed.yaml"
    recipe.write_text("BASE_MODEL_NAME: org/model\nNUM_EPOCHS: 2\nLEARNING_RATE: 1e-4\nUSE_FP16: true\n"
                      "TEMPERATURE: 0.9\nDO_SAMPLE: true\npush_to_hub: false\n")
    cfg = build_config(recipe, {"max-seq-length": "128"})
    assert cfg.model.model == "org/model" and cfg.train.num_train_epochs == 2 and cfg.train.learning_rate == 1e-4
    assert cfg.train.fp16 is True and cfg.generate.temperature == 0.9 and cfg.data.max_seq_length == 128
    assert cfg.train.push_to_hub is None
    assert build_config(None, {"do_sample": "false"}).generate.temperature == 0.0   # greedy
    assert build_config(None, {"push_to_hub": "False"}).train.push_to_hub is None
    assert build_config(None, {"push_to_hub": "me/run"}).train.push_to_hub == "me/run"


def test_push_to_hub_true_asks_for_a_repo_and_typos_suggest_lower_case_fields():
    with pytest.raises(ConfigError, match="names the hub repo"):
        build_config(None, {"push_to_hub": True})
    with pytest.raises(ConfigError) as e:
        build_config(None, {"NUM_EPOCH": "3"})
    assert "num_epochs" in e.value.fix


def test_two_names_for_one_field_must_agree(tmp_path):
    with pytest.raises(ConfigError, match="set 'model' twice"):
        build_config(None, {"model": "a/b", "model_name": "c/d"})
    assert build_config(None, {"model": "a/b", "model_name": "a/b"}).model.model == "a/b"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name: c/d\n")
    assert build_config(recipe, {"model": "a/b"}).model.model == "a/b"      # a flag overrides the file
