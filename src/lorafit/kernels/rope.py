"""Rotary position embedding (Triton), rotate-half layout, optional partial rotary dims.

One program per token rotates all of its heads, reading cos/sin once per token instead of
once per (token, head) as torch's broadcasted version does, and takes the strided q/k/v slices
of a fused qkv projection without a copy. Backward is the same rotation by -theta.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope(X, COS, SIN, Y, V, YV, x_stride, y_stride, v_stride, yv_stride, cs_stride, n_heads, head_dim: tl.constexpr,
          half: tl.constexpr, NEG: tl.constexpr, COPY_PASS: tl.constexpr, HAS_V: tl.constexpr, BLOCK_H: tl.constexpr,
          BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    md = d < half
    m = (h < n_heads) & md
    c = tl.load(COS + row * cs_stride + d, mask=md, other=0.0).to(tl.float32)
    s = tl.load(SIN + row * cs_stride + d, mask=md, other=0.0).to(tl.float32)
    if NEG:
        s = -s
    xb = X + row * x_stride + h * head_dim
    yb = Y + row * y_stride + h * head_dim
    xp = xb + d
    yp = yb + d
    x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xp + half, mask=m, other=0.0).to(tl.float32)
    tl.store(yp, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=m)
    tl.store(yp + half, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=m)
    if COPY_PASS:  # dims [2 * half, head_dim) pass through (partial rotary)
        for off in range(2 * half, head_dim, BLOCK_D):
            mp = (h < n_heads) & (off + d < head_dim)
            tl.store(yb + off + d, tl.load(xb + off + d, mask=mp, other=0.0), mask=mp)
    if HAS_V:  # a row of V (as many heads) copied into YV in the same program: the backward's dv
        vb = V + row * v_stride + h * head_dim
        yvb = YV + row * yv_stride + h * head_dim
        for off in range(0, head_dim, BLOCK_D):
            mp = (h < n_heads) & (off + d < head_dim)
            tl.store(yvb + off + d, tl.load(vb + off + d, mask=mp, other=0.0), mask=mp)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, neg: bool,
            out: torch.Tensor | None = None, copy: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """rotate x (N, n_heads * D) into out (or a new tensor); `copy` (src, dst), each (N, n_heads * D),
    is copied row by row in the same launch (a strided copy_ on its own is a slow generic kernel)."""
    n, width = x.shape
    head_dim = width // n_heads
    half = cos.shape[-1] // 2
    assert x.stride(1) == 1 and cos.stride(1) == 1 and sin.stride() == cos.stride()
    y = torch.empty(n, width, dtype=x.dtype, device=x.device) if out is None else out
    assert y.stride(1) == 1
    v, yv = copy if copy is not None else (x, y)
    assert v.shape == x.shape and yv.shape == x.shape and v.stride(1) == 1 and yv.stride(1) == 1
    _rope[(n,)](x, cos, sin, y, v, yv, x.stride(0), y.stride(0), v.stride(0), yv.stride(0), cos.stride(0), n_heads,
                head_dim, half, NEG=neg, COPY_PASS=2 * half < head_dim, HAS_V=copy is not None,
                BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_D=triton.next_power_of_2(half), num_warps=4)
    return y


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, n_heads):
        ctx.save_for_backward(cos, sin)
        ctx.n_heads = n_heads
        return _launch(x, cos, sin, n_heads, neg=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy.contiguous(), cos, sin, ctx.n_heads, neg=True), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Triton twin of reference.rope; x (N, n_heads * D) with unit last stride, cos/sin (N, R)."""
    return _RoPE.apply(x, cos, sin, n_heads)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 and t.stride(1) == 1 else t.contiguous()


class _QKVRoPE(torch.autograd.Function):
    """qkv (N, (Hq + 2 Hkv) D) -> rotated q, rotated k, v (a view). Backward writes d[q | k | v]
    straight into one buffer: autograd's slice backward would instead zero-fill a full-width
    gradient per slice and add the three (at 4 x 2048 x 9216 that was ~60 ms a step on an H100)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, hq, hkv, head_dim):
        qw, kw = hq * head_dim, hkv * head_dim
        ctx.save_for_backward(cos, sin)
        ctx.dims = (hq, hkv, head_dim)
        q = _launch(qkv[:, :qw], cos, sin, hq, neg=False)
        k = _launch(qkv[:, qw:qw + kw], cos, sin, hkv, neg=False)
        return q, k, qkv[:, qw + kw:]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        hq, hkv, d = ctx.dims
        qw, kw = hq * d, hkv * d
        ref = next(t for t in (dq, dk, dv) if t is not None)
        dqkv = torch.empty(ref.shape[0], qw + 2 * kw, dtype=ref.dtype, device=ref.device)
        if dq is None:
            dqkv[:, :qw].zero_()
        else:
            _launch(_rows(dq), cos, sin, hq, neg=True, out=dqkv[:, :qw])
        dv_out = dqkv[:, qw + kw:]
        if dk is None:
            dqkv[:, qw:qw + kw].zero_()
        else:          # dv rides along in dk's launch (same head count)
            _launch(_rows(dk), cos, sin, hkv, neg=True, out=dqkv[:, qw:qw + kw],
                    copy=None if dv is None else (_rows(dv), dv_out))
        if dv is None:
            dv_out.zero_()
        elif dk is None:
            dv_out.copy_(dv)
        return dqkv, None, None, None, None, None


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int, head_dim: int):
    """Triton twin of reference.qkv_rope: split a fused qkv projection and rotate q and k."""
    return _QKVRoPE.apply(qkv, cos, sin, hq, hkv, head_dim)
