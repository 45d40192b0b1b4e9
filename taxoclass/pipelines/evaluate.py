"""The evaluate jobs: a bundle's metrics on labelled images, and the open-set evaluation
(retrain without some species, then measure unknown detection and back-off).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import OpensetConfig, complete_config, openset_calibration
from ..engines import embedding_folder
from ..errors import ConfigError, TaxonomyError
from ..io.files import atomic_write_csv
from ..io.provenance import model_id_for, write_json_output, write_provenance
from ..taxonomy.labels import encode_labels
from ..vocab import Calibration
from .data import cached_embeddings
from .evaluation_files import (
    OPENSET_FILES,
    check_evaluation_folder,
    evaluation_table,
    write_evaluation,
    write_unit,
)
from .openset_fit import (
    apply_selection,
    crossfit_openset,
    fit_confidence_on,
    fit_openset_scorer,
)

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
SPLITS = ("auto", "all", "val", "train")


def _rows_of_model_taxa(tax, rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Rows whose label is a taxon of the model, and how many were not."""
    keep, unknown = [], 0
    for rec in rows.to_dict("records"):
        try:
            tax.node_for(rec)
            keep.append(True)
        except TaxonomyError:
            keep.append(False)
            unknown += 1
    return rows[np.array(keep, dtype=bool)].reset_index(drop=True), unknown


def _require_images(rows: pd.DataFrame, root: Path, annotations: str | Path) -> None:
    """A clear error when not one labelled image exists under the images root."""
    n_found = sum(Path(p).is_file() for p in rows["path"])
    if len(rows) and not n_found:
        raise ConfigError(f"{annotations}: 0 of {len(rows)} images found under {root}. Fix: "
                          f"--images-root FOLDER, the folder the file_name paths are "
                          f"relative to.")
    if n_found < len(rows):
        log.warning("%d of %d labelled images are missing under %s; they are not scored",
                    len(rows) - n_found, len(rows), root)


def _hasher(model: str | Path, bundle):
    """A store whose path index saves rehashing the training images (only read here)."""
    from ..features.store import STORE_DIR, EmbeddingStore

    cache = bundle.extra.get("embedding_cache")
    return EmbeddingStore(Path(cache) / STORE_DIR if cache else Path(model) / STORE_DIR)


def _training_splits(model: str | Path, bundle, hasher) -> dict[str, str] | None:
    """Content key -> split ("train"/"val") of the images the bundle was trained on, or
    None when its training annotations or split.csv cannot be read."""
    import yaml

    from ..errors import TaxoclassError
    from ..taxonomy.annotations import load_annotations

    split_file = Path(model) / "split.csv"
    annotations = bundle.extra.get("annotations")
    if not (split_file.is_file() and annotations):
        return None
    try:
        cfg = yaml.safe_load((Path(model) / "config.yaml").read_text(encoding="utf-8")) or {}
        root = (cfg.get("data") or {}).get("images_root") or Path(annotations).parent
        rows = load_annotations(annotations, check=False).labelled_images(root)
        split = pd.read_csv(split_file, dtype={"image_id": str})
    except (TaxoclassError, OSError, ValueError, yaml.YAMLError) as exc:
        log.warning("cannot tell which images trained %s (%s); with --split auto every "
                    "image is scored", model, exc)
        return None
    split_of = dict(zip(split["image_id"], split["split"]))
    keys = hasher.content_keys(rows["path"].tolist())
    return {k: split_of[str(i)] for k, i in zip(keys, rows["image_id"])
            if k is not None and str(i) in split_of}


