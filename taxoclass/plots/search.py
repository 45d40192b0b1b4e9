"""Threshold and tile-setting search on plots whose species are known (vectorised).

For a rule, :func:`choose_settings` sweeps every candidate threshold at once with the
selection of :mod:`taxoclass.plots.selection` (the one that
:func:`~taxoclass.plots.rules.aggregate_plot` applies plot by plot): bottom-up, the lowest
rank's threshold with the tile settings (:class:`~taxoclass.plots.selection.TileSettings`),
then each higher rank's threshold with the lower ranks fixed, maximising rank-aware macro
F1 per plot. :func:`species_f1` gives the species F1 curve of one setting (the synthetic-
plot benchmark searches its own grid with it). Tiles may be weighted per grid scale
(``scale_weights``, as ``plot_report(scale_weights=...)``); flagged tiles give no evidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, TaxonomyError
from ..vocab import Rule
from .evaluation import truth_path
from .selection import LEARNED, Evidence, TileSettings, keep_top_k, rank_evidence
from .tiling import PlotTiles

__all__ = [
    "CANDIDATE_THRESHOLDS",
    "TILE_RULES",
    "TILE_SEARCH",
    "TileViews",
    "TruthIndex",
    "calibration_ids",
    "choose_settings",
    "species_f1",
    "tile_options",
]

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
TILE_RULES: tuple[str, ...] = (Rule.NOISY_OR.value, Rule.MEAN.value)

Scores = Mapping[str, Mapping[str, np.ndarray]]


def tile_options(rule: str) -> list[TileSettings]:
    """The tile settings searched for ``rule`` (the defaults only for the learned rule),
    simplest first."""
    if rule == LEARNED:
        return [TileSettings()]
    tiles = rule in TILE_RULES
    opts = [TileSettings(k, p, m) for m in TILE_SEARCH["min_tiles"]
            for k in (TILE_SEARCH["top_k"] if tiles else (None,))
            for p in (TILE_SEARCH["min_tile_prob"] if tiles else (0.0,))]
    return sorted(opts, key=lambda o: o.n_set)


def calibration_ids(plots: Mapping[str, PlotTiles], truth: Mapping[str, Sequence[str]]
                    ) -> list[str]:
    """The plots with both tile predictions and a species list, in the plots' order."""
    ids = [p for p in plots if p in truth]
    if not ids:
        raise ConfigError("No calibration plot has both tile predictions and a species list; "
                          "pass plot photos whose file stems are the truth file's plot ids.")
    return ids


class TruthIndex:
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
        paths = [truth_path(str(n), self.taxonomy) for n in names]
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


