"""Fused LoRA linears over frozen (NF4 or plain) bases that share one input.

q/k/v (or gate/up) are dequantized into adjacent rows of one reused buffer, so the base
term is ONE product x @ [Wq; Wk; Wv]^T (N = 9216 instead of three N = 3072 products), and
the low-rank term is one x @ [Aq; Ak; Av]^T plus one product with the block-diagonal
[s*Bq, s*Bk, s*Bv], added into the same output. Only x and the rank-r activations are saved:
backward dequantizes again (about 25 us for 3072 x 8192 on an H100, far cheaper than keeping a
bf16 copy of every weight) and gives dx with one product per term, dA and dB per head.

Dropout (PEFT applies it to the LoRA input only) draws one mask per head, as PEFT's separate
nn.Dropout modules do, from a counter hash of (seed, head, element) (kernels/dropout.py): no mask is
saved, backward draws it again, and so does a checkpoint's recomputation, with no generator state.
Heads of one rank and one p (the usual case) run batched: one launch writes the k dropped copies of x,
one batched product gives every x_i A_i^T; backward draws the copies again for one batched dA product,
writes every dh_i A_i into their memory and adds them into dx under their masks in one pass. With p = 0
no mask exists and the A's stay concatenated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from lorafit.kernels import reference


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
    salt: int = 0                         # tells this module's dropout masks from every other module's


@dataclass
class WeightBuffer:
    """One flat buffer reused for every dequantized weight, bf16 or fp8 (on a single stream, reuse is ordered)."""
    buf: torch.Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The flat buffer as `dtype`, at least `numel` long (its bytes grow, never shrink)."""
        size = numel * dtype.itemsize
        if self.buf is None or self.buf.numel() < size or self.buf.device != device:
            self.buf = torch.empty(size, dtype=torch.uint8, device=device)
        return self.buf.view(dtype)


class Group:
    """Heads sharing one input, with their compute-dtype LoRA factors: a = [A_0; A_1; ...] (sum r, in) and
    b = the block-diagonal [s_0 B_0, s_1 B_1, ...] (sum out, sum r).

    Standalone, a group casts and concatenates its factors on every call (the optimizer may have changed
    them). Inside a FactorPack the factors are views of the
    pack's persistent buffers, refreshed for all groups at once, and the group does no work itself."""

    def __init__(self, heads: list[Head]):
        self.heads = heads
        self.lora = [h for h in heads if h.lora_A is not None]
        self.out_features = sum(h.out_features for h in heads)
        self.offsets = [sum(h.out_features for h in heads[:i]) for i in range(len(heads))]
        scales = {h.scaling for h in self.lora}
        self.scaling = scales.pop() if len(scales) == 1 else None     # one scaling for all heads (the usual case)
        # (salt of the head's dropout mask, p) per LoRA head; a group's heads share an input, not a mask
        self.drops = [(h.salt * 16 + i, h.dropout) for i, h in enumerate(self.lora)]
        self.has_dropout = any(p > 0 for _, p in self.drops)
        self.lora_offsets = [o for o, h in zip(self.offsets, heads, strict=True) if h.lora_A is not None]
        # dropout batched over the heads: one p > 0 and one rank for all (else a drop and products per head)
        ps, ranks = {h.dropout for h in self.lora}, {h.lora_A.shape[0] for h in self.lora}
        self.drop_batch = (len(ps) == 1 and ps.pop() > 0 and len(ranks) == 1
                           and len(self.lora) <= reference.DROP_HEADS)
        self.salts = tuple(s for s, _ in self.drops)
        self.w_views = None
        self.fp8_views: dict = {}
        self._fp8_scales = None
        self.packed = False
        self.a = self.b = self.bias = None
        self._bias_key = None

    def prepared(self, dtype, device):
        if not self.packed:
            self.a = torch.cat([h.lora_A.to(dtype) for h in self.lora]) if self.lora else None
            self.b = _block_diag_b(self.heads, dtype) if self.lora else None
        if self._bias_key != (dtype, device) and any(h.bias is not None for h in self.heads):
            # base biases are frozen: concatenated once
            self.bias = torch.cat([(h.bias if h.bias is not None else
                                    torch.zeros(h.out_features, device=device)).to(dtype) for h in self.heads])
            self._bias_key = (dtype, device)
        return self.a, self.b, self.bias

    def fp8_ok(self, in_features: int) -> bool:
        """Whether fp8 products can take this group's base (cuBLAS's fp8 products want dimensions of 16s)."""
        return self.out_features % 16 == 0 and in_features % 16 == 0

    def fp8_scales(self) -> Fp8Scales:
        """[W_0; W_1; ...]'s rows over their absolute maxima (the forward's operand), and its columns over theirs,
        taken over all heads (the input gradient's). The base is frozen: computed once, on the first call (an
        eager pass, before any graph capture)."""
        if self._fp8_scales is None:
            rows, cols = zip(*(_head_amax(h) for h in self.heads), strict=True)
            rows = [r.float().clamp_min(reference.FP8_TINY) for r in rows]
            col = torch.stack([c.float() for c in cols]).amax(0).clamp_min(reference.FP8_TINY)
            self._fp8_scales = Fp8Scales(rows=torch.cat(rows)[None] / reference.FP8_MAX,
                                         row_inv=[reference.FP8_MAX / r for r in rows],
                                         cols=col[None] / reference.FP8_MAX, col_inv=reference.FP8_MAX / col)
        return self._fp8_scales


