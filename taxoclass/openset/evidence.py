"""Evidence per rank: the head's confidence combined with the outlier score.

- :func:`confidence_scores`: per-rank confidence of the heads (max probability, margin,
  negative entropy, negative energy), all oriented so that higher = more confident.
- :class:`EvidenceCombiner`: one evidence score per rank from both the confidence in the
  predicted taxon (its coherent probability or raw logit) and the outlier score of
  :class:`~taxoclass.openset.detectors.OutlierDetector`.

Why combine both: on new species the head's own confidence (max probability) is hard to
beat, because a new oak still looks like an oak and the species head spreads its mass
over several known oaks; distance-based detectors catch what is far from all training
data (another family, a bad photo) where a softmax can still be overconfident. The
config default (``"gate"``) names the lowest rank only when the image is within the
known taxa's distance range, then ranks the confidence; ``"rank_mean"`` averages the
two rank-normalised scores (empirical CDFs of the confidence and of the negated outlier
z-score against the validation values) at the lowest rank; higher ranks use the
confidence alone. ``"logistic"`` instead fits, per rank, a logistic regression on
validation predicting "the predicted taxon at this rank is right" from ``logit(p)`` and
the z-score; it is calibrated but, fitted mostly on known-species confusions, it
under-weights distance (see :class:`EvidenceCombiner`). Either way, thresholds are then
fitted on the evidence (:mod:`taxoclass.openset.thresholds`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import NotFittedError

from ..config import OpensetConfig
from ..vocab import Combiner, Confidence

__all__ = ["COMBINERS", "CONFIDENCES", "CONFIDENCE_SCORES", "GATED", "EvidenceCombiner",
           "confidence_scores"]

#: Keys of :func:`confidence_scores` (``neg_energy`` only when logits are given).
CONFIDENCE_SCORES: tuple[str, ...] = ("max_prob", "margin", "neg_entropy", "neg_energy")
COMBINERS: tuple[str, ...] = tuple(c.value for c in Combiner)
#: What the combiners read as the head's confidence in the path's taxon, per rank:
#: the coherent probability, or the raw logit of that class (``Decoded.path_logit``).
CONFIDENCES: tuple[str, ...] = tuple(c.value for c in Confidence)
#: Evidence of a gated row (``method="gate"``): below every threshold.
GATED = -1.0
_DEFAULTS = OpensetConfig()
#: Saved combiners from before these keys were written: read with the values of then.
_LEGACY_STATE = {"gate_quantile": 0.975, "confidence": Confidence.PATH_PROB.value}


# ---------------------------------------------------------------------- confidences
def confidence_scores(probs: Mapping[str, np.ndarray], logits: Mapping[str, Any] | None = None
                      ) -> dict[str, dict[str, np.ndarray]]:
    """Per rank, per image confidence of the heads; every score: higher = more confident.

    ``max_prob``: largest (coherent) probability. ``margin``: top-1 minus top-2
    probability. ``neg_entropy``: minus the Shannon entropy (nats) of the probabilities.
    ``neg_energy``: ``logsumexp(logits)``, i.e. minus the energy score of Liu et al. 2020;
    only for ranks whose logits are given.
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for rank, p in probs.items():
        p = np.asarray(p, dtype=np.float64)
        if p.ndim != 2:
            raise ValueError(f"probs[{rank!r}] must be [batch, n_classes], got shape {p.shape}.")
        top = np.sort(p, axis=1)[:, ::-1]
        second = top[:, 1] if p.shape[1] > 1 else np.zeros(len(p))
        scores = {"max_prob": top[:, 0], "margin": top[:, 0] - second,
                  "neg_entropy": np.sum(p * np.log(np.clip(p, 1e-12, None)), axis=1)}
        if logits is not None and rank in logits:
            z = np.asarray(logits[rank].detach().cpu() if hasattr(logits[rank], "detach")
                           else logits[rank], dtype=np.float64)
            m = z.max(axis=1, keepdims=True)
            scores["neg_energy"] = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
        out[rank] = scores
    return out


