"""CUDA graphs of the fused pass replay what the eager fused pass computes (needs a GPU; bench/run.sh `tests`).

Passes of two bucket shapes in turn, the LoRA weights changed between passes as an optimizer would: every
pass's loss and every LoRA gradient equal the eager fused path's (bf16: to a relative 2e-2); each bucket runs
eagerly on its first pass and is captured on its second; under LoRA dropout a replay draws the masks its seed
gives, as the eager pass does; under fp16 it reads the scaler's current scale; with fp8_base it replays the fp8
products; a .grad replaced behind the graphs' back makes them capture again instead of writing to the old tensor;
records of one length replay dense attention (cuDNN's) and equal the varlen pass.
And fp8_base on an NF4 base (the Triton decoders to e4m3, torch._scaled_mm) stays close to the bf16 products."""

import pytest
import torch

from lorafit.data.batching import concat_row
from lorafit.train.fast import enable_fast_path
from lorafit.train.graphs import PassGraphs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _model(tmp_path, nf4: bool, dropout: float = 0.0, dtype=torch.bfloat16, kv_heads: int = 2):
    import peft
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, vocab_size=512, max_position_embeddings=512,
                                   tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    if nf4:
        pytest.importorskip("bitsandbytes")
        model.save_pretrained(tmp_path / "m")
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=q,
                                                                  dtype=torch.bfloat16, device_map={"": 0})
    else:
        model = model.cuda()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                   target_modules="all-linear"))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return pm


def _row(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    pieces = []
    for n in lengths:
        ids = torch.randint(1, 512, (n,), generator=g).tolist()
        pieces.append((ids, [-100] * (n // 3) + ids[n // 3:]))
    return concat_row(pieces, max_seq_length=128)


def _replay_equals_eager(fl, graphs, params, bt, i, dtype, scaler=None, plan=None):
    """Pass i of `bt` eagerly (planned by `plan`, default fl.host_plan) and through `graphs`: equal loss and LoRA
    gradients; then an optimizer-like step (the replay must read the new factors, and the scaler's new scale)."""
    w = 1.0 / (i + 1)
    for p in params:
        p.grad = None
    torch.manual_seed(i)                        # the pass's dropout seed: the same draw for both runs
    with torch.cuda.stream(graphs.stream):      # where the loop runs every pass
        with torch.autocast("cuda", dtype=dtype):
            planned = (plan or fl.host_plan)(bt)
            loss, _ = fl({k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in planned.items()})
        (scaler.scale(loss * w) if scaler is not None else loss * w).backward()
        ref = [p.grad.clone() for p in params]
        loss = loss.detach()
    torch.cuda.current_stream().wait_stream(graphs.stream)
    for p in params:
        p.grad = None        # the graphs rebind the .grad they were captured with
    torch.manual_seed(i)
    got = graphs.run(bt, w)
    assert rel(got, loss) < 2e-2, i
    worst = max(rel(p.grad, r) for p, r in zip(params, ref, strict=True))
    assert worst < 2e-2, (i, worst)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.02)
        if scaler is not None:
            scaler.update(scaler.get_scale() / 2)   # in place, as the loop's update does


@pytest.mark.parametrize("nf4, dropout, fp16, fp8", [(False, 0.0, False, "off"), (True, 0.0, False, "off"),
                                                     (True, 0.1, False, "off"), (False, 0.1, True, "off"),
                                                     (True, 0.1, False, "all")])
def test_replays_equal_the_eager_fused_pass(tmp_path, nf4, dropout, fp16, fp8):
    dtype = torch.float16 if fp16 else torch.bfloat16
    pm = _model(tmp_path, nf4, dropout, dtype)
    pm.train()
    fl = enable_fast_path(pm, gradient_checkpointing=True, offload_activations=True, fp8_base=fp8)
    params = [p for p in pm.parameters() if p.requires_grad]
    # fp16: the loss is scaled by the scaler's device tensor, which the loop changes between steps
    scaler = torch.amp.GradScaler("cuda", init_scale=256.0) if fp16 else None
    graphs = PassGraphs(fl, params, max_seq_length=128, dtype=dtype, device=torch.device("cuda"), scaler=scaler)
    rows = [_row([100, 40, 77], 1), _row([128, 3, 90, 20], 2), _row([128] * 3 + [60], 3), _row([50, 51], 4),
            _row([128] * 3 + [90], 5), _row([7, 128, 100], 6)]
    for i, bt in enumerate(rows):
        _replay_equals_eager(fl, graphs, params, bt, i, dtype, scaler)
    s = graphs.summary()
    assert s["buckets"] == [256, 512] and s["captured"] == 2 and s["replays"] == len(rows) - 2, s
    # a .grad replaced behind the graphs' back: capture again rather than write to the tensor they hold
    params[0].grad = params[0].grad.clone()
    graphs.run(rows[0], 1.0)            # the bucket's graphs are gone: eager first, then captured again
    graphs.run(rows[0], 1.0)
    assert graphs.summary()["captured"] == 3


@pytest.mark.parametrize("nf4, fp8", [(False, "off"), (True, "all")])
def test_records_of_one_length_replay_dense_attention_equal_to_varlen(tmp_path, nf4, fp8):
    """Records of one length that tile their bucket replay dense attention (cuDNN's kernel, a graph of its own);
    each pass equals the eager fused pass through flash attention over cu_seqlens (dense_rows dropped). With fp8
    products, against the eager dense pass: the two kernels' slightly different outputs land on different e4m3
    steps (measured: 2.8% and 6.1% apart on one pass), so only the bf16 case compares the kernels."""
    pm = _model(tmp_path, nf4, kv_heads=4)       # grouped-query attention keeps varlen (FastLoss.dense_rows)
    pm.train()
    fl = enable_fast_path(pm, gradient_checkpointing=True, offload_activations=True, fp8_base=fp8)
    params = [p for p in pm.parameters() if p.requires_grad]
    graphs = PassGraphs(fl, params, max_seq_length=128, dtype=torch.bfloat16, device=torch.device("cuda"))

    def varlen(bt):
        planned = fl.host_plan(bt)
        assert planned.pop("dense_rows") == 2
        return planned

    def dense(bt):
        planned = fl.host_plan(bt)
        assert planned["dense_rows"] == 2
        return planned
    for i in range(4):
        _replay_equals_eager(fl, graphs, params, _row([128, 128], 10 + i), i, torch.bfloat16,
                             plan=dense if fp8 == "all" else varlen)
    assert list(graphs.graphs) == [(256, 8, 2)] and graphs.summary()["replays"] == 3


def test_fp8_base_on_nf4_stays_close_to_the_bf16_products(tmp_path):
    pm = _model(tmp_path, nf4=True)
    pm.train()
    bt = _row([100, 40, 77, 128], 1)
    out = []
    for fp8 in ("off", "all"):
        fl = enable_fast_path(pm, gradient_checkpointing=True, offload_activations=True, fp8_base=fp8)
        for p in pm.parameters():
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n = fl({k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in fl.host_plan(bt).items()})
        (loss / n).backward()
        out.append((loss.item(), [p.grad.float().flatten() for p in pm.parameters() if p.requires_grad]))
    (l0, g0), (l1, g1) = out
    assert l0 != l1 and abs(l1 - l0) / l0 < 1e-2, (l0, l1)
    worst = min(torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in zip(g0, g1, strict=True))
    assert worst > 0.98, worst