class Fp8(NamedTuple):
    """How a group's base products run on fp8 tensor cores (lora_group's `fp8`)."""
    rows: object                             # the row quantizer: kernels.fp8.rows on CUDA, reference.fp8_rows elsewhere
    forward: bool                            # the forward (and recomputation) products x W^T too, not only dy W
    lowrank_add: object = reference.lowrank_add_   # y += h b^T (+ c) onto a product's output: kernels.fp8's on CUDA


class Fp8Scales(NamedTuple):
    """A group's fp8 weight scales, float32."""
    rows: torch.Tensor            # (1, sum out): the dequantization scale of each row of [W_0; W_1; ...]
    row_inv: list[torch.Tensor]   # per head (out,): what its rows are multiplied by before the cast
    cols: torch.Tensor            # (1, in): of each column, over all heads
    col_inv: torch.Tensor         # (in,)


def _head_amax(h: Head) -> tuple[torch.Tensor, torch.Tensor]:
    """(absolute max of each row (out,), of each column (in,)) of a head's base weight."""
    amax = getattr(h.dequant, "amax", None)
    if amax is not None:
        return amax()
    w = h.dequant(None).float().abs()
    return w.amax(1), w.amax(0)


def _fp8_weight(group: Group, in_features: int, device, pool: WeightBuffer | None,
                transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the group's base weight in e4m3, its scales): [W_0; W_1; ...] (sum out, in) over row scales (1, sum out), or
    transposed, (in, sum out) over column scales (1, in), in the reused buffer where possible."""
    sc = group.fp8_scales()
    total = group.out_features
    shape = (in_features, total) if transposed else (total, in_features)

    def heads_of(w):                    # each head's rows of W (its columns of W^T)
        return [w[:, o:o + h.out_features] if transposed else w[o:o + h.out_features]
                for o, h in zip(group.offsets, group.heads, strict=True)]
    if pool is None:
        w = torch.empty(shape, dtype=torch.float8_e4m3fn, device=device)
        parts = heads_of(w)
    else:
        buf = pool.get(total * in_features, torch.float8_e4m3fn, device)
        key = (buf.data_ptr(), in_features)
        views = group.fp8_views.get(transposed)
        if views is None or views[0] != key:   # the views are made once per buffer (slicing costs host time)
            w = buf[:total * in_features].view(shape)
            group.fp8_views[transposed] = views = (key, w, heads_of(w))
        _, w, parts = views
    for h, part, row_inv in zip(group.heads, parts, sc.row_inv, strict=True):
        inv = sc.col_inv if transposed else row_inv
        fp8 = getattr(h.dequant, "fp8", None)
        if fp8 is not None:
            fp8(part, inv, transposed)
        else:
            reference.fp8_weight(h.dequant(None), inv, transposed, part)
    return w, (sc.cols if transposed else sc.rows)


def _fp8_mm(a: torch.Tensor, scale_a: torch.Tensor, w: torch.Tensor, scale_w: torch.Tensor, dtype) -> torch.Tensor:
    """(a * scale_a) @ (w * scale_w)^T on fp8 tensor cores, in `dtype`: a (n, k) e4m3 over row scales (n, 1), w (m, k)
    e4m3 over row scales (1, m). Row-wise scaled products give bf16 (fp16 runs cast it). Without cuBLAS's fast
    accumulation: Hopper's fp8 tensor cores accumulate in about 14 bits unless the sums are promoted to float32 as
    they go (up to ~2% relative error at K = 4,096, per the DeepSeek-V3 technical report); promotion costs a little
    speed."""
    y = torch._scaled_mm(a, w.t(), scale_a=scale_a, scale_b=scale_w, out_dtype=torch.bfloat16,
                         use_fast_accum=False)
    return y if dtype == torch.bfloat16 else y.to(dtype)


class FactorPack:
    """Every group's compute-dtype LoRA factors in persistent buffers, refreshed in three launches.

    Per group and pass, casting A, concatenating and building the block-diagonal B cost ~10 small
    launches, ~2,500 a step at 32 layers; the host time of those launches bounded the step at small
    batches. Here all A's are one cat (into one flat buffer, each group's [A_0; A_1; ...] a contiguous
    slice of it) and all B's one foreach copy plus one foreach scale into the diagonal blocks of
    zero-initialised per-group buffers. Costs the factors' compute-dtype copy for the whole step (about
    100 MB for Phi-3-mini at r=16 on all linear layers) instead of one layer's at a time."""

    def __init__(self, groups: list[Group], dtype: torch.dtype, device: torch.device):
        groups = [g for g in groups if g.lora]
        a_numel = sum(h.lora_A.numel() for g in groups for h in g.lora)
        self.a_buf = torch.empty(a_numel, dtype=dtype, device=device)
        self.a_src, self.b_dst, self.b_src, self.scales, self._a_params = [], [], [], [], []
        off = 0
        for g in groups:
            n = sum(h.lora_A.numel() for h in g.lora)
            g.a = self.a_buf[off:off + n].view(-1, g.lora[0].lora_A.shape[1])
            off += n
            g.b = torch.zeros(sum(h.out_features for h in g.heads), g.a.shape[0], dtype=dtype, device=device)
            o = r0 = 0
            for h in g.heads:
                if h.lora_A is not None:
                    r = h.lora_A.shape[0]
                    self.a_src.append(h.lora_A.view(-1))
                    self._a_params.append(h.lora_A)
                    self.b_dst.append(g.b[o:o + h.out_features, r0:r0 + r])
                    self.b_src.append(h.lora_B)
                    self.scales.append(float(h.scaling))
                    r0 += r
                o += h.out_features
            g.packed = True
        self.groups = groups
        self.ptrs = [t.data_ptr() for t in self.b_src]

    def current(self, device) -> bool:
        """False when the parameters moved (model.to(...), a new dtype): build a new pack then."""
        return self.a_buf.device == torch.device(device) and self.ptrs == [t.data_ptr() for t in self.b_src] \
            and all(a.data_ptr() == h.data_ptr() for a, h in zip(self.a_src, self._a_params, strict=True))

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the current (optimizer-updated) factors in; call once before each forward. No graph:
        gradients reach lora_A / lora_B through _LoRAGroup's backward, which returns them directly."""
        torch.cat(self.a_src, out=self.a_buf)
        torch._foreach_copy_(self.b_dst, self.b_src)
        torch._foreach_mul_(self.b_dst, self.scales)


