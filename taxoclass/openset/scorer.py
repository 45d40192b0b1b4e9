"""The open-set scorer: outlier detector + evidence combiner + per-rank thresholds.

- :class:`OpenSetScorer`: everything back-off needs, fitted on a validation split
  (:func:`fit_scorer`, or its two steps :func:`fit_detector` and :func:`fit_evidence`),
  giving back-off answers (:func:`~taxoclass.openset.backoff.back_off_batch`);
- cross-fitting (:func:`crossfit_predictions`): out-of-fold predictions and outlier
  scores for every training row, so the combiner and thresholds (:func:`fit_evidence`)
  rest on all rows instead of a small validation split.

Every default is the config's (:class:`taxoclass.config.OpensetConfig`,
:class:`taxoclass.config.DecodeConfig`), so a Python caller gets the model a CLI user
gets; :meth:`OpensetConfig.detector_args` / :meth:`OpensetConfig.evidence_args` pass a
loaded section on. The group detectors' rank is the one above the lowest of the
taxonomy (:func:`group_rank_of`: genus under species). Metrics and held-out species:
:mod:`taxoclass.openset.evaluation`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..config import DecodeConfig, OpensetConfig
from ..taxonomy.tree import Taxonomy
from ..vocab import Combiner, Confidence, Detector, Scope
from .backoff import back_off_batch
from .detectors import OutlierDetector
from .evidence import EvidenceCombiner
from .thresholds import RankThresholds, fit_thresholds

__all__ = ["CrossfitPredictions", "OpenSetScorer", "confidence_of", "crossfit_folds",
           "crossfit_predictions", "fit_detector", "fit_evidence", "fit_evidence_arrays",
           "fit_scorer",
           "group_rank_of", "typical_outlier_score"]

_OPENSET = OpensetConfig()
_DECODE = DecodeConfig()


def group_rank_of(ranks: Sequence[str]) -> str:
    """The rank whose predicted class picks a group detector: the one above the lowest
    (genus for family/genus/species); the only rank of a one-rank taxonomy."""
    ranks = list(ranks)
    return ranks[-2] if len(ranks) > 1 else ranks[-1]


# ---------------------------------------------------------------------- scorer
@dataclass
class OpenSetScorer:
    """Outlier detector + per-rank evidence + thresholds: everything back-off needs."""

    detector: OutlierDetector
    combiner: EvidenceCombiner
    thresholds: RankThresholds
    group_rank: str  # group detectors score a row with its predicted class at this rank

    def outlier(self, x: np.ndarray, decoded) -> tuple[np.ndarray, np.ndarray]:
        """Outlier z-score and the detector's own flag (its contamination cut) per row
        (groups = predicted ``group_rank``); diagnostics only, not the back-off decision."""
        groups = self._groups(decoded)
        return (self.detector.decision_function(x, groups), self.detector.predict(x, groups))

    def evidence(self, x: np.ndarray, decoded) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Evidence per rank, and the detector's z-score per row."""
        z = self.detector.decision_function(x, self._groups(decoded))
        return self.combiner.score(confidence_of(decoded, self.combiner.confidence), z), z

    def _groups(self, decoded):
        return decoded.path[self.group_rank] if self.detector.scope == Scope.GROUP else None

    def gated(self, decoded, evidence: Mapping[str, np.ndarray], z: np.ndarray
              ) -> dict[str, np.ndarray]:
        """Per rank and row: outlyingness rejected the rank (the distance gate acted).

        True where the rank's evidence is below its threshold but would pass with the
        outlier score of a typical known image (:func:`typical_outlier_score`): for the
        ``gate`` combiner exactly "z above the gate's cut", for ``rank_mean`` and
        ``logistic`` the distance term that pulled the evidence under the threshold.
        Ranks the combiner scores without the outlier score are never gated. The
        detector's own contamination cut (:meth:`outlier`) plays no part in the decision.
        """
        conf = confidence_of(decoded, self.combiner.confidence)
        thr = self.thresholds.thresholds
        n = len(np.asarray(z))
        out = {r: np.zeros(n, dtype=bool) for r in self.combiner.ranks_}
        for rank in self.combiner.outlier_ranks_:
            typical = np.full(n, typical_outlier_score(self.combiner, rank))
            would = self.combiner.score(conf, typical)[rank]
            t = float(thr[rank])
            out[rank] = ~(np.asarray(evidence[rank]) >= t) & (np.asarray(would) >= t)
        return out

    def predict(self, x: np.ndarray, decoded, taxonomy: Taxonomy) -> pd.DataFrame:
        """Back-off answers (:func:`~taxoclass.openset.backoff.back_off_batch`): ``outlier``
        is True exactly where the distance gate rejected the lowest rank (:meth:`gated`);
        ``outlier_score`` is the detector's z-score (higher = farther from the known taxa)."""
        ev, z = self.evidence(x, decoded)
        frame = back_off_batch(decoded, ev, self.thresholds.thresholds,
                               self.gated(decoded, ev, z), taxonomy)
        frame.insert(frame.columns.get_loc("outlier") + 1, "outlier_score",
                     np.asarray(z, dtype=np.float64))
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
        combiner = EvidenceCombiner.from_dict(params["combiner"])
        return cls(detector=OutlierDetector.from_state(params["detector"], arrays),
                   combiner=combiner,
                   thresholds=RankThresholds.from_dict(params["thresholds"]),
                   group_rank=str(params.get("group_rank") or group_rank_of(combiner.ranks_)))


