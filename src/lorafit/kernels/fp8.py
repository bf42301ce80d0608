"""fp8 (e4m3) operands for the frozen base's products, one Triton launch each.

With `fp8_base backward`, the fused path's input-gradient products dy W run on fp8 tensor cores (torch._scaled_mm
with a scale per row of each operand: twice bf16's peak on Ada and Hopper); with `all`, its forward and
recomputation products x W^T too. This module makes the operands:
- `rows(x)`: a token's activations (or output gradient) over their own absolute max, in one pass (amax and cast
  fused; torch ops would take three passes and a temporary).
- `nf4_rows` / `nf4_cols`: an NF4 weight decoded straight to e4m3, each output row (forward) or each input column
  (input gradient, written transposed, the layout cuBLAS takes) over its absolute max, which is computed once (the
  base is frozen). Decoding to bf16 first and casting would move the weight through memory twice more.
- `lowrank_add_(y, h, b, c)`: y += h b^T (+ c) in one pass. An fp8 product's output cannot take the LoRA term in
  cuBLAS's epilogue (torch._scaled_mm has no beta), so the term is added afterwards. As cuBLAS's addmm_ (an inner
  dimension of 16 to 48), plus one more pass for a residual, that took 1.1-1.5x this kernel's time at the forward's
  shapes on an H200 (bench/lowrank_add_speed.py): here it is one read and one write of y, the residual in the same
  pass.
Twins: reference.fp8_rows, reference.fp8_weight over reference.dequant_nf4(..., torch.float32), reference.lowrank_add_.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorafit.kernels.nf4 import NF4Weight, decode_bytes
from lorafit.kernels.reference import FP8_MAX, FP8_TINY

_MAX = tl.constexpr(FP8_MAX)
_TINY = tl.constexpr(FP8_TINY)
_INV = tl.constexpr(1.0 / FP8_MAX)


@triton.jit
def _rows(X, Q, S, K, stride_x, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    top = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(CHUNKS):
        k = c * BLOCK + cols
        x = tl.load(X + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        top = tl.maximum(top, tl.abs(x))
    amax = tl.maximum(tl.max(top, axis=0), _TINY)
    inv = tl.math.div_rn(1.0, amax) * _MAX                 # as the twin: a rounded reciprocal, then the product
    for c in tl.static_range(CHUNKS):
        k = c * BLOCK + cols
        x = tl.load(X + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        q = tl.clamp(x * inv, -_MAX, _MAX)
        tl.store(Q + row * K + k, q.to(Q.dtype.element_ty, fp_downcast_rounding="rtne"), mask=k < K)
    tl.store(S + row, amax * _INV)


def rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) -> (q (n, k) float8_e4m3fn, scale (n, 1) float32), q * scale ~ x; twin: reference.fp8_rows."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    n, k = x.shape
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(n, 1, dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(k), 4096)
    if n:
        _rows[(n,)](x, q, s, k, x.stride(0), BLOCK=block, CHUNKS=triton.cdiv(k, block), num_warps=8)
    return q, s


@triton.jit
def _nf4_rows(Q, ABSMAX, CODE2, ABSMAX2, NF4, INV, OUT, offset, numel, n_bytes, row_bytes,
              BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)                 # byte index: elements 2i (high nibble), 2i+1 (low)
    m = i < n_bytes
    hi, lo = decode_bytes(Q, ABSMAX, CODE2, ABSMAX2, NF4, i, m, offset, BLOCKSIZE, BLOCKSIZE2, NESTED)
    inv = tl.load(INV + i // row_bytes, mask=m, other=0.0)
    hi = tl.clamp(hi * inv, -_MAX, _MAX)
    lo = tl.clamp(lo * inv, -_MAX, _MAX)
    o = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(OUT + o, tl.interleave(hi, lo).to(OUT.dtype.element_ty, fp_downcast_rounding="rtne"), mask=o < numel)


@triton.jit
def _nf4_cols(Q, ABSMAX, CODE2, ABSMAX2, NF4, INV, OUT, offset, n_out, row_bytes, ld,
              BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
              BO: tl.constexpr, BJ: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BO + tl.arange(0, BO)           # output rows of W
    j = tl.program_id(1).to(tl.int64) * BJ + tl.arange(0, BJ)           # bytes of a row: inputs 2j, 2j + 1
    m = (o < n_out)[:, None] & (j < row_bytes)[None, :]
    hi, lo = decode_bytes(Q, ABSMAX, CODE2, ABSMAX2, NF4, o[:, None] * row_bytes + j[None, :], m, offset,
                          BLOCKSIZE, BLOCKSIZE2, NESTED)
    w = tl.interleave(hi, lo)                                           # (BO, 2 BJ)
    i = tl.program_id(1).to(tl.int64) * 2 * BJ + tl.arange(0, 2 * BJ)  # input columns
    inv = tl.load(INV + i, mask=i < 2 * row_bytes, other=0.0)
    wt = tl.clamp(tl.trans(w * inv[None, :]), -_MAX, _MAX)         # (2 BJ, BO): W^T's rows i, columns o
    mt = (i < 2 * row_bytes)[:, None] & (o < n_out)[None, :]
    tl.store(OUT + i[:, None] * ld + o[None, :], wt.to(OUT.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mt)


def _state(w: NF4Weight) -> tuple:
    return w.packed, w.absmax, w.code2, w.absmax2, w.code


def nf4_rows(w: NF4Weight, inv: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The NF4 weight (out, in) in e4m3 into `out` (out, in), row o times inv[o] (float32); twin:
    reference.fp8_weight(reference.dequant_nf4(..., torch.float32), inv)."""
    n_out, d_in = w.shape
    numel = n_out * d_in
    n_bytes = numel // 2
    block = 1024
    _nf4_rows[(triton.cdiv(n_bytes, block),)](
        *_state(w), inv, out, w.offset, numel, n_bytes, d_in // 2,
        BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2, NESTED=w.nested, BLOCK=block, num_warps=4)
    return out


