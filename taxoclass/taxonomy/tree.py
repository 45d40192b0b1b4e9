"""The taxonomy: one networkx tree (root → family → genus → species, or any ordered rank
list such as order → family → species or kingdom → … → species) that every module asks.

Node identity is the full path from the root, a tuple of names: ``("Fagaceae",
"Quercus", "Quercus robur")``. The same genus name under two families is therefore two
nodes. Each rank's nodes are numbered ``0..n-1`` in sorted path order; those numbers
are the class indices of the model head for that rank, and the index arrays
(`parent_index`) map species to genus and family without any string look-ups.

A record may stop at any rank (``species == ""``, e.g. *Philadelphus sp.*; a family-only
``Scaridae``): it is a label at its lowest filled rank and maps to that node, or, when
that taxon has no named children, to its placeholder chain (``"Scaridae sp."`` at every
rank below), so that every path has full depth. A label above the lowest rank has
class index -1 at the ranks below it (:meth:`Taxonomy.path_indices`) unless it stands on
placeholders.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd

from ..errors import TaxonomyError

DEFAULT_RANKS: tuple[str, ...] = ("family", "genus", "species")
#: The ranks taxoclass knows, top-down (``data.ranks: auto`` takes those the data has).
KNOWN_RANKS: tuple[str, ...] = (
    "kingdom", "phylum", "class", "order", "family", "subfamily", "tribe", "genus", "species",
)
ROOT: tuple[str, ...] = ()
#: Name used for a missing higher rank that cannot be filled from other records.
INCERTAE_SEDIS = "incertae sedis"

Node = tuple[str, ...]


def species_name(genus: str, species: str) -> str:
    """Binomial display name: ``("Acer", "rubrum") -> "Acer rubrum"``.

    A species field that already holds the full name (PlantCLEF: ``"Lactuca virosa L."``)
    is kept as written.
    """
    species = species.strip()
    genus = genus.strip()
    if not species:
        return ""
    if genus and (species == genus or species.startswith(genus + " ")):
        return species
    return f"{genus} {species}".strip()


def rank_values(record: Mapping[str, object], ranks: Sequence[str]) -> list[str]:
    """The name at each of ``ranks`` in ``record`` ("" where empty).

    The species is a binomial: with a ``genus`` rank, ``species_name(genus, species)``;
    without one (``order, family, species``) the ``species`` field as written when it is
    a binomial, else joined to the record's ``genus`` field when it has one.
    """
    row = [_clean(record.get(r)) for r in ranks]
    if "species" in ranks:
        si = list(ranks).index("species")
        row[si] = species_name(_clean(record.get("genus")), row[si])
    return row


def _clean(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and np.isnan(value):
        return ""
    return str(value).strip()


class Taxonomy:
    """A rooted tree of taxa with per-rank class indices.

    Build it with :meth:`from_records` (category records or a species table) or
    :meth:`from_dict` (a saved bundle). ``ranks`` is ordered from the top
    (``"family"``) to the bottom (``"species"``).
    """

    def __init__(self, graph: nx.DiGraph, ranks: Sequence[str],
                 genus_distances: Mapping[tuple[str, str], float] | None = None) -> None:
        self.graph = graph
        self.ranks: tuple[str, ...] = tuple(ranks)
        if len(set(self.ranks)) != len(self.ranks) or not self.ranks:
            raise TaxonomyError(f"Taxonomy ranks must be distinct and non-empty, got {self.ranks}.")
        if ROOT not in graph:
            raise TaxonomyError("Taxonomy graph has no root node ().")
        if not nx.is_arborescence(graph):
            raise TaxonomyError("Taxonomy graph is not a tree rooted at () (a cycle or a node "
                                "with two parents).")
        self._nodes: dict[str, list[Node]] = {r: [] for r in self.ranks}
        for node in graph.nodes:
            if node == ROOT:
                continue
            if len(node) > len(self.ranks):
                raise TaxonomyError(f"Node {node} is deeper than the ranks {self.ranks}.")
            self._nodes[self.ranks[len(node) - 1]].append(node)
        for r in self.ranks:
            self._nodes[r].sort()
        self._index: dict[Node, int] = {}
        for r in self.ranks:
            for i, n in enumerate(self._nodes[r]):
                self._index[n] = i
        #: Phylogenetic distances between genera (Herbarium ``distances``), keyed by names.
        self.genus_distances: dict[tuple[str, str], float] = dict(genus_distances or {})

    # ------------------------------------------------------------------ building
    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, object]],
                     ranks: Sequence[str] = DEFAULT_RANKS, *, source: str = "records",
                     fill_missing: bool = True, placeholders: bool = True) -> Taxonomy:
        """Build from rows with one column per rank (``family``, ``genus``, ``species``).

        A row may stop at any rank (empty ``species``: a genus-level taxon; empty genus
        and species: a family-level one). A missing higher
        rank is filled from another row that names the same lower taxon, else set to
        ``"incertae sedis"``. A row with a lower rank but nothing at the top ranks and no
        way to fill it, or a gap in the middle of a path, raises :class:`TaxonomyError`.

        With ``placeholders`` (default), a taxon known only above the lowest rank (a genus
        with no named species) gets one placeholder child at each rank below it, named
        ``"Philadelphus sp."``, so every path has full depth and the lowest-rank head has
        a class for it. Reports show a placeholder at its real rank (genus).
        """
        ranks = tuple(ranks)
        _check_rank_order(ranks, source)
        rows = [rank_values(rec, ranks) for rec in records]
        if fill_missing:
            rows = _fill_higher_ranks(rows)
        graph = nx.DiGraph()
        graph.add_node(ROOT, rank="root", name="root")
        for line, row in enumerate(rows):
            depth = len(row)
            while depth > 0 and not row[depth - 1]:
                depth -= 1
            if depth == 0:
                continue
            if any(not v for v in row[:depth]):
                missing = [ranks[i] for i in range(depth) if not row[i]]
                raise TaxonomyError(
                    f"{source}: record {line} names {ranks[depth - 1]} {row[depth - 1]!r} but "
                    f"has no {', '.join(missing)}. Expected every rank above the lowest one "
                    f"filled; fill the {', '.join(missing)} column(s).")
            parent: Node = ROOT
            for i in range(depth):
                node = tuple(row[: i + 1])
                if node not in graph:
                    graph.add_node(node, rank=ranks[i], name=row[i])
                    graph.add_edge(parent, node)
                parent = node
        if placeholders:
            _add_placeholders(graph, ranks)
        return cls(graph, ranks)

    @classmethod
    def from_dict(cls, data: Mapping) -> Taxonomy:
        """Inverse of :meth:`to_dict`."""
        try:
            ranks = tuple(data["ranks"])
            graph = nx.DiGraph()
            graph.add_node(ROOT, rank="root", name="root")
            holders = {tuple(p) for p in data.get("placeholders", [])}
            for path in data["nodes"]:
                node = tuple(path)
                graph.add_node(node, rank=ranks[len(node) - 1], name=node[-1],
                               placeholder=node in holders)
                graph.add_edge(node[:-1], node)
            dist = {(a, b): float(d) for a, b, d in data.get("genus_distances", [])}
        except (KeyError, TypeError, IndexError) as exc:
            raise TaxonomyError(f"Saved taxonomy is malformed ({exc!r}); re-save the bundle "
                                "with this version of taxoclass.") from exc
        return cls(graph, ranks, dist)

    def to_dict(self) -> dict:
        """JSON-able form: ranks and every node path, parents before children."""
        nodes = [list(n) for r in self.ranks for n in self._nodes[r]]
        dist = [[a, b, d] for (a, b), d in sorted(self.genus_distances.items())]
        holders = [list(n) for n in nodes if self.is_placeholder(tuple(n))]
        return {"ranks": list(self.ranks), "nodes": nodes, "placeholders": holders,
                "genus_distances": dist}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Taxonomy:
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ------------------------------------------------------------------ look-ups
    def nodes(self, rank: str) -> list[Node]:
        """Nodes of ``rank`` in class-index order."""
        return list(self._nodes[self._check_rank(rank)])

    def names(self, rank: str) -> list[str]:
        """Display names of ``rank`` in class-index order."""
        return [n[-1] for n in self._nodes[self._check_rank(rank)]]

    def n_classes(self, rank: str) -> int:
        return len(self._nodes[self._check_rank(rank)])

    @property
    def sizes(self) -> dict[str, int]:
        """Number of taxa per rank, top-down."""
        return {r: len(self._nodes[r]) for r in self.ranks}

    def index(self, node: Node) -> int:
        """Class index of ``node`` within its rank."""
        try:
            return self._index[tuple(node)]
        except KeyError:
            raise TaxonomyError(f"Taxon {node} is not in this taxonomy.") from None

    def node(self, rank: str, index: int) -> Node:
        return self._nodes[self._check_rank(rank)][index]

    def rank_of(self, node: Node) -> str:
        return self.ranks[len(node) - 1] if node else "root"

    def find(self, name: str, rank: str | None = None) -> list[Node]:
        """All nodes whose display name is ``name`` (several if it is a homonym)."""
        ranks = [self._check_rank(rank)] if rank else list(self.ranks)
        return [n for r in ranks for n in self._nodes[r] if n[-1] == name]

    def parent(self, node: Node) -> Node:
        if not node:
            raise TaxonomyError("The root has no parent.")
        return tuple(node[:-1])

    def children(self, node: Node) -> list[Node]:
        return sorted(self.graph.successors(tuple(node)))

    def ancestors(self, node: Node) -> list[Node]:
        """Ancestors from the parent up to the root (root included, node excluded)."""
        node = tuple(node)
        return [node[:i] for i in range(len(node) - 1, -1, -1)]

    def lca(self, a: Node, b: Node) -> Node:
        """Lowest common ancestor (the longest shared path prefix)."""
        k = 0
        for x, y in zip(a, b):
            if x != y:
                break
            k += 1
        return tuple(a[:k])

    def distance(self, a: Node, b: Node) -> int:
        """Number of tree edges between two taxa."""
        c = len(self.lca(a, b))
        return (len(a) - c) + (len(b) - c)

    def genus_distance(self, genus_a: str, genus_b: str) -> float | None:
        """Phylogenetic distance between two genera from the Herbarium ``distances`` table."""
        if genus_a == genus_b:
            return 0.0
        d = self.genus_distances.get((genus_a, genus_b))
        return d if d is not None else self.genus_distances.get((genus_b, genus_a))

    def parent_index(self, rank: str, parent_rank: str | None = None) -> np.ndarray:
        """For each class of ``rank``, the class index of its ancestor at ``parent_rank``.

        ``parent_index("species", "family")`` maps species to families. Defaults to the
        rank directly above.
        """
        return self._parent_index[(self._check_rank(rank),
                                   parent_rank or self.ranks[self.ranks.index(rank) - 1])]

    @cached_property
    def _parent_index(self) -> dict[tuple[str, str], np.ndarray]:
        out = {}
        for i, child in enumerate(self.ranks):
            for j in range(i):
                parent = self.ranks[j]
                out[(child, parent)] = np.array(
                    [self._index[n[: j + 1]] for n in self._nodes[child]], dtype=np.int64)
        return out

    def leaf_nodes(self, rank: str) -> list[Node]:
        """Nodes of ``rank`` (above the lowest rank) that have no children.

        These are taxa known only at that rank, e.g. *Philadelphus* when the data holds
        *Philadelphus sp.* and no named *Philadelphus* species.
        """
        return [n for n in self._nodes[self._check_rank(rank)] if self.graph.out_degree(n) == 0]

    def path_indices(self, node: Node) -> dict[str, int]:
        """Class index at every rank of ``node``'s path; ranks below it get -1."""
        node = tuple(node)
        if node and node not in self._index:
            raise TaxonomyError(f"Taxon {node} is not in this taxonomy.")
        return {r: (self._index[node[: i + 1]] if i < len(node) else -1)
                for i, r in enumerate(self.ranks)}

    def node_for(self, record: Mapping[str, object]) -> Node:
        """The node a record (``family``/``genus``/``species`` fields) names.

        Raises :class:`TaxonomyError` if it is not in the taxonomy.
        """
        row = rank_values(record, self.ranks)
        depth = len(row)
        while depth > 0 and not row[depth - 1]:
            depth -= 1
        node = tuple(row[:depth])
        while node in self._index and len(node) < len(self.ranks):
            kids = [k for k in self.graph.successors(node) if self.is_placeholder(k)]
            if not kids:
                break
            node = kids[0]
        if node not in self._index:
            lowest = node[-1] if node else "(empty record)"
            hits = self.find(lowest) if node else []
            hint = f" Found {lowest!r} at {[list(h) for h in hits]}." if hits else ""
            raise TaxonomyError(f"Taxon {list(node)} is not in this taxonomy.{hint}")
        return node

    def label(self, node: Node) -> str:
        """Botanical display label: species as named, a genus-level answer as ``Quercus sp.``."""
        node = self.reported(node)
        rank = self.rank_of(node)
        if rank == "genus" and "species" in self.ranks:
            return f"{node[-1]} sp."
        return node[-1] if node else "root"

    # ------------------------------------------------------------------ output
    def to_frame(self) -> pd.DataFrame:
        """One row per taxon: rank, index, name, parent, the full path, number of children."""
        rows = []
        for r in self.ranks:
            for i, n in enumerate(self._nodes[r]):
                row = {"rank": r, "index": i, "name": n[-1],
                       "parent": n[-2] if len(n) > 1 else "root",
                       "n_children": self.graph.out_degree(n)}
                row.update({rr: (n[k] if k < len(n) else "") for k, rr in enumerate(self.ranks)})
                rows.append(row)
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, int]:
        """Real taxa per rank (placeholders not counted) and the number of placeholders."""
        out = {r: sum(1 for n in self._nodes[r] if not self.is_placeholder(n))
               for r in self.ranks}
        n_holders = sum(1 for r in self.ranks for n in self._nodes[r] if self.is_placeholder(n))
        if n_holders:
            out["placeholders"] = n_holders
        return out

    def is_placeholder(self, node: Node) -> bool:
        """True for the ``"Genus sp."`` child added under a taxon with no named children."""
        return bool(self.graph.nodes[tuple(node)].get("placeholder", False)) if node else False

    def reported(self, node: Node) -> Node:
        """The real taxon a node stands for: placeholders climb to their named ancestor."""
        node = tuple(node)
        while node and self.is_placeholder(node):
            node = node[:-1]
        return node

    def __repr__(self) -> str:
        sizes = ", ".join(f"{r}={n}" for r, n in self.sizes.items())
        return f"Taxonomy({sizes})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Taxonomy) and self.ranks == other.ranks
                and self._nodes == other._nodes and self.genus_distances == other.genus_distances)

    def _check_rank(self, rank: str) -> str:
        if rank not in self.ranks:
            raise TaxonomyError(f"Unknown rank {rank!r}; this taxonomy has ranks {self.ranks}.")
        return rank


