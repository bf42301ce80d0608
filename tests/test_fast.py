"""The fast path's loss and LoRA gradients equal the model's own forward (CPU, tiny models).

On CPU the fast path runs the plain-PyTorch twins, so this checks the wiring (projections,
splits, RoPE, document masks, checkpointing, label shift) against transformers itself."""

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import lora_grads
from helpers import tiny_peft as tiny
from triton_interp import INTERPRETED, OUTER_ONLY, run_in_interpreter

from lorafit.train.fast import enable_fast_path, fast_forward_supported, loss_path


def batch(b=2, t=24, packed=False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    out = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
           "position_ids": torch.arange(t).expand(b, t).clone()}
    if packed:
        doc = torch.zeros(b, t, dtype=torch.long)
        doc[:, :10], doc[:, 10:20] = 1, 2                 # two documents then 4 padding tokens
        pos = torch.cat([torch.arange(10), torch.arange(10), torch.arange(4)]).expand(b, t).clone()
        labels[:, 20:] = -100
        labels[:, 10] = -100
        out.update(doc_ids=doc, position_ids=pos, labels=labels)
    return out


def hf_loss(pm, bt):
    logits = pm(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"],
                position_ids=bt["position_ids"]).logits
    tgt = F.pad(bt["labels"][:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="sum", ignore_index=-100)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "phi3"])
@pytest.mark.parametrize("ckpt, offload", [(False, True), (True, False), (True, True)])
def test_fast_equals_model(model_type, ckpt, offload):
    pm = tiny(model_type)
    assert fast_forward_supported(pm) == (True, "ok")
    bt = batch()
    ref = hf_loss(pm, bt)
    ref.backward()
    g_ref = lora_grads(pm)
    pm.zero_grad()
    fl = enable_fast_path(pm, gradient_checkpointing=ckpt, offload_activations=offload)
    loss, n = fl(bt)
    if ckpt:
        # parked (offload): input, attention output, mid-layer residual, the four low-rank activations and the
        # attention's state, and the recomputation replays them (no attention forward, no o product, no x @ A^T);
        # kept on the device: the input only
        assert {len(v) for v in fl.store.saved.values()} == ({11} if offload else {1})
    loss.backward()
    assert n.item() == (F.pad(bt["labels"][:, 1:], (0, 1), value=-100) != -100).sum().item()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    for name, g in lora_grads(pm).items():
        torch.testing.assert_close(g, g_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_pass_planned_on_the_host_gives_the_same_loss():
    """The loop hands the fused path its label positions and segment plan computed on the CPU batch (no host
    sync in a pass); the loss is the one the path finds by itself."""
    from lorafit.kernels.reference import segments

    pm = tiny("llama")
    fl = enable_fast_path(pm, gradient_checkpointing=True)
    bt = batch(packed=True)
    planned = fl.host_plan(bt)
    assert torch.equal(planned["cu_seqlens"], segments(bt["doc_ids"])) and planned["max_seqlen"] == 10
    tgt = F.pad(bt["labels"][:, 1:], (0, 1), value=-100).reshape(-1)
    assert torch.equal(planned["label_index"], (tgt != -100).nonzero().squeeze(1))
    torch.testing.assert_close(fl(planned)[0], fl(bt)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_packed_rows_equal_separate_documents(model_type):
    pm = tiny(model_type)
    bt = batch(packed=True)
    loss, n = enable_fast_path(pm, gradient_checkpointing=True)(bt)
    total, count = 0.0, 0
    for b in range(2):
        for s, e in ((0, 10), (10, 20)):
            one = {k: v[b:b + 1, s:e] for k, v in bt.items() if k != "doc_ids"}
            one["position_ids"] = torch.arange(e - s)[None]
            total = total + hf_loss(pm, one)
            count += (one["labels"][:, 1:] != -100).sum().item()
    assert n.item() == count
    torch.testing.assert_close(loss, total, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_fast_path_sees_every_optimizer_update(model_type):
    """The compute-dtype LoRA factors are cached for a whole forward/backward (FactorPack): each call must
    pick up what the optimizer wrote since the last one, so three steps match three reference steps."""
    pm_fast, pm_ref = tiny(model_type), tiny(model_type)
    fl = enable_fast_path(pm_fast, gradient_checkpointing=True)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (pm_fast, pm_ref)]
    for i in range(3):
        bt = batch()
        loss, n = fl(bt)
        (loss / n).backward()
        ref = hf_loss(pm_ref, bt)
        (ref / n).backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4, msg=f"step {i}")
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)


