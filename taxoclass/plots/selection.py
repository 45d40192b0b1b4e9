"""The one selection rule: which taxa of one rank a plot's tiles support.

A rule turns the tiles' probabilities at one rank into one score per class
(:func:`rule_scores`); a class is *selected* at a threshold ``t`` when its score is at
least ``t`` and at least ``min_tiles`` tiles support it. A tile supports a class when the
class is its arg-max, or (``max``/``noisy_or``/``mean`` with ``t > 0``) when its
probability of the class reaches ``t``; with precomputed scores (the learned rule), when
the class is among the tile's :data:`SUPPORT_TOP` best.

:func:`rank_evidence` computes what that decision needs once (:class:`Evidence`), so
:meth:`Evidence.selected` answers it for one threshold
(:func:`~taxoclass.plots.rules.aggregate_plot`) or for a whole grid of thresholds at once
(the calibration sweeps of :mod:`taxoclass.plots.search`). :class:`TileSettings` are the
tile settings every rule runs with (``top_k``, ``min_tile_prob``, ``min_tiles``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..vocab import Rule

__all__ = [
    "LEARNED",
    "RULES",
    "SUPPORT_TOP",
    "Evidence",
    "TileSettings",
    "keep_top_k",
    "rank_evidence",
    "rule_scores",
    "top_ranked",
]

#: The rules that score tiles themselves (plain strings: they appear in messages).
RULES: tuple[str, ...] = tuple(r.value for r in (Rule.ARGMAX_UNION, Rule.MAX, Rule.NOISY_OR,
                                                 Rule.MEAN))
#: The rule whose per-taxon scores come precomputed (``aggregate_plot(scores=...)``).
LEARNED: str = Rule.LEARNED.value
#: With precomputed scores, a tile supports a taxon that is among its ``SUPPORT_TOP`` best.
SUPPORT_TOP = 3


@dataclass(frozen=True)
class TileSettings:
    """The tile settings of :func:`~taxoclass.plots.rules.aggregate_plot` a rule runs with.

    ``top_k``: each tile keeps its k most probable classes (None: all); ``min_tile_prob``:
    tiles whose best lowest-rank probability is below it give no evidence; ``min_tiles``:
    tiles that must support a find. The defaults change nothing.
    """

    top_k: int | None = None
    min_tile_prob: float = 0.0
    min_tiles: int = 1

    def __post_init__(self) -> None:
        if self.top_k is not None and int(self.top_k) < 1:
            raise ConfigError(f"top_k must be at least 1 (or None: every class), got "
                              f"{self.top_k}.")
        if not 0.0 <= float(self.min_tile_prob) <= 1.0:
            raise ConfigError(f"min_tile_prob must be in [0, 1], got {self.min_tile_prob}.")
        if int(self.min_tiles) < 1:
            raise ConfigError(f"min_tiles must be at least 1, got {self.min_tiles}.")

    @property
    def n_set(self) -> int:
        """How many settings differ from the defaults (fewer is simpler)."""
        return ((self.top_k is not None) + (float(self.min_tile_prob) > 0)
                + (int(self.min_tiles) != 1))

    def to_dict(self) -> dict[str, Any]:
        return {"top_k": None if self.top_k is None else int(self.top_k),
                "min_tile_prob": float(self.min_tile_prob), "min_tiles": int(self.min_tiles)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TileSettings:
        """From a settings file's ``tiles`` (missing keys, or no ``tiles``: the defaults)."""
        data = data or {}
        top_k = data.get("top_k")
        return cls(top_k=None if top_k is None else int(top_k),
                   min_tile_prob=float(data.get("min_tile_prob", 0.0)),
                   min_tiles=int(data.get("min_tiles", 1)))


