"""The plot benchmark under the evaluation rules (issue 17, item 6).

Synthetic plots from real leaf images (``bench/synthetic_plots.py``'s plots, heads and
calibration split), scored so that

- the HEADLINE is the product's own choice: what ``calibrate_rules`` (the code behind
  ``taxoclass calibrate-plots``) picks on the calibration plots, applied to the test plots
  as ``plot-report --settings`` applies it. Never the best rule by test F1. The other
  rules are secondary rows, each with its setting chosen on calibration plots only;
- the baseline gets the SAME calibration budget: arg-max union with its species
  threshold and ``min_tiles`` chosen by the same ``calibrate_rules`` on the same
  calibration plots, with the same unknown-tile filter (none: the bench heads have no
  calibrated detector, so no rule gets flags), on DS@GT's own grid (3x3, no overlap) and
  on the product's grid (4x4, overlap 0.2), plus the untuned arg-max union on both grids;
- intervals are clustered by source leaf image (:mod:`taxoclass.plots.bootstrap`), paired
  against the baseline within the same resamples, and the whole thing is repeated over
  seeds (new calibration pool, calibration head, calibration and test plots each seed).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/plots_fair.py --views 4 \
        --results bench/results/plots_fair.md

Seed 0 holds the plots of the old headline (120 test, 60 calibration plots); seeds 1..
hold ``--n-test-extra`` / ``--n-cal-extra`` plots each (tile embedding on 2 CPU cores is
what limits it). ``--embed-only`` composes and embeds every seed's tiles and stops.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _results import markdown_table, publish
from plots_fair_tiles import plots_and_tiles
from scipy import stats
from synthetic_plots import (
    calibrate,
    describe_settings,
    leaf_data,
    plot_probs,
    plot_tiles,
    run_rule,
    train_heads,
)

from taxoclass.plots.bootstrap import (
    bootstrap_means,
    membership_matrix,
    percentile_interval,
    shared_source_se,
)
from taxoclass.plots.calibration import calibrate_rules, plot_records
from taxoclass.plots.evaluation import evaluate_plots
from taxoclass.plots.tiling import BundleTileClassifier

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_GRID, DSGT_GRID = "4x4", "3x3"
HEADLINE = f"{PRODUCT_GRID} product choice"
FAIR = f"{DSGT_GRID} argmax_union"            # DS@GT's grid, same calibration budget
CONTROLS = {FAIR: "arg-max union, calibrated, DS@GT grid (fair baseline)",
            f"{PRODUCT_GRID} argmax_union": "arg-max union, calibrated, product grid",
            f"{DSGT_GRID} arg-max union, untuned": "arg-max union, untuned, DS@GT grid "
                                                   "(as DS@GT ran it)",
            f"{PRODUCT_GRID} arg-max union, untuned": "arg-max union, untuned, product grid "
                                                      "(the old table's baseline)"}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--n-test", type=int, default=120, help="test plots of seed 0")
    ap.add_argument("--n-cal", type=int, default=60, help="calibration plots of seed 0")
    ap.add_argument("--own-test-plots", action="store_true",
                    help="seeds 1.. compose their own --n-test-extra test plots (default: "
                         "they are scored on seed 0's test plots)")
    ap.add_argument("--n-test-extra", type=int, default=20, help="test plots of seeds 1..")
    ap.add_argument("--n-cal-extra", type=int, default=20, help="calibration plots, seeds 1..")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--size", type=int, default=896)
    ap.add_argument("--max-taxa", type=int, default=8)
    ap.add_argument("--richness", default="uniform")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "plots_fair"))
    ap.add_argument("--results", default=None)
    ap.add_argument("--embed-only", action="store_true")
    args = ap.parse_args()
    # what synthetic_plots.leaf_data / compose read
    args.clutter, args.group_by, args.view_background = True, None, None
    args.finetune_epochs, args.companions = 0, 0
    return args


_HEADS: dict = {}


def seed_data(args, seed: int, out: Path) -> dict:
    """Heads, calibration and test plots (probabilities, truth, sources) of one seed.

    The leaf split, the calibration pool and both heads are seed 0's in every seed
    (a new pool would need a new calibration head each seed); the seed draws new test and
    calibration plot compositions."""
    if not _HEADS:
        args.seed = 0
        leaves = leaf_data(args, out)
        _HEADS.update(zip(("leaves", "bundle", "cal_bundle", "acc"),
                          (leaves, *train_heads(leaves))))
    leaves, bundle, cal_bundle, acc = (_HEADS[k] for k in ("leaves", "bundle", "cal_bundle",
                                                           "acc"))
    taxonomy = leaves.taxonomy
    backbone = BundleTileClassifier(bundle, None, batch_size=64).backbone
    leaf_idx = leaves.y[taxonomy.ranks[-1]]

    def pool_of(mask):
        return {int(k): leaves.rows["path"][mask & (leaf_idx == k)].tolist()
                for k in np.unique(leaf_idx[mask])}

    n_cal = args.n_cal if seed == 0 else args.n_cal_extra
    # seeds >= 1 draw new calibration plots and are scored on seed 0's test plots (tile
    # embedding on shared CPU cores limits what can be composed; --own-test-plots: new
    # test plots each seed too)
    test_seed, n_test = ((seed, args.n_test_extra) if seed and args.own_test_plots
                         else (0, args.n_test))
    test = plots_and_tiles("test", pool_of(leaves.is_test), n_test, test_seed, args,
                           taxonomy, backbone, out)
    cal = plots_and_tiles("cal", pool_of(leaves.cal_pool), n_cal, seed + 1000, args,
                          taxonomy, backbone, out)
    return {"taxonomy": taxonomy, "acc": acc, "test": test, "cal": cal,
            "bundle": bundle, "cal_bundle": cal_bundle}


def methods_of_seed(d: dict) -> tuple[pd.DataFrame, list[dict]]:
    """Per-plot species (and genus) F1 of every method on the test plots of one seed, and
    a description of each method's calibrated settings."""
    taxonomy = d["taxonomy"]
    test_plots, cal_plots = plot_probs(d["test"], d["bundle"]), plot_probs(d["cal"],
                                                                           d["cal_bundle"])
    truth, cal_truth = d["test"]["truth"], d["cal"]["truth"]
    lowest = taxonomy.ranks[-1]
    genus = taxonomy.ranks[-2]
    cols, info = {}, []

    def add(name: str, ev: dict, **extra) -> None:
        pp = ev["per_plot"].set_index("plot_id")
        cols[(name, "species")] = pp[f"{lowest}_f1"]
        cols[(name, "genus")] = pp[f"{genus}_f1"]
        info.append({"method": name, **extra})

    for grid in (PRODUCT_GRID, DSGT_GRID):
        base = {"thresholds": {"species": 0.0, "genus": 0.5, "family": 0.5}}
        _, ev = run_rule(test_plots, truth, taxonomy, "argmax_union", (grid,), base)
        add(f"{grid} arg-max union, untuned", ev, settings="every tile's arg-max")
        settings = calibrate_rules(plot_tiles(cal_plots, (grid,)), cal_truth, taxonomy,
                                   grids=[grid])
        test = plot_tiles(test_plots, (grid,))
        for row in settings.calibration:
            recs = plot_records(test, taxonomy, rule=row["rule"], thresholds=row["thresholds"],
                                learned=settings.learned, tiles=row.get("tiles"))
            chosen = row["rule"] == settings.rule
            add(f"{grid} {row['rule']}", evaluate_plots(recs, truth, taxonomy),
                settings=compact(row["thresholds"], row.get("tiles") or {}),
                cal_f1=row["macro_f1_per_plot"][lowest], chosen=chosen)
            if chosen:
                add(f"{grid} product choice", evaluate_plots(recs, truth, taxonomy),
                    settings=row["rule"], cal_f1=row["macro_f1_per_plot"][lowest])
        for rule in ("argmax_union", "max"):  # the old table's search (tile flags allowed)
            s = calibrate(cal_plots, cal_truth, taxonomy, rule, (grid,))
            _, ev = run_rule(test_plots, truth, taxonomy, rule, (grid,), s)
            add(f"{grid} search: {rule}", ev, settings=describe_settings(s, False),
                cal_f1=s["cal_species_f1"])
    return pd.DataFrame(cols), info


