"""Training data from a config: rows, labels, validation split, cached embeddings, views.

The taxa a model knows (:func:`known_rows`): ``data.ranks`` (a list, or ``auto``: the
ranks the categories fill; the default stays family, genus, species) checked against the
categories, only the categories with labelled images (``data.keep_empty_taxa`` keeps the
others, a checklist prior), labels at any rank (a family-only image trains the ranks it
names). One implementation that head training (:mod:`taxoclass.pipelines.train`), fine-tuning
(:mod:`taxoclass.pipelines.finetune`), the open-set evaluation and the benches share.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import openset_calibration
from ..errors import AnnotationError, ConfigError
from ..taxonomy.tree import DEFAULT_RANKS
from ..vocab import Calibration

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd

    from ..taxonomy.annotations import Annotations
    from ..taxonomy.tree import Taxonomy

log = logging.getLogger(__name__)
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


def validation_mask(ids: Sequence[str], nodes: Sequence[tuple], data: dict,
                    groups: Sequence | None = None) -> np.ndarray:
    """Validation rows: from ``data.split_file`` (image_id, split) when given, else a
    seeded split (``val_fraction``, ``split_seed``) stratified by each image's taxon.

    ``groups``: a group per row (``data.group_by``, :func:`~taxoclass.model.splits.group_codes`);
    whole groups go to one side (:func:`~taxoclass.model.splits.validation_split`). A
    split file is taken as given; a group it puts on both sides is a warning.
    """
    import numpy as np
    import pandas as pd

    from ..model.splits import validation_split

    if data.get("split_file"):
        chosen = pd.Series(list(ids)).map(read_split_file(data["split_file"]))
        missing = chosen.isna()
        if missing.any():
            log.warning("data.split_file %s: %d of %d labelled images are not listed (e.g. %s); "
                        "they train.", data["split_file"], int(missing.sum()), len(ids),
                        ", ".join(pd.Series(list(ids))[missing].head(3)))
        is_val = (chosen == "val").to_numpy()
        if groups is not None:
            both = pd.Series(is_val).groupby(np.asarray(groups)).nunique()
            if (both > 1).any():
                log.warning("data.split_file %s: %d group(s) of data.group_by have images on "
                            "both sides (e.g. %s).", data["split_file"], int((both > 1).sum()),
                            both.index[both > 1][0])
        return is_val
    strata = np.array(["/".join(n) for n in nodes])
    return validation_split(strata, float(data["val_fraction"]), int(data["split_seed"]),
                            groups=groups)


def read_split_file(path: str | Path) -> dict[str, str]:
    """``image_id -> "train" | "val"`` from a split CSV (columns image_id, split), checked."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.split_file {path}: not found. Expected a CSV with columns "
                          "image_id,split (train or val), e.g. a bundle's split.csv.")
    try:
        split = pd.read_csv(path, dtype={"image_id": str, "split": str},
                            keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
        raise ConfigError(f"data.split_file {path}: not a readable CSV ({exc}).") from exc
    if not {"image_id", "split"} <= set(split.columns):
        raise ConfigError(f"data.split_file {path}: expected columns image_id and split, found "
                          f"{list(split.columns)}.")
    bad = sorted(set(split["split"]) - {"train", "val"})
    if bad:
        raise ConfigError(f"data.split_file {path}: expected split values 'train' or 'val', "
                          f"found {bad[:5]}. Fix: mark each image train or val (drop the "
                          "others, e.g. test images, from the file and the annotations).")
    dup = split["image_id"][split["image_id"].duplicated()]
    if len(dup):
        raise ConfigError(f"data.split_file {path}: image ids listed twice, e.g. "
                          f"{dup.head(3).tolist()}; list each image once.")
    return dict(zip(split["image_id"], split["split"]))


def cached_embeddings(ids: Sequence[str], paths: Sequence[str], *, cache: str | Path,
                      backbone_cfg: dict, batch_size: int | None = None, num_workers: int = 0,
                      progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Embeddings of the files ``paths`` (rows labelled ``ids``) from the store in ``cache``.

    Vectors are found by each file's content and the backbone, never by id, so a path
    that now holds other bytes is embedded again; what is missing is computed (a failed
    image is tried again on every call). Returns (embeddings [n, d] float32, found mask
    [n], backbone description); :class:`~taxoclass.errors.ImageError` when not one image
    could be embedded.
    """
    import os

    import numpy as np

    from ..errors import ImageError
    from ..features.backbones import backbone_spec
    from ..features.embeddings import embed_with_spec

    res = embed_with_spec([str(p) for p in paths], cache, backbone_spec(backbone_cfg), ids=ids,
                          batch_size=batch_size, num_workers=num_workers, progress=progress)
    failed = [(paths[i], res.errors.get(i, "not embedded")) for i in np.flatnonzero(~res.found)]
    if failed and not res.found.any():
        missing = sum(not Path(p).is_file() for p in paths)
        root = os.path.commonpath([str(Path(p).parent) for p in paths])
        found = (f"{len(ids) - missing} of {len(ids)} images found under {root}"
                 if missing else f"none of the {len(ids)} images could be embedded")
        raise ImageError(f"{found} (first: {failed[0][0]}: {failed[0][1]}). Fix: point the "
                         f"images root (data.images_root, --images-root) at the folder the "
                         f"annotations' file_name paths are relative to.")
    if failed:
        log.warning("%d image(s) could not be embedded, e.g. %s: %s", len(failed), *failed[0])
    return res.embeddings, res.found, res.description


def known_rows(ann: Annotations, rows: pd.DataFrame, data: dict) -> tuple[Taxonomy, pd.DataFrame]:
    """(taxonomy, rows) a model trains on: the taxa with labelled images, without
    ``data.holdout_species``, if any.

    ``data.ranks`` is a list or ``"auto"`` (the known ranks the categories fill, top-down),
    checked against the categories (a rank no category fills is an error). Categories
    without any labelled image are left out of the taxonomy (one warning lists them)
    unless ``data.keep_empty_taxa``; the model has no output for them, and the bundle's
    taxonomy is this reduced, known set. Held-out species leave the taxonomy too (their
    genus stays when it keeps a known species), so the model has no output for them:
    they are truly unknown to it. The rows are checked (:func:`check_training_rows`):
    none, or one taxon only, is an error; taxa with one image are a warning.
    """
    from ..taxonomy.validation import check_ranks

    held = list(data.get("holdout_species") or [])
    ranks = check_ranks(data.get("ranks") or DEFAULT_RANKS,
                        ann.categories.to_dict("records"), ann.source)
    rows = _rows_with_a_rank(rows, ranks, ann.source)
    keep_empty = bool(data.get("keep_empty_taxa"))
    used = None if keep_empty else _used_categories(ann, rows, ranks)
    if not held:
        tax = ann.taxonomy(ranks, category_ids=used)
        check_training_rows(tax, rows, source=ann.source, keep_empty=keep_empty)
        return tax, rows
    from ..openset.evaluation import choose_holdout, known_taxonomy, split_known_unknown

    try:
        held = choose_holdout(rows, species=held)  # checks the names exist
    except ValueError as exc:
        raise ConfigError(f"data.holdout_species: {exc}") from exc
    cats = ann.categories if used is None else ann.categories[
        ann.categories["category_id"].isin(used)]
    tax = known_taxonomy(cats, held, ranks)
    rows = rows[~split_known_unknown(rows, held)].reset_index(drop=True)
    check_training_rows(tax, rows, source=f"{ann.source} without data.holdout_species",
                        keep_empty=keep_empty)
    return tax, rows


def _rows_with_a_rank(rows: pd.DataFrame, ranks: Sequence[str], source: str) -> pd.DataFrame:
    """Drop (one warning) labelled images whose label names none of ``ranks`` (an
    order-only label when data.ranks starts at family): nothing to train them on."""
    from ..taxonomy.tree import rank_values

    if not len(rows):
        return rows
    named = [any(rank_values(rec, ranks)) for rec in rows.to_dict("records")]
    if all(named):
        return rows
    import numpy as np

    keep = np.asarray(named)
    log.warning("%s: %d labelled image(s) name no rank of data.ranks %s (labels above its "
                "top rank, e.g. image_id %s); they are left out of training. Fix: add the "
                "rank to data.ranks (or data.ranks: auto).", source, int((~keep).sum()),
                list(ranks), rows["image_id"][~keep].iloc[0])
    return rows[keep].reset_index(drop=True)


def _used_categories(ann: Annotations, rows: pd.DataFrame, ranks: Sequence[str]) -> list:
    """The category ids with a labelled image; one warning names the others (left out)."""
    used = set(rows["category_id"]) if len(rows) else set()
    cats = ann.categories
    empty = cats[~cats["category_id"].isin(list(used))]
    if len(empty) and used:
        names = sorted({_category_name(rec, ranks) for rec in empty.to_dict("records")})
        log.warning("%s: %d categories have no labelled image and are left out of the model "
                    "(it has no output for them): %s. Fix: add images of them, or set "
                    "data.keep_empty_taxa: true to keep them as classes (a checklist prior).",
                    ann.source, len(names), _some(names, 20))
    return [c for c in cats["category_id"] if c in used]


def _category_name(rec: dict, ranks: Sequence[str]) -> str:
    """The lowest named rank of a category record (species as a binomial)."""
    from ..taxonomy.tree import rank_values

    named = [v for v in rank_values(rec, ranks) if v]
    return named[-1] if named else str(rec.get("category_id"))


def check_training_rows(tax: Taxonomy, rows: pd.DataFrame, *, source: str,
                        keep_empty: bool = False) -> None:
    """Refuse training data that cannot make a model, warn about data that makes a
    misleading one.

    Errors (:class:`AnnotationError`): no labelled image; every image one taxon of the
    lowest rank (a one-class model scores accuracy 1.000 by construction). Warnings: taxa
    with a single image (it trains, so no validation image checks them) and, should the
    taxonomy still hold taxa without any image, those (output classes the model never
    learned); with ``keep_empty`` (``data.keep_empty_taxa``) they are kept on purpose and
    only logged at info level.
    """
    lowest = tax.ranks[-1]
    if len(rows) == 0:
        raise AnnotationError(
            f"{source}: 0 annotations: nothing to train on. Expected labelled images (an "
            "'annotations' list of image_id, category_id). Fix: add the labels, or point "
            "data.annotations at the labelled file (`taxoclass validate FILE` lists them).")
    nodes = _row_nodes(tax, rows)
    per_taxon = Counter(nodes)
    if len(per_taxon) < 2:
        only = tax.label(next(iter(per_taxon)))
        raise AnnotationError(
            f"{source}: all {len(rows)} labelled images are one {lowest} ({only!r}); a "
            f"classifier needs at least two {lowest} taxa to tell apart (a one-class model "
            f"scores accuracy 1.000 whatever it sees). Fix: add images of at least one more "
            f"{lowest}.")
    depth = len(tax.ranks)  # partial labels (a genus with named species) count nowhere below
    single = sorted(tax.label(n) for n, k in per_taxon.items() if k == 1 and len(n) == depth)
    if single:
        log.warning("%s: %d %s taxa have one labelled image, which trains, so no validation "
                    "image checks them (and the split cannot stratify them): %s. Fix: add "
                    "images (2 or more per taxon).", source, len(single), lowest,
                    _some(single))
    labelled = {n[:k] for n in per_taxon for k in range(1, len(n) + 1)}
    unused = sorted(tax.label(n) for n in tax.nodes(lowest) if n not in labelled)
    if unused and keep_empty:
        log.info("%s: %d %s taxa without a labelled image kept as output classes "
                 "(data.keep_empty_taxa): %s", source, len(unused), lowest, _some(unused))
    elif unused:
        log.warning("%s: %d %s taxa of the categories have no labelled image; the model keeps "
                    "them as output classes it never learned (they get low scores): %s. Fix: "
                    "add images of them, or remove those categories.", source, len(unused),
                    lowest, _some(unused))


def _row_nodes(tax: Taxonomy, rows: pd.DataFrame) -> list[tuple]:
    """The taxonomy node of each row's label (one look-up per distinct label)."""
    cols = [r for r in tax.ranks if r in rows.columns]
    node_of: dict[tuple, tuple] = {}
    out = []
    for key in rows[cols].itertuples(index=False, name=None):
        if key not in node_of:
            node_of[key] = tax.node_for(dict(zip(cols, key)))
        out.append(node_of[key])
    return out


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


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


