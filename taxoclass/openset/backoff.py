"""Back-off: report the lowest rank whose evidence passes its threshold, and say why.

A pure function in the SpeciesNet roll-up style: keyword-only arguments in, a
:class:`BackoffResult` out whose ``reason`` says why the answer sits at that rank:

- the lowest rank's name (``"species"``): accepted at the lowest rank;
- :func:`~taxoclass.vocab.backoff_reason` (``"backoff_to_genus:outlier"`` /
  ``"backoff_to_genus:low_confidence"`` and the same for any higher rank): the lowest rank
  was rejected and this rank is the first one up that passes; the suffix says why the
  *first* (lowest) rejected rank was rejected: ``outlier`` when the distance gate rejected
  it (``outlier_flags``: per rank, "outlyingness rejected this rank", see
  :meth:`~taxoclass.openset.scorer.OpenSetScorer.gated`), else ``low_confidence``;
- :func:`~taxoclass.vocab.unknown_reason` (``"unknown:outlier"`` /
  ``"unknown:low_confidence"``): no rank passes; the label and the rank are ``"unknown"``
  and the score is NaN.

The ``outlier`` column of :func:`back_off_batch` is ``True`` exactly when the reason ends
in ``:outlier`` (:func:`~taxoclass.vocab.is_outlier_reason`): one decision, one flag.
Reasons are written as plain strings (the vocabulary of :mod:`taxoclass.vocab`).

The walk starts at the lowest rank and only goes up, so a rank below a rejected rank is
never returned. The reported taxon is the path's node at the accepted rank together with
its own ancestors, so the answer is always coherent.

Placeholders: a placeholder species (``"Philadelphus sp."``, a genus with no named
species) accepted at species rank is reported as its genus (rank ``"genus"``, label
``"Philadelphus sp."``) with reason ``"species"``: the model did the most it can do for
that taxon, nothing was backed off. Ranks are the taxonomy's (any names, any depth).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..taxonomy.tree import Node, Taxonomy
from ..vocab import UNKNOWN, Reason, accepted_reason, backoff_reason, unknown_reason

__all__ = ["BackoffResult", "back_off", "back_off_batch"]


@dataclass(frozen=True)
class BackoffResult:
    """``taxon_rank`` is ``"unknown"`` and ``taxon`` is ``()`` for ``"unknown"``.

    ``score`` is the evidence at the reported rank; NaN for ``"unknown"`` (no rank to
    report). ``outlier``: the distance gate acted in this decision (the reason ends in
    ``:outlier``).
    """

    taxon_rank: str | None
    taxon: Node
    label: str
    score: float
    reason: str
    outlier: bool = False


def _path_nodes(path, taxonomy: Taxonomy) -> dict[str, Node]:
    """Node per rank from a leaf node (tuple of names), rank->index map, or indices."""
    ranks = taxonomy.ranks
    if isinstance(path, Mapping):
        missing = [r for r in ranks if r not in path]
        if missing:
            raise ValueError(f"back_off: path lacks rank(s) {missing}; expected a class index "
                             f"for each of {ranks}.")
        nodes = {r: taxonomy.node(r, int(path[r])) for r in ranks}
    else:
        items = list(path)
        if len(items) != len(ranks):
            raise ValueError(f"back_off: path has {len(items)} entries, expected one per rank "
                             f"{ranks}.")
        if all(isinstance(v, str) for v in items):
            leaf = tuple(items)
            taxonomy.index(leaf)  # raises TaxonomyError if unknown
            nodes = {r: leaf[: i + 1] for i, r in enumerate(ranks)}
        else:
            nodes = {r: taxonomy.node(r, int(v)) for r, v in zip(ranks, items)}
    for upper, lower in zip(ranks[:-1], ranks[1:]):
        if nodes[lower][:-1] != nodes[upper]:
            raise ValueError(f"back_off: incoherent path: {lower} {nodes[lower]} is "
                             f"not under {nodes[upper]}.")
    return nodes


def _reason_for(rank: str, why: Reason | None, lowest: str) -> str:
    return accepted_reason(lowest) if rank == lowest or why is None else backoff_reason(rank, why)


def back_off(*, path: Sequence | Mapping[str, int], scores: Mapping[str, float],
             thresholds: Mapping[str, float], taxonomy: Taxonomy,
             outlier_flags: Mapping[str, bool] | None = None) -> BackoffResult:
    """The lowest rank of ``path`` whose ``scores[rank] >= thresholds[rank]``.

    ``path``: the predicted leaf as a node (tuple of names) or class indices per rank
    (a sequence top-down or a rank -> index mapping). ``scores``: evidence per rank
    (NaN fails). ``thresholds``: per rank (``+inf`` = never trust the rank).
    ``outlier_flags``: per rank, whether outlyingness rejected the rank (the gate acted).
    """
    ranks = taxonomy.ranks
    missing = [r for r in ranks if r not in scores or r not in thresholds]
    if missing:
        raise ValueError(f"back_off: scores and thresholds need every rank {ranks}; missing "
                         f"for {missing}.")
    nodes = _path_nodes(path, taxonomy)
    lowest = ranks[-1]
    why: Reason | None = None
    for rank in reversed(ranks):
        s = float(scores[rank])
        if not math.isnan(s) and s >= float(thresholds[rank]):
            node = taxonomy.reported(nodes[rank])
            if not node:  # placeholder chain up to the root: nothing real to name
                break
            return BackoffResult(taxon_rank=taxonomy.rank_of(node), taxon=node,
                                 label=taxonomy.label(node), score=s,
                                 reason=_reason_for(rank, why, lowest),
                                 outlier=why is Reason.OUTLIER)
        if why is None:
            flagged = bool(outlier_flags.get(rank, False)) if outlier_flags else False
            why = Reason.OUTLIER if flagged else Reason.LOW_CONFIDENCE
    why = why or Reason.LOW_CONFIDENCE
    return BackoffResult(taxon_rank=UNKNOWN, taxon=(), label=UNKNOWN, score=math.nan,
                         reason=unknown_reason(why), outlier=why is Reason.OUTLIER)


def back_off_batch(decoded, evidence: Mapping[str, np.ndarray],
                   thresholds: Mapping[str, float], flags: Mapping[str, np.ndarray] | np.ndarray
                   | None, taxonomy: Taxonomy) -> pd.DataFrame:
    """:func:`back_off` for every row of a :class:`~taxoclass.model.decoding.Decoded`, vectorised.

    ``evidence``: rank -> score per row for the taxon on ``decoded.path``. ``flags``: rank ->
    bool per row (outlyingness rejected the rank: the gate acted), or one bool array for
    every rank, or ``None``. Returns one row per image: ``taxon_rank`` (``"unknown"`` when
    no rank passes), ``taxon`` (the answer's label: "Quercus sp." at genus rank, a species
    name, a family name or "unknown"), ``score`` (evidence at ``taxon_rank``; NaN for
    unknown), ``reason``, ``outlier`` (the reason ends in ``:outlier``), then the full
    coherent path that the decision was made on: ``<rank>`` (the bare name there,
    "Quercus") and ``<rank>_prob`` per rank.
    """
    ranks = taxonomy.ranks
    n = len(decoded)
    if isinstance(thresholds, Mapping):
        thr = thresholds
    else:  # a RankThresholds
        thr = thresholds.thresholds
    ev = {r: np.asarray(evidence[r], dtype=np.float64) for r in ranks}
    for r in ranks:
        if ev[r].shape != (n,):
            raise ValueError(f"back_off_batch: evidence[{r!r}] has shape {ev[r].shape}, "
                             f"expected ({n},).")
    if flags is None:
        fl = {r: np.zeros(n, dtype=bool) for r in ranks}
    elif isinstance(flags, Mapping):
        fl = {r: np.asarray(flags.get(r, np.zeros(n, dtype=bool)), dtype=bool) for r in ranks}
    else:
        fl = {r: np.asarray(flags, dtype=bool) for r in ranks}
    # accept[:, j]: rank j (top-down) passes; NaN compares False.
    accept = np.stack([ev[r] >= float(thr[r]) for r in ranks], axis=1)
    # Placeholder chains up to the root never count as accepted.
    for j, r in enumerate(ranks):
        empty = np.array([not taxonomy.reported(nd) for nd in taxonomy.nodes(r)], dtype=bool)
        if empty.any():
            accept[:, j] &= ~empty[decoded.path[r]]
    rev = accept[:, ::-1]
    any_ok = rev.any(axis=1)
    j_ok = len(ranks) - 1 - rev.argmax(axis=1)  # lowest accepted rank (top-down index)
    lowest = ranks[-1]
    low_flag = fl[lowest] & ~accept[:, -1]  # the gate acted on the lowest rank

    taxon_rank = np.empty(n, dtype=object)
    taxon = np.empty(n, dtype=object)
    reason = np.empty(n, dtype=object)
    score = np.full(n, np.nan)
    for j, r in enumerate(ranks):
        rows = any_ok & (j_ok == j)
        if not rows.any():
            continue
        nodes = taxonomy.nodes(r)
        rep = [taxonomy.reported(nd) for nd in nodes]
        labels = np.array([taxonomy.label(nd) if nd else UNKNOWN for nd in rep], dtype=object)
        rrank = np.array([taxonomy.rank_of(nd) for nd in rep], dtype=object)
        idx = decoded.path[r][rows]
        taxon[rows] = labels[idx]
        taxon_rank[rows] = rrank[idx]
        score[rows] = ev[r][rows]
        if r == lowest:
            reason[rows] = accepted_reason(lowest)
        else:
            reason[rows] = np.where(low_flag[rows], backoff_reason(r, Reason.OUTLIER),
                                    backoff_reason(r, Reason.LOW_CONFIDENCE))
    none = ~any_ok
    taxon[none], taxon_rank[none] = UNKNOWN, UNKNOWN
    reason[none] = np.where(low_flag[none], unknown_reason(Reason.OUTLIER),
                            unknown_reason(Reason.LOW_CONFIDENCE))
    outlier = low_flag
    cols: dict[str, object] = {"taxon_rank": taxon_rank, "taxon": taxon, "score": score,
                               "reason": reason, "outlier": outlier}
    for r in ranks:
        names = np.asarray(taxonomy.names(r), dtype=object)
        cols[r] = names[decoded.path[r]]
        cols[f"{r}_prob"] = decoded.path_prob[r]
    return pd.DataFrame(cols)
