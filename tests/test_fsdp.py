"""FSDP on CPU (gloo, torch's FSDP2): `accelerate launch --use_fsdp --num_processes 2 -m lorafit train` equals one
process with the same global batch, step for step (losses, gradient norms with clipping active, validation, the
adapter), writes one PEFT adapter that PeftModel loads, and its checkpoints resume in one process without FSDP;
a one-process checkpoint resumes under `torchrun ... --fsdp true`. FSDP with an 8-bit base is a config error (4-bit:
test_fsdp_qlora.py).

The accelerate launch matters: by default (FSDP_CPU_RAM_EFFICIENT_LOADING=true) transformers reads the weights
on rank 0 only and gives the other ranks zeros, so without lorafit's broadcast the losses here differ from step 1.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import (
    FSDP_COMMON,
    REPO,
    adapter_tensors,
    alpaca_file,
    assert_same_adapter,
    losses,
    resume_in_one_process,
    resume_under_fsdp,
    run_cli,
    run_train,
    step_metric,
    subprocess_env,
    to_argv,
    train_args,
    val_losses,
)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    args = train_args(tiny_model_dir("llama"), alpaca_file(), root / "fsdp", gradient_accumulation_steps=2,
                      **FSDP_COMMON)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run([*launch, "-m", "lorafit", "train", *to_argv(args)], check=False, capture_output=True,
                          text=True, timeout=400, cwd=REPO, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), root / "single",
                                    gradient_accumulation_steps=4, **FSDP_COMMON))
    return root / "fsdp", single, proc.stderr


@pytest.mark.slow
def test_fsdp_two_ranks_equal_one_process(runs, tiny_model_dir):
    run, single, log = runs
    assert "fsdp: FSDP2 over 2 processes (accelerate launch --use_fsdp" in log
    assert "FSDP_CPU_RAM_EFFICIENT_LOADING=true" in log  # accelerate's default, honoured by a broadcast
    assert "1 per device x 2 accumulation x 2 processes = 4 records" in log
    assert "loss: reference PyTorch (fast_kernels auto uses the reference path: the fused kernels read whole" in log
    assert losses(run) == pytest.approx(losses(single), rel=1e-4)
    assert sorted(losses(run)) == [1, 2, 3, 4]
    norms = step_metric(run, "grad_norm")
    assert norms == pytest.approx(step_metric(single, "grad_norm"), rel=1e-4)
    assert min(norms.values()) > FSDP_COMMON["max_grad_norm"]  # the clip acted on sharded gradients
    assert val_losses(run) == pytest.approx(val_losses(single), rel=1e-4)
    assert_same_adapter(run, single, atol=1e-5)
    # rank 0 alone wrote: one metrics line per step and validation, one checkpoint per save, one summary
    assert sum(1 for _ in (run / "metrics.jsonl").open()) == 4 + 3  # validations at steps 0, 2 and 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["fsdp"] is True and len(summary["peak_memory_gib_per_rank"]) == 2


@pytest.mark.slow
def test_fsdp_adapter_loads_with_peft(runs, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _, _ = runs
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")), str(run))
    saved = adapter_tensors(run)
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert state.keys() == saved.keys() and len(saved) == 2 * 4 * 2  # q,k,v,o x A,B x 2 layers
    for k, v in saved.items():
        torch.testing.assert_close(state[k], v, msg=k)
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # trained, not the zero init


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process(runs, tmp_path):
    """Checkpoints hold whole tensors in the single-process layout: 2 FSDP ranks x 2 resume as 1 process x 4."""
    run, single, _ = runs
    resume_in_one_process(run, single, tmp_path)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_fsdp(runs, tmp_path):
    """The other way: adapter and AdamW state are cut into each rank's shards on resume."""
    _, single, _ = runs
    resume_under_fsdp(single, tmp_path)


@pytest.mark.parametrize("how", ["flag", "accelerate"])
def test_fsdp_with_8bit_is_a_config_error(tmp_path, how):
    argv = ["train", "--load_in_8bit", "true", "--output_dir", str(tmp_path / "run")]
    proc = run_cli(*argv, "--fsdp", "true") if how == "flag" else run_cli(*argv, ACCELERATE_USE_FSDP="true")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: FSDP (") and "cannot shard an 8-bit" in lines[0]
    assert lines[1].strip().startswith("fix: shard a 4-bit base instead (--load_in_4bit true")
    assert ("--fsdp true" if how == "flag" else "accelerate launch --use_fsdp") in lines[0]
    assert not (tmp_path / "run").exists()


def test_fsdp_config_checks():
    from lorafit.config.load import build_config
    from lorafit.errors import ConfigError

    build_config(None, {"fsdp": "true", "bf16": "true"})
    build_config(None, {"fsdp": "true", "load_in_4bit": "true"})  # QLoRA under FSDP
    for bad, words in (({"fp16": "true"}, "not fp16"), ({"optim": "paged_adamw_32bit"}, "adamw_torch"),
                       ({"auto_find_batch_size": "true"}, "probe batch sizes"), ({"load_in_8bit": "true"}, "8-bit")):
        with pytest.raises(ConfigError, match=words):
            build_config(None, {"fsdp": "true", **bad})


def test_fsdp_settings_from_accelerate_env():
    from lorafit.config.schema import Config
    from lorafit.train.fsdp import offload_requested, settings
    from lorafit.train.parallel import Dist

    two, one = Dist(0, 2, 0), Dist(0, 1, 0)
    assert settings(Config(), two, env={}) is None  # DDP unless asked
    assert settings(Config(), one, env={"ACCELERATE_USE_FSDP": "true"}) is None  # one process: nothing to shard
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP",
           "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer, MyBlock", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
           "FSDP_ACTIVATION_CHECKPOINTING": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}
    s = settings(Config(), two, env=env)
    assert s.source.startswith("accelerate launch --use_fsdp")
    assert (s.reshard_after_forward, s.layer_classes, s.rank0_loads, s.activation_checkpointing) == \
        (False, ["LlamaDecoderLayer", "MyBlock"], True, True)
    notes = " ".join(s.notes)
    assert "FSDP_VERSION=1 ignored" in notes and "FSDP_STATE_DICT_TYPE ignored" in notes
    assert settings(Config(), two, env={**env, "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}).no_wrap
    assert offload_requested(env={"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"})
    assert not offload_requested(env={"FSDP_OFFLOAD_PARAMS": "true"})
    cfg = Config()
    cfg.train.fsdp = True
    assert settings(cfg, two, env={}).source == "--fsdp true"
