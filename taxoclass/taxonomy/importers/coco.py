"""COCO detection JSON (camera-trap / insect-trap pipelines): one :class:`~.records.BoxRecord`
per bounding box, its category name mapped to ranks through a taxonomy table or the
category's own rank fields. The crops are cut by :mod:`taxoclass.pipelines.importing`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from ...errors import AnnotationError
from .records import GROUP_FIELDS, RANK_ORDER, BoxRecord, TaxonLookup, clean_label
from .sources import resolve_image

log = logging.getLogger(__name__)

__all__ = ["read_coco_boxes"]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found; expected a COCO detection JSON.") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not readable JSON ({exc}). Expected a COCO detection "
                              "file with images, annotations (bbox) and categories.") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise AnnotationError(f"{path}: expected a COCO object with 'images', 'annotations' "
                              "and 'categories' lists.")
    return data


def _category_labels(cats: list[dict], taxonomy: TaxonLookup | None,
                     ranks: Sequence[str] | None, source: Path
                     ) -> tuple[dict, list[str]]:
    """category id -> label, and the rank list."""
    own = [r for r in RANK_ORDER if any(str(c.get(r, "")).strip() for c in cats)]
    rank_list = list(ranks or (taxonomy.ranks if taxonomy else own))
    out, unknown = {}, []
    for c in cats:
        label = taxonomy.get(str(c.get("name", ""))) if taxonomy else None
        if label is None and any(str(c.get(r, "")).strip() for r in rank_list):
            label = clean_label(c, rank_list)
        if label is None:
            unknown.append(str(c.get("name", c.get("id"))))
        else:
            out[c.get("id")] = {r: label.get(r, "") for r in rank_list}
    if unknown or not rank_list:
        how = (f"add them to the taxonomy table {taxonomy.source}" if taxonomy else
               "pass --taxonomy TABLE.csv (a name column or species binomials, with one "
               "column per rank), or give each category rank fields (family, genus, ...)")
        raise AnnotationError(f"{source}: {len(unknown)} categor(ies) have no ranks: "
                              f"{unknown[:8]}. Fix: {how}.")
    return out, rank_list


def read_coco_boxes(path: str | Path, *, taxonomy: TaxonLookup | None = None,
                    ranks: Sequence[str] | None = None,
                    images_root: str | Path | None = None
                    ) -> tuple[list[BoxRecord], list[str], list[dict]]:
    """The boxes of a COCO detection file, the rank list, and failures (boxes that point at
    an unlisted image, or have no usable ``bbox``), each ``{"source", "reason"}``.

    Image ``file_name`` s are read relative to the JSON's folder (or ``images_root``).
    Group fields of the image (``seq_id``, ``location``, ... of :data:`GROUP_FIELDS`) and
    the source image are kept on each crop's record.
    """
    path = Path(path)
    data = _read(path)
    labels, rank_list = _category_labels(data["categories"], taxonomy, ranks, path)
    folders = [path.parent] + ([Path(images_root)] if images_root else [])
    images = {im.get("id"): im for im in data["images"] if isinstance(im, dict)}
    boxes, failures, unlabelled = [], [], 0
    for i, a in enumerate(data["annotations"]):
        where = f"annotation {a.get('id', i)}"
        im = images.get(a.get("image_id"))
        if im is None or not str(im.get("file_name", "")).strip():
            failures.append({"source": where, "reason": f"image_id {a.get('image_id')!r} is "
                             "not in 'images' (or has no file_name)"})
            continue
        bbox = a.get("bbox")
        if bbox is None:
            unlabelled += 1  # an image-level label (e.g. 'empty'): nothing to crop
            continue
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) for v in bbox)):
            failures.append({"source": where, "reason": f"bbox {bbox!r} is not [x, y, width, "
                             "height] in pixels"})
            continue
        if a.get("category_id") not in labels:
            failures.append({"source": where, "reason": f"category_id "
                             f"{a.get('category_id')!r} is not in 'categories'"})
            continue
        fields = {"source_image": str(im["file_name"]),
                  **{g: im[g] for g in GROUP_FIELDS if g in im and im[g] not in (None, "")}}
        boxes.append(BoxRecord(resolve_image(str(im["file_name"]), folders), list(bbox),
                               dict(labels[a["category_id"]]), where, fields))
    if unlabelled:
        log.warning("%s: %d annotation(s) without a bbox left out", path, unlabelled)
    return boxes, rank_list, failures
