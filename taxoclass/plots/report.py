"""Plot reports: tile every plot photo, classify the tiles, aggregate, write every output.

:func:`plot_report` is the one job the CLI calls. Files written into ``out_dir``::

    plot_records.csv         one row per find: plot_id, taxon_rank, taxon, confidence, score,
                             n_tiles, reason, rule, tile_share
    plot_records.json        the same per plot, with the output header and settings
                             (data_schemas/plot_report.schema.json)
    report.html              self-contained survey report (plots.html): overview matrix,
                             richness chart, legend, links, per-plot photo + tile grid
    tiles.csv                one row per tile: box, top-3 per rank, answer, reason
    plantclef_submission.csv PlantCLEF run file (2024: ``plot_id;species_ids``, 2025:
                             ``quadrat_id,species_ids``) with ids like ``[1361281, 1395807]``;
                             only for a model whose ranks end at species and that has
                             PlantCLEF species ids; a model without ids writes the rows
                             with names as plantclef_submission_names.csv (plots.plantclef)
    occurrences_dwca.zip     Darwin Core Archive: occurrence.txt + meta.xml + eml.xml
                             (plots.dwc; date and place from plots.metadata)
    occurrences_dwc.csv      the same occurrences as a CSV (one per taxon record; taxonRank
                             is the answer's rank, higher-taxon columns those of the rank list)
    failures.csv             photos that could not be read (photo, error)
    provenance.json          version, command, classifier, settings
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

from .._version import __version__
from ..errors import ConfigError
from ..io.files import (
    atomic_write_csv,
    atomic_write_text,
    check_output_folder,
    output_folder,
)
from ..io.provenance import model_id_for, write_json_output, write_provenance
from ..vocab import CHECKLIST_SUFFIX, UNKNOWN
from .dwc import darwin_core_frame, dwc_columns, identified_by, write_dwc_archive
from .html import render_html, tiles_frame, top_candidates
from .metadata import plot_metadata as metadata_of
from .metadata import read_plot_metadata
from .plantclef import has_species_rank, plantclef_submission_frame, write_submission
from .rules import PlotRecord, aggregate_plot, apply_checklist, resolve_thresholds
from .rules import tile_assignments as _tile_assignments
from .settings import PlotSettings, resolve_report_settings
from .tiling import (
    PhotoFailure,
    PlotTiles,
    Tile,
    backbone_name,
    classify_photos,
    mask_below,
    parse_grid,
    tile_ranks,
)

if TYPE_CHECKING:
    from .learned import LearnedPlotRule

__all__ = [
    "OUTPUT_FILES",
    "PlotReportResult",
    "darwin_core_frame",
    "dwc_columns",
    "plantclef_submission_frame",
    "plot_report",
    "records_frame",
    "render_html",
]

Progress = Callable[[int, int], None]
UnknownFlagger = Callable[[Any], np.ndarray]

OUTPUT_FILES = {
    "csv": "plot_records.csv",
    "json": "plot_records.json",
    "html": "report.html",
    "plantclef": "plantclef_submission.csv",
    "dwc": "occurrences_dwc.csv",
    "dwca": "occurrences_dwca.zip",
    "failures": "failures.csv",
    "tiles": "tiles.csv",
}
#: Entries of a previous report folder a rerun keeps: the Spark engine's resumable tile rows.
RESUME_STATE = ("plot_tiles.parquet", "manifest.json")
RECORD_COLUMNS = ["plot_id", "taxon_rank", "taxon", "confidence", "score", "n_tiles", "reason",
                  "rule", "tile_share"]


@dataclass
class PlotResult:
    """Everything known about one plot after aggregation (what the HTML draws)."""

    plot_id: str
    photo: Path
    size: tuple[int, int]
    tiles: list[Tile]
    records: list[PlotRecord]
    tile_labels: list[str]
    thumbnail: Image.Image
    n_unknown: int = 0
    #: rank -> (class indices, probabilities) of each tile's top-3 (``html.top_candidates``)
    top: dict[str, tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)
    #: date and place (a ``plots.metadata.PlotMetadata`` or a Darwin Core term mapping)
    metadata: Any = None


@dataclass
class PlotReportResult:
    """What :func:`plot_report` did: records per plot, failures, and the files written."""

    out_dir: Path
    records: dict[str, list[PlotRecord]]
    failures: list[dict[str, str]]
    files: dict[str, Path]
    plots: list[PlotResult] = field(default_factory=list, repr=False)

    @property
    def n_plots(self) -> int:
        return len(self.records)


# ---------------------------------------------------------------------- frames
def records_frame(records: Mapping[str, Sequence[PlotRecord]]) -> pd.DataFrame:
    """One row per record, columns :data:`RECORD_COLUMNS`."""
    rows = [{c: getattr(r, c) for c in RECORD_COLUMNS} for recs in records.values() for r in recs]
    frame = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    for col in ("score", "confidence"):
        frame[col] = frame[col].astype(float).round(6)
    return frame


def record_confidence(records: Sequence[PlotRecord], probs: Mapping[str, np.ndarray],
                      taxonomy, tile_rank: np.ndarray, unknown: np.ndarray,
                      calibration: Any = None) -> None:
    """Set each record's ``confidence``: the highest calibrated confidence among the tiles
    that count at the record's rank (not unknown, answered at that rank or below): the
    tile's probability of the taxon (``probs``: the classifier's own, per rank) through
    ``calibration`` (the bundle's per-rank map that ``predict``'s ``confidence`` uses;
    None: the raw probability). The unknown record keeps NaN."""
    ranks = [str(r) for r in taxonomy.ranks]
    depth = np.array([ranks.index(str(r)) if str(r) in ranks else -1 for r in tile_rank])
    counted = ~np.asarray(unknown, dtype=bool)
    for rec in records:
        if rec.taxon_rank not in ranks or not rec.node:
            continue
        rows = counted & (depth >= ranks.index(rec.taxon_rank))
        if not rows.any():
            continue
        p = np.asarray(probs[rec.taxon_rank])[rows, taxonomy.index(tuple(rec.node))]
        conf = p if calibration is None else calibration.calibrate(rec.taxon_rank, p)
        rec.confidence = float(np.clip(np.max(conf), 0.0, 1.0))


# ---------------------------------------------------------------------- the job
def _aggregate(pt: PlotTiles, taxonomy, *, rule: str, thresholds: Mapping[str, float],
               learned: LearnedPlotRule | None, checklist: Sequence[str] | None,
               outside_weight: float, weights_by_scale: Mapping[str, float],
               min_tiles: int, top_k: int | None, min_tile_prob: float,
               thumbnail_px: int, calibration: Any = None) -> PlotResult:
    """One classified photo's records, tile labels and thumbnail (the image is let go).

    Each tile counts at the rank of its back-off answer and above (``pt.probs`` are 0
    below it, :func:`~taxoclass.plots.tiling.mask_below`); only tiles where no rank
    passes (``pt.unknown``) go to the unknown record.
    """
    probs, flags = pt.probs, pt.unknown
    tile_rank = pt.ranks if pt.ranks is not None else tile_ranks(flags, len(flags),
                                                                   taxonomy.ranks)
    if checklist:  # re-weight the classifier's own probabilities, then back off again
        raw = pt.decoded.probs if pt.decoded is not None else probs
        probs, off_list = apply_checklist(raw, taxonomy, checklist,
                                          outside_weight=outside_weight)
        probs = mask_below(probs, tile_rank, taxonomy.ranks)
        flags = flags | off_list
    weights = np.array([weights_by_scale.get(t.scale, 1.0) for t in pt.tiles])
    scores = (None if learned is None else
              learned.scores(probs, pt.scales, unknown=flags | (weights <= 0)))
    recs = aggregate_plot(probs, taxonomy, plot_id=pt.plot_id, rule=rule, thresholds=thresholds,
                          unknown=flags, weights=weights, min_tiles=min_tiles, top_k=top_k,
                          min_tile_prob=min_tile_prob, scores=scores)
    if checklist:  # applied here, not by aggregate_plot: the rule column says so
        for r in recs:
            r.rule += CHECKLIST_SUFFIX
    labels = _tile_labels(recs, probs, taxonomy, tile_rank, flags)
    record_confidence(recs, pt.decoded.probs if pt.decoded is not None else probs, taxonomy,
                      tile_rank, flags, calibration)
    thumb = pt.image.copy()
    thumb.thumbnail((thumbnail_px, thumbnail_px))
    pt.image = None
    return PlotResult(pt.plot_id, Path(pt.photo), pt.size, pt.tiles, recs, labels, thumb,
                      int(flags.sum()),  # top-3: the classifier's own, not the masked ones
                      top=top_candidates(pt.decoded.probs if pt.decoded is not None else probs))


def _tile_labels(records: Sequence[PlotRecord], probs: Mapping[str, np.ndarray], taxonomy,
                 tile_rank: np.ndarray, unknown: np.ndarray) -> list[str]:
    """Per tile, the reported taxon it supports (:func:`~taxoclass.plots.rules.tile_assignments`),
    looked for from the tile's own answer rank up: a tile backed off to genus supports its
    genus or family record, never a species."""
    ranks = list(taxonomy.ranks)
    labels = ["" for _ in range(len(unknown))]
    for depth, rank in enumerate(ranks):
        rows = np.flatnonzero(tile_rank == rank)
        if not len(rows):
            continue
        sub = {r: np.asarray(probs[r])[rows] for r in ranks[:depth + 1]}
        sub_tax = taxonomy if depth == len(ranks) - 1 else _TopRanks(taxonomy, ranks[:depth + 1])
        for i, label in zip(rows, _tile_assignments(records, sub, sub_tax,
                                                    unknown=np.asarray(unknown)[rows])):
            labels[i] = label
    return [UNKNOWN if u else lab for u, lab in zip(unknown, labels)]


class _TopRanks:
    """A taxonomy seen down to one of its ranks (what a backed-off tile can support)."""

    def __init__(self, taxonomy, ranks: Sequence[str]) -> None:
        self._taxonomy, self.ranks = taxonomy, list(ranks)

    def __getattr__(self, name: str):
        return getattr(self._taxonomy, name)


def _scale_weights(scale_weights: Mapping[str, float] | None,
                   grids: Sequence[str]) -> dict[str, float]:
    """Grid label -> tile weight, checked against the grids used."""
    out = {}
    for g, w in (scale_weights or {}).items():
        r, c = parse_grid(g)
        if float(w) < 0:
            raise ConfigError(f"scale_weights[{g!r}] = {w}: tile weights must be >= 0.")
        out[f"{r}x{c}"] = float(w)
    unused = sorted(set(out) - set(grids))
    if unused:
        raise ConfigError(f"scale_weights names grid(s) {unused} that are not among the grids "
                          f"{list(grids)}.")
    return out


def _check_output_folder(out_dir: str | Path, overwrite: bool) -> Path:
    """``out_dir`` usable as the report folder (checked before any photo is read)."""
    out = check_output_folder(out_dir)
    if not overwrite and (out / OUTPUT_FILES["json"]).exists():
        raise ConfigError(f"{out / OUTPUT_FILES['json']} exists; pass overwrite=True or "
                          "another output folder.")
    return out


def _html_settings(used: Mapping[str, Any], backbone: str) -> dict[str, Any]:
    """The settings line of the HTML page (tile settings only where set)."""
    return {"rule": used["rule"], "grids": ", ".join(used["grids"]), "overlap": used["overlap"],
            "backbone": backbone, **{f"threshold {k}": v for k, v in used["thresholds"].items()},
            **({"top_k": used["top_k"]} if used["top_k"] is not None else {}),
            **({"min_tile_prob": used["min_tile_prob"]} if used["min_tile_prob"] > 0 else {}),
            **({"min_tiles": used["min_tiles"]} if used["min_tiles"] != 1 else {}),
            **({"settings file": used["settings_file"]} if used["settings_file"] else {})}


def _write_outputs(out: Path, classifier: Any, plots: Sequence[PlotResult],
                   failures: list[dict[str, str]], used: Mapping[str, Any], taxonomy, *,
                   plantclef_year: int,
                   metadata: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Every report file but the provenance (see the module docstring); ``metadata``:
    plot id -> date and place (shown on the page)."""
    describe = classifier.describe()
    backbone = backbone_name(classifier)
    taxon_ids = classifier.taxon_ids() if hasattr(classifier, "taxon_ids") else {}
    records = {p.plot_id: p.records for p in plots}
    plot_json = [{"plot_id": p.plot_id, "photo": str(p.photo), "width": p.size[0],
                  "height": p.size[1], "n_tiles": len(p.tiles), "n_unknown_tiles": p.n_unknown,
                  "records": [{**r.to_dict(), "taxon_id": taxon_ids.get(tuple(r.node))}
                              for r in p.records]} for p in plots]
    files = {k: out / v for k, v in OUTPUT_FILES.items()
             if k != "plantclef" or has_species_rank(taxonomy)}
    atomic_write_csv(files["csv"], records_frame(records))
    write_json_output(files["json"], {
        "taxoclass_version": __version__,
        "classifier": {"kind": str(describe.get("kind", type(classifier).__name__)),
                       "backbone": backbone},
        "settings": dict(used), "plots": plot_json, "failures": failures},
        model_id=model_id_for(classifier))
    files.pop("plantclef", None)  # ids, or a names file under another name (plantclef.py)
    submission = write_submission(out, records, taxonomy, taxon_ids=taxon_ids,
                                  year=plantclef_year)
    if submission is not None:
        files["plantclef"] = submission
    who = identified_by(classifier)
    occurrences = darwin_core_frame(records, taxonomy, photos={p.plot_id: p.photo for p in plots},
                                    identified_by=who, metadata=metadata)
    atomic_write_csv(files["dwc"], occurrences)  # the same table as the archive's occurrence.txt
    write_dwc_archive(files["dwca"], occurrences, identified_by=who, n_plots=len(plots),
                      title=f"taxoclass plot report: {len(plots)} plots")
    atomic_write_csv(files["failures"], pd.DataFrame(failures, columns=["photo", "error"]))
    atomic_write_csv(files["tiles"], tiles_frame(plots, taxonomy))
    for p in plots:  # date and place for the page, where known
        if metadata and p.plot_id in metadata:
            p.metadata = metadata[p.plot_id]
    # every file of the folder, the provenance written after this one included
    links = {**{k: v.name for k, v in files.items() if k != "html"},
             "provenance": "provenance.json", "config": "config.yaml"}
    atomic_write_text(files["html"], render_html(
        plots, failures, taxonomy=taxonomy, title=f"taxoclass plot report ({len(plots)} plots)",
        settings=_html_settings(used, backbone), files=links))
    return files