def _split_rows(rows: pd.DataFrame, keys: list[str | None], split: str,
                trained: dict[str, str] | None, split_file: Path
                ) -> tuple[pd.DataFrame, str, int]:
    """The rows of ``split`` and how many training images were left out. ``auto``: every
    image except those the model trained on (found by content, whatever the annotation
    file or ids); ``val`` / ``train``: the images of that split of the training data."""
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: expected auto, all, val or train.")
    if split == "all":
        return rows, split, 0
    if trained is None:
        if split == "auto":
            return rows, "all", 0
        raise ConfigError(f"--split {split}: the model's training images are unknown "
                          f"({split_file} or its training annotations cannot be read); use "
                          f"--split all.")
    of = [trained.get(k) if k is not None else None for k in keys]
    if split == "auto":
        mask = np.array([s != "train" for s in of], dtype=bool)
        kept = [s for s, m in zip(of, mask) if m]
        label = "val" if kept and all(s == "val" for s in kept) else "all" if mask.all() \
            else "auto"
    else:
        mask, label = np.array([s == split for s in of], dtype=bool), split
    if split in ("auto", "val") and not mask.any() and "val" not in trained.values():
        raise ConfigError(f"{split_file} has no validation images: the model trained on "
                          f"every image (openset.calibration: crossfit), so none is held "
                          f"out. Its out-of-fold figures are in metrics_val.json; evaluate "
                          f"on other annotations, or pass --split all (in-sample).")
    n_left = int(sum(s == "train" for s, m in zip(of, mask) if not m))
    return rows[mask].reset_index(drop=True), label, n_left


def evaluate_model(model: str | Path, annotations: str | Path, *,
                   images_root: str | Path | None = None, out: str | Path | None = None,
                   split: str = "auto", cache: str | Path | None = None,
                   progress: Progress | None = None) -> dict:
    """Per-rank and hierarchical metrics of a bundle on labelled images.

    The images given are always embedded (stored vectors of the same file contents are
    reused), so the figures are about those files. ``split="auto"`` scores every image
    except those the model trained on, recognised by content (a copy of the training
    annotations gives its validation split), so training images never inflate the
    figures; ``"all"`` scores every labelled image; ``"val"`` / ``"train"`` that split of
    the training images. ``out`` is a folder (an existing file is refused): metrics.json
    (with the header of every JSON output), confusion.csv, the per-image predictions.csv
    (:func:`evaluation_table`), reliability.csv / .png and provenance, written as a unit.
    """
    from ..bundle import ModelBundle
    from ..model.metrics import calibration_metrics, confusion_summary, evaluate_predictions
    from ..taxonomy.annotations import load_annotations

    if out:
        check_evaluation_folder(out)
    bundle = ModelBundle.load(model)
    tax = bundle.taxonomy
    root = Path(images_root) if images_root else Path(annotations).parent
    ann = load_annotations(annotations, images_root=None)
    labelled = ann.labelled_images(root)
    rows, unknown = _rows_of_model_taxa(tax, labelled)
    _require_images(rows if len(rows) else labelled, root, annotations)
    hasher = _hasher(model, bundle)
    trained = _training_splits(model, bundle, hasher) if split != "all" else None
    keys = hasher.content_keys(rows["path"].tolist())
    rows, split, n_left = _split_rows(rows, keys, split, trained, Path(model) / "split.csv")
    ids = [str(i) for i in rows["image_id"]]
    if not ids:
        raise ConfigError(f"{annotations}: no labelled image of the model's taxa to evaluate "
                          f"(split {split}; {unknown} image(s) of taxa the model never saw, "
                          f"{n_left} training image(s) left out).")
    y, _ = encode_labels(tax, rows)
    with embedding_folder(cache, out, reuse=bundle.extra.get("embedding_cache")) as folder:
        x, found, _ = cached_embeddings(ids, rows["path"].tolist(), cache=folder,
                                        backbone_cfg=bundle.backbone, progress=progress)
    x, y = x[found], {r: v[found] for r, v in y.items()}
    answers, decoded = bundle.predict_with_backoff(x)
    metrics = evaluate_predictions(decoded.path, y, tax, topk_index=decoded.topk_index,
                                   head_argmax=decoded.head_argmax)
    metrics.update(split=split, n_images=int(found.sum()), n_skipped_unknown_taxon=unknown,
                   n_training_images_left_out=n_left, n_failed_images=int((~found).sum()))
    metrics["calibration"], reliability = calibration_metrics(
        decoded.path, decoded.path_prob, y, tax.ranks, bundle.confidence)
    if unknown or n_left or (~found).any():
        log.warning("scored %d of %d labelled images: %d training image(s) left out (--split "
                    "all scores them), %d of taxa the model never saw, %d not embedded",
                    int(found.sum()), len(labelled), n_left, unknown, int((~found).sum()))
    confusion = confusion_summary(decoded.path, y, tax, rank=tax.ranks[-1])
    if out:
        table = evaluation_table(rows[found].reset_index(drop=True), y, answers, decoded, tax,
                                 bundle.confidence)
        write_evaluation(Path(out), model, annotations, bundle, split, metrics, confusion,
                          table, reliability)
    metrics["confusion"] = confusion.to_dict("records")
    return metrics


