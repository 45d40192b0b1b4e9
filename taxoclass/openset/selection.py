"""The open-set recipe chosen on the user's own training data (``openset.recipe: auto``).

Leave-taxa-out rounds (:func:`plan_rounds`, :func:`simulate_rounds`): each seeded round
hides some lowest-rank taxa whose parent keeps a known child, and whole taxa at each
higher rank (:func:`~taxoclass.openset.evaluation.hold_out_taxa`), trains ONE head on
part of the other rows (:func:`~taxoclass.model.training.train_head`, the config's
``model``/``loss``/``train``) and one detector per candidate kind, and scores the hidden
taxa's images (simulated unknowns) and the held-back known images (calibration). Rows
are grouped by ``data.group_by`` where set: no group trains the round's head and is
scored by it.

Every candidate (detector x combiner x confidence x gate quantile,
:func:`~taxoclass.openset.candidates.candidates`) is scored out of sample
(:func:`~taxoclass.openset.candidates.score_candidates`): the images are
split once into two seeded halves; a candidate's combiner and thresholds are fitted on
one half of the OTHER rounds' rows (other hidden taxa, other heads) and score the other
half of this round's rows, both ways. Per round: unknown-detection AUROC of the species
evidence, precision of species answers over known images and over all images at
``openset.unknown_share``, known coverage at species, unknowns named to species and
unknowns placed at a correct higher taxon; over rounds: mean and 95% t interval
(:func:`taxoclass.model.stats.t_interval`).

Choice (:func:`choose`): among candidates whose mean precision over all images reaches
the species target minus ``openset.precision_slack``, the highest known coverage at
species; ties, or no candidate meeting the target, go to precision over all images,
then AUROC. The chosen candidate's combiner and thresholds are then fitted on every
round's rows (:func:`fit_chosen`) and ride on the final head and detector.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..config import OpensetConfig, complete_config
from ..taxonomy.tree import Taxonomy
from ..vocab import Scope
from .candidates import (
    METRICS,
    Candidate,
    SimulatedRows,
    candidates,
    choose,
    fit_chosen,
    nested_estimate,
    score_candidates,
)
from .evaluation import (
    correct_by_rank,
    hold_out_taxa,
    labelled_by_rank,
    path_names,
    split_known_unknown_taxa,
)
from .evidence import EvidenceCombiner
from .thresholds import RankThresholds

__all__ = ["METRICS", "Candidate", "RoundPlan", "Selection", "SimulatedRows", "candidates",
           "choose", "fit_chosen", "known_taxonomy_of", "plan_rounds", "score_candidates",
           "select_recipe", "simulate_rounds"]

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
_OPENSET = OpensetConfig()
CAL_FRACTION = 0.3  # share of each round's known rows held back as calibration
MAX_HIDDEN_SHARE = 0.1  # a taxon with more of the rows (and twice its rank's mean share)
#                         is never hidden


# ---------------------------------------------------------------------- planning
@dataclass
class RoundPlan:
    """One round: the hidden taxa, the rows the head trains on, the rows it scores."""

    seed: int
    held: dict[str, list[str]]
    fit: np.ndarray       # rows the round's head and detectors train on
    unknown: np.ndarray   # rows of hidden taxa (all scored)
    calibration: np.ndarray  # known rows held back and scored


def _hide(rows: pd.DataFrame, ranks: Sequence[str], oc: OpensetConfig, seed: int
          ) -> dict[str, list[str]]:
    """Hidden taxa of one round, top rank first; lower ranks draw among rows not hidden.

    Lowest rank: ``holdout_fraction`` of the taxa whose parent keeps another; each higher
    rank: ``holdout_taxa`` whole taxa, at most a quarter of that rank's taxa. A taxon
    holding more than :data:`MAX_HIDDEN_SHARE` of the rows and more than twice the mean
    share of its rank's taxa is never hidden (it would make most of the round's unknowns).
    """
    from .evaluation import truth_names

    held: dict[str, list[str]] = {}
    left = np.ones(len(rows), dtype=bool)
    for i, rank in enumerate(ranks):
        names_at = np.asarray(truth_names(rows, ranks)[rank], dtype=object)
        values, counts = np.unique(names_at, return_counts=True)
        n_named = max(int((values != "").sum()), 1)
        cap = max(MAX_HIDDEN_SHARE, 2.0 / n_named) * len(rows)
        big = set(values[counts > cap].tolist())
        sub = rows[left & ~np.isin(names_at, list(big))].reset_index(drop=True)
        if i == len(ranks) - 1:
            names = hold_out_taxa(sub, ranks, rank=rank, fraction=oc.holdout_fraction,
                                  seed=seed)
        else:  # whole taxa: at most a quarter of the rank's taxa (none of fewer than 4)
            n = min(oc.holdout_taxa, _n_taxa(rows[left], ranks, rank) // 4)
            names = hold_out_taxa(sub, ranks, rank=rank, n=n, seed=seed) if n else []
        if names:
            held[rank] = names
            left &= ~split_known_unknown_taxa(rows, {rank: names}, ranks)
    return held


def _n_taxa(rows: pd.DataFrame, ranks: Sequence[str], rank: str) -> int:
    from .evaluation import truth_names

    return len({n for n in truth_names(rows, ranks)[rank] if n})


def plan_rounds(rows: pd.DataFrame, ranks: Sequence[str],
                ocfg: OpensetConfig | Mapping[str, Any] | None = None, *, seed: int = 0,
                groups: np.ndarray | None = None) -> list[RoundPlan] | str:
    """The rounds' hidden taxa and row masks, or the reason the data are too small.

    ``rows``: the training rows (rank columns as :func:`truth_names` reads them);
    ``groups``: a group per row (``data.group_by``) or None. Known rows sharing a group
    with a hidden row never train the round's head; the calibration rows are drawn by
    group (:func:`~taxoclass.model.splits.validation_split`).
    """
    from ..model.splits import validation_split
    from .evaluation import truth_names

    oc = ocfg if isinstance(ocfg, OpensetConfig) else OpensetConfig.from_dict(ocfg)
    ranks = list(ranks)
    lowest = truth_names(rows, ranks)[ranks[-1]]
    n_taxa = len({n for n in lowest if n})
    if oc.rounds < 1:
        return "openset.rounds is 0 (no leave-taxa-out rounds)"
    if n_taxa < oc.min_species:
        return (f"{n_taxa} {ranks[-1]} taxa in the training data, fewer than "
                f"openset.min_species ({oc.min_species}): too few to hide some and learn the rest")
    plans = []
    for r in range(oc.rounds):
        s = seed + 1000 * (r + 1)
        held = _hide(rows, ranks, oc, s)
        unknown = split_known_unknown_taxa(rows, held, ranks)
        known = ~unknown
        cal = np.zeros(len(rows), dtype=bool)
        g = None if groups is None else np.asarray(groups)[known]
        cal[known] = validation_split(np.asarray(lowest)[known], CAL_FRACTION, s, groups=g)
        fit = known & ~cal
        if groups is not None:  # no group both trains the head and is scored by it
            touched = np.isin(groups, np.asarray(groups)[unknown | cal])
            cal |= fit & touched
            fit &= ~touched
        n_fit_taxa = len({n for n in np.asarray(lowest)[fit] if n})
        short = _too_small(held, unknown, cal, n_fit_taxa, oc.min_support)
        if short:
            return f"round {r + 1}: {short}"
        plans.append(RoundPlan(seed=s, held=held, fit=fit, unknown=unknown, calibration=cal))
    return plans


def _too_small(held, unknown, cal, n_fit_taxa: int, min_support: int) -> str | None:
    if not held or not unknown.any():
        return "no taxon could be hidden (every parent has a single child)"
    if unknown.sum() < min_support:
        return f"{int(unknown.sum())} images of hidden taxa, fewer than {min_support}"
    if cal.sum() < 2 * min_support:
        return f"{int(cal.sum())} known calibration images, fewer than {2 * min_support}"
    if n_fit_taxa < 2:
        return "fewer than 2 known taxa left to train on"
    return None


def known_taxonomy_of(taxonomy: Taxonomy, held: Mapping[str, Sequence[str]]) -> Taxonomy:
    """``taxonomy`` without the held taxa and everything below them (``held``: rank ->
    names at that rank, species as the taxonomy names them)."""
    graph = taxonomy.graph.copy()
    for rank, names in held.items():
        i = taxonomy.ranks.index(rank)
        drop = [nd for nd in graph.nodes if len(nd) > i and nd[i] in set(names)]
        graph.remove_nodes_from(drop)
    return Taxonomy(graph, taxonomy.ranks, taxonomy.genus_distances)


# ---------------------------------------------------------------------- simulation
def _encode_known(y: Mapping[str, np.ndarray], taxonomy: Taxonomy, known: Taxonomy
                  ) -> dict[str, np.ndarray]:
    """Class indices of ``taxonomy`` re-numbered in ``known`` (-1: hidden or unlabelled)."""
    out = {}
    for rank in taxonomy.ranks:
        nodes = taxonomy.nodes(rank)
        remap = np.array([known.index(nd) if nd in known.graph else -1
                          for nd in nodes] + [-1], dtype=np.int64)
        v = np.asarray(y[rank], dtype=np.int64)
        out[rank] = remap[np.where(v >= 0, v, len(nodes))]
    return out


def _round_detector(kind: str, x_fit: np.ndarray, y_fit: Mapping[str, np.ndarray],
                    ranks: Sequence[str], oc: OpensetConfig, seed: int):
    """A detector of ``kind`` on the round's training rows (at most ``openset.max_train``,
    its reference the rows labelled at the lowest rank), as the final model's is fitted."""
    from .scorer import fit_detector, group_rank_of

    species = np.asarray(y_fit[ranks[-1]])
    group = np.asarray(y_fit[group_rank_of(ranks)])
    keep = species >= 0 if (species >= 0).sum() >= 2 else np.ones(len(species), dtype=bool)
    idx = np.flatnonzero(keep)
    if len(idx) > oc.max_train:
        idx = np.sort(np.random.default_rng(seed).choice(idx, oc.max_train, replace=False))
    return fit_detector(x_fit[idx], group[idx], labels_train=species[idx], method=kind,
                        scope=oc.scope)


