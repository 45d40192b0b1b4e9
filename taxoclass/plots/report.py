"""Plot reports: tile every plot photo, classify the tiles, aggregate, write every output.

:func:`plot_report` is the one job the CLI calls. Files written into ``out_dir``::

    plot_records.csv         one row per find: plot_id, taxon_rank, taxon, score, n_tiles, reason
    plot_records.json        the same per plot, with settings (data_schemas/plot_report.schema.json)
    report.html              self-contained: photos with the tile grid coloured by taxon
    plantclef_submission.csv PlantCLEF run file (2024: ``plot_id;species_ids``, 2025:
                             ``quadrat_id,species_ids``) with ids like ``[1361281, 1395807]``;
                             only for a model whose ranks end at species
    occurrences_dwc.csv      Darwin Core occurrences (one per taxon record; taxonRank is the
                             answer's rank, higher-taxon columns those of the rank list)
    failures.csv             photos that could not be read (photo, error)
    provenance.json          version, command, classifier, settings
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from .._version import __version__
from ..errors import ConfigError
from ..io.files import (
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    check_output_folder,
    output_folder,
)
from ..io.provenance import write_provenance
from ..vocab import CHECKLIST_SUFFIX, UNKNOWN
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
    "failures": "failures.csv",
}
#: Entries of a previous report folder a rerun keeps: the Spark engine's resumable tile rows.
RESUME_STATE = ("plot_tiles.parquet", "manifest.json")
RECORD_COLUMNS = ["plot_id", "taxon_rank", "taxon", "score", "n_tiles", "reason"]
#: Darwin Core occurrence columns; the higher-taxon terms of :data:`DWC_HIGHER_TAXA` that
#: the model's rank list has go after ``identificationQualifier`` (in Darwin Core order).
DWC_COLUMNS = ["occurrenceID", "eventID", "scientificName", "taxonRank",
               "identificationQualifier", "basisOfRecord", "identifiedBy",
               "identificationRemarks", "associatedMedia"]
#: Darwin Core terms for taxa above species, top down. A rank of the model named like one
#: of them gets that column, filled from each record's path.
DWC_HIGHER_TAXA = ("kingdom", "phylum", "class", "order", "superfamily", "family",
                   "subfamily", "tribe", "subtribe", "genus", "subgenus")


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
    frame["score"] = frame["score"].astype(float).round(6)
    return frame


def _format_ids(ids: Sequence[str]) -> str:
    return "[" + ", ".join(ids) + "]"


def has_species_rank(taxonomy) -> bool:
    """Whether the rank list ends at species (what a PlantCLEF submission lists)."""
    return str(taxonomy.ranks[-1]).lower() == "species"


def plantclef_submission_frame(records: Mapping[str, Sequence[PlotRecord]], taxonomy, *,
                               taxon_ids: Mapping[tuple[str, ...], str] | None = None,
                               year: int = 2024) -> pd.DataFrame:
    """PlantCLEF run: one row per plot, species records only (the task scores species).

    Species ids come from ``taxon_ids`` (the PlantCLEF classifier knows them); a model
    without ids writes species names instead. 2024: columns ``plot_id``/``species_ids``
    (written ``;``-separated); 2025: ``quadrat_id``/``species_ids`` (comma-separated).
    """
    if year not in (2024, 2025):
        raise ConfigError(f"PlantCLEF submission year must be 2024 or 2025, got {year}.")
    if not has_species_rank(taxonomy):
        raise ConfigError(f"A PlantCLEF submission lists species ids, but the model's ranks "
                          f"{tuple(taxonomy.ranks)} end at {taxonomy.ranks[-1]!r}, not "
                          "species. Fix: use plot_records.csv or occurrences_dwc.csv.")
    lowest = taxonomy.ranks[-1]
    ids = dict(taxon_ids or {})
    rows = []
    for plot_id, recs in records.items():
        out: list[str] = []
        for r in recs:
            if r.taxon_rank != lowest:
                continue
            out.extend(ids[r.node].split(",") if r.node in ids else [r.taxon])
        rows.append({"plot_id" if year == 2024 else "quadrat_id": plot_id,
                     "species_ids": _format_ids(list(dict.fromkeys(out)))})
    return pd.DataFrame(rows, columns=["plot_id" if year == 2024 else "quadrat_id",
                                       "species_ids"])


def dwc_columns(ranks: Sequence[str]) -> list[str]:
    """The Darwin Core columns for a rank list: the higher-taxon terms it has, in place."""
    have = {str(r).lower() for r in ranks}
    higher = [t for t in DWC_HIGHER_TAXA if t in have]
    at = DWC_COLUMNS.index("identificationQualifier") + 1
    return [*DWC_COLUMNS[:at], *higher, *DWC_COLUMNS[at:]]


def darwin_core_frame(records: Mapping[str, Sequence[PlotRecord]], taxonomy, *,
                      photos: Mapping[str, str], identified_by: str) -> pd.DataFrame:
    """Darwin Core occurrences: one per taxon record (unknown tiles are not occurrences).

    ``scientificName`` is the taxon at the rank of the answer and ``taxonRank`` that rank
    (any rank of the model, lower case: ``order``, ``family``, ``species``); the
    higher-taxon terms the rank list has (``kingdom``, ``order``, ``family``, ``genus``,
    …, :data:`DWC_HIGHER_TAXA`) come from the record's path, empty below the answer.
    """
    rows = []
    ranks = taxonomy.ranks
    columns = dwc_columns(ranks)
    for plot_id, recs in records.items():
        for i, r in enumerate(recs):
            if r.taxon_rank == UNKNOWN or not r.node:
                continue
            path = {str(k).lower(): v for k, v in zip(ranks, r.node)}
            row = {
                "occurrenceID": f"{plot_id}:{i + 1}",
                "eventID": plot_id,
                "scientificName": r.node[-1],
                "taxonRank": str(r.taxon_rank).lower(),
                # "sp.": the taxonomy labels this answer above the lowest rank "<name> sp."
                "identificationQualifier": "sp." if r.taxon.endswith(" sp.") else "",
                "basisOfRecord": "MachineObservation",
                "identifiedBy": identified_by,
                "identificationRemarks": f"score={r.score:.4f}; n_tiles={r.n_tiles}; "
                                         f"reason={r.reason}",
                "associatedMedia": photos.get(plot_id, ""),
            }
            row.update({t: path.get(t, "") for t in DWC_HIGHER_TAXA if t in columns})
            rows.append(row)
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------- HTML
def _palette(labels: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    out: dict[str, tuple[int, int, int]] = {}
    for i, lab in enumerate(dict.fromkeys(x for x in labels if x and x != UNKNOWN)):
        r, g, b, _ = cmap(i % 20)
        out[lab] = (int(r * 255), int(g * 255), int(b * 255))
    out[UNKNOWN] = (20, 20, 20)
    return out


def _draw_tiles(plot: PlotResult, colours: Mapping[str, tuple[int, int, int]]) -> Image.Image:
    """Thumbnail with the finest grid's tiles filled by the colour of the taxon they support."""
    thumb = plot.thumbnail.convert("RGBA")
    sx, sy = thumb.width / plot.size[0], thumb.height / plot.size[1]
    scales = [t.scale for t in plot.tiles]
    finest = max(dict.fromkeys(scales), key=lambda s: scales.count(s)) if scales else None
    layer = Image.new("RGBA", thumb.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for tile, label in zip(plot.tiles, plot.tile_labels):
        if tile.scale != finest:
            continue
        x0, y0, x1, y1 = tile.box
        box = (x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1)
        if label == UNKNOWN:
            draw.rectangle(box, fill=(0, 0, 0, 110), outline=(230, 30, 30, 255), width=3)
            draw.line((box[0], box[1], box[2], box[3]), fill=(230, 30, 30, 255), width=3)
            draw.line((box[0], box[3], box[2], box[1]), fill=(230, 30, 30, 255), width=3)
        elif label:
            draw.rectangle(box, fill=(*colours[label], 90), outline=(*colours[label], 255),
                           width=3)
        else:
            draw.rectangle(box, outline=(200, 200, 200, 200), width=1)
    return Image.alpha_composite(thumb, layer).convert("RGB")


def _b64_jpeg(img: Image.Image, quality: int = 80) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(plots: Sequence[PlotResult], failures: Sequence[Mapping[str, str]], *,
                taxonomy, title: str, settings: Mapping[str, Any]) -> str:
    """A self-contained HTML page (images inline as base64 JPEG, no external files)."""
    esc = html.escape
    colours = _palette([lab for p in plots for lab in p.tile_labels]
                       + [r.taxon for p in plots for r in p.records])
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>",
        "body{font-family:sans-serif;margin:1.5em;color:#222}"
        ".plot{display:flex;gap:1.5em;margin-bottom:2em;border-top:1px solid #ccc;"
        "padding-top:1em}.sw{display:inline-block;width:1em;height:1em;margin-right:.4em;"
        "vertical-align:middle;border:1px solid #555}table{border-collapse:collapse}"
        "td,th{padding:.15em .6em;text-align:left}th{background:#eee}.fail{color:#a00}",
        "</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<p>" + "; ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in settings.items()) + "</p>",
        "<p>Tiles of the finest grid are coloured by the reported taxon they support; tiles "
        "crossed in red were flagged unknown (outliers); grey outlines support no reported "
        "taxon.</p>",
    ]
    for p in plots:
        img = _b64_jpeg(_draw_tiles(p, colours))
        parts.append(f"<div class='plot' id='{esc(p.plot_id)}'><div>"
                     f"<h2>{esc(p.plot_id)}</h2><img alt='{esc(p.plot_id)}' "
                     f"src='data:image/jpeg;base64,{img}'><br><small>{esc(str(p.photo))} "
                     f"({p.size[0]}×{p.size[1]} px, {len(p.tiles)} tiles)</small></div><div>")
        legend = [lab for lab in dict.fromkeys(p.tile_labels) if lab]
        parts.append("<h3>Legend</h3><ul style='list-style:none;padding:0'>")
        for lab in legend:
            n = p.tile_labels.count(lab)
            parts.append(f"<li><span class='sw' style='background:rgb{colours[lab]}'></span>"
                         f"{esc(lab)} ({n} tile{'s' if n != 1 else ''})</li>")
        parts.append("</ul><h3>Taxa by rank</h3>")
        order = [*reversed(taxonomy.ranks), UNKNOWN]
        parts.append("<table><tr><th>rank</th><th>taxon</th><th>score</th><th>tiles</th>"
                     "<th>reason</th></tr>")
        for rank in order:
            for r in (x for x in p.records if x.taxon_rank == rank):
                sw = (f"<span class='sw' style='background:rgb{colours[r.taxon]}'></span>"
                      if r.taxon in colours else "")
                parts.append(f"<tr><td>{esc(rank)}</td><td>{sw}<i>{esc(r.taxon)}</i></td>"
                             f"<td>{r.score:.3f}</td><td>{r.n_tiles}</td>"
                             f"<td>{esc(r.reason)}</td></tr>")
        if not p.records:
            parts.append("<tr><td colspan='5'>nothing passed the thresholds</td></tr>")
        parts.append("</table></div></div>")
    if failures:
        parts.append("<h2 class='fail'>Photos that could not be read</h2><ul>")
        parts.extend(f"<li class='fail'>{esc(f['photo'])}: {esc(f['error'])}</li>"
                     for f in failures)
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------- the job
def _aggregate(pt: PlotTiles, taxonomy, *, rule: str, thresholds: Mapping[str, float],
               learned: LearnedPlotRule | None, checklist: Sequence[str] | None,
               outside_weight: float, weights_by_scale: Mapping[str, float],
               min_tiles: int, top_k: int | None, min_tile_prob: float,
               thumbnail_px: int) -> PlotResult:
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
    thumb = pt.image.copy()
    thumb.thumbnail((thumbnail_px, thumbnail_px))
    pt.image = None
    return PlotResult(pt.plot_id, Path(pt.photo), pt.size, pt.tiles, recs, labels, thumb,
                      int(flags.sum()))


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
                   plantclef_year: int) -> dict[str, Path]:
    """Every report file but the provenance (see the module docstring)."""
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
    atomic_write_json(files["json"], {
        "taxoclass_version": __version__,
        "classifier": {"kind": str(describe.get("kind", type(classifier).__name__)),
                       "backbone": backbone},
        "settings": dict(used), "plots": plot_json, "failures": failures})
    if "plantclef" in files:  # species ids: only a model whose ranks end at species
        sub = plantclef_submission_frame(records, taxonomy, taxon_ids=taxon_ids,
                                         year=plantclef_year)
        atomic_write_text(files["plantclef"],
                          sub.to_csv(index=False, sep=";" if plantclef_year == 2024 else ","))
    atomic_write_csv(files["dwc"], darwin_core_frame(
        records, taxonomy, photos={p.plot_id: str(p.photo) for p in plots},
        identified_by=f"taxoclass {__version__} ({backbone})"))
    atomic_write_csv(files["failures"], pd.DataFrame(failures, columns=["photo", "error"]))
    atomic_write_text(files["html"], render_html(
        plots, failures, taxonomy=taxonomy, title=f"taxoclass plot report ({len(plots)} plots)",
        settings=_html_settings(used, backbone)))
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
                overwrite: bool = True, progress: Progress | None = None) -> PlotReportResult:
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
    on. ``progress(done, total)`` is called after each plot.
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
                               plantclef_year=plantclef_year)
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
                                thumbnail_px=thumbnail_px))
    return plots, failures
