"""The predict and flag-unknowns jobs: backed-off predictions for image files or folders.

Both engines run through :func:`~taxoclass.engines.get_engine`: the engine embeds the
images and runs the bundle's back-off (:meth:`~taxoclass.engines.Engine.predict`); this
module collects the inputs and writes the outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from ..errors import ConfigError
from ..io.files import atomic_write_csv, atomic_write_json
from ..io.images import collect_images
from ..io.provenance import write_provenance

Progress = Callable[[int, int], None]


def predict_images(model: str | Path, images: Sequence[str | Path], *,
                   out: str | Path | None = None, batch_size: int | None = None,
                   num_workers: int = 0,
                   top_k: int = 5, overwrite: bool = False, progress: Progress | None = None,
                   device: str = "auto", engine: str = "local",
                   master: str | None = None) -> pd.DataFrame:
    """Predictions for image files or folders, backed off to the lowest reliable rank.

    Returns a DataFrame, one row per image: ``taxon_rank``, ``taxon`` (``Quercus sp.`` at
    genus rank), ``score``, ``reason``, ``outlier``, the full coherent path with
    probabilities and top-k per rank; failed images carry an ``error``. With
    ``out``, embeddings are cached (resumable) in ``out/embeddings`` and
    ``predictions.csv`` / ``predictions.json`` plus provenance are written there.
    ``engine="spark"`` (``master``, default ``local[2]``) runs the same code in PySpark
    and keeps its resumable rows in ``out/predictions.parquet``; it needs ``out`` and
    ignores ``device`` and ``num_workers`` (executors predict on CPUs).
    """
    from ..engines import engine_for_job
    from ..features.batching import auto_batch_size

    runner = engine_for_job(engine, master=master, num_workers=num_workers, device=device)
    if engine != "local":
        if out is None:
            raise ConfigError("--engine spark writes Parquet: pass --out DIR.")
        batch_size = batch_size or auto_batch_size("cpu")  # executors predict on CPUs
    paths = collect_images(images)
    result = runner.predict(model, paths, out, batch_size=batch_size, top_k=top_k,
                            overwrite=overwrite, progress=progress)
    frame = result.frame
    if out:
        atomic_write_csv(Path(out) / "predictions.csv", frame)
        atomic_write_json(Path(out) / "predictions.json",
                          frame.astype(object).where(frame.notna(), None).to_dict("records"))
        write_provenance(out, backbone=result.backbone,
                         config={**result.record, "images": [str(i) for i in images]})
    return frame


def flag_unknowns(model: str | Path, images: Sequence[str | Path], *, out: str | Path,
                  batch_size: int | None = None, overwrite: bool = False,
                  progress: Progress | None = None,
                  device: str = "auto") -> tuple[pd.DataFrame, dict]:
    """Field-survey screening: one row per image, flagged rows (not named to species) first.

    Writes ``flags.csv`` into ``out`` (plus predictions and provenance) and returns
    ``(frame, summary)`` where summary counts images resolved at each rank.
    """
    from ..bundle import ModelBundle

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
