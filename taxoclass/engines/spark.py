"""Apache Spark engine: the local engine's embedding and tile code, run by Spark executors.

Each job ships ``(image_id, path)`` rows to the executors and runs
``DataFrame.mapInPandas`` over them. An executor's Python worker loads the model once
(cached for the life of the worker, which Spark reuses across tasks), cuts its
partition into batches and calls the same library functions as the local engine
(:func:`taxoclass.features.embeddings.embed_batches`, :meth:`ModelBundle.predict_with_backoff`,
``TileClassifier.predict_tiles``), so both engines compute the same numbers.

Outputs are Parquet folders written by Spark in append mode, one Spark job per round of
``chunk_size`` items: an interrupted run keeps every finished round, and a rerun skips
the items already in the output (failures included, as the local cache does).

Needs ``pip install 'taxoclass[spark]'`` (PySpark >= 3.5) and Java 17 or 21 on the driver
and executors. On a cluster, taxoclass and its dependencies must be installed on every
executor, and image paths must be readable there (a shared file system).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import CacheError, ConfigError
from ..features.embeddings import IDENTITY_KEYS, EmbeddingCache, EmbedResult, normalise_items
from ..io.files import atomic_write_csv, atomic_write_json
from ..io.provenance import write_provenance
from .base import Predictions, backbone_from_spec, prediction_frame

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "SparkEmbedResult",
    "backbone_from_spec",
    "get_spark",
    "spark_available",
    "spark_embed",
    "spark_classify_plots",
    "spark_predict",
]

Progress = Callable[[int, int], None]
SPARK_FORMAT_VERSION = 1
EMBEDDINGS_PARQUET = "embeddings.parquet"
PREDICTIONS_PARQUET = "predictions.parquet"
TILES_PARQUET = "plot_tiles.parquet"
MANIFEST = "manifest.json"

# Models loaded by this Python process (an executor's worker), keyed by their recipe.
_MODELS: dict[str, Any] = {}


# ---------------------------------------------------------------------------- session
def spark_available() -> str | None:
    """``None`` when PySpark and Java can be used, else the reason they cannot."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "PySpark is not installed. Fix: pip install 'taxoclass[spark]' (pyspark>=3.5)."
    java_home = os.environ.get("JAVA_HOME")
    java = Path(java_home) / "bin" / "java" if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        return ("Java is not found (no JAVA_HOME, no java on PATH). Fix: install a JDK 17 or "
                "21 and set JAVA_HOME.")
    return None


def get_spark(master: str = "local[2]", *, app_name: str = "taxoclass",
              conf: Mapping[str, str] | None = None,
              python: str | None = None) -> SparkSession:
    """The active SparkSession, or a new one for ``master`` (``local[N]``, ``spark://…``).

    ``python``: the Python executors run for a new session (e.g. ``sys.executable``);
    ``PYSPARK_PYTHON`` is set to it only while the session starts, then restored.
    ``None``: whatever ``PYSPARK_PYTHON`` says (Spark's default ``python3`` if unset).
    An existing session is reused as is (its master wins; stop it first to change
    masters). Nothing process-wide is changed: PySpark 4 warns about pandas 3 on
    every conversion (``FutureWarning``, harmless for ``mapInPandas``); the CLI silences
    it, library callers may filter it themselves.
    """
    reason = spark_available()
    if reason:
        raise ConfigError(f"--engine spark: {reason}")
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(master).appName(app_name)
    defaults = {"spark.sql.execution.arrow.pyspark.enabled": "true",
                "spark.python.worker.reuse": "true"}
    if master.startswith("local"):
        defaults["spark.ui.enabled"] = "false"
        defaults["spark.ui.showConsoleProgress"] = "false"
    for key, value in {**defaults, **dict(conf or {})}.items():
        builder = builder.config(key, value)
    with _python_for_workers(python):
        return builder.getOrCreate()


@contextlib.contextmanager
def _python_for_workers(python: str | None) -> Iterator[None]:
    """``PYSPARK_PYTHON=python`` while a SparkContext starts (it reads it once), then the
    environment as it was."""
    if python is None:
        yield
        return
    before = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = python
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYSPARK_PYTHON", None)
        else:
            os.environ["PYSPARK_PYTHON"] = before


