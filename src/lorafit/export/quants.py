"""GGUF k-quants (Q4_K, Q5_K, Q6_K) in torch, byte for byte in llama.cpp's block layouts.

The `gguf` package dequantizes k-quants but cannot make them, and llama.cpp's quantizer is C that a user
would have to build. These are vectorized over all blocks of a tensor at once, on the GPU when there is one,
so a 7B model quantizes in minutes (bench/quant_speed.py). The 32-weight block types (Q4_0, Q5_0, Q5_1, Q8_0)
come from the `gguf` package, which already matches llama.cpp's reference quantizers bit for bit.

The scale searches follow llama.cpp's reference quantizers (what `llama-quantize` runs without an importance
matrix): per 32-weight sub-block a weighted least-squares fit of scale and min over a grid of trial scales
(Q4_K, Q5_K), per 16-weight sub-block a weighted search of symmetric scales (Q6_K); then the sub-block scales
are themselves quantized (6 bits against one f16 super-block scale for Q4_K/Q5_K, 8 bits for Q6_K) and the
weights re-rounded against the stored scales. With an importance matrix (`importance`, one weight per input
column), every error is weighted by it as well.

  quantize(t, qtype, importance=None)   float tensor (rows, cols) -> uint8 array (rows, bytes per row)
"""
from __future__ import annotations

import numpy as np
import torch

QK_K = 256  # weights per k-quant super-block
GROUP_MAX_EPS = 1e-15  # llama.cpp treats a group with max |w| below this as all zero
# Float32 elements of the largest temporary, the (sub-blocks, trial scales, weights) tensor of one chunk: a few
# MiB stays in a CPU's cache; on a GPU fewer, larger chunks keep the kernels busy (~2 GiB per temporary).
CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 29}
# (nmax, rmin, rdelta, nstep) of llama.cpp's reference min/scale search for each type.
SEARCH = {"Q4_K": (15, -1.0, 0.1, 20), "Q5_K": (31, -0.5, 0.1, 15)}


