"""Is this image like anything the model was trained on? Outlier scores on embeddings.

:class:`OutlierDetector` wraps a pyod detector (KNN, LOF, ECOD, COPOD, IForest) on
L2-normalised embeddings, fitted globally or per group (per genus: each point is scored
against the detector of its *predicted* genus; genera with too few training images fall
back to the global detector), or the class-conditional relative Mahalanobis distance
(:class:`_RelativeMahalanobis`, the config default). Scores are z-scores against the
scoring detector's own training scores, so scores from different genus detectors are
comparable; higher = more abnormal (pyod's convention). Persistence stores parameters and
the training embeddings (JSON + arrays) and refits deterministically on load: nothing is
pickled, so loading a bundle never executes code.

The head's confidences and how they are combined with the outlier score into evidence
per rank: :mod:`taxoclass.openset.evidence`. Defaults: the config's ``openset`` section
(:class:`taxoclass.config.OpensetConfig`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import NotFittedError

from ..config import OpensetConfig
from ..vocab import Detector, Scope

__all__ = ["DETECTORS", "SCOPES", "OutlierDetector"]

#: pyod detectors exposed by name (lower case); all cheap on a few thousand embeddings.
#: HBOS is left out: pyod's HBOS compiles with numba on first use (seconds per process)
#: and ranked last on the leaf benchmark.
#: ``"mahalanobis"`` is not pyod: a class-conditional relative Mahalanobis distance
#: (:class:`_RelativeMahalanobis`), the best single unknown-species score on the leaf benchmark.
DETECTORS: tuple[str, ...] = tuple(d.value for d in Detector)
SCOPES: tuple[str, ...] = tuple(s.value for s in Scope)
STATE_VERSION = 1
_DEFAULTS = OpensetConfig()


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
    if method == Detector.MAHALANOBIS:
        return _RelativeMahalanobis(contamination=contamination)
    if method == Detector.KNN:
        from pyod.models.knn import KNN
        return KNN(n_neighbors=k, contamination=contamination, method="mean")
    if method == Detector.LOF:
        from pyod.models.lof import LOF
        return LOF(n_neighbors=k, contamination=contamination)
    if method == Detector.ECOD:
        from pyod.models.ecod import ECOD
        return ECOD(contamination=contamination)
    if method == Detector.COPOD:
        from pyod.models.copod import COPOD
        return COPOD(contamination=contamination)
    if method == Detector.IFOREST:
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

    def __init__(self, method: str = _DEFAULTS.detector, *, scope: str = _DEFAULTS.scope,
                 min_group_size: int = 10,
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
        if self.method == Detector.MAHALANOBIS:
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
        if self.scope not in SCOPES:
            raise ValueError(f"OutlierDetector scope must be 'global' or 'group', got "
                             f"{self.scope!r}.")
        raw = np.asarray(X, dtype=np.float64)
        if raw.ndim != 2 or len(raw) < 2:
            raise ValueError(f"OutlierDetector.fit needs a 2-D array with at least 2 rows, got "
                             f"shape {raw.shape}.")
        if self.scope == Scope.GROUP and groups is None:
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
        if self.method == Detector.MAHALANOBIS:
            # One detector; the groups are its classes (species labels work best).
            self.global_ = self._fit_one(x, g)
        else:
            self.global_ = self._fit_one(x)
        if self.scope == Scope.GROUP and self.method != Detector.MAHALANOBIS:
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
        if self.scope != Scope.GROUP or self.method == Detector.MAHALANOBIS:
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
