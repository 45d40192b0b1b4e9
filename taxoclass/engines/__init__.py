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
                     reuse: str | Path | None = None,
                     ids: Sequence[str] = ()) -> Iterator[Path]:
    """Where a command's embeddings are stored (evaluate, predict, flag-unknowns): ``cache``
    if given; else ``reuse`` (the bundle's training cache) when it exists and can be
    written; else ``out/embeddings``; else a temporary folder removed on exit. So every
    command on one model shares one store that grows by the images it lacks.

    Vectors are found by each file's content (never by image id), so any of these gives
    the vectors of the files evaluated; ``ids`` is no longer needed (kept for callers).
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
                progress: Progress | None = None) -> Predictions:
        """Embeddings stored (resumable, found by file content) in ``out/embeddings``, or
        in a temporary folder; a file replaced in place is embedded again."""
        import contextlib
        import tempfile

        import pandas as pd

        from ..bundle import ModelBundle
        from ..features.embeddings import compute_embeddings

        bundle = ModelBundle.load(model)
        items = [(str(p), str(p)) for p in paths]
        backbone = bundle.create_backbone(device=self.device)
        with (contextlib.nullcontext(out) if out else tempfile.TemporaryDirectory()) as root:
            cache_dir = Path(root) / "embeddings"
            res = compute_embeddings(items, backbone, cache_dir, batch_size=batch_size,
                                     num_workers=self.num_workers, overwrite=overwrite,
                                     progress=progress)
        frame = prediction_frame(bundle, res.cache.embeddings, res.cache.image_ids.tolist(),
                                 top_k)
        if len(res.failures):
            fails = pd.DataFrame({"image": res.failures["image_id"].astype(str),
                                  "error": res.failures["error"]})
            frame = pd.concat([frame, fails], ignore_index=True)
        return Predictions(frame=frame, backbone=backbone.describe(),
                           record={"model": str(Path(model).resolve()), "top_k": top_k})

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
                progress: Progress | None = None) -> Predictions:
        """Rows appended to ``out/predictions.parquet`` (images already there are skipped)."""
        from .spark_predict import spark_predict

        if out is None:
            raise ConfigError("--engine spark writes Parquet: pass --out DIR.")
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