def nf4_cols(w: NF4Weight, inv: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The NF4 weight (out, in) transposed, in e4m3, into `out` (in, out) (a column slice of a wider buffer is fine:
    its row stride is read), column i of W times inv[i]; twin: reference.fp8_weight(..., transposed=True)."""
    n_out, d_in = w.shape
    bo, bj = 64, 32
    _nf4_cols[(triton.cdiv(n_out, bo), triton.cdiv(d_in // 2, bj))](
        *_state(w), inv, out, w.offset, n_out, d_in // 2, out.stride(0),
        BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2, NESTED=w.nested, BO=bo, BJ=bj, num_warps=4)
    return out


@triton.jit
def _lowrank_add(Y, H, B, C, M, N, R, s_y, s_h, s_bn, s_br, s_c,
                 HAS_C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    n = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    r = tl.arange(0, BR)
    mm, mn, mr = m < M, n < N, r < R
    h = tl.load(H + m[:, None] * s_h + r[None, :], mask=mm[:, None] & mr[None, :], other=0.0)        # (BM, BR)
    b = tl.load(B + r[:, None] * s_br + n[None, :] * s_bn, mask=mr[:, None] & mn[None, :], other=0.0)  # (BR, BN)
    t = mm[:, None] & mn[None, :]
    y = tl.load(Y + m[:, None] * s_y + n[None, :], mask=t, other=0.0).to(tl.float32) + tl.dot(h, b)
    if HAS_C:
        y += tl.load(C + m[:, None] * s_c + n[None, :], mask=t, other=0.0).to(tl.float32)
    tl.store(Y + m[:, None] * s_y + n[None, :], y.to(Y.dtype.element_ty), mask=t)


def lowrank_add_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """y (m, n) += h (m, r) @ b (n, r)^T (+ c (m, n)), in place, summed in float32 and rounded once; b may be any
    strided view (a transposed (r, n) factor is fine); twin: reference.lowrank_add_."""
    m, n = y.shape
    r = h.shape[1]
    if y.stride(-1) != 1:
        raise ValueError("lowrank_add_ writes rows of unit stride")
    h = h if h.stride(-1) == 1 else h.contiguous()
    if c is not None:
        c = c.expand(m, n) if c.dim() == 1 else c          # a bias: every row the same (stride 0)
        c = c if c.stride(-1) == 1 else c.contiguous()
    bm, bn = 64, 128
    if m and n:
        _lowrank_add[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            y, h, b, y if c is None else c, m, n, r, y.stride(0), h.stride(0), b.stride(0), b.stride(1),
            0 if c is None else c.stride(0), HAS_C=c is not None, BM=bm, BN=bn,
            BR=max(16, triton.next_power_of_2(r)), num_warps=4)
    return y
