"""The ``taxoclass`` commands on plot (quadrat) photos: plot-report, calibrate-plots,
evaluate-plots.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..vocab import UNKNOWN
from .app import (
    checkpoint_model_options,
    device_option,
    engine_options,
    json_option,
    main,
    parse_thresholds,
    progress_bar,
    wide_pandas,
)


def _find(record) -> str:
    """One find on the console: ``Carex sp. (genus, confidence 0.91)`` (the record's
    calibrated ``confidence``; ``score 0.91`` where it has none); the unknown record says
    how many tiles it counts, never a number of its own
    (``unknown (2 of 9 tiles, unknown:outlier)``)."""
    if record.taxon_rank == UNKNOWN:
        share = getattr(record, "tile_share", float("nan"))
        total = round(record.n_tiles / share) if share == share and share > 0 else "?"
        return f"{UNKNOWN} ({record.n_tiles} of {total} tiles, {record.reason})"
    conf = float(getattr(record, "confidence", float("nan")))
    number = f"confidence {conf:.2f}" if conf == conf else f"score {record.score:.2f}"
    return f"{record.taxon} ({record.taxon_rank}, {number})"


def _echo_failures(n_failed: int, n_photos: int, out: Path) -> None:
    """The one line that says how many photos could not be read, and where they are listed."""
    if n_failed:
        click.echo(f"{n_failed} of {n_photos} photos failed, see {out / 'failures.csv'}",
                   err=True)


def _optional(*, plot_metadata: Path | None, outlier_check: bool) -> dict:
    """The plot-report settings that were given (the library's defaults otherwise)."""
    return {**({"plot_metadata": plot_metadata} if plot_metadata is not None else {}),
            **({"outlier_check": False} if not outlier_check else {})}


@main.command("plot-report")
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="A model bundle folder, or a PlantCLEF 2024 checkpoint file "
                   "(model_best.pth.tar; then also --class-mapping and --species-table).")
