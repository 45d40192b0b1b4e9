"""Plot aggregation across the taxonomic tree: tile probabilities → the taxa of a plot.

Each tile carries coherent per-rank probabilities (genus = sum of its species). A rule
turns the tiles' probabilities into one score per taxon and rank:

- ``"argmax_union"``: the arg-max species of every tile, united (the PlantCLEF 2024
  DS@GT baseline); with the default species threshold of 0 it is exactly that baseline.
- ``"max"``: the best tile's probability.
- ``"noisy_or"``: ``1 - Π(1 - p)`` over tiles (evidence accumulates across tiles).
- ``"mean"``: the (weighted) mean probability over tiles.
- ``"learned"``: scores computed elsewhere and passed in (``scores=``), e.g. by
  :class:`taxoclass.plots.learned.LearnedPlotRule` fitted on calibration plots.

Records are chosen bottom-up so each find is named once, at the lowest rank its evidence
supports: a species where its score passes the species threshold; a genus (``Carex sp.``)
where the genus passes its threshold and none of its species is reported; a family
likewise. A species and its own genus are never both reported. Tiles flagged unknown
(outliers) give no taxon evidence; they are counted in one ``"unknown"`` record.

Records speak the image vocabulary (:mod:`taxoclass.vocab`): ``reason`` is the lowest
rank's name (``species``) for a find at the lowest rank, ``backoff_to_<rank>:low_confidence``
for a find backed off to a higher rank, ``unknown:outlier`` for the unknown record; the
aggregation setting is its own column, ``rule`` (``max``, ``max+checklist``). ``taxon`` is
written as in predictions (``"Carex sp."`` at genus rank). The unknown record has no
``score`` (NaN); ``tile_share`` is the share of the plot's tiles a record counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ConfigError, TaxonomyError
from ..vocab import UNKNOWN, Reason, Rule, plot_reason, plot_rule, unknown_reason
from .selection import LEARNED, RULES, keep_top_k, rank_evidence

__all__ = [
    "DEFAULT_THRESHOLDS",
    "PlotRecord",
    "aggregate_plot",
    "apply_checklist",
    "checklist_mask",
    "resolve_thresholds",
    "tile_assignments",
]

#: Per rule, by position from the bottom of the rank list: the lowest rank (``species`` in
#: family/genus/species), the rank above it, and every higher rank. Any rank list takes
#: them by position (order/family/species: species 0.0, family 0.5, order 0.5 for
#: ``argmax_union``), so the defaults never name a rank the taxonomy lacks.
DEFAULT_THRESHOLDS: dict[str, tuple[float, float, float]] = {
    Rule.ARGMAX_UNION.value: (0.0, 0.5, 0.5),
    Rule.MAX.value: (0.5, 0.6, 0.7),
    Rule.NOISY_OR.value: (0.9, 0.95, 0.98),
    Rule.MEAN.value: (0.1, 0.15, 0.2),
    LEARNED: (0.5, 0.5, 0.5),
}


@dataclass
class PlotRecord:
    """One find in a plot: a taxon at the rank its evidence supports, and why.

    ``taxon_rank`` is ``"species"``, ``"genus"``, ``"family"`` (any taxonomy rank) or
    ``"unknown"``; ``taxon`` its display label (``"Carex sp."`` at genus rank);
    ``node`` the taxon's full path in the taxonomy (empty for unknown); ``n_tiles`` the
    tiles that support it; ``reason`` why it sits at that rank (the words of
    :mod:`taxoclass.vocab`, as in predictions); ``rule`` the aggregation setting that
    scored it; ``tile_share`` ``n_tiles`` over the plot's tiles. ``confidence``: the
    highest calibrated confidence among the tiles that support the record (each tile's
    probability of the taxon at its rank through the model's per-rank calibration, the map
    ``predict`` uses; set by the report, NaN until then). ``score`` and ``confidence`` are
    NaN for the unknown record (written as an empty cell / JSON null).
    """

    plot_id: str
    taxon_rank: str
    taxon: str
    score: float
    n_tiles: int
    reason: str
    node: tuple[str, ...] = field(default_factory=tuple)
    rule: str = ""
    tile_share: float = float("nan")
    confidence: float = float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["node"] = list(self.node)
        for key in ("score", "tile_share", "confidence"):
            value = float(getattr(self, key))
            d[key] = None if np.isnan(value) else value
        d["n_tiles"] = int(self.n_tiles)
        return d


# ---------------------------------------------------------------------- checklist
def checklist_mask(taxonomy, checklist: Sequence[str]) -> np.ndarray:
    """Boolean mask over lowest-rank classes: True where the leaf is on the checklist.

    A checklist name may be at any rank (``"Carex"``, ``"Carex sp."``, ``"Poaceae"``,
    ``"Carex nigra"``); a leaf is allowed when any taxon on its path is named. Names not
    in the taxonomy are ignored (a regional list names taxa the model never saw), but a
    checklist that matches nothing raises :class:`TaxonomyError`.
    """
    lowest = taxonomy.ranks[-1]
    mask = np.zeros(taxonomy.n_classes(lowest), dtype=bool)
    matched = 0
    for raw in checklist:
        name = str(raw).strip()
        if not name:
            continue
        hits = taxonomy.find(name)
        if not hits and name.endswith(" sp."):
            hits = taxonomy.find(name[:-4].strip())
        if not hits:
            continue
        matched += 1
        for node in hits:
            rank = taxonomy.rank_of(node)
            if rank == lowest:
                mask[taxonomy.index(node)] = True
            else:
                mask |= taxonomy.parent_index(lowest, rank) == taxonomy.index(node)
    if not matched:
        shown = ", ".join(repr(str(c)) for c in list(checklist)[:5])
        raise TaxonomyError(f"None of the {len(checklist)} checklist names ({shown}...) is in "
                            f"the model's taxonomy {taxonomy}. Expected names at any rank, "
                            "e.g. 'Carex nigra', 'Carex' or 'Poaceae'.")
    return mask


def apply_checklist(probs: Mapping[str, np.ndarray], taxonomy, checklist: Sequence[str], *,
                    outside_weight: float = 0.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Re-weight leaf probabilities to a checklist, renormalise, and sum up the tree again.

    ``outside_weight = 0`` restricts to the checklist; ``0 < w < 1`` down-weights taxa
    outside it. Returns the new probabilities and a per-tile boolean that is True where
    no probability mass was left (every likely taxon was off the checklist): such a
    tile is evidence of something unlisted, and the caller should count it as unknown.
    """
    if not 0.0 <= outside_weight <= 1.0:
        raise ConfigError(f"outside_weight must be in [0, 1], got {outside_weight}.")
    lowest = taxonomy.ranks[-1]
    mask = checklist_mask(taxonomy, checklist)
    leaf = np.asarray(probs[lowest], dtype=np.float64) * np.where(mask, 1.0, outside_weight)
    total = leaf.sum(axis=1, keepdims=True)
    empty = total[:, 0] <= 1e-12
    leaf = np.where(empty[:, None], 0.0, leaf / np.maximum(total, 1e-300))
    return _up_the_tree(leaf, taxonomy), empty


