"""Fused LoRA linears over frozen (NF4 or plain) bases that share one input.

q/k/v (or gate/up) are dequantized into adjacent rows of one reused buffer, so the base
term is ONE product x @ [Wq; Wk; Wv]^T (N = 9216 instead of three N = 3072 products), and
the low-rank term is one x @ [Aq; Ak; Av]^T plus one product with the block-diagonal
[s*Bq, s*Bk, s*Bv], added into the same output. Only x and the rank-r activations are saved:
backward dequantizes again (about 25 us for 3072 x 8192 on an H100, far cheaper than keeping a
bf16 copy of every weight) and gives dx with one product per term, dA and dB per head.

Dropout (PEFT applies it to the LoRA input only) draws one mask per head, as PEFT's separate
nn.Dropout modules do; with p = 0 no mask exists and the A's stay concatenated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Head:
    """One frozen base linear with an optional LoRA adapter on it."""
    out_features: int
    dequant: object                       # callable(out: Tensor (out, in) or None) -> Tensor (out, in), compute dtype
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None    # (r, in), PEFT's lora_A.weight
    lora_B: torch.Tensor | None = None    # (out, r), PEFT's lora_B.weight
    scaling: float = 1.0
    dropout: float = 0.0


@dataclass
class WeightBuffer:
    """One flat buffer reused for every dequantized weight (on a single stream, reuse is ordered)."""
    buf: torch.Tensor | None = None
    pinned: dict = field(default_factory=dict)

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.buf is None or self.buf.numel() < numel or self.buf.dtype != dtype or self.buf.device != device:
            self.buf = torch.empty(numel, dtype=dtype, device=device)
        return self.buf[:numel]


class Group:
    """Heads sharing one input, with their bf16 LoRA factors cached for one optimizer step.

    Casting and concatenating A, building the block-diagonal B and the bias costs ~10 small launches
    per group; forward, recompute and backward of one step reuse them (keyed by `version`, which the
    caller bumps every step, since the optimizer changes the fp32 factors between steps)."""

    def __init__(self, heads: list[Head]):
        self.heads = heads
        self.version = None
        self.a = self.b = self.bias = None

    def prepared(self, dtype, device, version):
        if version is None or version != self.version or (self.a is not None and self.a.dtype != dtype):
            lora = [h for h in self.heads if h.lora_A is not None]
            self.a = torch.cat([h.lora_A.to(dtype) for h in lora]) if lora else None
            self.b = _block_diag_b(self.heads, dtype) if lora else None
            self.bias = None
            if any(h.bias is not None for h in self.heads):
                self.bias = torch.cat([(h.bias if h.bias is not None else
                                        torch.zeros(h.out_features, device=device)).to(dtype) for h in self.heads])
            self.version = version
        return self.a, self.b, self.bias

    def release(self) -> None:
        """Drop the cached factors (a checkpointed layer needs them again only at its recompute)."""
        self.version = None
        self.a = self.b = self.bias = None


def _base_weight(heads: list[Head], in_features: int, dtype, device, pool: WeightBuffer | None) -> torch.Tensor:
    """[W_0; W_1; ...] (sum_out, in) in the compute dtype, in the reused buffer where possible."""
    if len(heads) == 1 and pool is None:
        return heads[0].dequant(None)
    total = sum(h.out_features for h in heads)
    w = pool.get(total * in_features, dtype, device).view(total, in_features) if pool is not None else \
        torch.empty(total, in_features, dtype=dtype, device=device)
    o = 0
    for h in heads:
        h.dequant(w[o:o + h.out_features])
        o += h.out_features
    return w


class _LoRAGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, group, pool, training, version, grad_only, *params):
        heads = group.heads
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        n, d_in = x2.shape
        dtype = x.dtype
        a_cat, b_bd, bias = group.prepared(dtype, x.device, version)
        w = None if grad_only else _base_weight(heads, d_in, dtype, x.device, pool)
        c = None if residual is None else residual.reshape(n, -1)
        if bias is not None:
            c = bias if c is None else c + bias
        lora = [h for h in heads if h.lora_A is not None]
        masks, h_act = [], None
        if lora:
            use_drop = training and any(h.dropout > 0 for h in lora)
            if use_drop:
                hs = []
                for h in lora:
                    m = None
                    if h.dropout > 0:
                        m = torch.empty_like(x2).bernoulli_(1 - h.dropout).div_(1 - h.dropout)
                    masks.append(m)
                    hs.append((x2 if m is None else x2 * m) @ h.lora_A.to(dtype).t())
                h_act = torch.cat(hs, dim=1)
            else:
                h_act = x2 @ a_cat.t()                                   # (n, sum r)
        if grad_only:
            # a recomputation whose output value nobody reads (the last product of a checkpointed layer):
            # keep what backward needs (x, h, masks), skip the product, hand back uninitialised memory
            y = torch.empty(n, sum(h.out_features for h in heads), dtype=dtype, device=x.device)
        elif lora:
            # low-rank term (and residual / bias) first, then the big product accumulates onto it in
            # cuBLAS's epilogue (beta = 1): one pass over y fewer than adding the LoRA term afterwards
            y = h_act @ b_bd.t() if c is None else torch.addmm(c, h_act, b_bd.t())
            y.addmm_(x2, w.t())
        else:
            y = x2 @ w.t() if c is None else torch.addmm(c, x2, w.t())
        ctx.has_residual = residual is not None
        ctx.group, ctx.pool, ctx.shape, ctx.version = group, pool, shape, version
        ctx.save_for_backward(x2, h_act, *[m if m is not None else x2[:0] for m in masks])
        ctx.has_mask = [m is not None for m in masks]
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, h_act, *masks = ctx.saved_tensors
        heads = ctx.group.heads
        n, d_in = x2.shape
        dtype = x2.dtype
        dy = dy.reshape(n, -1)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        w = _base_weight(heads, d_in, dtype, x2.device, ctx.pool)
        grads = []
        lora = [h for h in heads if h.lora_A is not None]
        if not lora:
            dx = dy @ w                                                   # (n, in)
        else:
            a_cat, b_bd, _ = ctx.group.prepared(dtype, x2.device, ctx.version)
            dh = dy @ b_bd                                                # (n, sum r), scaling folded in
            if not ctx.has_mask:
                dx = dh @ a_cat                                           # low-rank first, then beta = 1
                dx.addmm_(dy, w)
            else:
                dx = dy @ w
            grad_a_all = None if ctx.has_mask else (dh.t() @ x2).float()  # (sum r, in): every dA in one product
            o = r0 = 0
            i = 0
            for h in heads:
                if h.lora_A is None:
                    o += h.out_features
                    continue
                r = h.lora_A.shape[0]
                dys, hs, dhs = dy[:, o:o + h.out_features], h_act[:, r0:r0 + r], dh[:, r0:r0 + r]
                grad_b = (dys.t() @ hs).float().mul_(h.scaling)
                if grad_a_all is not None:
                    grad_a = grad_a_all[r0:r0 + r]                            # dx's low-rank term is in already
                elif ctx.has_mask[i]:
                    grad_a = (dhs.t() @ (x2 * masks[i])).float()
                    dx.add_((dhs @ h.lora_A.to(dtype)) * masks[i])
                else:
                    grad_a = (dhs.t() @ x2).float()
                    dx.addmm_(dhs, h.lora_A.to(dtype))
                grads += [grad_a.to(h.lora_A.dtype), grad_b.to(h.lora_B.dtype)]
                o += h.out_features
                r0 += r
                i += 1
        dres = dy.view(*ctx.shape[:-1], dy.shape[-1]) if ctx.has_residual else None
        return (dx.view(ctx.shape), dres, None, None, None, None, None, *grads)


def _block_diag_b(heads: list[Head], dtype) -> torch.Tensor:
    """(sum_out, sum_r): scaling_i * B_i on the diagonal blocks, zero elsewhere."""
    lora = [h for h in heads if h.lora_A is not None]
    if len(heads) == 1:
        return heads[0].lora_B.to(dtype) * heads[0].scaling
    total_r = sum(h.lora_A.shape[0] for h in lora)
    out = torch.zeros(sum(h.out_features for h in heads), total_r, dtype=dtype, device=lora[0].lora_B.device)
    o = r0 = 0
    for h in heads:
        if h.lora_A is not None:
            r = h.lora_A.shape[0]
            out[o:o + h.out_features, r0:r0 + r] = h.lora_B.to(dtype) * h.scaling
            r0 += r
        o += h.out_features
    return out


def lora_group(x: torch.Tensor, heads: list[Head] | Group, pool: WeightBuffer | None = None,
               training: bool = True, version: int | None = None, residual: torch.Tensor | None = None,
               grad_only: bool = False) -> torch.Tensor:
    """x (..., in) -> (..., sum_out): concatenated outputs of the heads (see module docstring).

    `residual` (..., sum_out), if given, is added to the output inside the same product (beta = 1).
    `grad_only`: the output's VALUE is never read, only its gradient flows back (a checkpoint's
    recomputation ending in this product): the forward product is skipped and the output is
    uninitialised memory; backward is unchanged.
    Twin: reference.lora_group (+ residual). Gradients flow to x, residual and every lora_A / lora_B."""
    group = heads if isinstance(heads, Group) else Group(heads)
    params = []
    for h in group.heads:
        if h.lora_A is not None:
            params += [h.lora_A, h.lora_B]
    return _LoRAGroup.apply(x, residual, group, pool, training, version, grad_only, *params)
