"""Causal attention that stays within each packed document, on the fastest backend present.

Unpacked rows use SDPA's flash backend. Packed rows (doc_ids) use
torch.nn.attention.varlen.varlen_attn (flash attention over cumulative sequence lengths, no
FLOP spent across documents or on padding) when this torch has it; otherwise SDPA with a
(B, 1, T, T) document mask (memory-efficient backend; exact, slower). Twin: reference.attention.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from lorafit.kernels import reference


@functools.lru_cache(maxsize=1)
def _varlen():
    """(varlen_attn, how it is told 'causal') or None; probed on first use, never at import."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        return varlen_attn, "window_size"
    if "is_causal" in params:
        return varlen_attn, "is_causal"
    return None


def backend() -> str:
    """Which kernel packed rows get on CUDA (for benchmark records)."""
    vl = _varlen()
    return f"varlen_attn({vl[1]})" if vl is not None else "sdpa+document mask"


def packed_plan(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) and the longest segment, computed once per batch (one host sync)."""
    cu = reference.segments(doc_ids)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def attention(q, k, v, batch, n_heads, n_kv, head_dim, scale, plan=None, doc_ids=None, window=None):
    """q (N, H*D), k/v (N, Hkv*D) (unit last stride) -> (N, H*D); plan from packed_plan or None."""
    n = q.shape[0]
    t = n // batch
    if doc_ids is None and (window is None or t <= window):
        qh = q.view(batch, t, n_heads, head_dim).transpose(1, 2)
        kh = k.view(batch, t, n_kv, head_dim).transpose(1, 2)
        vh = v.view(batch, t, n_kv, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=n_kv != n_heads)
        return o.transpose(1, 2).reshape(n, n_heads * head_dim)
    vl = _varlen() if q.is_cuda else None
    if plan is not None and vl is not None and window is None:
        fn, how = vl
        cu, max_len = plan
        kw = {"window_size": (-1, 0)} if how == "window_size" else {"is_causal": True}
        if n_kv != n_heads:
            kw["enable_gqa"] = True
        o = fn(q.view(n, n_heads, head_dim), k.reshape(n, n_kv, head_dim), v.reshape(n, n_kv, head_dim),
               cu, cu, max_len, max_len, scale=scale, **kw)
        return o.reshape(n, n_heads * head_dim)
    return reference.attention(q, k, v, batch, n_heads, n_kv, head_dim, scale, doc_ids, window)
