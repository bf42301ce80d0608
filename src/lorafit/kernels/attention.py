"""Causal attention that stays within each packed document, on the fastest backend present.

Unpacked rows use SDPA (which picks cuDNN's kernel on an H100). Packed rows (doc_ids) use
torch.nn.attention.varlen.varlen_attn (flash attention over cumulative sequence lengths, no
FLOP spent across documents or on padding) when this torch has it; otherwise SDPA with a
(B, 1, T, T) document mask (memory-efficient backend; exact, slower). Twin: reference.attention.

`attention_keeping` / `attention_replay` let a checkpointed layer skip the attention forward when
it is recomputed: the first forward calls the attention kernel directly (cuDNN's, which SDPA picks
for unpacked rows on Hopper; flash attention's varlen op for packed rows, which varlen_attn calls)
and hands back its log-sum-exp with the output; the recomputation returns the parked output and
backward calls that kernel's backward with it. torch exposes no public way to run an attention
backward from a saved forward, so these call the aten ops torch's own autograd formulas call
(schemas checked on torch 2.11 and 2.13; an error in the forward falls back to plain attention,
recomputed as before).
"""
from __future__ import annotations

import functools
import inspect
import logging

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
    gqa = "enable_gqa" in params          # torch 2.11's varlen_attn has no enable_gqa: k, v repeated instead
    if "window_size" in params:
        return varlen_attn, "window_size", gqa
    if "is_causal" in params:
        return varlen_attn, "is_causal", gqa
    return None


def has_varlen() -> bool:
    """Whether this torch has varlen attention (packed rows then run flash attention over cu_seqlens)."""
    return _varlen() is not None


def backend() -> str:
    """Which kernel packed rows get on CUDA (for benchmark records)."""
    vl = _varlen()
    return f"varlen_attn({vl[1]}{', gqa' if vl[2] else ''})" if vl is not None else "sdpa+document mask"


def packed_plan(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) and the longest segment, computed once per batch (one host sync)."""
    cu = reference.segments(doc_ids)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def uniform_rows(cu: torch.Tensor, tokens: int) -> int:
    """How many rows of one length a pass's segments (cu_seqlens, CPU, empty segments allowed) are when they tile its
    `tokens` exactly, else 0. Such a pass needs no varlen kernel: attention within each segment is plain causal
    attention over (rows, length), which runs cuDNN's kernel on Hopper (at 4 x 2048 on an H200: 34 ms a step
    against flash varlen's 55, bench/results/2026-12-01-h200-profile-4x2048-fp8.txt). Records of one length
    (fixed-size chunks of a corpus, the benchmark shapes) pass this way; records of varied lengths keep varlen."""
    lens = cu[1:] - cu[:-1]
    lens = lens[lens > 0]
    if lens.numel() == 0 or int(lens.sum()) != tokens or bool((lens != lens[0]).any()):
        return 0
    return lens.numel()


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
        fn, how, gqa = vl
        cu, max_len = plan
        kw = {"window_size": (-1, 0)} if how == "window_size" else {"is_causal": True}
        k3, v3 = k.reshape(n, n_kv, head_dim), v.reshape(n, n_kv, head_dim)
        if n_kv != n_heads and gqa:
            kw["enable_gqa"] = True
        elif n_kv != n_heads:
            k3, v3 = (z.repeat_interleave(n_heads // n_kv, dim=1) for z in (k3, v3))
        o = fn(q.view(n, n_heads, head_dim), k3, v3, cu, cu, max_len, max_len, scale=scale, **kw)
        return o.reshape(n, n_heads * head_dim)
    return reference.attention(q, k, v, batch, n_heads, n_kv, head_dim, scale, doc_ids, window)


def _cudnn_ok(q, batch, n_heads, n_kv, head_dim, plan, doc_ids, window) -> bool:
    t = q.shape[0] // batch
    return (q.is_cuda and doc_ids is None and plan is None and (window is None or t <= window)
            and q.dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0 and head_dim <= 128
            and n_heads % n_kv == 0 and torch.backends.cudnn.is_available())


def attention_keeping(q, k, v, batch, n_heads, n_kv, head_dim, scale, plan=None, doc_ids=None, window=None):
    """attention(...) and what attention_replay needs to run its backward later without the forward:
    (o (N, H*D), state); state is None where that is not possible (then recompute as usual).
    Unpacked rows: cuDNN's attention; packed rows: flash attention over cu_seqlens (the kernels
    attention() itself reaches through SDPA and varlen_attn). Off CUDA the state says "twin" and the
    replay's backward recomputes through `attention` (the same plumbing, testable on a CPU)."""
    args = (batch, n_heads, n_kv, head_dim, scale)
    n = q.shape[0]
    if not q.is_cuda:
        return attention(q, k, v, *args, plan=plan, doc_ids=doc_ids, window=window), ("twin", plan, doc_ids, window)
    try:
        if plan is not None and window is None and _varlen() is not None:
            cu, max_len = plan
            o, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
                q.view(n, n_heads, head_dim), k.reshape(n, n_kv, head_dim), v.reshape(n, n_kv, head_dim),
                cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
            return o.reshape(n, n_heads * head_dim), ("flash", cu, max_len, lse, rng, unused)
        if _cudnn_ok(q, batch, n_heads, n_kv, head_dim, plan, doc_ids, window):
            qh, kh, vh = reference.heads(q, k, v, batch, n_heads, n_kv, head_dim)
            o, lse, cu_q, cu_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
                qh, kh, vh, None, True, 0.0, True, False, scale=scale)
            state = ("cudnn", lse, cu_q, cu_k, max_q, max_k, seed, offset)
            return o.transpose(1, 2).reshape(n, n_heads * head_dim), state
    except RuntimeError as e:       # an op this torch lacks or refuses: plain attention, recomputed as before
        _warn_once(e)
    return attention(q, k, v, *args, plan=plan, doc_ids=doc_ids, window=window), None


