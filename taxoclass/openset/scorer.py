"""Open-set evaluation: hold species out, then ask whether the model notices them.

Library functions only; the caller trains the head (``taxoclass.model.training.train_head``) on
the known species. The pieces:

- choosing held-out species (:func:`choose_holdout`: a list, or a seeded share, keeping
  at least one known species in every genus so the genus stays learnable), splitting
  rows (:func:`split_known_unknown`) and the taxonomy of the known species only
  (:func:`known_taxonomy`), so held-out species are not classes;
- :class:`OpenSetScorer`: outlier detector + evidence combiner + calibrated thresholds,
  fitted on a validation split (:func:`fit_scorer`), giving back-off answers;
- cross-fitting (:func:`crossfit_predictions`): out-of-fold predictions and outlier
  scores for every training row, so the combiner and thresholds (:func:`fit_evidence`)
  rest on all rows instead of a small validation split;
- metrics: unknown-detection AUROC and FPR at 95% TPR per score
  (:func:`detection_table`), what happened to held-out and known images
  (:func:`outcome_summary`) and a risk-coverage table per rank (:func:`risk_coverage`).

Correctness is judged by names along the path: the prediction is right at rank ``r``
when every rank from the top down to ``r`` names the true taxon (a held-out species is
never right at species rank; it is right at genus when its genus is predicted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from ..taxonomy.tree import DEFAULT_RANKS, Taxonomy, species_name
from .backoff import back_off_batch
from .detectors import EvidenceCombiner, OutlierDetector
from .thresholds import RankThresholds, fit_thresholds

__all__ = ["CrossfitPredictions", "OpenSetScorer", "choose_holdout", "confidence_of",
           "correct_by_rank", "crossfit_folds", "crossfit_predictions", "detection_table",
           "fit_detector", "fit_evidence", "fit_scorer", "fpr_at_tpr", "known_taxonomy",
           "outcome_summary", "path_names", "risk_coverage", "split_known_unknown",
           "truth_names"]


# ---------------------------------------------------------------------- splitting
def _binomials(rows: pd.DataFrame) -> np.ndarray:
    return np.array([species_name(str(g or ""), str(s or "")) for g, s in
                     zip(rows["genus"].fillna(""), rows["species"].fillna(""))], dtype=object)


def choose_holdout(rows: pd.DataFrame, *, species: Iterable[str] | None = None,
                   n_species: int | None = None, holdout_fraction: float | None = None,
                   seed: int = 0) -> list[str]:
    """Species (binomial names) to hold out; each genus keeps at least one known species.

    Give exactly one of ``species`` (checked against ``rows``), ``n_species`` or
    ``holdout_fraction`` (of the species in eligible genera). Only genera with two or more
    species are eligible; the draw is seeded and independent of row order.
    """
    if sum(v is not None for v in (species, n_species, holdout_fraction)) != 1:
        raise ValueError("choose_holdout: give exactly one of species, n_species or "
                         "holdout_fraction.")
    names = _binomials(rows)
    genus = rows["genus"].fillna("").astype(str).to_numpy()
    present = {n for n in names if n}
    if species is not None:
        wanted = [str(s) for s in species]
        unknown = [s for s in wanted if s not in present]
        if unknown:
            raise ValueError(f"choose_holdout: species {unknown} are not in the rows; expected "
                             "binomial names such as 'Quercus ilex'.")
        return sorted(set(wanted))
    by_genus: dict[str, list[str]] = {}
    for n, g in sorted({(n, g) for n, g in zip(names, genus) if n}):
        by_genus.setdefault(g, []).append(n)
    eligible = sorted(n for g, ns in by_genus.items() if len(ns) >= 2 for n in ns)
    if holdout_fraction is not None:
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}.")
        n_species = max(1, round(holdout_fraction * len(eligible)))
    rng = np.random.default_rng(seed)
    order = [eligible[i] for i in rng.permutation(len(eligible))]
    left = {g: len(ns) for g, ns in by_genus.items()}
    genus_of = {n: g for g, ns in by_genus.items() for n in ns}
    chosen: list[str] = []
    for n in order:
        if len(chosen) >= int(n_species):
            break
        if left[genus_of[n]] > 1:
            chosen.append(n)
            left[genus_of[n]] -= 1
    return sorted(chosen)


def split_known_unknown(rows: pd.DataFrame, held_out: Iterable[str]) -> np.ndarray:
    """Boolean mask: True for rows of a held-out species."""
    return np.isin(_binomials(rows), list(held_out))


def known_taxonomy(categories: pd.DataFrame, held_out: Iterable[str],
                   ranks: Sequence[str] = DEFAULT_RANKS) -> Taxonomy:
    """Taxonomy of the categories minus the held-out species (they must not be classes)."""
    keep = ~np.isin(_binomials(categories), list(held_out))
    return Taxonomy.from_records(categories[keep].to_dict("records"), ranks,
                                 source="known categories")


def truth_names(rows: pd.DataFrame, ranks: Sequence[str] = DEFAULT_RANKS
                ) -> dict[str, np.ndarray]:
    """True name per rank per row (species as binomial; ``""`` where unlabelled)."""
    out = {}
    for r in ranks:
        if r == "species" and "genus" in rows:
            out[r] = _binomials(rows)
        else:
            out[r] = rows[r].fillna("").astype(str).to_numpy(dtype=object)
    return out


def path_names(path: Mapping[str, np.ndarray], taxonomy: Taxonomy) -> dict[str, np.ndarray]:
    """Display name per rank of a decoded path (class indices per rank)."""
    return {r: np.asarray(taxonomy.names(r), dtype=object)[np.asarray(path[r])]
            for r in taxonomy.ranks}


def correct_by_rank(predicted: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                    ranks: Sequence[str]) -> dict[str, np.ndarray]:
    """Right at rank r = every rank from the top to r names the true taxon."""
    out, ok = {}, None
    for r in ranks:
        hit = np.asarray(predicted[r], dtype=object) == np.asarray(truth[r], dtype=object)
        ok = hit if ok is None else ok & hit
        out[r] = ok.copy()
    return out


# ---------------------------------------------------------------------- scorer
@dataclass
class OpenSetScorer:
    """Outlier detector + per-rank evidence + thresholds: everything back-off needs."""

    detector: OutlierDetector
    combiner: EvidenceCombiner
    thresholds: RankThresholds
    group_rank: str = "genus"

    def outlier(self, x: np.ndarray, decoded) -> tuple[np.ndarray, np.ndarray]:
        """Outlier z-score and pyod flag per row (groups = predicted ``group_rank``)."""
        groups = decoded.path[self.group_rank] if self.detector.scope == "group" else None
        return (self.detector.decision_function(x, groups), self.detector.predict(x, groups))

    def evidence(self, x: np.ndarray, decoded) -> tuple[dict[str, np.ndarray], np.ndarray]:
        z, flags = self.outlier(x, decoded)
        return self.combiner.score(confidence_of(decoded, self.combiner.confidence), z), flags

    def predict(self, x: np.ndarray, decoded, taxonomy: Taxonomy) -> pd.DataFrame:
        """Back-off answers (:func:`~taxoclass.openset.backoff.back_off_batch`) plus ``outlier``."""
        ev, flags = self.evidence(x, decoded)
        frame = back_off_batch(decoded, ev, self.thresholds.thresholds, flags, taxonomy)
        frame["outlier"] = flags
        return frame

    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON parameters (for ``ModelBundle.extra``) and arrays (the detector's data)."""
        params, arrays = self.detector.to_state()
        return ({"detector": params, "combiner": self.combiner.to_dict(),
                 "thresholds": self.thresholds.to_dict(), "group_rank": self.group_rank},
                arrays)

    @classmethod
    def from_state(cls, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
                   ) -> OpenSetScorer:
        return cls(detector=OutlierDetector.from_state(params["detector"], arrays),
                   combiner=EvidenceCombiner.from_dict(params["combiner"]),
                   thresholds=RankThresholds.from_dict(params["thresholds"]),
                   group_rank=str(params.get("group_rank", "genus")))


