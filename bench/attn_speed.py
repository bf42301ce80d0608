"""Packed-row attention kernels on one GPU: flash attention over cu_seqlens (torch's _flash_attention_* ops, what
varlen_attn calls) against cuDNN's over ragged offsets (_cudnn_attention_*), forward + backward: their outputs and
gradients against each other, their time per call, and the host time of a first call at a new segment plan (cuDNN
builds an execution plan per shape). Dense cuDNN SDPA over (B, H, T, D) is the yardstick for equal lengths.
On torch 2.11 + cuDNN 9.19 (H200) the ragged kernel was right only on a tiny case: ~130 ms a call at 4 x 2048, infinite
dq / dk, an illegal access on strided inputs (bench/results/2026-12-01-h200-packed-attention-kernels.jsonl), so
lorafit's packed rows stay on flash attention (bench/NOTES.md v13).

usage: python bench/attn_speed.py   (prints one JSON line per case)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

A = torch.ops.aten
HERE = Path(__file__).parent


def flash(q, k, v, cu, m, scale, do):
    o, lse, rng, unused, _ = A._flash_attention_forward(q, k, v, cu, cu, m, m, 0.0, True, False, scale=scale)
    return (o, *A._flash_attention_backward(do, q, k, v, o, lse, cu, cu, m, m, 0.0, True, rng, unused, scale=scale))


def cudnn(q, k, v, cu, m, scale, do):
    o, lse, _, _, _, _, seed, off, _ = A._cudnn_attention_forward(q, k, v, None, cu, cu, m, m, True, 0.0, True, False,
                                                                  scale=scale)
    return (o, *A._cudnn_attention_backward(do, q, k, v, o, lse, seed, off, None, cu, cu, m, m, 0.0, True,
                                            scale=scale))


def dense(q, k, v, b, scale, do):
    n, h, d = q.shape
    qh, kh, vh, doh = (z.view(b, n // b, z.shape[1], d).transpose(1, 2) for z in (q, k, v, do))
    if kh.shape[1] != h:
        kh, vh = (z.repeat_interleave(h // z.shape[1], dim=1) for z in (kh, vh))
    o, lse, cq, ck, mq, mk, seed, off, _ = A._scaled_dot_product_cudnn_attention(qh, kh, vh, None, True, 0.0, True,
                                                                                 False, scale=scale)
    return (o, *A._scaled_dot_product_cudnn_attention_backward(doh, qh, kh, vh, o, lse, seed, off, None, cq, ck, mq,
                                                                mk, 0.0, True, scale=scale))


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def inputs(lengths, h, hkv, d, pad_segments=0, strided=False):
    n = sum(lengths)
    qkv = torch.randn(n, (h + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    if not strided:
        qkv = qkv.clone()
    q, k, v = (qkv[:, :h * d], qkv[:, h * d:(h + hkv) * d], qkv[:, (h + hkv) * d:])
    q, k, v = q.view(n, h, d), k.reshape(n, hkv, d), v.reshape(n, hkv, d)
    if not strided:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()] + [n] * pad_segments, dtype=torch.int32,
                      device="cuda")
    return q, k, v, cu, torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)


def case(name, lengths, h, hkv, d, max_len=None, pad_segments=0, strided=False, dense_b=0):
    q, k, v, cu, do = inputs(lengths, h, hkv, d, pad_segments, strided)
    m = max_len or max(lengths)
    scale = d ** -0.5
    rec = {"case": name, "tokens": sum(lengths), "segments": len(lengths) + pad_segments, "heads": f"{h}/{hkv}x{d}",
           "strided": strided}
    ref = flash(q, k, v, cu, m, scale, do)
    rec["flash_ms"] = round(timed(lambda: flash(q, k, v, cu, m, scale, do)), 3)
    try:
        t = time.perf_counter()
        got = cudnn(q, k, v, cu, m, scale, do)
        torch.cuda.synchronize()
        rec["cudnn_first_call_ms"] = round((time.perf_counter() - t) * 1e3, 1)
        rec["rel_o_dq_dk_dv"] = [round(rel(a, b), 5) for a, b in zip(got, ref, strict=True)]
        rec["cudnn_ms"] = round(timed(lambda: cudnn(q, k, v, cu, m, scale, do)), 3)
    except RuntimeError as e:
        rec["cudnn_error"] = str(e).splitlines()[0][:300]
    if dense_b:
        rec["dense_cudnn_ms"] = round(timed(lambda: dense(q, k, v, dense_b, scale, do)), 3)
    print(json.dumps(rec), flush=True)


def plan_cost(h, hkv, d):
    """Host time of cuDNN's first call at each new (segments, max length): a run without graphs meets a new one
    on many passes unless the plan is padded to buckets."""
    lens = [int(x) for x in (HERE / "alpaca_lengths.txt").read_text().split()]
    out = []
    for i in range(6):
        ls = lens[i * 16:(i + 1) * 16]
        q, k, v, cu, do = inputs(ls, h, hkv, d)
        torch.cuda.synchronize()
        t = time.perf_counter()
        cudnn(q, k, v, cu, max(ls), d ** -0.5, do)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        cudnn(q, k, v, cu, max(ls), d ** -0.5, do)    # the same plan again
        torch.cuda.synchronize()
        out.append((len(ls), max(ls), round((t1 - t) * 1e3, 1), round((time.perf_counter() - t1) * 1e3, 2)))
    print(json.dumps({"case": "plan_cost (segments, max, first ms, again ms)", "calls": out}), flush=True)


def main():
    print(json.dumps({"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                      "gpu": torch.cuda.get_device_name()}), flush=True)
    torch.manual_seed(0)
    lens = [int(x) for x in (HERE / "alpaca_lengths.txt").read_text().split()]
    recipe = lens[:16]
    case("tiny with empty segments", [5, 0, 11, 3], 2, 2, 64, pad_segments=3)
    case("phi3 4x2048", [2048] * 4, 32, 32, 96, dense_b=4)
    case("phi3 4x2048 strided", [2048] * 4, 32, 32, 96, strided=True)
    case("phi3 8x512", [512] * 8, 32, 32, 96, dense_b=8)
    case("phi3 recipe pass, graph padding", recipe, 32, 32, 96, max_len=2048, pad_segments=8 - len(recipe) % 8 or 8)
    case("phi3 recipe pass, strided", recipe, 32, 32, 96, strided=True)
    case("llama3-8b 4x2048 (gqa)", [2048] * 4, 32, 8, 128, dense_b=4)
    case("llama3-8b 4x2048 strided (gqa)", [2048] * 4, 32, 8, 128, strided=True)
    case("llama3-8b recipe pass (gqa)", recipe, 32, 8, 128, max_len=2048, pad_segments=8 - len(recipe) % 8 or 8)
    plan_cost(32, 32, 96)


if __name__ == "__main__":
    main()
