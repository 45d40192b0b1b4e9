"""Preprocessing variants for EfficientNet-Lite0 leaf features: crop vs letterbox, size.

For each variant the 990 labelled leaf images are embedded with
``create_backbone("efficientnet-lite0", data_overrides=preprocess_overrides(...))`` and
scored two ways, both on the seeded 70/30 split of ``configs/leaf.yaml``:

* species accuracy of a linear probe (L2-normalised features, logistic regression C=10);
* unknown-species AUROC: the 12 held-out species of ``configs/leaf-openset.yaml`` are
  removed from the probe's training rows; known test images vs all held-out images,
  scored by the probe's max probability and by the cosine to the nearest species mean.

    .venv/bin/python bench/preprocessing.py [--variants crop224,letterbox384] \
        [--out bench/results/preprocessing.md]

Prints markdown (date, machine, command); ``--out`` also writes it.
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
import yaml
from _results import publish
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from taxoclass.features.backbones import create_backbone, preprocess_overrides
from taxoclass.features.batching import embed_batches
from taxoclass.model.splits import group_codes, validation_split
from taxoclass.taxonomy.annotations import load_annotations
from taxoclass.taxonomy.labels import encode_labels

ROOT = Path(__file__).resolve().parents[1]
LEAF = ROOT.parent / "shared" / "data" / "leaf"
VARIANTS = {  # name: preprocess_overrides(...) arguments
    "crop224": {"image_size": 224, "resize": "crop"},
    "letterbox224": {"image_size": 224, "resize": "letterbox"},
    "letterbox288": {"image_size": 288, "resize": "letterbox"},
    "letterbox384": {"image_size": 384, "resize": "letterbox"},
    "letterbox384-black": {"image_size": 384, "resize": "letterbox", "pad_fill": "black"},
    "letterbox448": {"image_size": 448, "resize": "letterbox"},
}


def embed(paths: list[str], overrides: dict) -> np.ndarray:
    bb = create_backbone("efficientnet-lite0", data_overrides=preprocess_overrides(**overrides))
    batches = [list(range(i, min(i + 8, len(paths)))) for i in range(0, len(paths), 8)]
    out = np.zeros((len(paths), bb.num_features), dtype=np.float32)
    for ok, feats, bad in embed_batches(paths, bb, batches):
        if bad:
            raise SystemExit(f"could not embed: {bad}")
        out[ok] = feats
    return out


def score(x: np.ndarray, species: np.ndarray, strata: np.ndarray, held: set[str],
          groups: np.ndarray | None = None) -> dict:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    # = taxoclass train's split for leaf.yaml (groups: --group-by, data.group_by)
    is_test = validation_split(strata, 0.3, 0, groups=groups)
    tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    probe = LogisticRegression(C=10, max_iter=3000).fit(x[tr], species[tr])
    acc = float((probe.predict(x[te]) == species[te]).mean())
    unknown = np.isin(species, sorted(held))
    tr_k, te_k = tr[~unknown[tr]], te[~unknown[te]]
    probe = LogisticRegression(C=10, max_iter=3000).fit(x[tr_k], species[tr_k])
    rows = np.concatenate([te_k, np.flatnonzero(unknown)])
    is_unk = np.r_[np.zeros(len(te_k)), np.ones(unknown.sum())]
    maxprob = probe.predict_proba(x[rows]).max(axis=1)
    means = np.stack([x[tr_k][species[tr_k] == c].mean(0) for c in probe.classes_])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    cosine = (x[rows] @ means.T).max(axis=1)
    return {"species_acc": acc, "auroc_maxprob": float(roc_auc_score(is_unk, -maxprob)),
            "auroc_cosine": float(roc_auc_score(is_unk, -cosine))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--group-by", default=None, metavar="FIELD",
                        help="image or annotation field whose groups stay on one side of the "
                             "split (data.group_by); default: split by image")
    args = parser.parse_args(argv)
    if not (LEAF / "annotations.json").is_file():
        print(f"Data not found: {LEAF / 'annotations.json'}", file=sys.stderr)
        return 2
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; expected some of {list(VARIANTS)}")
    ann = load_annotations(LEAF / "annotations.json")
    rows = ann.labelled_images(LEAF, group_by=args.group_by)
    groups = group_codes(rows["group"], args.group_by) if args.group_by else None
    _, nodes = encode_labels(ann.taxonomy(), rows)
    strata = np.array(["/".join(n) for n in nodes])  # as workflows.validation_mask
    species = (rows["genus"] + " " + rows["species"]).str.strip().to_numpy()
    held = set(yaml.safe_load((ROOT / "configs" / "leaf-openset.yaml").read_text())
               ["data"]["holdout_species"])
    lines = [
        "# Preprocessing variants (EfficientNet-Lite0, leaf data)", "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"- command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        f"- {len(rows)} images; linear probe C=10 on the leaf.yaml 70/30 split; AUROC: "
        f"{len(held)} held-out species vs known test images", "",
        "| variant | species acc (probe) | unknown AUROC, max prob | unknown AUROC, cosine "
        "| embed s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        t0 = time.perf_counter()
        x = embed(rows["path"].tolist(), VARIANTS[name])
        seconds = time.perf_counter() - t0
        r = score(x, species, strata, held, groups)
        lines.append(f"| {name} | {r['species_acc']:.3f} | {r['auroc_maxprob']:.3f} | "
                     f"{r['auroc_cosine']:.3f} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