def confidence_of(decoded, kind: str = "path_prob") -> dict[str, np.ndarray]:
    """The combiner's confidence input per rank: ``decoded.path_prob`` or ``.path_logit``."""
    if kind == "path_prob":
        return decoded.path_prob
    if kind != "path_logit":
        raise ValueError(f"confidence {kind!r}: expected path_prob or path_logit.")
    missing = [r for r in decoded.ranks if r not in decoded.path_logit]
    if missing:
        raise ValueError(f"confidence 'path_logit' needs the head's logits at ranks {missing}, "
                         f"but these predictions were decoded from probabilities "
                         f"({decoded.method}). Fix: openset.confidence: path_prob.")
    return decoded.path_logit


def fit_detector(x_train: np.ndarray, groups_train: np.ndarray | None = None, *,
                 labels_train: np.ndarray | None = None, method: str | None = None,
                 scope: str = "group", detector_kwargs: Mapping[str, Any] | None = None
                 ) -> OutlierDetector:
    """The outlier detector of :func:`fit_scorer`, fitted on training embeddings.

    ``"mahalanobis"`` uses ``labels_train`` (species) as its classes, else
    ``groups_train``; pyod detectors use ``groups_train`` for ``scope="group"``.
    ``method=None`` means ``"knn"``.
    """
    det = OutlierDetector(method or "knn", scope=scope, **dict(detector_kwargs or {}))
    if det.method == "mahalanobis":
        return det.fit(x_train, labels_train if labels_train is not None else groups_train)
    return det.fit(x_train, groups_train if scope == "group" else None)


