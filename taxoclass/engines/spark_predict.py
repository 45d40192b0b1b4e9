"""Spark engine, prediction: executors embed their images and run the bundle's back-off.

Rows go to ``out/predictions.parquet`` in rounds (resumable); see :mod:`taxoclass.engines.spark`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..io.files import atomic_write_json
from ..vocab import Reason
from .base import Predictions, prediction_frame
from .spark import (
    MANIFEST,
    PREDICTIONS_PARQUET,
    SPARK_FORMAT_VERSION,
    Progress,
    _append_rounds,
    _cached,
    _check_manifest,
    _clear,
    _done_keys,
    _file_stamp,
    _read_parquet,
    _rebatch,
    _session,
    _set_threads,
    _task_threads,
    executor_path,
)

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

__all__ = ["spark_predict"]


def _spark_type(dtype: Any) -> str:
    if pd.api.types.is_bool_dtype(dtype):
        return "boolean"
    if pd.api.types.is_integer_dtype(dtype):
        return "long"
    if pd.api.types.is_float_dtype(dtype):
        return "double"
    return "string"


def _conform(frame: pd.DataFrame, types: Mapping[str, str]) -> pd.DataFrame:
    """Columns and dtypes exactly as the declared Spark schema (nulls allowed)."""
    out = {}
    for col, kind in types.items():
        values = frame[col] if col in frame else pd.Series([None] * len(frame))
        if kind == "boolean":
            out[col] = pd.array([None if pd.isna(v) else bool(v) for v in values],
                                dtype="boolean")
        elif kind == "long":
            out[col] = pd.array([None if pd.isna(v) else int(v) for v in values],
                                dtype="Int64")
        elif kind == "double":
            out[col] = pd.to_numeric(values, errors="coerce").astype("float64").to_numpy()
        else:
            out[col] = [None if pd.isna(v) else str(v) for v in values]
    return pd.DataFrame(out)


def _bundle_key(model_dir: str) -> dict:
    return {"bundle": _file_stamp(model_dir)}


def _predict_partition(model_dir: str, types: dict[str, str], batch_size: int, top_k: int,
                       threads: int) -> Callable[[Iterator[pd.DataFrame]],
                                                 Iterator[pd.DataFrame]]:
    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from ..bundle import ModelBundle
        from ..features.batching import embed_batches

        _set_threads(threads)

        def build():
            bundle = ModelBundle.load(model_dir)
            return bundle, bundle.create_backbone()

        bundle, backbone = _cached(_bundle_key(model_dir), build)
        for batch in _rebatch(frames, batch_size):
            images, paths = batch["image"].tolist(), batch["path"].tolist()
            parts = []
            for ok, feats, bad in embed_batches(paths, backbone, [list(range(len(paths)))]):
                if feats is not None:
                    part = prediction_frame(bundle, feats, [images[i] for i in ok], top_k)
                    part["order"] = batch["order"].to_numpy()[ok]
                    parts.append(part)
                if bad:
                    parts.append(pd.DataFrame({
                        "image": [images[i] for i, _ in bad], "error": [e for _, e in bad],
                        "order": batch["order"].to_numpy()[[i for i, _ in bad]]}))
            yield _conform(pd.concat(parts, ignore_index=True), types)

    return run


def spark_predict(model_dir: str | Path, paths: Sequence[str | Path], out: str | Path, *,
                  master: str = "local[2]", partitions: int | None = None,
                  batch_size: int = 64, top_k: int = 5, chunk_size: int = 20_000,
                  overwrite: bool = False, spark: SparkSession | None = None,
                  progress: Progress | None = None) -> Predictions:
    """The Spark engine's :meth:`~taxoclass.engines.Engine.predict`: the local engine's rows
    and columns for image ``paths``.

    Executors embed their images and run the bundle's back-off; rows are appended to
    ``out/predictions.parquet/`` (images already there are skipped). Returns the rows
    (successes in input order, then failures with their ``error``); the predict job
    writes ``predictions.csv``/``.json`` and provenance. Reasons and ``outlier`` are the
    bundle's back-off decision (:mod:`taxoclass.vocab`); a failed image's reason is
    ``failed``.
    """
    from ..bundle import ModelBundle

    started = time.perf_counter()
    bundle = ModelBundle.load(model_dir)  # heads only: cheap, and checks the bundle first
    model_dir = str(Path(model_dir).resolve())
    image_list = [str(p) for p in paths]
    root = Path(out)
    parquet = root / PREDICTIONS_PARQUET
    dim = int(bundle.head.config()["in_features"])
    sample = prediction_frame(bundle, np.ones((1, dim), np.float32), ["x"], top_k)
    types = {"order": "long", **{c: _spark_type(t) for c, t in sample.dtypes.items()},
             "error": "string"}
    manifest = {"format": "taxoclass-spark-predictions", "format_version": SPARK_FORMAT_VERSION,
                "engine": "spark", "model": _file_stamp(model_dir), "top_k": top_k,
                "columns": types}
    if overwrite:
        _clear(root, [PREDICTIONS_PARQUET, MANIFEST])
    _check_manifest(root, manifest, ["format_version", "model", "top_k", "columns"],
                    "prediction")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / MANIFEST, manifest)

    session = _session(spark, master)
    done = _done_keys(parquet, "image")
    unique = list(dict.fromkeys(image_list))
    # ``image`` as the user gave it (the rows' key), ``path`` absolute for the executors
    todo = [(k, p, executor_path(p)) for k, p in enumerate(unique) if p not in done]
    if progress is not None:
        progress(len(unique) - len(todo), len(unique))
    schema = ", ".join(f"`{c}` {t}" for c, t in types.items())
    run = _predict_partition(model_dir, types, batch_size, top_k, _task_threads(session))
    _append_rounds(session, todo, "order long, image string, path string", run, schema, parquet,
                   chunk_size=chunk_size, partitions=partitions,
                   done=len(unique) - len(todo), total=len(unique), progress=progress)

    table = _read_parquet(parquet).drop_duplicates("image")
    position = {p: k for k, p in enumerate(unique)}
    table = table[table["image"].isin(position)].copy()
    table["_k"] = table["image"].map(position)
    failed = table["error"].notna()
    ok = table[~failed].sort_values("_k")
    bad = table[failed].sort_values("_k")
    cols = [c for c in types if c not in ("order", "error")]
    frame = ok[cols].reset_index(drop=True)
    if len(bad):
        frame = pd.concat([frame, pd.DataFrame({"image": bad["image"].to_numpy(),
                                                "reason": Reason.FAILED.value,
                                                "outlier": False,
                                                "error": bad["error"].to_numpy()})],
                          ignore_index=True)
    return Predictions(frame=frame, backbone=bundle.backbone, record={
        "engine": "spark", "master": session.sparkContext.master, "model": model_dir,
        "top_k": top_k, "batch_size": batch_size, "partitions": partitions,
        "n_computed": len(todo), "seconds": round(time.perf_counter() - started, 3)})
