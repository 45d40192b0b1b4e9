"""End-to-end jobs, one function per CLI command, usable from Python as well.

Each job checks its inputs and output paths before loading a model, writes its
outputs atomically and leaves ``provenance.json`` beside them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import openset_calibration
from ..errors import AnnotationError, ConfigError
from ..io.provenance import write_provenance
from ..taxonomy.tree import DEFAULT_RANKS, Taxonomy

Progress = Callable[[int, int], None]


def load_taxonomy(source: str | Path, ranks: Sequence[str] = DEFAULT_RANKS) -> Taxonomy:
    """Taxonomy from an annotations JSON (validated) or a species table (CSV / ``;``)."""
    from ..taxonomy.annotations import load_annotations, read_species_table

    source = Path(source)
    if not source.exists():
        raise AnnotationError(f"{source}: not found. Expected an annotations JSON or a species "
                              "table (CSV).")
    if source.suffix.lower() == ".json":
        return load_annotations(source).taxonomy(ranks)
    table = read_species_table(source)
    return Taxonomy.from_records(table.to_dict("records"), ranks, source=str(source))


def embed_annotations(annotations: str | Path, *, out: str | Path,
                      images_root: str | Path | None = None,
                      backbone: str = "vit_base_patch14_reg4_dinov2.lvd142m",
                      checkpoint: str | Path | None = None, batch_size: int | None = None,
                      num_workers: int = 0, overwrite: bool = False,
                      model_kwargs: dict | None = None, progress: Progress | None = None,
                      engine: str = "local", master: str | None = None,
                      device: str = "auto", image_size: int | None = None,
                      resize: str | None = None, pad_fill: str | int | None = None,
                      precision: str = "auto"):
    """Embed every image listed in ``annotations`` into the cache folder ``out``.

    ``image_size`` / ``resize`` / ``pad_fill`` set the preprocessing
    (:func:`~taxoclass.features.backbones.preprocess_overrides`; default: the model's own).

    ``engine="spark"`` runs the same embedding code in PySpark (``master``, default
    ``local[2]``) and writes Parquet. Returns the
    :class:`~taxoclass.features.embeddings.EmbedResult`.
    """
    from ..features.backbones import backbone_from_spec, backbone_spec
    from ..features.embeddings import compute_embeddings
    from ..taxonomy.annotations import load_annotations

    if engine != "local" and precision != "auto":
        raise ConfigError(f"--precision {precision} is for the local engine; Spark executors "
                          f"embed in float32 on CPUs. Fix: drop --precision.")
    spec = backbone_spec({"name": backbone, "checkpoint": str(checkpoint) if checkpoint else None,
                          "model_kwargs": model_kwargs or {}, "image_size": image_size,
                          "resize": resize, "pad_fill": pad_fill})
    ann = load_annotations(annotations, check=False)
    root = Path(images_root) if images_root else Path(annotations).parent
    if not root.is_dir():
        raise AnnotationError(f"--images-root {root}: no such directory. Pass the folder the "
                              "images' file_name paths are relative to.")
    items = ann.image_items(root)
    if not items:
        raise AnnotationError(f"{annotations}: lists no images; nothing to embed.")
    if engine != "local":
        from ..engines import get_engine
        from ..features.batching import auto_batch_size

        batch_size = batch_size or auto_batch_size("cpu")
        return get_engine(engine, master=master).embed(
            items, spec, out, batch_size=batch_size, overwrite=overwrite, progress=progress)
    model = backbone_from_spec(spec, device=device, precision=precision)
    result = compute_embeddings(items, model, out, batch_size=batch_size,
                                num_workers=num_workers, overwrite=overwrite, progress=progress)
    write_provenance(out, backbone=model.describe(), config={
        "annotations": str(Path(annotations).resolve()), "images_root": str(root.resolve()),
        "backbone": backbone, "checkpoint": str(checkpoint) if checkpoint else None,
        "backbone_spec": spec,
        "batch_size": result.cache.manifest.get("plan", {}).get("batch_size", batch_size),
        "num_workers": num_workers})
    return result


# --------------------------------------------------------------------------- training
def _targets(taxonomy: Taxonomy, rows) -> tuple[dict, list]:
    """Class index per rank for each labelled row (-1 below the label's rank)."""
    import numpy as np

    ranks = taxonomy.ranks
    out = {r: np.full(len(rows), -1, dtype=np.int64) for r in ranks}
    nodes = []
    for i, rec in enumerate(rows.to_dict("records")):
        node = taxonomy.node_for(rec)
        nodes.append(node)
        for r, k in taxonomy.path_indices(node).items():
            out[r][i] = k
    return out, nodes


def require_training_settings(cfg: dict) -> dict:
    """The ``data`` section, after checking that a training config names its inputs and output."""
    from ..errors import ConfigError

    data = cfg["data"]
    if not data.get("annotations"):
        raise ConfigError("data.annotations is not set: point it at the annotations JSON "
                          "(in the config or with --set data.annotations=PATH).")
    if not cfg.get("out"):
        raise ConfigError("out is not set: the folder for the model bundle (config 'out' or "
                          "--set out=DIR).")
    ocfg = cfg.get("openset") or {}
    mode, _ = openset_calibration(ocfg)
    if mode == "crossfit" and not ocfg.get("enabled", True):
        raise ConfigError("openset.calibration: crossfit calibrates the open-set scorer, but "
                          "openset.enabled is false. Fix: set openset.calibration: holdout, or "
                          "openset.enabled: true.")
    return data


def validation_mask(ids: Sequence[str], nodes: Sequence[tuple], data: dict):
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
    return stratified_split(strata, float(data.get("val_fraction", 0.3)),
                            int(data.get("split_seed", 0)))


def _embeddings_for(ids: Sequence[str], paths: Sequence[str], *, cache: str | Path,
                    backbone_cfg: dict, batch_size: int | None = None, num_workers: int = 0,
                    progress: Progress | None = None):
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


def known_rows(ann, rows, data: dict):
    """(taxonomy, rows) a model trains on: without ``data.holdout_species``, if any.

    Held-out species leave the taxonomy too (their genus stays when it keeps a known
    species), so the model has no output for them: they are truly unknown to it.
    """
    held = list(data.get("holdout_species") or [])
    ranks = data.get("ranks") or DEFAULT_RANKS
    if not held:
        return ann.taxonomy(ranks), rows
    from ..openset.scorer import choose_holdout, known_taxonomy, split_known_unknown

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


def with_views(x, y: dict, mask, views=None):
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


def config_embeddings(cfg: dict, rows, *, progress: Progress | None = None):
    """Embeddings of ``rows`` (``image_id``, ``path``) from the config's cache.

    The cache is ``embeddings.cache`` (default ``<out>-embeddings``) with the config's
    backbone section (name, weights, preprocessing); what is missing is computed. Returns
    (embeddings [n, d] float32, found mask [n], backbone description).
    """
    emb_cfg = cfg["embeddings"]
    return _embeddings_for([str(i) for i in rows["image_id"]], rows["path"].tolist(),
                           cache=embedding_cache(cfg), backbone_cfg=cfg["backbone"],
                           batch_size=emb_cfg.get("batch_size"),
                           num_workers=int(emb_cfg.get("num_workers", 0)), progress=progress)


def view_embeddings(cfg: dict, rows, *, progress: Progress | None = None):
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
    x, found, _ = _embeddings_for(
        frame["view_id"].tolist(), frame["path"].tolist(),
        cache=Path(folder) / f"embeddings-{settings.views_per_image}",
        backbone_cfg=cfg["backbone"], batch_size=cfg["embeddings"].get("batch_size"),
        num_workers=int(cfg["embeddings"].get("num_workers", 0)), progress=progress)
    pos = {k: i for i, k in enumerate(ids)}
    source = frame["source_id"].map(pos).to_numpy()
    return x[found], source[found].astype(int)


def train_from_config(cfg: dict, *, progress: Progress | None = None,
                      embed_progress: Progress | None = None) -> Path:
    """Train a hierarchical head as configured (``configs/leaf.yaml``); returns the bundle."""
    import numpy as np
    import pandas as pd

    from ..bundle import ModelBundle
    from ..features.backbones import backbone_spec
    from ..io.files import atomic_write_csv, atomic_write_json
    from ..model.metrics import evaluate_predictions
    from ..model.training import train_head
    from ..taxonomy.annotations import load_annotations

    data = require_training_settings(cfg)
    out = Path(cfg["out"])
    root = Path(data.get("images_root") or Path(data["annotations"]).parent)
    ann = load_annotations(data["annotations"])
    rows = ann.labelled_images(root)
    tax, rows = known_rows(ann, rows, data)
    y, nodes = _targets(tax, rows)
    ids = [str(i) for i in rows["image_id"]]
    cache = embedding_cache(cfg)
    x, found, backbone_desc = config_embeddings(cfg, rows, progress=embed_progress)
    if not found.all():
        missing = [i for i, f in zip(ids, found) if not f][:5]
        print(f"warning: {int((~found).sum())} labelled image(s) have no embedding (unreadable; "
              f"see {cache}/failures.csv), e.g. {missing}; training without them.")
    is_val = validation_mask(ids, nodes, data)
    ocfg = cfg.get("openset") or {}
    crossfit = openset_calibration(ocfg)[0] == "crossfit"
    # crossfit: every embedded image trains the final head (no validation split).
    tr, va = (found, np.zeros_like(found)) if crossfit else (found & ~is_val, found & is_val)
    # Tile-like views of the training images only (never of validation images).
    tr_idx = np.flatnonzero(tr)
    xv, src = view_embeddings(cfg, rows.iloc[tr_idx].reset_index(drop=True),
                              progress=embed_progress)
    normalize_inputs = bool(cfg["model"].get("normalize", True))
    top_k = int(cfg["decode"].get("top_k", 5))
    fold = np.full(len(ids), -1)
    if crossfit:
        from ..openset.scorer import truth_names

        cf = crossfit_openset(x[tr], {r: v[tr] for r, v in y.items()}, tax,
                              truth_names(rows[tr], tax.ranks), cfg,
                              seed=int(data.get("split_seed", 0)), views=(xv, src),
                              progress=progress)
        result, calibration = cf.train, cf.info
        fold[tr] = cf.oof.fold
        # The final head trained on every row: its own validation figures would be
        # in-sample, so the metrics are those of the out-of-fold predictions.
        metrics = evaluate_predictions(cf.oof.decoded.path, {r: v[tr] for r, v in y.items()},
                                       tax, topk_index=cf.oof.decoded.topk_index)
        metrics["predictions"] = (f"out-of-fold: each of the {int(tr.sum())} images predicted "
                                  f"by one of {cf.oof.n_folds} fold heads that did not train on "
                                  f"it (the bundle's head trained on all of them)")
    else:
        x_tr, y_tr = with_views(x, y, tr, (xv, tr_idx[src]))
        result = train_head(x_tr, y_tr, x[va], {r: v[va] for r, v in y.items()}, tax,
                            model=cfg["model"], loss=cfg["loss"], train=cfg["train"],
                            normalize_inputs=normalize_inputs, progress=progress)
        calibration = {"calibration": "holdout", "n_calibration_rows": int(va.sum())}
    bundle = ModelBundle(head=result.head, taxonomy=tax, normalize=normalize_inputs,
                         decode_method=cfg["decode"]["method"],
                         backbone={**backbone_spec(cfg["backbone"]), "description": backbone_desc},
                         extra={"annotations": str(Path(data["annotations"]).resolve()),
                                "embedding_cache": str(Path(cache).resolve()),
                                "best_epoch": result.best_epoch})
    if not crossfit:
        decoded = bundle.predict_embeddings(x[va], top_k=top_k)
        metrics = evaluate_predictions(decoded.path, {r: v[va] for r, v in y.items()}, tax,
                                       topk_index=decoded.topk_index)
        metrics["predictions"] = f"validation split ({int(va.sum())} images, not trained on)"
    if ocfg.get("enabled", True):
        if crossfit:
            bundle.scorer = cf.scorer
        else:
            bundle.scorer = fit_openset_scorer(bundle, x_tr, y_tr["genus"], x[va],
                                               rows[va].reset_index(drop=True), ocfg,
                                               species_train=y_tr[tax.ranks[-1]])
        metrics["openset_thresholds"] = bundle.scorer.thresholds.to_dict()
        metrics["openset_calibration"] = calibration
        bundle.extra["openset_calibration"] = calibration
    bundle.save(out)
    atomic_write_csv(out / "history.csv", result.history)
    split = pd.DataFrame({"image_id": ids, "split": np.where(is_val & ~crossfit, "val", "train"),
                          "embedded": found})
    if crossfit:
        split["fold"] = fold  # crossfit fold of each image (-1: not embedded)
    atomic_write_csv(out / "split.csv", split)
    atomic_write_json(out / "metrics_val.json", metrics)
    write_provenance(out, config=cfg, backbone=backbone_desc, extra={
        "training": {"best_epoch": result.best_epoch, "epochs_run": len(result.history),
                     "seconds": result.seconds, "n_train": int(tr.sum()),
                     "n_train_views": int(len(xv)), "n_val": int(va.sum())},
        "openset_calibration": calibration if ocfg.get("enabled", True) else None})
    return out


def _openset_detector(x_train, genus_train, species_train, ocfg: dict):
    """The configured outlier detector on at most ``openset.max_train`` rows (seeded)."""
    import numpy as np

    from ..openset.scorer import fit_detector

    max_train = int(ocfg.get("max_train", 50000))
    if len(x_train) > max_train:
        keep = np.sort(np.random.default_rng(0).choice(len(x_train), max_train, replace=False))
        x_train, genus_train = x_train[keep], genus_train[keep]
        species_train = None if species_train is None else species_train[keep]
    return fit_detector(x_train, genus_train, labels_train=species_train,
                        method=ocfg.get("detector", "knn"), scope=ocfg.get("scope", "group"))


def _openset_evidence(decoded, z, correct, ocfg: dict):
    """The configured evidence combiner and thresholds (:func:`openset.fit_evidence`)."""
    from ..openset.scorer import fit_evidence

    return fit_evidence(decoded, z, correct, combiner=ocfg.get("combiner", "rank_mean"),
                        confidence=ocfg.get("confidence", "path_prob"),
                        gate_quantile=float(ocfg.get("gate_quantile", 0.975)),
                        target_precision=ocfg.get("target_precision", 0.95),
                        min_support=int(ocfg.get("min_support", 10)))


def fit_openset_scorer(bundle, x_train, genus_train, x_val, rows_val, ocfg: dict, *,
                       species_train=None):
    """Fit the outlier detector on training embeddings, and the evidence combiner and the
    per-rank thresholds (to ``ocfg["target_precision"]``) on the validation images.

    The validation split also chose the early-stopping epoch, so thresholds are slightly
    optimistic; with few validation images per rank a target may be unreachable (the
    rank is then never trusted: threshold +inf, listed in ``thresholds.unreachable``).
    ``openset.calibration: crossfit`` calibrates on every image instead
    (:func:`crossfit_openset`).
    """
    from ..openset.scorer import OpenSetScorer, correct_by_rank, path_names, truth_names

    tax = bundle.taxonomy
    det = _openset_detector(bundle.scorer_input(x_train), genus_train, species_train, ocfg)
    decoded_val = bundle.predict_embeddings(x_val)
    correct = correct_by_rank(path_names(decoded_val.path, tax),
                              truth_names(rows_val, tax.ranks), tax.ranks)
    groups = decoded_val.path["genus"] if det.scope == "group" else None
    z = det.decision_function(bundle.scorer_input(x_val), groups)
    comb, thr = _openset_evidence(decoded_val, z, correct, ocfg)
    return OpenSetScorer(detector=det, combiner=comb, thresholds=thr, group_rank="genus")


@dataclass
class CrossfitOpenset:
    """A head trained on every row and an open-set scorer calibrated out of fold."""

    train: Any                 # training.TrainResult of the final head (all rows)
    scorer: Any                # openset.OpenSetScorer: detector on all rows, thresholds OOF
    oof: Any                   # openset.CrossfitPredictions the thresholds rest on
    correct: dict[str, Any]    # rank -> the out-of-fold path is right there
    info: dict[str, Any]       # what to record: calibration, folds, seed, rows


def crossfit_openset(x, y: dict, taxonomy: Taxonomy, truth: dict, cfg: dict, *, seed: int = 0,
                     views=None, progress: Progress | None = None) -> CrossfitOpenset:
    """``openset.calibration: crossfit``: head and open-set scorer without a validation split.

    Rows are split into ``openset.folds`` folds stratified by taxon (seeded). For each
    fold a head (:func:`~taxoclass.model.training.train_head` with the config's ``model``,
    ``loss``, ``train`` sections, no validation rows) and the configured detector are
    fitted on the other folds; their predictions and outlier scores of the fold's rows
    are out-of-fold (:func:`~taxoclass.openset.scorer.crossfit_predictions`). The evidence
    combiner and thresholds are fitted on these predictions of every row; then the final
    head and the final detector are fitted on all rows. ``y``: class index per rank;
    ``truth``: :func:`~taxoclass.openset.scorer.truth_names` of the rows; ``views``: (view
    embeddings, index into ``x`` of each view's source), a view trains with its source.
    Costs ``folds + 1`` head trainings.
    """
    import numpy as np

    from ..bundle import ModelBundle, scorer_input
    from ..model.training import train_head
    from ..openset.scorer import OpenSetScorer, correct_by_rank, crossfit_predictions, path_names

    ocfg = dict(cfg.get("openset") or {})
    _, n_folds = openset_calibration(ocfg)
    model, train = dict(cfg.get("model") or {}), dict(cfg.get("train") or {})
    decode_cfg = dict(cfg.get("decode") or {})
    normalize_inputs = bool(model.get("normalize", True))
    lowest = taxonomy.ranks[-1]
    epochs = int(train.get("epochs", 200))

    def fit(mask, k):
        xt, yt = with_views(x, y, mask, views)
        step = (None if progress is None else
                lambda e, n: progress(k * epochs + e, (n_folds + 1) * epochs))
        head = train_head(xt, yt, None, None, taxonomy, model=model, loss=cfg.get("loss"),
                          train=train, normalize_inputs=normalize_inputs, progress=step)
        det = _openset_detector(scorer_input(xt, normalize_inputs), yt["genus"], yt[lowest],
                                ocfg)
        return head, det

    fold_number = iter(range(n_folds))

    def fit_fold(mask):
        head, det = fit(mask, next(fold_number))
        fold_bundle = ModelBundle(head=head.head, taxonomy=taxonomy, backbone={},
                                  normalize=normalize_inputs)
        return fold_bundle.logits, det

    strata = np.array(["/".join(map(str, t)) for t in zip(*(y[r] for r in taxonomy.ranks))])
    oof = crossfit_predictions(x, strata, fit_fold, taxonomy, n_folds=n_folds, seed=seed,
                               decode_method=decode_cfg.get("method", "path"),
                               top_k=int(decode_cfg.get("top_k", 5)),
                               x_detector=scorer_input(x, normalize_inputs))
    correct = correct_by_rank(path_names(oof.decoded.path, taxonomy), truth, taxonomy.ranks)
    comb, thr = _openset_evidence(oof.decoded, oof.outlier, correct, ocfg)
    final, det = fit(np.ones(len(x), dtype=bool), n_folds)
    info = {"calibration": "crossfit", "folds": n_folds, "seed": int(seed),
            "n_calibration_rows": int(len(x)), "out_of_fold": True}
    return CrossfitOpenset(train=final, scorer=OpenSetScorer(
        detector=det, combiner=comb, thresholds=thr, group_rank="genus"),
        oof=oof, correct=correct, info=info)


# --------------------------------------------------------------------------- predict
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image paths."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.exists() or p.suffix.lower() in IMAGE_SUFFIXES:
            out.append(p)  # a missing file becomes a recorded failure, not a crash
        else:
            raise AnnotationError(f"{p}: no such file or folder. Pass image files or folders.")
    if not out:
        raise AnnotationError(f"No images found in {[str(i) for i in inputs]} (looked for "
                              f"{', '.join(IMAGE_SUFFIXES)}).")
    return out


def predict_images(model: str | Path, images: Sequence[str | Path], *,
                   out: str | Path | None = None, batch_size: int | None = None,
                   num_workers: int = 0,
                   top_k: int = 5, overwrite: bool = False, progress: Progress | None = None,
                   device: str = "auto"):
    """Predictions for image files or folders, backed off to the lowest reliable rank.

    Returns a DataFrame, one row per image: ``taxon_rank``, ``taxon`` (``Quercus sp.`` at
    genus rank), ``score``, ``reason``, ``outlier``, the full coherent path with
    probabilities and top-k per rank; failed images carry an ``error``. With
    ``out``, embeddings are cached (resumable) in ``out/embeddings`` and
    ``predictions.csv`` / ``predictions.json`` plus provenance are written there.
    """
    import tempfile

    import pandas as pd

    from ..bundle import ModelBundle
    from ..features.embeddings import compute_embeddings
    from ..io.files import atomic_write_csv, atomic_write_json

    bundle = ModelBundle.load(model)
    paths = collect_images(images)
    items = [(str(p), str(p)) for p in paths]
    backbone = bundle.create_backbone(device=device)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(out) / "embeddings" if out else Path(tmp) / "embeddings"
        res = compute_embeddings(items, backbone, cache_dir, batch_size=batch_size,
                                 num_workers=num_workers, overwrite=overwrite,
                                 progress=progress)
    backoff, decoded = bundle.predict_with_backoff(res.cache.embeddings, top_k=top_k)
    tops = decoded.to_frame(bundle.taxonomy)
    frame = pd.concat([pd.DataFrame({"image": res.cache.image_ids.tolist()}), backoff,
                       tops[[c for c in tops.columns if "_top" in c]]], axis=1)
    if len(res.failures):
        fails = pd.DataFrame({"image": res.failures["image_id"].astype(str),
                              "error": res.failures["error"]})
        frame = pd.concat([frame, fails], ignore_index=True)
    if out:
        atomic_write_csv(Path(out) / "predictions.csv", frame)
        atomic_write_json(Path(out) / "predictions.json",
                          frame.astype(object).where(frame.notna(), None).to_dict("records"))
        write_provenance(out, backbone=backbone.describe(),
                         config={"model": str(Path(model).resolve()), "top_k": top_k,
                                 "images": [str(i) for i in images]})
    return frame


# --------------------------------------------------------------------------- evaluate
def flag_unknowns(model: str | Path, images: Sequence[str | Path], *, out: str | Path,
                  batch_size: int | None = None, overwrite: bool = False,
                  progress: Progress | None = None, device: str = "auto"):
    """Field-survey screening: one row per image, flagged rows (not named to species) first.

    Writes ``flags.csv`` into ``out`` (plus predictions and provenance) and returns
    ``(frame, summary)`` where summary counts images resolved at each rank.
    """
    import pandas as pd

    from ..bundle import ModelBundle
    from ..io.files import atomic_write_csv, atomic_write_json

    frame = predict_images(model, images, out=out, batch_size=batch_size, overwrite=overwrite,
                           progress=progress, device=device)
    lowest = ModelBundle.load(model).taxonomy.ranks[-1]
    reason = frame["reason"] if "reason" in frame else pd.Series([None] * len(frame))
    frame.insert(1, "flagged", (reason != lowest).to_numpy())
    frame = frame.sort_values(["flagged", "taxon_rank", "image"], ascending=[False, True, True],
                              kind="stable").reset_index(drop=True)
    resolved = frame["taxon_rank"].fillna("failed").value_counts().to_dict()
    summary = {"n_images": len(frame), "n_flagged": int(frame["flagged"].sum()),
               "resolved_at": {k: int(v) for k, v in resolved.items()}}
    atomic_write_csv(Path(out) / "flags.csv", frame)
    atomic_write_json(Path(out) / "flags_summary.json", summary)
    return frame, summary


def evaluate_model(model: str | Path, annotations: str | Path, *,
                   images_root: str | Path | None = None, out: str | Path | None = None,
                   split: str = "auto", cache: str | Path | None = None,
                   progress: Progress | None = None) -> dict:
    """Per-rank and hierarchical metrics of a bundle on labelled images.

    ``split="auto"`` scores only the validation images when ``annotations`` is the file
    the model was trained on (so training images never inflate the figures); ``"all"``
    scores every labelled image. Writes metrics.json, confusion.csv and predictions.csv
    into ``out`` when given.
    """
    import numpy as np
    import pandas as pd

    from ..bundle import ModelBundle
    from ..errors import ConfigError, TaxonomyError
    from ..io.files import atomic_write_csv, atomic_write_json
    from ..model.metrics import confusion_summary, evaluate_predictions
    from ..taxonomy.annotations import load_annotations

    bundle = ModelBundle.load(model)
    tax = bundle.taxonomy
    root = Path(images_root) if images_root else Path(annotations).parent
    ann = load_annotations(annotations, images_root=None)
    rows = ann.labelled_images(root)
    keep, unknown = [], 0
    for rec in rows.to_dict("records"):
        try:
            tax.node_for(rec)
            keep.append(True)
        except TaxonomyError:
            keep.append(False)
            unknown += 1
    rows = rows[np.array(keep, dtype=bool)].reset_index(drop=True)
    ids = [str(i) for i in rows["image_id"]]
    same_file = Path(annotations).resolve() == Path(bundle.extra.get("annotations", "")).resolve()
    split_file = Path(model) / "split.csv"
    if split not in ("auto", "all", "val", "train"):
        raise ConfigError(f"--split {split!r}: expected auto, all, val or train.")
    if split == "auto":
        split = "val" if same_file and split_file.is_file() else "all"
    if split != "all":
        if not split_file.is_file():
            raise ConfigError(f"--split {split}: {split_file} not found; use --split all.")
        s = pd.read_csv(split_file, dtype={"image_id": str})
        chosen = set(s.loc[s["split"] == split, "image_id"])
        if split == "val" and not chosen:
            raise ConfigError(f"{split_file} has no validation images: the model trained on "
                              f"every image (openset.calibration: crossfit), so none is held "
                              f"out. Its out-of-fold figures are in metrics_val.json; evaluate "
                              f"on other annotations, or pass --split all (in-sample).")
        mask = np.array([i in chosen for i in ids])
        rows, ids = rows[mask].reset_index(drop=True), [i for i, m in zip(ids, mask) if m]
    if not ids:
        raise ConfigError(f"{annotations}: no labelled image of the model's taxa to evaluate "
                          f"(split {split}).")
    y, _ = _targets(tax, rows)
    cache = cache or bundle.extra.get("embedding_cache")
    if not cache:
        cache = Path(out or tempfile_dir()) / "embeddings"
    x, found, _ = _embeddings_for(ids, rows["path"].tolist(), cache=cache,
                                  backbone_cfg=bundle.backbone, progress=progress)
    x, y = x[found], {r: v[found] for r, v in y.items()}
    decoded = bundle.predict_embeddings(x)
    metrics = evaluate_predictions(decoded.path, y, tax, topk_index=decoded.topk_index)
    metrics["split"] = split
    metrics["n_images"] = int(found.sum())
    metrics["n_skipped_unknown_taxon"] = unknown
    metrics["n_failed_images"] = int((~found).sum())
    confusion = confusion_summary(decoded.path, y, tax, rank=tax.ranks[-1])
    if out:
        out = Path(out)
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_csv(out / "confusion.csv", confusion)
        ids_found = [i for i, f in zip(ids, found) if f]
        atomic_write_csv(out / "predictions.csv", decoded.to_frame(tax, ids=ids_found))
        write_provenance(out, backbone=bundle.backbone, config={
            "model": str(Path(model).resolve()), "annotations": str(Path(annotations).resolve()),
            "split": split})
    metrics["confusion"] = confusion.to_dict("records")
    return metrics


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="taxoclass-")


# --------------------------------------------------------------------------- plots
def load_tile_classifier(model: str | Path, *, class_mapping: str | Path | None = None,
                         species_table: str | Path | None = None,
                         backbone: str = "vit_base_patch14_reg4_dinov2",
                         model_kwargs: dict | None = None, batch_size: int = 32,
                         device: str = "auto"):
    """A tile classifier from a model bundle folder, or from a PlantCLEF 2024 checkpoint file
    (``model_best.pth.tar`` + ``class_mapping.txt`` + species table: no training needed).
    """
    from ..errors import ConfigError
    from ..plots.plantclef import PlantCLEFClassifier
    from ..plots.tiling import BundleTileClassifier

    model = Path(model)
    if model.is_dir():
        return BundleTileClassifier.load(model, batch_size=batch_size, device=device)
    if not model.is_file():
        raise ConfigError(f"--model {model}: no such bundle folder or checkpoint file.")
    if not class_mapping or not species_table:
        raise ConfigError(f"--model {model} is a checkpoint file: the zero-training PlantCLEF path "
                          "also needs --class-mapping (class_mapping.txt) and --species-table "
                          "(species_id;species;genus;family CSV).")
    return PlantCLEFClassifier.from_files(model, class_mapping, species_table, backbone=backbone,
                                          model_kwargs=model_kwargs, batch_size=batch_size,
                                          device=device)


def plot_report_job(model: str | Path, photos: Sequence[str | Path], out: str | Path, *,
                    class_mapping: str | Path | None = None,
                    species_table: str | Path | None = None,
                    backbone: str = "vit_base_patch14_reg4_dinov2",
                    model_kwargs: dict | None = None, checklist: str | Path | None = None,
                    batch_size: int = 32, progress: Progress | None = None,
                    device: str = "auto", **settings):
    """Rank-aware reports for plot photos (files or folders); see ``reports.plot_report``
    (``settings=``: a plot_settings.json from :func:`calibrate_plots_job`)."""
    from ..plots.calibration import PlotSettings
    from ..plots.report import plot_report

    if settings.get("settings") is not None and not isinstance(settings["settings"], PlotSettings):
        settings["settings"] = PlotSettings.load(settings["settings"])  # before the model loads
    classifier = load_tile_classifier(model, class_mapping=class_mapping,
                                      species_table=species_table, backbone=backbone,
                                      model_kwargs=model_kwargs, batch_size=batch_size,
                                      device=device)
    names = None
    if checklist:
        names = [ln.strip() for ln in Path(checklist).read_text().splitlines() if ln.strip()]
    flagger = getattr(classifier, "flag_unknown", None)
    return plot_report(classifier, collect_images(photos), out, checklist=names,
                       flag_unknown=flagger, progress=progress, **settings)


def read_plot_truth(path: str | Path) -> dict[str, list[str]]:
    """Ground-truth species per plot from a CSV with ``plot_id`` and ``species`` columns
    (one row per species, or several species separated by ``;`` in one cell).
    """
    import pandas as pd

    from ..errors import AnnotationError

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"plot_id", "species"} - set(frame.columns)
    if missing:
        raise AnnotationError(f"{path}: expected columns plot_id and species, missing "
                              f"{sorted(missing)} (found {list(frame.columns)}).")
    truth: dict[str, list[str]] = {}
    for plot_id, cell in zip(frame["plot_id"], frame["species"]):
        truth.setdefault(plot_id, []).extend(s.strip() for s in cell.split(";") if s.strip())
    return truth


