"""The predict and flag-unknowns jobs: backed-off predictions for image files or folders.

Both engines run through :func:`~taxoclass.engines.get_engine`: the engine embeds the
images and runs the bundle's back-off (:meth:`~taxoclass.engines.Engine.predict`); this
module collects the inputs and writes the outputs. Every image is on its own: one that
cannot be read is a row with an ``error`` (and a row of ``failures.csv``) and the others
carry on. The files of one run are written as a unit
(:func:`~taxoclass.io.files.output_folder`): a killed run leaves the previous outputs whole,
and the engine's resumable state (``embeddings/``, Spark's Parquet rows) is kept.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import ConfigError, ImageError
from ..io.files import atomic_write_csv, check_output_folder, output_folder
from ..io.images import collect_images
from ..io.provenance import model_id_for, write_json_output, write_provenance
from ..vocab import Reason, accepted_reason, is_outlier_reason

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

#: What a rerun into the same ``out`` resumes from (the local embedding cache, Spark's rows).
RESUME_STATE = ("embeddings", "predictions.parquet", "manifest.json")
FAILURE_COLUMNS = ["image", "error"]
#: ``<rank>_top<k>`` columns: packed ``name:prob;...`` in CSV, lists in JSON.
TOPK_COLUMN = re.compile(r"^(?P<rank>.+)_top(?P<k>[0-9]+)$")


def _predict(model: str | Path, images: Sequence[str | Path], out: str | Path | None, *,
             batch_size: int | None, num_workers: int, top_k: int, overwrite: bool,
             progress: Progress | None, device: str, engine: str, master: str | None,
             cache: str | Path | None = None) -> Any:
    """The engine's :class:`~taxoclass.engines.base.Predictions` for the images."""
    from ..engines import engine_for_job
    from ..features.batching import auto_batch_size

    if out is not None:
        check_output_folder(out)  # before the model loads: an unusable --out fails at once
    runner = engine_for_job(engine, master=master, num_workers=num_workers, device=device)
    if engine != "local":
        if out is None:
            raise ConfigError("--engine spark writes Parquet: pass --out DIR.")
        batch_size = batch_size or auto_batch_size("cpu")  # executors predict on CPUs
    paths = collect_images(images)
    extra = {} if cache is None else {"cache": cache}
    result = runner.predict(model, paths, out, batch_size=batch_size, top_k=top_k,
                            overwrite=overwrite, progress=progress, **extra)
    result.frame = one_decision(result.frame)
    _log_embeddings(result)
    return result


def one_decision(frame: pd.DataFrame) -> pd.DataFrame:
    """The decision columns of every row from the one back-off decision (both engines).

    A failed row (``error`` set) gets reason ``failed`` and ``outlier`` False; every
    other row's ``outlier`` is read from its reason (True exactly when it ends in
    ``:outlier``: the distance gate acted), so the two columns cannot disagree.
    """
    frame = frame.copy()
    if "reason" not in frame:
        frame["reason"] = None
    failed = (frame["error"].notna() & (frame["error"].astype(str) != "")
              if "error" in frame else pd.Series(False, index=frame.index))
    frame["reason"] = frame["reason"].astype(object).where(~failed, Reason.FAILED.value)
    frame["outlier"] = frame["reason"].map(is_outlier_reason).astype(bool)
    for col in [c for c in frame.columns if str(c).endswith("_prob")]:
        frame[col] = frame[col].clip(0.0, 1.0)  # float32 sums can reach 1.0000001
    return frame


def flagged_of(frame: pd.DataFrame, lowest: str) -> pd.Series:
    """``flagged``: True where the answer is not named at the model's lowest rank (backed
    off, unknown or failed); the same decision as ``reason``."""
    return frame["reason"] != accepted_reason(lowest)


def _log_embeddings(result: Any) -> None:
    """Log (INFO) how many vectors were computed and reused, and where they are kept."""
    emb = result.record.get("embeddings") if isinstance(result.record, dict) else None
    if emb:
        result.frame.attrs["embeddings"] = dict(emb)
        log.info("embeddings: %d computed, %d reused (%s)", emb["n_computed"], emb["n_reused"],
                 emb["folder"] or "a temporary folder")


