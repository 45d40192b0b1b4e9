"""Synthetic plots from real leaf images: calibrated aggregation rules vs arg-max-union.

The classifier is the real product path: a taxoclass multi-rank head trained with
``taxoclass.model.training.train_head`` (hyper-parameters from ``configs/leaf.yaml``) on the
TRAINING split of the EfficientNet-Lite0 leaf embeddings (``runs/leaf-lite0-embeddings``;
the same seeded 70/30 split as ``taxoclass train --config configs/leaf.yaml``), tiles
embedded by ``create_backbone("efficientnet-lite0")`` and decoded by the bundle.

Two disjoint sets of plots:

- TEST plots are composed only from the HELD-OUT 30% of the leaf images;
- CALIBRATION plots are composed only from TRAINING-split images. So that calibration sees
  the same situation as test (tiles of leaves the head never saw), the training split is
  cut once more: a calibration head is trained on ~70% of the training images and the
  calibration plots use the other ~30%. Thresholds and every other setting are chosen
  on the calibration plots with the calibration head; the test plots are then scored
  once with the full training-split head. No test image is used for any choice.

Each plot has 1–8 taxa (``--richness``: uniform on 1–8 by default), individual counts
drawn from the real dune-meadow plot table (``vegetation-plots/dune.csv``); leaves are
pasted at random positions, scales and rotations (straddling tile borders, overlapping)
onto a cluttered background (so many tiles hold only soil, stones and twigs). Tile
embeddings are cached under ``--out`` and reused across runs.

    .venv/bin/python bench/synthetic_plots.py [--n-test 40] [--n-cal 60] \
        [--results bench/results/synthetic_plots.md]

Writes ``results.csv`` and ``results.md`` into ``--out`` and the markdown also to
``--results``; ``--quadrat`` also times ``plot_report`` on the real quadrat photo.

This script explores rules; its "best calibrated rule" is the best of several rules on
the TEST plots, its baseline is untuned, and its ``± SE`` treats plots as independent
although they share leaf images. The figures BENCHMARKS.md reports come from
``bench/plots_fair.py``: the product's own ``calibrate-plots`` choice against arg-max
union with the same calibration budget, on DS@GT's 3x3 grid too, with intervals clustered
by source image and repeated over seeds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from _results import markdown_table, publish
from PIL import Image

from taxoclass.bundle import ModelBundle
from taxoclass.config import load_config
from taxoclass.features.backbones import backbone_spec
from taxoclass.features.views import clutter_background
from taxoclass.model.heads import MultiRankHead
from taxoclass.model.splits import group_codes, validation_split
from taxoclass.model.training import train_head
from taxoclass.openset.detectors import OutlierDetector
from taxoclass.pipelines.data import config_embeddings, view_embeddings, with_views
from taxoclass.plots.evaluation import evaluate_plots
from taxoclass.plots.rules import aggregate_plot
from taxoclass.plots.search import species_f1
from taxoclass.plots.selection import TileSettings, rule_scores
from taxoclass.plots.tiling import BundleTileClassifier, PlotTiles, crop_tiles, make_tiles
from taxoclass.taxonomy.annotations import load_annotations
from taxoclass.taxonomy.labels import encode_labels

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CONFIG = ROOT / "configs" / "leaf.yaml"
ALL_GRIDS = (2, 3, 4)
GRID_SETS = {"3x3": ("3x3",), "4x4": ("4x4",), "2x2+4x4": ("2x2", "4x4")}
CACHE_VERSION = "v2"

# Search space (chosen on calibration plots only).
SPECIES_T = np.unique(np.round(np.concatenate([
    np.linspace(0.02, 0.98, 49), 1.0 - np.logspace(-4, -1.3, 12), np.logspace(-3, -1.7, 6),
    [0.0]]), 6))
GENUS_T = np.unique(np.round(np.concatenate([np.linspace(0.05, 0.95, 19),
                                             1.0 - np.logspace(-4, -1.3, 8)]), 6))
SPACE = {
    # rule: (top_k options, min_tile_prob options, min_tiles options)
    "argmax_union": ((None,), (0.0,), (1, 2, 3)),
    "max": ((None,), (0.0,), (1, 2, 3)),
    "noisy_or": ((None, 1, 3), (0.0, 0.2, 0.4), (1, 2, 3)),
    "mean": ((None, 1, 3), (0.0, 0.2, 0.4), (1, 2, 3)),
}
COARSE_WEIGHTS = (0.0, 0.5, 1.0, 2.0)
# Tiles flagged unknown by the Mahalanobis detector: the share of the head's own training
# rows that the cut would flag (pyod's contamination); None = no flags.
FLAG_RATES = (None, 0.05, 0.1, 0.2, 0.3)  # weight of 2x2 tiles relative to 4x4 (multi-scale only)


# ---------------------------------------------------------------------- composing plots
def paste_leaf(canvas: Image.Image, path: str, rng: np.random.Generator) -> None:
    leaf = Image.open(path).convert("L")
    side = rng.uniform(0.15, 0.45) * canvas.width
    scale = side / max(leaf.size)
    leaf = leaf.resize((max(1, int(leaf.width * scale)), max(1, int(leaf.height * scale))))
    leaf = leaf.rotate(float(rng.uniform(0, 360)), expand=True, resample=Image.BILINEAR)
    mask = leaf.point(lambda v: 255 if v > 80 else 0)
    x = int(rng.integers(-leaf.width // 3, canvas.width - 2 * leaf.width // 3))
    y = int(rng.integers(-leaf.height // 3, canvas.height - 2 * leaf.height // 3))
    canvas.paste(Image.merge("RGB", (leaf, leaf, leaf)), (x, y), mask)


def plot_recipes(n: int, rng: np.random.Generator, max_taxa: int = 8,
                 richness: str = "uniform") -> list[list[int]]:
    """Individual counts per taxon for ``n`` plots, drawn from real dune-meadow plots.

    ``richness="uniform"``: the number of taxa is uniform on 1..``max_taxa`` and their
    counts are a random subset of a real plot's covers; ``"table"``: the real plot's own
    richness, capped at ``max_taxa`` (dune plots hold 5–14 species, so nearly always
    ``max_taxa``).
    """
    dune = pd.read_csv(DATA / "vegetation-plots" / "dune.csv", index_col=0)
    out = []
    for _ in range(n):
        row = dune.iloc[int(rng.integers(len(dune)))]
        cover = row[row > 0].to_numpy()
        if richness == "uniform":
            k = int(min(rng.integers(1, max_taxa + 1), len(cover)))
        else:
            k = int(min(max_taxa, max(1, len(cover))))
        chosen = rng.choice(cover, size=k, replace=False)
        out.append([int(math.ceil(c / 3)) for c in chosen])  # cover class 1-9 -> 1-3 plants
    return out


def compose_plots(name: str, pool: dict[int, list[str]], n: int, seed: int, args, taxonomy):
    """Yield (plot id, plot image, true taxa labels) for ``n`` plots composed from ``pool``
    (leaf index -> image paths); the same plots for the same arguments."""
    rng = np.random.default_rng(seed)
    leaves = sorted(pool)
    for i, counts in enumerate(plot_recipes(n, rng, args.max_taxa, args.richness)):
        canvas = clutter_background(args.size, rng, args.clutter)
        taxa = rng.choice(leaves, size=min(len(counts), len(leaves)), replace=False)
        for taxon, count in zip(taxa, counts):
            for _ in range(count):
                paste_leaf(canvas, str(rng.choice(pool[int(taxon)])), rng)
        yield (f"{name}-{i:03d}", canvas,
               [taxonomy.label(taxonomy.node("species", int(t))) for t in taxa])


def export_plots(name: str, pool: dict[int, list[str]], n: int, seed: int, args, taxonomy,
                 folder: Path) -> None:
    """Write the plots as JPEGs in ``folder/name`` and their species in
    ``folder/name_truth.csv`` (plot_id;species), the inputs `taxoclass calibrate-plots`
    and `evaluate-plots` read."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for plot_id, canvas, taxa in compose_plots(name, pool, n, seed, args, taxonomy):
        canvas.save(folder / name / f"{plot_id}.jpg", quality=90)
        rows += [{"plot_id": plot_id, "species": t} for t in taxa]
    pd.DataFrame(rows).to_csv(folder / f"{name}_truth.csv", index=False)
    print(f"{n} {name} plots and their species written to {folder}")


