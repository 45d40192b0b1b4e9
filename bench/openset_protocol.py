"""Open-set figures under the protocol (issue 18): unknown species, genera and families.

Per hold-out seed (1..N; seed 0 chose the old fixed defaults in earlier sessions and is
kept out of every table): whole families (at least one family stays known), then whole
genera of families that keep a known genus, then species whose genus keeps a known
species are held out of training (``--families/--genera/--species`` of each; drawn by
``taxoclass.openset.evaluation.hold_out_taxa``). The known species' images are split
70/30 (stratified by species, seeded) into a training part and a known test part. The
model is trained with the public API only (``taxoclass.train`` on an annotation file of
the known training images, the config of ``configs/leaf.yaml`` with ``openset.recipe``
set; its own validation split and its leave-taxa-out selection rounds see only those
images), then ``ModelBundle.predict_with_backoff`` answers the known test
images and every held-out image (cached embeddings, nothing recomputed).

Figures per seed: unknown-detection AUROC of the lowest-rank back-off evidence and of the
outlier score; species-answer precision over known images and over all images at an
unknown share of ``--share`` (held-out images reweighted to make up that share); known
images named to species; where held-out images land, per held-out level (correct genus /
correct family / wrong higher taxon / named to a wrong species / unknown); the recipe the
training chose and what it expected. Three arms run on the same seeds, held-out taxa and
splits and are compared pairwise: ``auto`` (the default), ``old`` (the old defaults as
they were: Mahalanobis detector, gate combiner, path-logit confidence, 97.5% gate
quantile, thresholds on known validation images; ``openset.recipe: fixed`` with
``openset.rounds: 0``) and ``fixed`` (the same recipe with ``openset.recipe: fixed``, whose
thresholds are fitted with the simulated unknowns of the leave-taxa-out rounds).

    export OMP_NUM_THREADS=1
    nice -n 10 timeout 1500 .venv/bin/python bench/openset_protocol.py --recipe fixed --seeds 1-6
    nice -n 10 timeout 1500 .venv/bin/python bench/openset_protocol.py --recipe auto --seeds 1-6
    nice -n 10 timeout 1500 .venv/bin/python bench/openset_protocol.py --recipe old --seeds 1-6
    .venv/bin/python bench/openset_protocol.py --report   # -> bench/results/openset_protocol.md

One JSON per (data, recipe, seed) under ``bench/results/openset_protocol/``; ``--report``
merges what is there. ``--data synthetic`` runs the recipe selection on a second data set
(:mod:`openset_synthetic`).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "leaf.yaml"
LEAF = ROOT.parent / "shared" / "data" / "leaf"
OUT = ROOT / "bench" / "results" / "openset_protocol"
REPORT = ROOT / "bench" / "results" / "openset_protocol.md"
#: the old fixed defaults (bench/openset.py, seed 0): the fair control of ``auto``
FIXED = {"recipe": "fixed", "detector": "mahalanobis", "scope": "global", "combiner": "gate",
         "confidence": "path_logit", "gate_quantile": 0.975}
MAX_SHARE = 0.1  # a whole genus or family above this share of the images is never held out
OUTCOMES = ("named_species", "correct_genus", "correct_family", "wrong_higher", "unknown")


# ------------------------------------------------------------------------------ hold-out
def held_out_sets(rows: pd.DataFrame, ranks: Sequence[str], seed: int,
                  counts: Mapping[str, int], max_share: float = MAX_SHARE
                  ) -> dict[str, list[str]]:
    """Rank -> held-out names, drawn top-down (a genus is drawn from what the held-out
    families left, species from what the held-out genera left). A whole taxon above the
    lowest rank holding more than ``max_share`` of all images is never drawn (the leaf
    data's Quercus and Fagaceae hold 38% and 42%: without them in training the known test
    set would be a fraction of itself); the selection rounds of ``openset.recipe: auto``
    follow the same 10% rule."""
    from taxoclass.openset.evaluation import hold_out_taxa, truth_names

    held: dict[str, list[str]] = {}
    left = rows
    for rank in ranks:
        n = int(counts.get(rank, 0))
        if n <= 0:
            continue
        names = truth_names(left, ranks)[rank]
        pool = left
        if rank != ranks[-1]:
            size = pd.Series(names).value_counts()
            big = list(size.index[size > max_share * len(rows)])
            pool = left[~np.isin(names, big)]
        held[rank] = hold_out_taxa(pool, ranks, rank=rank, n=n, seed=seed)
        left = left[~np.isin(names, held[rank])]
    return held


def held_level(rows: pd.DataFrame, ranks: Sequence[str], held: Mapping[str, Sequence[str]]
               ) -> np.ndarray:
    """Per row, the rank of the held-out taxon it belongs to ("" for known rows)."""
    from taxoclass.openset.evaluation import split_known_unknown_taxa

    level = np.full(len(rows), "", dtype=object)
    for rank in ranks:  # top-down: a row under a held family is "family"
        hit = split_known_unknown_taxa(rows, {rank: held.get(rank, [])}, ranks) & (level == "")
        level[hit] = rank
    return level


# ------------------------------------------------------------------------------ metrics
def _auroc(is_unknown: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    s = np.nan_to_num(np.asarray(score, dtype=float), nan=np.inf)
    return float(roc_auc_score(is_unknown, s))


def precision_at_share(named: np.ndarray, right: np.ndarray, is_unknown: np.ndarray,
                       share: float) -> float:
    """Precision of species answers when held-out images make up ``share`` of all images
    (each group's images reweighted to its share; held-out answers are never right)."""
    k, u = ~is_unknown, is_unknown
    wk, wu = (1 - share) / max(k.sum(), 1), share / max(u.sum(), 1)
    answered = wk * named[k].sum() + wu * named[u].sum()
    return float(wk * (named & right)[k].sum() / answered) if answered else float("nan")


def landing(frame: pd.DataFrame, truth: Mapping[str, np.ndarray], ranks: Sequence[str],
            mask: np.ndarray) -> dict[str, float]:
    """Where the ``mask`` rows land, as shares adding up to 1 (``OUTCOMES``), from
    ``taxoclass.openset.evaluation.outcome_summary``."""
    from taxoclass.openset.evaluation import outcome_summary

    s = outcome_summary(frame[mask].reset_index(drop=True),
                        {r: np.asarray(v)[mask] for r, v in truth.items()},
                        np.ones(int(mask.sum()), dtype=bool), ranks)
    out = {"n": int(mask.sum()), "named_species": s["unknown_named_species"],
           "correct_genus": s.get("unknown_correct_genus", 0.0),
           "correct_family": s.get("unknown_correct_family", 0.0),
           "wrong_higher": s["unknown_wrong_higher"], "unknown": s["unknown_unknown"]}
    out["correct_genus_or_family"] = out["correct_genus"] + out["correct_family"]
    return out


def seed_figures(frame: pd.DataFrame, evidence: np.ndarray, truth: Mapping[str, np.ndarray],
                 level: np.ndarray, ranks: Sequence[str], share: float) -> dict:
    """Every figure of one seed from the back-off answers on the test images."""
    from taxoclass.openset.evaluation import correct_by_rank

    unk = level != ""
    lowest = ranks[-1]
    pred = {r: frame[r].to_numpy(dtype=object) for r in ranks}
    right = correct_by_rank(pred, truth, ranks)[lowest]
    named = frame["taxon_rank"].to_numpy(dtype=object) == lowest
    out = {"n_known": int((~unk).sum()), "n_unknown": int(unk.sum()),
           "auroc_evidence": _auroc(unk, -evidence),
           "auroc_outlier": _auroc(unk, frame["outlier_score"].to_numpy()),
           "coverage_known_species": float(named[~unk].mean()),
           "precision_species_known": (float(right[named & ~unk].mean())
                                       if (named & ~unk).any() else float("nan")),
           "precision_species_all": precision_at_share(named, right, unk, share),
           "unknown_named_species": float(named[unk].mean()),
           "landing": {lv: landing(frame, truth, ranks, level == lv)
                       for lv in ranks if (level == lv).any()}}
    for lv in out["landing"]:  # each held-out level against the known images alone
        m = ~unk | (level == lv)
        out["landing"][lv]["auroc_evidence"] = _auroc(unk[m], -evidence[m])
        out["landing"][lv]["auroc_outlier"] = _auroc(
            unk[m], frame["outlier_score"].to_numpy()[m])
    return out


# ------------------------------------------------------------------------------ leaf
def _subset_annotations(src: dict, image_ids: set, folder: Path) -> Path:
    """An annotation file of ``src`` with only ``image_ids`` (and their categories)."""
    anns = [a for a in src["annotations"] if a["image_id"] in image_ids]
    cats = {a["category_id"] for a in anns}
    data = {**src, "images": [i for i in src["images"] if i["image_id"] in image_ids],
            "annotations": anns,
            "categories": [c for c in src["categories"] if c["category_id"] in cats]}
    path = folder / "known_train.json"
    path.write_text(json.dumps(data))
    return path


def openset_section(recipe: str, defaults: Mapping) -> dict:
    """The ``openset`` overrides of a recipe arm: ``auto``; ``fixed`` (the old detector,
    combiner, confidence and gate quantile, thresholds fitted with the rounds' simulated
    unknowns); ``old`` (the same without rounds: thresholds on known validation images
    only, as before issue 18)."""
    if recipe == "auto":
        return {"recipe": "auto"}
    out = {k: v for k, v in FIXED.items() if k != "recipe" or "recipe" in defaults}
    if recipe == "old":
        out["rounds"] = 0
    return out


def train_known(base: dict, ann: Path, root: Path, folder: Path, recipe: str, seed: int
                ) -> Path:
    """``taxoclass.train`` on the known training images; returns the bundle folder."""
    import taxoclass
    from taxoclass.config import DEFAULTS

    cfg = copy.deepcopy(base)
    cfg["data"].update({"annotations": str(ann), "images_root": str(root), "split_seed": seed})
    cfg["train"]["seed"] = seed
    cfg["openset"].update(openset_section(recipe, DEFAULTS["openset"]))
    cfg["out"] = str(folder / f"model-{recipe}")
    return Path(taxoclass.train(cfg))


def _chosen(bundle_dir: Path, bundle) -> dict:
    """The recipe the training chose (``openset_selection``), else the fitted scorer's."""
    metrics = json.loads((bundle_dir / "metrics_val.json").read_text())
    sel = metrics.get("openset_selection") or bundle.extra.get("openset_selection")
    if sel:
        return {"chosen": sel.get("chosen"), "expected": sel.get("expected"),
                "expected_nested": sel.get("expected_nested"),
                "rounds": sel.get("rounds"), "candidates": sel.get("candidates")}
    c = bundle.scorer.combiner.to_dict()
    return {"chosen": {"detector": bundle.scorer.detector.method,
                       "combiner": c.get("method"),
                       "confidence": c.get("confidence"),
                       "gate_quantile": c.get("gate_quantile")}}


@dataclass
class Dataset:
    """What a protocol run needs: the base config, the annotation dict and its images
    root, the labelled rows (``path``, rank columns) and their embeddings (``x_of(mask)``)."""

    name: str
    cfg: dict
    src: dict
    root: Path
    rows: pd.DataFrame
    x_of: Callable[[np.ndarray], np.ndarray]


def leaf_dataset() -> Dataset:
    """The leaf data of configs/leaf.yaml with its cached embeddings."""
    from taxoclass import load_annotations, load_config
    from taxoclass.pipelines.data import config_embeddings

    base = load_config(CONFIG)
    rows = load_annotations(LEAF / "annotations.json").labelled_images(LEAF)
    rows = rows.reset_index(drop=True)

    def x_of(mask: np.ndarray) -> np.ndarray:
        x, found, _ = config_embeddings(base, rows[mask].reset_index(drop=True))
        if not found.all():
            raise SystemExit(f"{int((~found).sum())} images have no cached embedding")
        return x

    return Dataset("leaf", base, json.loads((LEAF / "annotations.json").read_text()), LEAF,
                   rows, x_of)


def run_seed(ds: Dataset, seed: int, recipe: str, counts: Mapping[str, int], share: float
             ) -> dict:
    """One hold-out seed of the protocol, one recipe arm."""
    from taxoclass.bundle import ModelBundle
    from taxoclass.model.splits import validation_split
    from taxoclass.openset.evaluation import truth_names

    t0 = time.perf_counter()
    rows, ranks = ds.rows, list(ds.cfg["data"]["ranks"])
    held = held_out_sets(rows, ranks, seed, counts)
    level = held_level(rows, ranks, held)
    known = level == ""
    strata = truth_names(rows, ranks)[ranks[-1]]
    test_known = np.zeros(len(rows), dtype=bool)
    test_known[np.flatnonzero(known)[validation_split(strata[known], 0.3, seed)]] = True
    train_ids = set(rows["image_id"][known & ~test_known])
    test = test_known | ~known
    with tempfile.TemporaryDirectory(prefix="openset-protocol-") as tmp:
        ann = _subset_annotations(ds.src, train_ids, Path(tmp))
        bundle_dir = train_known(ds.cfg, ann, ds.root, Path(tmp), recipe, seed)
        bundle = ModelBundle.load(bundle_dir)
        chosen = _chosen(bundle_dir, bundle)
        train_s = time.perf_counter() - t0
        x = ds.x_of(test)
        frame, decoded = bundle.predict_with_backoff(x)
        evidence, _ = bundle.scorer.evidence(bundle.scorer_input(x), decoded)
    truth = truth_names(rows[test].reset_index(drop=True), ranks)
    figs = seed_figures(frame, evidence[ranks[-1]], truth, level[test], ranks, share)
    return {"data": ds.name, "recipe": recipe, "seed": seed, "share": share,
            "held_out": held, "n_train": len(train_ids), **figs, **chosen,
            "train_seconds": train_s, "seconds": time.perf_counter() - t0,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "uptime": _uptime()}


def _code_state() -> dict:
    """The commit the run used and the library files then changed but not committed (the
    tree is shared while others work)."""
    def git(*a):
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True,
                              text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--short", "--", "taxoclass").splitlines()}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


# ------------------------------------------------------------------------------ main
def _seeds(text: str) -> list[int]:
    a, _, b = text.partition("-")
    return list(range(int(a), int(b or a) + 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("leaf", "synthetic"), default="leaf")
    ap.add_argument("--recipe", choices=("auto", "fixed", "old"), default="auto",
                    help="auto; fixed: old settings, new thresholds; old: as before issue 18")
    ap.add_argument("--seeds", default="1-6", help="hold-out seeds, e.g. 1-6 (0 is kept out)")
    ap.add_argument("--families", type=int, default=1, help="whole families held out")
    ap.add_argument("--genera", type=int, default=3, help="whole genera held out")
    ap.add_argument("--species", type=int, default=12, help="species with a known congener")
    ap.add_argument("--share", type=float, default=0.2, help="unknown share for precision")
    ap.add_argument("--report", action="store_true", help="merge the runs into the report")
    args = ap.parse_args(argv)
    if args.report:
        from openset_protocol_report import write_report

        write_report(OUT, REPORT)
        return 0
    if args.data == "synthetic":
        from openset_synthetic import synthetic_dataset

        tmp = tempfile.TemporaryDirectory(prefix="openset-synthetic-")
        ds = synthetic_dataset(Path(tmp.name), CONFIG)
    else:
        if not (LEAF / "annotations.json").is_file():
            print(f"Need {LEAF / 'annotations.json'}.", file=sys.stderr)
            return 2
        ds = leaf_dataset()
    counts = {"family": args.families, "genus": args.genera, "species": args.species}
    OUT.mkdir(parents=True, exist_ok=True)
    for seed in _seeds(args.seeds):
        rec = run_seed(ds, seed, args.recipe, counts, args.share)
        rec["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        rec["machine"] = f"{platform.node()} ({os.cpu_count()} CPUs)"
        rec.update(_code_state())
        path = OUT / f"{args.data}.{args.recipe}.seed{seed}.json"
        path.write_text(json.dumps(rec, indent=1, default=_json_default))
        print(f"{path.name}: AUROC {rec['auroc_evidence']:.3f}, precision all "
              f"{rec['precision_species_all']:.3f}, coverage {rec['coverage_known_species']:.3f}"
              f", {rec['seconds']:.0f} s", flush=True)
    return 0


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(type(v))


if __name__ == "__main__":
    raise SystemExit(main())