def _round_scores(plan: RoundPlan, x: np.ndarray, y: Mapping[str, np.ndarray],
                  truth: Mapping[str, np.ndarray], taxonomy: Taxonomy, cfg: Mapping[str, Any],
                  detectors: Sequence[str], progress: Progress | None) -> dict[str, Any]:
    """Train the round's head and detectors; evidence inputs and truth of its scored rows."""
    import torch

    from ..model.decoding import decode
    from ..model.training import normalize, train_head
    from .scorer import group_rank_of

    oc = OpensetConfig.from_dict(cfg["openset"])
    known = known_taxonomy_of(taxonomy, plan.held)
    yk = _encode_known(y, taxonomy, known)
    fit = plan.fit
    norm = bool(cfg["model"]["normalize"])
    res = train_head(x[fit], {r: v[fit] for r, v in yk.items()}, None, None, known,
                     model=cfg["model"], loss=cfg.get("loss"), train=cfg["train"],
                     normalize_inputs=norm, progress=progress)
    scored = plan.unknown | plan.calibration
    xs = torch.as_tensor(x[scored], dtype=torch.float32)
    xs = normalize(xs) if norm else xs
    res.head.eval()
    with torch.inference_mode():
        logits = res.head(xs)
    dec = decode(logits, known, method=cfg["decode"]["method"], top_k=1)
    x_det = normalize(x).numpy() if norm else np.asarray(x, dtype=np.float32)
    group = dec.path[group_rank_of(known.ranks)]
    z = {}
    for kind in detectors:
        det = _round_detector(kind, x_det[fit], {r: v[fit] for r, v in yk.items()},
                              known.ranks, oc, plan.seed)
        z[kind] = det.decision_function(x_det[scored],
                                        group if det.scope == Scope.GROUP else None)
    tr = {r: np.asarray(v)[scored] for r, v in truth.items()}
    return {"rows": np.flatnonzero(scored), "unknown": plan.unknown[scored],
            "conf": {"path_logit": dict(dec.path_logit), "path_prob": dict(dec.path_prob)},
            "z": z, "correct": correct_by_rank(path_names(dec.path, known), tr, known.ranks),
            "labelled": labelled_by_rank(tr, known.ranks),
            "hidden_rank": _hidden_rank(plan.held, tr)}


