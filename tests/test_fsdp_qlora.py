"""FSDP + QLoRA on CPU (gloo): a 4-bit NF4 base sharded over 2 processes equals one process with the same global
batch, step for step (losses, clipped gradient norms, validation, the adapter), and checkpoints move between the
two in both directions.

`accelerate launch --use_fsdp` turns on rank-0 loading (FSDP_CPU_RAM_EFFICIENT_LOADING=true), so rank 0 alone reads
and quantizes the base and sends it, quant_state included, to rank 1 (fsdp.share_base); `torchrun ... --fsdp true`
has every rank quantize its own copy. bitsandbytes 0.50 runs NF4 on the CPU; compute in float32 keeps the two
runs' differences to reduction order, so the tolerances are the bf16-free ones of test_fsdp.py.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import (
    FSDP_COMMON,
    REPO,
    alpaca_file,
    assert_same_adapter,
    losses,
    resume_in_one_process,
    resume_under_fsdp,
    run_train,
    step_metric,
    subprocess_env,
    to_argv,
    torchrun_cmd,
    train_args,
    val_losses,
)

pytest.importorskip("bitsandbytes")

QLORA = {**FSDP_COMMON, "load_in_4bit": True, "bnb_4bit_compute_dtype": "float32", "bnb_4bit_use_double_quant": True}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-qlora")
    args = train_args(tiny_model_dir("llama"), alpaca_file(), root / "fsdp", gradient_accumulation_steps=2, **QLORA)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run([*launch, "-m", "lorafit", "train", *to_argv(args)], check=False, capture_output=True,
                          text=True, timeout=400, cwd=REPO, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), root / "single",
                                    gradient_accumulation_steps=4, **QLORA))
    return root / "fsdp", single, proc.stderr


@pytest.mark.slow
def test_fsdp_4bit_two_ranks_equal_one_process(runs):
    run, single, log = runs
    assert "fsdp: FSDP2 over 2 processes (accelerate launch --use_fsdp" in log
    assert "FSDP_CPU_RAM_EFFICIENT_LOADING=true" in log  # rank 0 read the base and sent it
    # q,k,v,o + gate,up,down x 2 layers, packed in the compute dtype; the quant_state is not sharded
    assert "fsdp: 4-bit base: 14 NF4 weights sharded packed in float32 (bnb_4bit_quant_storage)" in log
    assert ("loss: reference PyTorch (fast_kernels auto uses the reference path: the fused kernels read whole base "
            "weights, which FSDP shards)") in log
    assert "4-bit nf4" in log
    # Steps 1-2 agree to float32 rounding. The first validation (step 2) has bitsandbytes repack the one process's
    # weights for its avx512-bf16 CPU kernel, which FSDP keeps off (fsdp._ready_4bit): from there the two runs use
    # different CPU kernels, ~5e-4 apart (measured: grad norm 0.67377 vs 0.67348 at step 3).
    got, ref, norms = losses(run), losses(single), step_metric(run, "grad_norm")
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[1], got[2], norms[1], norms[2]] == pytest.approx(
        [ref[1], ref[2], *(step_metric(single, "grad_norm")[s] for s in (1, 2))], rel=1e-6)
    assert got == pytest.approx(ref, rel=1e-4)
    assert norms == pytest.approx(step_metric(single, "grad_norm"), rel=2e-3)
    assert min(norms.values()) > QLORA["max_grad_norm"]  # the clip acted on sharded gradients
    assert val_losses(run) == pytest.approx(val_losses(single), rel=1e-4)
    assert_same_adapter(run, single, atol=2e-5)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


@pytest.mark.slow
def test_fsdp_4bit_checkpoint_resumes_in_one_process(runs, tmp_path):
    """2 FSDP ranks x 2 accumulation resume as 1 process x 4, still 4-bit, without FSDP."""
    run, single, _ = runs
    resume_in_one_process(run, single, tmp_path)


@pytest.mark.slow
def test_one_process_4bit_checkpoint_resumes_under_fsdp(runs, tmp_path):
    """The other way, under torchrun --fsdp true, where each rank quantizes its own copy of the base, with gradient
    checkpointing on (recomputation inside FSDP's units changes no number)."""
    _, single, _ = runs
    stderr = resume_under_fsdp(single, tmp_path, "--gradient_checkpointing", "true")
    assert "fsdp: 4-bit base: 14 NF4 weights" in stderr


@pytest.mark.slow
def test_fsdp_over_one_process_is_the_sharded_path(runs, tiny_model_dir, tmp_path):
    """`torchrun --nproc_per_node 1 ... --fsdp true` (the one-GPU check in bench/fsdp2.sh): FSDP2 over a group of
    one, 4-bit, the same global batch as the one-process run, the same numbers."""
    _, single, _ = runs
    args = train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "one", gradient_accumulation_steps=4,
                      **{**QLORA, "eval_strategy": "no", "save_strategy": "no", "max_steps": 2})
    proc = subprocess.run([*torchrun_cmd(), "--standalone", "--nproc_per_node", "1", "-m", "lorafit", "train",
                           *to_argv(args), "--fsdp", "true"], check=False, capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fsdp: FSDP2 over 1 process (nothing cut: a check of the sharded path) (--fsdp true)" in proc.stderr
    assert "fsdp: 4-bit base: 14 NF4 weights sharded packed in float32" in proc.stderr
    got, ref = losses(tmp_path / "one"), losses(single)
    assert got == pytest.approx({s: ref[s] for s in (1, 2)}, rel=1e-6)  # before the reference's first validation


def test_fsdp_one_process_and_offload_settings():
    from lorafit.config.schema import Config
    from lorafit.errors import ConfigError
    from lorafit.train.fsdp import offload_requested, one_process_group, settings
    from lorafit.train.parallel import Dist

    cfg, torchrun = Config(), {"WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    cfg.train.fsdp = True
    assert one_process_group(cfg, torchrun) and not one_process_group(cfg, {})
    assert settings(cfg, Dist(0, 1, 0), env=torchrun).source == "--fsdp true"
    assert settings(cfg, Dist(0, 1, 0), env={}) is None  # no launcher: plain one process
    cfg.train.fsdp_offload = True
    assert offload_requested(cfg, env={})
    assert settings(cfg, Dist(0, 2, 0), env={}).offload is False  # shards on the CPU already: offload off
    cfg.train.fsdp = False
    with pytest.raises(ConfigError, match="fsdp_offload"):
        settings(cfg, Dist(0, 2, 0), env={})


def test_4bit_sizes_and_weights_do_not_depend_on_quant_storage(tiny_model_dir):
    """FSDP packs NF4 codes in the compute dtype: the same bytes, 8 codes per float32 instead of 2 per uint8, so
    the same parameter count (model.lora.parameter_counts) and the same dequantized weights."""
    import bitsandbytes.functional as bnbf
    import torch
    from transformers import AutoModelForCausalLM

    from lorafit.config.load import build_config
    from lorafit.model.load import load_base_model
    from lorafit.model.lora import parameter_counts

    cfg = build_config(None, {"model": str(tiny_model_dir("llama")), "load_in_4bit": "true"})
    cpu = torch.device("cpu")
    packed = {s: load_base_model(cfg, cpu, quant_storage=s) for s in (None, torch.float32)}
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    total = parameter_counts(plain)[1]
    assert parameter_counts(packed[None])[1] == parameter_counts(packed[torch.float32])[1] == total
    q8, q32 = (m.model.layers[0].mlp.down_proj for m in (packed[None], packed[torch.float32]))
    assert (q8.weight.dtype, q32.weight.dtype) == (torch.uint8, torch.float32)
    assert q32.weight.shape[0] * 4 == q8.weight.shape[0]
    torch.testing.assert_close(bnbf.dequantize_4bit(q32.weight.data, q32.quant_state),
                               bnbf.dequantize_4bit(q8.weight.data, q8.quant_state), rtol=0, atol=0)