def failures_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``frame`` whose image could not be read: ``image``, ``error``."""
    if "error" not in frame:
        return pd.DataFrame(columns=FAILURE_COLUMNS)
    bad = frame["error"].notna() & (frame["error"].astype(str) != "")
    return frame.loc[bad, FAILURE_COLUMNS].reset_index(drop=True)


def topk_list(packed: Any, rank: str) -> list[dict[str, Any]] | None:
    """A packed top-k cell (``"Acer:0.8123;Quercus:0.1000"``) as a JSON list, best first:
    ``[{"name": "Acer", "rank": "genus", "probability": 0.8123}, ...]``; None for an
    empty cell (a failed image)."""
    if not isinstance(packed, str):
        return None
    out = []
    for item in filter(None, packed.split(";")):
        name, _, prob = item.rpartition(":")
        out.append({"name": name, "rank": rank, "probability": float(prob)})
    return out


def json_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of a predictions frame for JSON: missing values null, top-k as lists."""
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    tops = {c: m["rank"] for c in frame.columns if (m := TOPK_COLUMN.match(str(c)))}
    for rec in records:
        for col, rank in tops.items():
            rec[col] = topk_list(rec[col], rank)
        for key, val in rec.items():  # numpy NaN that survived as a float
            if isinstance(val, float) and math.isnan(val):
                rec[key] = None
    return records


def bundle_model_id(model: str | Path) -> str | None:
    """The id of the bundle at ``model`` (:func:`~taxoclass.io.provenance.model_id_for`),
    written in every JSON header; None when it cannot be read."""
    from ..bundle import ModelBundle
    from ..errors import TaxoclassError

    try:
        return model_id_for(ModelBundle.load(model))
    except (TaxoclassError, OSError, ValueError) as exc:
        log.warning("no model id for the JSON headers: %s", exc)
        return None


def _write_predictions(stage: Path, frame: pd.DataFrame, result: Any,
                       images: Sequence[str | Path], model_id: str | None) -> None:
    atomic_write_csv(stage / "predictions.csv", frame)
    write_json_output(stage / "predictions.json", json_records(frame), model_id=model_id,
                      items="predictions")
    atomic_write_csv(stage / "failures.csv", failures_frame(frame))
    write_provenance(stage, backbone=result.backbone,
                     config={**result.record, "images": [str(i) for i in images]},
                     extra={"model_id": model_id})


def _warn_failures(frame: pd.DataFrame, out: str | Path | None) -> int:
    """Log how many images failed (where they are listed); returns that number."""
    n_failed = len(failures_frame(frame))
    if n_failed:
        where = Path(out) / "failures.csv" if out else "the error column"
        log.warning("%d of %d images failed, see %s", n_failed, len(frame), where)
    return n_failed