def calibrate_plots_job(model: str | Path, photos: Sequence[str | Path], truth: str | Path,
                        out: str | Path, *, grids: Sequence[Any] | None = None,
                        overlap: float = 0.0, class_mapping: str | Path | None = None,
                        species_table: str | Path | None = None,
                        backbone: str = "vit_base_patch14_reg4_dinov2",
                        model_kwargs: dict | None = None, batch_size: int = 32,
                        progress: Progress | None = None, device: str = "auto"):
    """Plot settings from calibration photos with known species lists.

    ``truth``: CSV with ``plot_id`` (photo file stem) and ``species`` (see
    :func:`read_plot_truth`). Writes ``out/plot_settings.json``, ``out/plot_calibration.csv``
    (F1 and thresholds per rule), ``out/failures.csv`` and provenance; returns the
    :class:`~taxoclass.plots.calibration.CalibrationResult`.
    """
    import pandas as pd

    from ..io.files import atomic_write_csv
    from ..plots.calibration import (
        DEFAULT_GRIDS,
        SETTINGS_FILE,
        TABLE_FILE,
        calibrate_plots,
        check_plot_truth,
    )

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"Output folder {str(out)!r} is a file; pass a folder path.")
    paths = collect_images(photos)
    if not Path(truth).is_file():
        raise AnnotationError(f"{truth}: no such truth file. Expected a CSV with columns "
                              "plot_id and species.")
    truth_table = read_plot_truth(truth)
    check_plot_truth(truth_table, paths, truth_file=str(truth))  # before the model loads
    classifier = load_tile_classifier(model, class_mapping=class_mapping,
                                      species_table=species_table, backbone=backbone,
                                      model_kwargs=model_kwargs, batch_size=batch_size,
                                      device=device)
    result = calibrate_plots(classifier, paths, truth_table, grids=grids or DEFAULT_GRIDS,
                             overlap=overlap, flag_unknown=getattr(classifier, "flag_unknown",
                                                                   None),
                             progress=progress, model=model, truth_file=truth)
    out.mkdir(parents=True, exist_ok=True)
    files = {"settings": result.settings.save(out / SETTINGS_FILE),
             "table": atomic_write_csv(out / TABLE_FILE, result.settings.table()),
             "failures": atomic_write_csv(out / "failures.csv",
                                          pd.DataFrame(result.failures,
                                                       columns=["photo", "error"]))}
    files["provenance"] = write_provenance(
        out, backbone=classifier.describe(),
        config={"model": str(model), "truth": str(truth), "photos": [str(p) for p in paths],
                "grids": result.settings.grids, "overlap": result.settings.overlap},
        extra={"outputs": {k: v.name for k, v in files.items()},
               "n_plots": result.settings.provenance["n_calibration_plots"],
               "n_failures": len(result.failures), "rule": result.settings.rule,
               "tiles": result.settings.tiles.to_dict()})
    result.files = files
    return result