# --------------------------------------------------------------------------- open set
@dataclass
class _Holdout:
    """The known/held-out split of an open-set evaluation and the model retrained on it."""

    rows: pd.DataFrame       # every embedded labelled image
    x_all: np.ndarray
    is_unk: np.ndarray       # image of a held-out species
    known: pd.DataFrame      # rows of known species
    xk: np.ndarray
    y: dict[str, np.ndarray]
    is_test: np.ndarray      # known test images
    is_tr: np.ndarray
    is_val: np.ndarray
    sub: Any                 # the retrained ModelBundle (scorer set)
    calibration: dict[str, Any]


def _retrain(bundle, cfg: dict, tax, kr: pd.DataFrame, xk: np.ndarray, seed: int,
             test_fraction: float):
    """Train the recipe on the known images less a seeded test share; returns
    (labels, is_test, is_tr, is_val, retrained bundle, calibration record)."""
    from ..bundle import ModelBundle
    from ..model.splits import group_codes, validation_split
    from ..model.training import train_head
    from ..openset.evaluation import truth_names
    from ..openset.scorer import group_rank_of

    ranks = tuple(tax.ranks)
    y, nodes = encode_labels(tax, kr)
    strata = np.array(["/".join(n) for n in nodes])
    group_by = (cfg.get("data") or {}).get("group_by")
    groups = group_codes(kr["group"], group_by) if group_by else None
    is_test = validation_split(strata, test_fraction, seed, groups=groups)
    tr_idx = np.flatnonzero(~is_test)
    selection = _select(cfg, tax, kr, xk, y, ~is_test, seed, groups)
    ocfg = (selection.openset_config(cfg["openset"]) if selection is not None
            else dict(cfg.get("openset") or {}))
    cfg = {**cfg, "openset": ocfg}
    is_val = np.zeros(len(kr), dtype=bool)
    cf = None
    if openset_calibration(ocfg)[0] == Calibration.CROSSFIT:
        # Head on every non-test known image; thresholds on their out-of-fold predictions.
        is_tr = ~is_test
        cf = crossfit_openset(xk[is_tr], {r: a[is_tr] for r, a in y.items()}, tax,
                              truth_names(kr[is_tr], ranks),
                              {**cfg, "model": {**(cfg.get("model") or {}),
                                                "normalize": bundle.normalize},
                               "decode": {**(cfg.get("decode") or {}),
                                          "method": bundle.decode_method}},
                              seed=seed, groups=None if groups is None else groups[is_tr])
        res, calibration = cf.train, cf.info
    else:
        val_fraction = float(cfg["data"]["val_fraction"])
        is_val[tr_idx[validation_split(strata[tr_idx], val_fraction, seed + 1,
                                       groups=None if groups is None else groups[tr_idx])]] = True
        is_tr = ~is_test & ~is_val
        res = train_head(xk[is_tr], {r: a[is_tr] for r, a in y.items()}, xk[is_val],
                         {r: a[is_val] for r, a in y.items()}, tax, model=cfg.get("model"),
                         loss=cfg.get("loss"), train=cfg.get("train"),
                         normalize_inputs=bundle.normalize)
        calibration = {"calibration": "holdout", "n_calibration_rows": int(is_val.sum())}
    sub = ModelBundle(head=res.head, taxonomy=tax, backbone=bundle.backbone,
                      normalize=bundle.normalize, decode_method=bundle.decode_method)
    if cf is not None:
        sub.scorer = cf.scorer
        sub.confidence = fit_confidence_on(cf.oof.decoded, {r: a[is_tr] for r, a in y.items()},
                                           tax, calibration["calibration"])
    else:
        sub.confidence = fit_confidence_on(sub.predict_embeddings(xk[is_val]),
                                           {r: a[is_val] for r, a in y.items()}, tax,
                                           calibration["calibration"])
        sub.scorer = fit_openset_scorer(sub, xk[is_tr], y[group_rank_of(ranks)][is_tr],
                                        xk[is_val],
                                        kr[is_val].reset_index(drop=True), ocfg,
                                        species_train=y[ranks[-1]][is_tr])
    apply_selection(sub, selection, calibration,
                    None if cf is not None else (xk[is_val], kr[is_val].reset_index(drop=True)))
    if selection is not None:
        calibration["openset_selection"] = selection.record
    return y, is_test, is_tr, is_val, sub, calibration