def fit_evidence(decoded, z: np.ndarray, correct: Mapping[str, np.ndarray], *,
                 combiner: str = "rank_mean", confidence: str = "path_prob",
                 gate_quantile: float = 0.975,
                 target_precision: float | Mapping[str, float] = 0.95, min_support: int = 10
                 ) -> tuple[EvidenceCombiner, RankThresholds]:
    """Evidence combiner and per-rank thresholds from calibration predictions.

    ``decoded``: the head's predictions on calibration rows that it did not train on
    (a validation split, or out-of-fold predictions from :func:`crossfit_predictions`);
    ``z``: their outlier scores from a detector that did not see them either;
    ``correct``: rank -> whether ``decoded.path`` is right there.
    """
    conf = confidence_of(decoded, confidence)
    comb = EvidenceCombiner(combiner, confidence=confidence,
                            gate_quantile=gate_quantile).fit(conf, z, correct)
    ev = comb.score(conf, z)
    floor = {r: 0.0 for r in comb.outlier_ranks_} if combiner == "gate" else None
    thr = fit_thresholds(ev, correct, target_precision=target_precision,
                         min_support=min_support, floor=floor)
    return comb, thr


def fit_scorer(x_train: np.ndarray, groups_train: np.ndarray | None, x_val: np.ndarray,
               decoded_val, correct_val: Mapping[str, np.ndarray], *, method: str | None = None,
               scope: str = "group", combiner: str = "rank_mean",
               target_precision: float | Mapping[str, float] = 0.95, min_support: int = 10,
               detector_kwargs: Mapping[str, Any] | None = None,
               group_rank: str = "genus", labels_train: np.ndarray | None = None,
               confidence: str = "path_prob", gate_quantile: float = 0.975
               ) -> OpenSetScorer:
    """Fit the detector on training embeddings, the combiner and thresholds on validation.

    ``groups_train``: class index at ``group_rank`` per training row (for ``scope="group"``).
    ``labels_train``: species (lowest-rank) index per training row, the classes of the
    ``"mahalanobis"`` detector (without them it uses ``groups_train``: genus classes, much
    weaker). ``method=None`` means ``"knn"``. On the leaf benchmark
    (bench/results/openset.md) Mahalanobis on species is the best single unknown-species
    score (AUROC 0.81 vs 0.77 for per-genus kNN) but, rank-averaged with the path
    probability, it is no better than kNN, so kNN stays the default.
    ``decoded_val``: the head's decoded validation predictions; ``correct_val``: rank ->
    whether ``decoded_val.path`` is right there (:func:`correct_by_rank`). Validation rows
    may include species the head never saw (their species rank is simply never right),
    which teaches the combiner and the thresholds what novelty looks like.
    """
    det = fit_detector(x_train, groups_train, labels_train=labels_train, method=method,
                       scope=scope, detector_kwargs=detector_kwargs)
    groups = decoded_val.path[group_rank] if scope == "group" else None
    z = det.decision_function(x_val, groups)
    comb, thr = fit_evidence(decoded_val, z, correct_val, combiner=combiner,
                             confidence=confidence, gate_quantile=gate_quantile,
                             target_precision=target_precision, min_support=min_support)
    return OpenSetScorer(detector=det, combiner=comb, thresholds=thr, group_rank=group_rank)


