"""Data parallel on CPU (gloo): `torchrun --nproc_per_node 2 -m lorafit train` equals one process with the
same global batch (accumulation 2), step for step; and a checkpoint saved by 2 ranks resumes on 1."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import (
    DDP_COMMON,
    REPO,
    alpaca_file,
    assert_same_adapter,
    cli_main,
    losses,
    run_train,
    subprocess_env,
    to_argv,
    torchrun_cmd,
    train_args,
    val_losses,
)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    ddp_args = train_args(tiny_model_dir("llama"), alpaca_file(), root / "ddp", **DDP_COMMON)
    proc = subprocess.run([*torchrun_cmd(), "--standalone", "--nproc_per_node", "2", "-m", "lorafit", "train",
                           *to_argv(ddp_args)], check=False, capture_output=True, text=True, timeout=400, cwd=REPO,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 per device x 1 accumulation x 2 processes = 4 records per optimizer step" in proc.stderr
    single = run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), root / "single",
                                    gradient_accumulation_steps=2, **DDP_COMMON))
    return root / "ddp", single


def test_two_ranks_equal_one_process_with_accumulation(runs):
    ddp, single = runs
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-4)
    assert sorted(losses(ddp)) == [1, 2, 3, 4]
    assert val_losses(ddp) == pytest.approx(val_losses(single), rel=1e-4)  # validation sums gathered over ranks
    assert_same_adapter(ddp, single, atol=1e-5)
    # only rank 0 wrote: one line per step, one checkpoint per save
    assert sum(1 for _ in (ddp / "metrics.jsonl").open()) == 4 + 3  # steps; validation at 0 (the baseline), 2, 4
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_checkpoint_from_two_ranks_resumes_on_one(runs, tmp_path):
    """Data position is counted in global micro-batches, so 2 ranks x 1 resumes as 1 rank x 2 accumulation."""

    ddp, single = runs
    run = Path(shutil.copytree(ddp, tmp_path / "run"))
    shutil.rmtree(run / "checkpoints" / "step-000004")
    assert cli_main(["train", "--output_dir", str(run), "--resume", "--gradient_accumulation_steps", "2"]) == 0
    assert losses(run) == pytest.approx(losses(single), rel=1e-4)
    assert_same_adapter(run, single, atol=1e-5)