def evaluate_plots_job(records: str | Path, truth: str | Path, taxonomy_source: str | Path,
                       *, out: str | Path | None = None) -> dict:
    """Plot metrics (PlantCLEF macro F1 per plot, per species, micro; rank-aware credit)."""
    import pandas as pd

    from ..io.files import atomic_write_csv, atomic_write_json
    from ..plots.evaluation import evaluate_plots
    from ..plots.rules import PlotRecord

    source = Path(taxonomy_source)
    if (source / "taxonomy.json").is_file():
        tax = Taxonomy.load(source / "taxonomy.json")
    else:
        tax = load_taxonomy(source)
    frame = pd.read_csv(records, dtype={"plot_id": str})
    predicted: dict[str, list] = {}
    for row in frame.to_dict("records"):
        node = ()
        if row["taxon_rank"] in tax.ranks:
            hits = tax.find(str(row["taxon"]).removesuffix(" sp."), row["taxon_rank"])
            node = hits[0] if hits else ()
        predicted.setdefault(row["plot_id"], []).append(PlotRecord(
            plot_id=row["plot_id"], taxon_rank=row["taxon_rank"], taxon=row["taxon"],
            score=float(row["score"]), n_tiles=int(row["n_tiles"]), reason=row["reason"],
            node=node))
    result = evaluate_plots(predicted, read_plot_truth(truth), tax)
    per_plot = result.pop("per_plot", None)
    if out:
        atomic_write_json(Path(out) / "plot_metrics.json", result)
        if per_plot is not None:
            atomic_write_csv(Path(out) / "plot_metrics_per_plot.csv", per_plot)
        write_provenance(out, config={"records": str(records), "truth": str(truth),
                                      "taxonomy": str(taxonomy_source)})
    return result