def _up_the_tree(leaf: np.ndarray, taxonomy) -> dict[str, np.ndarray]:
    lowest = taxonomy.ranks[-1]
    out = {lowest: leaf}
    for rank in taxonomy.ranks[:-1]:
        acc = np.zeros((leaf.shape[0], taxonomy.n_classes(rank)))
        np.add.at(acc.T, taxonomy.parent_index(lowest, rank), leaf.T)
        out[rank] = acc
    return {r: out[r] for r in taxonomy.ranks}


# ---------------------------------------------------------------------- scoring
def resolve_thresholds(rule: str, ranks: Sequence[str],
                       thresholds: Mapping[str, float] | None) -> dict[str, float]:
    """Rank -> threshold of ``rule``: ``thresholds`` over the rule's defaults
    (:data:`DEFAULT_THRESHOLDS`, taken by position from the lowest rank up, so any rank
    list has one per rank)."""
    given = {str(k): float(v) for k, v in (thresholds or {}).items()}
    unknown = sorted(set(given) - set(ranks))
    if unknown:
        raise ConfigError(f"Thresholds name rank(s) {unknown} that the taxonomy {tuple(ranks)} "
                          f"lacks. Fix: name one of {', '.join(ranks)}.")
    defaults = DEFAULT_THRESHOLDS[rule]
    out: dict[str, float] = {}
    for depth, r in enumerate(reversed(tuple(ranks))):
        out[r] = given.get(r, defaults[min(depth, len(defaults) - 1)])
    return {r: out[r] for r in ranks}