def compact(thresholds: dict, tiles: dict) -> str:
    """``sp≥0.18, gen≥0.14, fam≥0; top_k 3, tile gate 0.4`` (default tile settings left out)."""
    short = {"species": "sp", "genus": "gen", "family": "fam"}
    th = ", ".join(f"{short.get(r, r)}≥{v:g}" for r, v in reversed(list(thresholds.items())))
    tile = [f"top_k {tiles['top_k']}" if tiles.get("top_k") else "",
            f"tile gate {tiles['min_tile_prob']:g}" if tiles.get("min_tile_prob") else "",
            f"min_tiles {tiles['min_tiles']}" if tiles.get("min_tiles", 1) != 1 else ""]
    return th + "".join(f"; {t}" for t in tile if t)


# ---------------------------------------------------------------------- statistics
def seed_stats(per_plot: pd.DataFrame, sources: dict, n_resamples: int, seed: int) -> dict:
    """Means, shared-source bootstrap intervals and paired differences against every
    control, and the standard error of the headline difference under each scheme."""
    species = per_plot.xs("species", axis=1, level=1)
    names = list(species.columns)
    values = species.to_numpy(dtype=float)
    mem, images = membership_matrix(sources, list(species.index))
    samples = bootstrap_means(values, mem, n_resamples=n_resamples, seed=seed)
    lo, hi = percentile_interval(samples)
    out = {"mean": dict(zip(names, values.mean(axis=0))), "lo": dict(zip(names, lo)),
           "hi": dict(zip(names, hi)),
           "genus": dict(zip(names, per_plot.xs("genus", axis=1, level=1).mean(axis=0))),
           "n_plots": len(values), "n_images": len(images),
           "n_placements": int(sum(len(sources[p]) for p in species.index)), "diff": {}}
    for ctrl in CONTROLS:
        c = names.index(ctrl)
        d = samples - samples[:, [c]]
        dlo, dhi = percentile_interval(d)
        point = values.mean(axis=0) - values[:, c].mean()
        # two-sided bootstrap p of "no difference"
        p = 2 * np.minimum((d <= 0).mean(axis=0), (d >= 0).mean(axis=0))
        out["diff"][ctrl] = {n: (point[i], dlo[i], dhi[i], min(1.0, p[i]))
                             for i, n in enumerate(names)}
    h, f = names.index(HEADLINE), names.index(FAIR)
    diff = values[:, h] - values[:, f]
    out["se"] = {
        scheme: float(bootstrap_means(diff, mem, scheme=scheme, n_resamples=n_resamples,
                                      seed=seed).std())
        for scheme in ("plot", "source", "shared_source")}
    out["se"]["closed form (shared image = correlated)"] = float(
        shared_source_se(diff, mem)[0])
    return out


