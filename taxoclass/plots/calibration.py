"""Plot-level calibration: aggregation settings chosen on plots whose species are known.

A user with some plot photos and their species lists runs :func:`calibrate_plots`.
Every photo is tiled and classified once (:func:`predict_plots`), then

- each hand-set rule (``argmax_union``, ``max``, ``noisy_or``, ``mean``) gets the species
  threshold and tile settings (:class:`TileSettings`: ``min_tiles`` for every rule,
  ``top_k`` and ``min_tile_prob`` too for ``noisy_or`` and ``mean``;
  :data:`TILE_SEARCH`) that together maximise species macro F1 per plot, then the genus
  threshold (rank-aware genus F1, species threshold and tile settings fixed), then the
  family threshold (lower ranks fixed). These rules are scored *in-sample*, on the plots
  they were tuned on: one threshold per rank and at most three settings from a grid of
  27, so their optimism is small next to a fitted model's;
- a :class:`LearnedPlotRule` (one logistic regression per rank on per-taxon statistics of
  the plot's tiles: five weights per grid scale and an intercept) is scored
  *out-of-fold*: the plots are split into k seeded folds (k = min(5, plots)), each fold
  is scored by regressions fitted on the others, its presence thresholds are chosen on
  the pooled out-of-fold scores, and its calibration F1 is that of those scores; the
  model kept for use is then refitted on every plot. (With fewer than 5 plots k is
  smaller, and with one there is nothing to hold out; the table says so.)
- the rule with the best calibration species F1 is chosen (ties: the simpler rule, in
  the order of :data:`RULE_ORDER`). The table's ``evaluation`` column says how each F1
  was measured.

The result, :class:`PlotSettings`, is saved as ``plot_settings.json``
(``data_schemas/plot_settings.schema.json``; plain JSON, no pickle) and read back by
``taxoclass plot-report --settings`` (:func:`resolve_report_settings`): rule, thresholds
and tile settings. The learned rule's parameters are always kept, chosen or not, so
``--rule learned`` can pick it later.

Thresholds and tile settings are swept in numpy with the selection of
:func:`~taxoclass.plots.rules.aggregate_plot` (flagged tiles and tiles under ``min_tile_prob``
left out, ``top_k`` per tile, ``min_tiles`` supporting tiles; no tile weights); the F1
figures in the calibration table come from ``aggregate_plot`` and
:func:`~taxoclass.plots.evaluation.evaluate_plots` themselves.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._version import __version__
from ..errors import AnnotationError, ConfigError, ImageError, TaxonomyError
from ..io.files import atomic_write_json
from .evaluation import _truth_path, evaluate_plots
from .rules import (
    LEARNED,
    RULES,
    SUPPORT_TOP,
    PlotRecord,
    aggregate_plot,
    keep_top_k,
    rule_scores,
    top_ranked,
)
from .tiling import (
    DEFAULT_GRIDS,
    PhotoFailure,
    PlotTiles,
    backbone_name,
    classify_photos,
    grid_label,
    plot_ids,
)

__all__ = [
    "CANDIDATE_THRESHOLDS",
    "DEFAULT_GRIDS",
    "FEATURES",
    "OOF_FOLDS",
    "RULE_ORDER",
    "SETTINGS_FILE",
    "TABLE_FILE",
    "TILE_RULES",
    "TILE_SEARCH",
    "CalibrationResult",
    "LearnedPlotRule",
    "PlotPredictions",
    "PlotSettings",
    "PlotTiles",
    "ReportSettings",
    "TileSettings",
    "calibrate_plots",
    "calibrate_rules",
    "check_plot_truth",
    "grid_label",
    "plot_records",
    "predict_plots",
    "resolve_report_settings",
]

Progress = Callable[[int, int], None]

SETTINGS_FILE = "plot_settings.json"
TABLE_FILE = "plot_calibration.csv"
SCHEMA_NAME = "plot_settings.schema.json"
SETTINGS_FORMAT = "taxoclass-plot-settings"
FORMAT_VERSION = 1
#: Per grid scale, the statistics of a taxon's tile probabilities the learned rule sees.
FEATURES: tuple[str, ...] = ("max", "mean", "noisy_or", "first", "top3")
#: Simplest first: a tie in calibration species F1 goes to the earlier rule.
RULE_ORDER: tuple[str, ...] = ("argmax_union", "max", "mean", "noisy_or", LEARNED)
#: Thresholds tried at every rank (dense near 0 and 1, where noisy-or scores crowd).
CANDIDATE_THRESHOLDS = np.unique(np.round(np.concatenate([
    [0.0], np.linspace(0.01, 0.99, 99), 1.0 - np.logspace(-4, -2.1, 8),
    np.logspace(-3, -2.1, 4)]), 6))
#: Tile settings of :func:`~taxoclass.plots.rules.aggregate_plot` searched with the hand-set
#: rules' species threshold; ``top_k`` and ``min_tile_prob`` only for :data:`TILE_RULES`.
TILE_SEARCH: dict[str, tuple[Any, ...]] = {"top_k": (None, 1, 3),
                                           "min_tile_prob": (0.0, 0.2, 0.4),
                                           "min_tiles": (1, 2, 3)}
#: The rules whose scores add tiles up, so that ``top_k`` and the tile gate change them.
TILE_RULES: tuple[str, ...] = ("noisy_or", "mean")
#: Folds for the learned rule's out-of-fold calibration scores (fewer with fewer plots).
OOF_FOLDS = 5


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


def _tile_options(rule: str) -> list[TileSettings]:
    """The tile settings searched for ``rule`` (the defaults only for the learned rule),
    simplest first."""
    if rule == LEARNED:
        return [TileSettings()]
    tiles = rule in TILE_RULES
    opts = [TileSettings(k, p, m) for m in TILE_SEARCH["min_tiles"]
            for k in (TILE_SEARCH["top_k"] if tiles else (None,))
            for p in (TILE_SEARCH["min_tile_prob"] if tiles else (0.0,))]
    return sorted(opts, key=lambda o: o.n_set)


# ---------------------------------------------------------------------- tile predictions
@dataclass
class PlotPredictions:
    """Tile predictions per plot id, and the photos that could not be read."""

    plots: dict[str, PlotTiles]
    failures: list[dict[str, str]]


def predict_plots(classifier: Any, photos: Sequence[str | Path], *,
                  grids: Sequence[Any] = DEFAULT_GRIDS, overlap: float = 0.0,
                  flag_unknown: Callable[[Any], np.ndarray] | None = None,
                  progress: Progress | None = None) -> PlotPredictions:
    """Tile and classify every plot photo (plot id = file stem, as in plot reports) with
    :func:`~taxoclass.plots.tiling.classify_photos`.

    ``classifier``: a :class:`~taxoclass.plots.tiling.TileClassifier`; ``flag_unknown``: as for
    :func:`~taxoclass.plots.report.plot_report`. A photo that cannot be read is listed in
    ``failures`` (photo, error) and the others carry on; ``progress(done, total)`` is
    called after each photo.
    """
    plots: dict[str, PlotTiles] = {}
    failures: list[dict[str, str]] = []
    for item in classify_photos(classifier, photos, grids=grids, overlap=overlap,
                                flag_unknown=flag_unknown, progress=progress):
        if isinstance(item, PhotoFailure):
            failures.append(item.to_dict())
        else:
            plots[item.plot_id] = item
    return PlotPredictions(plots, failures)


# ---------------------------------------------------------------------- truth
def check_plot_truth(truth: Mapping[str, Sequence[str]], photos: Sequence[str | Path],
                     taxonomy: Any | None = None, *, truth_file: str = "the truth table") -> None:
    """Raise :class:`AnnotationError` unless every photo has truth rows and every truth
    plot a photo (plot id = photo file stem), and, with a taxonomy, every species name
    is one of its lowest-rank taxa (``"Carex nigra"``, or ``"Philadelphus sp."`` where
    the model knows that genus only)."""
    paths = [Path(p) for p in photos]
    ids = dict(zip(plot_ids(paths), paths))
    no_photo = [p for p in truth if p not in ids]
    if no_photo:
        shown = ", ".join(sorted(ids)[:5]) + (", ..." if len(ids) > 5 else "")
        raise AnnotationError(
            f"{truth_file}: plot_id {no_photo[0]!r} has no photo"
            f"{f' (nor {len(no_photo) - 1} other plot(s))' if len(no_photo) > 1 else ''}. "
            f"Expected a photo whose file stem is the plot id (e.g. {no_photo[0]}.jpg) among "
            f"the {len(ids)} photo(s) given (plot ids: {shown}). Pass its photo, or remove "
            "the plot's rows from the truth file.")
    no_truth = [p for p in ids if p not in truth]
    if no_truth:
        raise AnnotationError(
            f"{ids[no_truth[0]]}: plot {no_truth[0]!r} has no row in {truth_file}"
            f"{f' (nor {len(no_truth) - 1} other photo(s))' if len(no_truth) > 1 else ''}. "
            "Expected a 'plot_id,species' row for every calibration photo (plot_id = the "
            f"photo's file stem; an empty species cell for a plot without species). Add "
            f"rows for {no_truth[0]!r}, or leave the photo out.")
    if taxonomy is None:
        return
    lowest = taxonomy.ranks[-1]
    names = set(taxonomy.names(lowest))
    for plot_id, species in truth.items():
        for name in species:
            if name in names:
                continue
            close = difflib.get_close_matches(name, sorted(names), n=3)
            hint = (f"Did you mean {', '.join(repr(c) for c in close)}?" if close
                    else f"e.g. {sorted(names)[0]!r}.")
            raise AnnotationError(
                f"{truth_file}: record plot_id={plot_id!r}, species={name!r}: this {lowest} "
                f"is not in the model's taxonomy {taxonomy!r}. Expected a {lowest} name the "
                f"model knows, spelled as in its taxonomy; {hint} Fix the name, or drop the "
                "row (a taxon the model cannot name cannot calibrate it).")


class _Tree:
    """Index maps for rank-aware scoring: class (r, c) -> its reported taxon at rank R."""

    def __init__(self, taxonomy: Any) -> None:
        self.taxonomy = taxonomy
        self.ranks = list(taxonomy.ranks)
        self.reported = {r: [taxonomy.reported(n) for n in taxonomy.nodes(r)] for r in self.ranks}
        self.up: dict[tuple[str, str], np.ndarray] = {}
        for i, r in enumerate(self.ranks):
            for j in range(i + 1):
                big, depth = self.ranks[j], j + 1
                self.up[(r, big)] = np.array(
                    [taxonomy.index(n[:depth]) if len(n) >= depth else -1
                     for n in self.reported[r]], dtype=np.int64)

    def truth(self, names: Sequence[str]) -> dict[str, tuple[np.ndarray, int, np.ndarray]]:
        """Per rank: true classes (bool), number of true taxa, and the learned rule's labels
        (a class whose reported taxon lies on a true path)."""
        paths = [_truth_path(str(n), self.taxonomy) for n in names]
        prefixes = {p[:k] for p in paths for k in range(1, len(p) + 1)}
        out = {}
        for j, rank in enumerate(self.ranks):
            depth = j + 1
            true_nodes = {p[:depth] for p in paths if len(p) >= depth}
            vec = np.zeros(self.taxonomy.n_classes(rank), dtype=bool)
            for node in true_nodes:
                try:
                    vec[self.taxonomy.index(node)] = True
                except TaxonomyError:
                    pass  # a taxon the model does not know: counted, never predicted
            labels = np.array([n in prefixes for n in self.reported[rank]], dtype=bool)
            out[rank] = (vec, len(true_nodes), labels)
        return out


# ---------------------------------------------------------------------- learned rule
def _known(plot: PlotTiles) -> np.ndarray:
    return ~np.asarray(plot.unknown, dtype=bool)


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
        ids = _calibration_ids(plots, truth)
        tree = _Tree(taxonomy)
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
        self.thresholds_, _ = _choose_settings(_Views(plots, self.ranks_), ids, tables, tree,
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


# ---------------------------------------------------------------------- threshold sweep
def _calibration_ids(plots: Mapping[str, PlotTiles], truth: Mapping[str, Sequence[str]]
                     ) -> list[str]:
    ids = [p for p in plots if p in truth]
    if not ids:
        raise ConfigError("No calibration plot has both tile predictions and a species list; "
                          "pass plot photos whose file stems are the truth file's plot ids.")
    return ids


class _Views:
    """Per plot and (top_k, min_tile_prob), each rank's probabilities of the tiles that
    :func:`~taxoclass.plots.rules.aggregate_plot` scores: not flagged, best lowest-rank
    probability at least ``min_tile_prob`` (when > 0), each keeping its ``top_k`` best."""

    def __init__(self, plots: Mapping[str, PlotTiles], ranks: Sequence[str]) -> None:
        self.plots = plots
        self.ranks = list(ranks)
        self._cache: dict[tuple, dict[str, np.ndarray]] = {}

    def get(self, plot_id: str, top_k: int | None, min_tile_prob: float
            ) -> dict[str, np.ndarray]:
        key = (plot_id, top_k, float(min_tile_prob))
        if key not in self._cache:
            tp = self.plots[plot_id]
            keep = _known(tp)
            if min_tile_prob > 0:
                keep = keep & (tp.probs[self.ranks[-1]].max(axis=1) >= min_tile_prob)
            out = {r: tp.probs[r][keep] for r in self.ranks}
            if top_k is not None:
                out = {r: keep_top_k(a, top_k) for r, a in out.items()}
            self._cache[key] = out
        return self._cache[key]


@dataclass
class _Evidence:
    """What :func:`~taxoclass.plots.rules.aggregate_plot` selects a class on, at one rank.

    ``score``: per class; ``n_first``: tiles supporting it at any threshold (arg-max
    tiles; with precomputed scores, tiles ranking it in their top few); ``rest``: the
    other tiles' probabilities of each class sorted high to low (``-inf`` where the tile
    is an arg-max one), which support it at a threshold ``t > 0`` they reach (None where
    thresholds add no support: ``argmax_union`` and precomputed scores).
    """

    score: np.ndarray
    n_first: np.ndarray
    rest: np.ndarray | None


def _evidence(a: np.ndarray, rank: str, lowest: str, rule: str,
              given: np.ndarray | None = None) -> _Evidence:
    """Evidence from one rank's scored tiles ``a`` (see :class:`_Views`)."""
    k = a.shape[1]
    if not len(a):
        return _Evidence(np.zeros(k), np.zeros(k, dtype=np.int64), None)
    if rule == LEARNED:
        return _Evidence(np.asarray(given, dtype=np.float64),
                         top_ranked(a, SUPPORT_TOP).sum(axis=0), None)
    rows = np.arange(len(a))
    best = a.argmax(axis=1)
    n_first = np.bincount(best, minlength=k)
    if rule == "argmax_union":
        if rank == lowest:
            score = np.zeros(k)
            np.maximum.at(score, best, a[rows, best])
        else:
            score = a.max(axis=0)
        return _Evidence(score, n_first, None)
    other = a.copy()
    other[rows, best] = -np.inf
    return _Evidence(rule_scores(a, rule), n_first, -np.sort(-other, axis=0))