def predict_images(model: str | Path, images: Sequence[str | Path], *,
                   out: str | Path | None = None, batch_size: int | None = None,
                   num_workers: int = 0,
                   top_k: int = 5, overwrite: bool = False, progress: Progress | None = None,
                   device: str = "auto", engine: str = "local",
                   master: str | None = None, cache: str | Path | None = None) -> pd.DataFrame:
    """Predictions for image files or folders, backed off to the lowest reliable rank.

    Returns a DataFrame, one row per image: ``taxon_rank``, ``taxon`` (``Quercus sp.`` at
    genus rank, ``Scaridae`` at family rank, ``unknown``), ``score`` (empty for unknown),
    ``reason`` (the words of :mod:`taxoclass.vocab`: ``species``,
    ``backoff_to_genus:outlier``, ``unknown:low_confidence``, ``failed``...), ``outlier``
    (True exactly when the reason ends in ``:outlier``: the distance gate acted), the full
    coherent path (one column per rank of the model) with probabilities and top-k per
    rank; failed images carry an ``error``. Embeddings are found by file content in one
    store (resumable; only missing images are computed): ``cache``, else the model's
    training store when it can be written, else ``out/embeddings``, else a temporary folder
    (:func:`~taxoclass.engines.embedding_folder`); ``frame.attrs["embeddings"]`` counts
    them. With ``out``, ``predictions.csv`` / ``predictions.json`` (``{"header": ...,
    "predictions": [...]}``, top-k as lists; ``data_schemas/predictions.schema.json``),
    ``failures.csv`` plus provenance are written there as a unit. ``engine="spark"``
    (``master``, default ``local[2]``) runs the same code in PySpark and keeps its resumable rows in
    ``out/predictions.parquet``; it needs ``out``, takes no ``cache`` and ignores ``device``
    and ``num_workers`` (executors predict on CPUs).
    """
    result = _predict(model, images, out, batch_size=batch_size, num_workers=num_workers,
                      top_k=top_k, overwrite=overwrite, progress=progress, device=device,
                      engine=engine, master=master, cache=cache)
    frame = result.frame
    if out:
        with output_folder(out, keep=RESUME_STATE) as stage:
            _write_predictions(Path(stage), frame, result, images, bundle_model_id(model))
    _warn_failures(frame, out)
    return frame


def flag_unknowns(model: str | Path, images: Sequence[str | Path], *, out: str | Path,
                  batch_size: int | None = None, overwrite: bool = False,
                  progress: Progress | None = None, device: str = "auto",
                  cache: str | Path | None = None) -> tuple[pd.DataFrame, dict]:
    """Field-survey screening: one row per image, flagged rows (not named to species) first.

    ``flagged`` is True where the reason is not the lowest rank's name (:func:`flagged_of`):
    backed off, unknown or failed; ``outlier`` and ``reason`` are the predictions' own.

    Writes ``flags.csv``, ``flags_summary.json``, the predictions, ``failures.csv`` and
    provenance into ``out`` (as a unit) and returns ``(frame, summary)`` where summary
    counts images resolved at each rank (and the embeddings computed and reused; ``cache``:
    as for :func:`predict_images`). When no image at all could be read, nothing was
    screened: the files are still written (every row says why), then an
    :class:`~taxoclass.errors.ImageError` says so (the CLI exits 2), rather than a
    screening that looks finished.
    """
    from ..bundle import ModelBundle

    result = _predict(model, images, out, batch_size=batch_size, num_workers=0, top_k=5,
                      overwrite=overwrite, progress=progress, device=device, engine="local",
                      master=None, cache=cache)
    frame = result.frame.copy()
    lowest = ModelBundle.load(model).taxonomy.ranks[-1]
    frame.insert(1, "flagged", flagged_of(frame, lowest).to_numpy())
    frame = frame.sort_values(["flagged", "taxon_rank", "image"], ascending=[False, True, True],
                              kind="stable").reset_index(drop=True)
    resolved = frame["taxon_rank"].fillna(Reason.FAILED.value).value_counts().to_dict()
    summary = {"n_images": len(frame), "n_flagged": int(frame["flagged"].sum()),
               "resolved_at": {k: int(v) for k, v in resolved.items()},
               **({"embeddings": result.record["embeddings"]}
                  if "embeddings" in result.record else {})}
    model_id = bundle_model_id(model)
    with output_folder(out, keep=RESUME_STATE) as stage:
        _write_predictions(Path(stage), result.frame, result, images, model_id)
        atomic_write_csv(Path(stage) / "flags.csv", frame)
        write_json_output(Path(stage) / "flags_summary.json", summary, model_id=model_id)
    n_failed = _warn_failures(frame, out)
    if len(frame) and n_failed == len(frame):
        first = failures_frame(frame).iloc[0]
        raise ImageError(
            f"None of the {len(frame)} image(s) could be read, so nothing was screened "
            f"(first: {first['image']}: {first['error']}). Every image is listed in "
            f"{Path(out) / 'failures.csv'}. Fix: pass readable JPEG/PNG photos.")
    return frame, summary