def _hidden_rank(held: Mapping[str, Sequence[str]], truth: Mapping[str, np.ndarray]
                 ) -> np.ndarray:
    """Per row: the rank its taxon was hidden at (the highest hidden one), "" if known."""
    out = np.full(len(next(iter(truth.values()))), "", dtype=object)
    for rank in reversed(list(held)):  # top rank last: it wins
        out[np.isin(truth[rank], list(held[rank]))] = rank
    return out


def simulate_rounds(x: np.ndarray, y: Mapping[str, np.ndarray], rows: pd.DataFrame,
                    taxonomy: Taxonomy, plans: Sequence[RoundPlan], cfg: Mapping[str, Any],
                    detectors: Sequence[str], *, seed: int = 0,
                    groups: np.ndarray | None = None,
                    progress: Progress | None = None) -> SimulatedRows:
    """Run every planned round (one head, one detector per kind) and pool the scored rows.

    ``x``: embeddings of the training rows; ``y``: their class indices per rank in
    ``taxonomy`` (-1: unlabelled there); ``rows``: their annotation rows (truth names).
    ``progress(done, total)`` counts the rounds' training epochs.
    """
    from ..model.splits import validation_split
    from .evaluation import truth_names

    cfg = complete_config(cfg)
    ranks = taxonomy.ranks
    truth = truth_names(rows, ranks)
    epochs = int(cfg["train"]["epochs"])
    parts = []
    for k, plan in enumerate(plans):
        step = (None if progress is None else
                lambda e, n, k=k: progress(k * epochs + e, len(plans) * epochs))
        parts.append(_round_scores(plan, np.asarray(x), y, truth, taxonomy, cfg,
                                   detectors, step))
        log.info("open-set selection: round %d/%d done (%d hidden taxa)", k + 1, len(plans),
                 sum(len(v) for v in plan.held.values()))
    half_of = validation_split(np.asarray(truth[ranks[-1]]), 0.5, seed + 7, groups=groups)
    cat = np.concatenate
    rows_idx = cat([p["rows"] for p in parts])
    return SimulatedRows(
        ranks=tuple(ranks), round=cat([np.full(len(p["rows"]), k) for k, p in enumerate(parts)]),
        row=rows_idx, unknown=cat([p["unknown"] for p in parts]),
        half=half_of[rows_idx].astype(np.int64),
        conf={c: {r: cat([p["conf"][c][r] for p in parts]) for r in ranks}
              for c in ("path_logit", "path_prob")},
        z={d: cat([p["z"][d] for p in parts]) for d in detectors},
        correct={r: cat([p["correct"][r] for p in parts]) for r in ranks},
        labelled={r: cat([p["labelled"][r] for p in parts]) for r in ranks},
        hidden_rank=cat([p["hidden_rank"] for p in parts]),
        held=[p.held for p in plans])




