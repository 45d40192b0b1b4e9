"""Intervals for plot benchmarks whose plots share source images.

Synthetic plots composed from a pool of leaf images reuse those images (in the leaf
benchmark, 847 leaf placements in 120 test plots come from 270 images), and plots of one
real site share plants. Plot scores are then not independent, and a standard error that
treats them so is too small. This module resamples per-plot scores ``values`` ``[P, M]``
(P plots, M methods; every method sees the same resample, so differences between columns
are paired) under three schemes:

- ``"plot"``: plots drawn with replacement (the naive bootstrap; independence assumed).
- ``"source"``: source images drawn with replacement, and every plot comes along once
  per copy of each of its images (weight ``w_p = sum of its images' counts``): the
  literal cluster bootstrap for plots that belong to several clusters. A plot with k
  images has a weight that varies by only about ``1/sqrt(k)`` of its mean, so with
  several images per plot this scheme UNDERSTATES the variance (see the tests); it is
  kept as a diagnostic, not for intervals.
- ``"shared_source"`` (the default): a dependent wild bootstrap (Shao 2010, JASA 105:218)
  whose Gaussian multipliers ``g`` have covariance ``K``: ``K[p, q] = 1`` when plots p and
  q share at least one source image (and on the diagonal), else 0; negative eigenvalues
  of K are set to 0, which can only widen the interval. A resample is
  ``mean(values) + mean(g * (values - mean(values)))``. Its variance is the
  dependence-robust variance ``u' K u / P**2`` (u: centred scores) that counts every pair
  of plots sharing an image as correlated, the multi-membership analogue of Cameron,
  Gelbach & Miller (2011, JBES 29:238) clustered errors
  (:func:`shared_source_se` gives it in closed form); with no shared image it is the
  plain independent-plots variance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["SCHEMES", "bootstrap_means", "membership_matrix", "percentile_interval",
           "shared_source_kernel", "shared_source_se"]

SCHEMES = ("shared_source", "source", "plot")


def membership_matrix(sources: Mapping[str, Sequence[str]], plot_ids: Sequence[str]
                      ) -> tuple[np.ndarray, list[str]]:
    """``[P, I]`` boolean matrix: plot ``plot_ids[p]`` holds source image ``names[i]``
    (repeats of one image in a plot count once), and the sorted source names."""
    names = sorted({str(s) for p in plot_ids for s in sources[p]})
    col = {n: i for i, n in enumerate(names)}
    m = np.zeros((len(plot_ids), len(names)), dtype=bool)
    for r, p in enumerate(plot_ids):
        m[r, [col[str(s)] for s in sources[p]]] = True
    return m, names


def shared_source_kernel(membership: np.ndarray) -> np.ndarray:
    """``[P, P]`` float matrix: 1 where two plots share a source image or are the same
    plot, else 0."""
    m = np.asarray(membership, dtype=float)
    k = (m @ m.T > 0).astype(float)
    np.fill_diagonal(k, 1.0)
    return k


def shared_source_se(values: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """Dependence-robust standard error of each column's mean: ``sqrt(u' K u) / P``,
    ``u`` the column centred, ``K`` :func:`shared_source_kernel` (0 if u'Ku < 0)."""
    v = _as_2d(values)
    u = v - v.mean(axis=0)
    k = shared_source_kernel(membership)
    q = np.einsum("pm,pq,qm->m", u, k, u)
    return np.sqrt(np.maximum(q, 0.0)) / len(v)


def bootstrap_means(values: np.ndarray, membership: np.ndarray | None = None, *,
                    scheme: str = "shared_source", n_resamples: int = 2000, seed: int = 0
                    ) -> np.ndarray:
    """``[n_resamples, M]`` resampled column means of ``values`` ``[P, M]`` (1-D: one
    column) under ``scheme`` (see the module docstring; ``membership`` ``[P, I]`` from
    :func:`membership_matrix`, not needed for ``"plot"``). Seeded by ``seed``; every
    column sees the same resamples. ``"source"`` resamples are shifted so that they are
    centred on the plain mean (its weights at the original sample are ``k_p``)."""
    v = _as_2d(values)
    n_plots = len(v)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if n_resamples < 1 or n_plots == 0:
        raise ValueError("bootstrap_means needs at least one plot and one resample")
    rng = np.random.default_rng(seed)
    mean = v.mean(axis=0)
    if scheme == "plot":
        w = rng.multinomial(n_plots, np.full(n_plots, 1.0 / n_plots), size=n_resamples)
        return (w @ v) / n_plots
    if membership is None:
        raise ValueError(f"scheme {scheme!r} needs the plots' membership matrix")
    mem = np.asarray(membership, dtype=float)
    if mem.shape[0] != n_plots:
        raise ValueError(f"membership has {mem.shape[0]} rows for {n_plots} plots")
    if scheme == "source":
        n_src = mem.shape[1]
        counts = rng.multinomial(n_src, np.full(n_src, 1.0 / n_src), size=n_resamples)
        w = counts @ mem.T
        total = w.sum(axis=1, keepdims=True)
        k = mem.sum(axis=1)
        centre = (k @ v) / k.sum()
        return (w @ v) / np.where(total > 0, total, 1.0) - centre + mean
    lam, vec = np.linalg.eigh(shared_source_kernel(mem))
    root = vec * np.sqrt(np.clip(lam, 0.0, None))
    g = rng.standard_normal((n_resamples, n_plots)) @ root.T
    return mean + (g @ (v - mean)) / n_plots


def percentile_interval(samples: np.ndarray, level: float = 0.95
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper percentile bounds of each column of ``samples``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = _as_2d(samples)
    a = (1.0 - level) / 2.0
    return np.quantile(s, a, axis=0), np.quantile(s, 1.0 - a, axis=0)


def _as_2d(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v[:, None] if v.ndim == 1 else v
