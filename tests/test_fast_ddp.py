"""The fast path under DDP, through bench/ddp_bench.py (lorafit's own LossModule + wrap_ddp + optimizer step).

Two gloo ranks on CPU, each with its own batch: DDP's gradient through FastLoss and its per-layer
checkpoint (a backward nested in the outer one, where DDP's hooks fire) equals the mean of the
ranks' local gradients, and both ranks hold the same adapter after the steps. The GPU run of the
same script (bench/run.sh ddp) gives issue 7's 1-GPU vs 2-GPU figures.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env

pytest.importorskip("peft")


def _torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_ddp_bench_two_ranks_average_fast_path_gradients(tiny_model_dir):
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", str(REPO / "bench" / "ddp_bench.py"),
           str(tiny_model_dir("llama")), "--no-4bit", "--check", "--shapes", "2x32", "--steps", "1", "--warmup", "1"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    head = recs[0]
    assert head["ddp"] == "DistributedDataParallel" and head["loss_path"] == "fused LoRA kernels"
    assert head["grad_check_rel"] < 1e-6
    shape = next(r for r in recs if r.get("shape") == "2x32")
    assert shape["world"] == 2 and shape["tok_s"] > 0
    assert any(r.get("ranks_agree") is True for r in recs)
