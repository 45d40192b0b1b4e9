"""Apache Spark engine: the local engine's embedding and tile code, run by Spark executors.

Each job ships ``(image_id, path)`` rows to the executors and runs
``DataFrame.mapInPandas`` over them. An executor's Python worker loads the model once
(cached for the life of the worker, which Spark reuses across tasks), cuts its
partition into batches and calls the same library functions as the local engine
(:func:`taxoclass.features.embeddings.embed_batches`, :meth:`ModelBundle.predict_with_backoff`,
``TileClassifier.predict_tiles``), so both engines compute the same numbers.

This module holds the session, the shared helpers and embedding; prediction is in
:mod:`~taxoclass.engines.spark_predict`, plot photos in :mod:`~taxoclass.engines.spark_plots`.

Outputs are Parquet folders written by Spark in append mode, one Spark job per round of
``chunk_size`` items: an interrupted run keeps every finished round, and a rerun skips
the items already in the output (failures included, as the local cache does).

Needs ``pip install 'taxoclass[spark]'`` (PySpark >= 3.5) and Java 17 or 21 on the driver
and executors. On a cluster, taxoclass and its dependencies must be installed on every
executor, and image paths must be readable there (a shared file system).
"""

from __future__ import annotations

import contextlib
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
from .base import backbone_from_spec

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "SparkEmbedResult",
    "backbone_from_spec",
    "get_spark",
    "spark_available",
    "spark_embed",
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

    ``python``: the Python executors run for a new session (default: ``PYSPARK_PYTHON``
    if set, else this very Python); ``PYSPARK_PYTHON`` is set to it only while the
    session starts, then restored.
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
    before = os.environ.get("PYSPARK_PYTHON")
    python = python or before or sys.executable
    os.environ["PYSPARK_PYTHON"] = python
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYSPARK_PYTHON", None)
        else:
            os.environ["PYSPARK_PYTHON"] = before


def _session(spark: SparkSession | None, master: str) -> SparkSession:
    return spark if spark is not None else get_spark(master)


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


def executor_path(path: str | os.PathLike) -> str:
    """``path`` as executors must get it: absolute (an executor's working directory is
    its worker's scratch folder, never the driver's), without resolving symlinks (the
    same shared mount on every node)."""
    return os.path.abspath(os.fspath(path))


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
    """Executor set-up, run at the start of every partition: torch threads, and the CPU
    allocator tuning the local CLI applies (the executor's Python worker is a process Spark
    started for this job, never the caller's own)."""
    import torch

    from ..features.allocator import tune_cpu_allocator

    tune_cpu_allocator()
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
        frame.mapInPandas(run, schema).write.mode("append").parquet(executor_path(parquet))
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


EMBED_SCHEMA = ("order long, image_id string, path string, stamp string, embedding array<float>, "
                "error string")
# 2: rows carry the file's stamp (size:mtime_ns); a run reuses a row only for the same
# (id, path, stamp) without an error, so changed files and failures are embedded again.
SPARK_EMBED_FORMAT_VERSION = 2


def _stamp(path: str) -> str:
    """``size:mtime_ns`` of a file as the driver sees it ("" when it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


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
                                "path": batch["path"], "stamp": batch["stamp"],
                                "embedding": embedding, "error": error})

    return run


def _embed_manifest(spec: dict, batch_size: int) -> dict[str, Any]:
    """The output's manifest, from the driver's copy of the backbone (which also checks the
    spec before any executor starts)."""
    backbone = backbone_from_spec(spec)
    describe = backbone.describe()
    return {
        "format": "taxoclass-spark-embeddings", "format_version": SPARK_EMBED_FORMAT_VERSION,
        "engine": "spark", "identity": {k: describe.get(k) for k in IDENTITY_KEYS},
        "dim": int(backbone.num_features), "batch_size": batch_size, "backbone": describe,
    }


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
    :func:`~taxoclass.features.backbones.create_backbone`. Items already in the output with
    the same id, path and file stamp (size, mtime) are skipped; a changed file and a
    failed image are embedded again (failures listed in ``out/failures.csv`` until they
    succeed). ``collect`` loads the embeddings of ``items`` (in item order,
    failures left out) into ``result.cache``; pass ``False`` for data larger than the
    driver's memory and read the Parquet folder instead.
    """
    started = time.perf_counter()
    if batch_size < 1 or chunk_size < 1:
        raise CacheError(f"batch_size and chunk_size must be >= 1 (found {batch_size}, "
                         f"{chunk_size}).")
    spec = {k: (executor_path(v) if k in ("checkpoint", "class_mapping") and v else v)
            for k, v in dict(backbone_spec).items()}
    ids, paths = normalise_items(items)
    paths = [executor_path(p) for p in paths]  # rows keep the absolute path executors read
    root = Path(out)
    parquet = root / EMBEDDINGS_PARQUET
    manifest = _embed_manifest(spec, batch_size)
    describe = manifest["backbone"]
    if overwrite:
        _clear(root, [EMBEDDINGS_PARQUET, MANIFEST, "failures.csv"])
    _check_manifest(root, manifest, ["format_version", "identity", "dim"], "embedding")
    root.mkdir(parents=True, exist_ok=True)

    session = _session(spark, master)
    stamps = [_stamp(p) for p in paths]
    before = _read_parquet(parquet, ["image_id", "path", "stamp", "error"])
    done = set() if before is None else set(
        before.loc[before["error"].isna(), ["image_id", "path", "stamp"]].itertuples(
            index=False, name=None))
    todo = [(k, i, p, st) for k, (i, p, st) in enumerate(zip(ids, paths, stamps))
            if (i, p, st) not in done]
    n_reused = len(ids) - len(todo)
    manifest.update(master=session.sparkContext.master, complete=not todo,
                    counts={"n_images": len(ids), "n_done_before": n_reused})
    atomic_write_json(root / MANIFEST, manifest)
    if progress is not None:
        progress(n_reused, len(ids))
    run = _embed_partition(spec, batch_size, _task_threads(session))
    _append_rounds(session, todo, "order long, image_id string, path string, stamp string", run,
                   EMBED_SCHEMA, parquet, chunk_size=chunk_size, partitions=partitions,
                   done=n_reused, total=len(ids), progress=progress)

    key = ["image_id", "path", "stamp"]
    table = _read_parquet(parquet, [*key, "error"] + (["embedding"] if collect else []))
    if table is None:
        table = pd.DataFrame(columns=[*key, "error", "embedding"])
    # one row per (id, path, stamp): a success before any failure of an earlier run
    table = (table.assign(_failed=table["error"].notna()).sort_values("_failed", kind="stable")
             .drop_duplicates(key).drop(columns="_failed"))
    wanted = pd.DataFrame({"image_id": ids, "path": paths, "stamp": stamps,
                           "_k": np.arange(len(ids))})
    mine = wanted.merge(table, on=key, how="inner").sort_values("_k")
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
