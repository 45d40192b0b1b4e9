"""Per-rank thresholds on evidence scores, fitted on calibration rows to a target precision.

For each rank, the accepted set at threshold ``t`` is every calibration image whose
evidence score is ``>= t``; its precision is the share of accepted images whose predicted
taxon at that rank is right. With simulated unknowns (rows of taxa hidden from the head,
``unknown``), precision is counted over ALL images at an expected unknown share ``u``:
known rows weigh ``(1 - u) / n_known`` each and unknown rows ``u / n_unknown``, so the
target is the precision a user sees when ``u`` of the images are of taxa the model does
not know (``precision_all``); ``precision_known`` is the same set's precision over known
images only. The fitted threshold is the *smallest* ``t`` (largest
coverage) whose accepted set reaches the target precision with at least ``min_support``
images. When no threshold does, the rank gets ``+inf`` ("never trust this rank") and is
listed in :attr:`RankThresholds.unreachable`; in JSON that threshold is ``null``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..config import OpensetConfig

__all__ = ["RankThresholds", "at_known_coverage", "fit_thresholds", "precision_all_known",
           "precision_coverage", "rank_targets", "unknown_weights"]


@dataclass
class RankThresholds:
    """Fitted thresholds per rank with the precision and coverage they reach on calibration.

    ``precision[rank]`` is the precision the target applies to (over all images at
    ``unknown_share`` when simulated unknowns were given, else over known images); it is
    ``None`` where nothing is accepted (threshold ``+inf``). ``precision_known`` /
    ``precision_all``: over known images / over all images at ``unknown_share`` (``None``
    without simulated unknowns). ``coverage``: share of known images accepted.
    """

    target: dict[str, float]
    thresholds: dict[str, float]
    precision: dict[str, float | None]
    coverage: dict[str, float]
    support: dict[str, int]
    min_support: int
    n_validation: dict[str, int] = field(default_factory=dict)
    precision_known: dict[str, float | None] = field(default_factory=dict)
    precision_all: dict[str, float | None] = field(default_factory=dict)
    unknown_share: float | None = None  # None: no simulated unknowns (known images only)
    n_unknown: dict[str, int] = field(default_factory=dict)

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
                       n_validation={r: int(v) for r, v in data.get("n_validation", {}).items()},
                       precision_known={r: _opt_float(v) for r, v in
                                        data.get("precision_known", {}).items()},
                       precision_all={r: _opt_float(v) for r, v in
                                      data.get("precision_all", {}).items()},
                       unknown_share=_opt_float(data.get("unknown_share")),
                       n_unknown={r: int(v) for r, v in data.get("n_unknown", {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"Saved thresholds are malformed ({exc!r}); expected the dict "
                             "written by RankThresholds.to_dict().") from exc

    @classmethod
    def from_json(cls, text: str) -> RankThresholds:
        return cls.from_dict(json.loads(text))


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def precision_coverage(scores: np.ndarray, correct: np.ndarray,
                       weights: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct score (descending): threshold, precision and count of ``score >= t``
    (precision weighted by ``weights`` per row when given)."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)
    keep = np.isfinite(s)
    s, c, w = s[keep], c[keep], w[keep]
    if len(s) == 0:
        return np.empty(0), np.empty(0), np.empty(0, dtype=np.int64)
    order = np.argsort(-s, kind="stable")
    s, c, w = s[order], c[order], w[order]
    hits = np.cumsum(c * w)
    mass = np.cumsum(w)
    count = np.arange(1, len(s) + 1)
    last = np.r_[s[1:] != s[:-1], True]  # last position of each distinct score
    return s[last], hits[last] / np.maximum(mass[last], 1e-300), count[last]


def unknown_weights(unknown: np.ndarray, valid: np.ndarray, unknown_share: float
                    ) -> np.ndarray:
    """Row weights making simulated unknowns ``unknown_share`` of the (valid) rows: known
    rows ``(1 - u) / n_known`` each, unknown rows ``u / n_unknown`` (0 for invalid rows)."""
    unk = np.asarray(unknown, dtype=bool)
    ok = np.asarray(valid, dtype=bool)
    n_u, n_k = int((unk & ok).sum()), int((~unk & ok).sum())
    w = np.zeros(len(unk))
    if n_k:
        w[~unk & ok] = (1.0 - unknown_share) / n_k
    if n_u:
        w[unk & ok] = unknown_share / n_u
    return w


def precision_all_known(accepted: np.ndarray, correct: np.ndarray, unknown: np.ndarray,
                        unknown_share: float) -> tuple[float | None, float | None, float]:
    """(precision over all images at ``unknown_share``, precision over known images, share
    of known images accepted) of one accepted set; ``None`` where nothing is accepted."""
    acc = np.asarray(accepted, dtype=bool)
    c = np.asarray(correct, dtype=bool)
    unk = np.asarray(unknown, dtype=bool)
    known = ~unk
    p_known = float(c[acc & known].mean()) if (acc & known).any() else None
    cov = float(acc[known].mean()) if known.any() else 0.0
    w = unknown_weights(unk, np.ones(len(acc), dtype=bool), unknown_share)
    mass = float(w[acc].sum())
    p_all = float((w * c)[acc].sum() / mass) if mass > 0 else None
    return p_all, p_known, cov


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
                   labelled: Mapping[str, np.ndarray] | None = None,
                   unknown: np.ndarray | None = None,
                   unknown_share: float = _DEFAULTS.unknown_share) -> RankThresholds:
    """Smallest threshold per rank whose accepted calibration set reaches the target precision.

    ``scores``: rank -> evidence per calibration image (higher = more trustworthy; NaN rows
    are ignored). ``correct``: rank -> whether the predicted taxon at that rank is right.
    ``target_precision``: one value for all ranks or one per rank (default: the config's;
    its ``"default"`` entry serves ranks it does not name, e.g. ``order``).
    ``min_support``: the accepted set must hold at least this many images (a precision of
    1/1 proves nothing). ``floor``: rank -> lowest threshold allowed (e.g. 0 where gated
    rows score below 0 and must never be accepted, whatever the precision).
    ``labelled``: rank -> whether the image has a label at that rank; a rank is calibrated
    only on its labelled images (a family-only image is neither a right nor a wrong
    species). ``n_validation`` counts them.
    ``unknown``: True for rows of simulated unknowns (taxa hidden from the head that
    scored them); then the target applies to precision over all images with unknowns
    making up ``unknown_share`` (:func:`unknown_weights`), and both precisions are kept.
    """
    if min_support < 1:
        raise ValueError(f"min_support must be >= 1, got {min_support}.")
    targets = rank_targets(target_precision, list(scores))
    for r, t in targets.items():
        if not 0.0 < t <= 1.0:
            raise ValueError(f"target precision for rank {r!r} must be in (0, 1], got {t}.")
    has_unknown = unknown is not None and bool(np.asarray(unknown, dtype=bool).any())
    out: dict[str, dict] = {k: {} for k in ("thr", "prec", "cov", "sup", "nval", "pk", "pa",
                                            "nu")}
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
        unk = (np.asarray(unknown, dtype=bool) if has_unknown
               else np.zeros(len(s), dtype=bool))
        valid = np.isfinite(s)
        weights = unknown_weights(unk, valid, unknown_share) if has_unknown else None
        out["nval"][rank] = int((valid & ~unk).sum())
        out["nu"][rank] = int((valid & unk).sum())
        _fit_rank(rank, s, c, unk, weights, targets[rank], min_support,
                  float((floor or {}).get(rank, -math.inf)), unknown_share, out)
    return RankThresholds(target=targets, thresholds=out["thr"], precision=out["prec"],
                          coverage=out["cov"], support=out["sup"],
                          min_support=int(min_support), n_validation=out["nval"],
                          precision_known=out["pk"],
                          precision_all=out["pa"] if has_unknown else {},
                          unknown_share=float(unknown_share) if has_unknown else None,
                          n_unknown=out["nu"] if has_unknown else {})


def _fit_rank(rank: str, s: np.ndarray, c: np.ndarray, unk: np.ndarray,
              weights: np.ndarray | None, target: float, min_support: int, floor: float,
              unknown_share: float, out: dict[str, dict]) -> None:
    """One rank of :func:`fit_thresholds`: the smallest threshold meeting ``target``."""
    t, p, k = precision_coverage(s, c, weights)
    ok = (p >= target - 1e-12) & (k >= min_support) & (t >= floor)
    if not ok.any():
        out["thr"][rank], out["prec"][rank], out["sup"][rank] = math.inf, None, 0
        out["cov"][rank], out["pk"][rank], out["pa"][rank] = 0.0, None, None
        return
    i = int(np.flatnonzero(ok)[-1])  # scores descend: last ok = smallest threshold
    acc = np.isfinite(s) & (np.nan_to_num(s, nan=-np.inf) >= t[i])
    p_all, p_known, cov = precision_all_known(acc[np.isfinite(s)], c[np.isfinite(s)],
                                              unk[np.isfinite(s)], unknown_share)
    out["thr"][rank], out["prec"][rank], out["sup"][rank] = float(t[i]), float(p[i]), int(k[i])
    out["cov"][rank], out["pk"][rank], out["pa"][rank] = cov, p_known, p_all


def at_known_coverage(thr: RankThresholds, evidence: Mapping[str, np.ndarray],
                      labelled: Mapping[str, np.ndarray] | None = None,
                      floor: Mapping[str, float] | None = None) -> RankThresholds:
    """``thr`` moved onto another model's evidence scale by its known-image coverage.

    Thresholds fitted on the leave-taxa-out rounds' heads (``openset.recipe``) rest on
    those heads' evidence; the final head, trained on more images, scores on another scale
    (raw logits grow with training data). Each finite threshold becomes the evidence value
    that lets the same share of known held-out images of the final model through as the
    rounds let through (``thr.coverage``): ``evidence``, rank -> the final model's evidence
    on known images it did not train on (validation split), ``labelled`` -> which of them
    are labelled at that rank. The ranking of unknowns against knowns is assumed to carry
    over, not the scale. ``floor``: rank -> lowest threshold allowed (0 where the ``gate``
    combiner scores rejected rows below 0). Ranks without evidence keep their threshold.
    """
    out = dict(thr.thresholds)
    for rank, t in thr.thresholds.items():
        e = np.asarray(evidence.get(rank, []), dtype=np.float64)
        if labelled is not None and rank in labelled:
            e = e[np.asarray(labelled[rank], dtype=bool)]
        e = np.sort(e[np.isfinite(e)])[::-1]
        cov = float(thr.coverage.get(rank, 0.0))
        if math.isinf(t) or len(e) < thr.min_support or cov <= 0.0:
            continue
        k = min(len(e), max(1, int(math.ceil(cov * len(e) - 1e-9))))
        out[rank] = max(float(e[k - 1]), float((floor or {}).get(rank, -math.inf)))
    return replace(thr, thresholds=out)
