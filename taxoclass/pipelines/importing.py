"""``taxoclass import``: read a folder tree, a CSV, a Darwin Core export or COCO detection
boxes (:mod:`taxoclass.taxonomy.importers`), cut the COCO crops, write a Herbarium
2022-style annotation file and validate it with the checks of ``taxoclass validate``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AnnotationError, ConfigError, ImageError
from ..taxonomy.annotations import ValidationReport, validate_annotations
from ..taxonomy.importers import (
    FORMATS,
    BoxRecord,
    ImageRecord,
    build_annotations,
    detect_format,
    read_coco_boxes,
    read_darwin_core,
    read_folder_tree,
    read_image_table,
    read_taxonomy_table,
    relative_file_name,
)

log = logging.getLogger(__name__)

__all__ = ["ImportResult", "import_annotations"]


@dataclass
class ImportResult:
    """What an import wrote: the annotation file, its images root, the validation report
    (counts per rank), images left out, and failed boxes (COCO)."""

    out: Path
    images_root: Path
    source_format: str
    report: ValidationReport
    left_out: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    crops: Path | None = None


def import_annotations(source: str | Path, out: str | Path, *,
                       images_root: str | Path | None = None, source_format: str = "auto",
                       ranks: Sequence[str] | None = None,
                       taxonomy: str | Path | None = None, image_column: str | None = None,
                       group_columns: Sequence[str] = (),
                       multimedia: str | Path | None = None, crops: str | Path | None = None,
                       overwrite: bool = False) -> ImportResult:
    """Import ``source`` into the annotation file ``out`` and validate it.

    ``images_root`` (default: ``out``'s folder) is the folder the written ``file_name`` s
    are relative to: pass the same folder to validate, embed, train and evaluate.
    ``source_format``: one of :data:`FORMATS`. ``taxonomy``: a CSV with one column per
    rank naming the taxa of species folders or COCO categories. ``crops`` (COCO): the
    folder the box crops go to (default ``<out stem>_crops`` beside ``out``), written as a
    unit with a ``failures.csv`` of the boxes that could not be cut. Images missing on
    disk are left out with a warning. The file is written even when validation finds
    errors (the report says which); check ``result.report.ok``.
    """
    source, out = Path(source), Path(out)
    if source_format not in FORMATS:
        raise ConfigError(f"unknown format {source_format!r}; expected one of {FORMATS}.")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists. Fix: choose another --out, or --overwrite to "
                          "replace it.")
    if out.suffix.lower() != ".json":
        raise ConfigError(f"--out {out}: expected a .json file name.")
    root = Path(images_root) if images_root is not None else out.parent
    fmt = detect_format(source) if source_format == "auto" else source_format
    lookup = read_taxonomy_table(taxonomy) if taxonomy else None
    failures: list[dict] = []
    crop_dir = None
    if fmt == "folders":
        records, rank_list = read_folder_tree(source, ranks=ranks, taxonomy=lookup)
    elif fmt == "table":
        records, rank_list = read_image_table(source, ranks=ranks, image_column=image_column,
                                              group_columns=group_columns,
                                              images_root=images_root)
    elif fmt == "dwc":
        records, rank_list = read_darwin_core(source, multimedia=multimedia, ranks=ranks,
                                              images_root=images_root)
    else:
        boxes, rank_list, failures = read_coco_boxes(source, taxonomy=lookup, ranks=ranks,
                                                     images_root=images_root)
        crop_dir = _crop_folder(crops, out, root, overwrite)
        records, failures = _cut_crops(boxes, crop_dir, failures)
    records, left_out = _existing(records)
    data = build_annotations(records, rank_list, root)
    if not data["images"]:
        raise AnnotationError(f"{source}: no labelled image to import ({len(left_out)} left "
                              "out, " f"{len(failures)} failed). Nothing was written.")
    from ..io.provenance import write_json_output

    # The header sits under COCO's own "info" key, which annotation readers ignore.
    write_json_output(out, data, key="info")
    report = validate_annotations(out, images_root=root, allow_outside_root=False)
    return ImportResult(out=out, images_root=root, source_format=fmt, report=report,
                        left_out=left_out, failures=failures, crops=crop_dir)


def _crop_folder(crops: str | Path | None, out: Path, root: Path, overwrite: bool) -> Path:
    """The crops folder: under the images root, and not an existing one without overwrite."""
    crop_dir = Path(crops) if crops else out.parent / f"{out.stem}_crops"
    if relative_file_name(crop_dir / "crop.jpg", root) is None:
        raise ConfigError(f"crops folder {crop_dir} lies outside the images root {root}. Fix: "
                          "--crops with a folder under --images-root.")
    if crop_dir.exists() and not overwrite:
        raise ConfigError(f"crops folder {crop_dir} exists. Fix: choose another --crops or "
                          "--out, or --overwrite to replace it.")
    return crop_dir


def _existing(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[str]]:
    """Records whose image file exists; the others left out with one warning."""
    missing = [r for r in records if not r.path.is_file()]
    if missing:
        log.warning("left out %d image(s) missing on disk, e.g. %s (%s)", len(missing),
                    missing[0].path, missing[0].where)
    gone = {id(r) for r in missing}
    return [r for r in records if id(r) not in gone], [f"{r.where}: {r.path} missing"
                                                        for r in missing]


# ---------------------------------------------------------------------- COCO crops
def _cut_crops(boxes: list[BoxRecord], crop_dir: Path, failures: list[dict]
               ) -> tuple[list[ImageRecord], list[dict]]:
    """Cut every box into ``crop_dir`` (written as a unit); a bad image or box is a failure
    (``failures.csv`` in the folder), the rest are cut."""
    import pandas as pd

    from ..io.files import atomic_write_csv, output_folder

    by_image: dict[Path, list[BoxRecord]] = defaultdict(list)
    for box in boxes:
        by_image[box.path].append(box)
    records: list[ImageRecord] = []
    failures = list(failures)
    used: set[str] = set()
    with output_folder(crop_dir) as stage:
        for path, image_boxes in by_image.items():
            records += _crop_image(path, image_boxes, stage, crop_dir, used, failures)
        if failures:
            atomic_write_csv(stage / "failures.csv",
                             pd.DataFrame(failures, columns=["source", "reason"]))
    if failures:
        log.warning("%d box(es) could not be cut (see %s), e.g. %s: %s", len(failures),
                    crop_dir / "failures.csv", failures[0]["source"], failures[0]["reason"])
    return records, failures


def _crop_image(path: Path, boxes: list[BoxRecord], stage: Path, crop_dir: Path,
                used: set[str], failures: list[dict]) -> list[ImageRecord]:
    from ..io.images import MIN_SIDE, load_image

    try:
        img = load_image(path)
    except ImageError as exc:
        failures.extend({"source": b.where, "reason": str(exc)} for b in boxes)
        return []
    width, height = img.size
    records = []
    for box in boxes:
        x, y, w, h = box.bbox
        left, top = max(0, round(x)), max(0, round(y))
        right, bottom = min(width, round(x + w)), min(height, round(y + h))
        if w <= 0 or h <= 0 or not all(math.isfinite(v) for v in box.bbox):
            reason = f"bbox {box.bbox} has no area"
        elif right - left <= 0 or bottom - top <= 0:
            reason = f"bbox {box.bbox} lies outside the image ({width}x{height} px)"
        elif min(right - left, bottom - top) < MIN_SIDE:
            reason = f"bbox {box.bbox} is under {MIN_SIDE} px inside the image"
        else:
            reason = None
        if reason:
            failures.append({"source": f"{box.where} ({path.name})", "reason": reason})
            continue
        name = _crop_name(path, box, used)
        img.crop((left, top, right, bottom)).save(stage / name, quality=95)
        records.append(ImageRecord(crop_dir / name, box.labels, box.where,
                                   {**box.fields, "bbox": [left, top, right - left,
                                                           bottom - top]}))
    return records


def _crop_name(path: Path, box: BoxRecord, used: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in
                   f"{path.stem}_{box.where.replace('annotation ', 'box')}")
    name, n = f"{base}.jpg", 1
    while name in used:
        n += 1
        name = f"{base}-{n}.jpg"
    used.add(name)
    return name
