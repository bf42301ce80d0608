"""main.py: `python main.py train|eval|chat` (the Phi-3 Alpaca README's entry point) over lorafit's CLI."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from helpers import REPO


@pytest.fixture(scope="module")
def main_py():
    spec = importlib.util.spec_from_file_location("seed_main", REPO / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_follow_the_seed_readme(main_py):
    recipe = str(REPO / "configs" / "phi3_alpaca.yaml")
    assert main_py.lorafit_argv(["train"]) == [
        "train", "--config", recipe, "--output_dir", "checkpoints/lora_phi3", "--seed", "42"]
    assert main_py.lorafit_argv(["eval"]) == ["eval", "--adapter_path", "checkpoints/lora_phi3", "--seed", "42"]
    assert main_py.lorafit_argv(["chat"]) == ["chat", "--adapter_path", "checkpoints/lora_phi3"]


def test_options_and_extra_flags_pass_through(main_py):
    argv = main_py.lorafit_argv(["train", "--model", "smollm2-135m", "--dataset", "demo", "--max_steps", "5",
                                 "--adapter_path", "/tmp/x", "--seed", "7", "--packing"])
    assert argv[:7] == ["train", "--config", str(REPO / "configs" / "phi3_alpaca.yaml"), "--output_dir", "/tmp/x",
                        "--seed", "7"]
    assert argv[7:] == ["--model", "smollm2-135m", "--dataset", "demo", "--max_steps", "5", "--packing"]
    assert main_py.lorafit_argv(["eval", "--adapter_path", "a", "--seed", "3", "--max_samples", "9"]) == [
        "eval", "--adapter_path", "a", "--seed", "3", "--max_samples", "9"]
    # the chat prompt may stand anywhere: a word after --key is its value, never the prompt
    from lorafit.cli import _split_prompt

    argv = main_py.lorafit_argv(["chat", "--max_new_tokens", "64", "--model", "/a-b", "Hi there", "--base"])
    rest, prompt = _split_prompt(argv[1:], flags=("--demo", "--base", "-h", "--help"))
    assert prompt == "Hi there"
    assert rest == ["--adapter_path", "checkpoints/lora_phi3", "--max_new_tokens", "64", "--model", "/a-b", "--base"]


def test_missing_adapter_path_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), "eval", "--adapter_path", str(tmp_path / "none")],
                          check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_train_then_eval_through_main_py(main_py, tiny_model_dir, tmp_path):
    pytest.importorskip("lorafit.train")
    run = tmp_path / "run"
    extra = [] if (REPO / "configs" / "phi3_alpaca.yaml").is_file() else ["--config", str(REPO / "configs" / "x")]
    flags = ["--model", str(tiny_model_dir("phi3")), "--dataset", "demo", "--demo_size", "60", "--max_steps", "2",
             "--report_to", "none", "--adapter_path", str(run), *extra]
    assert main_py.main(["train", *flags]) == 0
    assert (run / "adapter_model.safetensors").is_file() and (run / "template.json").is_file()
    assert main_py.main(["eval", "--adapter_path", str(run), "--max_samples", "2", "--eval_max_new_tokens", "2"]) == 0
    assert (run / "eval.json").is_file()
