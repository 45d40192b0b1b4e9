"""Open-set evaluation: hold species out, then ask whether the model notices them.

Library functions only; the caller trains the head (``taxoclass.model.training.train_head``)
on the known species and fits the scorer (:mod:`taxoclass.openset.scorer`). The pieces:

- choosing held-out species (:func:`choose_holdout`: a list, or a seeded share, keeping
  at least one known species in every genus so the genus stays learnable), splitting
  rows (:func:`split_known_unknown`) and the taxonomy of the known species only
  (:func:`known_taxonomy`), so held-out species are not classes;
- truth and correctness per rank (:func:`truth_names`, :func:`path_names`,
  :func:`correct_by_rank`);
- metrics: unknown-detection AUROC and FPR at 95% TPR per score
  (:func:`detection_table`), what happened to held-out and known images
  (:func:`outcome_summary`) and a risk-coverage table per rank (:func:`risk_coverage`).

Correctness is judged by names along the path: the prediction is right at rank ``r``
when every rank from the top down to ``r`` names the true taxon (a held-out species is
never right at species rank; it is right at genus when its genus is predicted).
Species are binomials (annotation columns ``genus`` and ``species``, the data's naming).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from ..taxonomy.tree import DEFAULT_RANKS, Taxonomy, species_name

__all__ = ["choose_holdout", "correct_by_rank", "detection_table", "fpr_at_tpr",
           "hold_out_taxa", "known_taxonomy", "known_taxonomy_without", "labelled_by_rank",
           "outcome_summary", "path_names", "risk_coverage", "split_known_unknown",
           "split_known_unknown_taxa", "truth_names"]


# ---------------------------------------------------------------------- splitting
def _binomials(rows: pd.DataFrame) -> np.ndarray:
    return np.array([species_name(str(g or ""), str(s or "")) for g, s in
                     zip(rows["genus"].fillna(""), rows["species"].fillna(""))], dtype=object)


def _leaves(rows: pd.DataFrame, ranks: Sequence[str]) -> np.ndarray:
    """Name of the lowest rank per row (species as binomials)."""
    return truth_names(rows, ranks)[ranks[-1]]


def choose_holdout(rows: pd.DataFrame, *, species: Iterable[str] | None = None,
                   n_species: int | None = None, holdout_fraction: float | None = None,
                   seed: int = 0, ranks: Sequence[str] = DEFAULT_RANKS) -> list[str]:
    """Lowest-rank taxa (species: binomial names) to hold out; each parent taxon (genus)
    keeps at least one known child.

    Give exactly one of ``species`` (checked against ``rows``), ``n_species`` or
    ``holdout_fraction`` (of the species in eligible genera). Only genera with two or more
    species are eligible; the draw is seeded and independent of row order. ``ranks``: the
    taxonomy's; the last two are "species" and "genus" here.
    """
    if sum(v is not None for v in (species, n_species, holdout_fraction)) != 1:
        raise ValueError("choose_holdout: give exactly one of species, n_species or "
                         "holdout_fraction.")
    names = _leaves(rows, ranks)
    genus = (truth_names(rows, ranks[-2:-1])[ranks[-2]] if len(ranks) > 1
             else np.full(len(rows), "", dtype=object))
    present = {n for n in names if n}
    if species is not None:
        wanted = [str(s) for s in species]
        unknown = [s for s in wanted if s not in present]
        if unknown:
            raise ValueError(f"choose_holdout: species {unknown} are not in the rows; expected "
                             "binomial names such as 'Quercus ilex'.")
        return sorted(set(wanted))
    if holdout_fraction is not None and not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}.")
    return _draw_keeping_parents(names, genus, n=n_species, fraction=holdout_fraction,
                                 seed=seed)


def _draw_keeping_parents(names: np.ndarray, parent: np.ndarray, *, n: int | None,
                          fraction: float | None, seed: int) -> list[str]:
    """Seeded draw (independent of row order) of ``n`` taxa, or ``fraction`` of the
    eligible ones (at least one), among ``names`` (one per row, ``""``: unlabelled) whose
    ``parent`` has at least two children; every parent keeps a known child."""
    by_parent: dict[str, list[str]] = {}
    for name, par in sorted({(a, b) for a, b in zip(names, parent) if a}):
        by_parent.setdefault(par, []).append(name)
    eligible = sorted(t for ts in by_parent.values() if len(ts) >= 2 for t in ts)
    if fraction is not None:
        n = max(1, round(fraction * len(eligible))) if eligible else 0
    rng = np.random.default_rng(seed)
    order = [eligible[k] for k in rng.permutation(len(eligible))]
    left = {p: len(ts) for p, ts in by_parent.items()}
    parent_of = {t: p for p, ts in by_parent.items() for t in ts}
    chosen: list[str] = []
    for t in order:
        if len(chosen) >= int(n):
            break
        if left[parent_of[t]] > 1:
            chosen.append(t)
            left[parent_of[t]] -= 1
    return sorted(chosen)


def split_known_unknown(rows: pd.DataFrame, held_out: Iterable[str],
                        ranks: Sequence[str] = DEFAULT_RANKS) -> np.ndarray:
    """Boolean mask: True for rows of a held-out (lowest-rank) taxon."""
    return np.isin(_leaves(rows, ranks), list(held_out))


def known_taxonomy(categories: pd.DataFrame, held_out: Iterable[str],
                   ranks: Sequence[str] = DEFAULT_RANKS) -> Taxonomy:
    """Taxonomy of the categories minus the held-out species (they must not be classes)."""
    keep = ~np.isin(_leaves(categories, ranks), list(held_out))
    return Taxonomy.from_records(categories[keep].to_dict("records"), ranks,
                                 source="known categories")


def hold_out_taxa(rows: pd.DataFrame, ranks: Sequence[str], *, rank: str,
                  n: int | None = None, fraction: float | None = None, seed: int = 0
                  ) -> list[str]:
    """Names at ``rank`` to hold out (seeded, independent of row order); the rank above
    keeps at least one known child.

    Lowest rank: as :func:`choose_holdout` (species whose genus keeps a known species).
    A higher rank (genus, family): whole taxa, drawn among those whose parent has at least
    two children, so the parent stays known; the top rank (no parent) keeps at least one
    taxon known. Give exactly one of ``n`` (count) or ``fraction`` (of the eligible taxa,
    at least one). Rows unlabelled at ``rank`` are ignored; ``ranks``: the taxonomy's.
    """
    ranks = list(ranks)
    if rank not in ranks:
        raise ValueError(f"hold_out_taxa: rank {rank!r} is not one of {ranks}.")
    if (n is None) == (fraction is None):
        raise ValueError("hold_out_taxa: give exactly one of n or fraction.")
    i = ranks.index(rank)
    truth = truth_names(rows, ranks[: i + 1])
    names = truth[rank]
    parent = truth[ranks[i - 1]] if i > 0 else np.full(len(rows), "", dtype=object)
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise ValueError(f"hold_out_taxa: fraction must be in (0, 1), got {fraction}.")
    if n is not None and int(n) < 0:
        raise ValueError(f"hold_out_taxa: n must be >= 0, got {n}.")
    return _draw_keeping_parents(names, parent, n=n, fraction=fraction, seed=seed)


def split_known_unknown_taxa(rows: pd.DataFrame, held: Mapping[str, Sequence[str]],
                             ranks: Sequence[str]) -> np.ndarray:
    """Boolean mask: True for rows under any held taxon (``held``: rank -> names)."""
    truth = truth_names(rows, ranks)
    out = np.zeros(len(rows), dtype=bool)
    for rank, names in held.items():
        if rank not in truth:
            raise ValueError(f"split_known_unknown_taxa: rank {rank!r} is not one of "
                             f"{list(ranks)}.")
        out |= np.isin(truth[rank], [str(v) for v in names])
    return out


def known_taxonomy_without(categories: pd.DataFrame, held: Mapping[str, Sequence[str]],
                           ranks: Sequence[str]) -> Taxonomy:
    """Taxonomy of the categories minus every held taxon and all below it (``held``:
    rank -> names), so hidden taxa are not classes."""
    keep = ~split_known_unknown_taxa(categories, held, ranks)
    return Taxonomy.from_records(categories[keep].to_dict("records"), ranks,
                                 source="known categories")


def truth_names(rows: pd.DataFrame, ranks: Sequence[str] = DEFAULT_RANKS
                ) -> dict[str, np.ndarray]:
    """True name per rank per row (species as binomial: the annotations' ``species`` column
    holds the epithet; ``""`` where unlabelled)."""
    out = {}
    for r in ranks:
        if r == "species" and "genus" in rows:  # as taxonomy.tree names species
            out[r] = _binomials(rows)
        elif r not in rows:  # no column for this rank: no row is labelled there
            out[r] = np.full(len(rows), "", dtype=object)
        else:
            out[r] = rows[r].fillna("").astype(str).str.strip().to_numpy(dtype=object)
    return out


def path_names(path: Mapping[str, np.ndarray], taxonomy: Taxonomy) -> dict[str, np.ndarray]:
    """Display name per rank of a decoded path (class indices per rank)."""
    return {r: np.asarray(taxonomy.names(r), dtype=object)[np.asarray(path[r])]
            for r in taxonomy.ranks}


def labelled_by_rank(truth: Mapping[str, np.ndarray], ranks: Sequence[str]
                     ) -> dict[str, np.ndarray]:
    """Per rank, whether each row has a true name there (:func:`truth_names` gives ``""``
    below the rank a label stops at: a family-only image is labelled at family only)."""
    return {r: np.asarray(truth[r], dtype=object) != "" for r in ranks}


def correct_by_rank(predicted: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                    ranks: Sequence[str]) -> dict[str, np.ndarray]:
    """Right at rank r = every rank from the top to r names the true taxon.

    A row without a label at r is never right there; pair with :func:`labelled_by_rank`
    so that it is not counted as wrong either."""
    out, ok = {}, None
    for r in ranks:
        hit = np.asarray(predicted[r], dtype=object) == np.asarray(truth[r], dtype=object)
        ok = hit if ok is None else ok & hit
        out[r] = ok.copy()
    return out


# ---------------------------------------------------------------------- metrics
def fpr_at_tpr(is_unknown: np.ndarray, score: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate (known called unknown) at the first threshold reaching ``tpr``."""
    fpr, tp, _ = roc_curve(np.asarray(is_unknown, dtype=bool), np.asarray(score, dtype=float))
    return float(fpr[np.searchsorted(tp, tpr, side="left")])


