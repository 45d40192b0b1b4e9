"""Execution engines: where embedding, prediction and plot tile classification run.

One interface, two engines (see ``DESIGN.md``): ``local`` (PyTorch DataLoader on this
machine, the default) and ``spark`` (PySpark ``mapInPandas`` over a cluster, or
``local[N]``). Both run the same library code on each image, so they give the same
numbers; they differ in where outputs live (an ``.npz`` chunk cache or Parquet folders).

    engine = get_engine("spark", master="local[4]")
    engine.embed(items, {"name": "efficientnet-lite0"}, "out/emb")
    engine.predict("models/leaf", paths, "out/pred").frame

The jobs (:mod:`taxoclass.pipelines`) pick an engine with :func:`get_engine` and write
the outputs; engines never import the jobs.

PySpark is imported only when the Spark engine is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = [
    "ENGINE_NAMES",
    "Engine",
    "LocalEngine",
    "PANDAS_WARNING",
    "Predictions",
    "SparkEngine",
    "backbone_from_spec",
    "embedding_folder",
    "engine_for_job",
    "get_engine",
    "prediction_frame",
]

from .base import (
    ENGINE_NAMES,
    PANDAS_WARNING,
    Engine,
    Items,
    Predictions,
    Progress,
    backbone_from_spec,
    prediction_frame,
)


@contextlib.contextmanager
def embedding_folder(cache: str | Path | None, out: str | Path | None, *,
                     reuse: str | Path | None = None) -> Iterator[Path]:
    """Where a command's embeddings are stored (evaluate, predict, flag-unknowns): ``cache``
    if given; else ``reuse`` (the bundle's training cache) when it exists and can be
    written; else ``out/embeddings``; else a temporary folder removed on exit. So every
    command on one model shares one store that grows by the images it lacks.

    Vectors are found by each file's content (never by image id), so any of these gives
    the vectors of the files evaluated.
    """
    from ..features.store import can_write

    if cache:
        yield Path(cache)
    elif reuse and Path(reuse).is_dir() and can_write(Path(reuse)):
        yield Path(reuse)
    elif out:
        yield Path(out) / "embeddings"
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="taxoclass-") as tmp:
            yield Path(tmp) / "embeddings"


@dataclass
class LocalEngine:
    """This machine: :func:`~taxoclass.features.embeddings.compute_embeddings` and friends."""

    num_workers: int = 0
    chunk_size: int = 512
    device: str = "auto"
    precision: str = "auto"
    name: str = field(default="local", init=False)

    def embed(self, items: Items, backbone: Mapping[str, Any], out: str | Path, *,
              batch_size: int | None = None, overwrite: bool = False,
              progress: Progress | None = None):
        """``batch_size``: default by device (``features.batching.auto_batch_size``).
        Vectors already in ``out``'s store for the same file contents are reused."""
        from ..features.embeddings import check_cache_folder, compute_embeddings
        from ..features.store import can_write
        from ..io.provenance import write_provenance

        check_cache_folder(out)  # before the model loads
        model = backbone_from_spec(backbone, device=self.device, precision=self.precision)
        result = compute_embeddings(items, model, out, batch_size=batch_size,
                                    num_workers=self.num_workers, chunk_size=self.chunk_size,
                                    overwrite=overwrite, progress=progress)
        if can_write(Path(out)):  # a complete read-only cache is reused as it is
            write_provenance(out, backbone=model.describe(), config={
                "engine": "local", "backbone_spec": dict(backbone),
                "batch_size": result.cache.manifest.get("plan", {}).get("batch_size",
                                                                       batch_size),
                "num_workers": self.num_workers, "n_images": len(items)})
        return result

    def predict(self, model: str | Path, paths: Sequence[str | Path], out: str | Path | None,
                *, batch_size: int | None = None, top_k: int = 5, overwrite: bool = False,
                progress: Progress | None = None,
                cache: str | Path | None = None) -> Predictions:
        """Vectors found by file content in the store :func:`embedding_folder` picks
        (``cache``; else the bundle's writable training store; else ``out/embeddings``;
        else a temporary folder): only the images the store lacks are embedded and
        appended, so train, evaluate, predict and flag-unknowns share one store. A file
        replaced in place is embedded again. ``overwrite`` deletes ``out/embeddings`` first
        (a ``cache`` or training store is never deleted). ``record["embeddings"]`` says
        where the vectors are and how many were computed and reused."""
        import shutil

        from ..bundle import ModelBundle
        from ..features.embeddings import check_cache_folder, embed_with_spec

        bundle = ModelBundle.load(model)
        _check_cache_option(cache)
        spec = bundle.backbone_spec()
        with embedding_folder(cache, out, reuse=bundle.extra.get("embedding_cache")) as folder:
            own = out is not None and folder == Path(out) / "embeddings"
            if overwrite and own:
                shutil.rmtree(folder, ignore_errors=True)
            check_cache_folder(folder)
            res = embed_with_spec([str(p) for p in paths], folder, spec, device=self.device,
                                  precision=self.precision, batch_size=batch_size,
                                  num_workers=self.num_workers, progress=progress)
            kept = bool(cache) or own or _is_reuse(folder, bundle)  # else a temporary one
            where = str(folder) if kept else None
        embeddings = {"folder": where, "n_computed": int(res.n_computed),
                      "n_reused": int(res.n_reused)}
        return Predictions(frame=_frame_of(bundle, res, paths, top_k),
                           backbone=dict(res.description),
                           record={"model": str(Path(model).resolve()), "top_k": top_k,
                                   "embeddings": embeddings})

    def classify_plots(self, classifier: Mapping[str, Any], photos: Sequence[str | Path],
                       out: str | Path, *, grids: Sequence[Any], overlap: float,
                       overwrite: bool = False):
        """The loaded classifier itself: ``plot_report`` tiles and classifies as it goes."""
        from ..plots.loading import load_tile_classifier

        return load_tile_classifier(**classifier, device=self.device)


@dataclass
class SparkEngine:
    """PySpark: ``master`` is ``local[N]``, ``spark://host:7077``, ``yarn``, ``k8s://…``.

    ``partitions``: Spark tasks per job (default: twice the default parallelism for
    images, one per plot for plot reports). ``conf``: extra Spark settings for a new
    session (e.g. ``{"spark.executor.memory": "8g"}``). ``python``: the Python the
    executors run (default: ``PYSPARK_PYTHON``, else this one; see
    :func:`~taxoclass.engines.spark.get_spark`).
    """

    master: str = "local[2]"
    partitions: int | None = None
    conf: dict[str, str] | None = None
    python: str | None = None
    name: str = field(default="spark", init=False)

    def session(self):
        from .spark import get_spark

        return get_spark(self.master, conf=self.conf, python=self.python)

    def embed(self, items: Items, backbone: Mapping[str, Any], out: str | Path, *,
              batch_size: int = 64, overwrite: bool = False,
              progress: Progress | None = None):
        from .spark import spark_embed

        return spark_embed(items, backbone, out, partitions=self.partitions,
                           batch_size=batch_size, overwrite=overwrite, spark=self.session(),
                           progress=progress)

    def predict(self, model: str | Path, paths: Sequence[str | Path], out: str | Path | None,
                *, batch_size: int | None = None, top_k: int = 5, overwrite: bool = False,
                progress: Progress | None = None,
                cache: str | Path | None = None) -> Predictions:
        """Rows appended to ``out/predictions.parquet`` (images already there are skipped)."""
        from .spark_predict import spark_predict

        if out is None:
            raise ConfigError("--engine spark writes Parquet: pass --out DIR.")
        if cache is not None:
            raise ConfigError("--cache applies to --engine local (its embedding store); Spark "
                              "keeps its resumable rows in --out/predictions.parquet. Fix: "
                              "leave out --cache, or use --engine local.")
        return spark_predict(model, paths, out, partitions=self.partitions,
                             batch_size=batch_size or 64, top_k=top_k, overwrite=overwrite,
                             spark=self.session(), progress=progress)

    def classify_plots(self, classifier: Mapping[str, Any], photos: Sequence[str | Path],
                       out: str | Path, *, grids: Sequence[Any], overlap: float,
                       overwrite: bool = False):
        """Executors tile and classify (``out/plot_tiles.parquet``, resumable); the result
        replays their predictions to ``plot_report`` on the driver."""
        from .spark_plots import spark_classify_plots

        return spark_classify_plots(classifier, photos, out, grids=grids, overlap=overlap,
                                    partitions=self.partitions, overwrite=overwrite,
                                    spark=self.session())


def _check_cache_option(cache: str | Path | None) -> None:
    """A ``--cache`` that is a file is a clear error (before any model loads)."""
    if cache is not None and Path(cache).exists() and not Path(cache).is_dir():
        raise ConfigError(f"--cache {str(cache)!r} is an existing file. Fix: pass the folder of "
                          "an embedding store (the training cache, embeddings.cache), or a new "
                          "folder.")


def _is_reuse(folder: Path, bundle: Any) -> bool:
    reuse = bundle.extra.get("embedding_cache")
    return bool(reuse) and Path(reuse) == Path(folder)


def _frame_of(bundle: Any, res: Any, paths: Sequence[str | Path], top_k: int):
    """Prediction rows of the embedded images, then one ``error`` row per failed image."""
    import numpy as np
    import pandas as pd

    found = np.asarray(res.found, dtype=bool)
    images = [str(p) for p in paths]
    frame = prediction_frame(bundle, res.embeddings[found],
                             [images[i] for i in np.flatnonzero(found)], top_k)
    bad = np.flatnonzero(~found)
    if len(bad):
        fails = pd.DataFrame({"image": [images[i] for i in bad],
                              "error": [res.errors.get(int(i), "not embedded") for i in bad]})
        frame = pd.concat([frame, fails], ignore_index=True)
    return frame


def get_engine(name: str = "local", **options: Any) -> Engine:
    """``get_engine("local", num_workers=2)`` or ``get_engine("spark", master="local[4]")``.

    Options the engine does not take raise :class:`~taxoclass.errors.ConfigError`
    (``master`` and ``partitions`` belong to Spark, ``num_workers`` to local).
    """
    engines: dict[str, type] = {"local": LocalEngine, "spark": SparkEngine}
    key = str(name).strip().lower()
    if key not in engines:
        raise ConfigError(f"--engine {name!r}: expected one of {', '.join(ENGINE_NAMES)}.")
    cls = engines[key]
    allowed = {f for f in cls.__dataclass_fields__ if f != "name"}
    extra = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise ConfigError(f"--engine {key}: option(s) {', '.join(unknown)} do not apply; it "
                          f"takes {', '.join(sorted(allowed))}.")
    if key == "spark":
        from .spark import spark_available

        reason = spark_available()
        if reason:
            raise ConfigError(f"--engine spark: {reason}")
    return cls(**extra)


def engine_for_job(name: str = "local", *, master: str | None = None,
                   **local_options: Any) -> Engine:
    """The engine a job's parameters name: ``master`` goes to Spark, ``local_options``
    (``num_workers``, ``device``, ``precision``) to the local engine; every job with a Spark
    path picks its engine with this."""
    if str(name).strip().lower() == "local":
        return get_engine(name, master=master, **local_options)
    return get_engine(name, master=master)