def _session(spark: SparkSession | None, master: str) -> SparkSession:
    return spark if spark is not None else get_spark(master, python=sys.executable)


def _task_threads(spark: SparkSession) -> int:
    """Torch threads per task: ``spark.task.cpus`` (1 unless configured)."""
    try:
        return max(1, int(spark.conf.get("spark.task.cpus", "1")))
    except (ValueError, TypeError):
        return 1


def _rows_frame(spark: SparkSession, rows: list[tuple], schema: str,
                partitions: int) -> DataFrame:
    """A DataFrame whose partitions are contiguous, equal slices of ``rows``."""
    rdd = spark.sparkContext.parallelize(rows, numSlices=max(1, min(partitions, len(rows))))
    return spark.createDataFrame(rdd, schema)


def _default_partitions(spark: SparkSession, n: int) -> int:
    return max(1, min(n, 2 * int(spark.sparkContext.defaultParallelism)))


# ---------------------------------------------------------------------------- models
def _cached(key: Mapping[str, Any], build: Callable[[], Any]) -> Any:
    """One model per recipe per Python worker (Spark reuses workers across tasks)."""
    text = json.dumps(key, sort_keys=True, default=str)
    if text not in _MODELS:
        if len(_MODELS) >= 2:  # a worker serves one job at a time; keep memory bounded
            _MODELS.clear()
        _MODELS[text] = build()
    return _MODELS[text]


def _file_stamp(path: str | os.PathLike | None) -> list:
    if not path:
        return []
    p = Path(path)
    target = p / "bundle.json" if p.is_dir() else p
    return [str(p.resolve()), target.stat().st_mtime_ns if target.exists() else None]


def _rebatch(frames: Iterator[pd.DataFrame], size: int) -> Iterator[pd.DataFrame]:
    """Arrow record batches → frames of exactly ``size`` rows (the last may be shorter)."""
    pending: list[pd.DataFrame] = []
    count = 0
    for frame in frames:
        pending.append(frame)
        count += len(frame)
        while count >= size:
            joined = pd.concat(pending, ignore_index=True)
            yield joined.iloc[:size].reset_index(drop=True)
            rest = joined.iloc[size:]
            pending, count = ([rest] if len(rest) else []), len(rest)
    if count:
        yield pd.concat(pending, ignore_index=True)


