"""The learned plot rule: presence of each taxon from statistics of its tiles.

:class:`LearnedPlotRule` is fitted by :func:`~taxoclass.plots.calibration.calibrate_rules`
on calibration plots whose species are known, scored out-of-fold, saved inside
``plot_settings.json`` as plain JSON (no pickle) and applied by plot reports through
``aggregate_plot(rule="learned", scores=...)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from .search import TileViews, TruthIndex, calibration_ids, choose_settings
from .selection import LEARNED, rule_scores, top_ranked
from .tiling import DEFAULT_GRIDS, PlotTiles, grid_label

__all__ = ["FEATURES", "OOF_FOLDS", "LearnedPlotRule"]

#: Per grid scale, the statistics of a taxon's tile probabilities the learned rule sees.
FEATURES: tuple[str, ...] = ("max", "mean", "noisy_or", "first", "top3")
#: Folds for the learned rule's out-of-fold calibration scores (fewer with fewer plots).
OOF_FOLDS = 5


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class LearnedPlotRule:
    """Presence of each taxon in a plot from statistics of its tiles' probabilities.

    For every rank, each (plot, taxon) gets, per grid scale, the max, mean and noisy-or
    of the taxon's probability over the plot's non-flagged tiles, and the share of those
    tiles that rank it first and in their top 3 (:data:`FEATURES`); one logistic
    regression per rank (scikit-learn) maps them to a presence score, applied in numpy.
    ``fit`` also chooses a presence threshold per rank (``thresholds_``) maximising macro
    F1 per plot, bottom-up as for the hand-set rules, on out-of-fold scores
    (``oof_scores_``: each plot scored by regressions fitted without its fold), so that
    the thresholds and the calibration F1 are those of plots the model has not seen;
    the coefficients kept are then fitted on every plot.
    """

    def __init__(self, grids: Sequence[Any] = DEFAULT_GRIDS, *, C: float = 1.0,
                 max_iter: int = 3000) -> None:
        self.grids = tuple(grid_label(g) for g in grids)
        self.C = float(C)
        self.max_iter = int(max_iter)

    @property
    def feature_names(self) -> list[str]:
        return [f"{g}:{f}" for g in self.grids for f in FEATURES]

    def features(self, probs: np.ndarray, scales: Sequence[str],
                 unknown: np.ndarray | Sequence[bool] | None = None) -> np.ndarray:
        """``[n_classes, n_features]`` from one rank's tile probabilities ``[n_tiles,
        n_classes]`` (flagged tiles left out)."""
        a = np.asarray(probs, dtype=np.float64)
        scales = np.asarray(scales, dtype=str)
        keep = np.ones(len(a), dtype=bool) if unknown is None else ~np.asarray(unknown, bool)
        cols = []
        for grid in self.grids:
            t = a[keep & (scales == grid)]
            n, k = len(t), a.shape[1]
            if not n:
                cols += [np.zeros(k)] * len(FEATURES)
                continue
            first = np.bincount(t.argmax(axis=1), minlength=k) / n
            top3 = top_ranked(t, 3).sum(axis=0) / n
            cols += [t.max(axis=0), t.mean(axis=0), rule_scores(t, "noisy_or"), first, top3]
        return np.column_stack(cols)

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise ConfigError("This LearnedPlotRule is not fitted; call fit() or load it from "
                              "plot_settings.json (taxoclass calibrate-plots).")

    def scores(self, probs: Mapping[str, np.ndarray], scales: Sequence[str],
               unknown: np.ndarray | Sequence[bool] | None = None) -> dict[str, np.ndarray]:
        """Rank -> presence score per class (pass to ``aggregate_plot(scores=...)``)."""
        self._check_fitted()
        missing = [r for r in self.ranks_ if r not in probs]
        if missing:
            raise ConfigError(f"The learned rule was fitted for ranks {self.ranks_}; the "
                              f"probabilities lack {missing}.")
        scales = np.asarray(scales, dtype=str)
        other = sorted(set(scales.tolist()) - set(self.grids))
        if other:
            raise ConfigError(f"The learned rule was fitted on tiles of the grids {self.grids}; "
                              f"got tiles of {other}. Tile with the grids it was fitted on.")
        return {r: _sigmoid(self.features(probs[r], scales, unknown) @ self.coef_[r]
                            + self.intercept_[r]) for r in self.ranks_}

    def _design(self, plots: Mapping[str, PlotTiles], ids: Sequence[str], tables: dict
                ) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
        """Per rank: each plot's features and labels."""
        return {rank: ([self.features(plots[p].probs[rank], plots[p].scales, plots[p].unknown)
                        for p in ids], [tables[p][rank][2] for p in ids])
                for rank in self.ranks_}

    def _regress(self, design: dict, rows: Sequence[int]
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """One logistic regression per rank on the plots ``rows`` of ``design``."""
        from sklearn.linear_model import LogisticRegression

        coef: dict[str, np.ndarray] = {}
        intercept: dict[str, float] = {}
        for rank, (xs, ys) in design.items():
            x = np.concatenate([xs[i] for i in rows])
            y = np.concatenate([ys[i] for i in rows])
            if y.all() or not y.any():  # one class only: a constant presence score
                rate = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
                coef[rank] = np.zeros(x.shape[1])
                intercept[rank] = float(np.log(rate / (1 - rate)))
                continue
            model = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(x, y)
            coef[rank] = model.coef_[0].astype(np.float64)
            intercept[rank] = float(model.intercept_[0])
        return coef, intercept

    def fit(self, plots: Mapping[str, PlotTiles], truth: Mapping[str, Sequence[str]],
            taxonomy: Any, *, folds: int = OOF_FOLDS, seed: int = 0) -> LearnedPlotRule:
        """Fit one logistic regression per rank on calibration plots, then the thresholds.

        The plots are split into ``min(folds, n_plots)`` folds (shuffled with ``seed``);
        each fold's plots are scored by regressions fitted on the other folds
        (``oof_scores_``: plot id -> rank -> score per class), and the thresholds are
        chosen on those scores. ``evaluation_`` says how (``"out-of-fold (k=5)"``; with
        ``folds <= 1`` or a single plot, in-sample on the final model's scores). The
        coefficients kept are fitted on every plot.
        """
        ids = calibration_ids(plots, truth)
        tree = TruthIndex(taxonomy)
        tables = {p: tree.truth(truth[p]) for p in ids}
        self.ranks_ = list(taxonomy.ranks)
        design = self._design(plots, ids, tables)
        self.coef_, self.intercept_ = self._regress(design, range(len(ids)))
        self.n_plots_ = len(ids)
        k = min(int(folds), len(ids))
        self.seed_ = int(seed)
        if k >= 2:
            order = np.random.default_rng(seed).permutation(len(ids))
            oof: dict[str, dict[str, np.ndarray]] = {}
            for held in np.array_split(order, k):
                coef, intercept = self._regress(design, np.setdiff1d(order, held))
                for i in held:
                    oof[ids[i]] = {r: _sigmoid(design[r][0][i] @ coef[r] + intercept[r])
                                   for r in self.ranks_}
            self.oof_scores_ = {p: oof[p] for p in ids}
            self.n_folds_ = k
            self.evaluation_ = (f"out-of-fold (k={k})" if k == int(folds) else
                                f"out-of-fold (k={k}: only {len(ids)} plots)")
        else:
            self.oof_scores_ = {p: {r: _sigmoid(design[r][0][i] @ self.coef_[r]
                                                + self.intercept_[r]) for r in self.ranks_}
                                for i, p in enumerate(ids)}
            self.n_folds_ = 1
            self.evaluation_ = ("in-sample (out-of-fold needs 2 plots or more)"
                                if len(ids) < 2 and int(folds) >= 2 else "in-sample")
        self.thresholds_, _ = choose_settings(TileViews(plots, self.ranks_), ids, tables, tree,
                                              LEARNED, scores=self.oof_scores_)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: grids, ranks, feature names, coefficients, intercepts, thresholds."""
        self._check_fitted()
        return {"grids": list(self.grids), "ranks": list(self.ranks_),
                "features": self.feature_names, "C": self.C, "max_iter": self.max_iter,
                "coef": {r: [float(v) for v in self.coef_[r]] for r in self.ranks_},
                "intercept": {r: float(self.intercept_[r]) for r in self.ranks_},
                "thresholds": {r: float(v) for r, v in self.thresholds_.items()},
                "n_plots": int(self.n_plots_), "evaluation": self.evaluation_,
                "folds": int(self.n_folds_), "seed": int(self.seed_)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LearnedPlotRule:
        rule = cls(data["grids"], C=data.get("C", 1.0), max_iter=data.get("max_iter", 3000))
        if list(data["features"]) != rule.feature_names:
            raise ConfigError(f"Learned rule features {list(data['features'])} are not the ones "
                              f"this taxoclass computes ({rule.feature_names}); re-run "
                              "taxoclass calibrate-plots.")
        rule.ranks_ = list(data["ranks"])
        rule.coef_ = {r: np.asarray(data["coef"][r], dtype=np.float64) for r in rule.ranks_}
        rule.intercept_ = {r: float(data["intercept"][r]) for r in rule.ranks_}
        rule.thresholds_ = {r: float(v) for r, v in data["thresholds"].items()}
        rule.n_plots_ = int(data.get("n_plots", 0))
        rule.evaluation_ = str(data.get("evaluation", "in-sample"))
        rule.n_folds_ = int(data.get("folds", 1))
        rule.seed_ = int(data.get("seed", 0))
        for r in rule.ranks_:
            if rule.coef_[r].shape != (len(rule.feature_names),):
                raise ConfigError(f"Learned rule rank {r!r}: {len(rule.coef_[r])} coefficients "
                                  f"for {len(rule.feature_names)} features.")
        return rule