def _base_weight(group: Group, in_features: int, dtype, device, pool: WeightBuffer | None) -> torch.Tensor:
    """[W_0; W_1; ...] (sum_out, in) in the compute dtype, in the reused buffer where possible.
    The buffer's per-head row views are made once per buffer (slicing costs host time, 672 times a step)."""
    heads = group.heads
    if len(heads) == 1 and pool is None:
        return heads[0].dequant(None)
    total = group.out_features
    if pool is None:
        w = torch.empty(total, in_features, dtype=dtype, device=device)
        rows = [w[o:o + h.out_features] for o, h in zip(group.offsets, heads, strict=True)]
    else:
        buf = pool.get(total * in_features, dtype, device)
        key = (buf.data_ptr(), buf.dtype, in_features)
        if group.w_views is None or group.w_views[0] != key:
            w = buf[:total * in_features].view(total, in_features)
            group.w_views = (key, w, [w[o:o + h.out_features] for o, h in zip(group.offsets, heads, strict=True)])
        _, w, rows = group.w_views
    for h, row in zip(heads, rows, strict=True):
        h.dequant(row)
    return w


class _LoRAGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, group, pool, training, grad_only, value, lowrank, keep_weight, dropout, fp8,
                *params):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        n, d_in = x2.shape
        dtype = x.dtype
        a_cat, b_bd, bias = group.prepared(dtype, x.device)
        fp8 = Fp8(*fp8) if fp8 is not None and group.fp8_ok(d_in) else None
        fp8_forward = fp8 is not None and fp8.forward
        keep_weight = keep_weight and fp8 is None     # fp8: backward reads the weight in another layout
        # keep_weight: the dequantized weight gets its own memory and backward reuses it (no second dequant)
        w = None if grad_only or fp8_forward else \
            _base_weight(group, d_in, dtype, x.device, None if keep_weight else pool)
        c = None if residual is None else residual.reshape(n, -1)
        if bias is not None:
            c = bias if c is None else c + bias
        lora = group.lora
        h_act = None
        seed, drop = dropout
        use_drop = training and group.has_dropout
        if lora:
            if lowrank[0] is not None:
                # x @ A^T as an earlier forward over the same x computed it (parked by a checkpoint; its
                # dropout masks are the ones this call would draw: the same seed)
                h_act = lowrank[0].reshape(n, -1)
            elif use_drop and group.drop_batch:
                k, p = len(lora), lora[0].dropout
                xm = drop.hashed_dropout_heads(x2, seed, group.salts, p)              # (k, n, in)
                h_act = torch.bmm(xm, a_cat.view(k, -1, d_in).transpose(1, 2)).transpose(0, 1).reshape(n, -1)
                del xm
            elif use_drop:
                hs, r0 = [], 0
                for h, (salt, p) in zip(lora, group.drops, strict=True):
                    r = h.lora_A.shape[0]
                    hs.append((drop.hashed_dropout(x2, seed, salt, p) if p > 0 else x2) @ a_cat[r0:r0 + r].t())
                    r0 += r
                h_act = torch.cat(hs, dim=1)
            else:
                h_act = x2 @ a_cat.t()                                   # (n, sum r)
        if grad_only:
            # a recomputation whose output value nobody reads (the last product of a checkpointed layer):
            # keep what backward needs (x, h), skip the product, hand back uninitialised memory,
            # or the output's value parked by an earlier forward when a later op reads it
            y = torch.empty(n, group.out_features, dtype=dtype, device=x.device) if value[0] is None \
                else value[0].reshape(n, group.out_features)
        elif fp8_forward:
            # the base product on fp8 tensor cores (x and W each over row-wise scales), then the low-rank term and
            # the residual / bias in the compute dtype onto it, in one pass (the fp8 product takes no beta)
            xq, sx = fp8.rows(x2)
            wq, sw = _fp8_weight(group, d_in, x.device, pool, transposed=False)
            y = _fp8_mm(xq, sx, wq, sw, dtype)
            del xq, sx
            if lora:
                fp8.lowrank_add(y, h_act, b_bd, c)
            elif c is not None:
                y.add_(c)
        elif lora:
            # low-rank term (and residual / bias) first, then the big product accumulates onto it in
            # cuBLAS's epilogue (beta = 1): one pass over y fewer than adding the LoRA term afterwards
            y = h_act @ b_bd.t() if c is None else torch.addmm(c, h_act, b_bd.t())
            y.addmm_(x2, w.t())
        else:
            y = x2 @ w.t() if c is None else torch.addmm(c, x2, w.t())
        ctx.has_residual = residual is not None
        ctx.group, ctx.pool, ctx.shape = group, pool, shape
        ctx.w = w if keep_weight else None
        ctx.dropout = (seed, drop) if use_drop else None
        ctx.fp8 = fp8
        ctx.save_for_backward(x2, h_act)
        h_out = h_act if h_act is not None and lowrank[0] is None else x2.new_empty(0)   # (a given one: not again)
        ctx.mark_non_differentiable(h_out)
        return y.view(*shape[:-1], y.shape[-1]), h_out

    @staticmethod
    def backward(ctx, dy, _dh_out):
        x2, h_act = ctx.saved_tensors
        group = ctx.group
        seed, drop = ctx.dropout or (None, None)
        n, d_in = x2.shape
        dtype = x2.dtype
        dy = dy.reshape(n, -1)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        fp8 = ctx.fp8
        w = None
        if fp8 is None:
            w = ctx.w if ctx.w is not None else _base_weight(group, d_in, dtype, x2.device, ctx.pool)
        ctx.w = None

        def dy_w():                                                       # dx's base term (n, in)
            if fp8 is None:
                return dy @ w
            dyq, sdy = fp8.rows(dy)
            wt, swt = _fp8_weight(group, d_in, x2.device, ctx.pool, transposed=True)
            return _fp8_mm(dyq, sdy, wt, swt, dtype)

        grads = []
        if not group.lora:
            dx = dy_w()
        else:
            a_cat, b_bd, _ = group.prepared(dtype, x2.device)
            dh = dy @ b_bd                                                # (n, sum r), scaling folded in
            grad_a_all = None
            if ctx.dropout is None:
                if fp8 is None:
                    dx = dh @ a_cat                                       # low-rank first, then beta = 1
                    dx.addmm_(dy, w)
                else:
                    # cuBLAS's addmm_ here, not fp8.lowrank_add: at these shapes (dx is in_features wide) it runs at
                    # about the same bandwidth or better (bench/lowrank_add_speed.py)
                    dx = dy_w()
                    dx.addmm_(dh, a_cat)
                grad_a_all = (dh.t() @ x2).float()                        # (sum r, in): every dA in one product
            elif group.drop_batch:
                # the k dropped copies again: dA_i = dh_i^T (x * mask_i) in one batched product, then every
                # dh_i A_i into their memory, added into dx under its mask in one pass
                k, p = len(group.lora), group.lora[0].dropout
                xm = drop.hashed_dropout_heads(x2, seed, group.salts, p)
                dh3 = dh.view(n, k, -1).transpose(0, 1)                   # (k, n, r)
                grad_a_all = torch.bmm(dh3.transpose(1, 2), xm).float().view(-1, d_in)
                torch.bmm(dh3, a_cat.view(k, -1, d_in), out=xm)
                dx = dy_w()
                drop.masked_sum_(dx, xm, seed, group.salts, p)
                del xm
            else:
                dx = dy_w()
            # every dB in one product too: dy^T h is (sum out, sum r) and head i's dB is its diagonal block
            # (the off-diagonal blocks are a few skinny FLOPs; one launch instead of ~7 per head)
            grad_b_all = (dy.t() @ h_act).float().mul_(group.scaling) if group.scaling is not None else None
            r0 = 0
            for o, h, (salt, p) in zip(group.lora_offsets, group.lora, group.drops, strict=True):
                r = h.lora_A.shape[0]
                if grad_b_all is not None:
                    grad_b = grad_b_all[o:o + h.out_features, r0:r0 + r]
                else:
                    grad_b = (dy[:, o:o + h.out_features].t() @ h_act[:, r0:r0 + r]).float().mul_(h.scaling)
                if grad_a_all is not None:
                    grad_a = grad_a_all[r0:r0 + r]                            # dx's low-rank term is in already
                else:
                    # the mask again, from the seed: dA = dh^T (x * mask), dx += (dh A) * mask
                    dhs = dh[:, r0:r0 + r]
                    grad_a = (dhs.t() @ (drop.hashed_dropout(x2, seed, salt, p) if p > 0 else x2)).float()
                    dxs = dhs @ a_cat[r0:r0 + r]
                    dx.add_(drop.hashed_dropout(dxs, seed, salt, p) if p > 0 else dxs)
                grads += [grad_a.to(h.lora_A.dtype), grad_b.to(h.lora_B.dtype)]
                r0 += r
        dres = dy.view(*ctx.shape[:-1], dy.shape[-1]) if ctx.has_residual else None
        return (dx.view(ctx.shape), dres, None, None, None, None, None, None, None, None, None, *grads)


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
               training: bool = True, residual: torch.Tensor | None = None,
               grad_only: bool = False, value: torch.Tensor | None = None, lowrank: torch.Tensor | None = None,
               keep_weight: bool = False, with_lowrank: bool = False, seed: torch.Tensor | None = None,
               drop=None, fp8=None):
    """x (..., in) -> (..., sum_out): concatenated outputs of the heads (see module docstring).

    `residual` (..., sum_out), if given, is added to the output inside the same product (beta = 1).
    `grad_only`: the output's VALUE is never read, only its gradient flows back (a checkpoint's
    recomputation ending in this product): the forward product is skipped and the output is
    uninitialised memory, or `value` (the output an earlier forward computed and parked, for a
    recomputation that reads it); backward is unchanged.
    A checkpoint's recomputation can also skip the low-rank product x @ A^T: `with_lowrank` returns
    (y, h) where h (..., sum r) is that product (empty without LoRA; no gradient flows into it), and
    `lowrank` = such an h from an earlier forward over the same x is used instead of computing it
    (its dropout masks are the ones this call draws from the same seed). `keep_weight`: the dequantized base weight gets
    its own memory and backward reuses it (one dequantization fewer, the weight held until then).
    Dropout (training, p > 0): head i's mask is drop.hashed_dropout(x, seed, salt_i, p), `drop` the module with the
    mask functions (reference unless the caller passes kernels.dropout, the Triton twins), `seed` an int64 device
    tensor of one value (drawn here if None); the same seed gives the same masks.
    `fp8` = Fp8(a row quantizer: kernels.fp8.rows on CUDA, reference.fp8_rows elsewhere; forward too; the low-rank
    add, optional) puts the base's input-gradient product dy W on fp8 tensor cores, and with forward True its x W^T
    too, each operand over row-wise scales (a group whose dimensions are not multiples of 16 keeps the compute dtype);
    the LoRA terms and every gradient of A and B stay in the compute dtype.
    Twin: reference.lora_group (+ residual). Gradients flow to x, residual and every lora_A / lora_B."""
    group = heads if isinstance(heads, Group) else Group(heads)
    params = []
    for h in group.heads:
        if h.lora_A is not None:
            params += [h.lora_A, h.lora_B]
    if training and seed is None and group.has_dropout:
        seed = torch.randint(0, 1 << 31, (1,), device=x.device)
    y, h = _LoRAGroup.apply(x, residual, group, pool, training, grad_only, (value,), (lowrank,),
                            keep_weight, (seed, drop or reference), fp8, *params)
    return (y, h.view(*x.shape[:-1], -1) if h.numel() else None) if with_lowrank else y
