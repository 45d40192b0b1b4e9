"""Is this image like anything the model was trained on? Outlier scores and head confidences.

Three parts, all used by the back-off (:mod:`taxoclass.backoff`):

- :class:`OutlierDetector` wraps a pyod detector (KNN, LOF, ECOD, COPOD, IForest) on
  L2-normalised embeddings, fitted globally or per group (per genus: each point is scored
  against the detector of its *predicted* genus; genera with too few training images fall
  back to the global detector). Scores are z-scores against the scoring detector's own
  training scores, so scores from different genus detectors are comparable; higher =
  more abnormal (pyod's convention). Persistence stores parameters and the training
  embeddings (JSON + arrays) and refits deterministically on load: nothing is pickled,
  so loading a bundle never executes code.
- :func:`confidence_scores`: per-rank confidence of the heads (max probability, margin,
  negative entropy, negative energy), all oriented so that higher = more confident.
- :class:`EvidenceCombiner`: one evidence score per rank from both the coherent
  probability of the predicted taxon and the outlier score.

Why combine both: on new species the head's own confidence (max probability) is hard to
beat, because a new oak still looks like an oak and the species head spreads its mass
over several known oaks; distance-based detectors catch what is far from all training
data (another family, a bad photo) where a softmax can still be overconfident. The
default rule (``"rank_mean"``) averages the two rank-normalised scores (empirical CDFs of
the probability and of the negated outlier z-score against the validation values) at the
lowest rank; higher ranks use the probability alone. ``"logistic"`` instead fits, per
rank, a logistic regression on validation predicting "the predicted taxon at this rank is
right" from ``logit(p)`` and the z-score; it is calibrated but, fitted mostly on
known-species confusions, it under-weights distance (see :class:`EvidenceCombiner`).
Either way, thresholds are then fitted on the evidence (:mod:`taxoclass.calibration`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import NotFittedError

__all__ = ["CONFIDENCE_SCORES", "DETECTORS", "EvidenceCombiner", "OutlierDetector",
           "confidence_scores"]

#: pyod detectors exposed by name (lower case); all cheap on a few thousand embeddings.
#: HBOS is left out: pyod's HBOS compiles with numba on first use (seconds per process)
#: and ranked last on the leaf benchmark.
#: ``"mahalanobis"`` is not pyod: a class-conditional relative Mahalanobis distance
#: (:class:`_RelativeMahalanobis`), the best single unknown-species score on the leaf benchmark.
DETECTORS: tuple[str, ...] = ("knn", "lof", "ecod", "copod", "iforest", "mahalanobis")
#: Keys of :func:`confidence_scores` (``neg_energy`` only when logits are given).
CONFIDENCE_SCORES: tuple[str, ...] = ("max_prob", "margin", "neg_entropy", "neg_energy")
COMBINERS: tuple[str, ...] = ("logistic", "rank_mean", "gate")
#: What the combiners read as the head's confidence in the path's taxon, per rank:
#: the coherent probability, or the raw logit of that class (``Decoded.path_logit``).
CONFIDENCES: tuple[str, ...] = ("path_prob", "path_logit")
#: Evidence of a gated row (``method="gate"``): below every threshold.
GATED = -1.0
STATE_VERSION = 1


class _RelativeMahalanobis:
    """Class-conditional relative Mahalanobis distance (Ren et al. 2021), pyod-style.

    In a PCA space of the training rows (``n_components``), each class (``labels`` at fit)
    gets its mean; one covariance is shared (pooled within-class), shrunk towards a scaled
    identity by ``shrinkage`` (few images per species). The score is the smallest squared
    distance to a class mean minus the squared distance under the background (all rows, one
    Gaussian), which removes what is merely unusual for any image. Without labels it is the
    plain Mahalanobis distance to the one Gaussian. Higher = more abnormal.
    """

    def __init__(self, n_components: int = 128, shrinkage: float = 0.3,
                 contamination: float = 0.1) -> None:
        self.n_components = n_components
        self.shrinkage = shrinkage
        self.contamination = contamination

    def _shrunk_precision(self, cov: np.ndarray) -> np.ndarray:
        d = cov.shape[0]
        cov = (1 - self.shrinkage) * cov + self.shrinkage * np.trace(cov) / d * np.eye(d)
        return np.linalg.pinv(cov, hermitian=True)

    def fit(self, x: np.ndarray, labels: np.ndarray | None = None) -> _RelativeMahalanobis:
        self.center_ = x.mean(0)
        xc = x - self.center_
        dim = max(1, min(self.n_components, len(x) - 1, x.shape[1]))
        # PCA by SVD (deterministic up to sign, which distances ignore).
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        self.components_ = vt[:dim]
        r = xc @ self.components_.T
        self.bg_precision_ = self._shrunk_precision(np.cov(r.T, bias=True).reshape(dim, dim))
        if labels is None:
            self.means_ = None
        else:
            lab = np.asarray(labels)
            classes, inv = np.unique(lab, return_inverse=True)
            self.means_ = np.stack([r[inv == i].mean(0) for i in range(len(classes))])
            res = r - self.means_[inv]
            self.precision_ = self._shrunk_precision(res.T @ res / len(r))
        self.decision_scores_ = self.decision_function(x)
        self.threshold_ = float(np.quantile(self.decision_scores_, 1 - self.contamination))
        return self

    @staticmethod
    def _whitener(precision: np.ndarray) -> np.ndarray:
        """``W`` with ``W @ W.T == precision``: a quadratic form becomes a squared norm."""
        w, v = np.linalg.eigh(precision)
        return v * np.sqrt(np.clip(w, 0.0, None))

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        r = (np.asarray(x, dtype=np.float64) - self.center_) @ self.components_.T
        # Squared norms after whitening, with matrix products (BLAS) instead of a
        # three-operand einsum: ~50x faster at thousands of rows and classes.
        zb = r @ self._whitener(self.bg_precision_)
        bg = np.einsum("nd,nd->n", zb, zb)
        if self.means_ is None:
            return bg
        w = self._whitener(self.precision_)
        z, mz = r @ w, self.means_ @ w
        zz, mm = np.einsum("nd,nd->n", z, z), np.einsum("kd,kd->k", mz, mz)
        best = np.full(len(r), np.inf)
        for i in range(0, len(mz), 1024):  # chunks keep memory at n * 1024
            d = zz[:, None] - 2.0 * (z @ mz[i:i + 1024].T) + mm[None, i:i + 1024]
            best = np.minimum(best, d.min(1))
        return np.maximum(best, 0.0) - bg


def _pyod(method: str, n_samples: int, *, n_neighbors: int, contamination: float,
          random_state: int):
    """A fresh pyod detector; neighbour counts are clamped to the sample size."""
    k = max(1, min(n_neighbors, n_samples - 1))
    if method == "mahalanobis":
        return _RelativeMahalanobis(contamination=contamination)
    if method == "knn":
        from pyod.models.knn import KNN
        return KNN(n_neighbors=k, contamination=contamination, method="mean")
    if method == "lof":
        from pyod.models.lof import LOF
        return LOF(n_neighbors=k, contamination=contamination)
    if method == "ecod":
        from pyod.models.ecod import ECOD
        return ECOD(contamination=contamination)
    if method == "copod":
        from pyod.models.copod import COPOD
        return COPOD(contamination=contamination)
    if method == "iforest":
        from pyod.models.iforest import IForest
        return IForest(contamination=contamination, random_state=random_state)
    raise ValueError(f"Unknown outlier method {method!r}; expected one of {DETECTORS}.")


def _l2(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class OutlierDetector:
    """A pyod detector on embeddings, global or per group (genus), sklearn-style.

    Parameters
    ----------
    method: one of :data:`DETECTORS`.
    scope: ``"global"`` (one detector on all training rows) or ``"group"`` (one per
        group with at least ``min_group_size`` rows, plus the global one as fallback).
        For ``method="mahalanobis"`` there is always one detector and the ``groups``
        given to :meth:`fit` are its classes (pass species labels: class-conditional
        distance); scoring needs no groups.
    min_group_size: smallest group that gets its own detector.
    n_neighbors: for KNN (mean distance to the k nearest) and LOF.
    contamination: pyod's expected outlier share; sets ``threshold_`` used by
        :meth:`predict` (the back-off's outlier flag).
    normalize: L2-normalise rows first (cosine geometry, as the heads see them).
    random_state: seed for IForest, so a refit from saved state gives identical scores.

    :meth:`decision_function` returns, for each row, ``(raw - mean) / std`` where raw is
    pyod's score from the detector the row is scored with and mean/std are that
    detector's training scores: a monotone transform of pyod's score for the global
    detector, and comparable across genus detectors. Higher = more abnormal.
    """

    def __init__(self, method: str = "knn", *, scope: str = "global", min_group_size: int = 10,
                 n_neighbors: int = 5, contamination: float = 0.1, normalize: bool = True,
                 random_state: int = 0) -> None:
        self.method = method
        self.scope = scope
        self.min_group_size = min_group_size
        self.n_neighbors = n_neighbors
        self.contamination = contamination
        self.normalize = normalize
        self.random_state = random_state

    # ------------------------------------------------------------------ fitting
    def get_params(self) -> dict[str, Any]:
        return {"method": self.method, "scope": self.scope,
                "min_group_size": int(self.min_group_size), "n_neighbors": int(self.n_neighbors),
                "contamination": float(self.contamination), "normalize": bool(self.normalize),
                "random_state": int(self.random_state)}

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        x = np.asarray(X, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"OutlierDetector expects a 2-D array [n, dim], got shape {x.shape}.")
        if hasattr(self, "n_features_in_") and x.shape[1] != self.n_features_in_:
            raise ValueError(f"OutlierDetector was fitted on {self.n_features_in_} features, "
                             f"got {x.shape[1]}.")
        if not np.isfinite(x).all():
            raise ValueError("OutlierDetector: input holds NaN or infinite values.")
        return _l2(x) if self.normalize else x

    def _fit_one(self, x: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
        det = _pyod(self.method, len(x), n_neighbors=self.n_neighbors,
                    contamination=self.contamination, random_state=self.random_state)
        if self.method == "mahalanobis":
            det.fit(x, labels)
        else:
            det.fit(x)
        train = np.asarray(det.decision_scores_, dtype=np.float64)
        mean, std = float(train.mean()), float(train.std())
        return {"detector": det, "mean": mean, "std": std if std > 1e-12 else 1.0,
                "threshold": float(det.threshold_)}

    def fit(self, X: np.ndarray, groups: Sequence[int] | np.ndarray | None = None
            ) -> OutlierDetector:
        """Fit on training embeddings; ``groups``: group (genus index) per row, for scope
        ``"group"``."""
        if self.method not in DETECTORS:
            raise ValueError(f"Unknown outlier method {self.method!r}; expected one of "
                             f"{DETECTORS}.")
        if self.scope not in ("global", "group"):
            raise ValueError(f"OutlierDetector scope must be 'global' or 'group', got "
                             f"{self.scope!r}.")
        raw = np.asarray(X, dtype=np.float64)
        if raw.ndim != 2 or len(raw) < 2:
            raise ValueError(f"OutlierDetector.fit needs a 2-D array with at least 2 rows, got "
                             f"shape {raw.shape}.")
        if self.scope == "group" and groups is None:
            raise ValueError("OutlierDetector(scope='group').fit needs groups (the genus index "
                             "of each training row).")
        g = None if groups is None else np.asarray(groups, dtype=np.int64)
        if g is not None and g.shape != (len(raw),):
            raise ValueError(f"groups must have one entry per row ({len(raw)}), got shape "
                             f"{g.shape}.")
        x = self._prepare(raw)
        self.n_features_in_ = raw.shape[1]
        self.train_X_ = raw
        self.train_groups_ = g
        self.groups_: dict[int, dict[str, Any]] = {}
        if self.method == "mahalanobis":
            # One detector; the groups are its classes (species labels work best).
            self.global_ = self._fit_one(x, g)
        else:
            self.global_ = self._fit_one(x)
        if self.scope == "group" and self.method != "mahalanobis":
            for value in np.unique(g):
                mask = g == value
                if mask.sum() >= max(self.min_group_size, 3):
                    self.groups_[int(value)] = self._fit_one(x[mask])
        # pyod's contamination threshold of the global detector, as a z-score.
        self.threshold_ = (self.global_["threshold"] - self.global_["mean"]) / self.global_["std"]
        return self

    def _check(self) -> None:
        if not hasattr(self, "global_"):
            raise NotFittedError("This OutlierDetector is not fitted yet; call fit(X) first.")

    def _route(self, n: int, groups) -> np.ndarray:
        """Detector key per row: a group id with its own detector, else -1 (global)."""
        if self.scope != "group" or self.method == "mahalanobis":
            return np.full(n, -1, dtype=np.int64)
        if groups is None:
            raise ValueError("OutlierDetector(scope='group') scores need groups: the predicted "
                             "genus index of each row.")
        g = np.asarray(groups, dtype=np.int64)
        if g.shape != (n,):
            raise ValueError(f"groups must have one entry per row ({n}), got shape {g.shape}.")
        known = np.array(sorted(self.groups_), dtype=np.int64)
        return np.where(np.isin(g, known), g, -1)

    def _scores(self, X, groups) -> tuple[np.ndarray, np.ndarray]:
        self._check()
        x = self._prepare(X)
        route = self._route(len(x), groups)
        z = np.empty(len(x))
        flag = np.zeros(len(x), dtype=bool)
        for key in np.unique(route):
            mask = route == key
            d = self.global_ if key < 0 else self.groups_[int(key)]
            raw = np.asarray(d["detector"].decision_function(x[mask]), dtype=np.float64)
            z[mask] = (raw - d["mean"]) / d["std"]
            flag[mask] = raw > d["threshold"]
        return z, flag

    def decision_function(self, X: np.ndarray, groups: Sequence[int] | np.ndarray | None = None
                          ) -> np.ndarray:
        """Outlier z-score per row (higher = more abnormal); ``groups``: predicted genus."""
        return self._scores(X, groups)[0]

    def predict(self, X: np.ndarray, groups: Sequence[int] | np.ndarray | None = None
                ) -> np.ndarray:
        """True where pyod's contamination threshold of the scoring detector is exceeded."""
        return self._scores(X, groups)[1]

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able parameters and the arrays needed to refit (no pickle)."""
        self._check()
        params = {"version": STATE_VERSION, "params": self.get_params(),
                  "has_groups": self.train_groups_ is not None}
        arrays = {"train_X": self.train_X_}
        if self.train_groups_ is not None:
            arrays["train_groups"] = self.train_groups_
        return params, arrays

    @classmethod
    def from_state(cls, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
                   ) -> OutlierDetector:
        """Rebuild by refitting (deterministic: seeded) on the saved training embeddings."""
        if params.get("version") != STATE_VERSION:
            raise ValueError(f"Outlier detector state version {params.get('version')!r}; this "
                             f"taxoclass reads version {STATE_VERSION}. Refit the detector.")
        if "train_X" not in arrays:
            raise ValueError("Outlier detector state lacks the 'train_X' array; refit it.")
        det = cls(**params["params"])
        groups = arrays.get("train_groups") if params.get("has_groups") else None
        return det.fit(np.asarray(arrays["train_X"]), groups)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"OutlierDetector({args})"


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

    ``method="rank_mean"`` (default): mean of the empirical CDF of ``p`` and of ``-z``
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

    def __init__(self, method: str = "rank_mean", *, C: float = 1.0, use_outlier: bool = True,
                 outlier_ranks: Sequence[str] | None = None, gate_quantile: float = 0.975,
                 confidence: str = "path_prob") -> None:
        self.method = method
        self.C = C
        self.use_outlier = use_outlier
        self.outlier_ranks = outlier_ranks
        self.gate_quantile = gate_quantile
        self.confidence = confidence

    def fit(self, probs: Mapping[str, np.ndarray], outlier: np.ndarray | None,
            correct: Mapping[str, np.ndarray]) -> EvidenceCombiner:
        """``probs``: rank -> probability of the predicted taxon; ``correct``: rank -> bool."""
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
            if self.method in ("rank_mean", "gate"):
                # Both rank the confidence against its validation distribution.
                q = np.linspace(0, 1, 201)
                entry: dict[str, Any] = {"p_ref": np.quantile(p, q).tolist()}
                if rank_z:
                    z = np.asarray(outlier, dtype=np.float64)
                    if self.method == "rank_mean":
                        entry["z_ref"] = np.quantile(-z, q).tolist()
                    else:
                        ok = np.asarray(correct[rank], dtype=bool)
                        known = z[ok] if ok.sum() >= 10 else z  # too few right: every row
                        entry["z_cut"] = float(np.quantile(known, self.gate_quantile))
                self.params_[rank] = entry
                continue
            y = np.asarray(correct[rank], dtype=bool)
            feats = self._features(p, outlier if rank_z else None)
            if y.all() or not y.any():
                # One class only: a constant score equal to the observed accuracy.
                self.params_[rank] = {"coef": [0.0] * feats.shape[1],
                                      "intercept": float(_logit(np.array([y.mean()]))[0]),
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
        cols = [p if self.confidence == "path_logit" else _logit(p)]
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
            if self.method in ("rank_mean", "gate"):
                e = _ecdf(np.asarray(par["p_ref"]), p)
                if rank in self.outlier_ranks_:
                    z = np.asarray(outlier, dtype=np.float64)
                    if self.method == "rank_mean":
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
                  gate_quantile=float(data.get("gate_quantile", 0.975)),
                  confidence=str(data.get("confidence", "path_prob")))
        obj.ranks_ = tuple(data["ranks"])
        obj.outlier_ranks_ = tuple(data["outlier_ranks"])
        obj.params_ = {r: dict(v) for r, v in data["params"].items()}
        obj.use_outlier_ = bool(data["use_outlier"])
        return obj