def test_dropout_is_reproduced_in_recompute():
    pm = tiny("llama", dropout=0.3)
    pm.train()
    bt = batch()
    fl = enable_fast_path(pm, gradient_checkpointing=True)
    torch.manual_seed(5)
    loss, _ = fl(bt)
    loss.backward()
    g_ckpt = lora_grads(pm)
    pm.zero_grad()
    fl_plain = enable_fast_path(pm, gradient_checkpointing=False)
    torch.manual_seed(5)
    loss2, _ = fl_plain(bt)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    for name, g in lora_grads(pm).items():
        torch.testing.assert_close(g, g_ckpt[name], rtol=1e-4, atol=1e-6, msg=name)
    pm.eval()
    with torch.no_grad():
        assert fl(bt)[0].item() == pytest.approx(hf_loss(pm, bt).item(), rel=1e-5)


def test_unsupported_architecture_takes_the_reference_path_and_says_why():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=97, n_positions=64)
    pm = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), peft.LoraConfig(r=2, target_modules=["c_attn"]))
    ok, reason = fast_forward_supported(pm)
    assert not ok and "gpt2" in reason
    fast, why = loss_path(pm, True, "fused LoRA kernels", gradient_checkpointing=False)
    assert fast is None and "gpt2" in why
    with pytest.raises(ValueError, match="gpt2"):
        enable_fast_path(pm, gradient_checkpointing=False)


@pytest.mark.skipif(**OUTER_ONLY)
def test_fast_path_through_triton_kernels_in_interpreter():
    """The same equality tests with the Triton RMSNorm, RoPE, SwiGLU and linear+CE kernels in the
    fused forward and backward (Triton's interpreter on CPU), not their twins."""
    # one checkpointed, offloaded case per architecture (the others differ only outside the kernels)
    run_in_interpreter(__file__, "fast_equals_model[True-True or packed_rows_equal or in_interpreter_uses "
                                 "or dropout_is_reproduced", expect=8)


@pytest.mark.skipif(not INTERPRETED, reason="runs inside test_fast_path_through_triton_kernels_in_interpreter")
def test_in_interpreter_uses_the_triton_kernels():
    from lorafit.kernels.rmsnorm import rmsnorm
    from lorafit.train.fast import _ops
    assert _ops(torch.device("cpu")).rmsnorm is rmsnorm


def test_offload_activations_reaches_the_fused_path_and_keeps_the_loss():
    """`--offload_activations false` keeps each checkpointed layer's input on the device instead of parking
    activations in host memory: the store says so, and loss and gradients are the offloading run's."""
    pm = tiny("llama")
    bt = batch()
    runs = {}
    for offload in (True, False):
        fast, _ = loss_path(pm, True, "fused LoRA kernels", gradient_checkpointing=True, offload_activations=offload)
        assert fast.store.offload is offload
        pm.zero_grad(set_to_none=True)
        loss, _ = fast(bt)
        loss.backward()
        runs[offload] = (loss.item(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None})
    assert runs[False][0] == pytest.approx(runs[True][0], rel=1e-6)
    for name, g in runs[True][1].items():
        torch.testing.assert_close(runs[False][1][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("model_type, ckpt, mode", [("llama", False, "all"), ("phi3", True, "all"),
                                                   ("phi3", True, "backward")])
def test_fp8_base_keeps_the_loss_and_gradients_close(model_type, ckpt, mode):
    """--fp8_base all: the base's products in e4m3 (CPU: the twins and torch._scaled_mm) move the loss by well under
    1% and keep every LoRA gradient's direction; they do run (the numbers are not the compute dtype's). backward:
    the loss is the compute dtype's, the gradients move."""
    out = []
    for fp8 in ("off", mode):
        pm = tiny(model_type)
        fl = enable_fast_path(pm, gradient_checkpointing=ckpt, fp8_base=fp8)
        loss, _ = fl(batch())
        loss.backward()
        out.append((loss.item(), lora_grads(pm)))
    (l0, g0), (l1, g1) = out
    assert (l0 != l1 and abs(l1 - l0) / l0 < 2e-3) if mode == "all" else l0 == l1
    assert any(not torch.equal(g, g1[name]) for name, g in g0.items())
    for name, g in g0.items():
        assert F.cosine_similarity(g.flatten(), g1[name].flatten(), dim=0) > 0.99, name


def test_fp8_base_without_the_fused_path_or_fp8_tensor_cores_is_a_user_error():
    from lorafit.errors import UserError
    from lorafit.train.fast import check_fp8
    with pytest.raises(UserError, match="fp8_base needs the fused kernels, which this run cannot use"):
        check_fp8(False, "no CUDA GPU, so fast_kernels auto uses the reference path", torch.device("cpu"))
    check_fp8(True, "fused LoRA kernels", torch.device("cpu"))   # the CPU runs the twins: allowed