def typical_outlier_score(combiner: EvidenceCombiner, rank: str) -> float:
    """An outlier z-score at which ``combiner`` does not hold distance against ``rank``:
    the gate's cut (``gate``), the validation median (``rank_mean``), the validation mean
    (``logistic``: the mean its features were centred on)."""
    par = combiner.params_[rank]
    if "z_cut" in par:
        return float(par["z_cut"])
    if "z_ref" in par:
        return -float(np.median(np.asarray(par["z_ref"], dtype=np.float64)))
    mean = list(par.get("mean", []))
    return float(mean[1]) if len(mean) > 1 else 0.0


def confidence_of(decoded, kind: str = _OPENSET.confidence) -> dict[str, np.ndarray]:
    """The combiner's confidence input per rank: ``decoded.path_prob`` or ``.path_logit``."""
    if kind == Confidence.PATH_PROB:
        return decoded.path_prob
    if kind != Confidence.PATH_LOGIT:
        raise ValueError(f"confidence {kind!r}: expected path_prob or path_logit.")
    missing = [r for r in decoded.ranks if r not in decoded.path_logit]
    if missing:
        raise ValueError(f"confidence 'path_logit' needs the head's logits at ranks {missing}, "
                         f"but these predictions were decoded from probabilities "
                         f"({decoded.method}). Fix: openset.confidence: path_prob.")
    return decoded.path_logit


def fit_detector(x_train: np.ndarray, groups_train: np.ndarray | None = None, *,
                 labels_train: np.ndarray | None = None, method: str = _OPENSET.detector,
                 scope: str = _OPENSET.scope, detector_kwargs: Mapping[str, Any] | None = None
                 ) -> OutlierDetector:
    """The outlier detector of :func:`fit_scorer`, fitted on training embeddings.

    ``"mahalanobis"`` uses ``labels_train`` (species) as its classes, else
    ``groups_train``; pyod detectors use ``groups_train`` for ``scope="group"``.
    """
    det = OutlierDetector(method, scope=scope, **dict(detector_kwargs or {}))
    if det.method == Detector.MAHALANOBIS:
        return det.fit(x_train, labels_train if labels_train is not None else groups_train)
    return det.fit(x_train, groups_train if scope == Scope.GROUP else None)