class TileViews:
    """Per plot and (top_k, min_tile_prob), each rank's probabilities and the weights of
    the tiles that :func:`~taxoclass.plots.rules.aggregate_plot` scores: not flagged, of
    non-zero weight (``scale_weights``: grid label -> weight, others 1), best lowest-rank
    probability at least ``min_tile_prob`` (when > 0), each keeping its ``top_k`` best."""

    def __init__(self, plots: Mapping[str, PlotTiles], ranks: Sequence[str],
                 scale_weights: Mapping[str, float] | None = None) -> None:
        self.plots = plots
        self.ranks = list(ranks)
        self.scale_weights = dict(scale_weights or {})
        self._cache: dict[tuple, tuple[dict[str, np.ndarray], np.ndarray]] = {}

    def get(self, plot_id: str, top_k: int | None, min_tile_prob: float
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        key = (plot_id, top_k, float(min_tile_prob))
        if key not in self._cache:
            tp = self.plots[plot_id]
            w = np.array([self.scale_weights.get(str(s), 1.0) for s in tp.scales],
                         dtype=np.float64)
            keep = ~np.asarray(tp.unknown, dtype=bool) & (w > 0)
            if min_tile_prob > 0:
                keep = keep & (tp.probs[self.ranks[-1]].max(axis=1) >= min_tile_prob)
            out = {r: tp.probs[r][keep] for r in self.ranks}
            if top_k is not None:
                out = {r: keep_top_k(a, top_k) for r, a in out.items()}
            self._cache[key] = (out, w[keep])
        return self._cache[key]

    def evidence(self, plot_id: str, rank: str, rule: str, tile: TileSettings,
                 given: np.ndarray | None = None) -> Evidence:
        """:func:`~taxoclass.plots.selection.rank_evidence` of one plot at one rank."""
        probs, w = self.get(plot_id, tile.top_k, tile.min_tile_prob)
        weights = None if not self.scale_weights else w
        return rank_evidence(probs[rank], rule, lowest=rank == self.ranks[-1],
                             weights=weights, given=given)


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


def choose_settings(views: TileViews, ids: Sequence[str], tables: dict, tree: TruthIndex,
                    rule: str, *, scores: Scores | None = None,
                    options: Sequence[TileSettings] | None = None,
                    candidates: np.ndarray = CANDIDATE_THRESHOLDS
                    ) -> tuple[dict[str, float], TileSettings]:
    """Thresholds per rank and tile settings maximising rank-aware macro F1 per plot.

    Bottom-up: at the lowest rank the threshold and the tile settings (``options``,
    default :func:`tile_options`; ties go to the simplest) together, then at each higher
    rank its threshold with the tile settings and the lower ranks' thresholds fixed
    (their finds count at this rank too). ``tables``: plot id -> :meth:`TruthIndex.truth`;
    ``scores``: plot id -> rank -> precomputed scores (the learned rule).
    """
    ranks = tree.ranks
    options = list(options or tile_options(rule))
    base = {p: {r: np.zeros(tree.taxonomy.n_classes(r), dtype=bool) for r in ranks} for p in ids}
    out: dict[str, float] = {}
    for i in range(len(ranks) - 1, -1, -1):
        rank = ranks[i]
        own = tree.up[(rank, rank)] >= 0
        evs: dict[tuple, dict[str, Evidence]] = {}
        best: tuple[np.ndarray, TileSettings] | None = None
        for opt in options:
            key = (opt.top_k, opt.min_tile_prob)
            if key not in evs:
                evs[key] = {p: views.evidence(p, rank, rule, opt,
                                              None if scores is None else scores[p][rank])
                            for p in ids}
            f1 = np.zeros(len(candidates))
            for p in ids:
                true, n_true, _ = tables[p][rank]
                sel = evs[key][p].selected(candidates, opt.min_tiles)
                f1 += _f1(base[p][rank][:, None] | (sel & own[:, None]), true, n_true)
            if best is None or f1.max() > best[0].max() + 1e-12:
                best = (f1, opt)
        f1, tile = best
        options = [tile]
        j = _pick(f1)
        out[rank] = float(candidates[j])
        for p in ids:
            sel = evs[(tile.top_k, tile.min_tile_prob)][p].selected(candidates[j:j + 1],
                                                                     tile.min_tiles)[:, 0]
            for big in ranks[:i + 1]:
                up = tree.up[(rank, big)][sel]
                base[p][big][up[up >= 0]] = True
    return {r: out[r] for r in ranks}, options[0]


def species_f1(plots: Mapping[str, PlotTiles], truth: Mapping[str, Sequence[str]],
               taxonomy: Any, rule: str, tile: TileSettings | None = None, *,
               min_tiles: Sequence[int] | None = None,
               scale_weights: Mapping[str, float] | None = None,
               scores: Scores | None = None,
               candidates: np.ndarray = CANDIDATE_THRESHOLDS) -> np.ndarray:
    """Species macro F1 per plot of ``rule`` at each candidate threshold:
    ``[len(min_tiles), len(candidates)]`` (``min_tiles`` default ``(tile.min_tiles,)``),
    with ``tile``'s ``top_k`` and ``min_tile_prob`` (default :class:`TileSettings`()),
    tiles weighted by ``scale_weights``.
    The same figures as :func:`~taxoclass.plots.rules.aggregate_plot` and
    :func:`~taxoclass.plots.evaluation.evaluate_plots` give at each setting."""
    tile = tile or TileSettings()
    ids = calibration_ids(plots, truth)
    tree = TruthIndex(taxonomy)
    lowest = tree.ranks[-1]
    own = tree.up[(lowest, lowest)] >= 0
    views = TileViews(plots, tree.ranks, scale_weights)
    counts = list(min_tiles) if min_tiles is not None else [tile.min_tiles]
    f1 = np.zeros((len(counts), len(candidates)))
    for p in ids:
        true, n_true, _ = tree.truth(truth[p])[lowest]
        ev = views.evidence(p, lowest, rule, tile, None if scores is None else scores[p][lowest])
        for i, m in enumerate(counts):
            f1[i] += _f1(ev.selected(candidates, m) & own[:, None], true, n_true)
    return f1 / len(ids)
