"""The report of bench/openset_protocol.py: merge the per-seed JSON files into markdown.

Means with 95% t-intervals over the hold-out seeds, the paired difference ``auto`` minus
``fixed`` (same seeds, same held-out taxa, same splits) with its 95% interval, a paired
t-test and the count of seeds where ``auto`` is better; the issue's goals, met or not;
where held-out images land per held-out level; the recipe each seed chose.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from _results import markdown_table, publish

#: (key, label, higher is better) of the figure table
FIGURES = (("auroc_evidence", "unknown-detection AUROC, lowest-rank back-off evidence", True),
           ("auroc_outlier", "unknown-detection AUROC, outlier score", True),
           ("precision_species_all", "species-answer precision over all images (20% unknown)",
            True),
           ("precision_species_known", "species-answer precision over known images", True),
           ("coverage_known_species", "known images named to species (coverage)", True),
           ("species_correct", "unseen-species images at correct genus or family", True),
           ("unknown_named_species", "held-out images named to a (wrong) species", False))
LEVEL_NAMES = {"species": "unseen species (known congener)", "genus": "unseen genus (whole)",
               "family": "unseen family (whole)"}
OUTCOME_NAMES = {"correct_genus": "correct genus", "correct_family": "correct family",
                 "wrong_higher": "wrong higher taxon", "named_species": "named to a species",
                 "unknown": "unknown"}


def load_records(folder: Path, data: str) -> list[dict]:
    recs = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{data}.*.seed*.json"))]
    for r in recs:
        r["species_correct"] = r["landing"].get("species", {}).get("correct_genus_or_family",
                                                                   float("nan"))
    return recs


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (NaN interval for fewer than two values)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if not len(v):
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - h, m + h


def _fmt(m: float, lo: float, hi: float, pct: bool = False) -> str:
    if math.isnan(m):
        return ""
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
    return f"{f(m)} [{f(lo)}, {f(hi)}]" if not math.isnan(lo) else f(m)


def by_seed(recs: list[dict], recipe: str, key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in recs if r["recipe"] == recipe}


ARMS = ("auto", "fixed", "old")
#: library paths whose uncommitted state could change these figures
RELEVANT = ("taxoclass/openset/", "taxoclass/model/", "taxoclass/pipelines/train.py",
            "taxoclass/pipelines/openset_fit.py", "taxoclass/pipelines/data.py",
            "taxoclass/config.py", "taxoclass/bundle.py")
CONTROLS = ("old", "fixed")


def _paired(recs: list[dict], key: str, control: str, higher: bool, pct: bool
            ) -> dict[str, str]:
    """auto minus ``control`` on the seeds both ran: mean [95% interval], paired t-test p,
    seeds where auto is better."""
    from scipy import stats

    a, f = by_seed(recs, "auto", key), by_seed(recs, control, key)
    seeds = sorted(set(a) & set(f))
    d = [a[s] - f[s] for s in seeds]
    p = (stats.ttest_rel([a[s] for s in seeds], [f[s] for s in seeds]).pvalue
         if len(seeds) > 1 and np.std(d) > 0 else float("nan"))
    better = sum((x > 0) if higher else (x < 0) for x in d)
    return {f"auto - {control}": _fmt(*interval(d), pct=pct),
            f"p (vs {control})": "" if math.isnan(p) else f"{p:.3f}",
            f"auto better (vs {control})": f"{better}/{len(seeds)}"}


def figure_table(recs: list[dict], recipes: Sequence[str]) -> pd.DataFrame:
    """Mean [95% interval] per arm, and the paired differences auto - control."""
    rows = []
    for key, label, higher in FIGURES:
        pct = key not in ("auroc_evidence", "auroc_outlier")
        row = {"figure": label + (" (%)" if pct else "")}
        for rec in recipes:
            v = by_seed(recs, rec, key)
            row[f"{rec} (n={len(v)})"] = _fmt(*interval(list(v.values())), pct=pct)
        for control in CONTROLS:
            if "auto" in recipes and control in recipes:
                row.update(_paired(recs, key, control, higher, pct))
        rows.append(row)
    return pd.DataFrame(rows)


def goals(recs: list[dict], recipe: str) -> list[str]:
    """The issue's goals on the leaf data, met or not, for ``recipe`` (seed means)."""
    def mean(key):
        return interval(list(by_seed(recs, recipe, key).values()))

    au, pa, cov, sc = (mean(k) for k in ("auroc_evidence", "precision_species_all",
                                           "coverage_known_species", "species_correct"))
    def met(ok):
        return "**met**" if ok else "**not met**"
    return [f"- AUROC >= 0.93 mean: {met(au[0] >= 0.93)} ({_fmt(*au)})",
            f"- species precision over all >= 95% at 20% unknown share with >= 80% of known "
            f"images named to species: {met(pa[0] >= 0.95 and cov[0] >= 0.80)} (precision "
            f"{_fmt(*pa, pct=True)}%, coverage {_fmt(*cov, pct=True)}%)",
            f"- >= 70% of unseen-species images at correct genus or family: "
            f"{met(sc[0] >= 0.70)} ({_fmt(*sc, pct=True)}%)"]


