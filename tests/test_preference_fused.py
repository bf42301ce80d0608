"""The fused path serves the preference objectives: FastLoss.sequence_logps (the policy, and the base with the
LoRA products left out) equals the reference path's sequence_logps, values and gradients (CPU, tiny llama, the
plain-PyTorch twins; the Triton kernels once more in the interpreter); DPO / ORPO / KTO train on it."""
from __future__ import annotations

import json
import math

import peft
import pytest
import torch
import transformers
from helpers import pair_records, run_train, train_args, write_jsonl
from triton_interp import INTERPRETED, OUTER_ONLY, run_in_interpreter

from lorafit.data.preference import PrefExample, collate_preference
from lorafit.train.fast import enable_fast_path
from lorafit.train.objectives.dpo import host_index, split_pairs
from lorafit.train.objectives.logprobs import ReferenceLogps, sequence_logps

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_policy():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).float()
    model.config._attn_implementation = "sdpa"
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)   # the policy differs from the base, so adapter-off is checked
    return pm


def pref_batch(kl_pairs: bool = False, first: int = 0, n: int = 2):
    g = torch.Generator().manual_seed(3 + first)

    def ids(k):
        return torch.randint(1, 97, (k,), generator=g).tolist()

    if kl_pairs:
        examples = [PrefExample(ids(3 + i), [ids(4 + i)], [], first + i, label=i % 2 == 0) for i in range(n)]
    else:
        examples = [PrefExample(ids(5 - i), [ids(4 + 2 * i), ids(7 - 2 * i)], [], first + i) for i in range(n)]
    return collate_preference(examples, kl_pairs=kl_pairs)


