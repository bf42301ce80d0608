"""The LoRA term added onto an fp8 product's output, at the fast path's shapes: cuBLAS (y.addmm_(h, b^T), then
y.add_(c) for a residual) against kernels/fp8.py's lowrank_add_ (one pass) and a few of its tile sizes; and what
fp8 products cost with the rank's columns appended to their inner dimension (the other way to take the term in).

usage: python bench/lowrank_add_speed.py [--tokens 8192]      (CUDA; prints one JSON line per measurement)
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
from dropout_speed import ms  # bench/ is this script's directory, first on sys.path

from lorafit.kernels import fp8, reference

# (model, product, out features n, rank columns r, residual added, b transposed (an A factor: the backward's dx))
SHAPES = {
    "phi3": [("qkv", 9216, 48, False, False), ("o", 3072, 16, True, False), ("gate_up", 16384, 32, False, False),
             ("down", 3072, 16, True, False), ("dx_qkv", 3072, 48, False, True), ("dx_gate_up", 3072, 32, False, True),
             ("dx_down", 8192, 16, False, True)],
    "llama3-8b": [("qkv", 6144, 48, False, False), ("o", 4096, 16, True, False), ("gate_up", 28672, 32, False, False),
                  ("down", 4096, 16, True, False), ("dx_down", 14336, 16, False, True)],
}
# the fp8 products whose inner dimension would grow by r: (model, name, n, k, r)
PRODUCTS = [("phi3", "qkv", 9216, 3072, 48), ("phi3", "gate_up", 16384, 3072, 32), ("phi3", "down", 3072, 8192, 16),
            ("llama3-8b", "qkv", 6144, 4096, 48), ("llama3-8b", "gate_up", 28672, 4096, 32),
            ("llama3-8b", "down", 4096, 14336, 16)]
CONFIGS = [(64, 128, 4), (128, 128, 8), (64, 256, 8), (128, 256, 8), (32, 256, 4)]


def timed(fn) -> float:
    """Median microseconds of fn() between CUDA events, 30 runs after 3 warm-ups."""
    return ms(fn, reps=30, warm=3) * 1e3


def tiled(bm: int, bn: int, warps: int):
    def run(y, h, b, c):
        m, n = y.shape
        fp8._lowrank_add[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            y, h, b, y if c is None else c, m, n, h.shape[1], y.stride(0), h.stride(0), b.stride(0), b.stride(1),
            0 if c is None else c.stride(0), HAS_C=c is not None, BM=bm, BN=bn,
            BR=max(16, triton.next_power_of_2(h.shape[1])), num_warps=warps)
    return run


def cublas(y, h, b, c):
    y.addmm_(h, b.t())
    if c is not None:
        y.add_(c)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    m = ap.parse_args().tokens
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    for model, shapes in SHAPES.items():
        for name, n, r, res, b_t in shapes:
            y = torch.randn(m, n, device=dev, dtype=dt)
            h = torch.randn(m, r, device=dev, dtype=dt)
            b = torch.randn(r, n, device=dev, dtype=dt).t() if b_t else torch.randn(n, r, device=dev, dtype=dt) * 0.1
            c = torch.randn(m, n, device=dev, dtype=dt) if res else None
            want = reference.lowrank_add_(y.clone(), h, b, c)
            moved = (3 if res else 2) * m * n * 2
            runs = {"cublas": cublas, "lowrank_add_": fp8.lowrank_add_}
            runs.update({f"tile{bm}x{bn}w{w}": tiled(bm, bn, w) for bm, bn, w in CONFIGS})
            for label, fn in runs.items():
                got = y.clone()
                fn(got, h, b, c)
                err = ((got.double() - want.double()).norm() / want.double().norm()).item()
                # timed on a copy of y (each run adds into it), so every run's error is taken from the same y
                work = y.clone()
                us = timed(lambda fn=fn, args=(work, h, b, c): fn(*args))
                print(json.dumps({"model": model, "product": name, "m": m, "n": n, "r": r, "residual": res,
                                  "b_transposed": b_t, "run": label, "us": round(us, 1),
                                  "GB_s": round(moved / us / 1e3, 1), "rel_err": float(f"{err:.2e}")}), flush=True)
    for model, name, n, k, r in PRODUCTS:
        for kk in (k, k + r):
            a = torch.randn(m, kk, device=dev).to(torch.float8_e4m3fn)
            w = torch.randn(n, kk, device=dev).to(torch.float8_e4m3fn)
            sa, sw = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
            us = timed(lambda a=a, w=w, sa=sa, sw=sw: torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sw,
                                                                       out_dtype=dt, use_fast_accum=False))
            print(json.dumps({"model": model, "product": name, "m": m, "n": n, "k": kk, "run": "scaled_mm",
                              "us": round(us, 1), "TFLOP_s": round(2 * m * n * kk / us / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    main()
