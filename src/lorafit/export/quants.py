"""GGUF k-quants (Q4_K, Q5_K, Q6_K) in torch, byte for byte in llama.cpp's block layouts.

The `gguf` package dequantizes k-quants but cannot make them, and llama.cpp's quantizer is C that a user
would have to build. These are vectorized over all blocks of a tensor at once, on the GPU when there is one,
so a 7B model quantizes in minutes (bench/quant_speed.py). The 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0) come from the `gguf` package, which matches llama.cpp's reference quantizers bit for bit; with an
importance matrix they come from quants_legacy.py, as llama.cpp then runs a weighted search for them too.

Without an importance matrix the scale searches follow llama.cpp's reference quantizers: per 32-weight
sub-block a weighted least-squares fit of scale and min over a grid of trial scales (Q4_K, Q5_K), per
16-weight sub-block a weighted search of symmetric scales (Q6_K); then the sub-block scales are themselves
quantized (6 bits against one f16 super-block scale for Q4_K/Q5_K, 8 bits for Q6_K) and the weights re-rounded
against the stored scales. With one (`importance`, one weight per input column) they follow llama.cpp's
`quantize_row_q*_K_impl`: the errors are weighted by importance * sqrt(sigma^2 + x^2) (Q4_K/Q5_K; Q6_K by the
importance alone), over a finer grid of trial scales, and the sub-block scales get a weighted search too.

  quantize(t, qtype, importance=None)   float tensor (rows, cols) -> uint8 array (rows, bytes per row)
"""
from __future__ import annotations

import numpy as np
import torch

from lorafit.export import quants_legacy
from lorafit.export.quant_search import (
    CHUNK_ELEMENTS,
    GROUP_MAX_EPS,
    f16,
    f16_bytes,
    fit_min_scale,
    positive_scale,
    round_clamp,
    symmetric_scale,
)

QK_K = 256  # weights per k-quant super-block
# (nmax, rmin, rdelta, nstep) of llama.cpp's reference min/scale search for each type, and of its search with an
# importance matrix (quantize_row_q4_K_impl / q5_K_impl: 37 trials from nmax - 0.9 in steps of 0.05).
SEARCH = {"Q4_K": (15, -1.0, 0.1, 20), "Q5_K": (31, -0.5, 0.1, 15)}
IMATRIX_SEARCH = (-0.9, 0.05, 36)


