"""Spark engine, plot photos: executors tile and classify them with the plots layer's one
tile loop (:func:`~taxoclass.plots.tiling.classify_photo`); the driver replays their tile
predictions to :func:`~taxoclass.plots.report.plot_report`.

Tiles go to ``out/plot_tiles.parquet`` (resumable); see :mod:`taxoclass.engines.spark`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..io.files import atomic_write_json
from .spark import (
    MANIFEST,
    SPARK_FORMAT_VERSION,
    TILES_PARQUET,
    _cached,
    _check_manifest,
    _clear,
    _done_keys,
    _file_stamp,
    _read_parquet,
    _rows_frame,
    _session,
    _set_threads,
    _task_threads,
    executor_path,
)

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

__all__ = ["spark_classify_plots"]


TILES_SCHEMA = ("order long, photo string, width long, height long, n_tiles long, "
                "decoded binary, flags binary, classifier string, error string")
_DECODED_FIELDS = ("probs", "path", "path_prob", "topk_index", "topk_prob")


def _pack_decoded(decoded) -> bytes:
    arrays = {f"{f}/{r}": np.asarray(getattr(decoded, f)[r]) for f in _DECODED_FIELDS
              for r in decoded.ranks}
    arrays["meta"] = np.array(json.dumps({"ranks": list(decoded.ranks),
                                          "method": decoded.method, "top_k": decoded.top_k}))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _unpack_decoded(blob: bytes):
    from ..model.decoding import Decoded

    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        ranks = tuple(meta["ranks"])
        fields = {f: {r: z[f"{f}/{r}"] for r in ranks} for f in _DECODED_FIELDS}
    return Decoded(ranks=ranks, method=meta["method"], top_k=int(meta["top_k"]), **fields)


def _pack_flags(ranks: np.ndarray) -> bytes:
    """Per tile, the rank of its back-off answer (fixed-width text, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(ranks, dtype=str), allow_pickle=False)
    return buf.getvalue()


def _plots_partition(classifier_args: dict, grids: list, overlap: float, threads: int
                     ) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from ..errors import ImageError
        from ..plots.loading import load_tile_classifier
        from ..plots.tiling import classify_photo

        _set_threads(threads)
        key = {"plots": classifier_args, "stamp": _file_stamp(classifier_args["model"])}
        clf = _cached(key, lambda: load_tile_classifier(**classifier_args))
        flagger = getattr(clf, "back_off_tiles", None) or getattr(clf, "flag_unknown", None)
        described = False
        for frame in frames:
            rows = []
            for order, photo, path in zip(frame["order"].tolist(), frame["photo"].tolist(),
                                          frame["path"].tolist()):
                row: dict[str, Any] = {"order": order, "photo": photo, "width": None,
                                       "height": None, "n_tiles": None, "decoded": None,
                                       "flags": None, "classifier": None, "error": None}
                try:  # the plots layer's one tile loop
                    tiles = classify_photo(clf, path, grids=grids, overlap=overlap,
                                           flag_unknown=flagger)
                except ImageError as exc:
                    row["error"] = str(exc)
                    rows.append(row)
                    continue
                row.update(width=tiles.size[0], height=tiles.size[1], n_tiles=len(tiles.tiles),
                           decoded=_pack_decoded(tiles.decoded))
                if flagger is not None:  # each tile's back-off rank ("unknown": none passes)
                    row["flags"] = _pack_flags(tiles.ranks)
                if not described:
                    row["classifier"] = json.dumps(clf.describe(), default=str)
                    described = True
                rows.append(row)
            yield pd.DataFrame(rows, columns=[c.split()[0] for c in TILES_SCHEMA.split(", ")])

    return run


class _ReplayClassifier:
    """Hands :func:`~taxoclass.plots.report.plot_report` the executors' tile predictions.

    ``plot_report`` asks for the tiles of each readable photo in order; this returns the
    :class:`~taxoclass.model.decoding.Decoded` an executor computed for that photo, after
    checking that the driver cut the same number and sizes of tiles.
    """

    def __init__(self, taxonomy, plots: list[dict], describe: dict, taxon_ids: dict,
                 backbone_name: str, bundle: Any = None) -> None:
        self.taxonomy = taxonomy
        # the driver's copy of the bundle (heads only): the report reads its confidence
        # calibration, as it does from a local BundleTileClassifier
        self.bundle = bundle
        self._plots = plots
        self._next = 0
        self._last_flags: np.ndarray | None = None
        self._describe = describe
        self._taxon_ids = taxon_ids
        self.backbone_name = backbone_name

    def predict_tiles(self, images):
        if self._next >= len(self._plots):
            raise ConfigError("spark_plot_report: the driver read more photos than the "
                              "executors did (a photo became readable in between?). Rerun.")
        plot = self._plots[self._next]
        self._next += 1
        if len(images) != plot["n_tiles"]:
            raise ConfigError(f"spark_plot_report: {plot['photo']}: the driver cut "
                              f"{len(images)} tiles but the executor {plot['n_tiles']} (the "
                              "photo changed during the run?). Rerun with overwrite=True.")
        decoded = _unpack_decoded(plot["decoded"])
        self._last_flags = (None if plot["flags"] is None else
                            np.load(io.BytesIO(plot["flags"]), allow_pickle=False))
        return decoded

    def flag_unknown(self, decoded) -> np.ndarray:
        """The executor's back-off for this photo's tiles: each tile's answer rank
        (``"unknown"`` where no rank passes; bool unknown flags from an older run)."""
        flags = self._last_flags
        return np.zeros(len(decoded), dtype=bool) if flags is None else flags

    def taxon_ids(self) -> dict:
        return dict(self._taxon_ids)

    def describe(self) -> dict:
        return dict(self._describe)