def _check_inputs(probs: Mapping[str, np.ndarray], taxonomy, unknown, weights):
    missing = [r for r in taxonomy.ranks if r not in probs]
    if missing:
        raise ValueError(f"aggregate_plot needs probabilities for every rank {taxonomy.ranks}; "
                         f"missing {missing}.")
    p = {r: np.asarray(probs[r], dtype=np.float64) for r in taxonomy.ranks}
    n = len(p[taxonomy.ranks[-1]])
    for r, a in p.items():
        if a.ndim != 2 or a.shape != (n, taxonomy.n_classes(r)):
            raise ValueError(f"Probabilities for rank {r!r} must have shape [{n}, "
                             f"{taxonomy.n_classes(r)}], got {a.shape}.")
    flags = np.zeros(n, dtype=bool) if unknown is None else np.asarray(unknown, dtype=bool)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if flags.shape != (n,) or w.shape != (n,):
        raise ValueError(f"unknown flags and tile weights need one value per tile ({n}); got "
                         f"{flags.shape} and {w.shape}.")
    if (w < 0).any():
        raise ValueError("Tile weights must be non-negative.")
    return p, flags, w


def _check_scores(scores: Mapping[str, np.ndarray], taxonomy) -> dict[str, np.ndarray]:
    out = {}
    for r in taxonomy.ranks:
        if r not in scores:
            raise ValueError(f"Precomputed scores need every rank {taxonomy.ranks}; missing {r!r}.")
        a = np.asarray(scores[r], dtype=np.float64)
        if a.shape != (taxonomy.n_classes(r),):
            raise ValueError(f"Precomputed scores for rank {r!r} must have shape "
                             f"[{taxonomy.n_classes(r)}], got {a.shape}.")
        out[r] = a
    return out


