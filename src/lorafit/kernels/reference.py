"""Plain-PyTorch twins of the fast-path kernels: the definition each kernel must match.

They also run the fast path's math on CPU (the test suite) and on any device without Triton.
Dtype conventions follow transformers' Llama code, so the twins equal the HF modules:
RMSNorm rounds the normalised input to the input dtype before the weight; SwiGLU rounds
silu(gate) before multiplying by up; RoPE uses the rotate-half layout with cos/sin of shape
(N, R), R <= head_dim, the last head_dim - R dims passing through unrotated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / rms(x)), rms taken in float32; x (N, C)."""
    xf = x.float()
    xhat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * xhat.float()).to(x.dtype)


def add_rmsnorm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns (h = x + r, rmsnorm(h))."""
    h = x + r
    return h, rmsnorm(h, weight, eps)


def rmsnorm_fork(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, rmsnorm(x)): for an x that also continues on the residual stream."""
    return x, rmsnorm(x, weight, eps)


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """gu (N, 2I) = [gate | up] -> silu(gate) * up, (N, I)."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int) -> torch.Tensor:
    """x (N, n_heads * D) (any row stride); cos, sin (N, R) in HF's [f | f] layout -> rotated (N, n_heads * D)."""
    n = x.shape[0]
    xh = x.reshape(n, n_heads, -1)
    r = cos.shape[-1]
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    xr, xp = xh[..., :r], xh[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rot = torch.cat((-x2, x1), dim=-1)
    out = torch.cat(((xr * c) + (rot * s), xp), dim=-1)
    return out.reshape(n, -1)


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int, head_dim: int):
    """qkv (N, (hq + 2 hkv) * head_dim) -> (rope(q), rope(k), v)."""
    qw, kw = hq * head_dim, hkv * head_dim
    return rope(qkv[:, :qw], cos, sin, hq), rope(qkv[:, qw:qw + kw], cos, sin, hkv), qkv[:, qw + kw:]


def cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE(x_i @ weight^T, targets_i) per row (N,) float32, logits in the weight's dtype then upcast (as HF does)."""
    logits = (x @ weight.t()).float()
    return F.cross_entropy(logits, targets, reduction="none")


def cross_entropy_sum(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i CE(x_i @ weight^T, targets_i), logits in the weight's dtype then upcast (as HF does); float32 scalar."""
    logits = (x @ weight.t()).float()
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=-100)