# ---------------------------------------------------------------------- cross-fitting
def crossfit_folds(strata: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index (0 .. ``n_folds``-1) per row, stratified by ``strata`` and seeded.

    Each stratum's rows, in a seeded random order, are dealt round the folds from a
    random starting fold, so every fold gets ``n // n_folds`` or one more of each stratum
    (a species with fewer rows than folds is missing from some folds).
    """
    n_folds = int(n_folds)
    strata = np.asarray(strata)
    if n_folds < 2:
        raise ValueError(f"crossfit_folds: n_folds must be at least 2, got {n_folds}.")
    if len(strata) < n_folds:
        raise ValueError(f"crossfit_folds: {len(strata)} rows cannot fill {n_folds} folds; "
                         f"use fewer folds.")
    rng = np.random.default_rng(seed)
    fold = np.full(len(strata), -1, dtype=np.int64)
    for value in np.unique(strata):
        rows = np.flatnonzero(strata == value)
        rng.shuffle(rows)
        fold[rows] = (np.arange(len(rows)) + rng.integers(n_folds)) % n_folds
    return fold


@dataclass
class CrossfitPredictions:
    """Out-of-fold predictions: each row decoded by a head, and scored by a detector,
    fitted on the other folds only (never on the row itself)."""

    decoded: Any               # taxoclass.model.decoding.Decoded, one row per input row
    outlier: np.ndarray        # detector z-score per row (higher = more abnormal)
    fold: np.ndarray           # fold index per row
    n_folds: int


#: ``fit_fold(train_mask)`` -> (logits of a head fitted on ``train_mask`` rows: a function
#: of embeddings, detector fitted on the same rows).
FoldFit = Callable[[np.ndarray], tuple[Callable[[np.ndarray], Mapping[str, Any]],
                                      OutlierDetector]]


def crossfit_predictions(x: np.ndarray, strata: np.ndarray, fit_fold: FoldFit, taxonomy: Taxonomy,
                         *, n_folds: int = 5, seed: int = 0, decode_method: str = "path",
                         top_k: int = 5, x_detector: np.ndarray | None = None,
                         group_rank: str = "genus") -> CrossfitPredictions:
    """K-fold out-of-fold predictions and outlier scores for every row of ``x``.

    Folds: :func:`crossfit_folds` of ``strata`` (e.g. the species). For fold ``k``,
    ``fit_fold(mask)`` fits a head and a detector on the rows where ``mask`` is True (all
    rows outside fold ``k``); the head's logits of fold ``k`` are decoded together with
    the other folds' (``decode_method``) and the detector scores fold ``k``
    (``x_detector`` rows, default ``x``; group detectors use the decoded ``group_rank``).
    Feed the result to :func:`fit_evidence` to calibrate on every row.
    """
    import torch

    from ..model.decoding import decode

    x = np.asarray(x)
    x_det = x if x_detector is None else np.asarray(x_detector)
    if len(x_det) != len(x) or len(strata) != len(x):
        raise ValueError(f"crossfit_predictions: x ({len(x)} rows), x_detector "
                         f"({len(x_det)}) and strata ({len(strata)}) must have the same rows.")
    fold = crossfit_folds(strata, n_folds, seed)
    logits: dict[str, np.ndarray] = {}
    detectors = []
    for k in range(int(n_folds)):
        held = fold == k
        predict, det = fit_fold(~held)
        for r, v in predict(x[held]).items():
            v = torch.as_tensor(v).float().numpy()
            if r not in logits:
                logits[r] = np.zeros((len(x), v.shape[1]), dtype=np.float32)
            logits[r][held] = v
        detectors.append(det)
    decoded = decode({r: torch.as_tensor(v) for r, v in logits.items()}, taxonomy,
                     method=decode_method, top_k=top_k)
    z = np.zeros(len(x), dtype=np.float64)
    for k, det in enumerate(detectors):
        held = fold == k
        groups = decoded.path[group_rank][held] if det.scope == "group" else None
        z[held] = det.decision_function(x_det[held], groups)
    return CrossfitPredictions(decoded=decoded, outlier=z, fold=fold, n_folds=int(n_folds))


# ---------------------------------------------------------------------- metrics
def fpr_at_tpr(is_unknown: np.ndarray, score: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate (known called unknown) at the first threshold reaching ``tpr``."""
    fpr, tp, _ = roc_curve(np.asarray(is_unknown, dtype=bool), np.asarray(score, dtype=float))
    return float(fpr[np.searchsorted(tp, tpr, side="left")])


def detection_table(is_unknown: np.ndarray, scores: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """AUROC and FPR@95%TPR per method; every score oriented higher = more likely unknown."""
    y = np.asarray(is_unknown, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("detection_table needs both known and unknown rows.")
    rows = [{"method": name, "auroc": float(roc_auc_score(y, s)),
             "fpr_at_95tpr": fpr_at_tpr(y, s)} for name, s in scores.items()]
    return pd.DataFrame(rows)


def outcome_summary(frame: pd.DataFrame, truth: Mapping[str, np.ndarray],
                    is_unknown: np.ndarray, ranks: Sequence[str] = DEFAULT_RANKS
                    ) -> dict[str, float]:
    """What back-off did with held-out-species images and with known-species images.

    ``frame``: :func:`~taxoclass.openset.backoff.back_off_batch` output; ``truth``:
    :func:`truth_names` of the same rows. Held-out: share reported at their correct genus,
    at their correct family (above genus), correct genus-or-family, named to a (wrong)
    species, reported at a wrong higher taxon, unknown. Known: coverage (share named to
    species), and per rank the precision of the answers given at that rank or below.
    """
    y = np.asarray(is_unknown, dtype=bool)
    lowest = ranks[-1]
    pred = {r: frame[r].to_numpy(dtype=object) for r in ranks}
    correct = correct_by_rank(pred, truth, ranks)
    depth = {r: i for i, r in enumerate(ranks)}
    rep = frame["taxon_rank"].map(lambda r: depth.get(r, -1)).to_numpy()
    # Right at the reported rank (placeholders report above their path rank: same test).
    right = np.zeros(len(frame), dtype=bool)
    for r, i in depth.items():
        right |= (rep == i) & correct[r]
    out: dict[str, float] = {"n_unknown": int(y.sum()), "n_known": int((~y).sum())}
    u = y
    if u.any():
        at_lowest = rep == depth[lowest]
        out["unknown_named_species"] = float(np.mean(at_lowest[u]))
        for r in ranks[:-1]:
            out[f"unknown_correct_{r}"] = float(np.mean(((rep == depth[r]) & right)[u]))
        out["unknown_correct_higher"] = float(np.mean((right & (rep >= 0) & ~at_lowest)[u]))
        out["unknown_wrong_higher"] = float(np.mean((~right & (rep >= 0) & ~at_lowest)[u]))
        out["unknown_unknown"] = float(np.mean((rep < 0)[u]))
    k = ~y
    if k.any():
        out["known_coverage_species"] = float(np.mean((rep == depth[lowest])[k]))
        for r in ranks:
            given = k & (rep >= depth[r])
            out[f"known_precision_{r}"] = (float(np.mean(correct[r][given])) if given.any()
                                           else float("nan"))
            out[f"known_coverage_{r}"] = float(np.mean(given[k]))
        out["known_unknown"] = float(np.mean((rep < 0)[k]))
    return out


def risk_coverage(scores: Mapping[str, np.ndarray], correct: Mapping[str, np.ndarray],
                  coverages: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
                  ) -> pd.DataFrame:
    """Per rank: precision when accepting the top ``coverage`` share by score."""
    rows = []
    for rank, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        c = np.asarray(correct[rank], dtype=bool)
        order = np.argsort(-s, kind="stable")
        for cov in coverages:
            n = max(1, int(round(cov * len(s))))
            take = order[:n]
            rows.append({"rank": rank, "coverage": n / len(s), "threshold": float(s[take[-1]]),
                         "precision": float(c[take].mean()), "n": n})
    return pd.DataFrame(rows)
