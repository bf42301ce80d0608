"""Chunked linear + cross-entropy: the (tokens x vocab) logits never exist in full.

Forward walks the labelled tokens in chunks: one bf16 product gives a chunk's logits, one
Triton pass per row computes logsumexp and the loss and overwrites the logits in place with
d loss / d logits = softmax - onehot, and a second product turns that into the chunk's
input gradient. Backward only scales the stored input gradient's rows by the per-token loss
gradients (one value for a summed loss, one a token for the preference objectives' per-sequence
log-probs). Without a gradient to give (the reference model's pass) the Triton pass skips the
softmax write and the second product is not run. At 8192 tokens and a 32064
vocabulary this holds 32 MiB of logits (a 512-token chunk) instead of 1 GiB of float32
logits plus their gradient. The lm_head weight is frozen (no weight gradient).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_rows(L, TGT, LOSS, stride, V: tl.constexpr, BLOCK: tl.constexpr, GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = L + row * stride
    tgt = tl.load(TGT + row)
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], -1e30, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        x = tl.load(ptr + off + cols, mask=off + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    x_t = tl.load(ptr + tgt).to(tl.float32)
    tl.store(LOSS + row, lse - x_t)
    if GRAD:
        for off in range(0, V, BLOCK):
            msk = off + cols < V
            x = tl.load(ptr + off + cols, mask=msk, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(off + cols == tgt, 1.0, 0.0)
            tl.store(ptr + off + cols, g.to(L.dtype.element_ty), mask=msk)


def ce_rows_(logits: torch.Tensor, targets: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """Per-row CE loss (float32); with `grad`, overwrites `logits` (n, V) with softmax - onehot. No -100 here."""
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    _ce_rows[(n,)](logits, targets, loss, logits.stride(0), v, BLOCK=4096, GRAD=grad, num_warps=16)
    return loss


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk):
        w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        grad = ctx.needs_input_grad[0]
        dx = torch.empty_like(x) if grad else None
        losses = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for i in range(0, x.shape[0], chunk):
            logits = x[i:i + chunk] @ w.t()  # (n, V) in x.dtype, as HF's lm_head
            losses[i:i + chunk] = ce_rows_(logits, targets[i:i + chunk], grad)
            if grad:
                torch.mm(logits, w, out=dx[i:i + chunk])
        ctx.save_for_backward(dx)
        return losses

    @staticmethod
    def backward(ctx, dloss):
        (dx,) = ctx.saved_tensors
        return dx * dloss.to(dx.dtype)[:, None], None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 512) -> torch.Tensor:
    """Per-token CE (N,) float32 of x (N, C) @ weight^T against targets (N,) without -100 (select labelled rows
    first). Triton twin of reference.cross_entropy; gradient to x only (the head is frozen)."""
    return _LinearCE.apply(x, weight, targets, chunk)


def linear_cross_entropy_sum(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int = 512) -> torch.Tensor:
    """Triton twin of reference.cross_entropy_sum for targets without -100 (select labelled rows first)."""
    return linear_cross_entropy(x, weight, targets, chunk).sum()