# ---------------------------------------------------------------------- combination
def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def _ecdf(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Share of ``reference`` (sorted quantiles) at or below each value, in [0, 1]."""
    return np.searchsorted(reference, values, side="right") / max(len(reference), 1)


class EvidenceCombiner:
    """Per-rank evidence from the predicted taxon's probability and the outlier score.

    Defaults (``method``, ``gate_quantile``, ``confidence``): the config's ``openset``
    section (:class:`taxoclass.config.OpensetConfig`: ``gate`` on the path logit).

    ``method="rank_mean"``: mean of the empirical CDF of ``p`` and of ``-z``
    against the validation values (in [0, 1]); no weights are learnt from correctness.
    ``method="logistic"``: per rank, ``sigmoid(a * logit(p) + b * z + c)`` fitted on
    validation rows to "the predicted taxon at this rank is right" (a calibrated
    probability of being right). ``z`` is the outlier z-score (higher = more abnormal);
    pass ``None`` for a probability-only rule. ``outlier_ranks``: ranks whose evidence
    uses ``z`` (default: the lowest rank only; a new oak is far from the known oaks,
    which is evidence against the species, not against *Quercus*). ``C``: inverse L2
    penalty of the regression. JSON-able via :meth:`to_dict`.

    ``method="gate"``: the empirical CDF of ``p`` (as rank_mean), but at the outlier
    ranks a row whose ``z`` lies above the ``gate_quantile`` of the validation rows that
    are right at that rank gets :data:`GATED` evidence (never accepted). Two questions,
    two tests: "is this one of the known taxa at all?" (the distance, with a cut set on
    known images only, since validation holds no unknown species) and "which one, how
    sure?" (the confidence, whose threshold is then fitted to a target precision).

    ``p`` may be the path probability or, with ``confidence="path_logit"``, the raw
    logit of the path's class (the logistic combiner then uses it as is instead of
    ``logit(p)``); see :data:`CONFIDENCES`.

    Why rank_mean over logistic: on the leaf benchmark (bench/results/openset.md) the
    regression learns mostly from known-species confusions in validation, which the
    probability already explains, and gives the distance too little weight for unseen
    species; the rank average keeps both and detected held-out species better. The gate
    keeps the two apart and kept most known species named (see the same table).
    """

    def __init__(self, method: str = _DEFAULTS.combiner, *, C: float = 1.0,
                 use_outlier: bool = True, outlier_ranks: Sequence[str] | None = None,
                 gate_quantile: float = _DEFAULTS.gate_quantile,
                 confidence: str = _DEFAULTS.confidence) -> None:
        self.method = method
        self.C = C
        self.use_outlier = use_outlier
        self.outlier_ranks = outlier_ranks
        self.gate_quantile = gate_quantile
        self.confidence = confidence

    def fit(self, probs: Mapping[str, np.ndarray], outlier: np.ndarray | None,
            correct: Mapping[str, np.ndarray],
            labelled: Mapping[str, np.ndarray] | None = None) -> EvidenceCombiner:
        """``probs``: rank -> probability of the predicted taxon; ``correct``: rank -> bool;
        ``labelled``: rank -> the image has a label there (the logistic combiner learns
        only from those; an unlabelled row is never right, so the gate ignores it too)."""
        if self.method not in COMBINERS:
            raise ValueError(f"Unknown combination method {self.method!r}; expected one of "
                             f"{COMBINERS}.")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"Unknown confidence {self.confidence!r}; expected one of "
                             f"{CONFIDENCES}.")
        if not 0.0 < self.gate_quantile <= 1.0:
            raise ValueError(f"gate_quantile must be in (0, 1], got {self.gate_quantile}.")
        use_z = self.use_outlier and outlier is not None
        self.ranks_ = tuple(probs)
        self.outlier_ranks_ = (tuple(self.outlier_ranks) if self.outlier_ranks is not None
                               else self.ranks_[-1:]) if use_z else ()
        self.params_: dict[str, dict[str, Any]] = {}
        for rank in self.ranks_:
            p = np.asarray(probs[rank], dtype=np.float64)
            rank_z = rank in self.outlier_ranks_
            if self.method in (Combiner.RANK_MEAN, Combiner.GATE):
                # Both rank the confidence against its validation distribution.
                q = np.linspace(0, 1, 201)
                entry: dict[str, Any] = {"p_ref": np.quantile(p, q).tolist()}
                if rank_z:
                    z = np.asarray(outlier, dtype=np.float64)
                    if self.method == Combiner.RANK_MEAN:
                        entry["z_ref"] = np.quantile(-z, q).tolist()
                    else:
                        ok = np.asarray(correct[rank], dtype=bool)
                        known = z[ok] if ok.sum() >= 10 else z  # too few right: every row
                        entry["z_cut"] = float(np.quantile(known, self.gate_quantile))
                self.params_[rank] = entry
                continue
            y = np.asarray(correct[rank], dtype=bool)
            feats = self._features(p, outlier if rank_z else None)
            if labelled is not None and rank in labelled:
                lab = np.asarray(labelled[rank], dtype=bool)
                y, feats = y[lab], feats[lab]
            if y.all() or not y.any():
                # One class only: a constant score equal to the observed accuracy.
                acc = y.mean() if len(y) else 0.5
                self.params_[rank] = {"coef": [0.0] * feats.shape[1],
                                      "intercept": float(_logit(np.array([acc]))[0]),
                                      "mean": [0.0] * feats.shape[1],
                                      "scale": [1.0] * feats.shape[1]}
                continue
            from sklearn.linear_model import LogisticRegression

            mean, scale = feats.mean(0), feats.std(0)
            scale = np.where(scale > 1e-12, scale, 1.0)
            lr = LogisticRegression(C=self.C).fit((feats - mean) / scale, y)
            self.params_[rank] = {"coef": lr.coef_[0].tolist(),
                                  "intercept": float(lr.intercept_[0]),
                                  "mean": mean.tolist(), "scale": scale.tolist()}
        self.use_outlier_ = use_z
        return self

    def _features(self, p: np.ndarray, z: np.ndarray | None) -> np.ndarray:
        cols = [p if self.confidence == Confidence.PATH_LOGIT else _logit(p)]
        if z is not None:
            cols.append(np.asarray(z, dtype=np.float64))
        return np.stack(cols, axis=1)

    def score(self, probs: Mapping[str, np.ndarray], outlier: np.ndarray | None
              ) -> dict[str, np.ndarray]:
        """Evidence per rank (higher = more trustworthy)."""
        if not hasattr(self, "params_"):
            raise NotFittedError("This EvidenceCombiner is not fitted yet; call fit() first.")
        if self.use_outlier_ and outlier is None:
            raise ValueError("This EvidenceCombiner was fitted with outlier scores; pass them.")
        out = {}
        for rank in self.ranks_:
            p = np.asarray(probs[rank], dtype=np.float64)
            par = self.params_[rank]
            if self.method in (Combiner.RANK_MEAN, Combiner.GATE):
                e = _ecdf(np.asarray(par["p_ref"]), p)
                if rank in self.outlier_ranks_:
                    z = np.asarray(outlier, dtype=np.float64)
                    if self.method == Combiner.RANK_MEAN:
                        e = np.mean([e, _ecdf(np.asarray(par["z_ref"]), -z)], axis=0)
                    else:
                        e = np.where(z <= par["z_cut"], e, GATED)
                out[rank] = e
                continue
            f = (self._features(p, outlier if rank in self.outlier_ranks_ else None)
                 - np.asarray(par["mean"])) / np.asarray(par["scale"])
            out[rank] = 1.0 / (1.0 + np.exp(-(f @ np.asarray(par["coef"]) + par["intercept"])))
        return out

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "params_"):
            raise NotFittedError("This EvidenceCombiner is not fitted yet; call fit() first.")
        return {"method": self.method, "C": float(self.C), "use_outlier": self.use_outlier_,
                "outlier_ranks": list(self.outlier_ranks_), "ranks": list(self.ranks_),
                "gate_quantile": float(self.gate_quantile), "confidence": self.confidence,
                "params": self.params_}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvidenceCombiner:
        obj = cls(data["method"], C=float(data["C"]), use_outlier=bool(data["use_outlier"]),
                  outlier_ranks=list(data["outlier_ranks"]),
                  gate_quantile=float(data.get("gate_quantile",
                                               _LEGACY_STATE["gate_quantile"])),
                  confidence=str(data.get("confidence", _LEGACY_STATE["confidence"])))
        obj.ranks_ = tuple(data["ranks"])
        obj.outlier_ranks_ = tuple(data["outlier_ranks"])
        obj.params_ = {r: dict(v) for r, v in data["params"].items()}
        obj.use_outlier_ = bool(data["use_outlier"])
        return obj