def over_seeds(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, 95% t-interval over seeds and the one-sample t-test p (mean 0)."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    p = float(stats.ttest_1samp(v, 0.0).pvalue) if v.std() > 0 else float("nan")
    return m, m - half, m + half, p


# ---------------------------------------------------------------------- report
def _ci(m: float, lo: float, hi: float, pts: bool = False) -> str:
    f = 100.0 if pts else 1.0
    fmt = "{:+.1f}" if pts else "{:.3f}"
    return f"{fmt.format(f * m)} [{fmt.format(f * lo)}, {fmt.format(f * hi)}]"


def method_label(name: str, info: dict) -> str:
    grid, rest = name.split(" ", 1)
    where = f"{grid}{' ov 0.2' if grid == PRODUCT_GRID else ' no overlap'}"
    if rest == "product choice":
        return f"**`calibrate-plots` choice: {info[name]['settings']}** ({where})"
    if rest.startswith("search: "):
        return f"bench search {rest[8:]} (tile flags allowed) ({where})"
    return f"{rest}{' (calibrate-plots row)' if 'untuned' not in rest else ''} ({where})"


def seed0_table(st: dict, info: dict) -> pd.DataFrame:
    order = [HEADLINE, f"{DSGT_GRID} product choice", *CONTROLS]
    order += sorted((n for n in st["mean"] if n not in order),
                    key=lambda n: (not n.startswith(PRODUCT_GRID), "search" in n))
    rows = []
    for n in order:
        fair = st["diff"][FAIR][n]
        old = st["diff"][f"{PRODUCT_GRID} arg-max union, untuned"][n]
        rows.append({
            "method (settings chosen on calibration plots)": method_label(n, info),
            "species F1/plot [95% CI]": _ci(st["mean"][n], st["lo"][n], st["hi"][n]),
            "Δ vs fair baseline, pts [95% CI]": ("—" if n == FAIR else
                                                 _ci(*fair[:3], pts=True)),
            "p": None if n == FAIR else fair[3],
            "Δ vs untuned 4x4 (old baseline), pts": _ci(*old[:3], pts=True),
            "genus F1/plot": st["genus"][n],
            "calibration species F1": info[n].get("cal_f1"),
            "chosen settings": info[n].get("settings", "")})
    return pd.DataFrame(rows)


def seeds_table(all_stats: dict, rules: dict) -> pd.DataFrame:
    rows = []
    for seed, st in all_stats.items():
        row = {"seed": seed, "test plots / images": f"{st['n_plots']} / {st['n_images']}",
               "product rule (4x4)": rules[seed],
               "product F1": st["mean"][HEADLINE], "fair baseline F1": st["mean"][FAIR]}
        for ctrl, label in CONTROLS.items():
            row[f"Δ vs {label.split(' (')[0]}"] = _ci(*st["diff"][ctrl][HEADLINE][:3], pts=True)
        rows.append(row)
    summary = {"seed": f"mean over {len(all_stats)} seeds [95% t-interval]",
               "test plots / images": "", "product rule (4x4)": ""}
    for key in ("product F1", "fair baseline F1"):
        col = HEADLINE if key == "product F1" else FAIR
        summary[key] = _ci(*over_seeds([st["mean"][col] for st in all_stats.values()])[:3])
    for ctrl, label in CONTROLS.items():
        m, lo, hi, p = over_seeds([st["diff"][ctrl][HEADLINE][0] for st in all_stats.values()])
        summary[f"Δ vs {label.split(' (')[0]}"] = _ci(m, lo, hi, pts=True) + f", p={p:.3f}"
    rows.append(summary)
    return pd.DataFrame(rows)


def methods_over_seeds(all_stats: dict) -> pd.DataFrame:
    names = list(next(iter(all_stats.values()))["mean"])
    rows = []
    for n in names:
        f = over_seeds([st["mean"][n] for st in all_stats.values()])
        d = over_seeds([st["diff"][FAIR][n][0] for st in all_stats.values()])
        wins = sum(st["diff"][FAIR][n][0] > 0 for st in all_stats.values())
        rows.append({"method": n, "species F1/plot, mean [95% t]": _ci(*f[:3]),
                     "Δ vs fair baseline, pts [95% t]": "—" if n == FAIR else _ci(*d[:3],
                                                                                pts=True),
                     "p (t over seeds)": None if n == FAIR else d[3],
                     "seeds above the fair baseline": ("" if n == FAIR
                                                       else f"{wins} of {len(all_stats)}")})
    return pd.DataFrame(rows)


def combined_interval(per_plots: dict, sources: dict, ctrl: str, n_resamples: int
                      ) -> tuple[float, float, float]:
    """Mean over seeds of the headline's difference to ``ctrl`` with a normal 95% interval
    that adds both uncertainties: the test plots' (shared-source bootstrap of the per-plot
    difference averaged over seeds; every seed scores the same test plots) and the
    calibration draws' (variance of the per-seed means / number of seeds)."""
    diffs = np.stack([pp[(HEADLINE, "species")].to_numpy() - pp[(ctrl, "species")].to_numpy()
                      for pp in per_plots.values()])
    ids = list(next(iter(per_plots.values())).index)
    mem, _ = membership_matrix(sources, ids)
    se_test = float(bootstrap_means(diffs.mean(axis=0), mem, n_resamples=n_resamples).std())
    seed_means = diffs.mean(axis=1)
    se = float(np.sqrt(se_test ** 2 + seed_means.var(ddof=1) / len(seed_means)))
    m = float(seed_means.mean())
    return m, m - 1.96 * se, m + 1.96 * se


def report(args, seeds: dict, out: Path, t0: float) -> None:
    all_stats, infos, rules, per_plots = {}, {}, {}, {}
    for seed, d in seeds.items():
        per_plot, info = methods_of_seed(d)
        per_plots[seed] = per_plot
        per_plot.to_csv(out / f"per_plot_seed{seed}.csv")
        infos[seed] = {i["method"]: i for i in info}
        rules[seed] = infos[seed][HEADLINE]["settings"]
        all_stats[seed] = seed_stats(per_plot, d["test"]["sources"], args.resamples, seed)
    (out / "stats.json").write_text(json.dumps(all_stats, indent=1, default=float))
    same_test = all(d["test"]["truth"] == seeds[0]["test"]["truth"] for d in seeds.values())
    combined = pd.DataFrame([
        {"control": label, "Δ of the product's choice, mean over seeds, pts [95%, test plots "
         "and calibration draws]": _ci(*combined_interval(per_plots, seeds[0]["test"]["sources"],
                                                        ctrl, args.resamples), pts=True)}
        for ctrl, label in CONTROLS.items()]) if same_test and len(seeds) > 1 else None
    total = time.perf_counter() - t0
    st0, d0 = all_stats[0], seeds[0]
    load = os.getloadavg()
    se = pd.DataFrame([{"interval scheme": k, "SE of the headline Δ (pts)": 100 * v}
                       for k, v in st0["se"].items()])
    md = [
        "# Synthetic plots under the evaluation rules: the product's own choice vs a fair "
        "arg-max-union baseline",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.machine()}, {os.cpu_count()} CPU cores (shared VM), no GPU; load average "
        f"at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        f"- command: `OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python "
        f"{' '.join(['bench/plots_fair.py', *sys.argv[1:]])}` ({total:.0f} s with the "
        "tile embeddings cached)",
        f"- heads: `train_head` with configs/leaf.yaml on the 693 training-split leaf "
        f"embeddings (EfficientNet-Lite0, 384 px letterbox, FROZEN backbone) plus "
        f"{args.views} tile-like views per image; single-leaf species accuracy on the 297 "
        f"held-out images {d0['acc']:.3f}",
        f"- kept back: the test plots are composed ONLY from the 297 held-out leaf images "
        f"(seed 0: {st0['n_plots']} plots, {st0['n_placements']} leaf placements from "
        f"{st0['n_images']} distinct images); no setting was chosen on them. Calibration "
        f"plots come from a calibration pool of ~30% of the training images, scored by a "
        f"head trained without that pool; seed 0 has {args.n_cal} calibration plots, seeds "
        f"1–{len(seeds) - 1} {args.n_cal_extra} newly composed calibration plots each, "
        + (f"and {args.n_test_extra} new test plots each" if args.own_test_plots else
           "scored on seed 0's test plots (so the seeds measure what the calibration draw "
           "changes; the test plots' own variation is in the bootstrap intervals)")
        + "; the leaf split, the calibration pool and the heads are the same in every seed",
        f"- intervals: shared-source bootstrap ({args.resamples} resamples, seeded; "
        "`taxoclass.plots.bootstrap`: plots sharing a source image are correlated), paired "
        "within the same resamples; p: two-sided bootstrap p of no difference",
        "",
        f"## Seed 0 ({st0['n_plots']} test plots, the plots of the old table)", "",
        markdown_table(seed0_table(st0, infos[0])), "",
        "## Over seeds (the product's choice at 4x4 against each control)", "",
        markdown_table(seeds_table(all_stats, rules)), "",
        markdown_table(methods_over_seeds(all_stats)), "",
        *(["The t-intervals above vary only the calibration plots (every seed scores the "
           "same test plots). Both uncertainties together:", "", markdown_table(combined),
           ""] if combined is not None else []),
        "## Standard error of the headline difference (seed 0) by interval scheme", "",
        markdown_table(se), ""]
    publish("\n".join(md), out / "results.md", args.results)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seeds = {}
    for seed in range(args.seeds):
        seeds[seed] = seed_data(args, seed, out)
        print(f"seed {seed} ready after {time.perf_counter() - t0:.0f}s", flush=True)
    if args.embed_only:
        return
    report(args, seeds, out, t0)


if __name__ == "__main__":
    main()
