"""Importers: turn what users have into Herbarium 2022-style annotations.

``records`` (the record types, :func:`build_annotations`, taxonomy tables), ``sources``
(folder tree, CSV, Darwin Core) and ``coco`` (COCO detection boxes). The pipeline
:func:`taxoclass.pipelines.importing.import_annotations` picks the reader, cuts COCO crops,
writes the file and validates it.
"""

from __future__ import annotations

from pathlib import Path

from .coco import read_coco_boxes
from .records import (
    GROUP_FIELDS,
    RANK_ORDER,
    BoxRecord,
    ImageRecord,
    TaxonLookup,
    build_annotations,
    read_taxonomy_table,
    relative_file_name,
)
from .sources import read_darwin_core, read_folder_tree, read_image_table

__all__ = ["FORMATS", "GROUP_FIELDS", "RANK_ORDER", "BoxRecord", "ImageRecord", "TaxonLookup",
           "build_annotations", "detect_format", "read_coco_boxes", "read_darwin_core",
           "read_folder_tree", "read_image_table", "read_taxonomy_table",
           "relative_file_name"]

#: What ``taxoclass import --format`` accepts (``auto`` guesses from SOURCE).
FORMATS = ("auto", "folders", "table", "dwc", "coco")


def detect_format(source: str | Path) -> str:
    """``folders``, ``table``, ``dwc`` or ``coco`` for ``source``: a folder holding an
    occurrence table is a Darwin Core export, any other folder a folder tree; a ``.json``
    is COCO, an ``occurrence.*`` file Darwin Core, another table a CSV."""
    from ...errors import AnnotationError
    from .sources import _OCC_NAMES

    source = Path(source)
    if source.is_dir():
        return "dwc" if any((source / n).is_file() for n in _OCC_NAMES) else "folders"
    if not source.is_file():
        raise AnnotationError(f"{source}: no such file or folder. Expected a folder tree, a "
                              "CSV, a Darwin Core export or a COCO JSON.")
    if source.suffix.lower() == ".json":
        return "coco"
    if source.name.lower() in _OCC_NAMES:
        return "dwc"
    return "table"
