"""The train job: a hierarchical head on cached embeddings, as a config describes it.

Steps: prepare the data (:func:`_prepare`), fit the head and its open-set calibration
(validation split or crossfit), build the bundle, write it and its records as one folder
(staged, then swapped in: a killed run leaves the previous bundle whole).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..config import complete_config, openset_calibration
from ..io.files import (
    atomic_write_csv,
    check_output_folder,
    output_folder,
    recover_output_folder,
)
from ..io.provenance import model_id_for, write_json_output, write_provenance
from ..model.splits import group_codes
from ..model.threads import head_threads, torch_threads
from ..taxonomy.labels import encode_labels
from ..taxonomy.tree import Taxonomy
from ..vocab import Calibration
from .data import (
    config_embeddings,
    embedding_cache,
    known_rows,
    require_training_settings,
    validation_mask,
    view_embeddings,
    with_views,
)
from .openset_fit import (
    apply_selection,
    crossfit_openset,
    fit_confidence_on,
    fit_openset_scorer,
    select_openset,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..openset.selection import Selection

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass
class _Data:
    """What training needs, read from the config: rows, labels, embeddings, split, views."""

    cfg: dict
    rows: pd.DataFrame
    tax: Taxonomy
    y: dict[str, np.ndarray]
    ids: list[str]
    cache: str
    x: np.ndarray
    found: np.ndarray
    backbone_desc: dict
    is_val: np.ndarray
    crossfit: bool
    tr: np.ndarray          # rows the head trains on
    va: np.ndarray          # validation rows (none with crossfit)
    views: tuple[np.ndarray, np.ndarray]  # view embeddings, index into rows of each source
    groups: np.ndarray | None = None  # group code per row (data.group_by), None without
    selection: Selection | None = None  # the open-set recipe to fit (openset.recipe)
    openset: dict | None = None  # the openset section fitted (the chosen recipe's)


@dataclass
class _Fit:
    result: Any             # training.TrainResult of the bundle's head
    calibration: dict[str, Any]
    metrics: dict[str, Any] | None = None
    fold: np.ndarray | None = None
    scorer: Any = None      # crossfit: the out-of-fold calibrated scorer
    x_tr: np.ndarray | None = None
    y_tr: dict[str, np.ndarray] | None = None
    held_out: tuple[Any, dict[str, np.ndarray]] | None = None  # crossfit: (OOF decoded, y)


def _prepare(cfg: dict, embed_progress: Progress | None) -> _Data:
    from ..taxonomy.annotations import load_annotations

    data = require_training_settings(cfg)
    root = Path(data.get("images_root") or Path(data["annotations"]).parent)
    ann = load_annotations(data["annotations"], allow_outside_root=data.get("allow_outside_root"))
    group_by = data.get("group_by")
    tax, rows = known_rows(ann, ann.labelled_images(root, group_by=group_by), data)
    y, nodes = encode_labels(tax, rows)
    ids = [str(i) for i in rows["image_id"]]
    cache = embedding_cache(cfg)
    x, found, backbone_desc = config_embeddings(cfg, rows, progress=embed_progress)
    if not found.all():
        missing = [i for i, f in zip(ids, found) if not f][:5]
        log.warning("%d labelled image(s) have no embedding (unreadable; see %s/failures.csv), "
                    "e.g. %s; training without them.", int((~found).sum()), cache, missing)
    groups = group_codes(rows["group"], group_by) if group_by else None
    is_val = validation_mask(ids, nodes, data, groups=groups)
    crossfit = openset_calibration(cfg["openset"])[0] == Calibration.CROSSFIT
    # crossfit: every embedded image trains the final head (no validation split).
    tr, va = (found, np.zeros_like(found)) if crossfit else (found & ~is_val, found & is_val)
    # Tile-like views of the training images only (never of validation images).
    tr_idx = np.flatnonzero(tr)
    xv, src = view_embeddings(cfg, rows.iloc[tr_idx].reset_index(drop=True),
                              progress=embed_progress)
    return _Data(cfg=cfg, rows=rows, tax=tax, y=y, ids=ids, cache=cache, x=x, found=found,
                 backbone_desc=backbone_desc, is_val=is_val, crossfit=crossfit, tr=tr, va=va,
                 views=(xv, tr_idx[src]) if not crossfit else (xv, src), groups=groups)


def _fit_crossfit(d: _Data, progress: Progress | None) -> _Fit:
    from ..model.metrics import evaluate_predictions
    from ..openset.evaluation import truth_names

    tr, y, tax = d.tr, d.y, d.tax
    cf = crossfit_openset(d.x[tr], {r: v[tr] for r, v in y.items()}, tax,
                          truth_names(d.rows[tr], tax.ranks), {**d.cfg, "openset": d.openset},
                          seed=int(d.cfg["data"]["split_seed"]), views=d.views,
                          progress=progress, groups=None if d.groups is None else d.groups[tr])
    fold = np.full(len(d.ids), -1)
    fold[tr] = cf.oof.fold
    # The final head trained on every row: its own validation figures would be
    # in-sample, so the metrics are those of the out-of-fold predictions.
    metrics = evaluate_predictions(cf.oof.decoded.path, {r: v[tr] for r, v in y.items()},
                                   tax, topk_index=cf.oof.decoded.topk_index,
                                   head_argmax=cf.oof.decoded.head_argmax)
    metrics["predictions"] = (f"out-of-fold: each of the {int(tr.sum())} images predicted "
                              f"by one of {cf.oof.n_folds} fold heads that did not train on "
                              f"it (the bundle's head trained on all of them)")
    return _Fit(result=cf.train, calibration=cf.info, metrics=metrics, fold=fold,
                scorer=cf.scorer, held_out=(cf.oof.decoded, {r: v[tr] for r, v in y.items()}))


def _fit_holdout(d: _Data, progress: Progress | None) -> _Fit:
    from ..model.training import train_head

    cfg, va = d.cfg, d.va
    x_tr, y_tr = with_views(d.x, d.y, d.tr, d.views)
    result = train_head(x_tr, y_tr, d.x[va], {r: v[va] for r, v in d.y.items()}, d.tax,
                        model=cfg["model"], loss=cfg["loss"], train=cfg["train"],
                        normalize_inputs=bool(cfg["model"]["normalize"]),
                        progress=progress)
    calibration = {"calibration": "holdout", "n_calibration_rows": int(va.sum())}
    return _Fit(result=result, calibration=calibration, x_tr=x_tr, y_tr=y_tr)


def _bundle(d: _Data, fit: _Fit):
    """The model bundle, its validation metrics (holdout) and its open-set scorer."""
    from ..bundle import ModelBundle
    from ..features.backbones import backbone_spec
    from ..model.metrics import evaluate_predictions
    from ..openset.scorer import group_rank_of

    cfg, tax, va = d.cfg, d.tax, d.va
    bundle = ModelBundle(head=fit.result.head, taxonomy=tax,
                         normalize=bool(cfg["model"]["normalize"]),
                         decode_method=cfg["decode"]["method"],
                         backbone={**backbone_spec(cfg["backbone"]),
                                   "description": d.backbone_desc},
                         extra={"annotations": str(Path(cfg["data"]["annotations"]).resolve()),
                                "embedding_cache": str(Path(d.cache).resolve()),
                                "best_epoch": fit.result.best_epoch})
    metrics = fit.metrics
    held_out = fit.held_out
    if not d.crossfit:
        decoded = bundle.predict_embeddings(d.x[va], top_k=int(cfg["decode"]["top_k"]))
        metrics = evaluate_predictions(decoded.path, {r: v[va] for r, v in d.y.items()}, tax,
                                       topk_index=decoded.topk_index,
                                       head_argmax=decoded.head_argmax)
        metrics["predictions"] = f"validation split ({int(va.sum())} images, not trained on)"
        held_out = (decoded, {r: v[va] for r, v in d.y.items()})
    bundle.confidence = fit_confidence_on(*held_out, tax, fit.calibration["calibration"])
    ocfg = d.openset or cfg["openset"]
    if ocfg["enabled"]:
        if d.crossfit:
            bundle.scorer = fit.scorer
        else:
            group_train = fit.y_tr[group_rank_of(tax.ranks)]
            bundle.scorer = fit_openset_scorer(bundle, fit.x_tr, group_train, d.x[va],
                                               d.rows[va].reset_index(drop=True), ocfg,
                                               species_train=fit.y_tr[tax.ranks[-1]])
        apply_selection(bundle, d.selection, fit.calibration,
                        None if d.crossfit else (d.x[va], d.rows[va].reset_index(drop=True)))
        metrics["openset_thresholds"] = bundle.scorer.thresholds.to_dict()
        metrics["openset_calibration"] = fit.calibration
        bundle.extra["openset_calibration"] = fit.calibration
        if d.selection is not None:
            metrics["openset_selection"] = d.selection.record
            bundle.extra["openset_selection"] = d.selection.record
    return bundle, metrics


def _write(out: Path, d: _Data, fit: _Fit, bundle, metrics: dict) -> None:
    """Bundle, history, split, metrics and provenance, swapped in as one folder."""
    with output_folder(out, keep=_inside(d.cache, out)) as stage:
        _write_files(stage, d, fit, bundle, metrics)


def _inside(cache: str | Path, out: Path) -> tuple[str, ...]:
    """The entry of ``out`` holding the embedding cache, when it lies inside ``out`` (it
    is carried over into the new folder, never replaced)."""
    try:
        rel = Path(cache).resolve().relative_to(out.resolve())
    except ValueError:
        return ()
    return rel.parts[:1]


def _write_files(out: Path, d: _Data, fit: _Fit, bundle, metrics: dict) -> None:
    bundle.write(out)
    result = fit.result
    atomic_write_csv(out / "history.csv", result.history)
    split = pd.DataFrame({"image_id": d.ids,
                          "split": np.where(d.is_val & ~d.crossfit, "val", "train"),
                          "embedded": d.found})
    if d.groups is not None:
        split["group"] = d.rows["group"].to_numpy()  # data.group_by value (empty: none)
    if d.crossfit:
        split["fold"] = fit.fold  # crossfit fold of each image (-1: not embedded)
    atomic_write_csv(out / "split.csv", split)
    write_json_output(out / "metrics_val.json", metrics,  # the one output header first
                      model_id=model_id_for(bundle))
    enabled = d.cfg["openset"]["enabled"]
    write_provenance(out, config=d.cfg, backbone=d.backbone_desc, extra={
        "training": {"best_epoch": result.best_epoch, "epochs_run": len(result.history),
                     "seconds": result.seconds, "n_train": int(d.tr.sum()),
                     "n_train_views": int(len(d.views[0])), "n_val": int(d.va.sum())},
        "openset_calibration": fit.calibration if enabled else None})


def _threads(d: _Data) -> int | None:
    """``train.threads``, else the rule of :func:`~taxoclass.model.threads.head_threads`
    for this head's weights (input dim x hidden, hidden or input dim x classes of all ranks)."""
    hidden = d.cfg["model"].get("hidden")
    dim = int(d.x.shape[1]) if d.x.ndim == 2 else 0
    n_out = sum(d.tax.n_classes(r) for r in d.tax.ranks)
    weights = dim * int(hidden) + int(hidden) * n_out if hidden else dim * n_out
    return head_threads(d.cfg["train"].get("threads"), n_weights=weights)


def train_from_config(cfg: dict, *, progress: Progress | None = None,
                      embed_progress: Progress | None = None) -> Path:
    """Train a hierarchical head as configured (``configs/leaf.yaml``); returns the bundle
    folder (``cfg["out"]``) holding the bundle, history, split, metrics and provenance.
    """
    cfg = complete_config(cfg)
    out = Path(cfg["out"])
    check_output_folder(out)  # before any work: an unusable --out fails at once
    recover_output_folder(out)  # a bundle a killed run left half-swapped is put back
    d = _prepare(cfg, embed_progress)
    with torch_threads(_threads(d)):  # heads, fold heads, detector: one setting, restored
        f = d.found
        d.selection = select_openset(d.x[f], {r: v[f] for r, v in d.y.items()}, d.rows[f],
                                     d.tax, cfg, progress=progress,
                                     groups=None if d.groups is None else d.groups[f])
        d.openset = (d.selection.openset_config(cfg["openset"]) if d.selection is not None
                     else dict(cfg["openset"]))
        fit = _fit_crossfit(d, progress) if d.crossfit else _fit_holdout(d, progress)
        bundle, metrics = _bundle(d, fit)
    _write(out, d, fit, bundle, metrics)
    return out