def quantize(t: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> np.ndarray:
    """`t` (rows, cols), cols a multiple of the type's block, as GGUF blocks: uint8 (rows, bytes per row)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype not in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        if importance is not None and qtype.name in quants_legacy.TYPES:
            return quants_legacy.quantize(t, qtype.name, importance)
        return gguf.quants.quantize(t.float().cpu().numpy(), qtype)  # Q8_0 ignores importance, as llama.cpp's
    rows, cols = t.shape
    if cols % QK_K:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {QK_K} weights, got {cols}")
    x = t.float().reshape(-1, QK_K)  # (blocks, 256), row-major: a row's blocks are consecutive
    w = None
    if importance is not None:
        w = importance.float().to(x.device).reshape(1, cols // QK_K, QK_K).expand(rows, -1, -1).reshape(-1, QK_K)
    # Q6_K's search holds a (sub-blocks, 19 trials, 16) temporary; Q4_K/Q5_K's runs its trials one by one
    per_block = QK_K * (19 if qtype == Q.Q6_K else 2)
    step = max(1, CHUNK_ELEMENTS.get(x.device.type, 1 << 21) // per_block)  # super-blocks per chunk
    parts = []
    for start in range(0, x.shape[0], step):
        xb = x[start:start + step]
        wb = None if w is None else w[start:start + step]
        blocks = _q6_k(xb, wb) if qtype == Q.Q6_K else _q45_k(xb, wb, qtype.name)
        parts.append(blocks.cpu())
    return torch.cat(parts).numpy().reshape(rows, -1)


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
    if qw is None:
        # llama.cpp weights each error by |w| plus the sub-block's RMS: large weights matter more, none is ignored.
        w = sub.pow(2).mean(-1, keepdim=True).sqrt() + sub.abs()
    else:
        rmin, rdelta, nstep = IMATRIX_SEARCH
        sigma2 = 2 * x.pow(2).sum(-1, keepdim=True) / QK_K  # llama.cpp's 2 * mean x^2 of the super-block
        w = (qw * torch.sqrt(sigma2 + x * x)).reshape(-1, 32)
    scale, mins, _ = fit_min_scale(sub, w, nmax, rmin, rdelta, nstep)
    # a negative least-squares scale (rare) would wrap around in llama.cpp's uint8 sub-scale; 0 is what it means
    scale, mins = scale.reshape(nb, 8).clamp(min=0), mins.reshape(nb, 8)
    if qw is None:
        max_scale, max_min = scale.amax(-1), mins.amax(-1)
        inv_s = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
        inv_m = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
        ls = round_clamp(inv_s[:, None] * scale, 0, 63)
        lm = round_clamp(inv_m[:, None] * mins, 0, 63)
        d_block, m_block = max_scale / 63, max_min / 63
    else:  # make_qp_quants, each sub-block weighted by its summed error weights
        sw = w.sum(-1).reshape(nb, 8)
        d_block, ls = positive_scale(scale, sw, 63)
        m_block, lm = positive_scale(mins, sw, 63)
    d, dmin = f16(d_block), f16(m_block)
    dsub, msub = d[:, None] * ls, dmin[:, None] * lm  # (nb, 8): what the file's scales read back as
    xr = x.reshape(nb, 8, 32)
    safe = torch.where(dsub > 0, dsub, torch.ones_like(dsub))
    L = round_clamp((xr + msub[..., None]) / safe[..., None], 0, nmax)
    L = torch.where((dsub > 0)[..., None], L, torch.zeros_like(L)).to(torch.uint8).reshape(nb, 4, 2, 32)
    scales = _pack_scales_k4(ls.to(torch.uint8), lm.to(torch.uint8))
    head = [f16_bytes(d_block), f16_bytes(m_block), scales]
    low = L & 15
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)  # 64-weight chunks: weight l and l+32 share a byte
    if name == "Q4_K":
        return torch.cat(head + [qs], dim=1)
    shifts = torch.arange(8, device=x.device, dtype=torch.uint8).reshape(1, 4, 2, 1)
    qh = ((L >> 4) << shifts).sum(dim=(1, 2), dtype=torch.uint8)  # bit 2c / 2c+1: top bit of chunk c's halves
    return torch.cat(head + [qh, qs], dim=1)


def _q6_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """(nb, 256) -> Q6_K (210 bytes: ql[128], qh[64], int8 scales[16], d)."""
    nb = x.shape[0]
    sub = x.reshape(-1, 16)
    # llama.cpp weighs errors by x^2 here, and by the importance alone with one (quantize_row_q6_K_impl)
    w = sub * sub if qw is None else qw.reshape(-1, 16)
    scales = symmetric_scale(sub, w, 32)[0].reshape(nb, 16)
    idx = scales.abs().argmax(-1, keepdim=True)
    max_scale = scales.gather(-1, idx).squeeze(-1)
    zero = max_scale.abs() < GROUP_MAX_EPS
    max_scale = torch.where(zero, torch.ones_like(max_scale), max_scale)
    iscale = -128 / max_scale
    d = torch.where(zero, torch.zeros_like(iscale), 1 / iscale)
    sc = torch.round(iscale[:, None] * scales).clamp_(-128, 127)
    sc = torch.where(zero[:, None], torch.zeros_like(sc), sc)
    dsub = f16(d)[:, None] * sc  # (nb, 16)
    safe = torch.where(dsub != 0, dsub, torch.ones_like(dsub))
    L = round_clamp(x.reshape(nb, 16, 16) / safe[..., None], -32, 31) + 32
    L = torch.where((dsub != 0)[..., None], L, torch.full_like(L, 32))
    L = torch.where(zero[:, None, None], torch.zeros_like(L), L)  # llama.cpp zero-fills an all-zero block
    L = L.to(torch.uint8).reshape(nb, 2, 4, 32)  # 128-weight halves, 32-weight quarters
    low, high = L & 15, L >> 4
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2).reshape(nb, 128)
    shifts = torch.tensor([0, 2, 4, 6], device=x.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = (high << shifts).sum(dim=2, dtype=torch.uint8).reshape(nb, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), f16_bytes(d)], dim=1)