def _select(cfg: dict, tax, kr: pd.DataFrame, xk: np.ndarray, y: dict[str, np.ndarray],
            use: np.ndarray, seed: int, groups: np.ndarray | None):
    """The recipe's open-set recipe (``openset.recipe``: auto chooses it) on the known
    non-test images only (:func:`~taxoclass.openset.selection.select_recipe`), as
    ``train`` does; None when ``openset.enabled`` is false."""
    if not cfg["openset"]["enabled"]:
        return None
    from ..openset.selection import select_recipe

    return select_recipe(xk[use], {r: a[use] for r, a in y.items()},
                         kr[use].reset_index(drop=True), tax, cfg, seed=seed,
                         groups=None if groups is None else groups[use])


def _holdout_split(bundle, annotations, images_root, held_args: dict, cfg: dict, seed: int,
                   test_fraction: float, out, progress) -> tuple[list[str], _Holdout]:
    """Choose the held-out species, embed every labelled image and retrain without them."""
    from ..openset.evaluation import choose_holdout, known_taxonomy, split_known_unknown
    from ..taxonomy.annotations import load_annotations

    root = Path(images_root) if images_root else Path(annotations).parent
    ann = load_annotations(annotations)
    group_by = (cfg.get("data") or {}).get("group_by")  # the recipe's groups stay together
    rows = ann.labelled_images(root, group_by=group_by).reset_index(drop=True)
    try:
        held = choose_holdout(rows, seed=seed, **held_args)
    except ValueError as exc:
        raise ConfigError(f"hold-out choice: {exc}") from exc
    ids = [str(i) for i in rows["image_id"]]
    with embedding_folder(None, out, reuse=bundle.extra.get("embedding_cache")) as folder:
        x_all, found, _ = cached_embeddings(ids, rows["path"].tolist(), cache=folder,
                                            backbone_cfg=bundle.backbone, progress=progress)
    rows, x_all = rows[found].reset_index(drop=True), x_all[found]
    is_unk = split_known_unknown(rows, held)
    tax = known_taxonomy(ann.categories, held, tuple(bundle.taxonomy.ranks))
    kr, xk = rows[~is_unk].reset_index(drop=True), x_all[~is_unk]
    y, is_test, is_tr, is_val, sub, calibration = _retrain(bundle, cfg, tax, kr, xk, seed,
                                                           test_fraction)
    return held, _Holdout(rows=rows, x_all=x_all, is_unk=is_unk, known=kr, xk=xk, y=y,
                          is_test=is_test, is_tr=is_tr, is_val=is_val, sub=sub,
                          calibration=calibration)


