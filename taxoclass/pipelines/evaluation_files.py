"""The files of ``taxoclass evaluate``: its output folder (written as a unit), the per-image
``predictions.csv`` (:func:`evaluation_table`), the reliability diagram and the metrics with
the output header. The jobs themselves are in :mod:`taxoclass.pipelines.evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..io.files import atomic_write, atomic_write_csv
from ..io.provenance import model_id_for, write_json_output, write_provenance

EVALUATION_FILES = ("metrics.json", "confusion.csv", "predictions.csv", "provenance.json",
                    "config.yaml", "reliability.csv", "reliability.png")
OPENSET_FILES = ("openset_metrics.json", "openset_detection.csv", "openset_risk_coverage.csv",
                 "openset_predictions.csv", "provenance.json", "config.yaml")


def write_unit(out: Path, own: Sequence[str], write: Callable[[Path], None]) -> None:
    """Call ``write(folder)`` so that its files replace those of ``out`` as a unit
    (:func:`~taxoclass.io.files.output_folder`): a kill leaves the old set or the new one.
    The other evaluation's results in ``out`` (plain or open-set) and its embedding store
    are carried over. A folder holding files evaluate never writes is refused rather than
    replaced (``--out`` is the evaluation's own folder)."""
    from ..io.files import output_folder

    others = sorted(e.name for e in out.iterdir() if e.name not in own
                    and not e.name.startswith(".")) if out.is_dir() else []
    foreign = [n for n in others if n not in {*EVALUATION_FILES, *OPENSET_FILES, "embeddings"}]
    if foreign:
        raise ConfigError(f"--out {out}: the folder holds files evaluate did not write "
                          f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                          "evaluate replaces its whole output folder. Fix: pass a new or "
                          "empty folder, e.g. --out runs/eval.")
    with output_folder(out, keep=others) as stage:
        write(stage)


def check_evaluation_folder(out: str | Path) -> Path:
    """``out`` usable as evaluate's output folder, checked before any work: not an existing
    file (:func:`~taxoclass.io.files.check_output_folder`)."""
    from ..io.files import check_output_folder

    out = Path(out)
    if out.is_file():
        raise ConfigError(f"--out {out} is an existing file; evaluate writes a folder "
                          f"(metrics.json, predictions.csv, ...). Fix: --out "
                          f"{out.with_suffix('')}-eval, or another folder.")
    return check_output_folder(out)


def _reliability_png(path: Path, bins: pd.DataFrame, summary: dict) -> bool:
    """The reliability diagram (accuracy against mean confidence per bin, one line per
    rank); False when matplotlib is not installed. No process-wide state is changed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = FigureCanvasAgg(Figure(figsize=(5, 5))).figure
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    for rank, rows in bins[bins["count"] > 0].groupby("rank", sort=False):
        ece = summary["ece"].get(rank)
        ax.plot(rows["mean_confidence"], rows["accuracy"], marker="o",
                label=f"{rank} (ECE {ece:.3f})" if ece is not None else str(rank))
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean confidence", ylabel="accuracy",
           title="Reliability of confidence")
    ax.legend(loc="upper left", fontsize="small")
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100), mode="wb")
    return True


def write_evaluation(out: Path, model, annotations, bundle, split: str, metrics: dict,
                      confusion: pd.DataFrame, predictions: pd.DataFrame,
                      reliability: pd.DataFrame) -> None:
    """metrics.json, confusion.csv, predictions.csv, reliability.csv (+ .png) and
    provenance, as a unit."""
    model_id = model_id_for(bundle)

    def write(folder: Path) -> None:
        write_json_output(folder / "metrics.json", metrics, model_id=model_id)
        atomic_write_csv(folder / "confusion.csv", confusion)
        atomic_write_csv(folder / "predictions.csv", predictions)
        atomic_write_csv(folder / "reliability.csv", reliability)
        (folder / "reliability.png").unlink(missing_ok=True)
        _reliability_png(folder / "reliability.png", reliability, metrics["calibration"])
        write_provenance(folder, backbone=bundle.backbone, config={
            "model": str(Path(model).resolve()), "annotations": str(Path(annotations).resolve()),
            "split": split}, extra={"model_id": model_id})

    write_unit(out, EVALUATION_FILES, write)


def _cell(ok: np.ndarray, labelled: np.ndarray) -> list[bool | None]:
    """True/False where the row is labelled, None (an empty cell) where it is not."""
    return [bool(o) if lab else None for o, lab in zip(ok, labelled)]


def evaluation_table(rows: pd.DataFrame, y: dict[str, np.ndarray], answers: pd.DataFrame,
                     decoded, tax, calibration) -> pd.DataFrame:
    """evaluate's ``predictions.csv``: one row per scored image.

    ``image_id``, ``image`` (path); the back-off answer ``taxon_rank``, ``taxon``,
    ``confidence``, ``reason`` and ``correct`` (the answer names the true taxon at its rank;
    empty for unknown, or where the image has no label at that rank); per rank
    ``<rank>_true`` (empty where the label stops above it), ``<rank>`` (the decoded path),
    ``<rank>_prob``, ``<rank>_confidence``, ``<rank>_correct`` (empty where unlabelled),
    ``<rank>_top5``; ``method``.
    """
    from ..model.confidence import with_rank_confidence

    ranks = list(tax.ranks)
    path = with_rank_confidence(decoded.to_frame(tax), ranks, calibration)
    table = pd.DataFrame({"image_id": rows["image_id"].astype(str).to_numpy(),
                          "image": rows["path"].astype(str).to_numpy()})
    for col in ("taxon_rank", "taxon", "confidence", "reason"):
        table[col] = answers[col].to_numpy()
    answer_ok: list[bool | None] = [None] * len(table)
    for r in ranks:
        names = np.asarray(tax.names(r), dtype=object)
        lab = y[r] >= 0
        ok = np.asarray(decoded.path[r]) == y[r]
        table[f"{r}_true"] = np.where(lab, names[np.maximum(y[r], 0)], "")
        for col in (r, f"{r}_prob", f"{r}_confidence"):
            table[col] = path[col].to_numpy()
        table[f"{r}_correct"] = _cell(ok, lab)
        table[f"{r}_top{decoded.top_k}"] = path[f"{r}_top{decoded.top_k}"].to_numpy()
        for i in np.flatnonzero(answers["taxon_rank"].to_numpy(dtype=object) == r):
            answer_ok[i] = bool(ok[i]) if lab[i] else None
    table.insert(table.columns.get_loc("reason") + 1, "correct", answer_ok)
    table["method"] = decoded.method
    return table
