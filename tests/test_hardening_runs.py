"""Hostile run directories with the tiny model: damaged model/adapter files, checkpoints whose manifest matches but
whose content is wrong, resume with changed settings, full disks, and the libraries' noise kept off the console."""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys

import pytest
from helpers import alpaca_file, cli_main, run_train, subprocess_env, train_args

from lorafit.errors import UserError


@pytest.fixture(scope="module")
def two_steps(tiny_model_dir, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2 (never modified: tests copy it)."""
    out = tmp_path_factory.mktemp("hard") / "run"
    run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), out, max_steps=2, save_strategy="steps",
                           save_steps=1))
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(ckpt, name: str, data: bytes) -> None:
    """Replace a checkpoint file and its manifest entry: the manifest matches, the content is wrong."""
    from lorafit.run_dir import write_json_atomic
    from lorafit.train.checkpoint import MANIFEST, _manifest

    (ckpt / name).write_bytes(data)
    write_json_atomic(ckpt / MANIFEST, _manifest(ckpt))


@pytest.mark.parametrize("name,data,why", [
    ("trainer_state.json", b'{"step": "two", "epoch": 0}', "trainer_state.json has step = 'two'"),
    ("trainer_state.json", b'{"step": 2, "best_val": "low"}', "best_val = 'low'"),
    ("trainer_state.json", b"[1, 2]", "holds a list"),
    ("optimizer.pt", b"PK\x03\x04 not a zip", "optimizer.pt is not a torch file"),
    ("rng.pt", b"\x80\x04K\x01.", "rng.pt is not a torch file"),  # a plain pickle: refused by weights_only
], ids=["step-str", "best-val-str", "state-list", "optimizer-not-torch", "rng-pickle"])
def test_damaged_checkpoint_content_is_skipped(two_steps, tmp_path, caplog, name, data, why):
    from lorafit.train.checkpoint import latest_good

    run = _copy(two_steps, tmp_path / "run")
    _rewrite(run / "checkpoints" / "step-000002", name, data)
    with caplog.at_level("WARNING", logger="lorafit"):
        path, state = latest_good(run)
    assert path.name == "step-000001" and state["step"] == 1
    assert "step-000002 is damaged" in caplog.text and why in caplog.text


@pytest.mark.parametrize("flag,value", [("lora_r", "8"), ("lora_alpha", "4"), ("target_modules", "mlp"),
                                        ("optim", "adamw_8bit"), ("load_in_4bit", "true"), ("model", "OTHER")])
def test_resume_refuses_settings_that_shape_the_checkpoints(two_steps, tmp_path, tiny_model_dir, capsys, flag, value):
    run = _copy(two_steps, tmp_path / "run")
    before = (run / "config.yaml").read_bytes()
    if value == "OTHER":
        value = str(_copy(tiny_model_dir("llama"), tmp_path / "other-model"))
    assert cli_main(["train", "--output_dir", str(run), "--resume", "--max_steps", "3", f"--{flag}", value]) == 2
    err = capsys.readouterr().err
    assert f"--resume cannot change '{flag}'" in err and "Traceback" not in err
    assert (run / "config.yaml").read_bytes() == before  # a failed resume never rewrites the run's settings
    assert cli_main(["train", "--output_dir", str(run), "--resume", "--max_steps", "3"]) == 0  # not bricked


def test_resume_writes_config_only_after_its_first_step(two_steps, tmp_path, monkeypatch):
    import lorafit.train.loop as L

    run = _copy(two_steps, tmp_path / "run")
    before = (run / "config.yaml").read_text()

    def fail(*args):
        raise UserError("first step failed")

    monkeypatch.setattr(L, "_optimizer_step", fail)
    with pytest.raises(UserError, match="first step failed"):
        cli_main_raw(["train", "--output_dir", str(run), "--resume", "--max_steps", "4", "--learning_rate", "1e-3"])
    assert (run / "config.yaml").read_text() == before
    monkeypatch.undo()
    assert cli_main(["train", "--output_dir", str(run), "--resume", "--max_steps", "3", "--learning_rate", "1e-3"]) == 0
    assert "learning_rate: 0.001" in (run / "config.yaml").read_text()  # may change, and is kept once started


def cli_main_raw(argv):
    """cmd_train without main()'s UserError handler, to see the exception."""
    from lorafit.cli import cmd_train

    return cmd_train(argv[1:])


@pytest.mark.parametrize("error", [
    lambda: __import__("safetensors").SafetensorError("I/O error: No space left on device (os error 28)"),
    lambda: RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos; file write failed"),
    lambda: OSError(errno.ENOSPC, "No space left on device"),
], ids=["safetensors", "torch-save", "oserror"])
def test_disk_full_in_any_writer_is_one_message(tiny_model_dir, tmp_path, monkeypatch, error):
    import lorafit.train.checkpoint as C

    def full(obj, path):
        raise error()

    monkeypatch.setattr(C, "_torch_save", full)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="no space left on the device. Earlier checkpoints are untouched"):
        run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), out, max_steps=2, save_strategy="steps",
                               save_steps=1))
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_disk_full_in_metrics_or_tensorboard(tmp_path):
    import torch

    from lorafit.train.log import TrainLog

    class Full:
        def log(self, rec):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    tlog = TrainLog(tmp_path, ["none"], 4, 2, torch.device("cpu"))
    tlog.trackers = [Full()]
    rec = {"step": 1, "loss": 1.0, "lr": 1e-4, "grad_norm": 1.0, "tokens": 10, "step_time": 0.1}
    with pytest.raises(UserError, match="TensorBoard events .* no space left on the device"):
        tlog.step(rec)
    tlog.close()  # a tracker that cannot close after a full disk is a warning, not a traceback


