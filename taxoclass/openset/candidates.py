"""Candidate open-set recipes and their cross-validated scores (used by
:mod:`taxoclass.openset.selection`, which explains the protocol).

:func:`candidates` lists them (detector x combiner x confidence x gate quantile);
:func:`score_candidates` scores each on the pooled rows of the leave-taxa-out rounds
without ever scoring a row with a combiner or thresholds fitted on it; :func:`choose`
applies the choice rule; :func:`fit_chosen` fits the chosen one on every round's rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..config import OpensetConfig
from ..vocab import Combiner

__all__ = ["METRICS", "Candidate", "SimulatedRows", "candidates", "choose", "fit_chosen",
           "nested_estimate", "score_candidates"]

METRICS = ("auroc", "precision_species_all", "precision_species_known",
           "coverage_known_species", "unknown_named_species", "unknown_correct_higher",
           "unseen_species_correct_higher")


@dataclass(frozen=True)
class Candidate:
    """One open-set recipe: detector, combiner, confidence and (gate only) gate quantile."""

    detector: str
    combiner: str
    confidence: str
    gate_quantile: float

    @property
    def key(self) -> str:
        q = f"@{self.gate_quantile:g}" if self.combiner == Combiner.GATE else ""
        return f"{self.detector}/{self.combiner}{q}/{self.confidence}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidates(ocfg: OpensetConfig | Mapping[str, Any] | None = None,
               recipe: str | None = None) -> list[Candidate]:
    """Every candidate of ``ocfg`` (its ``candidate_*`` lists; gate quantiles only for the
    gate combiner); with recipe ``fixed`` only the configured one."""
    oc = ocfg if isinstance(ocfg, OpensetConfig) else OpensetConfig.from_dict(ocfg)
    if (recipe or oc.recipe) == "fixed":
        return [Candidate(oc.detector, oc.combiner, oc.confidence, float(oc.gate_quantile))]
    out = []
    for det in oc.candidate_detectors:
        for comb in oc.candidate_combiners:
            qs = (oc.candidate_gate_quantiles if comb == Combiner.GATE
                  else [oc.gate_quantile])
            for conf in oc.candidate_confidences:
                out += [Candidate(det, comb, conf, float(q)) for q in qs]
    return out


@dataclass
class SimulatedRows:
    """Every round's scored rows, pooled: evidence inputs and truth per row."""

    ranks: tuple[str, ...]
    round: np.ndarray        # round index per pooled row
    row: np.ndarray          # index into the training rows
    unknown: np.ndarray      # row of a hidden taxon
    half: np.ndarray         # 0/1: the image's half (seeded, grouped like the rounds)
    conf: dict[str, dict[str, np.ndarray]]  # confidence kind -> rank -> value
    z: dict[str, np.ndarray]                # detector kind -> outlier z-score
    correct: dict[str, np.ndarray]          # rank -> the decoded path is right there
    labelled: dict[str, np.ndarray]         # rank -> the row has a label there
    held: list[dict[str, list[str]]] = field(default_factory=list)  # per round
    hidden_rank: np.ndarray | None = None   # rank the row's taxon was hidden at ("": known)

    def take(self, mask: np.ndarray) -> SimulatedRows:
        """The rows where ``mask`` is True."""
        m = np.asarray(mask, dtype=bool)
        return SimulatedRows(
            ranks=self.ranks, round=self.round[m], row=self.row[m], unknown=self.unknown[m],
            half=self.half[m], conf={k: {r: v[m] for r, v in d.items()}
                                     for k, d in self.conf.items()},
            z={k: v[m] for k, v in self.z.items()},
            correct={r: v[m] for r, v in self.correct.items()},
            labelled={r: v[m] for r, v in self.labelled.items()}, held=self.held,
            hidden_rank=None if self.hidden_rank is None else self.hidden_rank[m])


