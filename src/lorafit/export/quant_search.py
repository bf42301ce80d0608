"""The scale searches of llama.cpp's quantizers (ggml-quants.c), vectorized in torch over many groups at once.

Each works on rows of a 2-D tensor (one row = one group of weights sharing a scale). Where llama.cpp's trial
scales are independent of each other they all run at once, as a (groups, trials, weights) tensor whose weighted
sums are batched matmuls; ties go to the trial llama.cpp tries first, as its strict `<` / `>` comparisons keep.

  fit_min_scale(x, w, nmax, rmin, rdelta, nstep)   make_qkx2/3_quants: x ~ scale * L - min, L in 0..nmax
  symmetric_scale(x, w, nmax)                      make_qx_quants (rmse_type 1): x ~ scale * L, L in -nmax..nmax-1
  positive_scale(x, w, nmax)                       make_qp_quants: the super-block scale of Q4_K/Q5_K's sub-scales
"""
from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15  # llama.cpp treats a group with max |w| below this as all zero
# Float32 elements of the largest temporary, the (groups, trial scales, weights) tensor of one chunk: a few
# MiB stays in a CPU's cache; on a GPU fewer, larger chunks keep the kernels busy (~2 GiB per temporary).
CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 29}


def f16(t: torch.Tensor) -> torch.Tensor:
    """What a stored f16 scale reads back as."""
    return t.to(torch.float16).float()


def f16_bytes(t: torch.Tensor) -> torch.Tensor:
    """(n,) float -> (n, 2) uint8, little endian (GGUF's and every llama.cpp host's byte order)."""
    return t.to(torch.float16).reshape(-1, 1).contiguous().view(torch.uint8)


