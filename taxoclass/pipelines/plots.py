"""The plot jobs: plot reports (either engine), plot calibration, plot evaluation.

Both engines run through :func:`~taxoclass.engines.get_engine`: the engine classifies the
tiles of the plot photos (:meth:`~taxoclass.engines.Engine.classify_plots`); this module
aggregates and writes the report with :func:`~taxoclass.plots.report.plot_report`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import AnnotationError, ConfigError
from ..io.files import check_output_folder, output_folder
from ..io.images import collect_images
from ..io.provenance import write_provenance
from ..plots.loading import load_tile_classifier
from ..plots.tiling import DEFAULT_GRIDS, check_grids
from ..taxonomy.loading import load_taxonomy
from ..taxonomy.tree import Taxonomy

Progress = Callable[[int, int], None]


def plot_report_job(model: str | Path, photos: Sequence[str | Path], out: str | Path, *,
                    class_mapping: str | Path | None = None,
                    species_table: str | Path | None = None,
                    backbone: str = "vit_base_patch14_reg4_dinov2",
                    model_kwargs: dict | None = None, checklist: str | Path | None = None,
                    batch_size: int = 32, progress: Progress | None = None,
                    device: str = "auto", engine: str = "local", master: str | None = None,
                    overwrite: bool = False, **settings: Any):
    """Rank-aware reports for plot photos (files or folders); see
    :func:`~taxoclass.plots.report.plot_report` for ``settings`` (``settings=``: a
    plot_settings.json from :func:`calibrate_plots_job`).

    Tiles back off as single images do (:func:`tile_backoff`); ``outlier_check=False``
    (``plot-report --no-outlier-check``) turns that off: every tile counts at every rank.

    ``engine="spark"`` (``master``, default ``local[2]``) tiles and classifies the photos
    on Spark executors (one plot per task; resumable in ``out/plot_tiles.parquet``,
    ``overwrite`` discards it) and aggregates on the driver; ``device`` is for the local
    engine only.
    """
    from ..engines import engine_for_job
    from ..plots.report import plot_report
    from ..plots.settings import PlotSettings, resolve_report_settings

    if settings.get("settings") is not None and not isinstance(settings["settings"], PlotSettings):
        settings["settings"] = PlotSettings.load(settings["settings"])  # before the model loads
    resolved = resolve_report_settings(settings.get("settings"), grids=settings.get("grids"),
                                       overlap=settings.get("overlap"),
                                       rule=settings.get("rule"),
                                       thresholds=settings.get("thresholds"))
    if not 0.0 <= resolved.overlap < 1.0:
        raise ConfigError(f"Tile overlap must be a fraction in [0, 1), got {resolved.overlap}.")
    check_grids(resolved.grids)  # before the model loads: at most MAX_TILES tiles a photo
    check_output_folder(out)
    runner = engine_for_job(engine, master=master, device=device)
    paths = collect_images(photos)
    classifier = runner.classify_plots(
        {"model": model, "class_mapping": class_mapping, "species_table": species_table,
         "backbone": backbone, "model_kwargs": model_kwargs, "batch_size": batch_size},
        paths, out, grids=resolved.grids, overlap=resolved.overlap, overwrite=overwrite)
    names = None
    if checklist:
        names = [ln.strip() for ln in Path(checklist).read_text().splitlines() if ln.strip()]
    return plot_report(classifier, paths, out, checklist=names,
                       flag_unknown=tile_backoff(classifier), progress=progress, **settings)


def tile_backoff(classifier: Any):
    """The classifier's tile back-off (each tile's answer rank, ``"unknown"`` where no rank
    passes: :meth:`~taxoclass.plots.tiling.BundleTileClassifier.back_off_tiles`, the
    Spark replay's stored ranks), or None for a classifier without one (PlantCLEF)."""
    return (getattr(classifier, "back_off_tiles", None)
            or getattr(classifier, "flag_unknown", None))


def read_plot_truth(path: str | Path) -> dict[str, list[str]]:
    """Ground-truth taxa per plot from a CSV with ``plot_id`` and ``species`` (or ``taxon``:
    names at any rank of the model, e.g. ``Scaridae`` for a find known to family) columns,
    one row per taxon, or several separated by ``;`` in one cell.
    """
    import pandas as pd

    from ..errors import AnnotationError

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    column = next((c for c in ("species", "taxon") if c in frame.columns), None)
    if "plot_id" not in frame.columns or column is None:
        missing = sorted({"plot_id", "species"} - set(frame.columns))
        raise AnnotationError(f"{path}: expected columns plot_id and species (or taxon), "
                              f"missing {missing} (found {list(frame.columns)}).")
    truth: dict[str, list[str]] = {}
    for plot_id, cell in zip(frame["plot_id"], frame[column]):
        truth.setdefault(plot_id, []).extend(s.strip() for s in cell.split(";") if s.strip())
    return truth


