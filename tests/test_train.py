"""The training loop on CPU with tiny models: run directory contract, pinned losses, accumulation, options."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import adapter_tensors, alpaca_file, alpaca_records, assert_same_adapter, losses, run_train, train_args

from lorafit.train.optim import build_optimizer

# Recorded once (tiny llama, seed 7, 5 steps of 4 records, lr 2e-4, cosine); step 1 checked by hand: the base
# model's token-weighted loss over the step's 4 records run one by one is 6.3633947 (LoRA's B starts at 0).
PINNED = {1: 6.36339453, 2: 6.44999017, 3: 6.4304511, 4: 6.37330627, 5: 6.39771925}


def test_run_directory_and_peft_loading(tiny_model_dir, tmp_path):
    """End to end: every file of the run directory, and the adapter loads unchanged with PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    out = tmp_path / "run"
    run_train(**train_args(model_dir, alpaca_file(), out, eval_strategy="steps", eval_steps=2, report_to="tensorboard",
                           preview_steps=5, save_strategy="steps", save_steps=2, save_total_limit=1))
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "template.json",
                 "versions.json", "data.json", "metrics.jsonl", "previews.jsonl", "loss.png", "train_summary.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000004"]  # save_total_limit 1
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 2, 4, 5]  # step 0: the base, the curve's start
    assert all(math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-6) for r in recs if "val_loss" in r)
    previews = [json.loads(x) for x in (out / "previews.jsonl").read_text().splitlines()]
    assert len(previews) == 2 and previews[0]["step"] == 5  # the first two held-out prompts
    data = json.loads((out / "data.json").read_text())
    assert len(data["fingerprint"]) == 64
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 5 and 0 < summary["trainable_share"] < 1
    assert summary["steady_tokens_per_s"] > 0  # the steps after the first
    card = (out / "README.md").read_text()
    for part in (f"base_model: {model_dir}", "5 steps", "44 training and 4 held-out", "model's own chat template"):
        assert part in card, card

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([[5, 17, 33, 60, 2]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
        adapted = tuned(ids).logits
    assert not torch.allclose(plain, adapted)  # the adapter was trained and loaded, not zero


def test_validation_default_cadence_gives_a_curve(tiny_model_dir, tmp_path):
    """eval_steps unset: every total_steps // 10 steps (at least 1), plus step 0 and the last step."""
    out = run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "run", eval_strategy="steps",
                                 max_steps=3))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 1, 2, 3]
    assert val[0]["val_loss"] != val[-1]["val_loss"]


def test_model_card_names_the_hub_base_of_the_builtin(tmp_path):
    """PEFT writes the built-in model's cache path and an empty card; the run says where the base comes from."""
    from lorafit.config.schema import Config
    from lorafit.train.run_files import describe_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/root/.cache/x", "r": 16}))
    (tmp_path / "data.json").write_text(json.dumps({"report": {"train_examples": 1140, "val_examples": 60}}))
    (tmp_path / "template.json").write_text(json.dumps({"name": "model", "system_prompt": "Answer briefly."}))
    describe_adapter(tmp_path, Config(), {"steps": 30, "epochs": 0.21, "tokens": 12345, "best_val_loss": 1.2345})
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter == {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 16}
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    for part in ("1140 training and 60", "'Answer briefly.'", "best validation loss 1.2345", "12,345 tokens",
                 "AutoPeftModelForCausalLM", "--dtype q4_k_m"):
        assert part in card, part


def test_pinned_losses(tiny_model_dir, tmp_path):
    out = run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "run"))
    got = losses(out)
    assert got == pytest.approx(PINNED, abs=1e-4), got


@pytest.mark.slow
def test_the_split_of_a_step_changes_nothing(tiny_model_dir, tmp_path):
    """4x4, 16x1 and 2x8 take the same 16 records a step (length grouping sorts whole steps), and the
    token-weighted loss over padding-free passes makes the updates equal, however many passes a step takes."""
    common = {"lora_dropout": 0, "group_by_length": "true", "max_steps": 3, "logging_steps": 100}
    runs = [run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / f"{bs}x{acc}",
                                   per_device_train_batch_size=bs, gradient_accumulation_steps=acc, **common, **extra))
            for bs, acc, extra in ((4, 4, {}), (16, 1, {"max_tokens_per_pass": 64}),
                                   (2, 8, {"max_tokens_per_pass": 200}))]
    first = losses(runs[0])
    assert len(first) == 3
    for other in runs[1:]:
        assert losses(other) == pytest.approx(first, rel=1e-5)
        assert_same_adapter(runs[0], other, atol=1e-6)


