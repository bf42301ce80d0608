"""Bad configurations and broken datasets through the real CLI (`python -m lorafit ...` subprocesses).

Each case must end with exit code 2, one message naming the field (or file) and the fix, no
traceback, and nothing written to output_dir. Config mistakes fail before torch is imported
(a fraction of a second each); cases that need the tokenizer run concurrently to save time.
"""
from __future__ import annotations

import json
import subprocess

import pytest
from helpers import cli_main, lorafit_cmd, run_cli, subprocess_env, to_argv, train_args

CONFIG_CASES = [
    ({"lora_alpah": "8"}, ["unknown config key 'lora_alpah'", "did you mean 'lora_alpha'"]),
    ({"learning_rat": "1e-4"}, ["unknown config key 'learning_rat'", "did you mean 'learning_rate'"]),
    ({"lora_r": "eight"}, ["'lora_r' must be a whole number"]),
    ({"packing": "maybe"}, ["'packing' must be true or false"]),
    ({"lora_r": "0"}, ["'lora_r' must be > 0"]),
    ({"learning_rate": "-1e-4"}, ["'learning_rate' must be > 0"]),
    ({"lora_dropout": "1.0"}, ["'lora_dropout' must be in [0, 1)"]),
    ({"warmup_ratio": "1.5"}, ["'warmup_ratio' must be in [0, 1]"]),
    ({"per_device_train_batch_size": "0"}, ["'per_device_train_batch_size' must be > 0"]),
    ({"max_tokens_per_pass": "100", "max_seq_length": "512"}, ["'max_tokens_per_pass' (100) is below max_seq_length",
                                                                "--max_tokens_per_pass 512"]),
    ({"gradient_accumulation_steps": "0"}, ["'gradient_accumulation_steps' must be > 0"]),
    ({"fp16": "true", "bf16": "true"}, ["'bf16' and 'fp16' are both on", "choose one precision"]),
    ({"load_in_4bit": "true", "load_in_8bit": "true"}, ["'load_in_4bit' and 'load_in_8bit' are both on"]),
    ({"packing": "true", "dataset_format": "text", "template": "chatml"}, ["'packing' with a chat template"]),
    ({"optim": "sgd"}, ["'optim' is 'sgd'", "adamw_torch"]),
    ({"early_stopping_patience": "2", "eval_strategy": "no"}, ["'early_stopping_patience' needs validation"]),
    ({"max_steps": "0"}, ["'max_steps' is 0"]),
    ({"fp8_base": "true"}, ["'fp8_base' is 'true'", "backward"]),
    ({"fp8_base": "all", "fast_kernels": "off"}, ["'fp8_base' needs the fused kernels", "--fp8_base off"]),
]


def _check_user_error(proc: subprocess.CompletedProcess, expected: list[str], out) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error: " in proc.stderr, proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert not out.exists(), "nothing may be written on a configuration error"


@pytest.mark.parametrize("fields,expected", CONFIG_CASES, ids=[next(iter(c[0])) for c in CONFIG_CASES])
def test_bad_config_exits_2_before_loading(fields, expected, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--output_dir", str(out), *to_argv(fields), timeout=60)
    _check_user_error(proc, expected, out)


def test_bad_yaml_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora: {lora_r: 8, lora_alph: 16}\n")
    proc = run_cli("train", "--config", str(recipe), "--output_dir", str(tmp_path / "run"), timeout=60)
    _check_user_error(proc, ["unknown config key 'lora_alph'", "did you mean 'lora_alpha'"], tmp_path / "run")


@pytest.mark.parametrize("command", ["eval", "chat", "merge"])
def test_missing_adapter(command, tmp_path):
    extra = ["--output_dir", str(tmp_path / "merged")] if command == "merge" else []
    proc = run_cli(command, "--adapter_path", str(tmp_path / "nope"), *extra, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "does not exist" in proc.stderr and "lorafit train" in proc.stderr


def test_model_and_dataset_problems_subprocess(tiny_model_dir, tmp_path):
    """A missing model and an unparsable file, as real processes side by side (each imports transformers)."""
    model = tiny_model_dir("llama")
    (tmp_path / "bad.json").write_text('[{"instruction": "a", "output": "b"},')
    cases = {
        "no-model": ({"model": tmp_path / "no-such-model"}, ["no-such-model"]),
        "bad-json": ({"dataset": tmp_path / "bad.json"}, ["bad.json"]),
    }
    procs = {}
    for name, (fields, _) in cases.items():
        args = train_args(model, tmp_path / "unused.json", tmp_path / f"out-{name}", **fields)
        procs[name] = subprocess.Popen(lorafit_cmd("train", *to_argv(args)), env=subprocess_env(), text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
        _check_user_error(done, cases[name][1], tmp_path / f"out-{name}")


@pytest.mark.parametrize("name,content,expected", [
    ("missing.json", None, ["missing.json"]),
    ("empty.jsonl", "", ["empty.jsonl"]),
    ("cols.json", json.dumps([{"question": "q", "reply": "r"}] * 20), ["question, reply", "column_map"]),
    ("long.json", json.dumps([{"instruction": "q " * 40, "output": "a"}] * 20), ["long.json", "max_seq_length"]),
], ids=["missing", "empty", "unknown-columns", "all-too-long"])
def test_broken_dataset_in_process(tiny_model_dir, tmp_path, capsys, name, content, expected):
    """The same CLI entry point in this process (transformers is already imported): exit 2, message, nothing written."""

    data = tmp_path / name
    if content is not None:
        data.write_text(content)
    out = tmp_path / "run"
    code = cli_main(["train", *to_argv(train_args(tiny_model_dir("llama"), data, out, truncation="drop"))])
    err = capsys.readouterr().err
    _check_user_error(subprocess.CompletedProcess([], code, "", err), expected, out)


def test_fp8_base_where_the_fused_path_cannot_run(tiny_model_dir, tmp_path, capsys):
    """--fp8_base all on a CPU (fast_kernels auto keeps the reference path there): exit 2 once the loss path is
    chosen (the base loaded), before anything is written."""
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": f"q {i}", "output": "a"} for i in range(20)]))
    out = tmp_path / "run"
    code = cli_main(["train", *to_argv(train_args(tiny_model_dir("llama"), data, out, fp8_base="all"))])
    err = capsys.readouterr().err
    _check_user_error(subprocess.CompletedProcess([], code, "", err),
                      ["fp8_base needs the fused kernels", "no CUDA GPU", "--fp8_base off"], out)
