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
def _rope(X, COS, SIN, Y, x_stride, cs_stride, n_heads, head_dim: tl.constexpr, half: tl.constexpr,
          NEG: tl.constexpr, COPY_PASS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
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
    yb = Y + row * n_heads * head_dim + h * head_dim
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


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, neg: bool) -> torch.Tensor:
    n, width = x.shape
    head_dim = width // n_heads
    half = cos.shape[-1] // 2
    assert x.stride(1) == 1 and cos.stride(1) == 1 and sin.stride() == cos.stride()
    y = torch.empty(n, width, dtype=x.dtype, device=x.device)
    _rope[(n,)](x, cos, sin, y, x.stride(0), cos.stride(0), n_heads, head_dim, half,
                NEG=neg, COPY_PASS=2 * half < head_dim,
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