def compose_and_embed(name: str, pool: dict[int, list[str]], n: int, seed: int, args,
                      taxonomy, tiler: BundleTileClassifier, out: Path) -> dict:
    """Compose ``n`` plots from ``pool`` (leaf index -> image paths), embed all tiles (cached)."""
    key = hashlib.sha256(json.dumps({
        "v": CACHE_VERSION, "n": n, "seed": seed, "size": args.size, "overlap": args.overlap,
        "grids": ALL_GRIDS, "backbone": tiler.backbone.name,
        **({"weights": tiler.backbone.checkpoint_sha256}
           if tiler.backbone.checkpoint_sha256 else {}),
        "preprocess": tiler.backbone.data_overrides, "clutter": args.clutter,
        "max_taxa": args.max_taxa, **({} if args.richness == "table" else
                                      {"richness": args.richness}),
        "pool": {str(k): v for k, v in sorted(pool.items())}}, sort_keys=True).encode()
    ).hexdigest()[:16]
    path = out / f"tiles-{name}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        print(f"{name}: {n} plots, {len(data['emb'])} tile embeddings from cache {path}")
        return {"emb": data["emb"], "plot": data["plot"], "scale": data["scale"],
                "truth": json.loads(str(data["truth"]))}
    embs, plot_of, scales, truth = [], [], [], {}
    t0 = time.perf_counter()
    for i, (plot_id, canvas, taxa) in enumerate(compose_plots(name, pool, n, seed, args,
                                                               taxonomy)):
        truth[plot_id] = taxa
        if i < 2:
            canvas.save(out / f"{plot_id}.jpg", quality=85)
        tiles = make_tiles(canvas.size, grids=ALL_GRIDS, overlap=args.overlap, plot_id=plot_id)
        embs.append(tiler.embed(crop_tiles(canvas, tiles)))
        plot_of += [plot_id] * len(tiles)
        scales += [t.scale for t in tiles]
    data = {"emb": np.concatenate(embs).astype(np.float32), "plot": np.array(plot_of),
            "scale": np.array(scales), "truth": truth}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, emb=data["emb"], plot=data["plot"], scale=data["scale"],
             truth=np.array(json.dumps(truth)))
    tmp.replace(path)
    print(f"{name}: {n} plots, {len(data['emb'])} tiles composed and embedded in "
          f"{time.perf_counter() - t0:.0f}s (cached in {path})")
    return data


