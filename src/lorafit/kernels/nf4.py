"""NF4 (optionally double-quantized) weight -> bf16/fp16/fp32, one Triton launch per weight.

bitsandbytes' dequantize_4bit costs three launches and several allocations with double
quantization (absmax codes -> float absmax, add offset, then the 4-bit pass) plus Python checks
per call; the fast path dequantizes 7 weights per layer three times a step (forward, recompute,
backward), 672 calls at 32 layers, so the per-call host cost showed up as step time. This kernel
decodes the absmax inline and writes the weight straight into the caller's reused buffer.
Twin: reference.dequant_nf4 (bitsandbytes' own dequantize_4bit is the ground truth in the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def decode_bytes(Q, ABSMAX, CODE2, ABSMAX2, NF4, b, m, offset,
                 BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    """The float32 values of packed bytes b (any shape): (element 2b, its high nibble; element 2b + 1, its low),
    each a code times its block's absmax (decoded from its 8-bit code when double-quantized)."""
    q = tl.load(Q + b, mask=m, other=0).to(tl.int32)
    blk = b // (BLOCKSIZE // 2)
    if NESTED:
        a8 = tl.load(ABSMAX + blk, mask=m, other=0).to(tl.int32)
        amax = tl.load(CODE2 + a8, mask=m, other=0.0) * tl.load(ABSMAX2 + blk // BLOCKSIZE2, mask=m, other=0.0)
        amax = amax + offset
    else:
        amax = tl.load(ABSMAX + blk, mask=m, other=0.0).to(tl.float32)
    return tl.load(NF4 + (q >> 4)) * amax, tl.load(NF4 + (q & 15)) * amax


@triton.jit
def _dequant(Q, ABSMAX, CODE2, ABSMAX2, NF4, OUT, offset, numel, n_bytes,
             BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)                 # byte index: elements 2i (high nibble), 2i+1 (low)
    hi, lo = decode_bytes(Q, ABSMAX, CODE2, ABSMAX2, NF4, i, i < n_bytes, offset, BLOCKSIZE, BLOCKSIZE2, NESTED)
    o = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(OUT + o, tl.interleave(hi, lo).to(OUT.dtype.element_ty), mask=o < numel)


class NF4Weight:
    """A Params4bit's quantization state, read once; calling it dequantizes into `out`."""

    def __init__(self, packed: torch.Tensor, quant_state):
        qs = quant_state
        self.packed = packed
        self.shape, self.dtype, self.blocksize = tuple(qs.shape), qs.dtype, qs.blocksize
        self.code = qs.code.float().contiguous()
        self.nested = bool(qs.nested)
        if self.nested:
            self.absmax, self.code2, self.absmax2 = qs.absmax, qs.state2.code.float(), qs.state2.absmax.float()
            self.blocksize2 = qs.state2.blocksize
            self.offset = float(qs.offset)
        else:
            self.absmax, self.code2, self.absmax2 = qs.absmax.float(), self.code, self.code
            self.blocksize2, self.offset = 1, 0.0

    def __call__(self, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype, device=self.packed.device)
        numel = out.numel()
        n_bytes = (numel + 1) // 2
        block = 1024
        _dequant[(triton.cdiv(n_bytes, block),)](
            self.packed, self.absmax, self.code2, self.absmax2, self.code, out, self.offset, numel, n_bytes,
            BLOCKSIZE=self.blocksize, BLOCKSIZE2=self.blocksize2, NESTED=self.nested, BLOCK=block, num_warps=4)
        return out
