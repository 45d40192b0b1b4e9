"""Open-set benchmark: unknown species on the leaf data with EfficientNet-Lite0 features.

A seeded set of species (each genus keeps a known species) is held out. The head
(``train_head`` with the hyper-parameters of ``configs/leaf.yaml``, read at run time) is
trained on 70% of the known species' images (stratified), a validation split carved
from that part stops training and calibrates the evidence combiner and the thresholds;
the test set is the other 30% of known images plus every held-out-species image.
``--calib-holdout N`` (default 0) also removes N further species from training and puts
all their images in validation, so calibration sees what novelty looks like (they are in
no test; a different training set, so figures are not comparable with the default run).
``--calibration crossfit`` (``openset.calibration``) instead trains the head on the
training and validation images together and fits the combiner and thresholds on their
out-of-fold predictions (``pipelines.openset_fit.crossfit_openset``, ``--folds`` heads);
the combiner grid of the detection table needs a validation split and is left out.
``--group-by FIELD`` (an image or annotation field, ``data.group_by``) keeps each group on
one side of the test, validation and crossfit splits (``taxoclass.model.splits``); without
it the splits are unchanged.

    .venv/bin/python bench/openset.py [--n-holdout 12] [--calib-holdout 8] [--seed 0]
        [--calibration holdout|crossfit] [--folds 5]

Prints markdown (date, machine, command, tables); ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from _results import markdown_table, publish

from taxoclass.config import CALIBRATIONS, DEFAULTS, load_config
from taxoclass.model.decoding import decode
from taxoclass.model.splits import group_codes, validation_split
from taxoclass.model.training import normalize, train_head
from taxoclass.openset.detectors import DETECTORS, OutlierDetector
from taxoclass.openset.evaluation import (
    choose_holdout,
    correct_by_rank,
    detection_table,
    known_taxonomy,
    outcome_summary,
    path_names,
    risk_coverage,
    split_known_unknown,
    truth_names,
)
from taxoclass.openset.evidence import (
    COMBINERS,
    CONFIDENCES,
    EvidenceCombiner,
    confidence_scores,
)
from taxoclass.openset.scorer import confidence_of, fit_scorer
from taxoclass.pipelines.data import config_embeddings
from taxoclass.pipelines.openset_fit import crossfit_openset
from taxoclass.taxonomy.annotations import load_annotations
from taxoclass.taxonomy.labels import encode_labels

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "leaf" / "annotations.json"
CONFIG = ROOT / "configs" / "leaf.yaml"


def unseen_rank_probe(x_train: np.ndarray, y: dict, tax, x_unseen: np.ndarray,
                      truth: dict, head_correct: dict) -> pd.DataFrame:
    """Genus and family of held-out-species images named by other classifiers than the
    head, all fitted on the head's training rows (L2-normalised embeddings): can any of
    them put unseen species in their genus or family more often than the head's path?"""
    from sklearn.linear_model import LogisticRegression

    xt, xu = normalize(x_train).numpy(), normalize(x_unseen).numpy()
    names = {r: np.array(tax.names(r), dtype=object) for r in ("genus", "family")}
    up = {r: tax.parent_index("species", r) for r in ("genus", "family")}
    rows = [{"classifier": "taxoclass head (decoded path)",
             **{r: float(np.mean(head_correct[r])) for r in ("genus", "family")}}]

    def right(rank, idx):
        return float(np.mean(names[rank][idx] == truth[rank]))

    for c in (1.0, 10.0, 100.0):
        rows.append({"classifier": f"logistic regression per rank (C={c:g})",
                     **{r: right(r, LogisticRegression(C=c, max_iter=3000)
                                 .fit(xt, y[r]).predict(xu)) for r in ("genus", "family")}})
    species = y["species"]
    cent = normalize(np.stack([xt[species == k].mean(0)
                               for k in range(tax.n_classes("species"))])).numpy()
    nearest = (xu @ cent.T).argmax(1)
    rows.append({"classifier": "nearest species centroid (cosine)",
                 **{r: right(r, up[r][nearest]) for r in ("genus", "family")}})
    neighbours = np.argsort(-(xu @ xt.T), axis=1)[:, :15]
    rows.append({"classifier": "15 nearest training images, majority vote",
                 **{r: right(r, np.array([np.bincount(v).argmax() for v in y[r][neighbours]]))
                    for r in ("genus", "family")}})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-holdout", type=int, default=12)
    p.add_argument("--calib-holdout", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    o = DEFAULTS["openset"]  # the back-off `taxoclass train` fits by default
    p.add_argument("--method", default=o["detector"], choices=DETECTORS,
                   help="detector for back-off (mahalanobis uses the species labels)")
    p.add_argument("--scope", default=o["scope"], choices=("global", "group"))
    p.add_argument("--combiner", default=o["combiner"], choices=COMBINERS)
    p.add_argument("--confidence", default=o["confidence"], choices=CONFIDENCES)
    p.add_argument("--gate-quantile", type=float, default=o["gate_quantile"])
    p.add_argument("--calibration", default=o["calibration"], choices=CALIBRATIONS,
                   help="holdout: calibrate on the validation split; crossfit: head on "
                        "train+validation, calibration on out-of-fold predictions")
    p.add_argument("--folds", type=int, default=o["folds"], help="crossfit folds")
    p.add_argument("--group-by", default=None, metavar="FIELD",
                   help="image or annotation field whose groups stay on one side of every "
                        "split (data.group_by); default: split by image")
    p.add_argument("--species-target", type=float, default=0.97)
    p.add_argument("--higher-target", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    crossfit = args.calibration == "crossfit"
    if crossfit and args.calib_holdout:
        p.error("--calib-holdout puts species in the validation split; --calibration "
                "crossfit has none. Use one or the other.")
    if not DATA.is_file():
        print(f"Need {DATA}.", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    cfg = yaml.safe_load(CONFIG.read_text())
    ann = load_annotations(DATA)
    rows = ann.labelled_images(group_by=args.group_by).reset_index(drop=True)
    # The features configs/leaf.yaml trains on, from its cache (computed when absent).
    tcfg = load_config(CONFIG)
    x_all, found, _ = config_embeddings(tcfg, rows)
    if not found.all():
        print(f"{int((~found).sum())} leaf images could not be embedded", file=sys.stderr)
        return 2

    held = choose_holdout(rows, n_species=args.n_holdout, seed=args.seed)
    rest = rows[~split_known_unknown(rows, held)]
    calib = (choose_holdout(rest, n_species=args.calib_holdout, seed=args.seed + 1)
             if args.calib_holdout else [])
    is_unk = split_known_unknown(rows, held)
    is_cal = split_known_unknown(rows, calib)
    tax = known_taxonomy(ann.categories, [*held, *calib])
    known = ~is_unk & ~is_cal
    kr = rows[known].reset_index(drop=True)
    xk = x_all[known]
    y, nodes = encode_labels(tax, kr)
    strata = np.array(["/".join(n) for n in nodes])
    groups = group_codes(kr["group"], args.group_by) if args.group_by else None
    is_test = validation_split(strata, 0.3, args.seed, groups=groups)
    tr_idx = np.flatnonzero(~is_test)
    v = validation_split(strata[tr_idx], 0.25, args.seed + 1,
                         groups=None if groups is None else groups[tr_idx])
    is_val = np.zeros(len(kr), dtype=bool)
    is_val[tr_idx[v]] = True
    is_tr = ~is_test & ~is_val
    targets = {"family": args.higher_target, "genus": args.higher_target,
               "species": args.species_target}
    if crossfit:  # one head on train+validation; calibration on out-of-fold predictions
        n_val_known = int(is_val.sum())
        is_tr, is_val = ~is_test, np.zeros(len(kr), dtype=bool)
        ocfg = {"detector": args.method, "scope": args.scope, "combiner": args.combiner,
                "confidence": args.confidence, "gate_quantile": args.gate_quantile,
                "target_precision": targets, "min_support": 10, "folds": args.folds}
        cf = crossfit_openset(xk[is_tr], {r: a[is_tr] for r, a in y.items()}, tax,
                              truth_names(kr[is_tr]), {**cfg, "openset": ocfg}, seed=args.seed,
                              groups=None if groups is None else groups[is_tr])
        res = cf.train
    else:
        res = train_head(xk[is_tr], {r: a[is_tr] for r, a in y.items()}, xk[is_val],
                         {r: a[is_val] for r, a in y.items()}, tax, model=cfg["model"],
                         loss=cfg["loss"], train=cfg["train"],
                         normalize_inputs=bool(cfg["model"].get("normalize", True)))
    head = res.head.eval()

    def predict(x):
        xt = normalize(x) if cfg["model"].get("normalize", True) else torch.as_tensor(x)
        with torch.inference_mode():
            lg = head(xt)
        return lg, decode(lg, tax, method=cfg["decode"]["method"])

    if crossfit:  # calibration rows: out-of-fold predictions of every training row
        x_val, d_val, c_val = xk[is_tr], cf.oof.decoded, cf.correct
    else:  # validation = known val images + every calibration-holdout image
        x_val = np.concatenate([xk[is_val], x_all[is_cal]])
        val_rows = pd.concat([kr[is_val], rows[is_cal]])
        _, d_val = predict(x_val)
        c_val = correct_by_rank(path_names(d_val.path, tax), truth_names(val_rows), tax.ranks)
    # Test = known test images + every held-out-species image.
    x_test = np.concatenate([xk[is_test], x_all[is_unk]])
    test_rows = pd.concat([kr[is_test], rows[is_unk]])
    y_unk = np.r_[np.zeros(is_test.sum(), bool), np.ones(is_unk.sum(), bool)]
    lg_test, d_test = predict(x_test)
    truth = truth_names(test_rows)
    c_test = correct_by_rank(path_names(d_test.path, tax), truth, tax.ranks)
    x_tr, g_tr, s_tr = xk[is_tr], y["genus"][is_tr], y["species"][is_tr]

    # ---- one table: every score for "is this image of an unknown species?"
    scores: dict[str, np.ndarray] = {}
    conf = confidence_scores(d_test.probs, lg_test)
    for rank in ("species", "genus"):
        for name, s in conf[rank].items():
            scores[f"{name} ({rank})"] = -s
    scores["path prob (species)"] = -d_test.path_prob["species"]
    evid = {}
    for method in DETECTORS:
        # pyod detectors: global or per predicted genus; mahalanobis: species or genus classes
        variants = ((("species classes", "global", s_tr), ("genus classes", "global", g_tr))
                    if method == "mahalanobis" else
                    (("global", "global", None), ("group", "group", g_tr)))
        for scope_name, scope, labels in variants:
            det = OutlierDetector(method, scope=scope).fit(x_tr, labels)
            z_test = det.decision_function(x_test, d_test.path["genus"])
            kind = "" if method == "mahalanobis" else "pyod "
            scope = scope_name
            scores[f"{kind}{method} ({scope})"] = z_test
            if crossfit:  # the detector saw every calibration row: no honest z to fit on
                continue
            z_val = det.decision_function(x_val, d_val.path["genus"])
            for comb in COMBINERS:
                for conf in CONFIDENCES:
                    c = EvidenceCombiner(comb, confidence=conf,
                                         gate_quantile=args.gate_quantile)
                    c.fit(confidence_of(d_val, conf), z_val, c_val)
                    evid[(method, scope, comb, conf)] = -c.score(confidence_of(d_test, conf),
                                                                 z_test)["species"]
    c = EvidenceCombiner("logistic", use_outlier=False, confidence="path_prob").fit(
        d_val.path_prob, None, c_val)
    scores["logistic(path prob) species evidence"] = -c.score(d_test.path_prob, None)["species"]
    scores["path logit (species)"] = -d_test.path_logit["species"]
    for (method, scope, comb, conf), s in evid.items():
        what = "path prob" if conf == "path_prob" else "path logit"
        scores[f"{comb}({what}, {method} {scope}) species evidence"] = s

    # ---- back-off with the chosen detector at the target precisions
    if crossfit:
        scorer = cf.scorer
    else:
        scorer = fit_scorer(x_tr, g_tr, x_val, d_val, c_val, method=args.method,
                            scope=args.scope, combiner=args.combiner, target_precision=targets,
                            min_support=10, labels_train=s_tr, confidence=args.confidence,
                            gate_quantile=args.gate_quantile)
    method_name = scorer.detector.method
    frame = scorer.predict(x_test, d_test, tax)
    summary = outcome_summary(frame, truth, y_unk, tax.ranks)
    ev_test, _ = scorer.evidence(x_test, d_test)
    if crossfit:
        what = "path prob" if args.confidence == "path_prob" else "path logit"
        scope = "species classes" if method_name == "mahalanobis" else args.scope
        scores[f"{args.combiner}({what}, {method_name} {scope}) species evidence, "
               f"crossfit-calibrated (the back-off scorer)"] = -ev_test["species"]
    table = detection_table(y_unk, scores).sort_values("auroc", ascending=False)
    rc = risk_coverage({r: ev_test[r][~y_unk] for r in tax.ranks},
                       {r: c_test[r][~y_unk] for r in tax.ranks},
                       coverages=(1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5))
    # Operating points of the species threshold (descriptive: swept on the test evidence,
    # never used to pick anything): what a looser or stricter species threshold would give.
    pts = []
    sp_ok = c_test["species"]
    for q in (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1):
        t = float(np.quantile(ev_test["species"][~y_unk], 1 - q))
        named = ev_test["species"] >= t
        pts.append({"species threshold": t,
                    "known named to species": float(named[~y_unk].mean()),
                    "known species precision": float(sp_ok[named & ~y_unk].mean()),
                    "held-out named to species": float(named[y_unk].mean()),
                    "all species-answer precision": float(sp_ok[named].mean())})
    ceiling = float(c_test["family"][y_unk].mean())
    probe = unseen_rank_probe(xk[is_tr], {r: a[is_tr] for r, a in y.items()}, tax,
                              x_all[is_unk], {r: truth[r][y_unk] for r in ("genus", "family")},
                              {r: c_test[r][y_unk] for r in ("genus", "family")})
    seconds = time.perf_counter() - t0

    th = scorer.thresholds
    cal = "oof" if crossfit else "val"
    if crossfit:
        calibration = (f"- calibration: crossfit ({args.folds} species-stratified folds, seed "
                       f"{args.seed}): the head trained on all {int(is_tr.sum())} train+"
                       f"validation images ({n_val_known} of them the holdout mode's "
                       f"validation split); combiner and thresholds fitted on their "
                       f"{len(d_val)} out-of-fold predictions; detection table without the "
                       f"combiner grid (it needs a validation split)")
    else:
        calibration = (f"- calibration: holdout (combiner and thresholds fitted on the "
                       f"{len(x_val)} validation images)")
    out = [
        "# Open-set benchmark: held-out leaf species",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {args.threads}), Python {platform.python_version()}",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- features: EfficientNet-Lite0 cache `{Path(tcfg['embeddings']['cache']).name}` "
        f"({tcfg['backbone']['image_size']} px, {tcfg['backbone']['resize']}); head: "
        f"`train_head` with configs/leaf.yaml (model={cfg['model']}, train={cfg['train']}, "
        f"loss={cfg['loss']}); best epoch {res.best_epoch}; total {seconds:.1f} s",
        f"- held out ({len(held)}, seed {args.seed}): {', '.join(held)}"
        + (f"; test, validation and folds keep groups of `{args.group_by}` together"
           if args.group_by else ""),
        f"- calibration holdout ({len(calib)}, in validation only): "
        f"{', '.join(calib) or 'none'}",
        calibration,
        (f"- rows: train {int(is_tr.sum())} (train+validation), out-of-fold calibration "
         f"{len(d_val)}, test " if crossfit else
         f"- rows: train {int(is_tr.sum())}, validation {len(x_val)} "
         f"({int(is_val.sum())} known + {int(is_cal.sum())} calibration-holdout), test ")
        + f"{len(x_test)} ({int((~y_unk).sum())} known + {int(y_unk.sum())} held-out)",
        "- known-test accuracy of the path: "
        + ", ".join(f"{r} {c_test[r][~y_unk].mean():.3f}" for r in tax.ranks)
        + f"; held-out images with the right genus on the path: "
        f"{c_test['genus'][y_unk].mean():.3f}",
        "",
        "## Unknown-species detection (test: known vs held-out images)",
        "",
        "Every score oriented higher = more likely unknown (confidences negated). "
        "Evidence rows are the species-rank evidence of the combination rule fitted on "
        + ("out-of-fold predictions." if crossfit else "validation."),
        "",
        markdown_table(table),
        "",
        f"## Back-off at target precision (detector {method_name} {args.scope}, "
        f"{args.combiner} combination)",
        "",
        markdown_table(pd.DataFrame([{"rank": r, "target": th.target[r],
                           "threshold": th.thresholds[r],
                           f"{cal} precision": (th.precision[r]
                                                if th.precision[r] is not None
                                                else float("nan")),
                           f"{cal} coverage": th.coverage[r], f"{cal} support": th.support[r]}
                          for r in tax.ranks])),
        "",
        markdown_table(pd.DataFrame([{"metric": k, "value": float(v)}
                                     for k, v in summary.items()])),
        "",
        "Reasons on the test set:",
        "",
        markdown_table(pd.crosstab(frame["reason"], np.where(y_unk, "held-out", "known"))
            .reset_index().rename(columns={"reason": "reason"})),
        "",
        "## Species operating points: known coverage vs held-out named to species (test, "
        "descriptive sweep of the species threshold)",
        "",
        f"Held-out images whose path has the right family (ceiling for 'correct genus or "
        f"family' under any back-off rule): {ceiling:.3f}.",
        "",
        markdown_table(pd.DataFrame(pts)),
        "",
        "## Held-out images: right genus / family by classifier (test)",
        "",
        "Other classifiers fitted on the head's training rows; a back-off rule can only be "
        "as right as the genus/family it backs off to.",
        "",
        markdown_table(probe),
        "",
        "## Risk-coverage on known test images (evidence of the back-off scorer)",
        "",
        markdown_table(rc),
        "",
    ]
    text = "\n".join(out)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