def _driver_taxonomy(model: Path, class_mapping, species_table) -> tuple[Any, dict, Any]:
    """The classifier's taxonomy, taxon ids and bundle (None for a checkpoint) without
    loading a backbone on the driver."""
    if model.is_dir():
        from ..bundle import ModelBundle

        bundle = ModelBundle.load(model)
        return bundle.taxonomy, {}, bundle
    if not model.is_file():
        raise ConfigError(f"--model {model}: no such bundle folder or checkpoint file.")
    if not class_mapping or not species_table:
        raise ConfigError(f"--model {model} is a checkpoint file: the zero-training PlantCLEF "
                          "path also needs --class-mapping and --species-table.")
    from ..features.backbones import load_class_mapping
    from ..plots.plantclef import plantclef_taxonomy

    mapping = plantclef_taxonomy(load_class_mapping(class_mapping), species_table)
    return mapping.taxonomy, dict(mapping.species_ids), None


def spark_classify_plots(classifier: Mapping[str, Any], photos: Sequence[str | Path],
                         out: str | Path, *, grids: Sequence[Any], overlap: float,
                         master: str = "local[2]", partitions: int | None = None,
                         overwrite: bool = False, spark: SparkSession | None = None
                         ) -> _ReplayClassifier:
    """The Spark engine's :meth:`~taxoclass.engines.Engine.classify_plots`: one plot per
    task by default.

    Executors tile, embed and decode their plots (``out/plot_tiles.parquet/``; plots
    already there are skipped on a rerun); the returned classifier hands their tile
    predictions to :func:`taxoclass.plots.report.plot_report` on the driver.
    ``classifier``: :func:`~taxoclass.plots.loading.load_tile_classifier` arguments
    (``model``, ``class_mapping``, ``species_table``, ``backbone``, ``model_kwargs``,
    ``batch_size``); ``grids``/``overlap``: the resolved tile settings.
    """
    model = Path(classifier["model"])
    class_mapping, species_table = classifier.get("class_mapping"), classifier.get("species_table")
    backbone = classifier.get("backbone") or "vit_base_patch14_reg4_dinov2"
    taxonomy, taxon_ids, bundle = _driver_taxonomy(model, class_mapping, species_table)
    grid_list, tile_overlap = list(grids), float(overlap)
    paths = [str(p) for p in photos]
    root = Path(out)
    parquet = root / TILES_PARQUET
    args = {"model": str(model.resolve()),
            "class_mapping": executor_path(class_mapping) if class_mapping else None,
            "species_table": executor_path(species_table) if species_table else None,
            "backbone": backbone, "model_kwargs": classifier.get("model_kwargs"),
            "batch_size": int(classifier.get("batch_size") or 32)}
    manifest = {"format": "taxoclass-spark-plot-tiles", "format_version": SPARK_FORMAT_VERSION,
                "engine": "spark", "classifier": args, "model": _file_stamp(model),
                "grids": grid_list, "overlap": tile_overlap}
    if overwrite:
        _clear(root, [TILES_PARQUET, MANIFEST])
    _check_manifest(root, manifest, ["format_version", "classifier", "model", "grids",
                                     "overlap"], "plot")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / MANIFEST, manifest)

    session = _session(spark, master)
    unique = list(dict.fromkeys(paths))
    done = _done_keys(parquet, "photo")
    # ``photo`` as the user gave it (the rows' key), ``path`` absolute for the executors
    todo = [(k, p, executor_path(p)) for k, p in enumerate(unique) if p not in done]
    if todo:
        run = _plots_partition(args, grid_list, tile_overlap, _task_threads(session))
        frame = _rows_frame(session, todo, "order long, photo string, path string",
                            partitions or len(todo))
        frame.mapInPandas(run, TILES_SCHEMA).write.mode("append").parquet(executor_path(parquet))

    table = _read_parquet(parquet).drop_duplicates("photo").set_index("photo")
    ok_plots = [table.loc[p].to_dict() | {"photo": p} for p in paths
                if p in table.index and pd.isna(table.loc[p, "error"])]
    described = table["classifier"].dropna()
    describe = json.loads(described.iloc[0]) if len(described) else {"kind": "unknown"}
    bb = describe.get("backbone", {})
    replay = _ReplayClassifier(taxonomy, ok_plots, describe, taxon_ids,
                               str(bb.get("name", backbone)) if isinstance(bb, dict)
                               else str(bb), bundle=bundle)
    if not any(p["flags"] is not None for p in ok_plots):
        replay.flag_unknown = None  # the model has no outlier detector: flag nothing
    return replay
