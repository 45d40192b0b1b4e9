"""Load Herbarium 2022 / NAFlora-1M COCO-style annotations and species tables.

:func:`load_annotations` reads a file, checks it (:mod:`taxoclass.taxonomy.validation`:
every problem with its JSON path, record, expected, found and fix) and returns one
DataFrame per section (:class:`Annotations`); it raises :class:`AnnotationError` when there
are errors. Extra fields (e.g. ``order`` on categories) are kept. A category may stop at
any rank (family-only, genus-only); :meth:`Annotations.taxonomy` builds the tree for a
rank list or ``"auto"`` (the ranks the categories fill). The validation names are
re-exported here (``validate_annotations``, ``read_json``, ``outside_root_allowed``, ...).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import AnnotationError, ConfigError
from .tree import DEFAULT_RANKS, KNOWN_RANKS, Taxonomy
from .validation import (
    SCHEMA_NAME,
    Problem,
    ValidationReport,
    category_ranks,
    check_ranks,
    is_image_problem,
    load_schema,
    outside_root_allowed,
    outside_root_reason,
    read_json,
    validate_annotations,
)

__all__ = ["SCHEMA_NAME", "SECTIONS", "Annotations", "Problem", "ValidationReport",
           "annotations_from_dict", "category_ranks", "check_ranks", "load_annotations",
           "load_schema", "outside_root_allowed",
           "outside_root_reason", "read_class_mapping", "read_json", "read_species_table",
           "validate_annotations"]

log = logging.getLogger(__name__)

SECTIONS = ("images", "annotations", "categories", "genera", "distances", "licenses",
            "institutions")


@dataclass
class Annotations:
    """A loaded annotation file: one DataFrame per section."""

    source: str
    images: pd.DataFrame
    annotations: pd.DataFrame
    categories: pd.DataFrame
    genera: pd.DataFrame
    distances: pd.DataFrame
    licenses: pd.DataFrame
    institutions: pd.DataFrame
    extra: dict = field(default_factory=dict)

    def taxonomy(self, ranks: Sequence[str] | str = DEFAULT_RANKS, *,
                 category_ids: Collection | None = None) -> Taxonomy:
        """The taxonomy of the categories, with genus distances when the file has them.

        ``ranks``: a list, top-down, or ``"auto"`` (the known ranks some category fills,
        :func:`~taxoclass.taxonomy.ranks.category_ranks`); a rank no category fills
        raises :class:`AnnotationError` naming it and the ranks the file has.
        ``category_ids``: only those categories (e.g. the ones with labelled images).
        """
        if self.categories.empty:
            raise AnnotationError(f"{self.source}: has no categories, so no taxonomy can be "
                                  "built. Expected a 'categories' list with family/genus/species.")
        cats = self.categories
        if category_ids is not None:
            cats = cats[cats["category_id"].isin(list(category_ids))]
        ranks = check_ranks(ranks, self.categories.to_dict("records"), self.source)
        tax = Taxonomy.from_records(cats.to_dict("records"), ranks, source=self.source)
        if not self.distances.empty and not self.genera.empty:
            name = dict(zip(self.genera["genus_id"], self.genera["genus"]))
            tax.genus_distances = {
                (name[a], name[b]): float(d)
                for a, b, d in self.distances[["genus_id_x", "genus_id_y", "distance"]]
                .itertuples(index=False) if a in name and b in name}
        return tax

    def labelled_images(self, images_root: str | Path | None = None,
                        group_by: str | None = None) -> pd.DataFrame:
        """One row per annotated image: image_id, file_name, path, category_id and ranks;
        with ``group_by`` (``data.group_by``) also ``group`` (:meth:`group_values`)."""
        cats = self.categories.drop(columns=[c for c in ("license",) if c in self.categories])
        df = (self.annotations[["image_id", "category_id"]]
              .merge(self.images[["image_id", "file_name"]], on="image_id", how="left")
              .merge(cats, on="category_id", how="left"))
        root = Path(images_root) if images_root else Path(self.source).parent
        df["path"] = [str(root / f) for f in df["file_name"]]
        if group_by:
            df["group"] = self.group_values(group_by).to_numpy()
        return df

    def group_values(self, field: str) -> pd.Series:
        """The ``field`` value of each annotation's image (``data.group_by``: e.g. track,
        site, specimen): the image's own field first, else the annotation's; missing (None)
        where neither has one. :class:`ConfigError` when no image or annotation has it."""
        def filled(frame: pd.DataFrame) -> bool:
            return field in frame.columns and bool(frame[field].notna().any())

        if not (filled(self.images) or filled(self.annotations)):
            def fields(frame: pd.DataFrame) -> list[str]:
                return sorted(str(c) for c in frame.columns if frame[c].notna().any())

            raise ConfigError(f"data.group_by {field!r}: no image or annotation of "
                              f"{self.source} has a {field!r} field. Fields found: images "
                              f"{fields(self.images)}, annotations {fields(self.annotations)}. "
                              f"Fix: name one of them, or drop data.group_by.")
        n = len(self.annotations)
        values = (self.annotations[field].astype(object).reset_index(drop=True)
                  if field in self.annotations.columns else pd.Series([None] * n, dtype=object))
        if field in self.images.columns:
            by_image = dict(zip(self.images["image_id"], self.images[field].astype(object)))
            own = self.annotations["image_id"].map(by_image).reset_index(drop=True)
            values = own.where(own.notna(), values)
        return values.where(values.notna(), None)

    def image_items(self, images_root: str | Path | None = None) -> list[tuple[str, str]]:
        """(image_id, path) of every image in the file, labelled or not."""
        root = Path(images_root) if images_root else Path(self.source).parent
        return [(str(i), str(root / f))
                for i, f in zip(self.images["image_id"], self.images["file_name"])]


# ---------------------------------------------------------------------- loading
def load_annotations(path: str | Path, *, images_root: str | Path | None = None,
                     check: bool = True, allow_outside_root: bool | None = None) -> Annotations:
    """Load an annotation file, validated (:func:`validate_annotations`).

    With ``check`` any error raises :class:`AnnotationError`. Without it (``embed``, which
    also reads unlabelled files) only errors in the image list raise (the records every
    command reads: ids, file names, paths outside the root); label problems are logged as
    one warning, since training and evaluation refuse them later.
    """
    data = read_json(path)
    report = validate_annotations(data, source_name=str(path), images_root=images_root,
                                  allow_outside_root=allow_outside_root)
    errors = report.errors if check else [p for p in report.errors if is_image_problem(p)]
    if len(errors) == 1:
        raise AnnotationError(f"{path}: {errors[0]}")
    if errors:
        raise AnnotationError(f"{path} has {len(errors)} problems:\n"
                              + "\n".join(str(p) for p in errors[:20])
                              + (f"\n... and {len(errors) - 20} more" if len(errors) > 20
                                 else "")
                              + f"\nRun `taxoclass validate {path}` for the full report.")
    if not check and report.errors:
        log.warning("%s: %d problem(s) in its labels (e.g. %s); training and evaluation will "
                    "refuse the file. Run `taxoclass validate %s` for the list.", path,
                    len(report.errors), report.errors[0], path)
    return annotations_from_dict(data, source=str(path))


def annotations_from_dict(data: Mapping, *, source: str = "<dict>") -> Annotations:
    """Turn a parsed annotation dict into :class:`Annotations` (no checks)."""
    defaults = {
        "images": ["image_id", "file_name"], "annotations": ["image_id", "category_id"],
        "categories": ["category_id", "family", "genus", "species"],
        "genera": ["genus_id", "genus"], "distances": ["genus_id_x", "genus_id_y", "distance"],
        "licenses": ["id"], "institutions": ["institution_id"],
    }
    frames = {k: pd.DataFrame(data.get(k) or [], columns=None if data.get(k) else cols)
              for k, cols in defaults.items()}
    cats = frames["categories"]
    for col in KNOWN_RANKS:
        if col in cats:
            cats[col] = cats[col].fillna("").astype(str)
    extra = {k: v for k, v in data.items() if k not in SECTIONS}
    return Annotations(source=source, extra=extra, **frames)


# ---------------------------------------------------------------------- tables
def read_species_table(path: str | Path) -> pd.DataFrame:
    """Read a species table (CSV or ``;``-separated, like PlantCLEF's species metadata).

    Returns columns ``species_id``, ``species``, ``genus``, ``family`` (plus any others,
    e.g. ``order``). ``species`` is the full name; genus is taken from it when the
    column is absent.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: species table not found; check the path.")
    head = path.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
    sep = ";" if head and head[0].count(";") > head[0].count(",") else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several parser errors
        raise AnnotationError(f"{path}: cannot parse as a {sep!r}-separated table: {exc}") from exc
    df.columns = [c.strip() for c in df.columns]
    if "species" not in df.columns:
        raise AnnotationError(f"{path}: expected a 'species' column, found columns "
                              f"{list(df.columns)}. Rename the column holding species names.")
    if "genus" not in df.columns:
        df["genus"] = df["species"].str.split().str[0].fillna("")
    if "family" not in df.columns:
        df["family"] = ""
    if "species_id" not in df.columns:
        df["species_id"] = [str(i) for i in range(len(df))]
    return df


def read_class_mapping(path: str | Path) -> list[str]:
    """PlantCLEF ``class_mapping.txt``: the species id of each model output unit, in order."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: class mapping not found; expected the PlantCLEF "
                              "class_mapping.txt (one species id per line).")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(set(ids)) != len(ids):
        dup = [k for k, v in Counter(ids).items() if v > 1][:5]
        raise AnnotationError(f"{path}: species ids repeat (e.g. {dup}); each output unit "
                              "needs its own species id.")
    return ids