def companion_views(cfg: dict, rows: pd.DataFrame, sources: np.ndarray, pool: np.ndarray,
                    n_views: int, max_companions: int, out: Path
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tile-like views holding several leaves, one training row per leaf (cached).

    View ``k`` of each ``sources`` image is ``taxoclass.features.views.tile_view`` of it (the
    config's augment settings) plus 0..``max_companions`` leaves of other ``pool`` images
    pasted on top (random scale and rotation, up to 60% outside the view). Returns (view
    embeddings repeated once per leaf, row index of that leaf's image, row index of the
    view's main image).
    """
    from taxoclass.features.backbones import backbone_from_spec
    from taxoclass.features.views import ViewSettings, paste_object, tile_view
    from taxoclass.io.images import load_image
    from taxoclass.plots.tiling import embed_images

    settings = ViewSettings.from_mapping({k: v for k, v in cfg["augment"].items()
                                          if k != "dir"})
    key = hashlib.sha256(json.dumps({
        "settings": settings.to_dict(), "n": n_views, "companions": max_companions,
        "backbone": backbone_spec(cfg["backbone"]), "sources": sources.tolist(),
        "pool": pool.tolist(), "paths": rows["path"].tolist()}, sort_keys=True,
        default=str).encode()).hexdigest()[:16]
    path = out / f"companion-views-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            emb, objects = z["emb"], z["objects"]
    else:
        images: dict[int, Image.Image] = {}

        def image(i: int) -> Image.Image:
            if i not in images:
                images[i] = load_image(rows["path"].iloc[i]).convert("RGB")
            return images[i]

        views, objects = [], []
        for i in sources.tolist():
            for k in range(n_views):
                rng = np.random.default_rng([7, i, k])
                view = tile_view(image(i), rng, settings)
                n = int(rng.integers(0, max_companions + 1))
                others = [int(j) for j in rng.choice(pool, size=n, replace=False) if j != i]
                for j in others:
                    paste_object(view, image(j), rng, settings, max_cut=0.6)
                views.append(view)
                objects.append([i] + others + [-1] * (max_companions - len(others)))
        emb = embed_images(views, backbone_from_spec(backbone_spec(cfg["backbone"])))
        objects = np.array(objects, dtype=np.int64)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, emb=emb, objects=objects)
        tmp.replace(path)
    keep = objects >= 0
    per_view = keep.sum(axis=1)
    return (np.repeat(emb, per_view, axis=0), objects[keep],
            np.repeat(objects[:, 0], per_view))


# ---------------------------------------------------------------------- classifier
def finetuned_config(cfg: dict, rows: pd.DataFrame, y: dict, mask: np.ndarray, taxonomy,
                     args, out: Path) -> dict:
    """Fine-tune the config's backbone on the ``mask`` rows (never a calibration-pool or
    test image) with ``finetune.tile_views`` fresh tile-like views per image and epoch;
    return the config pointing at the fine-tuned backbone (own embedding and view caches).
    The run is cached by its settings and images."""
    from taxoclass.model.image_data import LabelledImages
    from taxoclass.pipelines.finetune import finetune_to_bundle

    size = args.finetune_size
    base = {**cfg["backbone"], "image_size": size, "resize": "letterbox"}
    settings = {"epochs": args.finetune_epochs, "batch_size": 32, "lr": args.finetune_lr,
                "layer_decay": 0.7, "weight_decay": 0.05, "warmup_epochs": 0.5,
                "unfreeze_blocks": args.finetune_blocks, "patience": 0, "augment": False,
                "num_workers": 1, "seed": args.seed, "tile_views": args.finetune_views}
    views = {k: v for k, v in cfg["augment"].items() if k != "dir"}
    paths = rows["path"][mask].tolist()
    key = hashlib.sha256(json.dumps([backbone_spec(base), settings, views, cfg["model"],
                                     cfg["loss"], paths]
                                    + (["probe", args.views] if args.finetune_probe else []),
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    ft = out / f"finetuned-{key}"
    if not (ft / "bundle.json").is_file():
        head_init = None
        if args.finetune_probe:  # LP-FT: start from a head trained on the frozen features
            bg = "" if views["background"] == "clutter" else f"-{views['background']}"
            probe_cfg = {**cfg, "backbone": base,
                         "embeddings": {**cfg["embeddings"],
                                        "cache": str(out / f"probe-{size}-embeddings")},
                         "augment": {**cfg["augment"], "dir": str(out / f"probe-{size}-views{bg}")}}
            xp, found, _ = config_embeddings(probe_cfg, rows)
            pv = None
            if args.views:
                train_idx = np.flatnonzero(mask)
                xv, src = view_embeddings(probe_cfg, rows.iloc[train_idx].reset_index(drop=True))
                pv = (xv, train_idx[src])
            torch.manual_seed(0)
            head_init = train_bundle(xp, y, mask & found, taxonomy, cfg,
                                     out / "probe-heads", pv).head
        t0 = time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(desc="fine-tuning", unit="step")

        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        res = finetune_to_bundle(LabelledImages(paths, {r: v[mask] for r, v in y.items()}),
                                 None, taxonomy, backbone=backbone_spec(base), out_dir=ft,
                                 settings=settings, model=cfg["model"], loss=cfg["loss"],
                                 views=views, progress=progress, head_init=head_init)
        bar.close()
        print(f"fine-tuned in {time.perf_counter() - t0:.0f}s ({res.images_per_second:.1f} "
              f"images/s); history:\n{res.history.to_string(index=False)}")
    recipe = ModelBundle.load(ft).backbone
    return {**cfg,
            "backbone": {"name": recipe["name"], "checkpoint": str(ft / recipe["checkpoint"]),
                         "pretrained": False, "data_overrides": recipe["data_overrides"],
                         "model_kwargs": recipe.get("model_kwargs") or {}},
            "embeddings": {**cfg["embeddings"], "cache": str(ft / "embeddings")},
            "augment": {**cfg["augment"], "dir": str(ft / "views")},
            "_finetune": {"dir": str(ft), "settings": settings,
                          "probe": bool(args.finetune_probe)}}


def train_bundle(x, y, mask, taxonomy, cfg, cache_dir: Path | None = None,
                 views: tuple[np.ndarray, np.ndarray] | None = None) -> ModelBundle:
    """``train_head`` on the rows in ``mask`` plus the tile-like views of those rows
    (``views``: embeddings and source row index); the head is cached by data and settings."""
    x_tr, y_tr = with_views(x, y, mask, views)
    key = hashlib.sha256(np.ascontiguousarray(x_tr).tobytes() + json.dumps(
        [cfg["model"], cfg["loss"], cfg["train"], {r: v.tolist() for r, v in y_tr.items()}],
        sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = None if cache_dir is None else cache_dir / f"head-{key}.pt"
    if path is not None and path.is_file():
        head = MultiRankHead(x.shape[1], {r: taxonomy.n_classes(r) for r in taxonomy.ranks},
                             hidden=cfg["model"].get("hidden"),
                             dropout=float(cfg["model"].get("dropout", 0.0)))
        head.load_state_dict(torch.load(path, weights_only=True))
    else:
        head = train_head(x_tr, y_tr, None, None, taxonomy,
                          model=cfg["model"], loss=cfg["loss"], train=cfg["train"],
                          normalize_inputs=bool(cfg["model"].get("normalize", True))).head
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(head.state_dict(), path)
    bundle = ModelBundle(head=head.eval(), taxonomy=taxonomy,
                         normalize=bool(cfg["model"].get("normalize", True)),
                         decode_method=cfg["decode"]["method"],
                         backbone=backbone_spec(cfg["backbone"]))
    # The tile detector the product uses for plots (configs' openset.detector): class-
    # conditional Mahalanobis on the head's own training rows; ``train_z`` sets the cut
    # for a flag rate (pyod's contamination).
    x_in = bundle.scorer_input(x_tr)
    lowest = taxonomy.ranks[-1]
    bundle.detector = OutlierDetector("mahalanobis", scope="global").fit(x_in, y_tr[lowest])
    bundle.train_z = bundle.detector.decision_function(x_in)
    return bundle


def plot_probs(data: dict, bundle: ModelBundle) -> dict[str, dict]:
    """Per plot: tile scales, coherent per-rank probabilities and the flag cut per rate."""
    dec = bundle.predict_embeddings(data["emb"])
    z = bundle.detector.decision_function(bundle.scorer_input(data["emb"]))
    cuts = {rate: (np.inf if rate is None else float(np.quantile(bundle.train_z, 1 - rate)))
            for rate in FLAG_RATES}
    out = {}
    for plot_id in data["truth"]:
        m = data["plot"] == plot_id
        out[plot_id] = {"scale": data["scale"][m], "probs": {r: p[m] for r, p in dec.probs.items()},
                        "flags": {rate: z[m] > cut for rate, cut in cuts.items()}}
    return out


# ---------------------------------------------------------------------- calibration
def tile_weights(scales: np.ndarray, grid_set: tuple[str, ...], coarse: float) -> np.ndarray:
    """0 for tiles of other grids; ``coarse`` for the coarsest of a multi-scale set, else 1."""
    w = np.isin(scales, grid_set).astype(float)
    if len(grid_set) > 1:
        w[scales == grid_set[0]] *= coarse
    return w


def plot_tiles(plots: dict, grid_set: tuple[str, ...], flag_rate=None) -> dict[str, PlotTiles]:
    """The plots as the library's :class:`PlotTiles`: tiles of ``grid_set`` only, flagged
    unknown at ``flag_rate`` (None: none)."""
    out = {}
    for pid, tp in plots.items():
        m = np.isin(tp["scale"], grid_set)
        out[pid] = PlotTiles(pid, "", tp["scale"][m], {r: p[m] for r, p in tp["probs"].items()},
                             tp["flags"][flag_rate][m])
    return out


def truth_vectors(truth: dict, taxonomy) -> tuple[dict, np.ndarray]:
    """Per plot a boolean vector over lowest-rank classes (placeholders never true)."""
    lowest = taxonomy.ranks[-1]
    labels = [taxonomy.label(n) for n in taxonomy.nodes(lowest)]
    placeholder = np.array([taxonomy.is_placeholder(n) for n in taxonomy.nodes(lowest)])
    out = {}
    for plot_id, taxa in truth.items():
        v = np.zeros(len(labels), dtype=bool)
        for t in taxa:
            v[labels.index(t)] = True
        out[plot_id] = v & ~placeholder
    return out, placeholder


def oracle_f1(plots: dict, truth: dict, taxonomy, rule: str, grid_set: tuple[str, ...],
              how: str) -> float:
    """Species macro F1 per plot from ``rule``'s score (all tiles of ``grid_set``, weight
    1, no flags, no tile settings) with a cut-off per plot chosen KNOWING the truth.

    ``how="true_k"``: each plot reports its K best-scoring species, K = its true number of
    taxa (what a perfect species-count estimate would give). ``how="best_cutoff"``: the
    best F1 over all cut-offs of the plot's ranking (an upper bound for any threshold on
    that score; it may also drop a wrong top species, which no real rule can know).
    """
    lowest = taxonomy.ranks[-1]
    truth_idx, placeholder = truth_vectors(truth, taxonomy)
    f1 = []
    for plot_id, tp in plots.items():
        p = tp["probs"][lowest][np.isin(tp["scale"], grid_set)]
        if rule == "argmax_union":  # a tile's arg-max species, scored by its best tile
            p = np.where(p == p.max(axis=1, keepdims=True), p, 0.0)
        score = rule_scores(p, "max" if rule == "argmax_union" else rule)
        score = np.where(placeholder | (score <= 0), -np.inf, score)
        true = truth_idx[plot_id]
        order = np.argsort(-score, kind="stable")
        order = order[np.isfinite(score[order])]
        hits = np.concatenate([[0], np.cumsum(true[order])])  # true positives of top-k
        k = np.arange(len(hits))
        denom = k + true.sum()
        per_k = np.where(denom == 0, 1.0, 2.0 * hits / np.maximum(denom, 1))
        f1.append(float(per_k.max() if how == "best_cutoff"
                        else per_k[min(int(true.sum()), len(per_k) - 1)]))
    return float(np.mean(f1))


def product_calibration(cal_plots: dict, cal_truth: dict, test_plots: dict, test_truth: dict,
                        taxonomy, grid_set: tuple[str, ...]) -> tuple[dict, dict]:
    """What `taxoclass calibrate-plots` chooses on the calibration plots
    (:func:`taxoclass.plots.calibration.calibrate_rules`: every rule's thresholds and tile
    settings, the learned rule scored out-of-fold), applied to the test plots as
    `plot-report --settings` applies it. Tiles of ``grid_set`` only, none flagged (the
    product flags with the bundle's own calibrated detector, which these bench heads lack).
    Returns (settings, {rule: evaluate_plots result on the test plots})."""
    from taxoclass.plots.calibration import calibrate_rules, plot_records

    settings = calibrate_rules(plot_tiles(cal_plots, grid_set), cal_truth, taxonomy,
                               grids=list(grid_set))
    test = plot_tiles(test_plots, grid_set)
    results = {}
    for row in settings.calibration:
        recs = plot_records(test, taxonomy, rule=row["rule"], thresholds=row["thresholds"],
                            learned=settings.learned, tiles=row.get("tiles"))
        results[row["rule"]] = evaluate_plots(recs, test_truth, taxonomy)
    return settings, results


def run_rule(plots: dict, truth: dict, taxonomy, rule: str, grid_set: tuple[str, ...],
             settings: dict) -> tuple[dict, dict]:
    """Records of every plot with ``aggregate_plot`` and their scores (evaluate_plots)."""
    preds = {}
    for plot_id, tp in plots.items():
        w = tile_weights(tp["scale"], grid_set, settings.get("coarse_weight", 1.0))
        preds[plot_id] = aggregate_plot(
            tp["probs"], taxonomy, plot_id=plot_id, rule=rule, weights=w,
            thresholds=settings["thresholds"], min_tiles=settings.get("min_tiles", 1),
            top_k=settings.get("top_k"), min_tile_prob=settings.get("min_tile_prob", 0.0),
            unknown=tp["flags"][settings.get("flag_rate")])
    return preds, evaluate_plots(preds, truth, taxonomy)


def calibrate(plots: dict, truth: dict, taxonomy, rule: str, grid_set: tuple[str, ...]) -> dict:
    """Settings that maximise calibration macro F1 per plot: species step, then genus step."""
    top_ks, gates, min_tiles = SPACE[rule]
    coarse_opts = COARSE_WEIGHTS if len(grid_set) > 1 else (1.0,)
    flagged = {rate: plot_tiles(plots, grid_set, rate) for rate in FLAG_RATES}
    best = (-1.0, None)
    for top_k, gate, coarse, rate in itertools.product(top_ks, gates, coarse_opts, FLAG_RATES):
        # species F1 at every (min_tiles, threshold), as aggregate_plot would score it
        f1 = species_f1(flagged[rate], truth, taxonomy, rule, TileSettings(top_k, gate),
                        min_tiles=min_tiles, candidates=SPECIES_T,
                        scale_weights={grid_set[0]: coarse} if len(grid_set) > 1 else None)
        i, j = np.unravel_index(int(np.argmax(f1)), f1.shape)
        if f1[i, j] > best[0] + 1e-9:
            best = (float(f1[i, j]), {"top_k": top_k, "min_tile_prob": gate,
                                      "coarse_weight": coarse, "min_tiles": int(min_tiles[i]),
                                      "species": float(SPECIES_T[j]), "flag_rate": rate})
    fast_f1, s = best
    # genus step: the genus threshold only adds genus records (species F1 is unchanged)
    genus_best = (-1.0, None)
    for tg in GENUS_T:
        settings = {**s, "thresholds": {"species": s["species"], "genus": float(tg)}}
        _, ev = run_rule(plots, truth, taxonomy, rule, grid_set, settings)
        if ev["genus"]["macro_f1_per_plot"] > genus_best[0] + 1e-9:
            genus_best = (ev["genus"]["macro_f1_per_plot"], float(tg), ev)
    _, tg, ev = genus_best
    if abs(ev["species"]["macro_f1_per_plot"] - fast_f1) > 1e-6:
        raise AssertionError(f"{rule} {grid_set}: vectorised species F1 {fast_f1:.6f} differs "
                             f"from aggregate_plot's {ev['species']['macro_f1_per_plot']:.6f}")
    return {"thresholds": {"species": s["species"], "genus": tg}, "min_tiles": s["min_tiles"],
            "top_k": s["top_k"], "min_tile_prob": s["min_tile_prob"],
            "coarse_weight": s["coarse_weight"], "flag_rate": s["flag_rate"],
            "cal_species_f1": ev["species"]["macro_f1_per_plot"],
            "cal_genus_f1": ev["genus"]["macro_f1_per_plot"]}


# ---------------------------------------------------------------------- report
def describe_settings(s: dict, multi: bool, coarse: str = "2x2") -> str:
    th = s["thresholds"]
    parts = [f"sp≥{th['species']:g}", f"gen≥{th['genus']:g}", f"min_tiles={s['min_tiles']}"]
    if s.get("top_k"):
        parts.append(f"top_k={s['top_k']}")
    if s.get("min_tile_prob"):
        parts.append(f"tile_gate={s['min_tile_prob']:g}")
    if s.get("flag_rate"):
        parts.append(f"flag {s['flag_rate']:.0%} most novel")
    if multi:
        parts.append(f"w{coarse}={s['coarse_weight']:g}")
    return ", ".join(parts)


def quadrat_timing(thresholds: dict, out: Path, repeats: int, model: Path) -> list[dict]:
    """Seconds per plot of ``plot_report`` on the real quadrat photo with ``model``."""
    from taxoclass.plots.report import plot_report

    photo = DATA / "quadrat" / "CBN-can-A1-20230705.jpg"
    t0 = time.perf_counter()
    clf = BundleTileClassifier.load(model)
    load_s = time.perf_counter() - t0
    rows = []
    with Image.open(photo) as im:
        size = im.size
    for label, grids in (("4x4", (4,)), ("2x2+4x4", (2, 4))):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = plot_report(clf, [photo], out / f"quadrat-{label}", grids=grids, rule="max",
                              thresholds=thresholds, overlap=0.0,
                              flag_unknown=clf.flag_unknown)  # as `taxoclass plot-report`
            times.append(time.perf_counter() - t0)
        recs = res.records[photo.stem]
        rows.append({"grid": label, "tiles": len(make_tiles(size, grids=grids)),
                     "seconds_per_plot_median": float(np.median(times)),
                     "seconds_min": float(np.min(times)), "runs": repeats,
                     "records": "; ".join(f"{r.taxon} ({r.taxon_rank})" for r in recs) or "none"})
    rows.append({"grid": "(bundle + backbone load, once)", "tiles": None,
                 "seconds_per_plot_median": load_s, "seconds_min": None, "runs": 1,
                 "records": f"photo {size[0]}×{size[1]} px"})
    return rows


@dataclass
class Leaves:
    """The leaf data, its split and the features the heads train on."""

    cfg: dict
    rows: pd.DataFrame
    taxonomy: Any
    y: dict
    x: np.ndarray
    is_test: np.ndarray
    train: np.ndarray
    cal_pool: np.ndarray
    views: tuple[np.ndarray, np.ndarray] | None = None
    cal_views: tuple[np.ndarray, np.ndarray] | None = None


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--n-cal", type=int, default=60)
    ap.add_argument("--size", type=int, default=896)
    ap.add_argument("--overlap", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-by", default=None, metavar="FIELD",
                    help="image or annotation field whose groups stay on one side of the "
                         "test and calibration splits (data.group_by); default: by image")
    ap.add_argument("--max-taxa", type=int, default=8, help="taxa per plot at most")
    ap.add_argument("--richness", choices=("uniform", "table"), default="uniform",
                    help="taxa per plot: uniform on 1..--max-taxa (the issue's 1-8), or each "
                         "real dune plot's own richness capped at --max-taxa (nearly always 8)")
    ap.add_argument("--no-clutter", dest="clutter", action="store_false",
                    help="plain soil background without stones and twigs (an easier variant)")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "synthetic_plots"))
    ap.add_argument("--results", default=None, help="also write the markdown here")
    ap.add_argument("--quadrat", action="store_true", help="time plot_report on the quadrat")
    ap.add_argument("--quadrat-repeats", type=int, default=3)
    ap.add_argument("--dense", action="store_true",
                    help="also a 6x6 grid (61 tiles per plot over 2x2..6x6): grid sets 6x6 "
                         "and 4x4+6x6")
    ap.add_argument("--views", type=int, default=0,
                    help="tile-like views per training image added to the heads' training "
                         "rows (taxoclass.augment; the config's augment settings otherwise)")
    ap.add_argument("--export", default=None, metavar="DIR",
                    help="also write every calibration and test plot as a JPEG with a truth "
                         "CSV into DIR (inputs for `taxoclass calibrate-plots` / "
                         "`evaluate-plots`)")
    ap.add_argument("--finetune-epochs", type=int, default=0,
                    help="fine-tune the backbone first (taxoclass.model.finetune) for this many "
                         "epochs on the training images outside the calibration pool, with "
                         "fresh tile-like views (bench: the heads then train on its features)")
    ap.add_argument("--finetune-views", type=int, default=4,
                    help="tile-like views per image and epoch while fine-tuning")
    ap.add_argument("--finetune-size", type=int, default=256,
                    help="image size (letterbox) of the fine-tuned backbone")
    ap.add_argument("--finetune-lr", type=float, default=1e-3,
                    help="fine-tuning learning rate of the heads (blocks below: x0.7 each)")
    ap.add_argument("--finetune-probe", action="store_true",
                    help="LP-FT: start fine-tuning from a head trained on the frozen "
                         "features (and --views views) of the same images")
    ap.add_argument("--view-background", default=None,
                    help="background of every tile-like view (fine-tuning, probe and head "
                         "views): black|noise|clutter|a folder of photos; default the config's "
                         "(clutter, drawn like the plots' own background). 'noise' measures "
                         "what a background unlike the plots' costs")
    ap.add_argument("--finetune-blocks", type=int, default=4,
                    help="fine-tune the last N blocks (stages) of the backbone; -1: all")
    ap.add_argument("--companions", type=int, default=0,
                    help="with --views: up to this many other leaves pasted into each view, "
                         "the view training once per leaf it holds (bench-only experiment)")
    return ap.parse_args()


def leaf_data(args: argparse.Namespace, out: Path) -> Leaves:
    """configs/leaf.yaml's leaves, taxoclass train's split, a calibration pool of ~30% of
    each taxon's training images, the (fine-tuned) features and the tile-like views."""
    cfg = load_config(CONFIG)
    if args.view_background:
        cfg["augment"]["background"] = args.view_background
        cfg["augment"]["dir"] = str(out / f"views-{args.view_background}")
    ann = load_annotations(cfg["data"]["annotations"])
    taxonomy = ann.taxonomy(cfg["data"]["ranks"])
    group_by = args.group_by or cfg["data"].get("group_by")
    rows = ann.labelled_images(cfg["data"]["images_root"], group_by=group_by)
    y, nodes = encode_labels(taxonomy, rows)
    strata = np.array(["/".join(n) for n in nodes])
    groups = group_codes(rows["group"], group_by) if group_by else None
    is_test = validation_split(strata, float(cfg["data"]["val_fraction"]),
                               int(cfg["data"]["split_seed"]),
                               groups=groups)  # = taxoclass train's split
    # The features configs/leaf.yaml trains on (backbone, image size, resize), cached.
    x, found, _ = config_embeddings(cfg, rows)
    if not found.all():
        raise SystemExit(f"{int((~found).sum())} leaf images could not be embedded")
    train = ~is_test
    # calibration pool: ~30% of each taxon's TRAINING images; calibration head: the rest
    cal_pool = np.zeros(len(rows), dtype=bool)
    cal_pool[np.flatnonzero(train)[validation_split(
        strata[train], 0.3, args.seed + 1,
        groups=None if groups is None else groups[train])]] = True
    if args.finetune_epochs:
        cfg = finetuned_config(cfg, rows, y, train & ~cal_pool, taxonomy, args, out)
        x, found, _ = config_embeddings(cfg, rows)
    leaves = Leaves(cfg, rows, taxonomy, y, x, is_test, train, cal_pool)
    if args.views:
        add_views(leaves, args, out)
    return leaves


def add_views(leaves: Leaves, args: argparse.Namespace, out: Path) -> None:
    """Tile-like views of the training images for the heads (companions: bench-only)."""
    cfg, train, cal_pool = leaves.cfg, leaves.train, leaves.cal_pool
    cfg["augment"]["views_per_image"] = args.views
    t0 = time.perf_counter()
    train_idx = np.flatnonzero(train)
    if args.companions:  # companions never come from the calibration pool
        xv, src_rows, first = companion_views(cfg, leaves.rows, train_idx,
                                              np.flatnonzero(train & ~cal_pool), args.views,
                                              args.companions, out)
        leaves.views = (xv, src_rows)
        # the calibration head must not see a calibration-pool leaf in any view
        leaves.cal_views = (xv[~cal_pool[first]], src_rows[~cal_pool[first]])
    else:
        xv, src = view_embeddings(cfg, leaves.rows.iloc[train_idx].reset_index(drop=True))
        leaves.views = leaves.cal_views = (xv, train_idx[src])
    print(f"{len(xv)} tile-like view rows ({args.views} views per image, one row per "
          f"leaf) of {len(train_idx)} training images embedded in "
          f"{time.perf_counter() - t0:.0f}s")


def train_heads(leaves: Leaves) -> tuple[ModelBundle, ModelBundle, float]:
    """The test head (every training image) and the calibration head (training images
    outside the calibration pool), and the test head's single-leaf species accuracy."""
    lv = leaves
    t0 = time.perf_counter()
    torch.manual_seed(0)
    heads = ROOT / "outputs" / "synthetic_plots_heads"
    bundle = train_bundle(lv.x, lv.y, lv.train, lv.taxonomy, lv.cfg, heads, lv.views)
    cal_bundle = train_bundle(lv.x, lv.y, lv.train & ~lv.cal_pool, lv.taxonomy, lv.cfg, heads,
                              lv.cal_views)
    lowest = lv.taxonomy.ranks[-1]
    acc = float((bundle.predict_embeddings(lv.x[lv.is_test]).path[lowest]
                 == lv.y[lowest][lv.is_test]).mean())
    print(f"heads trained in {time.perf_counter() - t0:.0f}s; test single-leaf species accuracy "
          f"{acc:.3f} ({lv.is_test.sum()} images); train {lv.train.sum()}, calibration head "
          f"{(lv.train & ~lv.cal_pool).sum()}, calibration pool {lv.cal_pool.sum()}")
    return bundle, cal_bundle, acc


def tile_hit_rate(plots: dict, truth: dict, taxonomy, scale: str = "4x4") -> float:
    """Share of tiles whose arg-max species is one of the plot's true taxa."""
    lowest = taxonomy.ranks[-1]
    labels = [taxonomy.label(n) for n in taxonomy.nodes(lowest)]
    hits = [labels[k] in truth[pid] for pid, tp in plots.items()
            for k in tp["probs"][lowest][tp["scale"] == scale].argmax(axis=1)]
    return float(np.mean(hits))


def table_row(grid_name: str, label: str, preds: dict | None, ev: dict, base_ev: dict,
              settings: str, cal_sp=None, cal_ge=None, oracle=None) -> dict:
    """One row of the results table; Δ and its paired SE against the grid's baseline."""
    b_sp, b_ge = base_ev["species"]["macro_f1_per_plot"], base_ev["genus"]["macro_f1_per_plot"]
    diff = 100 * (ev["per_plot"]["species_f1"] - base_ev["per_plot"]["species_f1"]).to_numpy()
    return {
        "grid": grid_name, "rule": label,
        "species F1/plot": ev["species"]["macro_f1_per_plot"],
        "Δ species (pts)": 100 * (ev["species"]["macro_f1_per_plot"] - b_sp),
        "± SE (paired)": float(diff.std(ddof=1) / np.sqrt(len(diff))),
        "genus F1/plot": ev["genus"]["macro_f1_per_plot"],
        "Δ genus (pts)": 100 * (ev["genus"]["macro_f1_per_plot"] - b_ge),
        "cal species F1": cal_sp, "cal genus F1": cal_ge,
        "records/plot": (None if preds is None
                         else sum(map(len, preds.values())) / len(preds)),
        "oracle: true K": None if oracle is None else oracle[0],
        "oracle: best cut-off per plot": None if oracle is None else oracle[1],
        "settings (chosen on calibration)": settings}


def grid_rows(grid_name: str, grid_set: tuple[str, ...], test: tuple[dict, dict],
              cal: tuple[dict, dict], taxonomy, chosen: dict) -> list[dict]:
    """The table rows of one grid set: the baseline, each rule calibrated by this bench
    (its settings go into ``chosen``), and what `calibrate-plots` picks."""
    (test_plots, test_truth), (cal_plots, cal_truth) = test, cal
    lowest = taxonomy.ranks[-1]

    def oracles(rule):
        return tuple(oracle_f1(test_plots, test_truth, taxonomy, rule, grid_set, how)
                     for how in ("true_k", "best_cutoff"))

    base = {"thresholds": {"species": 0.0, "genus": 0.5, "family": 0.5}}
    base_preds, base_ev = run_rule(test_plots, test_truth, taxonomy, "argmax_union", grid_set,
                                   base)
    rows = [table_row(grid_name, "argmax_union (baseline)", base_preds, base_ev, base_ev,
                      "species ≥ 0 (every tile's arg-max)", oracle=oracles("argmax_union"))]
    for rule in ("argmax_union", "max", "noisy_or", "mean"):
        s = calibrate(cal_plots, cal_truth, taxonomy, rule, grid_set)
        chosen[(grid_name, rule)] = s
        preds, ev = run_rule(test_plots, test_truth, taxonomy, rule, grid_set, s)
        label = "argmax_union + calibrated threshold" if rule == "argmax_union" else rule
        rows.append(table_row(grid_name, label, preds, ev, base_ev,
                              describe_settings(s, len(grid_set) > 1, grid_set[0]),
                              s["cal_species_f1"], s["cal_genus_f1"],
                              None if rule == "argmax_union" else oracles(rule)))
    settings, product = product_calibration(cal_plots, cal_truth, test_plots, test_truth,
                                            taxonomy, grid_set)
    for row in settings.calibration:
        rule = row["rule"]
        if rule != "learned" and rule != settings.rule:
            continue
        tile = {k: v for k, v in (row.get("tiles") or {}).items() if v not in (None, 0, 0.0, 1)}
        rows.append(table_row(
            grid_name, f"calibrate-plots: {rule}" + (" (its choice)" if rule == settings.rule
                                                      else ""),
            None, product[rule], base_ev, f"thresholds {row['thresholds']}"
            + (f", tiles {tile}" if tile else "") + f"; calibration {row['evaluation']}",
            row["macro_f1_per_plot"][lowest], row["macro_f1_per_plot"].get("genus")))
    return rows


def header_lines(args: argparse.Namespace, leaves: Leaves, tiler: BundleTileClassifier,
                 acc: float, quality: dict, total: float) -> list[str]:
    """The results page down to its method section."""
    cfg, train, cal_pool, is_test, views = (leaves.cfg, leaves.train, leaves.cal_pool,
                                            leaves.is_test, leaves.views)
    n_true, hit_test, hit_cal, chance = (quality["n_true"], quality["hit_test"],
                                         quality["hit_cal"], quality["chance"])
    return [
        "# Synthetic plots: calibrated aggregation rules vs arg-max-per-tile union",
        "",
        f"- date: {_dt.date.today().isoformat()}; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores (shared VM), Python {platform.python_version()}, "
        f"torch {torch.__version__}, no GPU",
        f"- command: `.venv/bin/python {' '.join(['bench/synthetic_plots.py', *sys.argv[1:]])}`"
        f" ({total:.0f}s including cached tile embeddings)",
        f"- classifier: taxoclass head (`train_head`, configs/leaf.yaml hyper-parameters) on the "
        f"{int(train.sum())} training-split EfficientNet-Lite0 leaf embeddings "
        f"(preprocessing {tiler.backbone.data_overrides or 'timm default'})"
        + (f" plus {len(views[0])} tile-like views of them (`taxoclass.augment`, "
           f"{args.views} per image, settings {cfg['augment']}"
           + (f", each with up to {args.companions} other training leaves pasted in, one "
              f"training row per leaf, counted once per leaf" if args.companions else "")
           + ")" if views else "")
        + f"; tiles embedded by the bundle's backbone; single-leaf species accuracy on the "
        f"{int(is_test.sum())} held-out images {acc:.3f}",
        *([f"- backbone FINE-TUNED first (`taxoclass.finetune`, settings "
           f"{cfg['_finetune']['settings']}"
           + (", starting from a head trained on the frozen features of the same images and "
              "views (LP-FT)" if cfg["_finetune"]["probe"] else "") + ") on the "
           f"{int((train & ~cal_pool).sum())} training images outside the calibration pool, "
           f"each also shown as {args.finetune_views} fresh tile-like views per epoch "
           f"(`finetune.tile_views`); no calibration-pool or held-out image was seen"]
          if "_finetune" in cfg else []),
        f"- TEST: {args.n_test} plots from held-out images only (mean {n_true:.1f} true taxa "
        f"per plot); CALIBRATION: {args.n_cal} plots from training-split images only "
        f"({int(cal_pool.sum())} images, ~30% of each taxon's training images) scored by a "
        f"calibration head trained on the other {int((train & ~cal_pool).sum())} training "
        f"images; {args.size} px canvas, tile overlap {args.overlap}, {args.richness} "
        f"richness, at most {args.max_taxa} taxa per plot, background "
        f"{'with' if args.clutter else 'without'} clutter",
        "",
        f"- tile quality: the arg-max species of a 4x4 tile is one of its plot's true taxa for "
        f"{hit_test:.1%} of test tiles ({hit_cal:.1%} of calibration tiles; a random species "
        f"would be {chance:.1%})",
        "",
    ]


def method_lines() -> list[str]:
    """How the settings were chosen (the results page's method section)."""
    return [
        "## How settings were chosen",
        "",
        "On the calibration plots only, per rule and grid: first the species threshold "
        f"({len(SPECIES_T)} values), `min_tiles` (1–3), `top_k` per tile (all/1/3, noisy_or "
        "and mean), a tile gate `min_tile_prob` (0/0.2/0.4 on the tile's best species "
        "probability, noisy_or and mean) and, for 2x2+4x4, the weight of 2x2 tiles "
        "(0/0.5/1/2), and which tiles become unknown evidence (the Mahalanobis detector of "
        "the head's training rows, cut at the score that flags none/5/10/20/30% of those "
        "rows), maximising species macro F1 per plot; then the genus threshold "
        f"({len(GENUS_T)} values) maximising genus macro F1 per plot with the species "
        "settings fixed (genus records only add genus credit). The test plots are scored "
        "once with the chosen settings using `taxoclass.plots.rules.aggregate_plot` and "
        "`taxoclass.plots.evaluation.evaluate_plots`. Genus F1 is rank-aware: species records "
        "count at their genus, `Genus sp.` records count at genus. Δ is in F1 points vs the "
        "untuned baseline of the same grid. The two oracle columns use the rule's score (all "
        "tiles of the grid, weight 1, no tile settings) with a cut-off chosen per test plot "
        "KNOWING its true taxa: `true K` reports each plot's K best species, K its true "
        "number of taxa (a perfect species-count estimate); `best cut-off` is the best F1 "
        "over all cut-offs of each plot's ranking (a loose upper bound: it may also drop a "
        "wrong top species, which nothing can know). They show how much a better threshold "
        "could still win from these tile probabilities. The `calibrate-plots` rows are what "
        "the product's `taxoclass calibrate-plots` picks on the same calibration plots "
        "(`taxoclass.plots.calibration.calibrate_rules`: thresholds and tile settings per "
        "rule in-sample, the learned rule — a logistic regression per rank on per-taxon "
        "tile statistics — scored out-of-fold; no tiles flagged), applied to the test "
        "plots as `plot-report --settings` does; the learned rule is shown even when not "
        "chosen.",
        "",
    ]


def quadrat_lines(quadrat: pd.DataFrame, args: argparse.Namespace, model: Path) -> list[str]:
    """The real quadrat timing section."""
    return ["## Real quadrat timing", "",
            f"`plot_report` (rule max, the 4x4-calibrated thresholds, no overlap, unknown "
            f"tiles flagged by the bundle's detector, all output files written) with "
            f"`{model.relative_to(ROOT)}` on "
            f"`shared/data/quadrat/CBN-can-A1-20230705.jpg`, {args.quadrat_repeats} runs "
            "after loading; 2 shared CPU cores, so timings are noisy. The leaf "
            "model knows 99 leaf-silhouette taxa, none of which is a PlantCLEF quadrat "
            "plant: the records only show the pipeline runs.", "", markdown_table(quadrat), ""]


def main() -> None:
    args = parse_args()
    global ALL_GRIDS
    if args.dense:
        ALL_GRIDS = (2, 3, 4, 6)
        GRID_SETS.update({"6x6": ("6x6",), "4x4+6x6": ("4x4", "6x6")})
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    leaves = leaf_data(args, out)
    taxonomy = leaves.taxonomy
    bundle, cal_bundle, acc = train_heads(leaves)
    tiler = BundleTileClassifier(bundle, None, batch_size=64)
    leaf_idx = leaves.y[taxonomy.ranks[-1]]

    def pool_of(mask):
        return {int(k): leaves.rows["path"][mask & (leaf_idx == k)].tolist()
                for k in np.unique(leaf_idx[mask])}

    if args.export:
        export_plots("test", pool_of(leaves.is_test), args.n_test, args.seed, args, taxonomy,
                     Path(args.export))
        export_plots("cal", pool_of(leaves.cal_pool), args.n_cal, args.seed + 1000, args,
                     taxonomy, Path(args.export))
    test_data = compose_and_embed("test", pool_of(leaves.is_test), args.n_test, args.seed, args,
                                  taxonomy, tiler, out)
    cal_data = compose_and_embed("cal", pool_of(leaves.cal_pool), args.n_cal, args.seed + 1000,
                                 args, taxonomy, tiler, out)
    test_plots = plot_probs(test_data, bundle)
    cal_plots = plot_probs(cal_data, cal_bundle)
    n_classes = taxonomy.n_classes(taxonomy.ranks[-1])
    quality = {"hit_test": tile_hit_rate(test_plots, test_data["truth"], taxonomy),
               "hit_cal": tile_hit_rate(cal_plots, cal_data["truth"], taxonomy),
               "chance": np.mean([len(v) for v in test_data["truth"].values()]) / n_classes,
               "n_true": np.mean([len(v) for v in test_data["truth"].values()])}

    t0 = time.perf_counter()
    table_rows, chosen = [], {}
    for grid_name, grid_set in GRID_SETS.items():
        table_rows += grid_rows(grid_name, grid_set, (test_plots, test_data["truth"]),
                                (cal_plots, cal_data["truth"]), taxonomy, chosen)
    print(f"calibration + test scoring: {time.perf_counter() - t0:.0f}s")
    table = pd.DataFrame(table_rows)
    table.to_csv(out / "results.csv", index=False)
    (out / "chosen_settings.json").write_text(json.dumps(
        {f"{g}/{r}": s for (g, r), s in chosen.items()}, indent=1))

    quadrat = model = None
    if args.quadrat:
        model = ROOT / "runs" / ("leaf-plots-model" if args.views else "leaf-model")
        quadrat = pd.DataFrame(quadrat_timing(chosen[("4x4", "max")]["thresholds"], out,
                                              args.quadrat_repeats, model))
    total = time.perf_counter() - t_start
    md = [*header_lines(args, leaves, tiler, acc, quality, total), *method_lines(),
          "## Test macro F1 per plot", "", markdown_table(table), ""]
    if quadrat is not None:
        md += quadrat_lines(quadrat, args, model)
    text = "\n".join(md)
    publish(text, out / "results.md", args.results)


if __name__ == "__main__":
    main()
