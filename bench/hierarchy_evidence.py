"""Does the hierarchy pay? The evaluation protocol (issue 17) on the leaf data and on a
NAFlora-mini-shaped synthetic set, and the default chosen from it.

Everything runs through the public protocol, ``taxoclass.pipelines.benchmark.benchmark``
(what ``taxoclass benchmark`` runs): every recipe of ``taxoclass.model.recipes`` on the
same seeded 70/30 splits and cached embeddings, selection seeds 1..N, seed 0 kept back.

Parts (each run writes ``bench/results/hierarchy_evidence/<part>.seeds<a>-<b>[tag]/``; runs of
one part with other seeds or recipes are merged by ``--report``, so they can run in parallel).
The figures of 2026-11-30 (session 8, the shipped 300 epochs) were made with one process per
seed and part (``--final 0`` with seed 1 only, ``--final none`` otherwise), for example:

    B=bench/hierarchy_evidence.py; export OMP_NUM_THREADS=1
    ESS=taxoclass,species-only,hxe,per-rank,crm,path,marginal,topdown,species-only+crm,knn
    nice -n 10 .venv/bin/python $B --part leaf --axes full --epochs 300 --recipes $ESS \
        --seeds 1-1 --final 0                      # and partial-50, unseen; seeds 2..10
    nice -n 10 .venv/bin/python $B --part leaf --axes full --epochs 300 \
        --recipes logreg,hiclass --tag .baselines --seeds 1-1 --final 0
    nice -n 10 .venv/bin/python $B --part naflora --epochs 300 --recipes species-only,hxe \
        --tag .hxe --seeds 1-1 --final 0           # and per-rank; seeds 2..6
    .venv/bin/python $B --report     # -> bench/results/hierarchy_evidence.md

The 50-epoch figures of the session before (every recipe, and the other axes of
``--part leaf-more``) are kept in ``bench/results/hierarchy_evidence/epochs50/``; the
report uses them only for a part not re-run at 300 epochs, and says so.

``--epochs`` is the one training setting that may differ from configs/leaf.yaml (300), for
every head recipe alike; the report states it per part. The synthetic set
(:func:`naflora_like`): the NAFlora-mini taxonomy (metadata.json: 1,863 species, 829
genera, 162 families, 5 images each) with embeddings from a seeded hierarchical Gaussian
model (64 dimensions; standard deviations 1.0 family, 0.7 genus, 0.5 species, 1.2 image
noise: cosine 1-NN reaches ~0.61 species accuracy).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _results import publish

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "leaf.yaml"
NAFLORA = ROOT.parent / "shared" / "data" / "naflora-mini" / "metadata.json"
OUT = ROOT / "bench" / "results" / "hierarchy_evidence"
REPORT = ROOT / "bench" / "results" / "hierarchy_evidence.md"
EARLIER = OUT / "epochs50"
CONTROL = "species-only"
DEFAULT = "taxoclass"   # the config as shipped (hxe + marginal since session 8)
OLD_DEFAULT = "per-rank"
BASELINES = ("logreg", "hiclass", "knn")
#: the issue's five figure axes: (part folder, column, label, higher is better)
FIGURES = (("leaf-full", "acc_species", "species accuracy", True),
           ("leaf-partial-50", "acc_species", "species acc., 50% species labels hidden", True),
           ("leaf-full", "mistake_distance", "mean tree distance of mistakes", False),
           ("leaf-unseen", "unseen_parent", "unseen-species genus placement", True),
           ("leaf-full", "ece_species", "species ECE", False))
MORE_RECIPES = ("taxoclass", "species-only", "per-rank", "knn")
NAFLORA_RECIPES = ("taxoclass", "species-only", "per-rank")


# ------------------------------------------------------------------------------ data
def naflora_like(seed: int = 0, dim: int = 64, scales=(1.0, 0.7, 0.5, 1.2)):
    """NAFlora-mini-shaped synthetic embeddings: the real taxonomy and image counts of
    ``metadata.json``; each image's vector is family mean + genus offset + species offset
    + image noise, every term an isotropic Gaussian of ``dim`` dimensions with standard
    deviation ``scales`` (family, genus, species, noise) per dimension, seeded."""
    from taxoclass import Taxonomy
    from taxoclass.pipelines.benchmark import BenchmarkData

    meta = json.loads(NAFLORA.read_text())
    cats = {c["category_id"]: c for c in meta["categories"]}
    tax = Taxonomy.from_records([{"family": c["family"], "genus": c["genus"],
                                  "species": c["species"]} for c in cats.values()])
    rng = np.random.default_rng(seed)
    sf, sg, ss, sn = scales
    fam = {n: rng.normal(0, sf, dim) for n in tax.nodes("family")}
    gen = {n: fam[n[:1]] + rng.normal(0, sg, dim) for n in tax.nodes("genus")}
    spe = {n: gen[n[:2]] + rng.normal(0, ss, dim) for n in tax.nodes("species")}
    labels = [tax.node_for({"family": cats[a["category_id"]]["family"],
                            "genus": cats[a["category_id"]]["genus"],
                            "species": cats[a["category_id"]]["species"]})
              for a in meta["annotations"]]
    x = np.stack([spe[n] for n in labels]) + rng.normal(0, sn, (len(labels), dim))
    y = {r: np.array([tax.path_indices(n)[r] for n in labels]) for r in tax.ranks}
    return BenchmarkData(x=x.astype(np.float32), y=y, taxonomy=tax,
                         name="NAFlora-mini-shaped synthetic embeddings")


def leaf_data():
    from taxoclass import load_config
    from taxoclass.pipelines.benchmark import benchmark_data

    cfg = load_config(CONFIG)
    return benchmark_data(cfg), cfg


def _settings(cfg: dict, epochs: int) -> dict:
    s = {k: dict(cfg[k]) for k in ("model", "loss", "train", "decode")}
    s["train"]["epochs"] = epochs
    return s


# ------------------------------------------------------------------------------ parts
def run_part(part: str, axes: list[str], seeds: list[int], final: list[int], epochs: int,
             recipes, tag: str = "") -> Path:
    from taxoclass.pipelines.benchmark import benchmark

    t0 = time.time()
    if part == "naflora":
        from taxoclass import load_config

        data, cfg = naflora_like(), load_config(CONFIG)
    else:
        data, cfg = leaf_data()
    name = part if part != "leaf" else f"leaf-{'+'.join(axes)}"
    out = OUT / f"{name}.seeds{seeds[0]}-{seeds[-1]}{tag}"
    bar = _progress(name)
    benchmark(data, list(recipes) if recipes else None, seeds=seeds, final_seeds=final,
              axes=axes, settings=_settings(cfg, epochs), out=out, progress=bar)
    (out / "run.json").write_text(json.dumps({
        "command": "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/hierarchy_evidence.py "
                   + " ".join(sys.argv[1:]),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - t0), "uptime": _uptime(), "host": platform.node(),
        "cpus": os.cpu_count()}, indent=2))
    return out


def _progress(name: str):
    t0 = time.time()

    def report(done: int, total: int) -> None:
        print(f"[{name}] {done}/{total} fits, {time.time() - t0:.0f} s", flush=True)
    return report


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


# ------------------------------------------------------------------------------ report
def _load(part: str, root: Path | None = None):
    """The runs of ``part`` under ``root`` (default ``OUT``; one folder per seed range),
    merged."""
    import dataclasses

    import pandas as pd

    from taxoclass.pipelines.benchmark_report import load_benchmark

    runs = [load_benchmark(f) for f in sorted((root or OUT).glob(f"{part}.seeds*"))
            if (f / "protocol.json").is_file()]
    if not runs:
        return None
    right = {k: v for r in runs for k, v in r.right.items()}
    # a recipe run in two processes on one seed (the control is added to every run) is
    # the same seeded fit twice: keep one row
    results = pd.concat([r.results for r in runs], ignore_index=True).drop_duplicates(
        ["seed", "axis", "recipe"])
    recipes = list(dict.fromkeys(n for r in runs for n in r.recipes))
    axes = tuple(dict.fromkeys(a for r in runs for a in r.axes))
    return dataclasses.replace(
        runs[0], results=results, recipes=tuple(recipes), axes=axes,
        seeds=tuple(sorted({s for r in runs for s in r.seeds})),
        final_seeds=tuple(sorted({s for r in runs for s in r.final_seeds})), right=right)


def _runs(part: str, root: Path | None = None) -> list[dict]:
    return [json.loads((f / "run.json").read_text())
            for f in sorted((root or OUT).glob(f"{part}.seeds*")) if (f / "run.json").is_file()]


def run_log(names) -> str:
    """One line per part: runs, their summed seconds, finish window and 1-minute loads."""
    out = []
    for n in names:
        runs = _runs(n)
        if not runs:
            continue
        loads = [float(r["uptime"].split("load average:")[-1].split(",")[0]) for r in runs
                 if "load average:" in r.get("uptime", "")]
        ends = sorted(r["finished"] for r in runs)
        out.append(f"{n}: {len(runs)} runs, {sum(r['seconds'] for r in runs)} s in all, "
                   f"finished {ends[0][11:16]}–{ends[-1][11:16]} UTC {ends[-1][:10]}, "
                   f"1-min load {min(loads):.1f}–{max(loads):.1f} at their ends")
    return "; ".join(out)


def _epochs(result) -> int:
    return int(result.info["settings"]["train"]["epochs"])


def _cell(c: dict, higher: bool, control: bool) -> tuple[str, str, int]:
    mean, lo, hi = c["mean"]
    text = f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
    if control:
        return text, "control", 0
    d, dlo, dhi, p = c["diff"]
    sig = 0 if not p < 0.05 else (1 if (d > 0) == higher else -1)
    mark = {1: " **better**", -1: " *worse*", 0: ""}[sig]
    return text, f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}] p={p:.2g}{mark}", sig


def figures_table(parts: dict) -> tuple[list[str], dict[str, list[int]]]:
    """The five figure axes, each recipe against the control; and per recipe the sign of
    each significant difference (+1 better, -1 worse, 0 not significant)."""
    from taxoclass.pipelines.benchmark_report import compare

    first = parts["leaf-full"]
    recipes = [r for r in first.recipes if all(r in p.recipes for p in parts.values() if p)]
    signs = {r: [] for r in recipes}
    head = "| recipe | " + " | ".join(
        f"{f[2]} ({len(parts[f[0]].seeds)} splits)" for f in FIGURES) + " |"
    lines = [head, "|---" * (len(FIGURES) + 1) + "|"]
    for r in recipes:
        cells = []
        for part, col, _, higher in FIGURES:
            res = parts[part]
            c = compare(res, res.axes[0], r, col)
            text, diff, sig = _cell(c, higher, r == CONTROL)
            signs[r].append(sig)
            cells.append(f"{text}<br>{diff}")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return lines, signs


def compact_table(parts: dict, recipes=None) -> list[str]:
    """The figure axes as ``mean ± half-width (difference to the control, paired t p)``:
    one line per recipe (for BENCHMARKS.md)."""
    from taxoclass.pipelines.benchmark_report import compare

    first = parts["leaf-full"]
    recipes = recipes or [r for r in first.recipes
                          if all(r in parts[f[0]].recipes for f in FIGURES)]
    lines = ["| recipe | " + " | ".join(f"{f[2]} ({len(parts[f[0]].seeds)} splits)"
                                         for f in FIGURES) + " |",
             "|---" * (len(FIGURES) + 1) + "|"]
    for r in recipes:
        cells = []
        for part, col, _, higher in FIGURES:
            res = parts[part]
            c = compare(res, res.axes[0], r, col)
            mean, lo, hi = c["mean"]
            text = f"{mean:.3f} ± {(hi - lo) / 2:.3f}"
            if r != CONTROL:
                d, _, _, pv = c["diff"]
                good = pv < 0.05 and (d > 0) == higher
                bad = pv < 0.05 and (d > 0) != higher
                text += f" ({d:+.3f}, p={pv:.2g})"
                text = f"**{text}**" if good else (f"*{text}*" if bad else text)
            cells.append(text)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return lines


def choose_default(parts: dict, signs: dict[str, list[int]]) -> tuple[str, str]:
    """Item 5, on the selection seeds only: the recipe with the most figure axes
    significantly better than the control and none worse (ties: higher mean species
    accuracy); if there is none, the best measured head recipe by species accuracy."""
    from taxoclass.pipelines.benchmark import select_on_selection_seeds

    ok = {r: s.count(1) for r, s in signs.items() if r != CONTROL and -1 not in s
          and s.count(1) >= 1}
    full = parts["leaf-full"].results
    acc = full[full["split"] == "selection"].groupby("recipe")["acc_species"].mean()
    if ok:
        best = max(ok.values())
        tied = [r for r, k in ok.items() if k == best]
        choice = max(tied, key=lambda r: acc[r])
        return choice, (f"`{choice}`: significantly better than the control on {best} of 5 "
                        f"figure axes and worse on none (selection seeds only)")
    heads = [r for r in acc.index if r not in BASELINES]
    choice = select_on_selection_seeds(full, heads, "acc_species")
    return choice, (f"no recipe beats the control on a figure axis without being worse on "
                    f"another; `{choice}` has the best mean species accuracy of the head "
                    f"recipes (selection seeds only)")


def final_table(parts: dict, recipes: list[str]) -> list[str]:
    """``recipes`` against the control on the kept-back seed 0 (Wilson intervals over that
    split's images; McNemar p against the control)."""
    from taxoclass.model.stats import mcnemar, wilson_interval

    lines = ["| figure axis | " + " | ".join(f"`{r}`" for r in (*recipes, CONTROL)) + " |",
             "|---" * (len(recipes) + 2) + "|"]
    for part, col, label, _ in FIGURES:
        res = parts[part]
        df = res.results
        ctrl = res.right.get((0, res.axes[0], CONTROL, col))
        cells = []
        for r in (*recipes, CONTROL):
            row = df[(df["seed"] == 0) & (df["recipe"] == r)]
            right = res.right.get((0, res.axes[0], r, col))
            if right is not None:
                lo, hi = wilson_interval(int(right.sum()), len(right))
                text = f"{right.mean():.3f} [{lo:.3f}, {hi:.3f}]"
                if r != CONTROL and ctrl is not None:
                    text += f" (McNemar p={mcnemar(right, ctrl)[2]:.2g})"
            else:
                text = f"{float(row[col].iloc[0]):.3f}" if len(row) else "n/a"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def goal_lines(signs: dict[str, list[int]], epochs: int) -> list[str]:
    """Issue 17's goal for the shipped default and the previous one, stated plainly."""
    out = []
    for r, what in ((DEFAULT, "the shipped default (hxe + marginal)"),
                    (OLD_DEFAULT, "the previous default (per-rank heads + dependency term + "
                                  "path decoding)")):
        if r not in signs:
            continue
        better = [FIGURES[i][2] for i, v in enumerate(signs[r]) if v == 1]
        worse = [FIGURES[i][2] for i, v in enumerate(signs[r]) if v == -1]
        met = len(better) >= 2 and not worse
        out.append(f"- `{r}`, {what}, at {epochs} epochs: **goal {'met' if met else 'not met'}**"
                   f" — significantly better than the control on {len(better)} of 5 axes"
                   f" ({'; '.join(better) or 'none'}), worse on {len(worse)}"
                   f" ({'; '.join(worse) or 'none'}).")
    return out


def report() -> None:
    names = ["leaf-full", "leaf-partial-50", "leaf-unseen", "leaf-more", "naflora"]
    parts = {n: _load(n) for n in names}
    missing = [n for n in ("leaf-full", "leaf-partial-50", "leaf-unseen") if parts[n] is None]
    if missing:
        raise SystemExit(f"run the parts first: {missing}")
    earlier = {n: _load(n, OUT / "epochs50") for n in ("leaf-more",) if parts[n] is None}
    leaf = {k: v for k, v in parts.items() if k in ("leaf-full", "leaf-partial-50",
                                                     "leaf-unseen")}
    fig, signs = figures_table(leaf)
    choice, why = choose_default(parts, signs)
    full = parts["leaf-full"]
    epochs = _epochs(full)
    shipped = " as shipped" if epochs == 300 else " instead of the shipped 300"
    lines = [
        "# Does the hierarchy pay? (issue 17)", "",
        f"Leaf data: {full.info['n_images']} images, {full.info['sizes']}, EfficientNet-Lite0 "
        f"384 px letterbox embeddings (cached, configs/leaf.yaml). Protocol "
        f"(`taxoclass.pipelines.benchmark`, = `taxoclass benchmark`): seeded 70/30 splits "
        "stratified by species; selection seeds per part: " + "; ".join(
            f"{n} {list(p.seeds)} ({_epochs(p)} epochs)" for n, p in parts.items()
            if p is not None) + "; seed 0 kept back and never used for a choice. Every recipe "
        "on the same splits and features; head recipes with the configs/leaf.yaml recipe "
        "(linear heads, AdamW lr 0.03, wd 0.1, label smoothing 0.05, batch 128, "
        f"**{epochs} epochs{shipped}**, every head recipe alike). `taxoclass` is the config "
        "as shipped (hxe + marginal decoding, so its figures equal `hxe`'s); `per-rank` the "
        "previous default (dependency loss + path decoding, = `path`). Intervals: 95% "
        "Student-t over splits; p: paired t over splits against the control `species-only` "
        "(same recipe, loss on species only, summed up the tree); **better**/*worse*: "
        "p < 0.05, not corrected for the number of recipes × axes.", "",
        "Runs (2 CPU cores shared with other jobs, no GPU; quality figures are deterministic, "
        f"times depend on the load): {run_log(names)} (machine {platform.node()}).", "",
        f"## The five figure axes (leaf, selection seeds, {epochs} epochs)", "", *fig, "",
        "Compact form (mean ± 95% half-width; difference to the control, paired t p; "
        "**bold** significantly better, *italic* significantly worse):", "",
        *compact_table(leaf), "",
        "## Issue 17's goal (beats the control with p < 0.05 on at least two of the five axes, "
        "worse on none)", "", *goal_lines(signs, epochs), "",
        f"## The protocol's rule at {epochs} epochs", "", f"Rule: {choose_default.__doc__}",
        "", f"Result: {why}.", "",
        "## Kept-back seed 0 (reported once; nothing was chosen on it)", "",
        *final_table(parts, [DEFAULT, OLD_DEFAULT]), ""]
    pooled_reliability(full, "leaf-full")
    lines += ["Reliability diagram of the species path probability, pooled over the selection "
              "seeds: `bench/results/hierarchy_evidence/leaf-full-reliability.png`.", ""]
    sections = (("leaf-full", "Leaf, full labels: every recipe, all metrics", parts),
                ("leaf-more", "Leaf, the other axes", {**parts, **earlier}),
                ("naflora", "Second data set: NAFlora-mini-shaped synthetic embeddings", parts))
    for n, title, source in sections:
        if source.get(n) is None:
            continue
        from taxoclass.pipelines.benchmark_report import summary_markdown

        res = source[n]
        where = OUT if parts.get(n) is not None else OUT / "epochs50"
        text = summary_markdown(res, tuple(res.info["ranks"]))
        body = text.split("## Selection seeds", 1)[-1].split("## Kept-back", 1)[0]
        then = ("" if where == OUT else " Not re-run at 300 epochs: figures of the session "
                "before, where `taxoclass` was the default of that time (per-rank heads + "
                "dependency loss + path decoding, today's `per-rank`) and `hxe` ran on 3 seeds.")
        lines += [f"## {title} ({_epochs(res)} epochs)", "",
                  f"{len(res.seeds)} selection seeds; folders `{where.relative_to(ROOT)}/"
                  f"{n}.seeds*/` (the kept-back seed 0 in the seeds1-1 folders' summary.md)."
                  + then, "", body.strip(), ""]
    notes = REPORT.with_suffix(".notes.md")
    if notes.is_file():
        lines += [notes.read_text()]
    publish("\n".join(lines) + "\n", REPORT)


def pooled_reliability(result, part: str) -> None:
    """One reliability diagram over every selection seed of ``part``: the per-seed bins
    (``reliability.csv``) summed (counts) and count-weighted (confidence, accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    tables = [pd.read_csv(f / "reliability.csv") for f in sorted(OUT.glob(f"{part}.seeds*"))
              if (f / "reliability.csv").is_file()]
    if not tables:
        return
    t = pd.concat(tables)
    t = t[t["count"] > 0].assign(c=lambda d: d["mean_confidence"] * d["count"],
                                 a=lambda d: d["accuracy"] * d["count"])
    g = t.groupby(["recipe", "bin"], sort=False)[["count", "c", "a"]].sum().reset_index()
    keep = [r for r in result.recipes if r in set(g["recipe"])
            and r in ("taxoclass", "species-only", "per-rank", "crm", "soft-labels", "logreg",
                      "hiclass", "knn")]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
    for r in keep:
        d = g[g["recipe"] == r]
        ax.plot(d["c"] / d["count"], d["a"] / d["count"], marker="o", ms=3, lw=1.2, label=r)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean species path probability (bin)",
           ylabel="accuracy (bin)",
           title=f"Leaf, species, {len(result.seeds)} selection splits pooled")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(OUT / f"{part}-reliability.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["leaf", "leaf-more", "naflora"])
    ap.add_argument("--axes", default="full")
    ap.add_argument("--seeds", default="1-10", help="selection seeds FROM-TO")
    ap.add_argument("--final", default="0", help="kept-back seeds (comma-separated, or none)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--recipes", default=None, help="comma-separated (default: all)")
    ap.add_argument("--tag", default="", help="folder suffix (recipes split over processes)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.report:
        report()
        return 0
    if not CONFIG.is_file() or (args.part == "naflora" and not NAFLORA.is_file()):
        print("skip: data not found (see shared/data/README.md)")
        return 0
    recipes = args.recipes.split(",") if args.recipes else None
    axes = args.axes.split(",")
    if args.part == "leaf-more":
        axes = ["partial-25", "partial-75", "family-only", "long-tail"]
        recipes = recipes or list(MORE_RECIPES)
    if args.part == "naflora":
        recipes = recipes or list(NAFLORA_RECIPES)
    lo, hi = (int(v) for v in args.seeds.split("-"))
    final = [] if args.final == "none" else [int(v) for v in args.final.split(",")]
    out = run_part(args.part, axes, list(range(lo, hi + 1)), final, args.epochs, recipes,
                   args.tag)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