def test_packing_and_epochs(tiny_model_dir, tmp_path):
    """Epoch mode: steps = ceil(epochs x steps per epoch); per-epoch eval and save; packed rows."""
    out = run_train(**train_args(tiny_model_dir("qwen2"), alpaca_file(), tmp_path / "run", max_steps=-1,
                                 num_train_epochs=1, packing="true", per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, eval_strategy="epoch", save_strategy="epoch",
                                 logging_steps=100))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    assert [r["step"] for r in recs if "val_loss" in r] == [0, steps[-1]]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{steps[-1]:06d}"]
    assert all(math.isfinite(r["loss"]) for r in recs if "loss" in r)


def test_refuses_finished_run_then_overwrites(tiny_model_dir, tmp_path):
    from lorafit.errors import UserError

    args = train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "run", max_steps=1)
    run_train(**args)
    before = (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a trained adapter") as e:
        run_train(**args)
    assert "--overwrite_output_dir" in str(e.value)
    assert (tmp_path / "run" / "adapter_model.safetensors").read_bytes() == before
    run_train(**{**args, "overwrite_output_dir": "true", "max_steps": "2"})
    assert max(losses(tmp_path / "run")) == 2


@pytest.mark.parametrize("fields, base, optimizer", [
    ({"load_in_4bit": "true", "optim": "paged_adamw_8bit", "gradient_checkpointing": "true"},
     "Linear4bit", "PagedAdamW8bit"),
    ({"bf16": "true", "optim": "paged_adamw_32bit", "lr_scheduler_type": "linear", "warmup_ratio": "0.5",
      "gradient_checkpointing": "true"}, "bfloat16", "PagedAdamW32bit"),
    ({"load_in_8bit": "true", "optim": "adamw_8bit", "weight_decay": "0.01", "lr_scheduler_type": "constant"},
     "Linear8bitLt", "AdamW8bit"),
], ids=["qlora-nf4-paged8bit-ckpt", "bf16-paged32bit-ckpt", "int8-adamw8bit"])
def test_precision_and_optimizers(tiny_model_dir, tmp_path, monkeypatch, fields, base, optimizer):
    """The run trains the base it was asked for (4-bit / 8-bit layers, bf16 weights) with the optimizer named,
    and its steps move the adapter (PEFT starts lora_B at zero). What each optimizer does: test_optim.py."""
    pytest.importorskip("bitsandbytes")
    import lorafit.train.loop as loop

    seen = {}

    def spy(model, t):
        layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj")).base_layer
        seen.update(base=type(layer).__name__ if base.startswith("Linear") else str(layer.weight.dtype)[6:],
                    lora=[p.dtype for p in model.parameters() if p.requires_grad])
        opt = build_optimizer(model, t)
        seen["optimizer"] = type(opt).__name__
        return opt

    monkeypatch.setattr(loop, "build_optimizer", spy)
    out = run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "run", max_steps=2, **fields))
    assert (seen["base"], seen["optimizer"]) == (base, optimizer)
    assert set(seen["lora"]) == {torch.float32}                        # LoRA weights train in fp32 throughout
    got = losses(out)
    assert len(got) == 2 and all(math.isfinite(v) for v in got.values())
    b = [v for k, v in adapter_tensors(out).items() if "lora_B" in k]
    assert b and all(v.abs().max() > 0 for v in b)


def test_nan_policy(tiny_model_dir, tmp_path, monkeypatch):
    """A non-finite loss at step 3: 'skip' reports and skips it; 'stop' stops, keeping the checkpoint of step 2."""
    import lorafit.train.objectives.sft as T
    from lorafit.errors import UserError

    calls = {"n": 0}
    real = T.reference_loss

    def poisoned(model, batch, dtype=torch.float32):
        ce, n = real(model, batch, dtype)
        calls["n"] += 1
        return (ce * float("nan") if calls["n"] == 3 else ce), n

    monkeypatch.setattr(T, "reference_loss", poisoned)
    skip = run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "skip", max_steps=4,
                                  nan_policy="skip"))
    recs = [json.loads(x) for x in (skip / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in recs] == [False, False, True, False]
    assert json.loads((skip / "train_summary.json").read_text())["skipped_steps"] == 1

    calls["n"] = 0
    with pytest.raises(UserError, match="non-finite loss at step 3") as e:
        run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "stop", max_steps=4,
                               save_strategy="steps", save_steps=2))
    assert "step-000002" in str(e.value) and "nan_policy skip" in str(e.value)
    from lorafit.train.checkpoint import latest_good

    path, state = latest_good(tmp_path / "stop")
    assert path.name == "step-000002" and state["step"] == 2
    assert not (tmp_path / "stop" / "adapter_model.safetensors").exists()