_WARNED = []


def _warn_once(e: Exception) -> None:
    if not _WARNED:
        _WARNED.append(e)
        logging.getLogger(__name__).warning("attention is recomputed in backward (its saved-state kernels failed: %s)",
                                            str(e).splitlines()[0][:200])


_SAVED = object()      # stands for a state tensor kept by save_for_backward


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, o, shape, state):
        ctx.save_for_backward(q, k, v, o, *[s for s in state if isinstance(s, torch.Tensor)])
        ctx.shape, ctx.state = shape, [_SAVED if isinstance(s, torch.Tensor) else s for s in state]
        return o.view_as(o)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, *tensors = ctx.saved_tensors
        it = iter(tensors)
        state = [next(it) if s is _SAVED else s for s in ctx.state]
        batch, n_heads, n_kv, head_dim, scale = ctx.shape
        kind, *state = state
        n = q.shape[0]
        if kind == "twin":                     # off CUDA: recompute the attention and differentiate it
            plan, doc_ids, window = state
            with torch.enable_grad():
                qkv = [z.detach().requires_grad_(True) for z in (q, k, v)]
                out = attention(*qkv, batch, n_heads, n_kv, head_dim, scale, plan=plan, doc_ids=doc_ids, window=window)
                return (*torch.autograd.grad(out, qkv, do), None, None, None)
        if kind == "flash":
            cu, max_len, lse, rng, unused = state
            dq, dk, dv = torch.ops.aten._flash_attention_backward(
                do.reshape(n, n_heads, head_dim), q.view(n, n_heads, head_dim), k.reshape(n, n_kv, head_dim),
                v.reshape(n, n_kv, head_dim), o.view(n, n_heads, head_dim), lse, cu, cu, max_len, max_len, 0.0, True,
                rng, unused, scale=scale)
            return dq.reshape(n, -1), dk.reshape(n, -1), dv.reshape(n, -1), None, None, None
        lse, cu_q, cu_k, max_q, max_k, seed, offset = state
        qh, kh, vh = reference.heads(q, k, v, batch, n_heads, n_kv, head_dim)
        t = n // batch
        oh = o.view(batch, t, n_heads, head_dim).transpose(1, 2)
        doh = do.reshape(batch, t, n_heads, head_dim).transpose(1, 2)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            doh, qh, kh, vh, oh, lse, seed, offset, None, cu_q, cu_k, max_q, max_k, 0.0, True, scale=scale)
        if n_kv != n_heads:
            dk, dv = (z.reshape(batch, n_kv, n_heads // n_kv, t, head_dim).sum(2) for z in (dk, dv))
        flat = [z.transpose(1, 2).reshape(n, -1) for z in (dq, dk, dv)]
        return (*flat, None, None, None)


def attention_replay(q, k, v, o, state, batch, n_heads, n_kv, head_dim, scale):
    """The attention output `o` parked by attention_keeping, as a function of q, k, v for autograd:
    no forward work; backward is the attention's backward from the saved output and log-sum-exp."""
    return _Replay.apply(q, k, v, o, (batch, n_heads, n_kv, head_dim, scale), tuple(state))
