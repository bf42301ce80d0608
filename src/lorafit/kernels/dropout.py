"""LoRA dropout masks from a counter hash (Triton twins of reference.hashed_dropout, hashed_dropout_heads and
masked_sum_).

The mask of element i is a hash of (seed, salt, i), never stored: the forward draws it, and a checkpoint's
recomputation, the backward (dA needs the dropped input, dx the mask) and every replay of a CUDA graph draw
the same one again from the seed, a device tensor the pass was given. PyTorch's dropout would need the
generator's state saved and restored on the host around each recomputation, which a graph cannot do, and a
saved mask costs an input-sized tensor per adapted module.

The heads of a fused group (q/k/v, gate/up) share one input but draw a mask each: `hashed_dropout_heads` writes
all k dropped copies in one launch (one batched product follows for all heads), and `masked_sum_` adds the k
masked low-rank input gradients into dx in one pass (one read of each part, one read and write of dx), instead
of a drop, a product and an add per head. Up to four heads a group (salt keys are scalar arguments, so nothing
is copied from the host, which a graph capture forbids).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorafit.kernels.reference import DROP_HEADS, dropout_threshold, salt_key


@triton.jit
def _mix32(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _keep(seed, key, offs, thr):
    k = _mix32(seed ^ key.to(tl.uint32))
    bits = _mix32(_mix32(offs.to(tl.uint32) ^ k) + k)
    return (bits >> 8) >= thr


@triton.jit
def _drop_heads(X, OUT, SEED, k0, k1, k2, k3, n, thr, scale, BLOCK: tl.constexpr):
    head = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = tl.where(head == 0, k0, tl.where(head == 1, k1, tl.where(head == 2, k2, k3)))
    keep = _keep(tl.load(SEED).to(tl.uint32), key, offs, thr)
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + head.to(tl.int64) * n + offs, tl.where(keep, x * scale, 0.0).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _masked_sum(OUT, PARTS, SEED, k0, k1, k2, k3, n, thr, scale, K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    seed = tl.load(SEED).to(tl.uint32)
    acc = tl.load(OUT + offs, mask=m, other=0.0).to(tl.float32)
    for i in tl.static_range(K):
        key = k0 if i == 0 else (k1 if i == 1 else (k2 if i == 2 else k3))
        part = tl.load(PARTS + i * n + offs, mask=m, other=0.0).to(tl.float32)
        acc += tl.where(_keep(seed, key, offs, thr), part * scale, 0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=m)


_BLOCK = 1024


def _args(n: int, salts: tuple[int, ...], p: float):
    if n >= 1 << 32:
        raise ValueError(f"hashed dropout indexes elements with 32 bits; this tensor has {n}")
    if not 1 <= len(salts) <= DROP_HEADS:
        raise ValueError(f"hashed dropout takes 1 to {DROP_HEADS} heads at once, not {len(salts)}")
    keys = [salt_key(s) for s in salts] + [0] * (DROP_HEADS - len(salts))
    return (*keys, n, dropout_threshold(p), 1.0 / (1.0 - p))


def hashed_dropout_heads(x: torch.Tensor, seed: torch.Tensor, salts: tuple[int, ...], p: float) -> torch.Tensor:
    """Triton twin of reference.hashed_dropout_heads (the same masks, bit for bit)."""
    x = x.contiguous()
    out = torch.empty((len(salts), *x.shape), dtype=x.dtype, device=x.device)
    n = x.numel()
    _drop_heads[(triton.cdiv(n, _BLOCK), len(salts))](x, out, seed, *_args(n, salts, p), BLOCK=_BLOCK, num_warps=4)
    return out


def hashed_dropout(t: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """Triton twin of reference.hashed_dropout."""
    return hashed_dropout_heads(t, seed, (salt,), p)[0]


def masked_sum_(out: torch.Tensor, parts: torch.Tensor, seed: torch.Tensor, salts: tuple[int, ...],
                p: float) -> torch.Tensor:
    """Triton twin of reference.masked_sum_ (out contiguous, parts (k, *out.shape) contiguous)."""
    assert out.is_contiguous() and parts.is_contiguous() and parts.shape[1:] == out.shape
    n = out.numel()
    _masked_sum[(triton.cdiv(n, _BLOCK),)](out, parts, seed, *_args(n, salts, p), K=len(salts), BLOCK=_BLOCK,
                                            num_warps=4)
    return out
