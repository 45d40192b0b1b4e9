"""What every engine shares: the :class:`Engine` protocol, its result types and helpers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

ENGINE_NAMES = ("local", "spark")
# PySpark 4 warns about pandas 3 on every pandas conversion; mapInPandas works with it.
PANDAS_WARNING = "PySpark does not yet fully support pandas"
Progress = Callable[[int, int], None]
Items = Sequence[tuple[object, str | Path]]


@dataclass
class Predictions:
    """What :meth:`Engine.predict` returns: the rows, and what provenance records."""

    frame: Any                 # pandas DataFrame, one row per image (failures last)
    backbone: dict[str, Any]   # the backbone's description
    record: dict[str, Any]     # engine settings for provenance.json (the job adds "images")


@runtime_checkable
class Engine(Protocol):
    """The per-item work an engine runs; the jobs in :mod:`taxoclass.pipelines` orchestrate
    it and write the outputs."""

    name: str

    def embed(self, items: Items, backbone: Mapping[str, Any], out: str | Path, *,
              batch_size: int = 64, overwrite: bool = False,
              progress: Progress | None = None) -> Any:
        """Embed ``(image_id, path)`` items into ``out``; returns an ``EmbedResult``."""
        ...

    def predict(self, model: str | Path, paths: Sequence[str | Path], out: str | Path | None,
                *, batch_size: int | None = None, top_k: int = 5, overwrite: bool = False,
                progress: Progress | None = None) -> Predictions:
        """Embed image ``paths`` with a bundle's backbone and run its back-off; ``out``
        keeps the engine's resumable store (``None``: a temporary one, local only)."""
        ...

    def classify_plots(self, classifier: Mapping[str, Any], photos: Sequence[str | Path],
                       out: str | Path, *, grids: Sequence[Any], overlap: float,
                       overwrite: bool = False) -> Any:
        """A tile classifier for :func:`~taxoclass.plots.report.plot_report` on ``photos``
        (``classifier``: :func:`~taxoclass.plots.loading.load_tile_classifier` arguments)."""
        ...


def backbone_from_spec(spec: Mapping[str, Any], **options: Any):
    """Build the backbone a spec describes (``features.backbones.backbone_from_spec``;
    ``options``: ``device``, ``precision``)."""
    from ..features.backbones import backbone_from_spec as build

    return build(dict(spec), **options)


def prediction_frame(bundle: Any, embeddings: Any, images: Sequence[str], top_k: int):
    """The prediction rows of embedded images: image, back-off columns, top-k per rank.

    Every command that writes prediction rows builds them here (predict, flag-unknowns,
    plot tiles, Spark): ``confidence`` (after ``taxon``) is the calibrated probability
    that ``taxon`` at ``taxon_rank`` is right (NaN for unknown; see
    :meth:`~taxoclass.bundle.ModelBundle.predict_with_backoff`), ``score`` the back-off
    evidence the per-rank thresholds compare (not a probability)."""
    import pandas as pd

    backoff, decoded = bundle.predict_with_backoff(embeddings, top_k=top_k)
    tops = decoded.to_frame(bundle.taxonomy)
    return pd.concat([pd.DataFrame({"image": list(images)}), backoff.reset_index(drop=True),
                      tops[[c for c in tops.columns if "_top" in c]]], axis=1)
