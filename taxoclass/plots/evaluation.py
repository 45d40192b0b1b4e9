"""Plot-level evaluation: F1 of the predicted taxa list against the true species list.

PlantCLEF ranks runs by the F1 of each plot's species set, averaged over plots ("macro
F1 per plot"). We also give macro F1 per taxon, micro F1, and the same three at every
higher rank, with true species mapped to their genus (family) and each record credited
at its own rank: ``Carex sp.`` is no species answer but a correct genus answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..vocab import UNKNOWN
from .rules import PlotRecord

__all__ = ["evaluate_plots", "f1_score_sets", "truth_path"]


def f1_score_sets(pred: set, true: set) -> float:
    """F1 of two sets; two empty sets agree perfectly (1.0)."""
    if not pred and not true:
        return 1.0
    tp = len(pred & true)
    return 2.0 * tp / (len(pred) + len(true))


def truth_path(name: str, taxonomy) -> tuple[str, ...]:
    """Path of a true taxon name (any rank list).

    A lowest-rank name is its leaf; a name at a higher rank (``"Scaridae"``, ``"Carex"``
    or ``"Carex sp."``: a plot whose find is known to family or genus only) is that
    taxon's path, so it is scored at its own rank and above. A name the model never saw
    keeps its genus guess (the first word) where the ranks have a genus, and is a path
    of its own (``"?<name>"``) elsewhere, so it never matches a predicted taxon by chance.
    """
    ranks = taxonomy.ranks
    hits = taxonomy.find(name, ranks[-1])
    if hits:
        return taxonomy.reported(hits[0]) if taxonomy.is_placeholder(hits[0]) else hits[0]
    short = name.removesuffix(" sp.").strip()
    for rank in reversed(ranks[:-1]):
        hits = taxonomy.find(short, rank)
        if hits:
            return hits[0]
    genus = name.split()[0] if name.split() else name
    if "genus" in ranks:
        g = taxonomy.find(genus, "genus")
        if g:
            return (*g[0], *((f"?{name}",) * (len(ranks) - len(g[0]) - 1)), name)
    return tuple(genus if r == "genus" else f"?{name}" for r in ranks[:-1]) + (name,)


def _at_rank(path: tuple[str, ...], rank: str, taxonomy) -> tuple[str, ...] | None:
    depth = taxonomy.ranks.index(rank) + 1
    return tuple(path[:depth]) if len(path) >= depth else None


def _scores(pred: Mapping[str, set], true: Mapping[str, set]) -> dict[str, float]:
    plots = sorted(set(true) | set(pred))
    per_plot = [f1_score_sets(pred.get(p, set()), true.get(p, set())) for p in plots]
    taxa = sorted(set().union(*pred.values(), *true.values()), key=str)
    per_taxon = []
    tp = fp = fn = 0
    for t in taxa:
        a = sum(1 for p in plots if t in pred.get(p, set()) and t in true.get(p, set()))
        b = sum(1 for p in plots if t in pred.get(p, set()) and t not in true.get(p, set()))
        c = sum(1 for p in plots if t not in pred.get(p, set()) and t in true.get(p, set()))
        per_taxon.append(2 * a / (2 * a + b + c) if (a + b + c) else 1.0)
        tp, fp, fn = tp + a, fp + b, fn + c
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "macro_f1_per_plot": float(np.mean(per_plot)) if per_plot else 0.0,
        "macro_f1_per_taxon": float(np.mean(per_taxon)) if per_taxon else 0.0,
        "micro_f1": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0,
        "precision": precision, "recall": recall,
        "n_plots": len(plots), "n_taxa": len(taxa),
    }


def evaluate_plots(predicted: Mapping[str, Sequence[PlotRecord]],
                   truth: Mapping[str, Sequence[str]], taxonomy) -> dict:
    """Scores of plot predictions against true species lists.

    Returns ``{"species": {...}, "genus": {...}, "family": {...}, "per_plot": DataFrame}``
    (one key per taxonomy rank, whatever the rank list). At the lowest rank only
    lowest-rank records count (the PlantCLEF metric: a genus-level record is no species
    answer). At a higher rank
    every record at or below that rank is mapped up to it, and the true species too.
    ``"unknown"`` records never count. Plots missing from ``predicted`` predicted nothing;
    predicted plots missing from ``truth`` are ignored (no truth to score against).
    """
    lowest = taxonomy.ranks[-1]
    true_paths = {p: [truth_path(str(n), taxonomy) for n in names] for p, names in truth.items()}
    out: dict = {}
    rows: dict[str, dict] = {p: {"plot_id": p} for p in truth}
    for rank in taxonomy.ranks:
        depth = taxonomy.ranks.index(rank) + 1
        pred_sets: dict[str, set] = {}
        true_sets: dict[str, set] = {}
        for plot in truth:
            true_sets[plot] = {x for x in (_at_rank(t, rank, taxonomy)
                                           for t in true_paths[plot]) if x is not None}
            s = set()
            for rec in predicted.get(plot, []):
                if rec.taxon_rank == UNKNOWN or not rec.node:
                    continue
                if rank == lowest and rec.taxon_rank != lowest:
                    continue
                if len(rec.node) >= depth:
                    s.add(tuple(rec.node[:depth]))
            pred_sets[plot] = s
            rows[plot][f"{rank}_f1"] = f1_score_sets(s, true_sets[plot])
        out[rank] = _scores(pred_sets, true_sets)
    out["per_plot"] = pd.DataFrame(list(rows.values()))
    return out
