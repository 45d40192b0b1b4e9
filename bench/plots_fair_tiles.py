"""Tiles of the fair plot benchmark (``bench/plots_fair.py``): plots, their source images,
and tile embeddings on two grids, cached per seed.

Plots are composed exactly as ``bench/synthetic_plots.py`` composes them (same random
stream: seed 0 gives the same plots as that script's default run), and this module also
records WHICH leaf image was pasted into which plot, so that intervals can be clustered by
source image. Two grids are embedded per plot:

- ``4x4`` with overlap 0.2: the product grid of the old headline (``plot-report --grid 4
  --overlap 0.2``);
- ``3x3`` without overlap: the grid DS@GT used (PlantCLEF 2024).

A cache written by ``synthetic_plots.py`` (``tiles-<name>-<key>.npz`` in ``--out``) is
reused for the 4x4 tiles when its plots are the same (checked on the species lists).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from synthetic_plots import paste_leaf, plot_recipes

from taxoclass.features.views import clutter_background
from taxoclass.plots.grid import crop_tiles, make_tiles

#: grid label -> (grid, overlap)
GRIDS = {"4x4": (4, 0.2), "3x3": (3, 0.0)}
VERSION = "fair-v1"


def compose_with_sources(name: str, pool: dict[int, list[str]], n: int, seed: int, args,
                         taxonomy):
    """Yield (plot id, image, true taxa, source image paths): ``compose_plots`` of
    synthetic_plots.py with the same random stream, plus the leaf images pasted."""
    rng = np.random.default_rng(seed)
    leaves = sorted(pool)
    for i, counts in enumerate(plot_recipes(n, rng, args.max_taxa, args.richness)):
        canvas = clutter_background(args.size, rng, args.clutter)
        taxa = rng.choice(leaves, size=min(len(counts), len(leaves)), replace=False)
        sources = []
        for taxon, count in zip(taxa, counts):
            for _ in range(count):
                path = str(rng.choice(pool[int(taxon)]))
                sources.append(path)
                paste_leaf(canvas, path, rng)
        yield (f"{name}-{i:03d}", canvas,
               [taxonomy.label(taxonomy.node("species", int(t))) for t in taxa], sources)


def _old_4x4(out: Path, name: str, truth: dict) -> dict | None:
    """4x4 rows of a synthetic_plots.py cache holding exactly these plots, if any."""
    for path in sorted(out.glob(f"tiles-{name}-*.npz")):
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["truth"])) != truth:
                continue
            m = z["scale"] == "4x4"
            print(f"{name}: 4x4 tiles reused from {path}")
            return {"emb": z["emb"][m], "plot": z["plot"][m], "scale": z["scale"][m]}
    return None


def plots_and_tiles(name: str, pool: dict[int, list[str]], n: int, seed: int, args, taxonomy,
                    backbone, out: Path) -> dict:
    """Compose ``n`` plots and embed their tiles on :data:`GRIDS` (cached under ``out``).

    Returns ``emb`` [tiles, d], ``plot`` and ``scale`` per tile, ``truth`` (plot id ->
    species) and ``sources`` (plot id -> leaf image paths, one per pasted leaf)."""
    key = hashlib.sha256(json.dumps({
        "v": VERSION, "n": n, "seed": seed, "size": args.size, "grids": GRIDS,
        "backbone": backbone.name, "preprocess": backbone.data_overrides,
        "clutter": args.clutter, "max_taxa": args.max_taxa, "richness": args.richness,
        "pool": {str(k): v for k, v in sorted(pool.items())}}, sort_keys=True).encode()
    ).hexdigest()[:16]
    path = out / f"fair-{name}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {"emb": z["emb"], "plot": z["plot"], "scale": z["scale"],
                    "truth": json.loads(str(z["truth"])),
                    "sources": json.loads(str(z["sources"]))}
    t0 = time.perf_counter()
    plots = list(compose_with_sources(name, pool, n, seed, args, taxonomy))
    truth = {p: t for p, _, t, _ in plots}
    sources = {p: s for p, _, _, s in plots}
    old = _old_4x4(out, name, truth)
    embs, plot_of, scales = [], [], []
    for plot_id, canvas, _, _ in plots:
        for label, (grid, overlap) in GRIDS.items():
            if label == "4x4" and old is not None:
                m = old["plot"] == plot_id
                embs.append(old["emb"][m])
                plot_of += [plot_id] * int(m.sum())
                scales += [label] * int(m.sum())
                continue
            tiles = make_tiles(canvas.size, grids=(grid,), overlap=overlap, plot_id=plot_id)
            embs.append(backbone_embed(backbone, crop_tiles(canvas, tiles)))
            plot_of += [plot_id] * len(tiles)
            scales += [label] * len(tiles)
    data = {"emb": np.concatenate(embs).astype(np.float32), "plot": np.array(plot_of),
            "scale": np.array(scales), "truth": truth, "sources": sources}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, emb=data["emb"], plot=data["plot"], scale=data["scale"],
             truth=np.array(json.dumps(truth)), sources=np.array(json.dumps(sources)))
    tmp.replace(path)
    print(f"{name} (seed {seed}): {n} plots, {len(data['emb'])} tiles in "
          f"{time.perf_counter() - t0:.0f}s -> {path}", flush=True)
    return data


def backbone_embed(backbone, images) -> np.ndarray:
    """Embeddings of tile images with the bundle's backbone (batches of 64)."""
    from taxoclass.plots.tiling import embed_images

    return embed_images(images, backbone, 64)