def plot_report(classifier: Any, photos: Sequence[str | Path], out_dir: str | Path, *,
                grids: Sequence[Any] | None = None, overlap: float | None = None,
                rule: str | None = None, thresholds: Mapping[str, float] | None = None,
                settings: PlotSettings | str | Path | None = None,
                checklist: Sequence[str] | None = None, outside_weight: float = 0.0,
                flag_unknown: UnknownFlagger | None = None, outlier_check: bool = True,
                min_tiles: int | None = None,
                top_k: int | None = None, min_tile_prob: float | None = None,
                scale_weights: Mapping[str, float] | None = None,
                plantclef_year: int = 2024, thumbnail_px: int = 640,
                overwrite: bool = True, progress: Progress | None = None,
                plot_metadata: str | Path | None = None) -> PlotReportResult:
    """Tile, classify, aggregate and report every plot photo; write all outputs into ``out_dir``.

    ``classifier``: a :class:`~taxoclass.plots.tiling.TileClassifier` (a trained bundle or the
    PlantCLEF checkpoint). ``grids``/``overlap``: see :func:`~taxoclass.plots.tiling.make_tiles`
    (default 3x3, no overlap). ``rule``/``thresholds``/``checklist``/``min_tiles``/
    ``top_k``/``min_tile_prob``: see :func:`~taxoclass.plots.rules.aggregate_plot` (default
    ``max``, every class, no tile gate, one supporting tile; ``top_k=0``: every class).
    ``settings``: a :class:`~taxoclass.plots.settings.PlotSettings` or its
    ``plot_settings.json`` (``taxoclass calibrate-plots``): grids, overlap, rule, and the
    rule's calibrated thresholds and tile settings (``top_k``, ``min_tile_prob``,
    ``min_tiles``) come from it, and any of them given explicitly here overrides it; rule
    ``"learned"`` needs it. The learned rule scores the non-flagged tiles of non-zero
    weight; ``top_k``/``min_tile_prob`` do not change its scores. ``scale_weights``:
    weight of each grid's tiles (``{"2x2": 0.5, "4x4": 1.0}``; grids not named weigh 1).
    ``flag_unknown(decoded)`` backs the tiles off (each tile's answer rank, ``"unknown"``
    where no rank passes; :meth:`~taxoclass.plots.tiling.BundleTileClassifier.back_off_tiles`,
    the back-off ``predict`` uses; bool flags mark unknown tiles): a tile counts at its
    answer's rank and above. ``outlier_check=False`` turns that off: every tile counts at
    every rank, none is unknown. A
    photo that cannot be read is recorded in ``failures.csv`` and the other plots carry
    on. ``progress(done, total)`` is called after each plot. ``plot_metadata``: a CSV of
    date and place per plot (:mod:`taxoclass.plots.metadata`; else EXIF / file-name dates).
    """
    resolved = resolve_report_settings(settings, grids=grids, overlap=overlap, rule=rule,
                                       thresholds=thresholds, top_k=top_k,
                                       min_tile_prob=min_tile_prob, min_tiles=min_tiles)
    taxonomy = classifier.taxonomy
    th = resolve_thresholds(resolved.rule, taxonomy.ranks, resolved.thresholds)
    weights_by_scale = _scale_weights(scale_weights, resolved.grids)
    if not 0.0 <= float(resolved.overlap) < 1.0:
        raise ConfigError(f"Tile overlap must be a fraction in [0, 1), got {resolved.overlap}.")
    out = _check_output_folder(out_dir, overwrite)
    table = read_plot_metadata(plot_metadata) if plot_metadata is not None else None
    paths = [Path(p) for p in photos]
    plots, failures = _classify_and_aggregate(
        classifier, paths, resolved, th, checklist=checklist, outside_weight=outside_weight,
        flag_unknown=flag_unknown if outlier_check else None,
        weights_by_scale=weights_by_scale,
        thumbnail_px=thumbnail_px, progress=progress)
    used = {"rule": resolved.rule, "thresholds": th, "grids": list(resolved.grids),
            "overlap": float(resolved.overlap),
            "checklist": list(checklist) if checklist else None,
            "min_tiles": resolved.min_tiles, "top_k": resolved.top_k,
            "min_tile_prob": float(resolved.min_tile_prob),
            "scale_weights": weights_by_scale or None, "settings_file": resolved.source,
            "overridden": resolved.overridden,
            "outlier_check": bool(outlier_check and flag_unknown is not None)}
    with output_folder(out, keep=RESUME_STATE) as stage:
        files = _write_outputs(stage, classifier, plots, failures, used, taxonomy,
                               plantclef_year=plantclef_year,
                               metadata=metadata_of({p.plot_id: p.photo for p in plots}, table))
        files["provenance"] = write_provenance(
            stage, backbone=classifier.describe(),
            config={**used, "photos": [str(p) for p in paths], "plantclef_year": plantclef_year,
                    "outside_weight": outside_weight},
            extra={"outputs": {k: v.name for k, v in files.items()}, "n_plots": len(plots),
                   "n_failures": len(failures)})
    files = {k: out / v.name for k, v in files.items()}
    records = {p.plot_id: p.records for p in plots}
    return PlotReportResult(out, records, failures, files, plots)


