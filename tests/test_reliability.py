"""Fault injection: kill -9 mid-training and mid-checkpoint-write, SIGINT / SIGTERM, then --resume.

What must hold afterwards, every case: no `step-*` folder is ever partial, the last good
checkpoint is whole, and the resumed run's per-step losses and final adapter equal an
uninterrupted run's (same seed, dropout on), step for step.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    alpaca_file,
    assert_same_adapter,
    cli_main,
    losses,
    run_train,
    subprocess_env,
    to_argv,
    train_args,
)

from lorafit.train import loop

STEPS = {"max_steps": 8, "save_strategy": "steps", "save_steps": 2}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """The uninterrupted 8-step run every interrupted one is compared with."""
    return run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path_factory.mktemp("ref") / "run",
                                  **STEPS))


def _wait_for(cond, proc: subprocess.Popen | None, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"training ended (rc {proc.returncode}) before the fault could be injected:\n"
                        f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > end:
            pytest.fail("timed out waiting for the run to reach the fault point")
        time.sleep(0.05)


def _last_step(run: Path) -> int:
    return max(losses(run) or {0: 0})


def _resume_and_compare(run: Path, reference: Path) -> None:
    from lorafit.train.checkpoint import list_checkpoints, verify

    assert all(verify(p) is None for p in list_checkpoints(run))
    assert cli_main(["train", "--output_dir", str(run), "--resume"]) == 0  # the rest comes from run/config.yaml
    assert losses(run) == pytest.approx(losses(reference), abs=1e-6)
    assert_same_adapter(run, reference)


def _popen(args: dict[str, str], *faults: str) -> subprocess.Popen:
    """`lorafit train` in a subprocess, through tests/faults.py (which makes the faults injectable)."""
    cmd = [sys.executable, str(Path(__file__).with_name("faults.py")), *faults, "train", *to_argv(args)]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill9_during_checkpoint_write(tiny_model_dir, tmp_path, reference):
    """SIGKILL while step 6's checkpoint is half written: only a .tmp folder is left; resume from step 4."""
    run = tmp_path / "run"
    tmp6 = run / "checkpoints" / ".tmp-step-000006"
    proc = _popen(train_args(tiny_model_dir("llama"), alpaca_file(), run, **STEPS), "--slow-save", "6:300")
    try:
        _wait_for(lambda: (tmp6 / "adapter_model.safetensors").is_file(), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert tmp6.is_dir() and not (run / "checkpoints" / "step-000006").exists()
    assert not (run / "adapter_model.safetensors").exists()
    _resume_and_compare(run, reference)
    assert not tmp6.exists()  # cleaned up by the resumed run


def test_kill9_mid_training(tiny_model_dir, tmp_path, reference):
    """SIGKILL between checkpoints (metrics already past the last one): resume cuts the logs back and redoes them."""
    run = tmp_path / "run"
    proc = _popen(train_args(tiny_model_dir("llama"), alpaca_file(), run, **STEPS), "--step-delay", "0.5")
    try:
        _wait_for(lambda: _last_step(run) >= 3, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    _resume_and_compare(run, reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_checkpoint_and_says_where(tiny_model_dir, tmp_path, reference, sig, capsys, monkeypatch):
    """Ctrl-C / SIGTERM: a checkpoint after the current step, a message naming it, exit code 128 + signal."""
    from lorafit.train.checkpoint import list_checkpoints, verify

    run = tmp_path / "run"
    args = train_args(tiny_model_dir("llama"), alpaca_file(), run, **{**STEPS, "save_steps": 100})

    def send_when_training():
        _wait_for(lambda: _last_step(run) >= 2, None)
        os.kill(os.getpid(), sig)

    import faults  # tests/ is on sys.path

    monkeypatch.setattr(loop, "_optimizer_step", loop._optimizer_step)  # undone after the test
    faults.delay_steps(0.3)  # 8 tiny steps would otherwise be over in a blink
    sender = threading.Thread(target=send_when_training, daemon=True)
    sender.start()
    code = cli_main(["train", *to_argv(args)])
    sender.join(5)
    err = capsys.readouterr().err
    assert code == 128 + sig
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 1 and verify(ckpts[0]) is None
    step = int(ckpts[0].name.split("-")[1])
    assert 2 <= step < 8
    assert f"stopped by {sig.name} after step {step}; checkpoint saved to {ckpts[0]}" in err
    assert "--resume" in err
    if sig == signal.SIGTERM:  # one of the two also proves the resumed curve is exact
        _resume_and_compare(run, reference)