def keep_top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Each row keeps its ``k`` largest values; the others become 0 (ties broken by index)."""
    if int(k) < 1:
        raise ConfigError(f"top_k must be at least 1, got {k}.")
    a = np.asarray(probs, dtype=np.float64)
    if a.ndim != 2 or int(k) >= a.shape[1]:
        return a
    keep = np.argpartition(-a, int(k) - 1, axis=1)[:, :int(k)]
    out = np.zeros_like(a)
    np.put_along_axis(out, keep, np.take_along_axis(a, keep, axis=1), axis=1)
    return out


def rule_scores(probs: np.ndarray, rule: str, weights: np.ndarray | None = None) -> np.ndarray:
    """One score per class from tile probabilities ``[n_tiles, n_classes]`` (no tiles: 0)."""
    p = np.asarray(probs, dtype=np.float64)
    w = np.ones(len(p)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(p) == 0 or w.sum() <= 0:
        return np.zeros(p.shape[1] if p.ndim == 2 else 0)
    if rule == Rule.MAX or rule == Rule.ARGMAX_UNION:
        return np.where(w[:, None] > 0, p, 0.0).max(axis=0)
    if rule == Rule.NOISY_OR:
        return 1.0 - np.exp((w[:, None] * np.log1p(-np.clip(p, 0.0, 1.0 - 1e-12))).sum(axis=0))
    if rule == Rule.MEAN:
        return (w[:, None] * p).sum(axis=0) / w.sum()
    raise ConfigError(f"Unknown aggregation rule {rule!r}; expected one of {RULES}.")


def top_ranked(probs: np.ndarray, k: int) -> np.ndarray:
    """Boolean ``[n_tiles, n_classes]``: True where a class is among a tile's ``k`` best
    and has a probability above 0."""
    a = np.asarray(probs, dtype=np.float64)
    out = np.zeros(a.shape, dtype=bool)
    if a.ndim != 2 or not a.size:
        return out
    k = min(int(k), a.shape[1])
    idx = np.argpartition(-a, k - 1, axis=1)[:, :k] if k < a.shape[1] else \
        np.broadcast_to(np.arange(a.shape[1]), a.shape)
    np.put_along_axis(out, idx, True, axis=1)
    return out & (a > 0)


@dataclass
class Evidence:
    """What the selection of one rank's classes rests on.

    ``score``: per class; ``n_first``: tiles supporting it at any threshold (arg-max
    tiles; with precomputed scores, tiles ranking it in their top :data:`SUPPORT_TOP`);
    ``rest``: the other tiles' probabilities of each class sorted high to low (``-inf``
    where the tile is an arg-max one), which support it at a threshold ``t > 0`` they
    reach (None where thresholds add no support: ``argmax_union`` and precomputed scores).
    """

    score: np.ndarray
    n_first: np.ndarray
    rest: np.ndarray | None

    def support(self, threshold: float) -> np.ndarray:
        """Supporting tiles per class at ``threshold``."""
        if self.rest is None or threshold <= 0:
            return self.n_first
        return self.n_first + (self.rest >= threshold).sum(axis=0)

    def selected(self, thresholds: Sequence[float] | np.ndarray,
                 min_tiles: int = 1) -> np.ndarray:
        """``[n_classes, n_thresholds]``: selected at each threshold (score at least the
        threshold and at least ``min_tiles`` supporting tiles)."""
        t = np.asarray(thresholds, dtype=np.float64)[None, :]
        ok = (self.n_first >= min_tiles)[:, None]
        if self.rest is not None:
            # tiles supporting at t > 0: arg-max tiles plus the others reaching t, so enough
            # of them where the (min_tiles - n_first)-th best other tile reaches t
            n = len(self.rest)
            need = min_tiles - self.n_first
            kth = np.where((need >= 1) & (need <= n),
                           self.rest[np.clip(need - 1, 0, n - 1), np.arange(len(need))],
                           -np.inf)
            ok = ok | ((t > 0) & (kth[:, None] >= t))
        return (self.score[:, None] >= t) & ok


def rank_evidence(probs: np.ndarray, rule: str, *, lowest: bool,
                  weights: np.ndarray | None = None,
                  given: np.ndarray | None = None) -> Evidence:
    """Evidence from one rank's scored tiles ``probs`` ``[n_tiles, n_classes]`` (flagged,
    gated and zero-weight tiles already left out; ``top_k`` already applied).

    ``lowest``: the taxonomy's lowest rank (``argmax_union`` scores a class there by its
    arg-max tiles only); ``weights``: per tile (``mean``/``noisy_or``); ``given``: the
    precomputed scores of the learned rule.
    """
    a = np.asarray(probs, dtype=np.float64)
    k = a.shape[1]
    if not len(a):
        return Evidence(np.zeros(k), np.zeros(k, dtype=np.int64), None)
    if rule == LEARNED:
        return Evidence(np.asarray(given, dtype=np.float64),
                        top_ranked(a, SUPPORT_TOP).sum(axis=0), None)
    rows = np.arange(len(a))
    best = a.argmax(axis=1)
    # a tile backed off above this rank has all-zero probabilities here: it supports nothing
    n_first = np.bincount(best[a[rows, best] > 0], minlength=k)
    if rule == Rule.ARGMAX_UNION:
        if lowest:
            score = np.zeros(k)
            np.maximum.at(score, best, a[rows, best])
        else:
            score = rule_scores(a, Rule.MAX, weights)
        return Evidence(score, n_first, None)
    other = a.copy()
    other[rows, best] = -np.inf
    return Evidence(rule_scores(a, rule, weights), n_first, -np.sort(-other, axis=0))