def test_losses_are_labelled_and_phases_shown(tmp_path, caplog):
    import torch

    from lorafit.train.log import NullLog, TrainLog

    tlog = TrainLog(tmp_path, ["none"], 4, 2, torch.device("cpu"))
    with caplog.at_level("INFO", logger="lorafit"):
        for step in (1, 2):
            tlog.step({"step": step, "loss": float(step), "lr": 1e-4, "grad_norm": 1.0, "tokens": 10, "step_time": 0.1})
        with tlog.phase("validation", 3) as advance:
            advance()
    tlog.close()
    assert "loss (avg of last 2 steps) 1.5000" in caplog.text
    with NullLog().phase("saving checkpoint") as advance:
        advance()


def _truncate(path, size):
    data = path.read_bytes()
    path.write_bytes(data[:size])


def test_damaged_model_and_adapter_files(tiny_model_dir, two_steps, tmp_path):
    from lorafit.config.load import build_config
    from lorafit.model.load import load_base_model
    from lorafit.model.lora import adapter_config_problem, load_adapter

    model = _copy(tiny_model_dir("llama"), tmp_path / "model")
    _truncate(model / "model.safetensors", 20000)
    with pytest.raises(UserError, match="could not load the model .* safetensors file is damaged"):
        load_base_model(build_config(None, {"model": str(model)}))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="fake.gguf.* not a GGUF file"):
        load_base_model(build_config(None, {"model": str(fake)}))
    base = load_base_model(build_config(None, {"model": str(tiny_model_dir("llama"))}))
    run = _copy(two_steps, tmp_path / "run")
    (run / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(UserError, match="could not load the adapter"):
        load_adapter(base, run)
    (run / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": 5}')
    with pytest.raises(UserError, match="'target_modules' is 5"):
        load_adapter(base, run)
    assert adapter_config_problem(json.loads((two_steps / "adapter_config.json").read_text())) is None
    run2 = _copy(two_steps, tmp_path / "run2")
    _truncate(run2 / "adapter_model.safetensors", 100)
    with pytest.raises(UserError, match="could not load the adapter .* safetensors file is damaged"):
        load_adapter(base, run2)


def test_library_noise_goes_to_the_run_log_not_the_console(tmp_path):
    code = ("import logging, warnings, sys; from lorafit.console import quiet_libraries, attach_log_file; "
            "quiet_libraries(); logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU "
            "gemm_4bit_forward'); warnings.warn('a torch warning'); attach_log_file(sys.argv[1]); "
            "import os; print(os.environ['HF_HUB_DISABLE_PROGRESS_BARS'])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False, capture_output=True, text=True,
                          env=subprocess_env(), timeout=60)
    assert proc.stderr == "" and proc.stdout.strip() == "1", proc.stderr
    text = (tmp_path / "libraries.log").read_text()
    assert "gemm_4bit_forward" in text and "a torch warning" in text
