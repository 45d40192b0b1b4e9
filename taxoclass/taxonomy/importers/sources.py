"""Readers of labelled image sources that carry one label per image: a folder tree, a CSV
with one column per rank, and a Darwin Core export (iNaturalist, GBIF).

Each returns :class:`~.records.ImageRecord` s (absolute image paths, labels, group fields)
and the rank list; :func:`~.records.build_annotations` turns them into annotations.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from ...errors import AnnotationError
from ..tree import species_name
from .records import (
    GROUP_FIELDS,
    RANK_ORDER,
    ImageRecord,
    TaxonLookup,
    clean_label,
    rank_columns,
    read_csv_table,
)

log = logging.getLogger(__name__)

__all__ = ["IMAGE_COLUMNS", "read_darwin_core", "read_folder_tree", "read_image_table"]

#: Column names taken as the image path of a CSV (any case), in this order.
IMAGE_COLUMNS = ("file_name", "filename", "file", "image", "image_path", "path", "filepath",
                 "img")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def _image_suffixes() -> tuple[str, ...]:
    from ...io.images import IMAGE_SUFFIXES

    return IMAGE_SUFFIXES


# ---------------------------------------------------------------------- folder tree
def read_folder_tree(root: str | Path, *, ranks: Sequence[str] | None = None,
                     taxonomy: TaxonLookup | None = None
                     ) -> tuple[list[ImageRecord], list[str]]:
    """Images under ``root`` labelled by their folders.

    Without ``taxonomy``: ``root/family/genus/species/*.jpg`` (or the folders of
    ``ranks``, top-down). An image directly in a genus (family) folder is a genus-only
    (family-only) label. A species folder may be named by its epithet (``campestre``) or
    the binomial (``Acer campestre``, ``Acer_campestre``). Folders below the lowest rank
    become the image's ``group`` field (e.g. one folder per video track or specimen).

    With ``taxonomy``: the first folder under ``root`` names the taxon (a species
    binomial, or a genus or family for a label that stops there), looked up in the table;
    deeper folders are the ``group``.
    """
    root = Path(root)
    ranks = list(ranks or (taxonomy.ranks if taxonomy else ("family", "genus", "species")))
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in _image_suffixes()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise AnnotationError(f"{root}: no images found (looked for "
                              f"{', '.join(_image_suffixes())} in its folders).")
    records, loose, unknown = [], [], {}
    depth = 1 if taxonomy else len(ranks)
    for path in files:
        parts = [p.replace("_", " ").strip() for p in path.relative_to(root).parts[:-1]]
        if not parts:
            loose.append(path)
            continue
        if taxonomy is not None:
            labels = taxonomy.get(parts[0])
            if labels is None:
                unknown.setdefault(parts[0], 0)
                unknown[parts[0]] += 1
                continue
        else:
            labels = clean_label(dict(zip(ranks, parts[:depth])), ranks)
        group = "/".join(parts[depth:])
        records.append(ImageRecord(path, labels, f"image {path}",
                                   {"group": group} if group else {}))
    if unknown:
        names = ", ".join(f"{k!r} ({v} images)" for k, v in list(unknown.items())[:8])
        raise AnnotationError(
            f"{len(unknown)} folder name(s) under {root} are not in the taxonomy table "
            f"{taxonomy.source}: {names}. Fix: add them to the table (a row per species, "
            "with its genus, family, ...) or rename the folders as the table spells them.")
    if loose:
        log.warning("left out %d image(s) directly in %s (no label folder), e.g. %s", len(loose),
                    root, loose[0].name)
    return records, ranks


# ---------------------------------------------------------------------- CSV
def _find_column(columns: Sequence[str], wanted: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[w.lower()] for w in wanted if w.lower() in lower), None)


def resolve_image(value: str, folders: Sequence[Path]) -> Path:
    """A path from a table: absolute as is, else under the first of ``folders`` where it
    exists (else under the first folder: a missing file is reported later)."""
    value = value.strip()
    if value.startswith("file://"):
        value = value[len("file://"):]
    p = Path(value)
    if p.is_absolute():
        return p
    for folder in folders:
        if (folder / p).exists():
            return folder / p
    return folders[0] / p


def read_image_table(path: str | Path, *, ranks: Sequence[str] | None = None,
                     image_column: str | None = None, group_columns: Sequence[str] = (),
                     images_root: str | Path | None = None
                     ) -> tuple[list[ImageRecord], list[str]]:
    """A CSV (or TSV) with an image path column and one column per rank.

    Empty rank cells end the label (a row with only ``family`` is a family-only label); a
    row with no name in any rank column is left out with a warning (an image nobody
    labelled, e.g. a row of ``taxoclass discover``'s ``members.csv`` the expert skipped).
    Relative image paths are read from the table's folder (or ``images_root``). Group
    columns (``track``, ``site``, ... of :data:`GROUP_FIELDS`, plus ``group_columns``) are
    kept on the image records.
    """
    path = Path(path)
    rows = read_csv_table(path)
    cols = list(rows[0].keys()) if rows else []
    col = image_column or _find_column(cols, IMAGE_COLUMNS)
    if col is None or col not in cols:
        raise AnnotationError(f"{path}: no image path column; expected one named "
                              f"{image_column or ' / '.join(IMAGE_COLUMNS)}, found {cols}. "
                              "Fix: --image-column NAME.")
    rank_cols = rank_columns(cols, ranks)
    if not rank_cols:
        raise AnnotationError(f"{path}: no rank columns; expected columns named as ranks "
                              f"({', '.join(RANK_ORDER)}) or --ranks naming them, found {cols}.")
    groups = _group_columns(cols, group_columns, path)
    folders = [path.parent] + ([Path(images_root)] if images_root else [])
    records, unlabelled = [], []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        if not row[col].strip():
            raise AnnotationError(f"{path}: line {i} has no image path in column {col!r}. "
                                  "Fix: fill it or drop the row.")
        label = clean_label(row, rank_cols)
        if not any(label.values()):
            unlabelled.append(i)
            continue
        records.append(ImageRecord(resolve_image(row[col], folders), label,
                                   f"{path.name} line {i}",
                                   {g: row[g] for g in groups if str(row[g]).strip()}))
    if unlabelled and not records:
        raise AnnotationError(f"{path}: no row names a taxon; expected a name in at least one "
                              f"of the rank columns {rank_cols}, found them empty on all "
                              f"{len(unlabelled)} row(s). Fix: fill them in.")
    if unlabelled:
        log.warning("%s: left out %d row(s) with no name in any rank column (%s), e.g. line %d",
                    path, len(unlabelled), ", ".join(rank_cols), unlabelled[0])
    return records, rank_cols


def _group_columns(cols: Sequence[str], extra: Sequence[str], source: Path) -> list[str]:
    missing = [g for g in extra if g not in cols]
    if missing:
        raise AnnotationError(f"{source}: group column(s) {missing} not found; columns are "
                              f"{list(cols)}. Fix: --group-column with a column name.")
    return [c for c in cols if c in GROUP_FIELDS or c in extra]


# ---------------------------------------------------------------------- Darwin Core
_OCC_NAMES = ("occurrence.txt", "occurrence.csv", "occurrence.tsv", "observations.csv")
_MEDIA_NAMES = ("multimedia.txt", "multimedia.csv", "multimedia.tsv", "media.csv",
                "images.csv", "images.txt")
_SPECIES_RANKS = {"species", "subspecies", "variety", "form", "infraspecificname",
                  "infraspecies", "unranked"}


def find_darwin_core(source: str | Path, multimedia: str | Path | None = None
                     ) -> tuple[Path, Path]:
    """(occurrence table, multimedia table) of an export folder or occurrence file."""
    source = Path(source)
    folder = source if source.is_dir() else source.parent
    occ = (next((folder / n for n in _OCC_NAMES if (folder / n).is_file()), None)
           if source.is_dir() else source)
    media = Path(multimedia) if multimedia else next(
        (folder / n for n in _MEDIA_NAMES if (folder / n).is_file()), None)
    if occ is None or not occ.is_file():
        raise AnnotationError(f"{source}: no occurrence table; expected one of "
                              f"{', '.join(_OCC_NAMES)} (a Darwin Core export, unzipped).")
    if media is None or not media.is_file():
        raise AnnotationError(f"{folder}: no multimedia table; expected one of "
                              f"{', '.join(_MEDIA_NAMES)} beside {occ.name} (or --multimedia).")
    return occ, media


def read_darwin_core(source: str | Path, *, multimedia: str | Path | None = None,
                     ranks: Sequence[str] | None = None,
                     images_root: str | Path | None = None
                     ) -> tuple[list[ImageRecord], list[str]]:
    """An iNaturalist / GBIF Darwin Core export: occurrence + multimedia tables joined on
    the occurrence id (``gbifID``, ``id``/``coreid`` or ``occurrenceID``).

    Labels take ``kingdom`` ... ``family``, ``genus``, ``specificEpithet`` (else
    ``species`` or ``scientificName``) and stop at ``taxonRank``. ``identifier`` must be a
    local path (relative to the multimedia table's folder, or ``images_root``); URLs are
    an error with the fix. ``eventID``, ``locationID`` and the occurrence id are kept as
    group fields.
    """
    occ_path, media_path = find_darwin_core(source, multimedia)
    occ, media = read_csv_table(occ_path), read_csv_table(media_path)
    media_cols = list(media[0].keys()) if media else []
    occ_cols = list(occ[0].keys()) if occ else []
    key = next((k for k in ("gbifID", "coreid", "id", "occurrenceID") if k in media_cols), None)
    occ_key = key if key in occ_cols else ("id" if key == "coreid" and "id" in occ_cols
                                            else None)
    if key is None or occ_key is None:
        raise AnnotationError(f"{media_path}: cannot join to {occ_path.name}; expected a "
                              f"shared id column (gbifID, id/coreid or occurrenceID), found "
                              f"{media_cols} and {occ_cols}.")
    if "identifier" not in media_cols:
        raise AnnotationError(f"{media_path}: no 'identifier' column (the image file); "
                              f"found {media_cols}.")
    rank_cols = list(ranks) if ranks else _dwc_ranks(occ)
    labels = {row[occ_key]: (_dwc_label(row, rank_cols), row) for row in occ}
    return _dwc_records(media, media_path, key, labels, rank_cols, images_root), rank_cols


def _dwc_ranks(occ: list[dict]) -> list[str]:
    """The rank columns with at least one value, plus species."""
    higher = [r for r in RANK_ORDER[:-1] if any(str(o.get(r, "")).strip() for o in occ)]
    return [*higher, "species"]


def _dwc_label(row: dict, ranks: list[str]) -> dict[str, str]:
    values = dict(row)
    epithet = row.get("specificEpithet", "").strip()
    if epithet:  # the binomial: without a genus rank the species keeps its genus name
        values["species"] = species_name(row.get("genus", ""), epithet)
    elif not row.get("species", "").strip() and row.get("scientificName", "").strip():
        words = row["scientificName"].split()
        values["species"] = " ".join(words[:2]) if len(words) > 1 else ""
    label = clean_label(values, ranks)
    rank = row.get("taxonRank", "").strip().lower()
    rank = "species" if rank in _SPECIES_RANKS else rank
    if rank in RANK_ORDER:
        above = [r for r in RANK_ORDER[:RANK_ORDER.index(rank) + 1]]
        label = {r: (v if r in above or r not in RANK_ORDER else "") for r, v in label.items()}
    return label


def _dwc_records(media: list[dict], media_path: Path, key: str, labels: dict,
                 ranks: list[str], images_root: str | Path | None) -> list[ImageRecord]:
    urls = [m["identifier"] for m in media
            if _URL.match(m["identifier"].strip()) and not m["identifier"].startswith("file://")]
    if urls:
        raise AnnotationError(
            f"{media_path}: {len(urls)} of {len(media)} images are URLs (e.g. {urls[0]}); "
            "taxoclass import reads local image files only. Fix: download the images first "
            "(e.g. `wget -x -i urls.txt` on the identifier column, or GBIF's/iNaturalist's "
            "image download), then write each local path (relative to the multimedia "
            "table's folder) into 'identifier'.")
    folders = [media_path.parent] + ([Path(images_root)] if images_root else [])
    records, skipped, orphans = [], 0, 0
    for i, m in enumerate(media, start=2):
        kind = m.get("type", "").strip().lower()
        if kind and "image" not in kind:
            skipped += 1
            continue
        if m[key] not in labels:
            orphans += 1
            continue
        label, occ = labels[m[key]]
        fields = {"occurrence": m[key], **{g: occ[g] for g in ("eventID", "locationID")
                                           if str(occ.get(g, "")).strip()}}
        records.append(ImageRecord(resolve_image(m["identifier"], folders), label,
                                   f"{media_path.name} line {i} ({key}={m[key]})", fields))
    if skipped:
        log.warning("%s: left out %d media that are not still images (type)", media_path,
                    skipped)
    if orphans:
        log.warning("%s: left out %d images whose %s is not in the occurrence table",
                    media_path, orphans, key)
    return records
