"""Statistics of repeated evaluations: intervals over splits and paired tests.

The evaluation protocol (:mod:`taxoclass.pipelines.benchmark`) scores every method on the
same seeded splits, so comparisons are paired:

- :func:`t_interval`: mean and two-sided Student-t confidence interval over splits
  (``mean ± t_{n-1, (1+level)/2} · sd / sqrt(n)``, ``sd`` with ``n - 1``). The splits of
  one data set share images, so the interval describes the split-to-split variation of
  this protocol, not a population of data sets.
- :func:`paired_t`: the mean difference ``a - b`` over splits, its t interval and the
  two-sided paired t-test p-value (scipy ``ttest_rel``); all differences equal -> p = 1
  when they are 0, else 0.
- :func:`mcnemar`: exact two-sided McNemar test on one split's per-image right/wrong
  pairs (binomial test on the discordant pairs, ``p = min(1, 2 P(X <= min(b, c)))``,
  ``X ~ Bin(b + c, 1/2)``).
- :func:`wilson_interval`: Wilson score interval of one proportion (one split's
  accuracy, e.g. on a kept-back seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["mcnemar", "paired_t", "t_interval", "wilson_interval"]


def _values(values: Sequence[float]) -> np.ndarray:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return v[~np.isnan(v)]


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over splits; NaN bounds with
    fewer than two values, NaN everywhere without any. None/NaN values are left out."""
    from scipy import stats

    v = _values(values)
    if not len(v):
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95
             ) -> tuple[float, float, float, float]:
    """(mean difference a - b, low, high, two-sided p) of a paired t-test over splits.

    ``a`` and ``b`` are aligned (split i of ``a`` is split i of ``b``); pairs with a
    missing value on either side are left out.
    """
    from scipy import stats

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired_t: {len(x)} values against {len(y)}; pair them by split.")
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    mean, low, high = t_interval(d, level)
    if len(d) < 2:
        return mean, low, high, math.nan
    if np.all(d == d[0]):
        return mean, low, high, 1.0 if d[0] == 0 else 0.0
    return mean, low, high, float(stats.ttest_rel(x[keep], y[keep]).pvalue)


def mcnemar(right_a: Sequence[bool], right_b: Sequence[bool]) -> tuple[int, int, float]:
    """(b, c, p): b = rows ``a`` gets right and ``b`` wrong, c = the reverse; exact
    two-sided McNemar p-value (1.0 without discordant rows)."""
    from scipy import stats

    ra = np.asarray(right_a, dtype=bool)
    rb = np.asarray(right_b, dtype=bool)
    if ra.shape != rb.shape:
        raise ValueError(f"mcnemar: {len(ra)} rows against {len(rb)}; pair them by image.")
    b = int((ra & ~rb).sum())
    c = int((~ra & rb).sum())
    if b + c == 0:
        return b, c, 1.0
    p = 2.0 * float(stats.binom.cdf(min(b, c), b + c, 0.5))
    return b, c, min(1.0, p)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (NaN bounds when n = 0)."""
    from scipy import stats

    if n <= 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half