def landing_table(recs: list[dict], recipes: Sequence[str]) -> pd.DataFrame:
    """Mean share (%) of held-out images per outcome, per held-out level and recipe."""
    rows = []
    for level, name in LEVEL_NAMES.items():
        for rec in recipes:
            got = [r["landing"][level] for r in recs if r["recipe"] == rec and level in
                   r["landing"]]
            if not got:
                continue
            row = {"held out": name, "recipe": rec, "seeds": len(got),
                   "images per seed": f"{np.mean([g['n'] for g in got]):.0f}",
                   "AUROC evidence": _auroc_cell(got, "auroc_evidence"),
                   "AUROC outlier": _auroc_cell(got, "auroc_outlier")}
            for k, label in OUTCOME_NAMES.items():
                row[label] = f"{100 * np.mean([g[k] for g in got]):.1f}"
            rows.append(row)
    return pd.DataFrame(rows)


def _auroc_cell(got: list[dict], key: str) -> str:
    v = [g[key] for g in got if key in g]
    return f"{np.mean(v):.3f}" if v else ""


def _recipe_text(chosen: dict | None) -> str:
    if not chosen:
        return ""
    q = f" / q {chosen.get('gate_quantile')}" if chosen.get("combiner") == "gate" else ""
    return f"{chosen.get('detector')} / {chosen.get('combiner')} / {chosen.get('confidence')}{q}"


def choice_counts(recs: list[dict]) -> str:
    """How often each recipe was chosen by ``auto`` over the seeds."""
    got = pd.Series([_recipe_text(r.get("chosen")) for r in recs if r["recipe"] == "auto"])
    return "; ".join(f"{k} ({v} of {len(got)})" for k, v in got.value_counts().items())


def seed_table(recs: list[dict]) -> pd.DataFrame:
    """Per seed and recipe: what was held out, the recipe chosen, expected vs measured."""
    rows = []
    for r in sorted(recs, key=lambda r: (r["seed"], r["recipe"])):
        exp = r.get("expected") or {}
        rows.append({"seed": r["seed"], "recipe arm": r["recipe"],
                     "held-out families / genera": ", ".join(
                         r["held_out"].get("family", []) + r["held_out"].get("genus", [])),
                     "chosen (detector / combiner / confidence / gate q)":
                         _recipe_text(r.get("chosen")),
                     "expected AUROC": exp.get("auroc"), "measured AUROC": r["auroc_evidence"],
                     "expected precision all": exp.get("precision_species_all"),
                     "measured precision all": r["precision_species_all"]})
    return pd.DataFrame(rows)


#: (selection metric, measured figure, label)
PROMISES = (("auroc", "auroc_evidence", "AUROC"),
            ("precision_species_all", "precision_species_all", "precision over all"),
            ("coverage_known_species", "coverage_known_species", "known coverage"),
            ("unseen_species_correct_higher", "species_correct",
             "unseen species at genus/family"))


