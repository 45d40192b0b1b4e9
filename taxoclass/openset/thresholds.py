"""Per-rank thresholds on evidence scores, fitted on a validation split to a target precision.

For each rank, the accepted set at threshold ``t`` is every validation image whose
evidence score is ``>= t``; its precision is the share of accepted images whose predicted
taxon at that rank is right. The fitted threshold is the *smallest* ``t`` (largest
coverage) whose accepted set reaches the target precision with at least ``min_support``
images. When no threshold does, the rank gets ``+inf`` ("never trust this rank") and is
listed in :attr:`RankThresholds.unreachable`; in JSON that threshold is ``null``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..config import OpensetConfig

__all__ = ["RankThresholds", "fit_thresholds", "precision_coverage", "rank_targets"]


@dataclass
class RankThresholds:
    """Fitted thresholds per rank with the precision and coverage they reach on validation.

    ``precision[rank]`` is ``None`` where nothing is accepted (threshold ``+inf``).
    """

    target: dict[str, float]
    thresholds: dict[str, float]
    precision: dict[str, float | None]
    coverage: dict[str, float]
    support: dict[str, int]
    min_support: int
    n_validation: dict[str, int] = field(default_factory=dict)

    @property
    def unreachable(self) -> list[str]:
        """Ranks whose target precision no threshold reaches (threshold ``+inf``)."""
        return [r for r, t in self.thresholds.items() if math.isinf(t)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``+inf`` thresholds become ``None``)."""
        d = asdict(self)
        d["thresholds"] = {r: (None if math.isinf(t) else float(t))
                           for r, t in self.thresholds.items()}
        d["unreachable"] = self.unreachable
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankThresholds:
        try:
            return cls(target={r: float(v) for r, v in data["target"].items()},
                       thresholds={r: (math.inf if v is None else float(v))
                                   for r, v in data["thresholds"].items()},
                       precision={r: (None if v is None else float(v))
                                  for r, v in data["precision"].items()},
                       coverage={r: float(v) for r, v in data["coverage"].items()},
                       support={r: int(v) for r, v in data["support"].items()},
                       min_support=int(data["min_support"]),
                       n_validation={r: int(v) for r, v in data.get("n_validation", {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"Saved thresholds are malformed ({exc!r}); expected the dict "
                             "written by RankThresholds.to_dict().") from exc

    @classmethod
    def from_json(cls, text: str) -> RankThresholds:
        return cls.from_dict(json.loads(text))


def precision_coverage(scores: np.ndarray, correct: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct score (descending): threshold, precision and count of ``score >= t``."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    keep = np.isfinite(s)
    s, c = s[keep], c[keep]
    if len(s) == 0:
        return np.empty(0), np.empty(0), np.empty(0, dtype=np.int64)
    order = np.argsort(-s, kind="stable")
    s, c = s[order], c[order]
    hits = np.cumsum(c)
    count = np.arange(1, len(s) + 1)
    last = np.r_[s[1:] != s[:-1], True]  # last position of each distinct score
    return s[last], hits[last] / count[last], count[last]


_DEFAULTS = OpensetConfig()


def rank_targets(target_precision: float | Mapping[str, float], ranks) -> dict[str, float]:
    """Target precision per rank: one number for all, or a mapping whose ``"default"``
    entry (the config's default has one) serves the ranks it does not name."""
    if not isinstance(target_precision, Mapping):
        return {r: float(target_precision) for r in ranks}
    missing = [r for r in ranks if r not in target_precision and "default" not in target_precision]
    if missing:
        raise ValueError(f"target_precision has no value for rank(s) {missing}; give one "
                         f"per rank (openset.target_precision), a 'default' for the ranks "
                         f"not named, or one number for all.")
    return {r: float(target_precision.get(r, target_precision.get("default"))) for r in ranks}


def fit_thresholds(scores: Mapping[str, np.ndarray], correct: Mapping[str, np.ndarray], *,
                   target_precision: float | Mapping[str, float] = _DEFAULTS.target_precision,
                   min_support: int = _DEFAULTS.min_support,
                   floor: Mapping[str, float] | None = None,
                   labelled: Mapping[str, np.ndarray] | None = None) -> RankThresholds:
    """Smallest threshold per rank whose accepted validation set reaches the target precision.

    ``scores``: rank -> evidence per validation image (higher = more trustworthy; NaN rows
    are ignored). ``correct``: rank -> whether the predicted taxon at that rank is right.
    ``target_precision``: one value for all ranks or one per rank (default: the config's;
    its ``"default"`` entry serves ranks it does not name, e.g. ``order``).
    ``min_support``: the accepted set must hold at least this many images (a precision of
    1/1 proves nothing). ``floor``: rank -> lowest threshold allowed (e.g. 0 where gated
    rows score below 0 and must never be accepted, whatever the precision).
    ``labelled``: rank -> whether the image has a label at that rank; a rank is calibrated
    only on its labelled images (a family-only image is neither a right nor a wrong
    species). ``n_validation`` counts them.
    """
    if min_support < 1:
        raise ValueError(f"min_support must be >= 1, got {min_support}.")
    targets = rank_targets(target_precision, list(scores))
    for r, t in targets.items():
        if not 0.0 < t <= 1.0:
            raise ValueError(f"target precision for rank {r!r} must be in (0, 1], got {t}.")
    thr, prec, cov, sup, nval = {}, {}, {}, {}, {}
    for rank, s in scores.items():
        if rank not in correct:
            raise ValueError(f"fit_thresholds: scores name rank {rank!r} but correct has only "
                             f"{list(correct)}.")
        s = np.asarray(s, dtype=np.float64)
        c = np.asarray(correct[rank], dtype=bool)
        if s.shape != c.shape:
            raise ValueError(f"Rank {rank!r}: {s.shape[0]} scores but {c.shape[0]} correctness "
                             "values; expected one per validation image.")
        if labelled is not None and rank in labelled:
            s = np.where(np.asarray(labelled[rank], dtype=bool), s, np.nan)
        n = int(np.isfinite(s).sum())
        nval[rank] = n
        t, p, k = precision_coverage(s, c)
        ok = (p >= targets[rank] - 1e-12) & (k >= min_support)
        ok &= t >= float((floor or {}).get(rank, -math.inf))
        if ok.any():
            i = int(np.flatnonzero(ok)[-1])  # scores descend: last ok = smallest threshold
            thr[rank], prec[rank] = float(t[i]), float(p[i])
            sup[rank], cov[rank] = int(k[i]), float(k[i] / max(n, 1))
        else:
            thr[rank], prec[rank], sup[rank], cov[rank] = math.inf, None, 0, 0.0
    return RankThresholds(target=targets, thresholds=thr, precision=prec, coverage=cov,
                          support=sup, min_support=int(min_support), n_validation=nval)