def fit_evidence(decoded, z: np.ndarray, correct: Mapping[str, np.ndarray], *,
                 combiner: str = _OPENSET.combiner, confidence: str = _OPENSET.confidence,
                 gate_quantile: float = _OPENSET.gate_quantile,
                 target_precision: float | Mapping[str, float] = _OPENSET.target_precision,
                 min_support: int = _OPENSET.min_support,
                 labelled: Mapping[str, np.ndarray] | None = None,
                 unknown: np.ndarray | None = None,
                 unknown_share: float = _OPENSET.unknown_share
                 ) -> tuple[EvidenceCombiner, RankThresholds]:
    """Evidence combiner and per-rank thresholds from calibration predictions.

    ``decoded``: the head's predictions on calibration rows that it did not train on
    (a validation split, or out-of-fold predictions from :func:`crossfit_predictions`);
    ``z``: their outlier scores from a detector that did not see them either;
    ``correct``: rank -> whether ``decoded.path`` is right there; ``labelled``: rank ->
    whether the row has a label there (:func:`~taxoclass.openset.evaluation.labelled_by_rank`;
    a rank is calibrated only on its labelled rows). ``unknown``: rows of simulated
    unknowns (:func:`fit_evidence_arrays`).
    """
    return fit_evidence_arrays(confidence_of(decoded, confidence), z, correct,
                               combiner=combiner, confidence=confidence,
                               gate_quantile=gate_quantile, target_precision=target_precision,
                               min_support=min_support, labelled=labelled, unknown=unknown,
                               unknown_share=unknown_share)