# ---------------------------------------------------------------------- scoring
def _fit_on(sim: SimulatedRows, c: Candidate, oc: OpensetConfig):
    """The candidate's combiner and thresholds fitted on ``sim``'s rows."""
    from .scorer import fit_evidence_arrays

    return fit_evidence_arrays(sim.conf[c.confidence], sim.z[c.detector], sim.correct,
                               combiner=c.combiner, confidence=c.confidence,
                               gate_quantile=c.gate_quantile,
                               target_precision=oc.target_precision,
                               min_support=oc.min_support, labelled=sim.labelled,
                               unknown=sim.unknown, unknown_share=oc.unknown_share)


def _scored_half(sim: SimulatedRows, fit_rows: np.ndarray, score_rows: np.ndarray,
                 c: Candidate, oc: OpensetConfig) -> dict[str, Any] | None:
    """Evidence and acceptance per rank of ``score_rows`` under a fit on ``fit_rows``."""
    f = sim.take(fit_rows)
    if not fit_rows.any() or not score_rows.any() or not f.unknown.any() or f.unknown.all():
        return None
    comb, thr = _fit_on(f, c, oc)
    s = sim.take(score_rows)
    ev = comb.score(s.conf[c.confidence], s.z[c.detector])
    acc = {r: np.asarray(ev[r]) >= float(thr.thresholds[r]) for r in sim.ranks}
    return {"sim": s, "ev": ev, "acc": acc}


def _round_metrics(parts: Sequence[dict[str, Any]], ranks: Sequence[str],
                   unknown_share: float) -> dict[str, float]:
    """The metrics of one round from its two scored halves."""
    from sklearn.metrics import roc_auc_score

    from .thresholds import precision_all_known

    lowest = ranks[-1]
    cat = np.concatenate
    unk = cat([p["sim"].unknown for p in parts])
    lab = cat([p["sim"].labelled[lowest] for p in parts])
    correct = {r: cat([p["sim"].correct[r] for p in parts]) for r in ranks}
    acc = {r: cat([p["acc"][r] for p in parts]) for r in ranks}
    p_all, p_known, cov = precision_all_known(acc[lowest][lab], correct[lowest][lab],
                                              unk[lab], unknown_share)
    aucs = [roc_auc_score(p["sim"].unknown, -np.nan_to_num(np.asarray(p["ev"][lowest]),
                                                           nan=-1e9))
            for p in parts if 0 < p["sim"].unknown.sum() < len(p["sim"].unknown)]
    # The rank an answer is given at: the lowest accepted one (back-off walks up).
    placed = np.zeros(len(unk), dtype=bool)
    done = acc[lowest].copy()
    for r in reversed(ranks[:-1]):
        placed |= ~done & acc[r] & correct[r]
        done |= acc[r]
    nan = float("nan")
    hidden = (cat([p["sim"].hidden_rank for p in parts])
              if all(p["sim"].hidden_rank is not None for p in parts) else None)
    sp = unk & (hidden == lowest) if hidden is not None else np.zeros_like(unk)
    return {"unseen_species_correct_higher": float(placed[sp].mean()) if sp.any() else nan,
            "auroc": float(np.mean(aucs)) if aucs else nan,
            "precision_species_all": nan if p_all is None else p_all,
            "precision_species_known": nan if p_known is None else p_known,
            "coverage_known_species": cov,
            "unknown_named_species": float(acc[lowest][unk].mean()) if unk.any() else nan,
            "unknown_correct_higher": float(placed[unk].mean()) if unk.any() else nan}


