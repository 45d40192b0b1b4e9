"""Leaf data, EfficientNet-Lite0 features: taxoclass vs flat and hierarchical baselines.

One seeded 70/30 split stratified by species (``stratified_split(strata, 0.3, seed=0)``,
strata = full node path of each label), the same for every method:

- taxoclass: ``train_head`` + class-dependency loss + coherent decoding, hyper-parameters
  from ``configs/leaf.yaml`` (what ``taxoclass train --config configs/leaf.yaml`` runs);
- flat logistic regression on species over L2-normalised features, ranks derived by
  summing up the tree (``FlatLinearProbe``), at C=1 (sklearn default) and at the C
  selected by inner validation on the training part;
- hiclass ``LocalClassifierPerParentNode`` with the same logistic regression;
- cosine 1-NN (``NearestNeighbour``) and class prototypes (``ClassPrototype``).

Hyper-parameters are selected on the training part only (``--tune``: three inner
stratified 70/30 splits of the 693 training images, seeds 1-3, averaged); the 30%
test part is used once, for this table. ``--group-by FIELD`` (an image or annotation
field, ``data.group_by``) keeps each group on one side of every split
(``taxoclass.model.splits.validation_split``); without it the splits are unchanged.

    .venv/bin/python bench/leaf_hierarchy.py           # ~1 min on 2 CPU cores
    .venv/bin/python bench/leaf_hierarchy.py --tune    # + the inner-validation grid (~5 min)

Writes ``bench/results/leaf_hierarchy.md``.
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
import torch
from _results import publish

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "leaf"
CONFIG = ROOT / "configs" / "leaf.yaml"
FLAT_C_GRID = (1.0, 10.0, 100.0, 1000.0)


def load_data(group_by: str | None = None):
    """Taxonomy, embeddings (computed into the cache if absent), targets, strata, and
    the group code of each row (``group_by``; None without)."""
    from taxoclass.config import load_config
    from taxoclass.model.splits import group_codes
    from taxoclass.pipelines.data import config_embeddings
    from taxoclass.taxonomy.annotations import load_annotations
    from taxoclass.taxonomy.labels import encode_labels

    ann_path = DATA / "annotations.json"
    ann = load_annotations(ann_path)
    tax = ann.taxonomy()
    rows = ann.labelled_images(DATA, group_by=group_by)
    y, nodes = encode_labels(tax, rows)
    # The features configs/leaf.yaml trains on (backbone, image size, resize), from its
    # cache; computed there when absent.
    x, keep, _ = config_embeddings(load_config(CONFIG), rows)
    x = x[keep]
    y = {r: v[keep] for r, v in y.items()}
    strata = np.array(["/".join(n) for n, k in zip(nodes, keep) if k])
    groups = group_codes(rows["group"][keep], group_by) if group_by else None
    return tax, x, y, strata, groups


def metrics_row(name, decoded_path, y, tax, fit_s, note=""):
    from taxoclass.model.metrics import evaluate_predictions

    m = evaluate_predictions(decoded_path, y, tax)
    row = {"method": name, "fit_s": fit_s, "note": note}
    for r in tax.ranks:
        row[f"{r}_acc"] = m["ranks"][r]["accuracy"]
        row[f"{r}_f1"] = m["ranks"][r]["macro_f1"]
    row["hF1"] = m["hierarchical"]["f1"]
    sev = species_severity(decoded_path, y, tax)
    row.update(sev)
    row["coherent"] = m["coherence_rate"]
    return row


def species_severity(path, y, tax) -> dict:
    """Over wrong species predictions: mean tree distance and mean LCA height."""
    sp = tax.ranks[-1]
    wrong = np.flatnonzero((y[sp] >= 0) & (np.asarray(path[sp]) != y[sp]))
    dist, height = [], []
    for i in wrong:
        t = tax.node(sp, int(y[sp][i]))
        p = tax.node(sp, int(path[sp][i]))
        dist.append(tax.distance(t, p))
        height.append(len(tax.ranks) - len(tax.lca(t, p)))
    return {"n_wrong": len(wrong), "sev_dist": float(np.mean(dist)) if dist else 0.0,
            "sev_lca_h": float(np.mean(height)) if height else 0.0}


# ----------------------------------------------------------------------------- methods
def fit_taxoclass(tax, x_tr, y_tr, x_te, cfg, method=None):
    from taxoclass.model.decoding import decode
    from taxoclass.model.training import normalize, train_head

    t0 = time.perf_counter()
    res = train_head(x_tr, y_tr, None, None, tax, model=cfg["model"], loss=cfg["loss"],
                     train=cfg["train"], normalize_inputs=bool(cfg["model"].get("normalize", True)))
    fit = time.perf_counter() - t0
    xt = normalize(x_te) if cfg["model"].get("normalize", True) else torch.as_tensor(x_te)
    with torch.inference_mode():
        logits = res.head(xt)
    return decode(logits, tax, method=method or cfg["decode"]["method"]), fit


def fit_flat(tax, x_tr, y_tr, x_te, C):
    from taxoclass.model.baselines import FlatLinearProbe

    t0 = time.perf_counter()
    model = FlatLinearProbe(tax, C=C, max_iter=3000).fit(x_tr, y_tr)
    return model.predict(x_te), time.perf_counter() - t0


def fit_hiclass(tax, x_tr, y_tr, x_te, C):
    """hiclass LCPPN + LogisticRegression; labels are full paths, so unique per node."""
    from hiclass import LocalClassifierPerParentNode
    from sklearn.linear_model import LogisticRegression

    from taxoclass.model.baselines import l2_normalise

    def labels(targets):
        cols = []
        for r in tax.ranks:
            nodes = tax.nodes(r)
            cols.append(["/".join(nodes[int(i)]) for i in targets[r]])
        return np.array(cols, dtype=object).T

    t0 = time.perf_counter()
    clf = LocalClassifierPerParentNode(local_classifier=LogisticRegression(C=C, max_iter=3000))
    clf.fit(l2_normalise(x_tr), labels(y_tr))
    fit = time.perf_counter() - t0
    pred = clf.predict(l2_normalise(x_te))
    path = {}
    for j, r in enumerate(tax.ranks):
        index = {"/".join(n): k for k, n in enumerate(tax.nodes(r))}
        path[r] = np.array([index.get(str(v), -1) for v in pred[:, j]])
    return path, fit


def fit_nn(tax, x_tr, y_tr, x_te):
    from taxoclass.model.baselines import NearestNeighbour

    t0 = time.perf_counter()
    model = NearestNeighbour(tax, mode="species").fit(x_tr, y_tr)
    return model.predict(x_te), time.perf_counter() - t0


def fit_proto(tax, x_tr, y_tr, x_te):
    from taxoclass.model.baselines import ClassPrototype

    t0 = time.perf_counter()
    model = ClassPrototype(tax).fit(x_tr, y_tr)
    return model.predict(x_te), time.perf_counter() - t0


# ----------------------------------------------------------------------------- tuning
def tune(tax, x, y, strata, train_idx, cfg, groups=None) -> list[dict]:
    """Inner validation on the training part only: 3 stratified splits, averaged."""
    import copy

    from taxoclass.model.splits import validation_split

    inner = []
    for seed in (1, 2, 3):
        m = validation_split(strata[train_idx], 0.3, seed,
                             groups=None if groups is None else groups[train_idx])
        inner.append((train_idx[~m], train_idx[m]))

    def sub(idx):
        return {r: v[idx] for r, v in y.items()}

    def variant(name, **changes):
        c = copy.deepcopy(cfg)
        for key, value in changes.items():
            section, field = key.split("__")
            c[section][field] = value
        return name, c

    base = dict(train__lr=0.03, train__epochs=300, train__batch_size=128, train__patience=None)
    variants = [
        variant("old defaults (lr 3e-3, wd 1e-4, early stop)", train__lr=0.003,
                train__epochs=300, train__batch_size=128, train__weight_decay=1e-4,
                train__patience=30, loss__label_smoothing=0.0),
        variant("lr 0.03, wd 1e-4, 300 ep", **base, train__weight_decay=1e-4,
                loss__label_smoothing=0.0),
        variant("lr 0.03, wd 0.1", **base, train__weight_decay=0.1, loss__label_smoothing=0.0),
        variant("lr 0.03, wd 0.1, ls 0.05  (chosen)", **base, train__weight_decay=0.1,
                loss__label_smoothing=0.05),
        variant("lr 0.03, wd 0.1, ls 0.1", **base, train__weight_decay=0.1,
                loss__label_smoothing=0.1),
        variant("lr 0.03, wd 0.1, ls 0.05, dependency 0", **base, train__weight_decay=0.1,
                loss__label_smoothing=0.05, loss__dependency_weight=0.0),
        variant("MLP 1024, dropout 0.3, lr 3e-3", **{**base, "train__lr": 0.003},
                model__hidden=1024, model__dropout=0.3, train__weight_decay=1e-4,
                loss__label_smoothing=0.0),
    ]
    from taxoclass.model.decoding import decode
    from taxoclass.model.training import normalize, train_head

    out = []
    for name, c in variants:
        rows: dict[str, list] = {"path": [], "marginal": []}
        for a, b in inner:
            # early stopping (old defaults) watches the inner validation part
            val = (x[b], sub(b)) if c["train"].get("patience") else (None, None)
            t0 = time.perf_counter()
            res = train_head(x[a], sub(a), *val, tax, model=c["model"], loss=c["loss"],
                             train=c["train"])
            fit = time.perf_counter() - t0
            with torch.inference_mode():
                logits = res.head(normalize(x[b]))
            for method in rows:
                d = decode(logits, tax, method=method)
                rows[method].append(metrics_row(name, d.path, sub(b), tax, fit))
        for method, r in rows.items():
            out.append(_mean(r, f"taxoclass: {name}", method))
            print(_fmt_tune(out[-1]), flush=True)
    for C in FLAT_C_GRID:
        rows = []
        for a, b in inner:
            d, fit = fit_flat(tax, x[a], sub(a), x[b], C)
            rows.append(metrics_row("flat", d.path, sub(b), tax, fit))
        out.append(_mean(rows, f"flat logistic regression C={C:g}", "marginal"))
        print(_fmt_tune(out[-1]), flush=True)
    return out


def _mean(rows, name, method):
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float))]
    return {"method": name, "decode": method, **{k: float(np.mean([r[k] for r in rows]))
                                                  for k in keys}}


def _fmt_tune(r):
    return (f"| {r['method']} | {r['decode']} | {r['family_acc']:.3f} | {r['genus_acc']:.3f} | "
            f"{r['species_acc']:.3f} | {r['hF1']:.3f} | {r['sev_dist']:.2f} | {r['fit_s']:.1f} |")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", action="store_true", help="also run the inner-validation grid")
    ap.add_argument("--flat-c", type=float, default=None,
                    help="C of the tuned flat probe (default: chosen by inner validation "
                         "with --tune, else 100, the value that inner validation picked)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--group-by", default=None, metavar="FIELD",
                    help="image or annotation field whose groups stay on one side of every "
                         "split (data.group_by); default: split by image")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "leaf_hierarchy.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from taxoclass.config import load_config
    from taxoclass.model.splits import validation_split

    if not (DATA / "annotations.json").is_file():
        print(f"skip: {DATA} not found (see shared/data/README.md)")
        return 0
    cfg = load_config(CONFIG)
    tax, x, y, strata, groups = load_data(args.group_by)
    is_test = validation_split(strata, 0.3, seed=0, groups=groups)
    tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    y_tr, y_te = {r: v[tr] for r, v in y.items()}, {r: v[te] for r, v in y.items()}

    tune_rows = tune(tax, x, y, strata, tr, cfg, groups) if args.tune else []
    flat_c = args.flat_c
    if flat_c is None:
        flats = [r for r in tune_rows if r["method"].startswith("flat")]
        # Without --tune: the C that --tune picked on configs/leaf.yaml's features (384 px
        # letterbox, 2026-11-23); it was 100 on the old 224 px centre-crop features.
        flat_c = (float(max(flats, key=lambda r: r["species_acc"])["method"].split("C=")[1])
                  if flats else 1000.0)

    rows = []
    d, fit = fit_taxoclass(tax, x[tr], y_tr, x[te], cfg)
    t = cfg["train"]
    rows.append(metrics_row(
        "**taxoclass** (configs/leaf.yaml)", d.path, y_te, tax, fit,
        f"linear heads, dependency {cfg['loss']['dependency_weight']}, label smoothing "
        f"{cfg['loss']['label_smoothing']}, AdamW lr {t['lr']} wd {t['weight_decay']}, "
        f"batch {t['batch_size']}, {t['epochs']} epochs, decode {cfg['decode']['method']}"))
    d, fit = fit_flat(tax, x[tr], y_tr, x[te], flat_c)
    rows.append(metrics_row(f"flat logistic regression, C={flat_c:g}", d.path, y_te, tax, fit,
                            "C chosen by inner validation"))
    d, fit = fit_flat(tax, x[tr], y_tr, x[te], 1.0)
    rows.append(metrics_row("flat logistic regression, C=1", d.path, y_te, tax, fit,
                            "sklearn default C"))
    path, fit = fit_hiclass(tax, x[tr], y_tr, x[te], flat_c)
    rows.append(metrics_row(f"hiclass LCPPN + LogisticRegression C={flat_c:g}", path, y_te,
                            tax, fit, "top-down: per parent node, LR picks a child"))
    d, fit = fit_nn(tax, x[tr], y_tr, x[te])
    rows.append(metrics_row("cosine 1-NN", d.path, y_te, tax, fit, "species path"))
    d, fit = fit_proto(tax, x[tr], y_tr, x[te])
    rows.append(metrics_row("class prototypes", d.path, y_te, tax, fit, "cosine, T=0.05, path"))

    head = ("| method | family acc | family mF1 | genus acc | genus mF1 | species acc | "
            "species mF1 | hier. F1 | wrong species | mean tree dist. | mean LCA height | "
            "coherent | fit s |")
    lines = [
        "# Leaf hierarchy benchmark (EfficientNet-Lite0 features, 224 px)",
        "",
        f"{dt.date.today().isoformat()} · {platform.node()} · {os.cpu_count()} CPUs visible, "
        f"torch threads {torch.get_num_threads()} · torch {torch.__version__} · "
        f"Python {platform.python_version()}",
        "",
        f"Data: {len(x)} labelled leaf images ({tax.sizes}), seeded 70/30 split stratified by "
        f"species path (`stratified_split(strata, 0.3, seed=0)`): {len(tr)} train / "
        f"{len(te)} test. Same split for every method."
        + (f" Groups of `{args.group_by}` kept on one side of every split "
           f"(`validation_split(..., groups=...)`)." if args.group_by else ""),
        "",
        "Command: `.venv/bin/python bench/leaf_hierarchy.py "
        + " ".join(argv if argv is not None else sys.argv[1:]) + "`  ·  the taxoclass row is "
        "what `taxoclass train --config configs/leaf.yaml` trains (its metrics_val.json).",
        "",
        head,
        "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['family_acc']:.3f} | {r['family_f1']:.3f} | "
            f"{r['genus_acc']:.3f} | {r['genus_f1']:.3f} | {r['species_acc']:.3f} | "
            f"{r['species_f1']:.3f} | {r['hF1']:.3f} | {r['n_wrong']} | {r['sev_dist']:.2f} | "
            f"{r['sev_lca_h']:.2f} | {r['coherent']:.3f} | {r['fit_s']:.1f} |")
    lines += ["", "Notes per row:", ""] + [f"- {r['method']}: {r['note']}" for r in rows]
    lines += [
        "",
        "Mistake severity is over wrong *species* predictions: tree distance between true and "
        "predicted species (2 = same genus, 4 = same family, 6 = different family) and LCA "
        "height (1 = same genus … 3 = different family); lower is better.",
    ]
    if tune_rows:
        lines += [
            "",
            "## Selection on the training part only (inner validation)",
            "",
            "Three stratified 70/30 splits of the 693 training images (seeds 1, 2, 3; ~485 fit "
            "/ ~208 validation), averaged. The test part above was not looked at for any choice.",
            "",
            "| variant | decode | family acc | genus acc | species acc | hier. F1 | "
            "mean tree dist. | fit s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ] + [_fmt_tune(r) for r in tune_rows]
    notes = Path(args.out).with_suffix(".notes.md")
    if notes.is_file():
        lines += ["", notes.read_text()]
    text = "\n".join(lines) + "\n"
    publish(text, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
