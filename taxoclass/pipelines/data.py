"""Training data from a config: rows, labels, validation split, cached embeddings, views.

One implementation that head training (:mod:`taxoclass.pipelines.train`), fine-tuning
(:mod:`taxoclass.pipelines.finetune`), the open-set evaluation and the benches share.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import openset_calibration
from ..errors import ConfigError
from ..taxonomy.tree import DEFAULT_RANKS
from ..vocab import Calibration

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd

    from ..taxonomy.annotations import Annotations
    from ..taxonomy.tree import Taxonomy

Progress = Callable[[int, int], None]


def require_training_settings(cfg: dict) -> dict:
    """The ``data`` section, after checking that a training config names its inputs and output."""
    data = cfg["data"]
    if not data.get("annotations"):
        raise ConfigError("data.annotations is not set: point it at the annotations JSON "
                          "(in the config or with --set data.annotations=PATH).")
    if not cfg.get("out"):
        raise ConfigError("out is not set: the folder for the model bundle (config 'out' or "
                          "--set out=DIR).")
    ocfg = cfg.get("openset") or {}
    mode, _ = openset_calibration(ocfg)
    if mode == Calibration.CROSSFIT and not ocfg["enabled"]:
        raise ConfigError("openset.calibration: crossfit calibrates the open-set scorer, but "
                          "openset.enabled is false. Fix: set openset.calibration: holdout, or "
                          "openset.enabled: true.")
    return data


def validation_mask(ids: Sequence[str], nodes: Sequence[tuple], data: dict) -> np.ndarray:
    """Validation rows: from ``data.split_file`` (image_id, split) when given, else a
    seeded split (``val_fraction``, ``split_seed``) stratified by each image's taxon.
    """
    import numpy as np
    import pandas as pd

    from ..model.training import stratified_split

    if data.get("split_file"):
        split = pd.read_csv(data["split_file"], dtype={"image_id": str})
        chosen = pd.Series(list(ids)).map(dict(zip(split["image_id"], split["split"])))
        return (chosen == "val").to_numpy()
    strata = np.array(["/".join(n) for n in nodes])
    return stratified_split(strata, float(data["val_fraction"]),
                            int(data["split_seed"]))


def cached_embeddings(ids: Sequence[str], paths: Sequence[str], *, cache: str | Path,
                      backbone_cfg: dict, batch_size: int | None = None, num_workers: int = 0,
                      progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Embeddings for ``ids`` (in that order) from ``cache``, computing what is missing.

    Returns (embeddings [n, d] float32, found mask [n], backbone description).
    """
    import numpy as np

    from ..errors import CacheError
    from ..features.backbones import backbone_from_spec, backbone_spec, resolve_backbone_name
    from ..features.embeddings import compute_embeddings, load_embeddings

    cache = Path(cache)
    spec = backbone_spec(backbone_cfg)
    wanted = {"name": resolve_backbone_name(spec["name"]),
              "data_overrides": json.loads(json.dumps(spec.get("data_overrides") or {}))}
    try:
        loaded = load_embeddings(cache)
    except CacheError:
        loaded = None  # absent or unfinished: compute_embeddings resumes or starts it
    if loaded is not None:
        have_bb = loaded.manifest.get("backbone", {})
        have = {"name": have_bb.get("name"),
                "data_overrides": have_bb.get("data_overrides") or {}}
        if have != wanted:
            raise CacheError(f"Embedding cache {cache} holds features of {have} but the config "
                             f"asks for {wanted}. Fix: point embeddings.cache at a new folder, "
                             f"or set the backbone section (name, image_size, resize, pad_fill) "
                             f"to match.")
        if not set(ids) <= set(loaded.image_ids.tolist()):
            loaded = None  # recompute: compute_embeddings reuses nothing of another plan
    if loaded is None:
        bb = backbone_from_spec(spec)
        result = compute_embeddings(list(zip(ids, paths)), bb, cache, batch_size=batch_size,
                                    num_workers=num_workers, progress=progress)
        loaded = result.cache
    pos = {k: i for i, k in enumerate(loaded.image_ids.tolist())}
    found = np.array([k in pos for k in ids])
    emb = np.zeros((len(ids), loaded.embeddings.shape[1]), dtype=np.float32)
    idx = [pos[k] for k in ids if k in pos]
    emb[found] = loaded.embeddings[idx]
    return emb, found, loaded.manifest.get("backbone", {})