def promise_table(recs: list[dict]) -> pd.DataFrame:
    """What the training's selection expected (the winner's own leave-taxa-out figures,
    and the nested estimate of the choice procedure) against the test, seed means."""
    rows = []
    for arm in ARMS:
        got = [r for r in recs if r["recipe"] == arm and r.get("expected")]
        for key, measured, label in PROMISES:
            exp = [r["expected"].get(key) for r in got]
            nest = [(r.get("expected_nested") or {}).get(key) for r in got]
            if not got or all(v is None for v in exp):
                continue
            rows.append({"arm": arm, "figure": label, "seeds": len(got),
                         "expected (winner)": _mean(exp), "expected (nested)": _mean(nest),
                         "measured on test": _mean([r[measured] for r in got])})
    return pd.DataFrame(rows)


def _mean(v: list) -> float:
    v = [x for x in v if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def _run_lines(recs: list[dict]) -> list[str]:
    dates = sorted(r["date"] for r in recs)
    cmds = sorted({r["command"] for r in recs})
    loads = sorted({r["uptime"].split("load average:")[-1].strip() for r in recs})
    return [f"- runs: {dates[0]} to {dates[-1]} (UTC), machine {recs[0]['machine']}, "
            "no GPU, torch one thread, niced",
            f"- load averages during the runs (1/5/15 min): {'; '.join(loads[:4])}"
            + (" ..." if len(loads) > 4 else ""),
            "- commands: " + "; ".join(f"`{c}`" for c in cmds),
            "- code: commit(s) " + ", ".join(sorted({str(r.get("commit")) for r in recs}))
            + "; open-set/model/train files uncommitted in the shared tree during some runs: "
            + (", ".join(sorted({u.split()[-1] for r in recs for u in r.get("uncommitted", [])
                                 if u.split()[-1].startswith(RELEVANT)})) or "none"),
            f"- time per seed and arm: {np.mean([r['seconds'] for r in recs]):.0f} s mean "
            f"(training {np.mean([r['train_seconds'] for r in recs]):.0f} s)"]


def section(recs: list[dict], title: str, intro: Sequence[str]) -> list[str]:
    recipes = [r for r in ARMS if any(x["recipe"] == r for x in recs)]
    out = [f"## {title}", "", *intro, "", *_run_lines(recs), "",
           markdown_table(figure_table(recs, recipes)), ""]
    for rec in recipes:
        out += [f"Goals, arm `{rec}`:", "", *goals(recs, rec), ""]
    out += ["Where held-out images land (mean % over seeds; the five outcome columns add up "
            "to 100; AUROC: that level's images against the known test images):", "",
            markdown_table(landing_table(recs, recipes)), "",
            "What the selection expected (seed means; nested: the choice made on the other "
            "rounds, scored on each round) and what the test gave:", "",
            markdown_table(promise_table(recs)), "",
            f"Recipes chosen by `auto` (detector / combiner / confidence / gate quantile): "
            f"{choice_counts(recs)}.", "",
            "Per seed:", "", markdown_table(seed_table(recs)), ""]
    return out


def write_report(folder: Path, report: Path) -> None:
    leaf, syn = load_records(folder, "leaf"), load_records(folder, "synthetic")
    out = ["# Open-set figures under the protocol (issue 18)", "",
           "Made by `bench/openset_protocol.py` (the module docstring has the design); "
           "seed 0 chose the old fixed defaults in earlier sessions and is kept out: seeds "
           "1..N only. Arms: `auto` (`openset.recipe: auto`, the default), `old` (the old "
           "defaults as they were: `recipe: fixed`, `rounds: 0`), `fixed` (the old recipe, "
           "thresholds fitted with the rounds' simulated unknowns). Intervals: 95% "
           "t-intervals over seeds; paired columns: auto minus the control on the same "
           "seeds, held-out taxa and splits, paired t-test p, seeds where auto is better.", ""]
    if leaf:
        out += section(leaf, "Leaf data (EfficientNet-Lite0, 384 px letterbox, cached)",
                       ["Known species split 70/30; the model trains on the 70% with "
                        "`taxoclass.train` (configs/leaf.yaml: hxe + marginal head)."])
    if syn:
        out += section(syn, "Second data set: synthetic hierarchical embeddings",
                       ["See bench/openset_synthetic.py for the generator."])
    publish("\n".join(out), report)
