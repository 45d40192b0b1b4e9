"""Check a Herbarium 2022 / NAFlora-1M COCO-style annotation file: every problem at once.

:func:`validate_annotations` lists every problem (schema and semantic) with its JSON path,
record, what was expected and found, and a fix (:class:`Problem`). Refused because they
would train on wrong pairs: ``file_name``s outside the images root (``../``, absolute;
allowed by ``allow_outside_root`` / ``--allow-outside-root`` / ``data.allow_outside_root`` /
:func:`outside_root_allowed`), one file under two image ids with different labels, ids equal
as text (``201``, ``"201"``), a category with a rank missing above a filled one (a
category may stop at any rank: family-only and genus-only labels are valid). Warnings: a
genus under two families (two taxa, as :class:`~taxoclass.taxonomy.tree.Taxonomy` builds
it), 0 images, 0 annotations.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import AnnotationError
from ..io.schemas import load_schema as _load_schema
from .paths import (
    control_characters,
    outside_root_allowed,
    outside_root_is_allowed,
    outside_root_reason,
)
from .ranks import category_ranks, check_ranks
from .tree import Taxonomy, rank_values

__all__ = ["SCHEMA_NAME", "Problem", "ValidationReport", "category_ranks", "check_ranks",
           "is_image_problem", "load_schema",
           "outside_root_allowed", "outside_root_reason", "read_json", "validate_annotations"]

SCHEMA_NAME = "herbarium2022_annotations.schema.json"


@dataclass
class Problem:
    """One thing wrong with an annotation file."""

    path: str  # JSON path, e.g. "$.annotations[12].category_id"
    record: str  # which record, e.g. "image_id=13"
    expected: str
    found: str
    fix: str
    severity: str = "error"

    def __str__(self) -> str:
        rec = f" ({self.record})" if self.record else ""
        return (f"{self.severity.upper()} {self.path}{rec}: expected {self.expected}, "
                f"found {self.found}. Fix: {self.fix}")


@dataclass
class ValidationReport:
    """All problems found in one file, plus counts for the summary."""

    source: str
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity != "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        """Human-readable report: every problem, then a one-line verdict."""
        lines = [str(p) for p in self.problems]
        if self.ok:
            counts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
            lines.append(f"OK {self.source}: {counts}"
                         + (f" ({len(self.warnings)} warnings)" if self.warnings else ""))
        else:
            lines.append(f"FAILED {self.source}: {len(self.errors)} errors, "
                         f"{len(self.warnings)} warnings.")
        return "\n".join(lines)

    def to_frame(self) -> pd.DataFrame:
        cols = ["severity", "path", "record", "expected", "found", "fix"]
        return pd.DataFrame([{c: getattr(p, c) for c in cols} for p in self.problems],
                            columns=cols)


# ---------------------------------------------------------------------- reading
def read_json(path: str | Path) -> dict:
    """Read a JSON file; a missing file or broken JSON raises :class:`AnnotationError`."""
    path = Path(path)
    if path.is_dir():
        raise AnnotationError(f"{path}: a folder, not a file. Expected a Herbarium 2022-style "
                              "annotations JSON; pass the file inside it.")
    if not path.is_file():
        raise AnnotationError(f"{path}: file not found. Expected a Herbarium 2022-style "
                              "annotations JSON; check the path.")
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            f"{path}: broken JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}. "
            "Fix the file (e.g. `python -m json.tool FILE` shows where).") from exc
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not UTF-8 text ({exc.reason}). Expected a JSON file "
                              "saved as UTF-8.") from exc
    except RecursionError as exc:
        raise AnnotationError(
            f"{path}: JSON nested deeper than can be read (arrays or objects inside each "
            "other thousands of levels deep). Expected an object with flat 'images', "
            "'annotations' and 'categories' lists; fix or regenerate the file.") from exc
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object with 'images' and 'categories', "
                              f"found a {type(data).__name__}.")
    return data


def is_image_problem(problem: Problem) -> bool:
    """True for a problem in the image list (or the file's top level), which every command
    reads; the rest are label problems (annotations, categories, genera, ...)."""
    return problem.path == "$" or problem.path.startswith(("$.images", "--images-root"))


def load_schema(name: str = SCHEMA_NAME) -> dict:
    """The annotation JSON Schema (or another shipped schema ``name``)."""
    return _load_schema(name)


# ---------------------------------------------------------------------- checks
def _rec(obj: object, *keys: str) -> str:
    if not isinstance(obj, Mapping):
        return ""
    return ", ".join(f"{k}={obj[k]!r}" for k in keys if k in obj)


def _json_path(parts: Sequence) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def validate_annotations(source: str | Path | Mapping, *, images_root: str | Path | None = None,
                         source_name: str | None = None,
                         allow_outside_root: bool | None = None) -> ValidationReport:
    """Check an annotation file (path or parsed dict) against the schema and for consistency.

    Finds: schema violations, duplicate ids (also ids equal as text, ``201`` and ``"201"``),
    ``file_name``s outside the images root (errors unless ``allow_outside_root``; ``None``:
    as :func:`outside_root_allowed` says), one file under two image ids (an error when their
    labels differ), annotations pointing at missing images or categories, ``genus_id``
    disagreeing with the category's genus, a category with a rank missing above its lowest
    filled one (a category may stop at any rank: family-only, genus-only; the ranks are
    the known ones some category fills, :func:`category_ranks`), unknown genus ids in
    ``distances``, and (with ``images_root``) image files missing on disk. Warns
    about 0 images or 0 annotations and about homonyms (a genus name under two families
    becomes two taxa).
    """
    if isinstance(source, Mapping):
        data, name = source, source_name or "<dict>"
    else:
        data, name = read_json(source), str(source)
    if allow_outside_root is None:
        allow_outside_root = outside_root_is_allowed()
    report = ValidationReport(source=name)
    try:
        schema = _schema_problems(data)
    except RecursionError as exc:
        raise AnnotationError(f"{name}: JSON nested deeper than can be checked; expected flat "
                              "'images', 'annotations' and 'categories' lists.") from exc
    report.problems.extend(schema)
    images = data.get("images") or []
    if not any(is_image_problem(p) for p in schema):  # the image list itself is readable
        report.problems.extend(_image_problems(images, images_root, allow_outside_root))
    if schema:  # structure is wrong: semantic checks would only repeat the noise
        report.counts = {k: len(data.get(k) or []) for k in ("images", "annotations",
                                                               "categories")}
        return report
    report.problems.extend(_label_problems(data))
    anns, cats = data.get("annotations") or [], data.get("categories") or []
    report.counts = _counts(data, name, images, anns, cats, ok=not report.errors)
    return report


def _image_problems(images: list, images_root: str | Path | None,
                    allow_outside_root: bool) -> list[Problem]:
    """The image list: unique ids (also as text), paths inside the root, files on disk."""
    problems = _duplicate_problems("images", "image_id", images)
    problems += _text_collision_problems("images", "image_id", images)
    problems += _outside_root_problems(images, allow_outside_root)
    problems += _control_character_problems(images)
    if images_root is not None:
        problems += _file_problems(images, Path(images_root))
    if not images:
        problems.append(Problem("$.images", "", "at least one image", "0 images",
                                "list the images (image_id, file_name); nothing can be "
                                "embedded or trained on", severity="warning"))
    return problems


def _label_problems(data: Mapping) -> list[Problem]:
    """Annotations, categories, genera and distances (the file's structure is valid)."""
    images = data.get("images") or []
    anns = data.get("annotations") or []
    cats = data.get("categories") or []
    genera = data.get("genera") or []
    problems = []
    for section, key, items in (("categories", "category_id", cats),
                                ("genera", "genus_id", genera)):
        problems += _duplicate_problems(section, key, items)
    problems += _text_collision_problems("categories", "category_id", cats)
    genus_by_id = {g["genus_id"]: g["genus"] for g in genera}
    problems += _annotation_problems(anns, images, cats, genus_by_id)
    problems += _same_file_problems(images, anns)
    problems += _category_problems(cats)
    problems += _distance_problems(data.get("distances") or [], genus_by_id)
    if images and not anns:
        problems.append(Problem(
            "$.annotations", "", "annotations (image_id, category_id) to train on",
            "0 annotations: nothing to train on",
            "add the labels; an unlabelled image list is fine for embed and predict, but "
            "train and evaluate need labelled images", severity="warning"))
    return problems


def _schema_problems(data: Mapping) -> list[Problem]:
    """JSON Schema violations, each with its JSON path, record and a fix."""
    import jsonschema

    problems = []
    validator = jsonschema.Draft202012Validator(load_schema())
    for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.path))):
        parts = list(err.absolute_path)
        record = ""
        if len(parts) >= 2 and isinstance(parts[1], int):
            record = _rec(data[parts[0]][parts[1]], "image_id", "category_id", "genus_id", "id")
        found = repr(err.instance) if len(repr(err.instance)) < 80 else type(err.instance).__name__
        if err.validator == "required":
            missing = err.message.split("'")[1] if "'" in err.message else err.message
            expected, found = f"a {missing!r} field", f"no {missing!r}"
            fix = f"add {missing!r} to this record"
        elif err.validator == "type":
            expected = f"type {err.validator_value}"
            fix = f"write a value of type {err.validator_value}"
        else:
            expected = f"{err.validator} {err.validator_value!r}"
            fix = err.message
        problems.append(Problem(_json_path(parts), record, expected, found, fix))
    return problems