def fit_evidence_arrays(conf: Mapping[str, np.ndarray], z: np.ndarray,
                        correct: Mapping[str, np.ndarray], *,
                        combiner: str = _OPENSET.combiner,
                        confidence: str = _OPENSET.confidence,
                        gate_quantile: float = _OPENSET.gate_quantile,
                        target_precision: float | Mapping[str, float]
                        = _OPENSET.target_precision,
                        min_support: int = _OPENSET.min_support,
                        labelled: Mapping[str, np.ndarray] | None = None,
                        unknown: np.ndarray | None = None,
                        unknown_share: float = _OPENSET.unknown_share
                        ) -> tuple[EvidenceCombiner, RankThresholds]:
    """:func:`fit_evidence` on arrays: ``conf`` rank -> the ``confidence`` input per row.

    ``unknown``: True for rows of simulated unknowns (taxa hidden from the head and the
    detector that scored them). The gate and rank_mean combiners take their reference
    distributions from the known rows; logistic learns from all rows (unknowns are its
    clearest negatives); thresholds target precision over all images with the unknowns
    weighted to ``unknown_share`` (:func:`~taxoclass.openset.thresholds.fit_thresholds`).
    """
    unk = (np.zeros(len(np.asarray(z)), dtype=bool) if unknown is None
           else np.asarray(unknown, dtype=bool))
    ref = ~unk if combiner != Combiner.LOGISTIC and (~unk).sum() >= 2 else np.ones_like(unk)

    def part(m: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        return None if m is None else {r: np.asarray(v)[ref] for r, v in m.items()}

    comb = EvidenceCombiner(combiner, confidence=confidence, gate_quantile=gate_quantile
                            ).fit(part(conf), np.asarray(z)[ref], part(correct), part(labelled))
    ev = comb.score(conf, z)
    floor = {r: 0.0 for r in comb.outlier_ranks_} if combiner == Combiner.GATE else None
    thr = fit_thresholds(ev, correct, target_precision=target_precision,
                         min_support=min_support, floor=floor, labelled=labelled,
                         unknown=unk if unk.any() else None, unknown_share=unknown_share)
    return comb, thr


def fit_scorer(x_train: np.ndarray, groups_train: np.ndarray | None, x_val: np.ndarray,
               decoded_val, correct_val: Mapping[str, np.ndarray], *,
               method: str = _OPENSET.detector, scope: str = _OPENSET.scope,
               combiner: str = _OPENSET.combiner,
               target_precision: float | Mapping[str, float] = _OPENSET.target_precision,
               min_support: int = _OPENSET.min_support,
               detector_kwargs: Mapping[str, Any] | None = None,
               group_rank: str | None = None, labels_train: np.ndarray | None = None,
               confidence: str = _OPENSET.confidence,
               gate_quantile: float = _OPENSET.gate_quantile,
               labelled_val: Mapping[str, np.ndarray] | None = None) -> OpenSetScorer:
    """Fit the detector on training embeddings, the combiner and thresholds on validation.

    ``groups_train``: class index at ``group_rank`` (default :func:`group_rank_of` the
    decoded ranks: genus) per training row (for ``scope="group"``).
    ``labels_train``: species (lowest-rank) index per training row, the classes of the
    ``"mahalanobis"`` detector (without them it uses ``groups_train``: genus classes, much
    weaker). Defaults: :class:`~taxoclass.config.OpensetConfig` (Mahalanobis gate on the
    path logit, chosen on bench/openset.py).
    ``decoded_val``: the head's decoded validation predictions; ``correct_val``: rank ->
    whether ``decoded_val.path`` is right there (:func:`correct_by_rank`). Validation rows
    may include species the head never saw (their species rank is simply never right),
    which teaches the combiner and the thresholds what novelty looks like.
    """
    group_rank = group_rank or group_rank_of(decoded_val.ranks)
    det = fit_detector(x_train, groups_train, labels_train=labels_train, method=method,
                       scope=scope, detector_kwargs=detector_kwargs)
    groups = decoded_val.path[group_rank] if scope == Scope.GROUP else None
    z = det.decision_function(x_val, groups)
    comb, thr = fit_evidence(decoded_val, z, correct_val, combiner=combiner,
                             confidence=confidence, gate_quantile=gate_quantile,
                             target_precision=target_precision, min_support=min_support,
                             labelled=labelled_val)
    return OpenSetScorer(detector=det, combiner=comb, thresholds=thr, group_rank=group_rank)


# ---------------------------------------------------------------------- cross-fitting
def crossfit_folds(strata: np.ndarray, n_folds: int, seed: int = 0,
                   groups: Any = None) -> np.ndarray:
    """Fold index (0 .. ``n_folds``-1) per row, stratified by ``strata`` and seeded; with
    ``groups`` no group is in two folds (:func:`taxoclass.model.splits.crossfit_folds`)."""
    from ..model.splits import crossfit_folds as folds

    return folds(strata, n_folds, seed, groups=groups)


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
                         *, n_folds: int = _OPENSET.folds, seed: int = 0,
                         decode_method: str = _DECODE.method, top_k: int = _DECODE.top_k,
                         x_detector: np.ndarray | None = None,
                         group_rank: str | None = None,
                         groups: Any = None) -> CrossfitPredictions:
    """K-fold out-of-fold predictions and outlier scores for every row of ``x``.

    Folds: :func:`crossfit_folds` of ``strata`` (e.g. the species). For fold ``k``,
    ``fit_fold(mask)`` fits a head and a detector on the rows where ``mask`` is True (all
    rows outside fold ``k``); the head's logits of fold ``k`` are decoded together with
    the other folds' (``decode_method``) and the detector scores fold ``k``
    (``x_detector`` rows, default ``x``; group detectors use the decoded ``group_rank``,
    default :func:`group_rank_of` the taxonomy's ranks). ``groups``: a group per row
    (``data.group_by``); no group is in two folds.
    Feed the result to :func:`fit_evidence` to calibrate on every row.
    """
    import torch

    from ..model.decoding import decode

    x = np.asarray(x)
    x_det = x if x_detector is None else np.asarray(x_detector)
    if len(x_det) != len(x) or len(strata) != len(x):
        raise ValueError(f"crossfit_predictions: x ({len(x)} rows), x_detector "
                         f"({len(x_det)}) and strata ({len(strata)}) must have the same rows.")
    group_rank = group_rank or group_rank_of(taxonomy.ranks)
    fold = crossfit_folds(strata, n_folds, seed, groups=groups)
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
        groups = decoded.path[group_rank][held] if det.scope == Scope.GROUP else None
        z[held] = det.decision_function(x_det[held], groups)
    return CrossfitPredictions(decoded=decoded, outlier=z, fold=fold, n_folds=int(n_folds))