def _set_threads(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- parquet
def _read_parquet(path: Path, columns: Sequence[str] | None = None) -> pd.DataFrame | None:
    """A Spark-written Parquet folder as pandas (``None`` if nothing was committed yet)."""
    import pyarrow.parquet as pq

    if not path.is_dir() or not any(path.glob("*.parquet")):
        return None
    return pq.read_table(path, columns=list(columns) if columns else None).to_pandas()


def _done_keys(path: Path, column: str) -> set[str]:
    frame = _read_parquet(path, [column])
    return set() if frame is None else set(frame[column].astype(str))


def _rounds(rows: list[tuple], chunk_size: int) -> Iterator[list[tuple]]:
    for start in range(0, len(rows), max(1, chunk_size)):
        yield rows[start:start + chunk_size]


def _append_rounds(session: SparkSession, todo: list[tuple], columns: str, run: Callable,
                   schema: str, parquet: Path, *, chunk_size: int, partitions: int | None,
                   done: int, total: int, progress: Progress | None) -> None:
    """Run ``run`` over ``todo`` in rounds of ``chunk_size`` rows, appending each round to
    ``parquet`` (a finished round survives an interruption: that is what resumes).
    """
    for rows in _rounds(todo, chunk_size):
        n_parts = partitions or _default_partitions(session, len(rows))
        frame = _rows_frame(session, rows, columns, n_parts)
        frame.mapInPandas(run, schema).write.mode("append").parquet(str(parquet))
        done += len(rows)
        if progress is not None:
            progress(done, total)


def _check_manifest(root: Path, expected: Mapping[str, Any], keys: Sequence[str],
                    what: str) -> dict | None:
    """The existing manifest, after checking that ``keys`` match; CacheError otherwise."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path} is unreadable ({exc}). Fix: overwrite=True or a new --out "
                         "folder.") from exc
    diffs = [f"{k}: expected {json.dumps(expected.get(k), default=str)[:160]}, found "
             f"{json.dumps(found.get(k), default=str)[:160]}"
             for k in keys if found.get(k) != expected.get(k)]
    if diffs:
        raise CacheError(f"Spark {what} output {str(root)!r} was made with other settings: "
                         f"{'; '.join(diffs)}. Fix: --out NEW_DIR, or overwrite=True to "
                         "replace it.")
    return found


def _clear(root: Path, names: Sequence[str]) -> None:
    for name in names:
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- embed
@dataclass
class SparkEmbedResult(EmbedResult):
    """:class:`~taxoclass.features.embeddings.EmbedResult` plus the Parquet folder Spark wrote."""

    parquet: Path | None = None


EMBED_SCHEMA = "order long, image_id string, path string, embedding array<float>, error string"


def _embed_partition(spec: dict, batch_size: int, threads: int
                     ) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from ..features.batching import embed_batches

        _set_threads(threads)
        backbone = _cached({"backbone": spec, "stamp": _file_stamp(spec.get("checkpoint"))},
                           lambda: backbone_from_spec(spec))
        for batch in _rebatch(frames, batch_size):
            paths = batch["path"].tolist()
            embedding: list[np.ndarray | None] = [None] * len(batch)
            error: list[str | None] = [None] * len(batch)
            for ok, feats, bad in embed_batches(paths, backbone, [list(range(len(paths)))]):
                for row, i in enumerate(ok):
                    embedding[i] = feats[row]
                for i, err in bad:
                    error[i] = err
            yield pd.DataFrame({"order": batch["order"].to_numpy(), "image_id": batch["image_id"],
                                "path": batch["path"], "embedding": embedding, "error": error})

    return run


def spark_embed(items: Sequence[tuple[object, str | Path]], backbone_spec: Mapping[str, Any],
                out: str | Path, *, master: str = "local[2]", partitions: int | None = None,
                batch_size: int = 64, chunk_size: int = 20_000, overwrite: bool = False,
                collect: bool = True, spark: SparkSession | None = None,
                progress: Progress | None = None) -> SparkEmbedResult:
    """Embed ``(image_id, path)`` items on Spark into ``out/embeddings.parquet/``.

    Columns: ``image_id``, ``path``, ``embedding`` (list<float32>; null on failure),
    ``error`` (null on success), ``order`` (position in ``items`` when first run).
    ``backbone_spec``: ``name``, ``checkpoint``, ``model_kwargs``, ``pretrained`` (and
    optionally ``class_mapping``, ``data_overrides``), as for
    :func:`~taxoclass.features.backbones.create_backbone`. Items already in the output are
    skipped; failures are recorded once, as by the local engine, and listed in
    ``out/failures.csv``. ``collect`` loads the embeddings of ``items`` (in item order,
    failures left out) into ``result.cache``; pass ``False`` for data larger than the
    driver's memory and read the Parquet folder instead.
    """
    started = time.perf_counter()
    if batch_size < 1 or chunk_size < 1:
        raise CacheError(f"batch_size and chunk_size must be >= 1 (found {batch_size}, "
                         f"{chunk_size}).")
    spec = {k: (str(v) if k in ("checkpoint", "class_mapping") and v else v)
            for k, v in dict(backbone_spec).items()}
    ids, paths = normalise_items(items)
    root = Path(out)
    parquet = root / EMBEDDINGS_PARQUET
    backbone = backbone_from_spec(spec)  # the driver's copy: provenance, dim, spec errors
    describe = backbone.describe()
    manifest: dict[str, Any] = {
        "format": "taxoclass-spark-embeddings", "format_version": SPARK_FORMAT_VERSION,
        "engine": "spark", "identity": {k: describe.get(k) for k in IDENTITY_KEYS},
        "dim": int(backbone.num_features), "batch_size": batch_size, "backbone": describe,
    }
    del backbone
    if overwrite:
        _clear(root, [EMBEDDINGS_PARQUET, MANIFEST, "failures.csv"])
    _check_manifest(root, manifest, ["format_version", "identity", "dim"], "embedding")
    root.mkdir(parents=True, exist_ok=True)

    session = _session(spark, master)
    done = _done_keys(parquet, "image_id")
    todo = [(k, i, p) for k, (i, p) in enumerate(zip(ids, paths)) if i not in done]
    n_reused = len(ids) - len(todo)
    manifest.update(master=session.sparkContext.master, complete=not todo,
                    counts={"n_images": len(ids), "n_done_before": n_reused})
    atomic_write_json(root / MANIFEST, manifest)
    if progress is not None:
        progress(n_reused, len(ids))
    run = _embed_partition(spec, batch_size, _task_threads(session))
    _append_rounds(session, todo, "order long, image_id string, path string", run,
                   EMBED_SCHEMA, parquet, chunk_size=chunk_size, partitions=partitions,
                   done=n_reused, total=len(ids), progress=progress)

    table = _read_parquet(parquet, ["image_id", "path", "error"] + (["embedding"] if collect
                                                                      else []))
    table = table.drop_duplicates("image_id") if table is not None else pd.DataFrame(
        columns=["image_id", "path", "error", "embedding"])
    wanted = pd.DataFrame({"image_id": ids, "_k": np.arange(len(ids))})
    mine = wanted.merge(table, on="image_id", how="inner").sort_values("_k")
    bad = mine["error"].notna()
    failures = mine.loc[bad, ["image_id", "path", "error"]].reset_index(drop=True)
    atomic_write_csv(root / "failures.csv", failures)
    ok = mine.loc[~bad]
    dim = manifest["dim"]
    if collect and len(ok):
        emb = np.stack(ok["embedding"].to_numpy()).astype(np.float32, copy=False)
    else:
        emb = np.zeros((0, dim), dtype=np.float32)
    manifest.update(complete=True, counts={"n_images": len(ids), "n_embedded": int(len(ok)),
                                           "n_failed": int(bad.sum()),
                                           "n_done_before": n_reused})
    atomic_write_json(root / MANIFEST, manifest)
    write_provenance(root, backbone=describe, config={
        "engine": "spark", "master": session.sparkContext.master, "batch_size": batch_size,
        "partitions": partitions, "chunk_size": chunk_size, "backbone_spec": spec,
        "n_images": len(ids)})
    cache = EmbeddingCache(root=root, image_ids=np.array(ok["image_id"].tolist() if collect
                                                         else [], dtype=str),
                           embeddings=emb, manifest=manifest)
    return SparkEmbedResult(cache=cache, failures=failures, n_computed=len(todo),
                            n_reused=n_reused, seconds=time.perf_counter() - started,
                            parquet=parquet)


# ---------------------------------------------------------------------------- predict
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
            paths = batch["image"].tolist()
            parts = []
            for ok, feats, bad in embed_batches(paths, backbone, [list(range(len(paths)))]):
                if feats is not None:
                    part = prediction_frame(bundle, feats, [paths[i] for i in ok], top_k)
                    part["order"] = batch["order"].to_numpy()[ok]
                    parts.append(part)
                if bad:
                    parts.append(pd.DataFrame({
                        "image": [paths[i] for i, _ in bad], "error": [e for _, e in bad],
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
    writes ``predictions.csv``/``.json`` and provenance.
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
    todo = [(k, p) for k, p in enumerate(unique) if p not in done]
    if progress is not None:
        progress(len(unique) - len(todo), len(unique))
    schema = ", ".join(f"`{c}` {t}" for c, t in types.items())
    run = _predict_partition(model_dir, types, batch_size, top_k, _task_threads(session))
    _append_rounds(session, todo, "order long, image string", run, schema, parquet,
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
                                                "error": bad["error"].to_numpy()})],
                          ignore_index=True)
    return Predictions(frame=frame, backbone=bundle.backbone, record={
        "engine": "spark", "master": session.sparkContext.master, "model": model_dir,
        "top_k": top_k, "batch_size": batch_size, "partitions": partitions,
        "n_computed": len(todo), "seconds": round(time.perf_counter() - started, 3)})


# ---------------------------------------------------------------------------- plots
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


def _pack_flags(flags: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(flags, dtype=bool), allow_pickle=False)
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
        flagger = getattr(clf, "flag_unknown", None)
        described = False
        for frame in frames:
            rows = []
            for order, photo in zip(frame["order"].tolist(), frame["photo"].tolist()):
                row: dict[str, Any] = {"order": order, "photo": photo, "width": None,
                                       "height": None, "n_tiles": None, "decoded": None,
                                       "flags": None, "classifier": None, "error": None}
                try:  # the plots layer's one tile loop
                    tiles = classify_photo(clf, photo, grids=grids, overlap=overlap,
                                           flag_unknown=flagger)
                except ImageError as exc:
                    row["error"] = str(exc)
                    rows.append(row)
                    continue
                row.update(width=tiles.size[0], height=tiles.size[1], n_tiles=len(tiles.tiles),
                           decoded=_pack_decoded(tiles.decoded))
                if flagger is not None:
                    row["flags"] = _pack_flags(tiles.unknown)
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
                 backbone_name: str) -> None:
        self.taxonomy = taxonomy
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
        flags = self._last_flags
        return np.zeros(len(decoded), dtype=bool) if flags is None else flags

    def taxon_ids(self) -> dict:
        return dict(self._taxon_ids)

    def describe(self) -> dict:
        return dict(self._describe)


def _driver_taxonomy(model: Path, class_mapping, species_table) -> tuple[Any, dict]:
    """The classifier's taxonomy and taxon ids without loading a backbone on the driver."""
    if model.is_dir():
        from ..bundle import ModelBundle

        return ModelBundle.load(model).taxonomy, {}
    if not model.is_file():
        raise ConfigError(f"--model {model}: no such bundle folder or checkpoint file.")
    if not class_mapping or not species_table:
        raise ConfigError(f"--model {model} is a checkpoint file: the zero-training PlantCLEF "
                          "path also needs --class-mapping and --species-table.")
    from ..features.backbones import load_class_mapping
    from ..plots.plantclef import plantclef_taxonomy

    mapping = plantclef_taxonomy(load_class_mapping(class_mapping), species_table)
    return mapping.taxonomy, dict(mapping.species_ids)


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
    taxonomy, taxon_ids = _driver_taxonomy(model, class_mapping, species_table)
    grid_list, tile_overlap = list(grids), float(overlap)
    paths = [str(p) for p in photos]
    root = Path(out)
    parquet = root / TILES_PARQUET
    args = {"model": str(model.resolve()),
            "class_mapping": str(class_mapping) if class_mapping else None,
            "species_table": str(species_table) if species_table else None,
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
    todo = [(k, p) for k, p in enumerate(unique) if p not in done]
    if todo:
        run = _plots_partition(args, grid_list, tile_overlap, _task_threads(session))
        frame = _rows_frame(session, todo, "order long, photo string",
                            partitions or len(todo))
        frame.mapInPandas(run, TILES_SCHEMA).write.mode("append").parquet(str(parquet))

    table = _read_parquet(parquet).drop_duplicates("photo").set_index("photo")
    ok_plots = [table.loc[p].to_dict() | {"photo": p} for p in paths
                if p in table.index and pd.isna(table.loc[p, "error"])]
    described = table["classifier"].dropna()
    describe = json.loads(described.iloc[0]) if len(described) else {"kind": "unknown"}
    bb = describe.get("backbone", {})
    replay = _ReplayClassifier(taxonomy, ok_plots, describe, taxon_ids,
                               str(bb.get("name", backbone)) if isinstance(bb, dict)
                               else str(bb))
    if not any(p["flags"] is not None for p in ok_plots):
        replay.flag_unknown = None  # the model has no outlier detector: flag nothing
    return replay
