"""One calibrated confidence: the probability that a reported taxon at its rank is right.

The head's coherent path probability at a rank (``<rank>_prob``) ranks images well but is
over- or under-confident. :func:`fit_confidence` fits, per rank, a Platt map on held-out
predictions (the validation split, or the out-of-fold predictions of crossfit)::

    confidence = sigmoid(slope * logit(p) + bias)

``slope`` is an inverse temperature and ``bias`` a shift of the log-odds; both are fitted
by maximum likelihood with a weak prior towards the identity (slope 1, bias 0), so a rank
with few or only right (or only wrong) held-out rows stays close to its raw probability.
The map is monotone: it never changes which taxon is reported, only the number beside it.

:func:`reliability_bins` and :func:`expected_calibration_error` measure the result (equal
width bins of confidence; ECE = the count-weighted mean |accuracy - mean confidence|).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

METHOD = "platt"
N_BINS = 10
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def _fit_platt(p: np.ndarray, right: np.ndarray, prior: float) -> tuple[float, float]:
    """Newton's method on the penalised log-likelihood of ``sigmoid(a*logit(p)+b)``."""
    z, t = _logit(p), np.asarray(right, dtype=np.float64)
    w = np.array([1.0, 0.0])
    for _ in range(100):
        q = _sigmoid(w[0] * z + w[1])
        grad = np.array([np.sum((q - t) * z), np.sum(q - t)]) + prior * (w - [1.0, 0.0])
        s = q * (1.0 - q)
        hess = np.array([[np.sum(s * z * z), np.sum(s * z)], [np.sum(s * z), np.sum(s)]])
        step = np.linalg.solve(hess + prior * np.eye(2), grad)
        w = w - step
        if np.max(np.abs(step)) < 1e-9:
            break
    return float(w[0]), float(w[1])


@dataclass
class ConfidenceCalibration:
    """Per rank ``(slope, bias)`` on the log-odds of the path probability, and how it was fitted."""

    params: dict[str, tuple[float, float]]
    method: str = METHOD
    info: dict[str, Any] = field(default_factory=dict)

    def calibrate(self, rank: str, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of ``p`` (raw path probabilities at ``rank``)."""
        p = np.asarray(p, dtype=np.float64)
        if rank not in self.params:
            return p
        a, b = self.params[rank]
        out = _sigmoid(a * _logit(p) + b)
        return np.where(np.isnan(p), np.nan, out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (bundle part ``confidence.json``)."""
        return {"method": self.method, "formula": "sigmoid(slope * logit(p) + bias)",
                "ranks": {r: {"slope": a, "bias": b} for r, (a, b) in self.params.items()},
                "info": self.info}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConfidenceCalibration:
        """Inverse of :meth:`to_dict`; raises ValueError on a malformed mapping."""
        if d.get("method") != METHOD or not isinstance(d.get("ranks"), Mapping):
            raise ValueError(f"expected method {METHOD!r} and a 'ranks' object")
        params = {}
        for r, v in d["ranks"].items():
            a, b = float(v["slope"]), float(v["bias"])
            if not (math.isfinite(a) and math.isfinite(b)):
                raise ValueError(f"rank {r}: slope and bias must be finite")
            params[str(r)] = (a, b)
        return cls(params=params, method=METHOD, info=dict(d.get("info") or {}))


def fit_confidence(probs: Mapping[str, np.ndarray], correct: Mapping[str, np.ndarray],
                   labelled: Mapping[str, np.ndarray] | None = None, *,
                   prior: float = 1.0, source: str = "") -> ConfidenceCalibration:
    """Fit a Platt map per rank on held-out rows.

    ``probs``: rank -> raw path probability per row; ``correct``: rank -> whether the path
    is right there; ``labelled``: rank -> whether the row has a label there (rows without
    one are left out of that rank). ``info`` records rows and in-sample ECE per rank.
    """
    params, info = {}, {"source": source, "ranks": {}}
    for r, p in probs.items():
        p = np.asarray(p, dtype=np.float64)
        ok = np.asarray(correct[r], dtype=bool)
        keep = np.ones(len(p), bool) if labelled is None else np.asarray(labelled[r], bool)
        keep &= ~np.isnan(p)
        params[r] = _fit_platt(p[keep], ok[keep], prior) if keep.any() else (1.0, 0.0)
        cal = ConfidenceCalibration(params={r: params[r]})
        info["ranks"][r] = {
            "n": int(keep.sum()),
            "ece_raw": expected_calibration_error(p[keep], ok[keep]),
            "ece_calibrated_in_sample": expected_calibration_error(
                cal.calibrate(r, p[keep]), ok[keep])}
    return ConfidenceCalibration(params=params, info=info)


def confidence_of(frame: pd.DataFrame, ranks: Sequence[str],
                  calibration: ConfidenceCalibration | None) -> np.ndarray:
    """The ``confidence`` of back-off rows: the (calibrated) path probability at each row's
    ``taxon_rank``; NaN where nothing is reported (``unknown``). Without ``calibration``
    the raw path probability."""
    out = np.full(len(frame), np.nan)
    rank_col = frame["taxon_rank"].to_numpy(dtype=object)
    for r in ranks:
        rows = rank_col == r
        if rows.any() and f"{r}_prob" in frame:
            p = frame[f"{r}_prob"].to_numpy(dtype=np.float64)[rows]
            out[rows] = p if calibration is None else calibration.calibrate(r, p)
    return out


def reliability_bins(confidence: np.ndarray, correct: np.ndarray,
                     n_bins: int = N_BINS) -> pd.DataFrame:
    """Equal-width bins of confidence: ``bin``, ``lower``, ``upper``, ``count``,
    ``mean_confidence``, ``accuracy`` (NaN in empty bins); NaN confidences are left out."""
    c = np.asarray(confidence, dtype=np.float64)
    t = np.asarray(correct, dtype=bool)
    keep = ~np.isnan(c)
    c, t = c[keep], t[keep]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, n_bins - 1)
    rows = []
    for k in range(n_bins):
        m = idx == k
        n = int(m.sum())
        rows.append({"bin": k, "lower": float(edges[k]), "upper": float(edges[k + 1]),
                     "count": n, "mean_confidence": float(c[m].mean()) if n else math.nan,
                     "accuracy": float(t[m].mean()) if n else math.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               n_bins: int = N_BINS) -> float | None:
    """Count-weighted mean |accuracy - mean confidence| over bins; None without rows."""
    bins = reliability_bins(confidence, correct, n_bins)
    n = int(bins["count"].sum())
    if n == 0:
        return None
    full = bins[bins["count"] > 0]
    gap = (full["accuracy"] - full["mean_confidence"]).abs() * full["count"]
    return float(gap.sum() / n)


def with_rank_confidence(table: pd.DataFrame, ranks: Sequence[str],
                         calibration: ConfidenceCalibration | None) -> pd.DataFrame:
    """``table`` (:meth:`Decoded.to_frame` columns) with ``<rank>_confidence`` after each
    ``<rank>_prob``: the confidence a prediction row would carry at that rank."""
    for r in ranks:
        p = table[f"{r}_prob"].to_numpy(dtype=np.float64)
        table.insert(int(table.columns.get_loc(f"{r}_prob")) + 1, f"{r}_confidence",
                     p if calibration is None else calibration.calibrate(r, p))
    return table
