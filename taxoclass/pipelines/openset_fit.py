"""Fitting a bundle's open-set scorer: on a validation split, or out of fold (crossfit).

Lives in pipelines because it trains heads and builds :class:`~taxoclass.bundle.ModelBundle`
objects (the bundle layer sits above openset); the scorer itself is
:class:`~taxoclass.openset.scorer.OpenSetScorer`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import OpensetConfig, complete_config, openset_calibration
from ..taxonomy.tree import Taxonomy
from ..vocab import Calibration
from .data import with_views

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..bundle import ModelBundle
    from ..openset.scorer import OpenSetScorer
    from ..openset.selection import Selection

Progress = Callable[[int, int], None]
#: (embeddings, annotation rows) of known images the final head did not train on
HeldOut = tuple[np.ndarray, "pd.DataFrame"]
log = logging.getLogger(__name__)


def fit_confidence_on(decoded: Any, y: Mapping[str, np.ndarray], taxonomy: Taxonomy,
                      source: str):
    """The per-rank calibration of ``confidence``
    (:func:`~taxoclass.model.confidence.fit_confidence`) on held-out predictions
    ``decoded`` (validation split or out of fold) with class indices ``y`` (-1: no label
    at that rank); None, with a warning, when no held-out image is labelled."""
    from ..model.confidence import fit_confidence

    labelled = {r: np.asarray(y[r]) >= 0 for r in taxonomy.ranks}
    if not any(m.any() for m in labelled.values()):
        log.warning("no held-out image to calibrate 'confidence' on: predictions will report "
                    "the uncalibrated path probability.")
        return None
    correct = {r: np.asarray(decoded.path[r]) == np.asarray(y[r]) for r in taxonomy.ranks}
    return fit_confidence(decoded.path_prob, correct, labelled, source=source)


def _openset_detector(x_train: np.ndarray, group_train: np.ndarray,
                      species_train: np.ndarray | None, ocfg: Mapping[str, Any] | None):
    """The configured outlier detector on at most ``openset.max_train`` rows (seeded).

    Its reference set is the rows labelled at the lowest rank (``species_train >= 0``; a
    family-only image is no known species' example), unless fewer than two are.
    """
    from ..openset.scorer import fit_detector

    oc = OpensetConfig.from_dict(ocfg)
    if species_train is not None:
        known = np.asarray(species_train) >= 0
        if 2 <= known.sum() < len(known):
            x_train, group_train = x_train[known], np.asarray(group_train)[known]
            species_train = np.asarray(species_train)[known]
    max_train = int(oc.max_train)
    if len(x_train) > max_train:
        keep = np.sort(np.random.default_rng(0).choice(len(x_train), max_train, replace=False))
        x_train, group_train = x_train[keep], group_train[keep]
        species_train = None if species_train is None else species_train[keep]
    return fit_detector(x_train, group_train, labels_train=species_train, **oc.detector_args())


def _openset_evidence(decoded: Any, z: np.ndarray, correct: Mapping[str, np.ndarray],
                      ocfg: Mapping[str, Any] | None,
                      labelled: Mapping[str, np.ndarray] | None = None):
    """The configured evidence combiner and thresholds (:func:`openset.fit_evidence`),
    each rank calibrated on the rows labelled there (``labelled``)."""
    from ..openset.scorer import fit_evidence

    return fit_evidence(decoded, z, correct, labelled=labelled,
                        **OpensetConfig.from_dict(ocfg).evidence_args())


def fit_openset_scorer(bundle: ModelBundle, x_train: np.ndarray, group_train: np.ndarray,
                       x_val: np.ndarray, rows_val: pd.DataFrame,
                       ocfg: Mapping[str, Any] | None, *,
                       species_train: np.ndarray | None = None) -> OpenSetScorer:
    """Fit the outlier detector on training embeddings, and the evidence combiner and the
    per-rank thresholds (to ``ocfg["target_precision"]``) on the validation images.

    The validation split also chose the early-stopping epoch, so thresholds are slightly
    optimistic; with few validation images per rank a target may be unreachable (the
    rank is then never trusted: threshold +inf, listed in ``thresholds.unreachable``).
    ``openset.calibration: crossfit`` calibrates on every image instead
    (:func:`crossfit_openset`).
    """
    from ..openset.evaluation import correct_by_rank, labelled_by_rank, path_names, truth_names
    from ..openset.scorer import OpenSetScorer, group_rank_of

    tax = bundle.taxonomy
    det = _openset_detector(bundle.scorer_input(x_train), group_train, species_train, ocfg)
    decoded_val = bundle.predict_embeddings(x_val)
    truth = truth_names(rows_val, tax.ranks)
    correct = correct_by_rank(path_names(decoded_val.path, tax), truth, tax.ranks)
    group = group_rank_of(tax.ranks)
    groups = decoded_val.path[group] if det.scope == "group" else None
    z = det.decision_function(bundle.scorer_input(x_val), groups)
    comb, thr = _openset_evidence(decoded_val, z, correct, ocfg,
                                  labelled_by_rank(truth, tax.ranks))
    return OpenSetScorer(detector=det, combiner=comb, thresholds=thr, group_rank=group)


@dataclass
class CrossfitOpenset:
    """A head trained on every row and an open-set scorer calibrated out of fold."""

    train: Any                 # training.TrainResult of the final head (all rows)
    scorer: Any                # openset.OpenSetScorer: detector on all rows, thresholds OOF
    oof: Any                   # openset.CrossfitPredictions the thresholds rest on
    correct: dict[str, Any]    # rank -> the out-of-fold path is right there
    info: dict[str, Any]       # what to record: calibration, folds, seed, rows


def crossfit_openset(x: np.ndarray, y: dict[str, np.ndarray], taxonomy: Taxonomy,
                     truth: dict[str, Any], cfg: Mapping[str, Any], *, seed: int = 0,
                     views: tuple[np.ndarray, np.ndarray] | None = None,
                     progress: Progress | None = None,
                     groups: np.ndarray | None = None) -> CrossfitOpenset:
    """``openset.calibration: crossfit``: head and open-set scorer without a validation split.

    Rows are split into ``openset.folds`` folds stratified by taxon (seeded). For each
    fold a head (:func:`~taxoclass.model.training.train_head` with the config's ``model``,
    ``loss``, ``train`` sections, no validation rows) and the configured detector are
    fitted on the other folds; their predictions and outlier scores of the fold's rows
    are out-of-fold (:func:`~taxoclass.openset.scorer.crossfit_predictions`). The evidence
    combiner and thresholds are fitted on these predictions of every row; then the final
    head and the final detector are fitted on all rows. ``y``: class index per rank;
    ``truth``: :func:`~taxoclass.openset.scorer.truth_names` of the rows; ``views``: (view
    embeddings, index into ``x`` of each view's source), a view trains with its source.
    ``groups``: a group per row (``data.group_by``); no group is in two folds.
    Costs ``folds + 1`` head trainings.
    """
    from ..bundle import ModelBundle, scorer_input
    from ..model.training import train_head
    from ..openset.evaluation import correct_by_rank, labelled_by_rank, path_names
    from ..openset.scorer import OpenSetScorer, crossfit_predictions, group_rank_of

    cfg = complete_config(cfg)
    ocfg, model, train, decode_cfg = cfg["openset"], cfg["model"], cfg["train"], cfg["decode"]
    _, n_folds = openset_calibration(ocfg)
    normalize_inputs = bool(model["normalize"])
    lowest, group = taxonomy.ranks[-1], group_rank_of(taxonomy.ranks)
    epochs = int(train["epochs"])

    def fit(mask, k):
        xt, yt = with_views(x, y, mask, views)
        step = (None if progress is None else
                lambda e, n: progress(k * epochs + e, (n_folds + 1) * epochs))
        head = train_head(xt, yt, None, None, taxonomy, model=model, loss=cfg.get("loss"),
                          train=train, normalize_inputs=normalize_inputs, progress=step)
        det = _openset_detector(scorer_input(xt, normalize_inputs), yt[group], yt[lowest],
                                ocfg)
        return head, det

    fold_number = iter(range(n_folds))

    def fit_fold(mask):
        head, det = fit(mask, next(fold_number))
        fold_bundle = ModelBundle(head=head.head, taxonomy=taxonomy, backbone={},
                                  normalize=normalize_inputs)
        return fold_bundle.logits, det

    strata = np.array(["/".join(map(str, t)) for t in zip(*(y[r] for r in taxonomy.ranks))])
    oof = crossfit_predictions(x, strata, fit_fold, taxonomy, n_folds=n_folds, seed=seed,
                               decode_method=decode_cfg["method"],
                               top_k=int(decode_cfg["top_k"]),
                               x_detector=scorer_input(x, normalize_inputs), groups=groups)
    correct = correct_by_rank(path_names(oof.decoded.path, taxonomy), truth, taxonomy.ranks)
    comb, thr = _openset_evidence(oof.decoded, oof.outlier, correct, ocfg,
                                  labelled_by_rank(truth, taxonomy.ranks))
    final, det = fit(np.ones(len(x), dtype=bool), n_folds)
    info = {"calibration": Calibration.CROSSFIT.value, "folds": n_folds, "seed": int(seed),
            "n_calibration_rows": int(len(x)), "out_of_fold": True}
    if groups is not None:
        info["grouped_folds"] = True  # no group (data.group_by) in two folds
    return CrossfitOpenset(train=final, scorer=OpenSetScorer(
        detector=det, combiner=comb, thresholds=thr, group_rank=group),
        oof=oof, correct=correct, info=info)




def select_openset(x: np.ndarray, y: Mapping[str, np.ndarray], rows: pd.DataFrame,
                   taxonomy: Taxonomy, cfg: Mapping[str, Any], *,
                   groups: np.ndarray | None = None,
                   progress: Progress | None = None) -> Selection | None:
    """The open-set recipe (``openset.recipe``) chosen on the train job's embedded rows
    (:func:`~taxoclass.openset.selection.select_recipe`: training and validation images,
    never a test set; seeded by ``data.split_seed``); None when ``openset.enabled`` is
    false."""
    if not cfg["openset"]["enabled"]:
        return None
    from ..openset.selection import select_recipe

    return select_recipe(x, y, rows.reset_index(drop=True), taxonomy, cfg,
                         seed=int(cfg["data"]["split_seed"]), groups=groups,
                         progress=progress)


def apply_selection(bundle: ModelBundle, selection: Selection | None,
                    calibration: dict[str, Any], held_out: HeldOut | None = None) -> None:
    """Put the selection's combiner and thresholds (fitted on the leave-taxa-out rounds'
    rows, simulated unknowns included) on the bundle's scorer, whose detector the final
    training rows fitted; a fallback selection leaves the usual calibration.

    ``held_out``: (embeddings, annotation rows) of known images the final head did not
    train on (the validation split). The thresholds then move onto the final head's
    evidence scale, letting through the share of known images the rounds let through
    (:func:`~taxoclass.openset.thresholds.at_known_coverage`); without it (crossfit) they
    are used as the rounds fitted them."""
    if selection is None or selection.combiner is None:
        return
    from ..openset.scorer import OpenSetScorer

    s = bundle.scorer
    bundle.scorer = OpenSetScorer(detector=s.detector, combiner=selection.combiner,
                                  thresholds=selection.thresholds, group_rank=s.group_rank)
    calibration["thresholds_from"] = (
        f"leave-taxa-out rounds ({selection.record['rounds']}): known calibration images "
        f"and images of hidden taxa, scored by round heads that did not train on them")
    if held_out is not None and len(held_out[0]):
        bundle.scorer.thresholds = _on_final_scale(bundle, *held_out)
        calibration["thresholds_scale"] = (
            f"moved to the final head's evidence at the rounds' known coverage, on "
            f"{len(held_out[0])} validation images (openset.thresholds.at_known_coverage)")


def _on_final_scale(bundle: ModelBundle, x_val: np.ndarray, rows_val: pd.DataFrame):
    """The bundle scorer's thresholds at their known coverage on the final head's evidence
    for validation images (``gate``: never below 0 where the distance rejects)."""
    from ..openset.evaluation import labelled_by_rank, truth_names
    from ..openset.thresholds import at_known_coverage
    from ..vocab import Combiner

    sc, tax = bundle.scorer, bundle.taxonomy
    decoded = bundle.predict_embeddings(x_val)
    evidence, _ = sc.evidence(bundle.scorer_input(x_val), decoded)
    floor = ({r: 0.0 for r in sc.combiner.outlier_ranks_}
             if sc.combiner.method == Combiner.GATE else None)
    return at_known_coverage(sc.thresholds, evidence,
                             labelled_by_rank(truth_names(rows_val, tax.ranks), tax.ranks),
                             floor=floor)