def quantize(t: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> np.ndarray:
    """`t` (rows, cols), cols a multiple of the type's block, as GGUF blocks: uint8 (rows, bytes per row)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype not in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return gguf.quants.quantize(t.float().cpu().numpy(), qtype)
    rows, cols = t.shape
    if cols % QK_K:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {QK_K} weights, got {cols}")
    x = t.float().reshape(-1, QK_K)  # (blocks, 256), row-major: a row's blocks are consecutive
    w = None
    if importance is not None:
        w = importance.float().to(x.device).reshape(1, cols // QK_K, QK_K).expand(rows, -1, -1).reshape(-1, QK_K)
    step = max(1, CHUNK_ELEMENTS.get(x.device.type, 1 << 21) // (QK_K * 22))  # super-blocks per chunk
    parts = []
    for start in range(0, x.shape[0], step):
        xb = x[start:start + step]
        wb = None if w is None else w[start:start + step]
        blocks = _q6_k(xb, wb) if qtype == Q.Q6_K else _q45_k(xb, wb, qtype.name)
        parts.append(blocks.cpu())
    return torch.cat(parts).numpy().reshape(rows, -1)


def _f16(t: torch.Tensor) -> torch.Tensor:
    """What a stored f16 scale reads back as."""
    return t.to(torch.float16).float()


def _f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """(n,) float -> (n, 2) uint8, little endian (GGUF's and every llama.cpp host's byte order)."""
    return t.to(torch.float16).reshape(-1, 1).contiguous().view(torch.uint8)


def _round_clamp(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.round(v).clamp_(lo, hi)  # torch rounds half to even, as llama.cpp's nearest_int does


def _fit_min_scale(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                   nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `x` (n, 32): scale and min (x ~ scale * L - min, L in 0..nmax) minimizing sum w * err^2.

    Each trial scale rounds L once; the best scale and min for that L are then the weighted least-squares
    solution (2x2 normal equations), with the min clamped to <= 0 as the format stores a subtracted min. All
    trials run at once, as a (n, trials, 32) tensor whose weighted sums are batched matmuls.
    """
    lo = x.amin(-1).clamp(max=0)
    rng = x.amax(-1) - lo
    flat = rng == 0
    rng = torch.where(flat, torch.ones_like(rng), rng)
    wx = w * x
    sw, sx, sxx = w.sum(-1), wx.sum(-1), (wx * x).sum(-1)
    xs = x - lo[:, None]
    steps = np.float32(rmin) + np.float32(rdelta) * np.arange(nstep + 1, dtype=np.float32) + np.float32(nmax)
    trials = torch.tensor(np.concatenate([[np.float32(nmax)], steps]), device=x.device)  # (T,) first: plain max-min
    L = _round_clamp(xs[:, None, :] * (trials[None, :, None] / rng[:, None, None]), 0, nmax)  # (n, T, 32)
    sl = torch.einsum("ntk,nk->nt", L, w)
    sl2 = torch.einsum("ntk,nk->nt", L * L, w)
    sxl = torch.einsum("ntk,nk->nt", L, wx)
    sw, sx, sxx = sw[:, None], sx[:, None], sxx[:, None]
    D = sw * sl2 - sl * sl
    s = (sw * sxl - sx * sl) / D
    m = (sl2 * sx - sl * sxl) / D
    pos = m > 0
    s = torch.where(pos, sxl / sl2, s)
    m = torch.where(pos, torch.zeros_like(m), m)
    s[:, 0], m[:, 0] = rng / nmax, lo  # trial 0 keeps the max-min scale and min themselves, as llama.cpp starts
    # sum w (s L + m - x)^2 expanded into the sums above, so no pass over the weights per trial
    err = s * s * sl2 + 2 * s * m * sl + m * m * sw - 2 * s * sxl - 2 * m * sx + sxx
    ok = D > 0
    ok[:, 0] = True
    err = torch.where(ok & torch.isfinite(err), err, torch.full_like(err, float("inf")))
    best = err.argmin(-1, keepdim=True)  # the first of equal errors, as llama.cpp's strict `<` keeps
    scale, the_min = s.gather(-1, best).squeeze(-1), m.gather(-1, best).squeeze(-1)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -the_min


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and eight 6-bit mins -> 12 bytes: sub-blocks 0-3 in the low 6 bits of bytes 0-3
    (scales) and 4-7 (mins); sub-blocks 4-7 as low nibbles in bytes 8-11 and their top 2 bits in the top
    2 bits of bytes 0-7."""
    hi_s, hi_m = (ls[:, 4:] >> 4) << 6, (lm[:, 4:] >> 4) << 6
    return torch.cat([ls[:, :4] | hi_s, lm[:, :4] | hi_m, (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)], dim=1)


def _q45_k(x: torch.Tensor, qw: torch.Tensor | None, name: str) -> torch.Tensor:
    """(nb, 256) -> Q4_K (144 bytes: d, dmin, scales[12], qs[128]) or Q5_K (176: d, dmin, scales, qh[32], qs)."""
    nmax, rmin, rdelta, nstep = SEARCH[name]
    nb = x.shape[0]
    sub = x.reshape(-1, 32)  # (nb*8, 32)
    # llama.cpp weights each error by |w| plus the sub-block's RMS: large weights matter more, none is ignored.
    w = sub.pow(2).mean(-1, keepdim=True).sqrt() + sub.abs()
    if qw is not None:
        w = w * qw.reshape(-1, 32)
    scale, mins = _fit_min_scale(sub, w, nmax, rmin, rdelta, nstep)
    scale, mins = scale.reshape(nb, 8).clamp(min=0), mins.reshape(nb, 8)
    max_scale, max_min = scale.amax(-1), mins.amax(-1)
    inv_s = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
    ls = _round_clamp(inv_s[:, None] * scale, 0, 63)
    lm = _round_clamp(inv_m[:, None] * mins, 0, 63)
    d, dmin = _f16(max_scale / 63), _f16(max_min / 63)
    dsub, msub = d[:, None] * ls, dmin[:, None] * lm  # (nb, 8): what the file's scales read back as
    xr = x.reshape(nb, 8, 32)
    safe = torch.where(dsub > 0, dsub, torch.ones_like(dsub))
    L = _round_clamp((xr + msub[..., None]) / safe[..., None], 0, nmax)
    L = torch.where((dsub > 0)[..., None], L, torch.zeros_like(L)).to(torch.uint8).reshape(nb, 4, 2, 32)
    scales = _pack_scales_k4(ls.to(torch.uint8), lm.to(torch.uint8))
    head = [_f16_bytes(max_scale / 63), _f16_bytes(max_min / 63), scales]
    low = L & 15
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)  # 64-weight chunks: weight l and l+32 share a byte
    if name == "Q4_K":
        return torch.cat(head + [qs], dim=1)
    shifts = torch.arange(8, device=x.device, dtype=torch.uint8).reshape(1, 4, 2, 1)
    qh = ((L >> 4) << shifts).sum(dim=(1, 2), dtype=torch.uint8)  # bit 2c / 2c+1: top bit of chunk c's halves
    return torch.cat(head + [qh, qs], dim=1)


def _symmetric_scale(x: torch.Tensor, w: torch.Tensor, nmax: int) -> torch.Tensor:
    """Per row of `x` (n, 16): the scale s (x ~ s * L, L in -nmax..nmax-1) with the lowest weighted error
    over 19 trial roundings around nmax / max; the extreme weight keeps its sign so it maps to -nmax."""
    idx = x.abs().argmax(-1, keepdim=True)
    mx = x.gather(-1, idx).squeeze(-1)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    order = [0, *range(-9, 0), *range(1, 10)]  # llama.cpp's order: ties go to the earliest
    trials = torch.tensor([np.float32(nmax) + np.float32(0.1) * np.float32(i) for i in order], device=x.device)
    L = _round_clamp(x[:, None, :] * (-trials[None, :, None] / mx[:, None, None]), -nmax, nmax - 1)  # (n, T, 16)
    sumlx = torch.einsum("ntk,nk->nt", L, w * x)
    suml2 = torch.einsum("ntk,nk->nt", L * L, w)
    has = suml2 > 0
    # the weighted least-squares scale for L is sumlx / suml2, and its error falls as sumlx^2 / suml2 grows
    gain = torch.where(has, sumlx * sumlx / torch.where(has, suml2, torch.ones_like(suml2)), -torch.inf)
    gain[:, 0] = torch.where(has[:, 0], gain[:, 0], torch.zeros_like(gain[:, 0]))
    best = gain.argmax(-1, keepdim=True)
    lx, l2 = sumlx.gather(-1, best).squeeze(-1), suml2.gather(-1, best).squeeze(-1)
    scale = torch.where(l2 > 0, lx / torch.where(l2 > 0, l2, torch.ones_like(l2)), torch.zeros_like(lx))
    return torch.where(zero, torch.zeros_like(scale), scale)


def _q6_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """(nb, 256) -> Q6_K (210 bytes: ql[128], qh[64], int8 scales[16], d)."""
    nb = x.shape[0]
    sub = x.reshape(-1, 16)
    w = sub * sub if qw is None else qw.reshape(-1, 16) * sub * sub  # llama.cpp weighs errors by x^2 here
    scales = _symmetric_scale(sub, w, 32).reshape(nb, 16)
    idx = scales.abs().argmax(-1, keepdim=True)
    max_scale = scales.gather(-1, idx).squeeze(-1)
    zero = max_scale.abs() < GROUP_MAX_EPS
    max_scale = torch.where(zero, torch.ones_like(max_scale), max_scale)
    iscale = -128 / max_scale
    d = torch.where(zero, torch.zeros_like(iscale), 1 / iscale)
    sc = torch.round(iscale[:, None] * scales).clamp_(-128, 127)
    sc = torch.where(zero[:, None], torch.zeros_like(sc), sc)
    dsub = _f16(d)[:, None] * sc  # (nb, 16)
    safe = torch.where(dsub != 0, dsub, torch.ones_like(dsub))
    L = _round_clamp(x.reshape(nb, 16, 16) / safe[..., None], -32, 31) + 32
    L = torch.where((dsub != 0)[..., None], L, torch.full_like(L, 32))
    L = torch.where(zero[:, None, None], torch.zeros_like(L), L)  # llama.cpp zero-fills an all-zero block
    L = L.to(torch.uint8).reshape(nb, 2, 4, 32)  # 128-weight halves, 32-weight quarters
    low, high = L & 15, L >> 4
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2).reshape(nb, 128)
    shifts = torch.tensor([0, 2, 4, 6], device=x.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = (high << shifts).sum(dim=2, dtype=torch.uint8).reshape(nb, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)], dim=1)