def score_candidates(sim: SimulatedRows, cands: Sequence[Candidate],
                     ocfg: OpensetConfig | Mapping[str, Any] | None = None
                     ) -> list[dict[str, Any]]:
    """Cross-validated scores of every candidate: per round (fitted on one half of the
    other rounds' rows, scored on the other half of this round's, both ways; a single
    round fits on its own other half), then mean and 95% t interval over rounds."""
    from ..model.stats import t_interval

    oc = ocfg if isinstance(ocfg, OpensetConfig) else OpensetConfig.from_dict(ocfg)
    rounds = sorted(set(sim.round.tolist()))
    table = []
    for c in cands:
        per_round = []
        for r in rounds:
            this = sim.round == r
            other = ~this if len(rounds) > 1 else this
            parts = [p for h in (0, 1) if (p := _scored_half(
                sim, other & (sim.half == h), this & (sim.half == 1 - h), c, oc))]
            if parts:
                per_round.append(_round_metrics(parts, sim.ranks, oc.unknown_share))
        row: dict[str, Any] = {"key": c.key, **c.as_dict(), "n_rounds": len(per_round)}
        for m in METRICS:
            mean, lo, hi = t_interval([pr[m] for pr in per_round])
            lo, hi = max(lo, 0.0), min(hi, 1.0)  # proportions and AUROC lie in [0, 1]
            row[m] = _num(mean)
            row[f"{m}_ci95"] = [_num(lo), _num(hi)]
            row[f"{m}_rounds"] = [_num(pr[m]) for pr in per_round]
        table.append(row)
    return table


def _num(v: float) -> float | None:
    """JSON-safe: NaN becomes None."""
    return None if v is None or v != v else float(v)


def choose(table: Sequence[Mapping[str, Any]], target: float, slack: float = 0.0
           ) -> Mapping[str, Any]:
    """The chosen row of :func:`score_candidates`: among rows whose mean precision over all
    images is >= ``target - slack``, the highest known coverage at species (ties: higher
    precision over all, then AUROC); none meeting it: the highest precision over all, then
    AUROC, then coverage."""
    if not table:
        raise ValueError("choose: no candidate was scored.")

    def v(row, key):
        x = row.get(key)
        return -np.inf if x is None or x != x else float(x)

    meets = [t for t in table if v(t, "precision_species_all") >= target - slack - 1e-12]
    if meets:
        return max(meets, key=lambda t: (round(v(t, "coverage_known_species"), 9),
                                         v(t, "precision_species_all"), v(t, "auroc")))
    return max(table, key=lambda t: (v(t, "precision_species_all"), v(t, "auroc"),
                                     v(t, "coverage_known_species")))


def fit_chosen(sim: SimulatedRows, c: Candidate,
               ocfg: OpensetConfig | Mapping[str, Any] | None = None):
    """The chosen candidate's combiner and thresholds on every round's scored rows."""
    oc = ocfg if isinstance(ocfg, OpensetConfig) else OpensetConfig.from_dict(ocfg)
    return _fit_on(sim, c, oc)


def nested_estimate(table: Sequence[Mapping[str, Any]], target: float, slack: float = 0.0
                    ) -> dict[str, Any] | None:
    """What the choice itself delivers: for each round, :func:`choose` on the other rounds'
    figures, then that candidate's figures on the round left out; mean and 95% t interval
    over rounds (less optimistic than the winner's own figures). None with < 2 rounds."""
    from ..model.stats import t_interval

    n = min((len(t.get("auroc_rounds") or []) for t in table), default=0)
    if n < 2:
        return None
    picks, per_round = [], []
    for r in range(n):
        others = [{**t, **{m: _mean_without(t[f"{m}_rounds"], r) for m in METRICS}}
                  for t in table]
        best = choose(others, target, slack)
        row = next(t for t in table if t["key"] == best["key"])
        picks.append(best["key"])
        per_round.append({m: row[f"{m}_rounds"][r] for m in METRICS})
    out: dict[str, Any] = {"chosen_per_round": picks}
    for m in METRICS:
        mean, lo, hi = t_interval([p[m] for p in per_round])
        out[m], out[f"{m}_ci95"] = _num(mean), [_num(max(lo, 0.0)), _num(min(hi, 1.0))]
    return out


def _mean_without(values: Sequence[float | None], r: int) -> float | None:
    v = [x for i, x in enumerate(values) if i != r and x is not None]
    return float(np.mean(v)) if v else None
