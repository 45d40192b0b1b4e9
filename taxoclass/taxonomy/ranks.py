"""The rank list of an annotation file: the ranks its categories fill, or a list checked
against them (``data.ranks``: a list, top-down, or ``auto``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import AnnotationError
from .tree import KNOWN_RANKS

__all__ = ["category_ranks", "check_ranks"]


def category_ranks(cats: Sequence[Mapping]) -> tuple[str, ...]:
    """The known ranks (:data:`~taxoclass.taxonomy.tree.KNOWN_RANKS`: kingdom … species)
    that at least one category fills, top-down: what ``data.ranks: auto`` trains on."""
    return tuple(r for r in KNOWN_RANKS
                 if any(str(c.get(r) or "").strip() for c in cats if isinstance(c, Mapping)))


def check_ranks(ranks: Sequence[str], cats: Sequence[Mapping], source: str) -> tuple[str, ...]:
    """``ranks`` (a list, or ``"auto"``: :func:`category_ranks`) checked against the
    categories: each rank must be filled in at least one category, else
    :class:`AnnotationError` naming it and the ranks the file has."""
    found = category_ranks(cats)
    if isinstance(ranks, str):
        if ranks != "auto":
            raise AnnotationError(f"data.ranks: expected a list of ranks or 'auto', found "
                                  f"{ranks!r}.")
        if not found:
            raise AnnotationError(f"{source}: no category fills any known rank "
                                  f"({', '.join(KNOWN_RANKS)}); expected rank fields such as "
                                  "family, genus, species.")
        return found
    ranks = tuple(ranks)
    missing = [r for r in ranks
               if not any(str(c.get(r) or "").strip() for c in cats if isinstance(c, Mapping))]
    if missing:
        raise AnnotationError(
            f"{source}: no category has a {', '.join(repr(r) for r in missing)} (data.ranks "
            f"{list(ranks)}); the categories fill the ranks {list(found)}. Fix: set data.ranks "
            f"to ranks the file has (e.g. {list(found)}, or 'auto'), or add the field(s) to "
            "the categories.")
    return ranks