def test_out_of_memory_message_and_auto_batch_size(tiny_model_dir, tmp_path, monkeypatch):
    """Simulated OOM for passes over 64 tokens: a message with the knobs, or a pass budget found that fits."""
    import lorafit.train.objectives.sft as T
    from lorafit.errors import UserError

    real = T.reference_loss

    def small_gpu(model, batch, dtype=torch.float32):
        if batch["input_ids"].numel() > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, batch, dtype)

    monkeypatch.setattr(T, "reference_loss", small_gpu)
    with pytest.raises(UserError) as e:
        run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "oom", max_steps=2))
    msg = str(e.value)
    assert "out of GPU memory" in msg and "passes of up to 512 tokens" in msg and "max_seq_length 64" in msg
    for knob in ("--max_tokens_per_pass", "--max_seq_length", "--gradient_checkpointing", "--load_in_4bit",
                 "--auto_find_batch_size"):
        assert knob in msg

    out = run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "auto", max_steps=2,
                                 per_device_train_batch_size=8, auto_find_batch_size="true"))
    assert len(losses(out)) == 2
    assert (out / "adapter_model.safetensors").is_file()


def test_push_to_hub_offline_keeps_adapter(tiny_model_dir, tmp_path, monkeypatch):
    from lorafit.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="uploading it to the hub repo 'me/tiny' failed") as e:
        run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "run", max_steps=1,
                               push_to_hub="me/tiny"))
    assert "adapter is saved" in str(e.value)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_token_never_written(tiny_model_dir, tmp_path, monkeypatch):
    planted = "hf_plantedTOKENabcdefghijklmnopqrstuvwxyz"
    monkeypatch.setenv("HF_TOKEN", planted)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", planted)
    out = run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "run", max_steps=2,
                                 report_to="tensorboard", save_strategy="steps", save_steps=1, preview_steps=2))
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    assert len(files) > 15
    for p in files:
        assert planted.encode() not in p.read_bytes(), p


def test_schedules():
    from lorafit.config.schema import TrainArgs
    from lorafit.train.optim import lr_factor, warmup_steps

    assert warmup_steps(TrainArgs(warmup_ratio=0.1), 95) == 10
    assert warmup_steps(TrainArgs(warmup_ratio=0.1, warmup_steps=3), 95) == 3
    cos = [lr_factor(s, kind="cosine", warmup=2, total=10) for s in range(10)]
    assert cos[:2] == pytest.approx([1 / 3, 2 / 3]) and cos[2] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(cos[2:]))
    assert cos[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    lin = [lr_factor(s, kind="linear", warmup=0, total=4) for s in range(4)]
    assert lin == pytest.approx([1, 0.75, 0.5, 0.25])
    assert [lr_factor(s, kind="constant", warmup=1, total=4) for s in range(4)] == [0.5, 1, 1, 1]


def test_early_stopping_counts_validations():
    from lorafit.train.log import NullLog
    from lorafit.train.plan import Position

    pos = Position()
    seen = [pos.record_validation(v, 2, NullLog()) for v in (3.0, 2.5, 2.6, 2.4, 2.45, 2.5)]
    assert seen == [False, False, False, False, False, True]
    assert pos.best_val == 2.4


def test_fused_adamw_steps_like_adamw(tiny_model_dir, tmp_path):
    """--optim adamw_torch_fused is torch's fused AdamW: the same updates as the default, and the run says so."""
    common = {"max_steps": 3, "lora_dropout": 0}
    a = run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "a", **common))
    b = run_train(**train_args(tiny_model_dir("llama"), alpaca_file(), tmp_path / "b", optim="adamw_torch_fused",
                               **common))
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    assert_same_adapter(a, b, atol=1e-6)
    assert "adamw_torch_fused" in (b / "config.yaml").read_text()


def test_alpaca_records_are_distinct():
    recs = alpaca_records()
    assert len({json.dumps(r) for r in recs}) == len(recs)
