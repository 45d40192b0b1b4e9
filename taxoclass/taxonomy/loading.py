"""A taxonomy from the files users have: an annotations JSON or a species table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import AnnotationError
from .tree import DEFAULT_RANKS, Taxonomy


def load_taxonomy(source: str | Path, ranks: Sequence[str] | str = DEFAULT_RANKS) -> Taxonomy:
    """Taxonomy from an annotations JSON (validated) or a species table (CSV / ``;``).

    ``ranks``: top-down, or ``"auto"`` (also ``["auto"]``): the known ranks the records fill.
    """
    from .annotations import load_annotations, read_species_table
    from .validation import check_ranks

    if not isinstance(ranks, str) and list(ranks) == ["auto"]:
        ranks = "auto"

    source = Path(source)
    if not source.exists():
        raise AnnotationError(f"{source}: not found. Expected an annotations JSON or a species "
                              "table (CSV).")
    if source.suffix.lower() == ".json":  # image paths play no part in a taxonomy
        return load_annotations(source, allow_outside_root=True).taxonomy(ranks)
    table = read_species_table(source)
    if isinstance(ranks, str):
        ranks = check_ranks(ranks, table.to_dict("records"), str(source))
    missing = [r for r in ranks if r not in table.columns]
    if missing:
        raise AnnotationError(f"{source}: no {', '.join(repr(r) for r in missing)} column; "
                              f"expected one column per rank {tuple(ranks)}, found columns "
                              f"{list(table.columns)}. Add the column(s) or choose ranks the "
                              "table has (--ranks).")
    return Taxonomy.from_records(table.to_dict("records"), ranks, source=str(source))