def _selected(ev: _Evidence, thresholds: np.ndarray, min_tiles: int = 1) -> np.ndarray:
    """``[n_classes, n_thresholds]``: selected at each threshold (score over it and at
    least ``min_tiles`` supporting tiles)."""
    t = np.asarray(thresholds, dtype=np.float64)[None, :]
    ok = (ev.n_first >= min_tiles)[:, None]
    if ev.rest is not None:
        # tiles supporting at t > 0: arg-max tiles plus the others reaching t, so enough
        # of them where the (min_tiles - n_first)-th best other tile reaches t
        n = len(ev.rest)
        need = min_tiles - ev.n_first
        kth = np.where((need >= 1) & (need <= n),
                       ev.rest[np.clip(need - 1, 0, n - 1), np.arange(len(need))], -np.inf)
        ok = ok | ((t > 0) & (kth[:, None] >= t))
    return (ev.score[:, None] >= t) & ok


def _f1(pred: np.ndarray, true: np.ndarray, n_true: int) -> np.ndarray:
    tp = (pred & true[:, None]).sum(axis=0)
    denom = pred.sum(axis=0) + n_true
    return np.where(denom == 0, 1.0, 2.0 * tp / np.maximum(denom, 1))


def _pick(f1: np.ndarray) -> int:
    """The middle of the first run of thresholds reaching the best F1."""
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    end = 0
    while end + 1 < len(best) and best[end + 1] == best[end] + 1:
        end += 1
    return int(best[end // 2])


def _choose_settings(views: _Views, ids: Sequence[str], tables: dict, tree: _Tree, rule: str,
                     *, scores: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                     options: Sequence[TileSettings] | None = None,
                     candidates: np.ndarray = CANDIDATE_THRESHOLDS
                     ) -> tuple[dict[str, float], TileSettings]:
    """Thresholds per rank and tile settings maximising rank-aware macro F1 per plot.

    Bottom-up: at the lowest rank the threshold and the tile settings (``options``,
    default :func:`_tile_options`; ties go to the simplest) together, then at each higher
    rank its threshold with the tile settings and the lower ranks' thresholds fixed
    (their finds count at this rank too). ``scores``: plot id -> rank -> precomputed
    scores (the learned rule).
    """
    ranks = tree.ranks
    lowest = ranks[-1]
    options = list(options or _tile_options(rule))
    base = {p: {r: np.zeros(tree.taxonomy.n_classes(r), dtype=bool) for r in ranks} for p in ids}
    out: dict[str, float] = {}
    for i in range(len(ranks) - 1, -1, -1):
        rank = ranks[i]
        own = tree.up[(rank, rank)] >= 0
        evs: dict[tuple, dict[str, _Evidence]] = {}
        best: tuple[np.ndarray, TileSettings] | None = None
        for opt in options:
            key = (opt.top_k, opt.min_tile_prob)
            if key not in evs:
                evs[key] = {p: _evidence(views.get(p, *key)[rank], rank, lowest, rule,
                                         None if scores is None else scores[p][rank])
                            for p in ids}
            f1 = np.zeros(len(candidates))
            for p in ids:
                true, n_true, _ = tables[p][rank]
                sel = _selected(evs[key][p], candidates, opt.min_tiles)
                f1 += _f1(base[p][rank][:, None] | (sel & own[:, None]), true, n_true)
            if best is None or f1.max() > best[0].max() + 1e-12:
                best = (f1, opt)
        f1, tile = best
        options = [tile]
        j = _pick(f1)
        out[rank] = float(candidates[j])
        for p in ids:
            sel = _selected(evs[(tile.top_k, tile.min_tile_prob)][p], candidates[j:j + 1],
                            tile.min_tiles)[:, 0]
            for big in ranks[:i + 1]:
                up = tree.up[(rank, big)][sel]
                base[p][big][up[up >= 0]] = True
    return {r: out[r] for r in ranks}, options[0]


def _species_f1(plots: Mapping[str, PlotTiles], truth: Mapping[str, Sequence[str]],
                taxonomy: Any, rule: str, tile: TileSettings = TileSettings(), *,
                scores: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                candidates: np.ndarray = CANDIDATE_THRESHOLDS) -> np.ndarray:
    """Species macro F1 per plot of ``rule`` with ``tile`` at each candidate threshold,
    as the sweep computes it (for checks against :func:`aggregate_plot`)."""
    ids = _calibration_ids(plots, truth)
    tree = _Tree(taxonomy)
    lowest = tree.ranks[-1]
    own = tree.up[(lowest, lowest)] >= 0
    views = _Views(plots, tree.ranks)
    f1 = np.zeros(len(candidates))
    for p in ids:
        true, n_true, _ = tree.truth(truth[p])[lowest]
        ev = _evidence(views.get(p, tile.top_k, tile.min_tile_prob)[lowest], lowest, lowest,
                       rule, None if scores is None else scores[p][lowest])
        f1 += _f1(_selected(ev, candidates, tile.min_tiles) & own[:, None], true, n_true)
    return f1 / len(ids)


# ---------------------------------------------------------------------- records & settings
def plot_records(plots: Mapping[str, PlotTiles], taxonomy: Any, *, rule: str,
                 thresholds: Mapping[str, float] | None = None,
                 learned: LearnedPlotRule | None = None,
                 tiles: TileSettings | Mapping[str, Any] | None = None,
                 scores: Mapping[str, Mapping[str, np.ndarray]] | None = None
                 ) -> dict[str, list[PlotRecord]]:
    """Records of every plot with :func:`~taxoclass.plots.rules.aggregate_plot` (the learned
    rule's scores passed in when ``rule == "learned"``: ``scores``, plot id -> rank ->
    scores, e.g. :attr:`LearnedPlotRule.oof_scores_`, else those of ``learned``).
    ``tiles``: the tile settings (:class:`TileSettings` or its dict)."""
    if rule == LEARNED and learned is None and scores is None:
        raise ConfigError("rule 'learned' needs a fitted LearnedPlotRule (learned=...).")
    tile = tiles if isinstance(tiles, TileSettings) else TileSettings.from_dict(tiles)
    out = {}
    for plot_id, tp in plots.items():
        given = None
        if rule == LEARNED:
            given = (scores[plot_id] if scores is not None
                     else learned.scores(tp.probs, tp.scales, tp.unknown))
        out[plot_id] = aggregate_plot(tp.probs, taxonomy, plot_id=plot_id, rule=rule,
                                      thresholds=thresholds, unknown=tp.unknown, scores=given,
                                      top_k=tile.top_k, min_tile_prob=tile.min_tile_prob,
                                      min_tiles=tile.min_tiles)
    return out


@dataclass
class PlotSettings:
    """Plot-report settings chosen on calibration plots (``plot_settings.json``).

    ``rule``: the chosen rule; ``calibration``: one row per rule compared, with its
    thresholds, tile settings (``tiles``, :class:`TileSettings`), calibration macro F1
    per plot at every rank and how that F1 was measured (``evaluation``: ``"in-sample"``,
    or ``"out-of-fold (k=5)"`` for the learned rule); ``chosen`` marks the winner.
    ``learned``: the fitted learned rule (always kept); ``source``: the file it was read
    from, if any. Files written before tile settings and ``evaluation`` were recorded
    read as the defaults and ``"in-sample"``.
    """

    rule: str
    grids: list[str]
    overlap: float
    calibration: list[dict[str, Any]]
    learned: LearnedPlotRule | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def thresholds_for(self, rule: str) -> dict[str, float] | None:
        """The calibrated thresholds of ``rule`` (None if it was not calibrated)."""
        for row in self.calibration:
            if row["rule"] == rule:
                return dict(row["thresholds"])
        return None

    def tiles_for(self, rule: str) -> TileSettings | None:
        """The calibrated tile settings of ``rule`` (None if it was not calibrated)."""
        for row in self.calibration:
            if row["rule"] == rule:
                return TileSettings.from_dict(row.get("tiles"))
        return None

    @property
    def thresholds(self) -> dict[str, float]:
        return self.thresholds_for(self.rule) or {}

    @property
    def tiles(self) -> TileSettings:
        return self.tiles_for(self.rule) or TileSettings()

    def table(self) -> pd.DataFrame:
        """The per-rule calibration table: F1 per rank, how it was measured, thresholds
        per rank, tile settings, chosen."""
        rows = []
        for row in self.calibration:
            flat: dict[str, Any] = {"rule": row["rule"]}
            ranks = list(row["macro_f1_per_plot"])[::-1]  # lowest rank first
            flat.update({f"{r}_f1": row["macro_f1_per_plot"][r] for r in ranks})
            flat["evaluation"] = row.get("evaluation", "in-sample")
            flat.update({f"{r}_threshold": row["thresholds"][r] for r in ranks})
            flat.update(TileSettings.from_dict(row.get("tiles")).to_dict())
            flat["chosen"] = bool(row["rule"] == self.rule)
            rows.append(flat)
        table = pd.DataFrame(rows)
        if len(table):
            table["top_k"] = table["top_k"].astype("Int64")  # None: every class
        return table

    def to_dict(self) -> dict[str, Any]:
        return {"format": SETTINGS_FORMAT, "format_version": FORMAT_VERSION,
                "rule": self.rule, "thresholds": self.thresholds,
                "tiles": self.tiles.to_dict(), "grids": list(self.grids),
                "overlap": float(self.overlap),
                "calibration": [{**row, "chosen": row["rule"] == self.rule}
                                for row in self.calibration],
                "learned": self.learned.to_dict() if self.learned is not None else None,
                "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: Path | None = None) -> PlotSettings:
        where = str(source) if source else "plot settings"
        errors = sorted(_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
        if errors:
            e = errors[0]
            path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                 for p in e.absolute_path)
            raise ConfigError(f"{where}: {path}: {e.message}. Expected a plot_settings.json "
                              "written by `taxoclass calibrate-plots` (schema "
                              f"{SCHEMA_NAME}); re-run it.")
        learned = LearnedPlotRule.from_dict(data["learned"]) if data.get("learned") else None
        rows = [{"evaluation": "in-sample", **{k: v for k, v in row.items() if k != "chosen"}}
                for row in data["calibration"]]
        for row in rows:  # files from before tile settings: the defaults
            row["tiles"] = TileSettings.from_dict(row.get("tiles")).to_dict()
        return cls(rule=data["rule"], grids=list(data["grids"]), overlap=float(data["overlap"]),
                   calibration=rows, learned=learned, provenance=dict(data.get("provenance", {})),
                   source=source)

    def save(self, path: str | Path) -> Path:
        """Write ``plot_settings.json`` (``path`` is the file, or a folder to hold it)."""
        path = Path(path)
        if path.suffix.lower() != ".json":
            path = path / SETTINGS_FILE
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PlotSettings:
        """Read and validate ``plot_settings.json`` (a file, or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / SETTINGS_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: no such settings file. Expected the plot_settings.json "
                              "written by `taxoclass calibrate-plots --out DIR`.")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}). Expected a plot_settings.json "
                              "written by `taxoclass calibrate-plots`.") from exc
        return cls.from_dict(data, source=path)


def _validator():
    import jsonschema

    from ..io.schemas import load_schema

    return jsonschema.Draft202012Validator(load_schema(SCHEMA_NAME))


def calibrate_rules(plots: Mapping[str, PlotTiles], truth: Mapping[str, Sequence[str]],
                    taxonomy: Any, *, grids: Sequence[Any], overlap: float = 0.0,
                    C: float = 1.0, folds: int = OOF_FOLDS, seed: int = 0,
                    provenance: Mapping[str, Any] | None = None) -> PlotSettings:
    """Compare every rule on calibration plots with known species lists; keep the best.

    Hand-set rules get their species threshold and tile settings together, then the
    genus and family thresholds (bottom-up), and are scored in-sample; the learned rule
    is fitted and scored out-of-fold (``folds`` folds shuffled with ``seed``; see
    :meth:`LearnedPlotRule.fit`). The rule with the best species macro F1 per plot is
    chosen.
    """
    ids = _calibration_ids(plots, truth)
    plots = {p: plots[p] for p in ids}
    truth = {p: list(truth[p]) for p in ids}
    tree = _Tree(taxonomy)
    tables = {p: tree.truth(truth[p]) for p in ids}
    views = _Views(plots, tree.ranks)
    learned = LearnedPlotRule(grids, C=C).fit(plots, truth, taxonomy, folds=folds, seed=seed)
    rows = []
    for rule in RULE_ORDER:
        if rule == LEARNED:
            th, tile, evaluation = learned.thresholds_, TileSettings(), learned.evaluation_
        else:
            th, tile = _choose_settings(views, ids, tables, tree, rule)
            evaluation = "in-sample"
        ev = evaluate_plots(plot_records(plots, taxonomy, rule=rule, thresholds=th,
                                         learned=learned, tiles=tile,
                                         scores=learned.oof_scores_ if rule == LEARNED
                                         else None), truth, taxonomy)
        rows.append({"rule": rule, "thresholds": dict(th), "tiles": tile.to_dict(),
                     "macro_f1_per_plot": {r: float(ev[r]["macro_f1_per_plot"])
                                           for r in taxonomy.ranks},
                     "evaluation": evaluation})
    lowest = taxonomy.ranks[-1]
    best = max(row["macro_f1_per_plot"][lowest] for row in rows)
    chosen = next(row["rule"] for row in rows
                  if row["macro_f1_per_plot"][lowest] >= best - 1e-9)
    prov = {"taxoclass_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": None, "backbone": "unknown", **dict(provenance or {}),
            "n_calibration_plots": len(ids)}
    return PlotSettings(rule=chosen, grids=[grid_label(g) for g in grids], overlap=float(overlap),
                        calibration=rows, learned=learned, provenance=prov)


@dataclass
class CalibrationResult:
    """What :func:`calibrate_plots` did: the settings, unreadable photos, tile predictions
    (and, from :func:`~taxoclass.pipelines.jobs.calibrate_plots_job`, the files written)."""

    settings: PlotSettings
    failures: list[dict[str, str]]
    predictions: PlotPredictions = field(repr=False)
    files: dict[str, Path] = field(default_factory=dict)


def calibrate_plots(classifier: Any, photos: Sequence[str | Path],
                    truth: Mapping[str, Sequence[str]], *, grids: Sequence[Any] = DEFAULT_GRIDS,
                    overlap: float = 0.0,
                    flag_unknown: Callable[[Any], np.ndarray] | None = None,
                    progress: Progress | None = None, C: float = 1.0,
                    folds: int = OOF_FOLDS, seed: int = 0,
                    model: str | Path | None = None,
                    truth_file: str | Path | None = None) -> CalibrationResult:
    """Plot settings from calibration photos whose species lists are known.

    ``truth``: plot id (photo file stem) -> species names (e.g.
    :func:`~taxoclass.pipelines.jobs.read_plot_truth`); every photo needs one and every
    name must be in the classifier's taxonomy (:func:`check_plot_truth`). Photos that
    cannot be read are reported in ``failures`` and left out. ``model``/``truth_file``
    are recorded in the provenance; ``C``, ``folds``, ``seed``: see :func:`calibrate_rules`.
    """
    if not 0.0 <= float(overlap) < 1.0:
        raise ConfigError(f"Tile overlap must be a fraction in [0, 1), got {overlap}.")
    grid_labels = [grid_label(g) for g in grids]
    if not grid_labels:
        raise ConfigError("calibrate_plots needs at least one grid (e.g. grids=(4,)).")
    taxonomy = classifier.taxonomy
    check_plot_truth(truth, photos, taxonomy, truth_file=str(truth_file or "the truth table"))
    preds = predict_plots(classifier, photos, grids=grid_labels, overlap=overlap,
                          flag_unknown=flag_unknown, progress=progress)
    if not preds.plots:
        raise ImageError(f"None of the {len(preds.failures)} calibration photo(s) could be read "
                         f"(first: {preds.failures[0]['photo']}: {preds.failures[0]['error']}).")
    from ..io.provenance import command_line

    describe = classifier.describe()
    provenance = {
        "command": command_line(), "model": str(model) if model is not None else None,
        "classifier": str(describe.get("kind", type(classifier).__name__)),
        "backbone": backbone_name(classifier), "truth": str(truth_file) if truth_file else None,
        "n_failures": len(preds.failures), "flag_unknown": flag_unknown is not None}
    settings = calibrate_rules(preds.plots, truth, taxonomy, grids=grid_labels, overlap=overlap,
                               C=C, folds=folds, seed=seed, provenance=provenance)
    return CalibrationResult(settings, preds.failures, preds)


# ---------------------------------------------------------------------- report settings
@dataclass
class ReportSettings:
    """The settings a plot report runs with, after a settings file and explicit options.

    ``top_k``/``min_tile_prob``/``min_tiles``: the tile settings for
    :func:`~taxoclass.plots.rules.aggregate_plot`; ``source``: the settings file (None without
    one); ``overridden``: options given explicitly that replaced the file's values.
    """

    rule: str
    thresholds: dict[str, float] | None
    grids: list[str]
    overlap: float
    learned: LearnedPlotRule | None = None
    source: str | None = None
    overridden: list[str] = field(default_factory=list)
    top_k: int | None = None
    min_tile_prob: float = 0.0
    min_tiles: int = 1


def resolve_report_settings(settings: PlotSettings | str | Path | None = None, *,
                            grids: Sequence[Any] | None = None, overlap: float | None = None,
                            rule: str | None = None,
                            thresholds: Mapping[str, float] | None = None,
                            top_k: int | None = None, min_tile_prob: float | None = None,
                            min_tiles: int | None = None) -> ReportSettings:
    """Grids, overlap, rule, thresholds and tile settings from ``settings`` (a
    :class:`PlotSettings` or its file), each replaced by the explicit value when one is
    given (thresholds rank by rank; ``top_k=0``: every class, over the file's value).
    The thresholds and tile settings are those calibrated for the rule used. Without
    settings: the plot-report defaults (3x3, no overlap, ``max``, no ``top_k``, no tile
    gate, one supporting tile). The ``learned`` rule needs settings that hold its
    parameters and its grids."""
    if settings is not None and not isinstance(settings, PlotSettings):
        settings = PlotSettings.load(settings)
    if rule is not None and rule not in RULES and rule != LEARNED:
        raise ConfigError(f"Unknown aggregation rule {rule!r}; expected one of "
                          f"{(*RULES, LEARNED)}.")
    if top_k is not None and int(top_k) < 0:
        raise ConfigError(f"top_k must be at least 1, or 0 for every class; got {top_k}.")
    given = [k for k, v in (("grids", grids), ("overlap", overlap), ("rule", rule),
                            ("thresholds", thresholds), ("top_k", top_k),
                            ("min_tile_prob", min_tile_prob), ("min_tiles", min_tiles))
             if v is not None and v != () and v != {}]
    base = TileSettings() if settings is None else \
        (settings.tiles_for(rule or settings.rule) or TileSettings())
    tile = TileSettings(
        top_k=base.top_k if top_k is None else (int(top_k) or None),
        min_tile_prob=base.min_tile_prob if min_tile_prob is None else float(min_tile_prob),
        min_tiles=base.min_tiles if min_tiles is None else int(min_tiles))
    tile_kw = {"top_k": tile.top_k, "min_tile_prob": float(tile.min_tile_prob),
               "min_tiles": int(tile.min_tiles)}
    if settings is None:
        if rule == LEARNED:
            raise ConfigError("Rule 'learned' needs its fitted parameters: pass the "
                              "plot_settings.json written by `taxoclass calibrate-plots` "
                              "(--settings), or choose another rule.")
        return ReportSettings(rule=rule or "max",
                              thresholds=dict(thresholds) if thresholds else None,
                              grids=[grid_label(g) for g in (grids or (3,))],
                              overlap=float(overlap or 0.0), **tile_kw)
    chosen = rule or settings.rule
    th = dict(settings.thresholds_for(chosen) or {})
    th.update({str(k): float(v) for k, v in (thresholds or {}).items()})
    grid_labels = [grid_label(g) for g in grids] if grids else list(settings.grids)
    learned = None
    if chosen == LEARNED:
        learned = settings.learned
        where = settings.source or "the settings"
        if learned is None:
            raise ConfigError(f"{where} holds no learned-rule parameters, so rule 'learned' "
                              "cannot run; re-run `taxoclass calibrate-plots`, or choose "
                              "another rule.")
        if sorted(grid_labels) != sorted(learned.grids):
            raise ConfigError(f"The learned rule in {where} was fitted on the grids "
                              f"{list(learned.grids)}; --grid {grid_labels} cannot be used with "
                              "it. Drop --grid, or choose another rule.")
    return ReportSettings(rule=chosen, thresholds=th or None, grids=grid_labels,
                          overlap=float(settings.overlap if overlap is None else overlap),
                          learned=learned,
                          source=str(settings.source) if settings.source else "(in memory)",
                          overridden=given, **tile_kw)