def aggregate_plot(probs: Mapping[str, np.ndarray], taxonomy, *, plot_id: str = "",
                   rule: str = "max", thresholds: Mapping[str, float] | None = None,
                   unknown: np.ndarray | Sequence[bool] | None = None,
                   weights: np.ndarray | Sequence[float] | None = None,
                   checklist: Sequence[str] | None = None, outside_weight: float = 0.0,
                   min_tiles: int = 1, top_k: int | None = None,
                   min_tile_prob: float = 0.0,
                   scores: Mapping[str, np.ndarray] | None = None,
                   unknown_why: Reason | str = Reason.OUTLIER) -> list[PlotRecord]:
    """The taxa of one plot, each at the lowest rank its tiles support.

    ``probs``: rank -> coherent tile probabilities ``[n_tiles, n_classes]`` (e.g.
    ``Decoded.probs``). ``unknown``: per-tile outlier flags (flagged tiles count only in
    the ``"unknown"`` record). ``weights``: per-tile weights (e.g. by scale); a weight of
    0 drops the tile. ``checklist``: taxa expected in the region (see
    :func:`apply_checklist`). ``thresholds``: rank -> minimum score, over the rule's
    defaults (:data:`DEFAULT_THRESHOLDS`). ``min_tiles``: tiles that must support a
    taxon (its arg-max at that rank, or a probability at or over the rank's threshold;
    ``argmax_union`` counts arg-max tiles only). ``top_k``: each tile keeps only its
    ``k`` most probable classes at every rank (the rest count 0), so many small
    probabilities cannot add up to a find under ``noisy_or``/``mean``. ``min_tile_prob``:
    a tile whose best lowest-rank probability is below it gives no evidence (weight 0;
    e.g. a background tile the model is unsure about; it is not counted as unknown).
    ``scores``: rank -> one precomputed score per class (rule ``"learned"``, e.g.
    :meth:`~taxoclass.plots.learned.LearnedPlotRule.scores`), used instead of the
    rule's own; thresholds apply to them, and a taxon's supporting tiles are the
    non-flagged tiles that rank it among their
    :data:`~taxoclass.plots.selection.SUPPORT_TOP` best. ``unknown_why``: why the flagged
    tiles are unknown (``outlier``, the default: the gate; ``low_confidence``: no rank
    passed), the suffix of the unknown record's reason.

    Records come species first (best score first), then genera, families, unknown.
    """
    if rule not in RULES and rule != LEARNED:
        raise ConfigError(f"Unknown aggregation rule {rule!r}; expected one of "
                          f"{(*RULES, LEARNED)}.")
    if (rule == LEARNED) != (scores is not None):
        raise ConfigError(f"Rule {rule!r} with{'' if scores is not None else 'out'} precomputed "
                          "scores: the learned rule needs its scores (scores=...), and only it "
                          "takes them. Fit a LearnedPlotRule (taxoclass calibrate-plots).")
    p, flags, w = _check_inputs(probs, taxonomy, unknown, weights)
    given = None if scores is None else _check_scores(scores, taxonomy)
    if checklist:
        p, off_list = apply_checklist(p, taxonomy, checklist, outside_weight=outside_weight)
        flags = flags | off_list
    ranks = taxonomy.ranks
    if min_tile_prob > 0 and len(w):
        w = np.where(p[ranks[-1]].max(axis=1) >= min_tile_prob, w, 0.0)
    if top_k is not None:
        p = {r: keep_top_k(a, top_k) for r, a in p.items()}
    th = resolve_thresholds(rule, ranks, thresholds)
    rule_word = plot_rule(rule, checklist=bool(checklist))
    known = (~flags) & (w > 0)
    records: list[PlotRecord] = []
    covered: set[tuple[str, ...]] = set()  # reported nodes and all their ancestors
    for depth, rank in enumerate(reversed(ranks)):
        a = p[rank][known]
        if not len(a):
            break
        ev = rank_evidence(a, rule, lowest=depth == 0, weights=w[known],
                           given=None if given is None else given[rank])
        n_sup = ev.support(th[rank])
        found = []
        for c in np.flatnonzero(ev.selected([th[rank]], min_tiles)[:, 0]):
            shown = taxonomy.reported(taxonomy.node(rank, int(c)))
            # ``covered`` holds every reported taxon and its ancestors, so a taxon is
            # reported only when no lower-rank find already sits under it.
            if shown and shown not in covered:
                found.append((float(ev.score[c]), shown, int(n_sup[c])))
        for score, shown, n in sorted(found, key=lambda t: (-t[0], t[1])):
            if shown in covered:
                continue  # two placeholders standing for one taxon
            records.append(PlotRecord(plot_id, taxonomy.rank_of(shown), taxonomy.label(shown),
                                      score, n, plot_reason(rank, ranks[-1]), shown,
                                      rule_word, n / len(flags)))
            covered.update(shown[:k] for k in range(1, len(shown) + 1))
    n_unknown = int(flags.sum())
    if n_unknown:
        records.append(PlotRecord(plot_id, UNKNOWN, UNKNOWN, float("nan"), n_unknown,
                                  unknown_reason(unknown_why), (), rule_word,
                                  n_unknown / len(flags)))
    return records


def tile_assignments(records: Sequence[PlotRecord], probs: Mapping[str, np.ndarray], taxonomy,
                     *, unknown: np.ndarray | Sequence[bool] | None = None) -> list[str]:
    """For each tile, the label of the reported taxon it supports.

    A tile supports the lowest reported taxon on its arg-max path (species first, then
    genus, then family); a flagged tile is ``"unknown"``; a tile that supports no
    reported taxon is ``""``.
    """
    n = len(np.asarray(probs[taxonomy.ranks[-1]]))
    flags = np.zeros(n, dtype=bool) if unknown is None else np.asarray(unknown, dtype=bool)
    by_node = {r.node: r.taxon for r in records if r.node}
    best = {r: np.asarray(probs[r]).argmax(axis=1) for r in taxonomy.ranks}
    out = []
    for i in range(n):
        if flags[i]:
            out.append(UNKNOWN)
            continue
        label = ""
        for rank in reversed(taxonomy.ranks):
            node = taxonomy.reported(taxonomy.node(rank, int(best[rank][i])))
            if node in by_node:
                label = by_node[node]
                break
        out.append(label)
    return out
