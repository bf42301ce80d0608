"""LoRA dropout masks from a counter hash (Triton twin of reference.hashed_dropout).

The mask of element i is a hash of (seed, salt, i), never stored: the forward draws it, and a checkpoint's
recomputation, the backward (dA needs the dropped input, dx the mask) and every replay of a CUDA graph draw
the same one again from the seed, a device tensor the pass was given. PyTorch's dropout would need the
generator's state saved and restored on the host around each recomputation, which a graph cannot do, and a
saved mask costs an input-sized tensor per adapted module. One launch reads t once and writes t * mask once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorafit.kernels.reference import dropout_threshold, salt_key


@triton.jit
def _mix32(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _drop(T, OUT, SEED, key, n, thr, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    seed = tl.load(SEED).to(tl.uint32)
    k = _mix32(seed ^ key.to(tl.uint32))
    bits = _mix32(_mix32(offs.to(tl.uint32) ^ k) + k)
    t = tl.load(T + offs, mask=m, other=0.0).to(tl.float32)
    out = tl.where((bits >> 8) >= thr, t * scale, 0.0)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=m)


_BLOCK = 1024


def hashed_dropout(t: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """Triton twin of reference.hashed_dropout (the same mask, bit for bit)."""
    t = t.contiguous()
    n = t.numel()
    if n >= 1 << 32:
        raise ValueError(f"hashed_dropout indexes elements with 32 bits; this tensor has {n}")
    out = torch.empty_like(t)
    _drop[(triton.cdiv(n, _BLOCK),)](t, out, seed, salt_key(salt), n, dropout_threshold(p), 1.0 / (1.0 - p),
                                      BLOCK=_BLOCK, num_warps=4)
    return out
