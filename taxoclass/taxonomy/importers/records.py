"""What every importer produces (:class:`ImageRecord`, :class:`BoxRecord`) and how records
become a Herbarium 2022-style annotation dict (:func:`build_annotations`).

A label is one name per rank, top-down; it may stop at any rank (a family-only record has
empty genus and species). Rank names are the columns a source has, in the order of
:data:`RANK_ORDER` (or the user's own list). A taxonomy table (:func:`read_taxonomy_table`)
maps a folder or category name to the full label.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import AnnotationError
from ..tree import species_name

__all__ = ["GROUP_FIELDS", "RANK_ORDER", "BoxRecord", "ImageRecord", "TaxonLookup",
           "build_annotations", "clean_label", "name_key", "rank_columns", "read_csv_table",
           "read_taxonomy_table", "relative_file_name"]

#: Ranks importers recognise as columns, top-down (a source may use any subset).
RANK_ORDER: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "superfamily", "family",
                               "subfamily", "tribe", "genus", "species")
#: Columns kept on the image records as group fields (data.group_by) when a source has them.
GROUP_FIELDS: tuple[str, ...] = ("group", "track", "video", "sequence", "seq_id", "site",
                                 "location", "plot", "specimen", "camera", "station",
                                 "eventID", "locationID", "occurrence")
#: Fields every category has (the schema requires them), empty when a label stops above.
REQUIRED_RANKS = ("family", "genus", "species")


@dataclass
class ImageRecord:
    """One labelled image of a source: its file, its label (rank -> name) and fields
    (group fields, ids) to keep on the image record; ``where`` names it in messages."""

    path: Path
    labels: dict[str, str]
    where: str
    fields: dict[str, object] = field(default_factory=dict)


@dataclass
class BoxRecord:
    """One bounding box ``[x, y, width, height]`` (pixels) on a source image, labelled."""

    path: Path
    bbox: list[float]
    labels: dict[str, str]
    where: str
    fields: dict[str, object] = field(default_factory=dict)


def name_key(name: str) -> str:
    """How names are matched: case, underscores and repeated spaces do not count."""
    return re.sub(r"\s+", " ", str(name).replace("_", " ")).strip().lower()


def rank_columns(columns: Iterable[str], ranks: Sequence[str] | None = None) -> list[str]:
    """The rank columns of a table, top-down: ``ranks`` as given (each must be a column),
    else the columns named as in :data:`RANK_ORDER` (any case)."""
    cols = list(columns)
    if ranks:
        missing = [r for r in ranks if r not in cols]
        if missing:
            raise AnnotationError(f"--ranks names {missing}, which are not columns of the "
                                  f"table; found columns {cols}. Fix: name rank columns "
                                  "exactly as the table does.")
        return list(ranks)
    lower = {c.lower(): c for c in cols}
    return [lower[r.lower()] for r in RANK_ORDER if r.lower() in lower]


def clean_label(values: Mapping[str, object], ranks: Sequence[str]) -> dict[str, str]:
    """rank -> stripped name over ``ranks`` (NaN and None are empty); a species written as
    a binomial keeps only its epithet when the genus is known, and gives the genus when the
    genus is empty."""
    out = {}
    for r in ranks:
        v = values.get(r)
        out[r] = "" if v is None or (isinstance(v, float) and v != v) else \
            re.sub(r"\s+", " ", str(v)).strip()
    if "species" in out and out["species"]:
        sp, genus = out["species"], out.get("genus", "")
        if "genus" in out and not genus and " " in sp:
            out["genus"] = genus = sp.split(" ")[0]
        if genus and sp.startswith(genus + " "):
            out["species"] = sp[len(genus) + 1:]
    return out


def read_csv_table(path: Path) -> list[dict[str, str]]:
    """Rows of a comma-, tab- or semicolon-separated table (the separator its header uses
    most), every value as text."""
    import pandas as pd

    if not path.is_file():
        raise AnnotationError(f"{path}: table not found; check the path.")
    head = path.read_text(encoding="utf-8-sig", errors="replace").split("\n", 1)[0]
    sep = max(("\t", ",", ";"), key=head.count)
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                            encoding="utf-8-sig", quoting=3 if sep == "\t" else 0)
    except Exception as exc:  # noqa: BLE001 - pandas raises several parser errors
        raise AnnotationError(f"{path}: cannot read as a {sep!r}-separated table: {exc}. "
                              "Fix: save it as CSV (comma) or TSV (tab) with a header.") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.to_dict("records")


class TaxonLookup:
    """Names (species binomials, genera, families, or a ``name`` column) -> full labels,
    from a taxonomy table with one column per rank."""

    def __init__(self, rows: list[dict[str, str]], ranks: Sequence[str], source: str) -> None:
        self.ranks, self.source = list(ranks), source
        self._by_name: dict[str, dict[str, str]] = {}
        for row in rows:
            label = clean_label(row, self.ranks)
            for i in range(len(self.ranks) - 1, -1, -1):  # lowest rank wins
                name = label[self.ranks[i]]
                if not name:
                    continue
                part = {r: (label[r] if j <= i else "") for j, r in enumerate(self.ranks)}
                if self.ranks[i] == "species":
                    name = species_name(label.get("genus", ""), name)
                self._by_name.setdefault(name_key(name), part)
            for col in ("name", "category", "scientificName"):
                if str(row.get(col, "")).strip():
                    self._by_name[name_key(row[col])] = label

    def get(self, name: str) -> dict[str, str] | None:
        found = self._by_name.get(name_key(name))
        return dict(found) if found is not None else None


def read_taxonomy_table(path: str | Path, ranks: Sequence[str] | None = None) -> TaxonLookup:
    """A taxonomy CSV (species -> genus, family, ...; any rank columns) as a lookup."""
    path = Path(path)
    rows = read_csv_table(path)
    cols = rank_columns(rows[0].keys() if rows else [], ranks)
    if not cols:
        raise AnnotationError(f"{path}: no rank columns; expected columns named as ranks "
                              f"({', '.join(RANK_ORDER)}), e.g. species,genus,family.")
    return TaxonLookup(rows, cols, str(path))


def relative_file_name(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` (POSIX separators), or None when it lies outside."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return None
    return Path(rel).as_posix()


def build_annotations(records: Sequence[ImageRecord], ranks: Sequence[str],
                      images_root: str | Path) -> dict:
    """The Herbarium 2022-style dict of ``records``: images (ids 1..n in file-name order,
    with their fields), one annotation each and one category per distinct label.

    Raises :class:`AnnotationError` for files outside ``images_root``, a rank empty above
    a filled one, and one file with two different labels; a file listed twice with one
    label is kept once.
    """
    root = Path(images_root)
    ranks = list(ranks)
    outside, gaps, by_file = [], [], {}
    conflicts: dict[str, set] = defaultdict(set)
    for rec in records:
        name = relative_file_name(rec.path, root)
        if name is None:
            outside.append(rec)
            continue
        label = tuple(rec.labels.get(r, "") for r in ranks)
        depth = max((i + 1 for i, v in enumerate(label) if v), default=0)
        if depth == 0 or any(not v for v in label[:depth]):
            gaps.append((rec, depth))
            continue
        if name in by_file and by_file[name][1] != label:
            conflicts[name].update({by_file[name][1], label})
        by_file.setdefault(name, (rec, label))
    _raise_record_problems(outside, gaps, conflicts, ranks, root)
    labels = sorted({lab for _, lab in by_file.values()})
    cat_id = {lab: i for i, lab in enumerate(labels)}
    images, anns = [], []
    for image_id, name in enumerate(sorted(by_file), start=1):
        rec, lab = by_file[name]
        images.append({"image_id": image_id, "file_name": name, **rec.fields})
        anns.append({"image_id": image_id, "category_id": cat_id[lab]})
    return {"images": images, "annotations": anns,
            "categories": [_category(i, dict(zip(ranks, lab))) for lab, i in cat_id.items()]}


def _category(category_id: int, label: dict[str, str]) -> dict:
    filled = [r for r, v in label.items() if v]
    low = filled[-1]
    name = (species_name(label.get("genus", ""), label["species"]) if low == "species"
            else label[low])
    cat = {"category_id": category_id, "scientificName": name, "taxonRank": low}
    cat.update({r: "" for r in REQUIRED_RANKS})
    cat.update(label)
    return cat


def _raise_record_problems(outside: list, gaps: list, conflicts: Mapping, ranks: list,
                           root: Path) -> None:
    if outside:
        eg = ", ".join(str(r.path) for r in outside[:3])
        raise AnnotationError(
            f"{len(outside)} image(s) lie outside the images root {root} (e.g. {eg}); "
            "file_name paths are written relative to it. Fix: pass --images-root with a "
            "folder that holds every image (and the same folder to validate, embed, train "
            "and evaluate), or write the output file in a folder above the images.")
    if gaps:
        lines = []
        for rec, depth in gaps[:5]:
            found = ", ".join(f"{r}={rec.labels.get(r, '')!r}" for r in ranks)
            why = ("no name at any rank" if depth == 0 else
                   f"no {', '.join(r for r in ranks[:depth] if not rec.labels.get(r))} above "
                   f"{ranks[depth - 1]} {rec.labels[ranks[depth - 1]]!r}")
            lines.append(f"  {rec.where}: {why} ({found})")
        raise AnnotationError(
            f"{len(gaps)} record(s) have a label with a gap (expected every rank above the "
            f"lowest named one filled, ranks {', '.join(ranks)}):\n" + "\n".join(lines)
            + ("\n  ..." if len(gaps) > 5 else "")
            + "\nFix: fill the missing ranks (or a taxonomy table with them), or drop the "
              "records.")
    if conflicts:
        eg = "; ".join(f"{name}: {sorted(' / '.join(v for v in lab if v) for lab in labs)}"
                       for name, labs in list(conflicts.items())[:3])
        raise AnnotationError(
            f"{len(conflicts)} image file(s) appear with two different labels ({eg}). "
            "Fix: keep one label per image.")