def _check_rank_order(ranks: Sequence[str], source: str) -> None:
    """Known ranks must come top-down (``family, genus, species``), or the tree is upside
    down; other rank names are the caller's own and are not ordered."""
    known = [r for r in ranks if r in KNOWN_RANKS]
    ordered = sorted(known, key=KNOWN_RANKS.index)
    if known != ordered:
        raise TaxonomyError(
            f"{source}: ranks {', '.join(ranks)} are not in top-down order. Expected them "
            f"from the top rank to the lowest, e.g. {','.join(ordered)} (--ranks / data.ranks).")


def _add_placeholders(graph: nx.DiGraph, ranks: Sequence[str]) -> None:
    """Give every node above the lowest rank that has no children a chain of placeholders."""
    depth = len(ranks)
    for node in [n for n in graph.nodes if n and len(n) < depth and graph.out_degree(n) == 0]:
        parent = node
        for i in range(len(node), depth):
            child = (*parent, f"{node[-1]} sp.")
            graph.add_node(child, rank=ranks[i], name=child[-1], placeholder=True)
            graph.add_edge(parent, child)
            parent = child


def _fill_higher_ranks(rows: list[list[str]]) -> list[list[str]]:
    """Fill empty higher ranks from other rows naming the same lower taxon.

    E.g. a PlantCLEF species without a family gets the family that its genus has in
    other rows; if none does, ``"incertae sedis"``.
    """
    n = len(rows[0]) if rows else 0
    # For each rank below the top, map a name to the (unique) non-empty value above it.
    for level in range(n - 1, 0, -1):
        seen: dict[str, set[str]] = {}
        for row in rows:
            if row[level] and row[level - 1]:
                seen.setdefault(row[level], set()).add(row[level - 1])
        for row in rows:
            depth = max((i + 1 for i, v in enumerate(row) if v), default=0)
            if level < depth and not row[level - 1]:
                found = seen.get(row[level], set())
                row[level - 1] = next(iter(found)) if len(found) == 1 else INCERTAE_SEDIS
    return rows
