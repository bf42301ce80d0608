"""How long lorafit's GGUF quantizers take on a 7B-shaped model (Mistral-7B: 32 layers, hidden 4096, ffn 14336,
8 KV heads, vocab 32000, untied output), with llama.cpp's per-tensor type mix for the chosen --dtype.

Random bf16 weights stand in for a checkpoint (the quantizers' work does not depend on the values); each tensor
is quantized on --device and copied back to the host as GGUF blocks, as `lorafit export` does.

    python bench/quant_speed.py                              # GPU machine: q4_k_m of all 32 layers on CUDA
    (`gguf` comes from the environment, else from .whl-gguf/: pip download --no-deps gguf==0.19.0 -d .whl-gguf)
    python bench/quant_speed.py --device cpu --layers 1 --shrink 8   # one layer, every size / 8, on the CPU

Prints one line per tensor type and the total last; writes JSON lines to $OUT/quant_speed.jsonl when $OUT is set.
Target: under 5 minutes for all 32 layers of q4_k_m on one H200.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
try:
    import gguf  # noqa: F401
except ImportError:  # a GPU image without it: the pure-Python wheel, carried as .whl-gguf/, imports from the zip
    sys.path[:0] = [str(w) for w in sorted((REPO / ".whl-gguf").glob("gguf-*.whl"))]

from lorafit.export.quant_mix import QUANTIZED, tensor_types  # noqa: E402  (after the path set-up above)
from lorafit.export.quants import quantize  # noqa: E402

HIDDEN, FFN, KV, VOCAB, LAYERS = 4096, 14336, 1024, 32000, 32


def mistral_7b(layers: int, shrink: int = 1) -> list[tuple[str, tuple[int, int]]]:
    """The 2-D tensors of Mistral-7B in GGUF order (1-D norms stay f32 and cost nothing), every size / shrink."""
    h, f, kv, v = HIDDEN // shrink, FFN // shrink, KV // shrink, VOCAB // shrink
    out = [("token_embd.weight", (v, h))]
    for i in range(layers):
        out += [(f"blk.{i}.attn_q.weight", (h, h)), (f"blk.{i}.attn_k.weight", (kv, h)),
                (f"blk.{i}.attn_v.weight", (kv, h)), (f"blk.{i}.attn_output.weight", (h, h)),
                (f"blk.{i}.ffn_gate.weight", (f, h)), (f"blk.{i}.ffn_up.weight", (f, h)),
                (f"blk.{i}.ffn_down.weight", (h, f))]
    return out + [("output.weight", (v, h))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="q4_k_m", choices=QUANTIZED)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=LAYERS, help="transformer layers to quantize (all 32 by default)")
    p.add_argument("--shrink", type=int, default=1, help="divide every size by this (a quick CPU run); 1: 7B shapes")
    args = p.parse_args()
    device = torch.device(args.device)
    tensors = mistral_7b(args.layers, args.shrink)
    types = tensor_types(tensors, args.dtype, LAYERS)  # the mix of the full 32-layer model
    gen = torch.Generator(device=device).manual_seed(0)
    per_type: dict[str, list[float]] = {}
    rows = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for name, shape in tensors:
        w = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        blocks = quantize(w.float(), types[name])  # ends on the host, as the writer needs it
        seconds = time.perf_counter() - t0
        kind = types[name].name
        acc = per_type.setdefault(kind, [0, 0.0, 0.0])
        acc[0], acc[1], acc[2] = acc[0] + 1, acc[1] + w.numel(), acc[2] + seconds
        rows.append({"tensor": name, "type": kind, "weights": w.numel(), "bytes": int(blocks.nbytes),
                     "seconds": round(seconds, 4)})
        del w, blocks
    total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    summary = {"dtype": args.dtype, "device": gpu, "layers": args.layers, "shrink": args.shrink,
               "tensors": len(tensors),
               "weights": sum(r["weights"] for r in rows), "seconds": round(total, 2), "cpu_seconds": round(cpu, 2),
               "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None}
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "quant_speed.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.write(json.dumps({"summary": summary}) + "\n")
    print(f"{'type':6} {'tensors':>7} {'Mweights':>9} {'seconds':>8} {'Mweights/s':>10}")
    for kind, (n, numel, seconds) in sorted(per_type.items()):
        print(f"{kind:6} {n:7d} {numel / 1e6:9.1f} {seconds:8.2f} {numel / 1e6 / max(seconds, 1e-9):10.1f}")
    print(f"total: {args.dtype} of {summary['weights'] / 1e6:,.1f}M weights ({args.layers} of {LAYERS} layers)"
          f"{'' if args.shrink == 1 else f', sizes / {args.shrink}'} on {gpu}: {total:.1f} s ({cpu:.1f} s of CPU time)"
          + (f", peak {summary['peak_gib']} GiB" if summary["peak_gib"] else ""))


if __name__ == "__main__":
    main()