def _unknown_scores(h: _Holdout, x_test: np.ndarray, decoded, ocfg: dict
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every score for "is this image of an unknown species?" (higher = more likely
    unknown), and the scorer's evidence per rank."""
    from ..openset.detectors import DETECTORS, OutlierDetector
    from ..openset.evidence import confidence_scores
    from ..openset.scorer import group_rank_of

    sub, ranks = h.sub, tuple(h.sub.taxonomy.ranks)
    group = group_rank_of(ranks)
    logits = sub.logits(x_test)
    scores: dict[str, np.ndarray] = {}
    conf = confidence_scores(decoded.probs, {r: v.numpy() for r, v in logits.items()})
    for name, s in conf[ranks[-1]].items():
        scores[f"{name} ({ranks[-1]})"] = -s
    x_tr_in, x_test_in = sub.scorer_input(h.xk[h.is_tr]), sub.scorer_input(x_test)
    for method in DETECTORS:
        for scope in ("global", "group"):
            det = OutlierDetector(method, scope=scope).fit(x_tr_in, h.y[group][h.is_tr])
            scores[f"pyod {method} ({scope})"] = det.decision_function(
                x_test_in, decoded.path[group])
    evidence, _ = sub.scorer.evidence(x_test_in, decoded)
    oc = OpensetConfig.from_dict(ocfg)
    scores[f"combined evidence ({oc.combiner}, {oc.detector} {oc.scope})"] = -evidence[ranks[-1]]
    return scores, evidence


def _reported_ece(frame: pd.DataFrame, correct: dict[str, np.ndarray], ranks) -> dict:
    """ECE of the ``confidence`` column over the answered rows (known and held-out test
    images): is the taxon at ``taxon_rank`` right? Per reported rank and over all."""
    from ..model.confidence import expected_calibration_error

    rank_col = frame["taxon_rank"].to_numpy(dtype=object)
    right = np.zeros(len(frame), dtype=bool)
    for r in ranks:
        right[rank_col == r] = correct[r][rank_col == r]
    conf = frame["confidence"].to_numpy(dtype=np.float64)
    out = {r: expected_calibration_error(conf[rank_col == r], right[rank_col == r])
           for r in ranks}
    out["all"] = expected_calibration_error(conf, right)
    return out


def evaluate_holdout(model: str | Path, annotations: str | Path, *,
                     images_root: str | Path | None = None,
                     holdout_species: Sequence[str] | None = None,
                     holdout_fraction: float | None = None, n_holdout: int | None = None,
                     seed: int = 0, test_fraction: float = 0.3, out: str | Path | None = None,
                     progress: Progress | None = None) -> dict:
    """Open-set evaluation: retrain the bundle's recipe without some species, then measure.

    Held-out species (given, or a seeded choice whose genus keeps a known species) are
    removed from the taxonomy and training. The known species' images are split
    ``test_fraction`` for test (stratified, seeded); the rest trains the head (its own
    validation split stops training and calibrates the back-off; with the recipe's
    ``openset.calibration: crossfit``, all of it trains the head and the back-off is
    calibrated out of fold, :func:`~taxoclass.pipelines.openset_fit.crossfit_openset`).
    Test = known test images + every held-out image. Returns (and writes into ``out``)
    unknown-detection AUROC / FPR@95%TPR per method, what back-off did with held-out and
    known images, and a risk-coverage table per rank.
    """
    import yaml

    from ..bundle import ModelBundle
    from ..openset.evaluation import (
        correct_by_rank,
        detection_table,
        labelled_by_rank,
        outcome_summary,
        path_names,
        risk_coverage,
        truth_names,
    )

    if out:
        check_evaluation_folder(out)  # before the retraining
    bundle = ModelBundle.load(model)
    cfg_file = Path(model) / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file} not found: the bundle has no training recipe to retrain "
                          "without the held-out species.")
    try:
        cfg = complete_config(yaml.safe_load(cfg_file.read_text()))
    except ConfigError as exc:
        raise ConfigError(f"{cfg_file}: the bundle's training recipe does not load ({exc}). "
                          "Fix: retrain the bundle with this version of taxoclass.") from None
    held_args = {"species": holdout_species, "holdout_fraction": holdout_fraction,
                 "n_species": n_holdout}
    held, h = _holdout_split(bundle, annotations, images_root, held_args, cfg, seed,
                             test_fraction, out, progress)
    ranks, tax, sub = tuple(bundle.taxonomy.ranks), h.sub.taxonomy, h.sub
    x_test = np.concatenate([h.xk[h.is_test], h.x_all[h.is_unk]])
    test_rows = pd.concat([h.known[h.is_test], h.rows[h.is_unk]]).reset_index(drop=True)
    y_unk = np.r_[np.zeros(int(h.is_test.sum()), bool), np.ones(int(h.is_unk.sum()), bool)]
    frame, decoded = sub.predict_with_backoff(x_test)
    truth = truth_names(test_rows, ranks)
    correct = correct_by_rank(path_names(decoded.path, tax), truth, ranks)
    # Known images are scored at the ranks they are labelled at (a family-only image is
    # neither a right nor a wrong species).
    known_at = {r: ~y_unk & lab for r, lab in labelled_by_rank(truth, ranks).items()}
    chosen = (h.calibration.get("openset_selection") or {}).get("chosen") or {}
    ocfg = {**dict(cfg.get("openset") or {}), **chosen}  # the recipe the scorer uses
    scores, evidence = _unknown_scores(h, x_test, decoded, ocfg)
    detection = detection_table(y_unk, scores).sort_values("auroc", ascending=False)
    rc = risk_coverage({r: evidence[r][known_at[r]] for r in ranks if known_at[r].any()},
                       {r: correct[r][known_at[r]] for r in ranks if known_at[r].any()})
    result = {
        "held_out_species": held, "seed": seed,
        "n_train": int(h.is_tr.sum()), "n_val": int(h.is_val.sum()),
        "openset_calibration": h.calibration,
        "n_test_known": int(h.is_test.sum()), "n_test_held_out": int(h.is_unk.sum()),
        "known_test_accuracy": {r: float(correct[r][known_at[r]].mean())
                                if known_at[r].any() else None for r in ranks},
        "known_test_n_scored": {r: int(known_at[r].sum()) for r in ranks},
        "held_out_right_genus_on_path": float(correct["genus"][y_unk].mean())
        if "genus" in correct and y_unk.any() else None,
        # Any rank list: the rank above the lowest (genus, or family without a genus rank).
        "held_out_parent_rank": ranks[-2] if len(ranks) > 1 else None,
        "held_out_right_parent_on_path": float(correct[ranks[-2]][y_unk].mean())
        if len(ranks) > 1 and y_unk.any() else None,
        "thresholds": sub.scorer.thresholds.to_dict(),
        "outcomes": outcome_summary(frame, truth, y_unk, ranks),
        "confidence_ece": _reported_ece(frame, correct, ranks),
        "detection": detection.to_dict("records"),
        "risk_coverage": rc.to_dict("records"),
    }
    if out:
        frame.insert(0, "image_id", test_rows["image_id"].astype(str).to_numpy())
        frame.insert(1, "held_out", y_unk)

        def write(folder: Path) -> None:
            write_json_output(folder / "openset_metrics.json", result, model_id=model_id)
            atomic_write_csv(folder / "openset_detection.csv", detection)
            atomic_write_csv(folder / "openset_risk_coverage.csv", rc)
            atomic_write_csv(folder / "openset_predictions.csv", frame)
            write_provenance(folder, backbone=bundle.backbone, config={
                "model": str(Path(model).resolve()),
                "annotations": str(Path(annotations).resolve()),
                "holdout_species": held, "seed": seed, "test_fraction": test_fraction,
                "retrain": {k: cfg.get(k) for k in ("model", "loss", "train", "openset")}},
                extra={"model_id": model_id})

        model_id = model_id_for(bundle)
        write_unit(Path(out), OPENSET_FILES, write)
    return result