def lora_group(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
               loras: list[tuple[torch.Tensor, torch.Tensor, float] | None],
               dropout_masks: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Several LoRA linears over one input, outputs concatenated on the last dim.

    head i: x @ W_i^T + b_i + scaling_i * (drop_i(x) @ A_i^T) @ B_i^T, with A_i (r, in), B_i (out, r)
    as PEFT stores lora_A.weight / lora_B.weight; drop_i(x) = x * mask_i (mask already holding 1/(1-p)).
    """
    outs = []
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        y = F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        if loras[i] is not None:
            a, bb, s = loras[i]
            xd = x if dropout_masks is None or dropout_masks[i] is None else x * dropout_masks[i]
            y = y + s * F.linear(F.linear(xd, a.to(x.dtype)), bb.to(x.dtype))
        outs.append(y)
    return torch.cat(outs, dim=-1)


def segments(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) -> cu_seqlens (S + 1,) int32 over the flattened B*T tokens.

    A segment is a run of equal doc id inside one row; padding (id 0) forms its own segments,
    whose outputs are never labelled."""
    b, t = doc_ids.shape
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = start.flatten().nonzero().flatten()
    end = torch.tensor([b * t], device=doc_ids.device, dtype=idx.dtype)
    return torch.cat((idx, end)).to(torch.int32)


def doc_causal_mask(doc_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool: query i sees key j iff j <= i, same segment (and i - j < window)."""
    b, t = doc_ids.shape
    cu = segments(doc_ids).long()
    seg = torch.zeros(b * t, dtype=torch.long, device=doc_ids.device)
    seg[cu[1:-1]] = 1
    seg = seg.cumsum(0).view(b, t)
    pos = torch.arange(t, device=doc_ids.device)
    m = (seg[:, :, None] == seg[:, None, :]) & (pos[None, :, None] >= pos[None, None, :])
    if window is not None:
        m &= (pos[None, :, None] - pos[None, None, :]) < window
    return m[:, None]


def heads(q, k, v, batch: int, n_heads: int, n_kv: int, head_dim: int):
    """(B, H, T, D) views of q (N, H*D) and of k, v (N, Hkv*D), k and v repeated to H heads when Hkv < H."""
    t = q.shape[0] // batch
    qh = q.reshape(batch, t, n_heads, head_dim).transpose(1, 2)
    kh = k.reshape(batch, t, n_kv, head_dim).transpose(1, 2)
    vh = v.reshape(batch, t, n_kv, head_dim).transpose(1, 2)
    if n_kv != n_heads:
        kh, vh = (z.repeat_interleave(n_heads // n_kv, dim=1) for z in (kh, vh))
    return qh, kh, vh


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, n_heads: int, n_kv: int,
              head_dim: int, scale: float, doc_ids: torch.Tensor | None, window: int | None = None) -> torch.Tensor:
    """Causal attention within each document; q (N, H*D), k/v (N, Hkv*D) -> (N, H*D), N = batch * T."""
    n = q.shape[0]
    t = n // batch
    qh, kh, vh = heads(q, k, v, batch, n_heads, n_kv, head_dim)
    if doc_ids is None and (window is None or t <= window):
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        ids = doc_ids if doc_ids is not None else torch.ones(batch, t, dtype=torch.long, device=q.device)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=doc_causal_mask(ids, window), scale=scale)
    return o.transpose(1, 2).reshape(n, n_heads * head_dim)


def dequant_nf4(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (nested absmax or not) -> (out, in) in `dtype` (default quant_state.dtype)."""
    qs = quant_state
    q = packed.flatten()
    idx = torch.stack(((q >> 4).long(), (q & 15).long()), dim=1).flatten()
    if qs.nested:
        absmax = qs.state2.code.float()[qs.absmax.long()]
        absmax = absmax * qs.state2.absmax.float().repeat_interleave(qs.state2.blocksize)[: absmax.numel()]
        absmax = absmax + qs.offset
    else:
        absmax = qs.absmax.float()
    n = 1
    for s in qs.shape:
        n *= s
    vals = qs.code.float()[idx[:n]] * absmax.repeat_interleave(qs.blocksize)[:n]
    return vals.to(dtype or qs.dtype).view(tuple(qs.shape))


# ---------------------------------------------------------------- fp8 (e4m3) operands of the base's products
# Each operand row (a token of x or dy, an output row or input column of W) is divided by its own absolute max over
# FP8_MAX, so the row's largest value lands on e4m3's largest; the product multiplies the scales back in
# (torch._scaled_mm's row-wise scaling).

FP8_MAX = 448.0          # the largest finite float8_e4m3fn
FP8_TINY = 1e-12         # an all-zero row's absolute max (its scale stays finite, its values 0)


def fp8_cast(t: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn, saturating at +-FP8_MAX (clamped first, as the kernels do, whatever a torch
    version's cast does past it), rounding to nearest even."""
    return t.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) -> (q (n, k) float8_e4m3fn, scale (n, 1) float32) with q * scale ~ x, each row over its absolute max."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True).clamp_min(FP8_TINY)
    # a reciprocal and products by constants: rounded the same on every device (torch divides by a scalar as a
    # product by its reciprocal on CUDA, exactly on CPU), and by kernels/fp8.py
    return fp8_cast(xf * (amax.reciprocal() * FP8_MAX)), amax * (1.0 / FP8_MAX)


def fp8_weight(w: torch.Tensor, inv: torch.Tensor, transposed: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """A base weight (out, in) in e4m3: each row times inv (out,), or, transposed, each column times inv (in,)
    written as (in, out), the layout of the input gradient's product. Into `out` if given."""
    w = w.float()
    q = fp8_cast(w * inv[None, :]).t() if transposed else fp8_cast(w * inv[:, None])
    return q.contiguous() if out is None else out.copy_(q)


def lowrank_add_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """y (m, n) += h (m, r) @ b (n, r)^T (+ c), in place: the LoRA term (and residual) onto an fp8 product's output,
    summed in float32 and rounded to y's dtype once."""
    acc = y.float() if c is None else y.float() + c.float()
    return y.copy_(acc.addmm_(h.float(), b.float().t()))


# ---------------------------------------------------------------- dropout masks from a counter hash
# A mask is a pure function of (seed, salt, element index): the recomputation of a checkpointed layer, the
# backward and a CUDA graph's replay all get the forward's mask back without saving it or touching a
# generator's state (which lives on the host and cannot be read or set inside a graph).

_M32 = 0xFFFFFFFF


def mix32(x):
    """A bijective 32-bit integer hash (the "lowbias32" xorshift-multiply finalizer), on a Python int or an int64
    tensor of values in [0, 2^32); products are split in 16-bit halves so int64 never overflows."""
    def mul(v, c):
        return (v * (c & 0xFFFF) + (((v * (c >> 16)) & 0xFFFF) << 16)) & _M32
    x = x ^ (x >> 16)
    x = mul(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul(x, 0x846CA68B)
    return x ^ (x >> 16)


def salt_key(salt: int) -> int:
    """The per-mask constant mixed with the seed (< 2^31: a Triton argument stays a 32-bit int)."""
    return mix32(salt & _M32) & 0x7FFFFFFF


def dropout_threshold(p: float) -> int:
    """An element is kept when the top 24 bits of its hash are >= this."""
    return round(p * (1 << 24))


def hashed_dropout(t: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """t * keep / (1 - p), keep = (mix32(mix32(i ^ k) + k) >> 8) >= p * 2^24 for element i of t (row-major) and
    k = mix32(seed ^ salt_key(salt)); seed: an int64 tensor of one value in [0, 2^31), on any device."""
    k = mix32((seed.reshape(()).to(torch.int64) & _M32) ^ salt_key(salt))
    i = torch.arange(t.numel(), dtype=torch.int64, device=t.device)
    bits = mix32((mix32(i ^ k) + k) & _M32)
    keep = ((bits >> 8) >= dropout_threshold(p)).view(t.shape)
    return torch.where(keep, t.float() * (1.0 / (1.0 - p)), 0.0).to(t.dtype)


DROP_HEADS = 4   # heads a group's dropout kernels take at once (kernels/dropout.py passes their keys as scalars)


def hashed_dropout_heads(x: torch.Tensor, seed: torch.Tensor, salts: tuple[int, ...], p: float) -> torch.Tensor:
    """(k, *x.shape): x under each salt's mask (k heads sharing one input, one product for all of them after)."""
    return torch.stack([hashed_dropout(x, seed, s, p) for s in salts])


def masked_sum_(out: torch.Tensor, parts: torch.Tensor, seed: torch.Tensor, salts: tuple[int, ...],
                p: float) -> torch.Tensor:
    """out += sum_i mask_i * parts[i] / (1 - p) in float32, in head order, rounded once; in place (the gradient of
    k dropped copies of one input, each through its own low-rank product)."""
    acc = out.float()
    for i, s in enumerate(salts):
        acc = acc + hashed_dropout(parts[i].float(), seed, s, p)
    return out.copy_(acc)