def _duplicate_problems(section: str, key: str, items: list) -> list[Problem]:
    """One problem per repeated ``key`` in ``section`` (the first use is not reported)."""
    counts = Counter(it[key] for it in items)
    dup = {k for k, c in counts.items() if c > 1}
    seen: set = set()
    problems = []
    for i, it in enumerate(items):
        if it[key] in dup:
            if it[key] in seen:
                problems.append(Problem(
                    f"$.{section}[{i}].{key}", _rec(it, key), f"a unique {key}",
                    f"{it[key]!r} used {counts[it[key]]} times",
                    f"give each {section[:-1]} its own {key} or remove the copy"))
            seen.add(it[key])
    return problems


def _text_collision_problems(section: str, key: str, items: list) -> list[Problem]:
    """Ids that differ in JSON but are equal as text (``201`` and ``"201"``): every cache,
    split file and output names images by the text of their id."""
    forms: dict[str, dict] = defaultdict(dict)
    for i, it in enumerate(items):
        forms[str(it[key])].setdefault(repr(it[key]), i)
    problems = []
    for text, seen in forms.items():
        if len(seen) > 1:
            first, *rest = sorted(seen.values())
            problems.extend(Problem(
                f"$.{section}[{i}].{key}", _rec(items[i], key),
                f"a {key} that differs from every other as text",
                f"{items[i][key]!r}, which reads as {text!r} like {items[first][key]!r} at "
                f"$.{section}[{first}]",
                f"write every {key} as a number, or every one as a string, and keep them "
                "unique") for i in rest)
    return problems


