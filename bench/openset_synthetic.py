"""Second data set of bench/openset_protocol.py: NAFlora-mini-shaped synthetic embeddings.

The taxonomy and image counts of NAFlora-mini (``../shared/data/naflora-mini/metadata.json``:
1,863 species in 829 genera in 162 families, 5 images each), restricted to
``FAMILIES_KEPT`` families drawn at random (seeded; 40 families: 322 species in 155
genera, 1,740 images) to fit the CPU budget; every image's vector
is family mean + genus offset + species offset + image noise (``SCALES``: standard
deviations per dimension, as bench/hierarchy_evidence.py's generator), except that the
noise is drawn from a Student t distribution (``NOISE_DF`` degrees of freedom, heavy
tails: a few images of every species lie far from it) and is stretched along a few
shared directions (anisotropic), unlike the leaf features. The data set is fixed (seed
``DATA_SEED``); the hold-out seeds only change what is held out and the splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
NAFLORA = ROOT.parent / "shared" / "data" / "naflora-mini" / "metadata.json"
DIM = 64
SCALES = (1.0, 0.7, 0.5, 1.2)  # family, genus, species, image noise
NOISE_DF = 3
DATA_SEED = 0
FAMILIES_KEPT = 40


def synthetic_rows(families_kept: int = FAMILIES_KEPT, seed: int = DATA_SEED
                   ) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows with image_id/family/genus/species, embeddings [n, DIM] float32)."""
    meta = json.loads(NAFLORA.read_text())
    cats = {c["category_id"]: c for c in meta["categories"]}
    rng = np.random.default_rng(seed)
    families = sorted({c["family"] for c in cats.values()})
    if families_kept:
        families = sorted(rng.choice(families, size=min(families_kept, len(families)),
                                     replace=False))
    keep = set(families)
    anns = [a for a in meta["annotations"] if cats[a["category_id"]]["family"] in keep]
    rows = pd.DataFrame([{"image_id": a["image_id"], "category_id": a["category_id"],
                          "family": cats[a["category_id"]]["family"],
                          "genus": cats[a["category_id"]]["genus"],
                          "species": cats[a["category_id"]]["species"]} for a in anns])
    sf, sg, ss, sn = SCALES
    fam = {f: rng.normal(0, sf, DIM) for f in sorted(set(rows["family"]))}
    gen = {g: fam[f] + rng.normal(0, sg, DIM)
           for f, g in sorted(set(zip(rows["family"], rows["genus"])))}
    spe = {(g, s): gen[g] + rng.normal(0, ss, DIM)
           for g, s in sorted(set(zip(rows["genus"], rows["species"])))}
    stretch = np.eye(DIM) + rng.normal(0, 0.5, (DIM, 4)) @ rng.normal(0, 1.0, (4, DIM))
    noise = rng.standard_t(NOISE_DF, (len(rows), DIM)) * sn / np.sqrt(NOISE_DF / (NOISE_DF - 2))
    x = np.stack([spe[(g, s)] for g, s in zip(rows["genus"], rows["species"])]) \
        + noise @ stretch.T / np.sqrt(np.trace(stretch @ stretch.T) / DIM)
    return rows, x.astype(np.float32)


def _fill_store(cache: Path, paths: list[str], x: np.ndarray, backbone: dict) -> None:
    """Put ``x`` into the embedding store of ``cache`` as the vectors of ``paths`` under
    the config's backbone spec, so ``taxoclass.train`` finds every image embedded (the
    files are placeholders; nothing decodes them)."""
    from taxoclass.features.backbones import backbone_spec
    from taxoclass.features.embeddings import put_vectors

    put_vectors(cache, paths, x, backbone_spec(backbone),
                {"name": "synthetic", "generator": "bench/openset_synthetic.py",
                 "scales": SCALES, "noise_df": NOISE_DF, "data_seed": DATA_SEED})


def synthetic_dataset(folder: Path, config: Path):
    """A :class:`openset_protocol.Dataset` of the synthetic embeddings: an annotation file
    and one placeholder file per image under ``folder``, their vectors in a store there."""
    from openset_protocol import Dataset

    from taxoclass import load_config

    rows, x = synthetic_rows()
    cfg = load_config(config)
    # a backbone spec of its own (64 px) so that this store never meets real leaf vectors
    cfg["backbone"].update({"image_size": 64})
    cfg["embeddings"]["cache"] = str(folder / "embeddings")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows["file_name"] = [f"images/{i}.bin" for i in rows["image_id"]]
    rows["path"] = [str(folder / f) for f in rows["file_name"]]
    for i, p in zip(rows["image_id"], rows["path"]):
        Path(p).write_text(f"synthetic image {i}\n")
    cats = rows.drop_duplicates("category_id")
    src = {"images": [{"image_id": int(i), "file_name": f}
                      for i, f in zip(rows["image_id"], rows["file_name"])],
           "annotations": [{"image_id": int(i), "category_id": int(c)}
                           for i, c in zip(rows["image_id"], rows["category_id"])],
           "categories": [{"category_id": int(r.category_id), "family": r.family,
                           "genus": r.genus, "species": r.species,
                           "scientificName": f"{r.genus} {r.species}"}
                          for r in cats.itertuples()]}
    _fill_store(Path(cfg["embeddings"]["cache"]), rows["path"].tolist(), x, cfg["backbone"])
    index = {i: k for k, i in enumerate(rows["image_id"])}

    def x_of(mask: np.ndarray) -> np.ndarray:
        return x[[index[i] for i in rows["image_id"][mask]]]

    return Dataset("synthetic", cfg, src, folder, rows.reset_index(drop=True), x_of)