# --------------------------------------------------------------------------- open set
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
    calibrated out of fold, :func:`crossfit_openset`). Test = known test
    images + every held-out image. Returns (and writes into ``out``) unknown-detection
    AUROC / FPR@95%TPR per method, what back-off did with held-out and known images, and
    a risk-coverage table per rank.
    """
    import numpy as np
    import pandas as pd
    import yaml

    from ..bundle import ModelBundle
    from ..errors import ConfigError
    from ..io.files import atomic_write_csv, atomic_write_json
    from ..model.training import stratified_split, train_head
    from ..openset.detectors import DETECTORS, OutlierDetector, confidence_scores
    from ..openset.scorer import (
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
    from ..taxonomy.annotations import load_annotations

    bundle = ModelBundle.load(model)
    cfg_file = Path(model) / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file} not found: the bundle has no training recipe to retrain "
                          "without the held-out species.")
    cfg = yaml.safe_load(cfg_file.read_text())
    root = Path(images_root) if images_root else Path(annotations).parent
    ann = load_annotations(annotations)
    rows = ann.labelled_images(root).reset_index(drop=True)
    ranks = tuple(bundle.taxonomy.ranks)
    try:
        held = choose_holdout(rows, species=holdout_species, holdout_fraction=holdout_fraction,
                              n_species=n_holdout, seed=seed)
    except ValueError as exc:
        raise ConfigError(f"hold-out choice: {exc}") from exc
    ids = [str(i) for i in rows["image_id"]]
    cache = bundle.extra.get("embedding_cache") or str(Path(out or tempfile_dir()) / "embeddings")
    x_all, found, _ = _embeddings_for(ids, rows["path"].tolist(), cache=cache,
                                      backbone_cfg=bundle.backbone, progress=progress)
    rows, x_all = rows[found].reset_index(drop=True), x_all[found]
    is_unk = split_known_unknown(rows, held)
    tax = known_taxonomy(ann.categories, held, ranks)
    kr, xk = rows[~is_unk].reset_index(drop=True), x_all[~is_unk]
    y, nodes = _targets(tax, kr)
    strata = np.array(["/".join(n) for n in nodes])
    is_test = stratified_split(strata, test_fraction, seed)
    tr_idx = np.flatnonzero(~is_test)
    ocfg = dict(cfg.get("openset") or {})
    is_val = np.zeros(len(kr), dtype=bool)
    if openset_calibration(ocfg)[0] == "crossfit":
        # Head on every non-test known image; thresholds on their out-of-fold predictions.
        is_tr = ~is_test
        cf = crossfit_openset(xk[is_tr], {r: a[is_tr] for r, a in y.items()}, tax,
                              truth_names(kr[is_tr], ranks),
                              {**cfg, "model": {**(cfg.get("model") or {}),
                                                "normalize": bundle.normalize},
                               "decode": {**(cfg.get("decode") or {}),
                                          "method": bundle.decode_method}},
                              seed=seed)
        res, calibration = cf.train, cf.info
    else:
        val_fraction = float(cfg.get("data", {}).get("val_fraction", 0.3))
        is_val[tr_idx[stratified_split(strata[tr_idx], val_fraction, seed + 1)]] = True
        is_tr = ~is_test & ~is_val
        res = train_head(xk[is_tr], {r: a[is_tr] for r, a in y.items()}, xk[is_val],
                         {r: a[is_val] for r, a in y.items()}, tax, model=cfg.get("model"),
                         loss=cfg.get("loss"), train=cfg.get("train"),
                         normalize_inputs=bundle.normalize)
        calibration = {"calibration": "holdout", "n_calibration_rows": int(is_val.sum())}
    sub = ModelBundle(head=res.head, taxonomy=tax, backbone=bundle.backbone,
                      normalize=bundle.normalize, decode_method=bundle.decode_method)
    if calibration["calibration"] == "crossfit":
        sub.scorer = cf.scorer
    else:
        sub.scorer = fit_openset_scorer(sub, xk[is_tr], y["genus"][is_tr], xk[is_val],
                                        kr[is_val].reset_index(drop=True), ocfg,
                                        species_train=y[ranks[-1]][is_tr])

    x_test = np.concatenate([xk[is_test], x_all[is_unk]])
    test_rows = pd.concat([kr[is_test], rows[is_unk]]).reset_index(drop=True)
    y_unk = np.r_[np.zeros(int(is_test.sum()), bool), np.ones(int(is_unk.sum()), bool)]
    logits = sub.logits(x_test)
    frame, decoded = sub.predict_with_backoff(x_test)
    truth = truth_names(test_rows, ranks)
    correct = correct_by_rank(path_names(decoded.path, tax), truth, ranks)

    # Every score for "is this image of an unknown species?", higher = more likely unknown.
    scores: dict[str, np.ndarray] = {}
    conf = confidence_scores(decoded.probs, {r: v.numpy() for r, v in logits.items()})
    for name, s in conf[ranks[-1]].items():
        scores[f"{name} ({ranks[-1]})"] = -s
    x_tr_in, x_test_in = sub.scorer_input(xk[is_tr]), sub.scorer_input(x_test)
    for method in DETECTORS:
        for scope in ("global", "group"):
            det = OutlierDetector(method, scope=scope).fit(x_tr_in, y["genus"][is_tr])
            scores[f"pyod {method} ({scope})"] = det.decision_function(
                x_test_in, decoded.path["genus"])
    evidence, _ = sub.scorer.evidence(x_test_in, decoded)
    scores[f"combined evidence ({ocfg.get('combiner', 'rank_mean')}, "
           f"{ocfg.get('detector', 'knn')} {ocfg.get('scope', 'group')})"] = -evidence[ranks[-1]]
    detection = detection_table(y_unk, scores).sort_values("auroc", ascending=False)
    summary = outcome_summary(frame, truth, y_unk, ranks)
    rc = risk_coverage({r: evidence[r][~y_unk] for r in ranks},
                       {r: correct[r][~y_unk] for r in ranks})
    result = {
        "held_out_species": held, "seed": seed,
        "n_train": int(is_tr.sum()), "n_val": int(is_val.sum()),
        "openset_calibration": calibration,
        "n_test_known": int(is_test.sum()), "n_test_held_out": int(is_unk.sum()),
        "known_test_accuracy": {r: float(correct[r][~y_unk].mean()) for r in ranks},
        "held_out_right_genus_on_path": float(correct["genus"][y_unk].mean())
        if "genus" in correct and y_unk.any() else None,
        "thresholds": sub.scorer.thresholds.to_dict(),
        "outcomes": summary,
        "detection": detection.to_dict("records"),
        "risk_coverage": rc.to_dict("records"),
    }
    if out:
        out = Path(out)
        atomic_write_json(out / "openset_metrics.json", result)
        atomic_write_csv(out / "openset_detection.csv", detection)
        atomic_write_csv(out / "openset_risk_coverage.csv", rc)
        frame.insert(0, "image_id", test_rows["image_id"].astype(str).to_numpy())
        frame.insert(1, "held_out", y_unk)
        atomic_write_csv(out / "openset_predictions.csv", frame)
        write_provenance(out, backbone=bundle.backbone, config={
            "model": str(Path(model).resolve()), "annotations": str(Path(annotations).resolve()),
            "holdout_species": held, "seed": seed, "test_fraction": test_fraction,
            "retrain": {k: cfg.get(k) for k in ("model", "loss", "train", "openset")}})
    return result