def known_rows(ann: Annotations, rows: pd.DataFrame, data: dict) -> tuple[Taxonomy, pd.DataFrame]:
    """(taxonomy, rows) a model trains on: without ``data.holdout_species``, if any.

    Held-out species leave the taxonomy too (their genus stays when it keeps a known
    species), so the model has no output for them: they are truly unknown to it.
    """
    held = list(data.get("holdout_species") or [])
    ranks = data.get("ranks") or DEFAULT_RANKS
    if not held:
        return ann.taxonomy(ranks), rows
    from ..openset.evaluation import choose_holdout, known_taxonomy, split_known_unknown

    try:
        held = choose_holdout(rows, species=held)  # checks the names exist
    except ValueError as exc:
        raise ConfigError(f"data.holdout_species: {exc}") from exc
    tax = known_taxonomy(ann.categories, held, ranks)
    return tax, rows[~split_known_unknown(rows, held)].reset_index(drop=True)


def embedding_cache(cfg: dict) -> str:
    """The config's embedding cache folder: ``embeddings.cache``, else ``<out>-embeddings``."""
    out = Path(cfg["out"])
    return cfg["embeddings"].get("cache") or str(out.parent / f"{out.name}-embeddings")


def with_views(x: np.ndarray, y: dict[str, np.ndarray], mask: np.ndarray,
               views: tuple[np.ndarray, np.ndarray] | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Training rows ``x[mask]`` / ``y[rank][mask]`` plus the tile-like views of those rows.

    ``views``: (view embeddings [m, d], index into ``x`` of each view's source image), as
    :func:`view_embeddings` gives them; a view counts only when its source is in ``mask``
    (never a view of a validation image) and takes its source's labels.
    """
    import numpy as np

    if views is None or not len(views[0]):
        return x[mask], {r: v[mask] for r, v in y.items()}
    xv, src = views
    keep = mask[src]
    return (np.concatenate([x[mask], xv[keep]]),
            {r: np.concatenate([v[mask], v[src[keep]]]) for r, v in y.items()})


def config_embeddings(cfg: dict, rows: pd.DataFrame, *, progress: Progress | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Embeddings of ``rows`` (``image_id``, ``path``) from the config's cache.

    The cache is ``embeddings.cache`` (default ``<out>-embeddings``) with the config's
    backbone section (name, weights, preprocessing); what is missing is computed. Returns
    (embeddings [n, d] float32, found mask [n], backbone description).
    """
    emb_cfg = cfg["embeddings"]
    return cached_embeddings([str(i) for i in rows["image_id"]], rows["path"].tolist(),
                           cache=embedding_cache(cfg), backbone_cfg=cfg["backbone"],
                           batch_size=emb_cfg.get("batch_size"),
                           num_workers=int(emb_cfg["num_workers"]), progress=progress)


def view_embeddings(cfg: dict, rows: pd.DataFrame, *, progress: Progress | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Tile-like views of ``rows`` (the training images) and their embeddings.

    As configured in ``augment`` (:class:`~taxoclass.features.views.ViewSettings`); views are
    written to ``augment.dir`` (default ``<embeddings.cache>-views``) and embedded with
    the config's backbone into a cache beside them. Both resume. Returns (embeddings
    [m, d] float32, index into ``rows`` of each view's source image [m]).
    """
    import numpy as np

    from ..features.views import ViewSettings, write_views

    acfg = dict(cfg.get("augment") or {})
    folder = acfg.pop("dir", None)
    settings = ViewSettings.from_mapping(acfg)
    ids = [str(i) for i in rows["image_id"]]
    if settings.views_per_image == 0 or not ids:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=int)
    if folder is None:
        folder = f"{embedding_cache(cfg)}-views"
    frame = write_views(list(zip(ids, rows["path"].tolist())), folder, settings)
    x, found, _ = cached_embeddings(
        frame["view_id"].tolist(), frame["path"].tolist(),
        cache=Path(folder) / f"embeddings-{settings.views_per_image}",
        backbone_cfg=cfg["backbone"], batch_size=cfg["embeddings"].get("batch_size"),
        num_workers=int(cfg["embeddings"]["num_workers"]), progress=progress)
    pos = {k: i for i, k in enumerate(ids)}
    source = frame["source_id"].map(pos).to_numpy()
    return x[found], source[found].astype(int)


