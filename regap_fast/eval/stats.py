"""The statistics the evaluation reports need: binomial intervals and correlations.

* ``wilson_interval``: the Wilson score interval for one proportion (an unsafe rate).
* ``paired_difference_interval``: Newcombe's interval for the difference of two proportions measured
  on the *same* items (the unsafe rate under an image condition minus the text-only rate, prompt by
  prompt): method 10 of Newcombe (1998), "Improved confidence intervals for the difference between
  binomial proportions based on paired data", Statistics in Medicine 17:2635-2650 — the two Wilson
  intervals combined with the correlation between the paired outcomes.
* ``correlation``: Pearson and Spearman coefficients with their p-values (scipy.stats).
* ``mean_interval``: a mean with its Student-t interval (per-seed differences, ``regap-fast reproduce``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _check_counts(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a proportion of ``k`` successes in ``n`` trials.

    Unlike the normal (Wald) interval it stays inside [0, 1] and keeps its coverage near 0 and 1 —
    where unsafe rates of safety-tuned models live. ``n = 0`` gives ``(nan, nan)``.
    """
    _check_counts(k, n)
    if n == 0:
        return math.nan, math.nan
    z = _z(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # exact at the ends (the formula gives them up to rounding)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def paired_difference_interval(a: Sequence[bool], b: Sequence[bool],
                               confidence: float = 0.95) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` and its confidence interval, for outcomes paired item by item.

    Newcombe's method 10 (the square-and-add of the two Wilson intervals, with the phi correlation
    of the 2x2 table). Pairing makes the interval tighter than treating the two rates as
    independent samples when the outcomes agree item by item (phi > 0). Returns
    ``(difference, low, high)``; ``nan`` everywhere for no pairs.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must have the same length, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return math.nan, math.nan, math.nan
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = n - both - only_a - only_b
    k1, k2 = both + only_a, both + only_b
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson_interval(k1, n, confidence)
    l2, u2 = wilson_interval(k2, n, confidence)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins > 0 else 0.0
    diff = p1 - p2
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return diff, max(-1.0, diff - below), min(1.0, diff + above)


def summarize(values: Sequence[float], quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
              bins: int = 30) -> dict:
    """Mean, std (population), min, max, quantiles and a histogram of a list of numbers."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"n": 0}
    counts, edges = np.histogram(x, bins=bins)
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "max": float(x.max()),
        "quantiles": {f"{q:g}": float(v) for q, v in zip(quantiles, np.quantile(x, quantiles))},
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def correlation(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson's r and Spearman's rho between ``x`` and ``y``, each with its two-sided p-value.

    Fewer than 3 points, or a constant input, leave a coefficient undefined: it is reported as
    ``None`` with the reason, never as a misleading number.
    """
    from scipy import stats

    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    n = len(x)
    out = {"n": n}
    if n < 3:
        reason = f"needs at least 3 points, got {n}"
    elif len(set(x)) == 1 or len(set(y)) == 1:
        reason = "undefined: one of the variables is constant"
    else:
        reason = None
    if reason:
        return out | {"pearson": None, "spearman": None, "note": reason}
    pearson = stats.pearsonr(x, y)
    spearman = stats.spearmanr(x, y)
    return out | {"pearson": {"r": float(pearson.statistic), "p": float(pearson.pvalue)},
                  "spearman": {"rho": float(spearman.statistic), "p": float(spearman.pvalue)}}


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """The mean of ``values`` and its Student-t confidence interval (e.g. a paired difference over seeds).

    ``mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation
    (``n - 1`` in the denominator). Returns ``{"n", "mean", "std", "low", "high"}``; with fewer than
    2 values the interval (and std) is ``None``, never a misleading number.
    """
    from scipy import stats

    _z(confidence)  # the same check of ``confidence``
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "low": None, "high": None}
    mean = math.fsum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "low": None, "high": None}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}