def lora_grads(pm):
    return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("planned", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
def test_fused_sequence_logps_equal_the_reference_path(ckpt, planned):
    pm = tiny_policy()
    bt = pref_batch()
    ref_sums, ref_counts = sequence_logps(pm, bt, torch.float32)
    w = torch.linspace(-1, 2, ref_sums.numel())     # a different gradient per sequence, as DPO gives
    (ref_sums * w).sum().backward()
    g_ref = lora_grads(pm)
    pm.zero_grad()
    with torch.no_grad(), pm.disable_adapter():
        base_sums, _ = sequence_logps(pm, bt, torch.float32)

    fl = enable_fast_path(pm, gradient_checkpointing=ckpt, offload_activations=False)
    fb = fl.host_plan(bt) if planned else bt
    sums, counts = fl.sequence_logps(fb)
    assert sums.shape == (4,) and torch.equal(counts, ref_counts) and counts.tolist() == [4, 7, 6, 5]
    assert torch.allclose(sums, ref_sums, rtol=1e-5, atol=1e-5)
    (sums * w).sum().backward()
    g = lora_grads(pm)
    assert g.keys() == g_ref.keys()
    for n in g:
        assert (g[n] - g_ref[n]).norm() <= 1e-5 * g_ref[n].norm(), n   # float32, different summation orders

    off, _ = fl.sequence_logps(fb, adapter=False)   # the reference: no LoRA product, no graph
    assert not off.requires_grad
    assert torch.allclose(off, base_sums, rtol=1e-5, atol=1e-5)
    assert (off - sums).abs().max() > 1e-2         # B != 0: the adapter really was left out
    # the policy pass after it still has the adapter
    again, _ = fl.sequence_logps(fb)
    assert torch.allclose(again, sums, rtol=1e-6, atol=1e-6)


def test_reference_logps_take_the_fused_path_and_cache(monkeypatch):
    pm = tiny_policy()
    batches = [pref_batch(kl_pairs=True), pref_batch(kl_pairs=True, first=2, n=3)]
    with torch.no_grad(), pm.disable_adapter():
        want = [sequence_logps(pm, bt, torch.float32)[0] for bt in batches]
    fl = enable_fast_path(pm, gradient_checkpointing=False)
    ref = ReferenceLogps()
    for bt, w in zip(batches, want, strict=True):
        assert torch.allclose(ref(pm, bt, torch.float32, fl), w, rtol=1e-5, atol=1e-5)
    # cached: no model runs, each sequence reads back its own value (host keys or keys from the tensors)
    monkeypatch.setattr(fl, "sequence_logps", lambda *a, **k: pytest.fail("reference recomputed"))
    for bt, w in zip(batches, want, strict=True):
        assert torch.allclose(ref(pm, host_index(bt, pin=False), torch.float32, fl), w, rtol=1e-5, atol=1e-5)
        assert torch.allclose(ref(pm, bt, torch.float32, fl), w, rtol=1e-5, atol=1e-5)


def test_host_index_splits_pairs_as_the_masks_do():
    bt = pref_batch(n=3)
    values = torch.arange(6, dtype=torch.float32) * 1.5
    hb = host_index(bt, pin=False)
    assert hb["seq_keys"] == [(0, 0, 0), (1, 0, 0), (0, 1, 1), (1, 1, 1), (0, 2, 2), (1, 2, 2)]
    for a, b in zip(split_pairs(values, hb), split_pairs(values, bt), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow  # ~25 s: the interpreter runs each Triton program in Python
@pytest.mark.skipif(**OUTER_ONLY)
def test_fused_preference_logps_through_triton_kernels_in_interpreter():
    run_in_interpreter(__file__, "fused_sequence_logps_equal and True-True or in_interpreter_the_per_token", expect=2)


@pytest.mark.skipif(not INTERPRETED, reason="runs inside the interpreter test above")
def test_in_interpreter_the_per_token_kernel_runs():
    from lorafit.kernels.cross_entropy import linear_cross_entropy
    from lorafit.train.fast import _ops
    assert _ops(torch.device("cpu")).ce_rows is linear_cross_entropy


# -- end to end: lorafit train --method dpo|orpo|kto on the fused path (CPU: fast_kernels on runs the twins) --

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_records(16))


def _steps(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_dpo_on_the_fused_path_starts_at_ln2_and_trains_as_the_reference_path(tiny_model_dir, pairs, tmp_path):
    runs = {k: run_train(**train_args(tiny_model_dir("llama"), pairs, tmp_path / k, method="dpo", max_steps=3,
                                      learning_rate=5e-3, lora_dropout=0, val_size=0, fast_kernels=k))
            for k in ("on", "off")}
    assert json.loads((runs["on"] / "train_summary.json").read_text())["loss_path"] == "fused"
    assert json.loads((runs["off"] / "train_summary.json").read_text())["loss_path"] == "reference"
    steps, ref = _steps(runs["on"]), _steps(runs["off"])
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["margin"] == 0.0 and steps[0]["rewards/chosen"] == 0.0
    assert steps[-1]["margin"] != 0.0 and all(math.isfinite(r["loss"]) for r in steps)
    # the same updates: steps 2 and 3 (after one and two optimizer steps) match the reference path's
    for a, b in zip(steps, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["margin"] == pytest.approx(b["margin"], abs=1e-4)


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_run_on_the_fused_path(tiny_model_dir, pairs, tmp_path, method):
    out = run_train(**train_args(tiny_model_dir("llama"), pairs, tmp_path / method, method=method, max_steps=2,
                                 lora_dropout=0, val_size=0, fast_kernels="on"))
    assert json.loads((out / "train_summary.json").read_text())["loss_path"] == "fused"
    steps = _steps(out)
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    if method == "kto":
        assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference: 1 - sigmoid(0) each


def test_ref_adapter_reference_with_the_fused_policy(tiny_model_dir, pairs, tmp_path):
    """--ref_adapter: the policy on the fused path, the reference through the model's own forward with that
    adapter; step 1 equals the all-reference-path run's."""
    model = tiny_model_dir("llama")
    first = run_train(**train_args(model, pairs, tmp_path / "first", method="orpo", max_steps=2, learning_rate=5e-2,
                                   lora_dropout=0, val_size=0))
    runs = {k: run_train(**train_args(model, pairs, tmp_path / k, method="dpo", max_steps=1, lora_dropout=0,
                                      val_size=0, ref_adapter=first, fast_kernels=k)) for k in ("on", "off")}
    assert json.loads((runs["on"] / "train_summary.json").read_text())["loss_path"] == "fused"
    fused, ref = (_steps(runs[k])[0] for k in ("on", "off"))
    assert abs(fused["loss"] - math.log(2)) > 1e-3
    assert fused["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert fused["logps/chosen"] == pytest.approx(ref["logps/chosen"], rel=1e-5)
