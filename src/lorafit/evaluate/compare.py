"""Tuned minus base, per metric: the difference, its paired bootstrap 95% interval, and per-example wins.

Paired bootstrap (Koehn 2004, "Statistical significance tests for machine translation evaluation"):
draw `samples` sets of n example indices with replacement, score both models on each same set and
take the 2.5th and 97.5th percentiles of the difference. Pairing matters: both models find the same prompts
hard, so the difference varies less than either score, and the paired interval is narrower than two
independent ones. The seed is fixed, so the same eval gives the same interval.

An interval that spans 0 is "not significant": on this many examples the data cannot tell the two apart.
Perplexity is compared through per-example NLL sums (the resampled ratio sum NLL / sum tokens, not the
mean of per-example perplexities), lower is better, so "better" there means a negative difference.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lorafit.evaluate.metrics import Metric, Scored

TIE = 1e-9


def compare_metric(metric: Metric, tuned: Scored, base: Scored, samples: int, seed: int) -> dict[str, Any]:
    """Difference of the headline values on the examples both score, with interval and wins/losses/ties."""
    import numpy as np

    rows = [i for i in tuned.applies if base.per_example[i] is not None]
    if not rows:
        return {"n": 0}
    diff = metric.value_at(tuned, rows) - metric.value_at(base, rows)
    idx = np.asarray(rows)[_resample(len(rows), samples, seed)]  # (samples, n)
    if metric.sacrebleu is None:  # a mean of per-example scores: vectorized
        gap = np.zeros(len(tuned.per_example))
        gap[rows] = [tuned.per_example[i] - base.per_example[i] for i in rows]
        dist = gap[idx].mean(axis=1)
    else:
        dist = np.asarray([metric.value_at(tuned, r) - metric.value_at(base, r) for r in idx])
    t = [tuned.per_example[i] for i in rows]
    b = [base.per_example[i] for i in rows]
    return _summary(diff, dist, t, b, higher_is_better=True)


def compare_perplexity(tuned: Sequence[tuple[float, int] | None], base: Sequence[tuple[float, int] | None],
                       samples: int, seed: int) -> dict[str, Any]:
    """tuned/base: per example (NLL sum over reply tokens, token count), None when it was not scored."""
    import numpy as np

    rows = [i for i, (x, y) in enumerate(zip(tuned, base, strict=True))
            if x is not None and y is not None and x[1] and y[1]]
    if not rows:
        return {"n": 0}
    nt, ct = (np.asarray([tuned[i][k] for i in rows], dtype=np.float64) for k in (0, 1))
    nb, cb = (np.asarray([base[i][k] for i in rows], dtype=np.float64) for k in (0, 1))
    idx = _resample(len(rows), samples, seed)
    with np.errstate(over="ignore"):
        diff = float(np.exp(nt.sum() / ct.sum()) - np.exp(nb.sum() / cb.sum()))
        dist = np.exp(nt[idx].sum(1) / ct[idx].sum(1)) - np.exp(nb[idx].sum(1) / cb[idx].sum(1))
    # per example, the lower mean NLL wins (what perplexity ranks)
    return _summary(diff, dist, list(-nt / ct), list(-nb / cb), higher_is_better=False)


def _resample(n: int, samples: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def _summary(diff: float, dist, tuned: list[float], base: list[float], higher_is_better: bool) -> dict[str, Any]:
    import numpy as np

    low, high = (float(v) for v in np.percentile(dist, [2.5, 97.5]))
    wins = int(sum(float(t) - float(b) > TIE for t, b in zip(tuned, base, strict=True)))
    losses = int(sum(float(b) - float(t) > TIE for t, b in zip(tuned, base, strict=True)))
    if not (np.isfinite(low) and np.isfinite(high)):
        verdict = "not significant"
    elif low > 0 or high < 0:
        verdict = "better" if (low > 0) == higher_is_better else "worse"
    else:
        verdict = "not significant"
    return {"diff": round(diff, 4), "low": round(low, 4), "high": round(high, 4), "n": len(tuned), "wins": wins,
            "losses": losses, "ties": len(tuned) - wins - losses, "verdict": verdict}
