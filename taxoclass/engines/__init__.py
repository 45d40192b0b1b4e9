"""Execution engines: where embedding, prediction and plot jobs run.

One interface, two engines (see ``DESIGN.md``): ``local`` (PyTorch DataLoader on this
machine, the default) and ``spark`` (PySpark ``mapInPandas`` over a cluster, or
``local[N]``). Both run the same library code on each image, so they give the same
numbers; they differ in where outputs live (an ``.npz`` chunk cache or Parquet folders).

    engine = get_engine("spark", master="local[4]")
    engine.embed(items, {"name": "efficientnet-lite0"}, "out/emb")
    engine.predict("models/leaf", ["photos/"], "out/pred")
    engine.plot_report("models/leaf", ["plots/"], "out/report", grids=(2, 4))

PySpark is imported only when the Spark engine is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigError

__all__ = [
    "ENGINE_NAMES",
    "Engine",
    "LocalEngine",
    "SparkEngine",
    "backbone_from_spec",
    "get_engine",
]

ENGINE_NAMES = ("local", "spark")
Progress = Callable[[int, int], None]
Items = Sequence[tuple[object, str | Path]]


@runtime_checkable
class Engine(Protocol):
    """What the CLI needs from an engine: one call per job."""

    name: str

    def embed(self, items: Items, backbone: Mapping[str, Any], out: str | Path, *,
              batch_size: int = 64, overwrite: bool = False,
              progress: Progress | None = None) -> Any:
        """Embed ``(image_id, path)`` items; returns an ``EmbedResult``."""
        ...

    def predict(self, model: str | Path, images: Sequence[str | Path], out: str | Path, *,
                batch_size: int = 64, top_k: int = 5, overwrite: bool = False,
                progress: Progress | None = None) -> Any:
        """Backed-off predictions per image (the ``predict_images`` DataFrame)."""
        ...

    def plot_report(self, model: str | Path, photos: Sequence[str | Path], out: str | Path,
                    *, progress: Progress | None = None, **settings: Any) -> Any:
        """Plot reports (``PlotReportResult``); settings as for ``plot_report_job``."""
        ...


def backbone_from_spec(spec: Mapping[str, Any]):
    """Build the backbone a spec describes (``features.backbones.backbone_from_spec``)."""
    from ..features.backbones import backbone_from_spec as build

    return build(dict(spec))


@dataclass
class LocalEngine:
    """This machine: :func:`~taxoclass.features.embeddings.compute_embeddings` and friends."""

    num_workers: int = 0
    chunk_size: int = 512
    name: str = field(default="local", init=False)

    def embed(self, items: Items, backbone: Mapping[str, Any], out: str | Path, *,
              batch_size: int = 64, overwrite: bool = False,
              progress: Progress | None = None):
        from ..features.embeddings import compute_embeddings
        from ..io.provenance import write_provenance

        model = backbone_from_spec(backbone)
        result = compute_embeddings(items, model, out, batch_size=batch_size,
                                    num_workers=self.num_workers, chunk_size=self.chunk_size,
                                    overwrite=overwrite, progress=progress)
        write_provenance(out, backbone=model.describe(), config={
            "engine": "local", "backbone_spec": dict(backbone), "batch_size": batch_size,
            "num_workers": self.num_workers, "n_images": len(items)})
        return result

    def predict(self, model: str | Path, images: Sequence[str | Path], out: str | Path, *,
                batch_size: int = 64, top_k: int = 5, overwrite: bool = False,
                progress: Progress | None = None):
        from ..pipelines.jobs import predict_images

        return predict_images(model, images, out=out, batch_size=batch_size,
                              num_workers=self.num_workers, top_k=top_k, overwrite=overwrite,
                              progress=progress)

    def plot_report(self, model: str | Path, photos: Sequence[str | Path], out: str | Path,
                    *, progress: Progress | None = None, **settings: Any):
        from ..pipelines.jobs import plot_report_job

        return plot_report_job(model, photos, out, progress=progress, **settings)


@dataclass
class SparkEngine:
    """PySpark: ``master`` is ``local[N]``, ``spark://host:7077``, ``yarn``, ``k8s://…``.

    ``partitions``: Spark tasks per job (default: twice the default parallelism for
    images, one per plot for plot reports). ``conf``: extra Spark settings for a new
    session (e.g. ``{"spark.executor.memory": "8g"}``).
    """

    master: str = "local[2]"
    partitions: int | None = None
    conf: dict[str, str] | None = None
    name: str = field(default="spark", init=False)

    def session(self):
        from .spark import get_spark

        return get_spark(self.master, conf=self.conf)

    def embed(self, items: Items, backbone: Mapping[str, Any], out: str | Path, *,
              batch_size: int = 64, overwrite: bool = False,
              progress: Progress | None = None):
        from .spark import spark_embed

        return spark_embed(items, backbone, out, partitions=self.partitions,
                           batch_size=batch_size, overwrite=overwrite, spark=self.session(),
                           progress=progress)

    def predict(self, model: str | Path, images: Sequence[str | Path], out: str | Path, *,
                batch_size: int = 64, top_k: int = 5, overwrite: bool = False,
                progress: Progress | None = None):
        from .spark import spark_predict

        return spark_predict(model, images, out, partitions=self.partitions,
                             batch_size=batch_size, top_k=top_k, overwrite=overwrite,
                             spark=self.session(), progress=progress)

    def plot_report(self, model: str | Path, photos: Sequence[str | Path], out: str | Path,
                    *, progress: Progress | None = None, **settings: Any):
        from .spark import spark_plot_report

        return spark_plot_report(model, photos, out, partitions=self.partitions,
                                 spark=self.session(), progress=progress, **settings)


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