def _outside_root_problems(images: list, allow: bool) -> list[Problem]:
    """``file_name``s that are absolute or climb out of the images root."""
    problems = []
    for i, im in enumerate(images):
        why = outside_root_reason(str(im["file_name"]))
        if why is None or (allow and why != "the images root itself"):
            continue
        problems.append(Problem(
            f"$.images[{i}].file_name", _rec(im, "image_id"),
            "a file path relative to the images root, inside it",
            f"{im['file_name']!r}, {why}",
            "move the image under the images root and write its path relative to it (to "
            "read images outside the root on purpose: --allow-outside-root, or "
            "data.allow_outside_root: true in a training config)"))
    return problems


def _control_character_problems(images: list) -> list[Problem]:
    """``file_name``s with a NUL or another control character (no real path has them)."""
    bad = {i: control_characters(str(im["file_name"])) for i, im in enumerate(images)}
    return [Problem(f"$.images[{i}].file_name", _rec(images[i], "image_id"),
                    "a file path without control characters",
                    f"{images[i]['file_name']!r} (holds {', '.join(chars)})",
                    "write the file's real name (a tab, newline or NUL in a name is usually a "
                    "copy-paste or export error)") for i, chars in bad.items() if chars]


def _same_file_problems(images: list, anns: list) -> list[Problem]:
    """One file listed under several image ids: an error when their labels differ (the same
    pixels would train as two taxa), a warning when they agree (it counts twice)."""
    by_file: dict[str, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        by_file[os.path.normpath(str(im["file_name"]).replace("\\", "/"))].append(i)
    labels: dict[object, set] = defaultdict(set)
    for a in anns:
        labels[a["image_id"]].add(a["category_id"])
    problems = []
    for fname, idx in by_file.items():
        if len(idx) < 2:
            continue
        ids = [images[i]["image_id"] for i in idx]
        cats = sorted({repr(c) for i in ids for c in labels.get(i, ())})
        differ = len(cats) > 1
        problems.append(Problem(
            f"$.images[{idx[1]}].file_name", f"image_id={ids[1]!r}",
            "each file listed once", f"{fname!r} listed under image ids {ids[:5]}"
            + (f" with different categories {cats[:5]}" if differ else ""),
            "list the file once with its one label" if differ
            else "drop the copies (the image counts once per listing)",
            severity="error" if differ else "warning"))
    return problems


def _annotation_problems(anns: list, images: list, cats: list,
                         genus_by_id: Mapping) -> list[Problem]:
    """Annotations: one per image, pointing at listed images, categories and genera."""
    image_ids = {im["image_id"] for im in images}
    cat_by_id = {c["category_id"]: c for c in cats}
    labelled: Counter = Counter()
    problems = []
    add = problems.append
    if anns and not cats:  # one problem, not one per annotation
        add(Problem("$.categories", "", "a 'categories' list (the annotations name "
                    "category_ids)", "no categories",
                    "add the categories (category_id, family, genus, species), or drop the "
                    "annotations for an unlabelled image list"))
    for i, a in enumerate(anns):
        rec = _rec(a, "image_id", "category_id")
        labelled[a["image_id"]] += 1
        if labelled[a["image_id"]] == 2:
            add(Problem(f"$.annotations[{i}].image_id", rec, "one annotation per image",
                        "a second annotation for this image",
                        "keep one label per image (taxoclass is single-label per image)"))
        if a["image_id"] not in image_ids:
            add(Problem(f"$.annotations[{i}].image_id", rec,
                        "an image_id listed in 'images'", repr(a["image_id"]),
                        "add the image to 'images' or remove the annotation"))
        cat = cat_by_id.get(a["category_id"])
        if cat is None:
            if cats:
                add(Problem(f"$.annotations[{i}].category_id", rec,
                            "a category_id listed in 'categories'", repr(a["category_id"]),
                            "add the category or correct the annotation's category_id"))
            continue
        problems.extend(_genus_id_problems(i, a, rec, cat, genus_by_id))
    return problems


def _genus_id_problems(i: int, a: Mapping, rec: str, cat: Mapping,
                       genus_by_id: Mapping) -> list[Problem]:
    gid = a.get("genus_id")
    if gid is None or not genus_by_id:
        return []
    gname = genus_by_id.get(gid)
    if gname is None:
        return [Problem(f"$.annotations[{i}].genus_id", rec, "a genus_id listed in 'genera'",
                        repr(gid), "add the genus to 'genera' or correct genus_id")]
    if gname != cat.get("genus"):
        return [Problem(f"$.annotations[{i}].genus_id", rec,
                        f"genus_id of {cat.get('genus')!r} (the category's genus)",
                        f"genus_id {gid} = {gname!r}",
                        "correct the annotation's genus_id or the category's genus")]
    return []


def _gap_problems(i: int, c: Mapping, ranks: Sequence[str]) -> list[Problem]:
    """A category may stop at any rank, but no rank above its lowest filled one may be empty."""
    rec = _rec(c, "category_id", "scientificName")
    filled = [bool(str(c.get(r) or "").strip()) for r in ranks]
    if not any(filled):
        return [Problem(f"$.categories[{i}]", rec, f"a name at one of the ranks "
                        f"{', '.join(ranks)}", "every rank empty",
                        "fill in the ranks down to the one the label stops at")]
    low = max(k for k, f in enumerate(filled) if f)
    return [Problem(f"$.categories[{i}].{ranks[k]}", rec, f"a non-empty {ranks[k]} (above the "
                    f"{ranks[low]} {str(c.get(ranks[low])).strip()!r})", "''",
                    f"fill in the {ranks[k]}: a category may stop at any rank (leave the ranks "
                    f"below it empty), but every rank above its lowest one must be filled")
            for k in range(low) if not filled[k]]


def _epithet_problems(i: int, c: Mapping, ranks: Sequence[str]) -> list[Problem]:
    """Without a genus rank a species is named by its ``species`` field alone, so a bare
    epithet (``"campestre"``) would be a name shared across genera: a warning."""
    sp = str(c.get("species") or "").strip()
    if "genus" in ranks or not sp or " " in sp:
        return []
    return [Problem(f"$.categories[{i}].species", _rec(c, "category_id", "scientificName"),
                    "a binomial ('Genus epithet'): the file has no genus rank",
                    repr(sp), "write the species as its binomial, e.g. 'Acer campestre', or "
                    "add a genus field", severity="warning")]


def _category_problems(cats: list) -> list[Problem]:
    """Taxon consistency across categories: no rank missing above a filled one, one parent
    per taxon, no twins. A category may stop at any rank (family-only, genus-only)."""
    problems = []
    parents: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    ranks = category_ranks(cats)
    for i, c in enumerate(cats):
        problems += _gap_problems(i, c, ranks)
        problems += _epithet_problems(i, c, ranks)
        values = rank_values(c, ranks)
        for k in range(1, len(ranks)):
            if values[k] and values[k - 1]:
                parents[(ranks[k], values[k])][values[k - 1]].append(i)
    for (rank, name_), ups in parents.items():
        if len(ups) > 1:
            detail = "; ".join(f"{u!r} in categories at {idx[:5]}" for u, idx in ups.items())
            first = min(i for idx in ups.values() for i in idx)
            problems.append(Problem(
                f"$.categories[{first}].{rank}", f"{rank}={name_!r}",
                f"{rank} {name_!r} under one parent",
                f"{len(ups)} parents: {detail}; they become {len(ups)} taxa named {name_!r} "
                "(homonyms), each under its own parent",
                f"nothing, if they are homonyms; if they are one {rank}, make every category "
                f"that names {rank} {name_!r} use the same parent", severity="warning"))
    dup_names = Counter(tuple(rank_values(c, ranks)) for c in cats)
    for path, n in dup_names.items():
        if n > 1 and "species" in ranks and path[ranks.index("species")]:
            name_ = path[ranks.index("species")]
            problems.append(Problem(
                "$.categories", name_, "one category per taxon",
                f"{n} categories for {name_} ({' > '.join(p for p in path[:-1] if p)})",
                "merge the categories (or tell them apart, e.g. by authors)",
                severity="warning"))
    return problems


def _distance_problems(distances: list, genus_by_id: Mapping) -> list[Problem]:
    return [Problem(f"$.distances[{i}].{k}", _rec(d, k), "a genus_id listed in 'genera'",
                    repr(d[k]), "add the genus to 'genera' or drop the distance")
            for i, d in enumerate(distances) for k in ("genus_id_x", "genus_id_y")
            if genus_by_id and d[k] not in genus_by_id]


def _file_problems(images: list, root: Path) -> list[Problem]:
    """Image files missing under ``root`` (or ``root`` itself missing)."""
    if not root.is_dir():
        return [Problem("--images-root", str(root), "an existing directory",
                        "no such directory", "pass the folder that holds the images' file_name "
                        "paths")]
    return [Problem(f"$.images[{i}].file_name", _rec(im, "image_id"),
                    f"a file under {root}", f"{im['file_name']!r} missing",
                    "restore the image or remove it and its annotation")
            for i, im in enumerate(images) if not (root / im["file_name"]).is_file()]


def _counts(data: Mapping, name: str, images: list, anns: list, cats: list, *,
            ok: bool) -> dict[str, int]:
    """What the report's summary line counts (taxa per rank only for a valid file)."""
    counts = {"images": len(images), "annotations": len(anns), "categories": len(cats)}
    ranks = category_ranks(cats)
    if cats and ok and ranks:
        tax = Taxonomy.from_records(cats, ranks, source=name)
        counts.update({f"{r} taxa": n for r, n in tax.summary().items()
                       if r != "placeholders"})
        stops = Counter(max((r for r in ranks if str(c.get(r) or "").strip()),
                            key=ranks.index) for c in cats)
        counts.update({f"{r}-level categories": stops[r] for r in ranks[:-1] if stops[r]})
    return counts