def detection_table(is_unknown: np.ndarray, scores: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """AUROC and FPR@95%TPR per method; every score oriented higher = more likely unknown."""
    y = np.asarray(is_unknown, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("detection_table needs both known and unknown rows.")
    rows = [{"method": name, "auroc": float(roc_auc_score(y, s)),
             "fpr_at_95tpr": fpr_at_tpr(y, s)} for name, s in scores.items()]
    return pd.DataFrame(rows)


def outcome_summary(frame: pd.DataFrame, truth: Mapping[str, np.ndarray],
                    is_unknown: np.ndarray, ranks: Sequence[str] = DEFAULT_RANKS
                    ) -> dict[str, float]:
    """What back-off did with held-out-species images and with known-species images.

    ``frame``: :func:`~taxoclass.openset.backoff.back_off_batch` output; ``truth``:
    :func:`truth_names` of the same rows. Held-out: share reported at their correct genus,
    at their correct family (above genus), correct genus-or-family, named to a (wrong)
    species, reported at a wrong higher taxon, unknown. Known: coverage (share named to
    species), and per rank the precision of the answers given at that rank or below.
    """
    y = np.asarray(is_unknown, dtype=bool)
    lowest = ranks[-1]
    pred = {r: frame[r].to_numpy(dtype=object) for r in ranks}
    correct = correct_by_rank(pred, truth, ranks)
    labelled = labelled_by_rank(truth, ranks)
    depth = {r: i for i, r in enumerate(ranks)}
    rep = frame["taxon_rank"].map(lambda r: depth.get(r, -1)).to_numpy()
    # Right at the reported rank (placeholders report above their path rank: same test).
    right = np.zeros(len(frame), dtype=bool)
    for r, i in depth.items():
        right |= (rep == i) & correct[r]
    out: dict[str, float] = {"n_unknown": int(y.sum()), "n_known": int((~y).sum())}
    u = y
    if u.any():
        at_lowest = rep == depth[lowest]
        out["unknown_named_species"] = float(np.mean(at_lowest[u]))
        for r in ranks[:-1]:
            out[f"unknown_correct_{r}"] = float(np.mean(((rep == depth[r]) & right)[u]))
        out["unknown_correct_higher"] = float(np.mean((right & (rep >= 0) & ~at_lowest)[u]))
        out["unknown_wrong_higher"] = float(np.mean((~right & (rep >= 0) & ~at_lowest)[u]))
        out["unknown_unknown"] = float(np.mean((rep < 0)[u]))
    k = ~y
    if k.any():
        out["known_coverage_species"] = float(np.mean((rep == depth[lowest])[k]))
        for r in ranks:
            given = k & (rep >= depth[r]) & labelled[r]  # scored where labelled only
            out[f"known_precision_{r}"] = (float(np.mean(correct[r][given])) if given.any()
                                           else float("nan"))
            out[f"known_coverage_{r}"] = float(np.mean(given[k]))
        out["known_unknown"] = float(np.mean((rep < 0)[k]))
    return out


def risk_coverage(scores: Mapping[str, np.ndarray], correct: Mapping[str, np.ndarray],
                  coverages: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
                  ) -> pd.DataFrame:
    """Per rank: precision when accepting the top ``coverage`` share by score."""
    rows = []
    for rank, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        c = np.asarray(correct[rank], dtype=bool)
        order = np.argsort(-s, kind="stable")
        for cov in coverages:
            n = max(1, int(round(cov * len(s))))
            take = order[:n]
            rows.append({"rank": rank, "coverage": n / len(s), "threshold": float(s[take[-1]]),
                         "precision": float(c[take].mean()), "n": n})
    return pd.DataFrame(rows)
