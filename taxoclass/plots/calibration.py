"""Plot-level calibration: aggregation settings chosen on plots whose species are known.

A user with some plot photos and their species lists runs :func:`calibrate_plots`.
Every photo is tiled and classified once (:func:`predict_plots`), then

- each hand-set rule (``argmax_union``, ``max``, ``noisy_or``, ``mean``) gets the species
  threshold and tile settings (:class:`~taxoclass.plots.selection.TileSettings`:
  ``min_tiles`` for every rule, ``top_k`` and ``min_tile_prob`` too for ``noisy_or`` and
  ``mean``; :data:`~taxoclass.plots.search.TILE_SEARCH`) that together maximise species
  macro F1 per plot, then each higher rank's threshold bottom-up (rank-aware F1 at that
  rank, the lower ranks' thresholds and the tile settings fixed; any rank list: "species"
  here is the model's lowest rank, "genus" the next one up). These rules are
  scored *in-sample*, on the plots they were tuned on: one threshold per rank and at most
  three settings from a grid of 27, so their optimism is small next to a fitted model's;
- a :class:`~taxoclass.plots.learned.LearnedPlotRule` (one logistic regression per rank
  on per-taxon statistics of the plot's tiles: five weights per grid scale and an
  intercept) is scored *out-of-fold*: the plots are split into k seeded folds (k = min(5,
  plots)), each fold is scored by regressions fitted on the others, its presence
  thresholds are chosen on the pooled out-of-fold scores, and its calibration F1 is that
  of those scores; the model kept for use is then refitted on every plot. (With fewer
  than 5 plots k is smaller, and with one there is nothing to hold out; the table says
  so.)
- the rule with the best calibration species F1 is chosen (ties: the simpler rule, in
  the order of :data:`RULE_ORDER`). The table's ``evaluation`` column says how each F1
  was measured.

The result, :class:`~taxoclass.plots.settings.PlotSettings`, is saved as
``plot_settings.json`` (``data_schemas/plot_settings.schema.json``; plain JSON, no pickle)
and read back by ``taxoclass plot-report --settings``
(:func:`~taxoclass.plots.settings.resolve_report_settings`): rule, thresholds
and tile settings. The learned rule's parameters are always kept, chosen or not, so
``--rule learned`` can pick it later.

Thresholds and tile settings are swept in numpy (:mod:`taxoclass.plots.search`) with the
selection :func:`~taxoclass.plots.rules.aggregate_plot` applies
(:mod:`taxoclass.plots.selection`: flagged tiles and tiles under ``min_tile_prob`` left
out, ``top_k`` per tile, ``min_tiles`` supporting tiles; no tile weights); the F1
figures in the calibration table come from ``aggregate_plot`` and
:func:`~taxoclass.plots.evaluation.evaluate_plots` themselves.
"""

from __future__ import annotations

import datetime as _dt
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import AnnotationError, ConfigError, ImageError
from ..vocab import UNKNOWN, Rule
from .evaluation import evaluate_plots
from .learned import OOF_FOLDS, LearnedPlotRule
from .rules import PlotRecord, aggregate_plot
from .search import TileViews, TruthIndex, calibration_ids, choose_settings
from .selection import LEARNED, TileSettings
from .settings import PlotSettings
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
    "RULE_ORDER",
    "CalibrationResult",
    "PlotPredictions",
    "calibrate_plots",
    "calibrate_rules",
    "check_plot_truth",
    "plot_records",
    "predict_plots",
]

Progress = Callable[[int, int], None]

#: Simplest first: a tie in calibration species F1 goes to the earlier rule.
RULE_ORDER: tuple[str, ...] = tuple(r.value for r in (Rule.ARGMAX_UNION, Rule.MAX, Rule.MEAN,
                                                       Rule.NOISY_OR, Rule.LEARNED))


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
    is one of its taxa: at the lowest rank (``"Carex nigra"``, or ``"Philadelphus sp."``
    where the model knows that genus only) or, for a find known only to a higher rank,
    at that rank (``"Scaridae"``, ``"Carex"`` or ``"Carex sp."``)."""
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
    higher = {n for r in taxonomy.ranks[:-1] for n in taxonomy.names(r)}
    for plot_id, species in truth.items():
        for name in species:
            if name in names or name.removesuffix(" sp.").strip() in higher:
                continue
            close = difflib.get_close_matches(name, sorted(names), n=3)
            hint = (f"Did you mean {', '.join(repr(c) for c in close)}?" if close
                    else f"e.g. {sorted(names)[0]!r}.")
            raise AnnotationError(
                f"{truth_file}: record plot_id={plot_id!r}, species={name!r}: this {lowest} "
                f"is not in the model's taxonomy {taxonomy!r}. Expected a {lowest} name the "
                f"model knows, spelled as in its taxonomy; {hint} Fix the name, or drop the "
                "row (a taxon the model cannot name cannot calibrate it).")


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
    ids = calibration_ids(plots, truth)
    plots = {p: plots[p] for p in ids}
    truth = {p: list(truth[p]) for p in ids}
    tree = TruthIndex(taxonomy)
    tables = {p: tree.truth(truth[p]) for p in ids}
    views = TileViews(plots, tree.ranks)
    learned = LearnedPlotRule(grids, C=C).fit(plots, truth, taxonomy, folds=folds, seed=seed)
    rows = []
    for rule in RULE_ORDER:
        if rule == LEARNED:
            th, tile, evaluation = learned.thresholds_, TileSettings(), learned.evaluation_
        else:
            th, tile = choose_settings(views, ids, tables, tree, rule)
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
            "model": None, "backbone": UNKNOWN, **dict(provenance or {}),
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
                         f"(first: {preds.failures[0]['photo']}: {preds.failures[0]['error']}). "
                         "Fix: pass readable plot photos (JPEG/PNG) or a coarser --grid.")
    from ..io.provenance import command_line, model_id_for

    describe = classifier.describe()
    provenance = {
        "command": command_line(), "model": str(model) if model is not None else None,
        "model_id": model_id_for(classifier),
        "classifier": str(describe.get("kind", type(classifier).__name__)),
        "backbone": backbone_name(classifier), "truth": str(truth_file) if truth_file else None,
        "n_failures": len(preds.failures), "flag_unknown": flag_unknown is not None}
    settings = calibrate_rules(preds.plots, truth, taxonomy, grids=grid_labels, overlap=overlap,
                               C=C, folds=folds, seed=seed, provenance=provenance)
    return CalibrationResult(settings, preds.failures, preds)