def calibrate_plots_job(model: str | Path, photos: Sequence[str | Path], truth: str | Path,
                        out: str | Path, *, grids: Sequence[Any] | None = None,
                        overlap: float = 0.0, class_mapping: str | Path | None = None,
                        species_table: str | Path | None = None,
                        backbone: str = "vit_base_patch14_reg4_dinov2",
                        model_kwargs: dict | None = None, batch_size: int = 32,
                        progress: Progress | None = None, device: str = "auto"):
    """Plot settings from calibration photos with known species lists.

    ``truth``: CSV with ``plot_id`` (photo file stem) and ``species`` (see
    :func:`read_plot_truth`). Writes ``out/plot_settings.json``, ``out/plot_calibration.csv``
    (F1 and thresholds per rule), ``out/failures.csv`` and provenance; returns the
    :class:`~taxoclass.plots.calibration.CalibrationResult`.
    """
    import pandas as pd

    from ..io.files import atomic_write_csv
    from ..plots.calibration import calibrate_plots, check_plot_truth
    from ..plots.settings import SETTINGS_FILE, TABLE_FILE

    out = check_output_folder(out)
    grids = check_grids(grids or DEFAULT_GRIDS)
    paths = collect_images(photos)
    if not Path(truth).is_file():
        raise AnnotationError(f"{truth}: no such truth file. Expected a CSV with columns "
                              "plot_id and species.")
    truth_table = read_plot_truth(truth)
    check_plot_truth(truth_table, paths, truth_file=str(truth))  # before the model loads
    classifier = load_tile_classifier(model, class_mapping=class_mapping,
                                      species_table=species_table, backbone=backbone,
                                      model_kwargs=model_kwargs, batch_size=batch_size,
                                      device=device)
    result = calibrate_plots(classifier, paths, truth_table, grids=grids,
                             overlap=overlap, flag_unknown=tile_backoff(classifier),
                             progress=progress, model=model, truth_file=truth)
    with output_folder(out) as stage:
        files = {"settings": result.settings.save(stage / SETTINGS_FILE),
                 "table": atomic_write_csv(stage / TABLE_FILE, result.settings.table()),
                 "failures": atomic_write_csv(stage / "failures.csv",
                                              pd.DataFrame(result.failures,
                                                           columns=["photo", "error"]))}
        files["provenance"] = write_provenance(
            stage, backbone=classifier.describe(),
            config={"model": str(model), "truth": str(truth), "photos": [str(p) for p in paths],
                    "grids": result.settings.grids, "overlap": result.settings.overlap},
            extra={"outputs": {k: v.name for k, v in files.items()},
                   "n_plots": result.settings.provenance["n_calibration_plots"],
                   "n_failures": len(result.failures), "rule": result.settings.rule,
                   "tiles": result.settings.tiles.to_dict()})
    result.files = {k: out / v.name for k, v in files.items()}
    return result


def evaluate_plots_job(records: str | Path, truth: str | Path, taxonomy_source: str | Path,
                       *, out: str | Path | None = None) -> dict:
    """Plot metrics (PlantCLEF macro F1 per plot, per species, micro; rank-aware credit)."""
    import pandas as pd

    from ..io.files import atomic_write_csv
    from ..io.provenance import write_json_output
    from ..plots.evaluation import evaluate_plots
    from ..plots.rules import PlotRecord

    source = Path(taxonomy_source)
    if (source / "taxonomy.json").is_file():
        tax = Taxonomy.load(source / "taxonomy.json")
    else:  # the ranks the file fills (order, family, ...), not a fixed list
        tax = load_taxonomy(source, "auto")
    frame = pd.read_csv(records, dtype={"plot_id": str})
    predicted: dict[str, list] = {}
    for row in frame.to_dict("records"):
        node = ()
        if row["taxon_rank"] in tax.ranks:
            hits = tax.find(str(row["taxon"]).removesuffix(" sp."), row["taxon_rank"])
            node = hits[0] if hits else ()
        predicted.setdefault(row["plot_id"], []).append(PlotRecord(
            plot_id=row["plot_id"], taxon_rank=row["taxon_rank"], taxon=row["taxon"],
            score=float(row["score"]), n_tiles=int(row["n_tiles"]), reason=row["reason"],
            node=node, rule=row["rule"] if isinstance(row.get("rule"), str) else "",
            tile_share=float(row.get("tile_share", float("nan"))),
            confidence=float(row.get("confidence", float("nan")))))
    result = evaluate_plots(predicted, read_plot_truth(truth), tax)
    per_plot = result.pop("per_plot", None)
    if out:
        write_json_output(Path(out) / "plot_metrics.json", result)
        if per_plot is not None:
            atomic_write_csv(Path(out) / "plot_metrics_per_plot.csv", per_plot)
        write_provenance(out, config={"records": str(records), "truth": str(truth),
                                      "taxonomy": str(taxonomy_source)})
    return result


