"""What LoRA dropout costs on the fused path, one GPU: the hashed mask kernel against a plain copy and torch's
bernoulli mask, then one fused LoRA group's forward + backward at dropout 0 and p, at the recipe's pass size.

    python bench/dropout_speed.py [--tokens 3584] [--p 0.05]

Prints one JSON line per measurement (median of CUDA-event timings over 50 repeats, after 5 warm-ups).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorafit.kernels import dropout  # noqa: E402
from lorafit.kernels.lora import Head, lora_group  # noqa: E402


def ms(fn, reps=50, warm=5):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def heads(d_in, outs, r, p):
    out = []
    for i, o in enumerate(outs):
        w = torch.randn(o, d_in, device="cuda", dtype=torch.bfloat16) / d_in ** 0.5
        out.append(Head(out_features=o, dequant=lambda buf, w=w: w if buf is None else buf.copy_(w),
                        lora_A=torch.randn(r, d_in, device="cuda", requires_grad=True),
                        lora_B=torch.randn(o, r, device="cuda", requires_grad=True), scaling=2.0, dropout=p, salt=i))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=3584)
    ap.add_argument("--p", type=float, default=0.05)
    a = ap.parse_args()
    seed = torch.tensor([7], device="cuda")
    for d in (3072, 8192):
        x = torch.randn(a.tokens, d, device="cuda", dtype=torch.bfloat16)
        gb = 2 * x.numel() * x.element_size() / 1e9
        rows = {"copy": lambda x=x: x.clone(), "hashed": lambda x=x: dropout.hashed_dropout(x, seed, 3, a.p),
                "bernoulli": lambda x=x: x * torch.empty_like(x).bernoulli_(1 - a.p)}
        for name, fn in rows.items():
            t = ms(fn)
            print(json.dumps({"op": name, "shape": [a.tokens, d], "ms": round(t, 4), "GB_s": round(gb / t * 1e3)}))
    # (name, in, outs): Llama-style Phi-3-mini groups
    groups = (("qkv", 3072, (3072, 3072, 3072)), ("gate_up", 3072, (8192, 8192)), ("down", 8192, (3072,)))
    for name, d_in, outs in groups:
        x = torch.randn(a.tokens, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for p in (0.0, a.p):
            hs = heads(d_in, outs, 16, p)
            dy = torch.randn(a.tokens, sum(outs), device="cuda", dtype=torch.bfloat16)

            def fwd_bwd(hs=hs, x=x, dy=dy):
                y = lora_group(x, hs, training=True, seed=seed, drop=dropout)
                y.backward(dy)
            print(json.dumps({"group": name, "p": p, "tokens": a.tokens, "fwd_bwd_ms": round(ms(fwd_bwd), 4)}))


if __name__ == "__main__":
    main()