def round_clamp(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.round(v).clamp_(lo, hi)  # torch rounds half to even, as llama.cpp's nearest_int does


def fit_min_scale(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                  nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of `x` (n, k): scale, min and levels L (x ~ scale * L - min, L in 0..nmax) minimizing
    sum w * err^2, as make_qkx2_quants / make_qkx3_quants find them.

    Each trial scale rounds L once; the best scale and min for that L are then the weighted least-squares
    solution (2x2 normal equations), with the min clamped to <= 0 as the format stores a subtracted min. The
    trials run one after another, as in llama.cpp, because each rounds against the best min found so far (all
    rows of `x` at once).
    """
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)
    flat = hi <= lo
    hi = torch.where(flat, lo + 1, hi)
    sw, sx = w.sum(-1), (w * x).sum(-1)
    iscale = nmax / (hi - lo)
    scale = 1 / iscale
    L = round_clamp(iscale[:, None] * (x - lo[:, None]), 0, nmax)  # (n, k)
    best = (w * (scale[:, None] * L + lo[:, None] - x) ** 2).sum(-1)
    the_min = lo
    for i in range(nstep + 1):
        # the trial's numerator rounded as llama.cpp's float arithmetic rounds it (a Python float: a numpy scalar
        # would pull the division into numpy, 15x slower)
        iscale = float(np.float32(rmin) + np.float32(rdelta) * np.float32(i) + np.float32(nmax)) / (hi - the_min)
        aux = round_clamp(iscale[:, None] * (x - the_min[:, None]), 0, nmax)
        sl, sl2, sxl = (w * aux).sum(-1), (w * aux * aux).sum(-1), (w * aux * x).sum(-1)
        D = sw * sl2 - sl * sl
        s, m = (sw * sxl - sx * sl) / D, (sl2 * sx - sl * sxl) / D
        pos = m > 0
        s, m = torch.where(pos, sxl / sl2, s), torch.where(pos, torch.zeros_like(m), m)
        err = (w * (s[:, None] * aux + m[:, None] - x) ** 2).sum(-1)
        take = (D > 0) & (err < best)  # strict: the earliest of equal errors stays; a NaN never wins
        L = torch.where(take[:, None], aux, L)
        best, scale, the_min = torch.where(take, err, best), torch.where(take, s, scale), torch.where(take, m, the_min)
    zero = torch.zeros_like(scale)
    return torch.where(flat, zero, scale), -the_min, torch.where(flat[:, None], torch.zeros_like(L), L)


def symmetric_scale(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `x` (n, k): the scale s and levels L (x ~ s * L, L in -nmax..nmax-1) with the lowest weighted
    error over 19 trial roundings around nmax / max; the extreme weight keeps its sign so it maps to -nmax.
    An all-zero row gets scale 0 and L = -nmax (stored as 0, as llama.cpp writes it)."""
    idx = x.abs().argmax(-1, keepdim=True)  # the first of equal |x|, as llama.cpp's strict `>` keeps
    mx = x.gather(-1, idx).squeeze(-1)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    order = [0, *range(-9, 0), *range(1, 10)]  # llama.cpp's order: ties go to the earliest
    trials = torch.tensor([np.float32(nmax) + np.float32(0.1) * np.float32(i) for i in order], device=x.device)
    L = round_clamp(x[:, None, :] * (-trials[None, :, None] / mx[:, None, None]), -nmax, nmax - 1)  # (n, T, k)
    sumlx = torch.einsum("ntk,nk->nt", L, w * x)
    suml2 = torch.einsum("ntk,nk->nt", L * L, w)
    has = suml2 > 0
    # the weighted least-squares scale for L is sumlx / suml2, and its error falls as sumlx^2 / suml2 grows
    gain = torch.where(has, sumlx * sumlx / torch.where(has, suml2, torch.ones_like(suml2)), -torch.inf)
    gain[:, 0] = torch.where(has[:, 0], gain[:, 0], torch.zeros_like(gain[:, 0]))
    best = gain.argmax(-1, keepdim=True)
    lx, l2 = sumlx.gather(-1, best).squeeze(-1), suml2.gather(-1, best).squeeze(-1)
    levels = L.gather(1, best[..., None].expand(-1, 1, L.shape[-1])).squeeze(1)
    scale = torch.where(l2 > 0, lx / torch.where(l2 > 0, l2, torch.ones_like(l2)), torch.zeros_like(lx))
    levels = torch.where(zero[:, None], torch.full_like(levels, -nmax), levels)
    return torch.where(zero, torch.zeros_like(scale), scale), levels


def positive_scale(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `x` (n, k), x >= 0: scale d and levels L in 0..nmax (x ~ d * L) as make_qp_quants finds them:
    the best of 9 trial scales around max / nmax, then up to 5 passes that move one level at a time while the
    weighted least-squares fit improves, then d = the least-squares scale of those levels."""
    mx = x.amax(-1).clamp(min=0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    order = [0, *range(-4, 0), *range(1, 5)]
    inv = torch.tensor([np.float32(nmax) + np.float32(0.1) * np.float32(i) for i in order], device=x.device)
    iscale = inv[None, :] / mx[:, None]  # (n, T)
    L = torch.round(x[:, None, :] * iscale[..., None]).clamp_(max=nmax)  # (n, T, k)
    mse = (w[:, None, :] * (x[:, None, :] - (1 / iscale[..., None]) * L) ** 2).sum(-1)
    best = mse.argmin(-1, keepdim=True)
    L = torch.round(x * iscale.gather(-1, best)).clamp_(max=nmax)  # (n, k)
    sumlx, suml2 = (w * x * L).sum(-1), (w * L * L).sum(-1)
    for _ in range(5):  # a pass that changes nothing leaves the next one nothing to change: 5 passes always
        for i in range(x.shape[-1]):  # one level at a time, in order: each move changes the fit the next sees
            wi, xi, li = w[:, i], x[:, i], L[:, i]
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            can = (slx > 0) & (sl2 > 0)
            new = torch.round(xi * sl2 / torch.where(can, slx, torch.ones_like(slx))).clamp_(max=nmax)
            slx, sl2 = slx + wi * xi * new, sl2 + wi * new * new
            take = can & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[:, i] = torch.where(take, new, li)
            sumlx, suml2 = torch.where(take, slx, sumlx), torch.where(take, sl2, suml2)
    d = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx))
    return torch.where(zero, torch.zeros_like(d), d), torch.where(zero[:, None], torch.zeros_like(L), L)