# ---------------------------------------------------------------------- the whole choice
CHOICE_RULE = ("highest known coverage at species among candidates whose mean "
               "precision of species answers over all images (unknowns at unknown_share) "
               ">= target - precision_slack; ties, or none meeting it: precision over all, "
               "then AUROC")


@dataclass
class Selection:
    """The recipe to use, and what to record (``record``: metrics' ``openset_selection``).

    ``combiner`` / ``thresholds``: fitted on every round's rows (with simulated unknowns);
    ``None`` on a fallback (no rounds), where the usual calibration applies.
    """

    chosen: Candidate
    record: dict[str, Any]
    combiner: EvidenceCombiner | None = None
    thresholds: RankThresholds | None = None
    fallback: str | None = None

    def openset_config(self, ocfg: Mapping[str, Any]) -> dict[str, Any]:
        """``ocfg`` with the chosen detector, combiner, confidence and gate quantile."""
        c = self.chosen
        return {**dict(ocfg), "detector": c.detector, "combiner": c.combiner,
                "confidence": c.confidence, "gate_quantile": c.gate_quantile}


def _expected(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in METRICS:
        out[m] = row.get(m)
        out[f"{m}_ci95"] = row.get(f"{m}_ci95")
    return out


def select_recipe(x: np.ndarray, y: Mapping[str, np.ndarray], rows: pd.DataFrame,
                  taxonomy: Taxonomy, cfg: Mapping[str, Any], *, seed: int = 0,
                  groups: np.ndarray | None = None,
                  progress: Progress | None = None) -> Selection:
    """The open-set recipe for these training rows (``cfg["openset"]["recipe"]``).

    ``auto``: every candidate of the config scored by leave-taxa-out rounds, the best by
    :data:`CHOICE_RULE`. ``fixed``: the configured recipe, still scored by the rounds
    (its thresholds then include simulated unknowns and the expected figures are
    reported). Too few taxa (:func:`plan_rounds`) or ``openset.rounds: 0``: the
    configured recipe without rounds, with a warning and the reason recorded.
    """
    import time

    cfg = complete_config(cfg)
    oc = OpensetConfig.from_dict(cfg["openset"])
    fixed = candidates(oc, "fixed")[0]
    target = _species_target(oc, taxonomy.ranks[-1])
    base = {"recipe": oc.recipe, "unknown_share": float(oc.unknown_share),
            "target_precision_species": target, "choice_rule": CHOICE_RULE}
    plans = plan_rounds(rows, taxonomy.ranks, oc, seed=seed, groups=groups)
    if isinstance(plans, str):
        log.warning("open-set recipe: %s; using the fixed recipe %s without simulated "
                    "unknowns (thresholds target precision over known images only).",
                    plans, fixed.key)
        return Selection(chosen=fixed, fallback=plans, record={
            **base, "used": "fixed", "fallback": plans, "chosen": fixed.as_dict(),
            "chosen_key": fixed.key, "rounds": 0, "candidates": [], "expected": None,
            "expected_nested": None,
            "held_out": []})
    t0 = time.perf_counter()
    cands = candidates(oc)
    detectors = sorted({c.detector for c in cands})
    sim = simulate_rounds(x, y, rows, taxonomy, plans, cfg, detectors, seed=seed,
                          groups=groups, progress=progress)
    table = score_candidates(sim, cands, oc)
    best = choose(table, target, oc.precision_slack)
    chosen = next(c for c in cands if c.key == best["key"])
    comb, thr = fit_chosen(sim, chosen, oc)
    record = {**base, "used": oc.recipe, "chosen": chosen.as_dict(), "chosen_key": chosen.key,
              "rounds": len(plans), "candidates": table, "expected": _expected(best),
              "expected_nested": nested_estimate(table, target, oc.precision_slack),
              "held_out": [p.held for p in plans],
              "n_scored": {"known": int((~sim.unknown).sum()), "unknown": int(sim.unknown.sum())},
              "seconds": round(time.perf_counter() - t0, 1)}
    return Selection(chosen=chosen, record=record, combiner=comb, thresholds=thr)


def _species_target(oc: OpensetConfig, lowest: str) -> float:
    """The target precision of the lowest rank (``openset.target_precision``)."""
    from .thresholds import rank_targets

    return rank_targets(oc.target_precision, [lowest])[lowest]