@click.argument("plots", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Report folder.")
@click.option("--settings", "settings_file", type=click.Path(path_type=Path), default=None,
              help="plot_settings.json written by `taxoclass calibrate-plots`: grids, overlap, "
                   "rule, the rule's thresholds and tile settings (and the learned rule) come "
                   "from it. --grid, --overlap, --rule, --threshold, --top-k, "
                   "--min-tile-prob and --min-tiles given on the command line override it.")
@click.option("--grid", "grids", multiple=True,
              help="Tile grid, e.g. 4 or 2x3; repeat for several scales at once "
                   "(at most 2500 tiles per photo in all; a photo whose tiles would be under "
                   "8 px is listed in failures.csv) [default: 3, or the --settings file's "
                   "grids].")
@click.option("--overlap", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Fraction of a tile shared with its neighbour [default: 0, or the "
                   "--settings file's].")
@click.option("--rule", type=click.Choice(["max", "noisy_or", "mean", "argmax_union",
                                           "learned"]),
              default=None,
              help="How tile probabilities become plot-level finds (argmax_union = the "
                   "PlantCLEF 2024 third-place baseline; learned = the logistic regression "
                   "fitted by calibrate-plots, only with --settings) [default: max, or the "
                   "--settings file's chosen rule].")
@click.option("--threshold", "thresholds", multiple=True, metavar="RANK=P",
              help="Per-rank threshold for the rule, e.g. --threshold species=0.4 (other "
                   "ranks keep the --settings file's calibrated value for the rule, else "
                   "the rule's default).")
@click.option("--top-k", "top_k", type=click.IntRange(min=0), default=None,
              help="Each tile keeps only its K most probable classes, so many small "
                   "probabilities cannot add up under noisy_or/mean; 0: every class "
                   "[default: every class, or the --settings file's value for the rule].")
@click.option("--min-tile-prob", type=click.FloatRange(0.0, 1.0), default=None,
              help="Tiles whose best species probability is below this give no evidence "
                   "[default: 0, or the --settings file's value for the rule].")
@click.option("--min-tiles", type=click.IntRange(min=1), default=None,
              help="Tiles that must support a find [default: 1, or the --settings file's "
                   "value for the rule].")
@click.option("--checklist", type=click.Path(path_type=Path), default=None,
              help="Text file of taxa expected in the region (one name per line, any rank).")
@checkpoint_model_options
@click.option("--plantclef-year", type=click.Choice(["2024", "2025"]), default="2024",
              show_default=True, help="Submission file format.")
@click.option("--plot-metadata", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="CSV of date and place per plot: plot_id (the photo's file name without "
                   "suffix), eventDate, decimalLatitude, decimalLongitude, locality, country, "
                   "countryCode, other Darwin Core terms (recordedBy, habitat...). Without "
                   "it, or where it is empty, the photo's EXIF date/GPS and a date in the file "
                   "name (…-20230705.jpg) are used.")
@click.option("--outlier-check/--no-outlier-check", default=True, show_default=True,
              help="Back every tile off as predict does (an outlier tile counts at the genus "
                   "or family its evidence supports; unknown only when no rank passes). "
                   "--no-outlier-check: every tile counts at every rank, none is unknown.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@engine_options
@device_option
def plot_report_cmd(model: Path, plots: tuple[Path, ...], out: Path, settings_file: Path | None,
                    grids: tuple[str, ...], overlap: float | None, rule: str | None,
                    thresholds: tuple[str, ...], top_k: int | None,
                    min_tile_prob: float | None, min_tiles: int | None,
                    checklist: Path | None, class_mapping: Path | None,
                    species_table: Path | None, backbone: str, model_kwargs: str | None,
                    plantclef_year: str, plot_metadata: Path | None, outlier_check: bool,
                    batch_size: int, engine: str,
                    master: str | None, device: str) -> None:
    """Rank-aware reports for plot (quadrat) photos: tiles → taxa at the rank the
    evidence supports. Writes plot_records.csv/.json, report.html (photos with tile grid
    and taxa), plantclef_submission.csv (species ids; a model without ids:
    plantclef_submission_names.csv), occurrences_dwca.zip (Darwin Core Archive) and
    occurrences_dwc.csv, failures.csv, provenance.
    """
    from ..pipelines.plots import plot_report_job

    with progress_bar("plots", "plot") as prog:
        result = plot_report_job(
            model, plots, out, class_mapping=class_mapping, species_table=species_table,
            backbone=backbone, model_kwargs=json_option("--model-kwargs", model_kwargs),
            checklist=checklist, batch_size=batch_size, progress=prog,
            grids=list(grids) or None, overlap=overlap, rule=rule,
            thresholds=parse_thresholds(thresholds), settings=settings_file, top_k=top_k,
            min_tile_prob=min_tile_prob, min_tiles=min_tiles,
            plantclef_year=int(plantclef_year), device=device, engine=engine, master=master,
            **_optional(plot_metadata=plot_metadata, outlier_check=outlier_check))
    for plot_id, records in result.records.items():
        finds = ", ".join(_find(r) for r in records)
        click.echo(f"{plot_id}: {finds or 'nothing above threshold'}")
    _echo_failures(len(result.failures), result.n_plots + len(result.failures), out)
    click.echo(f"report: {out / 'report.html'}")


@main.command("calibrate-plots")
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="A model bundle folder, or a PlantCLEF 2024 checkpoint file "
                   "(model_best.pth.tar; then also --class-mapping and --species-table).")
@click.option("--truth", type=click.Path(path_type=Path), required=True,
              help="CSV with plot_id (the photo's file stem) and species (one row per "
                   "species, or ';'-separated); every photo needs rows.")
@click.argument("plots", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for plot_settings.json, plot_calibration.csv, failures.csv.")
@click.option("--grid", "grids", multiple=True,
              help="Tile grid, e.g. 4 or 2x3; repeat for several scales at once "
                   "(at most 2500 tiles per photo in all) [default: 2 and 4].")
@click.option("--overlap", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True,
              help="Fraction of a tile shared with its neighbour.")
@checkpoint_model_options
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@device_option
def calibrate_plots_cmd(model: Path, truth: Path, plots: tuple[Path, ...], out: Path,
                        grids: tuple[str, ...], overlap: float, class_mapping: Path | None,
                        species_table: Path | None, backbone: str, model_kwargs: str | None,
                        batch_size: int, device: str) -> None:
    """Choose plot-report settings on plot photos (PLOTS: files or folders) whose species
    are known: thresholds per rank and tile settings (top-k, tile gate, supporting tiles)
    for each rule, scored on these plots, and a learned rule (logistic regression on tile
    statistics) scored out-of-fold; the rule with the best species macro F1 per plot is
    chosen.
    Use the result with `taxoclass plot-report --settings OUT/plot_settings.json`.
    """
    from ..pipelines.plots import calibrate_plots_job

    with progress_bar("plots", "plot") as prog:
        result = calibrate_plots_job(
            model, plots, truth, out, grids=list(grids) or None, overlap=overlap,
            class_mapping=class_mapping, species_table=species_table, backbone=backbone,
            model_kwargs=json_option("--model-kwargs", model_kwargs), batch_size=batch_size,
            progress=prog, device=device)
    settings = result.settings
    with wide_pandas():
        click.echo(f"calibration on {settings.provenance['n_calibration_plots']} plots "
                   "(macro F1 per plot, measured as 'evaluation' says; thresholds per "
                   "rank; tile settings):")
        click.echo(settings.table().to_string(index=False))
    th = ", ".join(f"{k}={v:g}" for k, v in settings.thresholds.items())
    tiles = settings.tiles
    click.echo(f"chosen rule: {settings.rule} ({th}; top_k={tiles.top_k or 'all'}, "
               f"min_tile_prob={tiles.min_tile_prob:g}, min_tiles={tiles.min_tiles}); "
               f"grids {', '.join(settings.grids)}, overlap {settings.overlap:g}")
    n_plots = settings.provenance["n_calibration_plots"]
    _echo_failures(len(result.failures), n_plots + len(result.failures), out)
    click.echo(f"wrote {result.files['settings']}")


@main.command("evaluate-plots")
@click.option("--records", type=click.Path(path_type=Path), required=True,
              help="plot_records.csv written by plot-report.")
@click.option("--truth", type=click.Path(path_type=Path), required=True,
              help="CSV with plot_id and species (one row per species, or ';'-separated; "
                   "a 'taxon' column instead may name taxa at any rank, e.g. a family).")
@click.option("--taxonomy", "taxonomy_source", type=click.Path(path_type=Path), required=True,
              help="The model bundle folder, an annotations JSON or a species table.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for plot_metrics.json and plot_metrics_per_plot.csv.")
def evaluate_plots_cmd(records: Path, truth: Path, taxonomy_source: Path,
                       out: Path | None) -> None:
    """PlantCLEF macro F1 averaged per plot, macro F1 per species, micro F1, and the same
    with rank-aware credit (a correct genus-level record counts at genus rank).
    """
    from ..pipelines.plots import evaluate_plots_job

    result = evaluate_plots_job(records, truth, taxonomy_source, out=out)
    click.echo(f"{'rank':>10} {'F1/plot':>8} {'F1/taxon':>9} {'micro F1':>9} {'plots':>6}")
    for rank, m in result.items():
        click.echo(f"{rank:>10} {m['macro_f1_per_plot']:>8.3f} {m['macro_f1_per_taxon']:>9.3f} "
                   f"{m['micro_f1']:>9.3f} {m['n_plots']:>6}")