def _classify_and_aggregate(classifier: Any, paths: Sequence[Path], resolved: Any,
                            th: Mapping[str, float], *, checklist: Sequence[str] | None,
                            outside_weight: float, flag_unknown: UnknownFlagger | None,
                            weights_by_scale: Mapping[str, float], thumbnail_px: int,
                            progress: Progress | None
                            ) -> tuple[list[PlotResult], list[dict[str, str]]]:
    """Every readable photo's :class:`PlotResult`; a photo that cannot be read or tiled is
    a failure row (photo, error) and the others carry on."""
    taxonomy = classifier.taxonomy
    calibration = getattr(getattr(classifier, "bundle", None), "confidence", None)
    plots: list[PlotResult] = []
    failures: list[dict[str, str]] = []
    for item in classify_photos(classifier, paths, grids=resolved.grids,
                                overlap=resolved.overlap, flag_unknown=flag_unknown,
                                keep_image=True, progress=progress):
        if isinstance(item, PhotoFailure):
            failures.append(item.to_dict())
            continue
        plots.append(_aggregate(item, taxonomy, rule=resolved.rule, thresholds=th,
                                learned=resolved.learned, checklist=checklist,
                                outside_weight=outside_weight, weights_by_scale=weights_by_scale,
                                min_tiles=resolved.min_tiles, top_k=resolved.top_k,
                                min_tile_prob=resolved.min_tile_prob,
                                thumbnail_px=thumbnail_px, calibration=calibration))
    return plots, failures
