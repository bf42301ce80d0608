"""The 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1) quantized with an importance matrix, as llama.cpp's
`quantize_row_q*_impl` does (ggml-quants.c); without one they come from the `gguf` package (quants.py).

llama.cpp's reference quantizers take each block's scale from its largest weight alone. With an importance
matrix it searches: each weight's error counts importance[col] * sqrt(sigma^2 + x^2) (sigma^2 = the row's mean
x^2), the symmetric types (Q4_0, Q5_0) try 19 scales around nmax / max and keep the weighted least-squares scale
of the best rounding (make_qx_quants), the ones with a min (Q4_1, Q5_1) fit scale and min over 37 trial scales
(make_qkx3_quants). The levels are those of the best trial, not re-rounded against the f16 scale, as llama.cpp
stores them. Why it matters here: SmolLM2's 576-wide rows are not a multiple of 256, so llama.cpp's q4_k_m puts
166 of its 211 matrices in Q5_0 and --imatrix would otherwise not touch them.

  quantize(t, name, importance)   float tensor (rows, cols), (cols,) importance -> uint8 (rows, bytes per row)
"""
from __future__ import annotations

import numpy as np
import torch

from lorafit.export.quant_search import CHUNK_ELEMENTS, f16_bytes, fit_min_scale, symmetric_scale

QK = 32
# name: (nmax, has a min); levels are 0..2*nmax-1 for the symmetric types, 0..nmax with a min
TYPES = {"Q4_0": (8, False), "Q5_0": (16, False), "Q4_1": (15, True), "Q5_1": (31, True)}
MIN_SEARCH = (-0.9, 0.05, 36)  # (rmin, rdelta, nstep) of quantize_row_q4_1_impl / q5_1_impl


def quantize(t: torch.Tensor, name: str, importance: torch.Tensor) -> np.ndarray:
    """`t` (rows, cols), cols a multiple of 32, in `name`'s blocks, searched with `importance` (cols,)."""
    rows, cols = t.shape
    if cols % QK:
        raise ValueError(f"{name} needs rows of a multiple of {QK} weights, got {cols}")
    x = t.float()
    qw = importance.float().to(x.device).reshape(1, cols)
    # the symmetric search holds a (blocks, 19 trials, 32) temporary; the one with a min runs its trials one by one
    step = max(1, CHUNK_ELEMENTS.get(x.device.type, 1 << 21) // (cols * (2 if TYPES[name][1] else 19)))  # rows
    parts = []
    for start in range(0, rows, step):
        xr = x[start:start + step]
        sigma2 = xr.pow(2).sum(-1, keepdim=True) / cols
        w = qw * torch.sqrt(sigma2 + xr * xr)
        blocks = _blocks(xr.reshape(-1, QK), w.reshape(-1, QK), name)
        parts.append(blocks.reshape(xr.shape[0], -1).cpu())
    return torch.cat(parts).numpy()


def _blocks(x: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
    """(n, 32) weights and error weights -> (n, bytes per block): d[, m][, qh[4]], qs[16]."""
    nmax, with_min = TYPES[name]
    if with_min:
        d, mins, L = fit_min_scale(x, w, nmax, *MIN_SEARCH)
        head = [f16_bytes(d), f16_bytes(-mins)]  # m is the (<= 0) offset added back: x = d * L + m
    else:
        d, L = symmetric_scale(x, w, nmax)
        L = L + nmax
        head = [f16_bytes(d)]
    L = L.to(torch.uint8)
    low = L & 15
    qs = low[:, :16] | (low[:, 16:] << 4)  # weight j and j+16 share a byte
    if name in ("Q4_0", "Q4_1"):
        return torch.cat(head + [qs], dim=1)
    bits = (L >> 4).to(torch.int64) << torch.arange(QK, device=x.device)  # bit j: the fifth bit of weight j
    qh = bits.sum(-1, keepdim=True).view(torch.uint8)[:, :4]  # the low 4 bytes of the little-endian int64
    return torch.cat(head + [qh, qs], dim=1)
