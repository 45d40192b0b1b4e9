"""The benchmark's written form: ``summary.md`` (tables with intervals and paired tests
against the control), ``results.csv``, ``reliability.png`` / ``reliability.csv``.

See :mod:`taxoclass.pipelines.benchmark` for the protocol the numbers come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io.files import atomic_write_csv, atomic_write_json, output_folder

__all__ = ["BenchmarkResult", "axis_metrics", "compare", "load_benchmark", "summary_markdown",
           "write_benchmark"]


@dataclass
class BenchmarkResult:
    """``results``: one row per seed x recipe x axis; ``right``: per-image right/wrong of
    the McNemar metrics, keyed ``(seed, axis, recipe, column)``; ``reliability``:
    (path probability, right) of the lowest rank pooled over the selection seeds, per
    recipe, on the first axis."""

    results: pd.DataFrame
    control: str
    seeds: tuple[int, ...]
    final_seeds: tuple[int, ...]
    axes: tuple[str, ...]
    recipes: tuple[str, ...]
    bins: tuple[int, int]
    right: dict[tuple, np.ndarray] = field(default_factory=dict)
    reliability: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def axis_metrics(axis: str, ranks: tuple[str, ...], columns) -> list[tuple[str, str, bool]]:
    """(column, label, higher is better) of the metrics shown for ``axis``."""
    low, mid, top = ranks[-1], ranks[-2] if len(ranks) > 1 else ranks[-1], ranks[0]
    grand = ranks[max(0, len(ranks) - 3)]
    common = [(f"acc_{low}", f"{low} acc", True)]
    if axis == "full":
        out = common + [(f"acc_{mid}", f"{mid} acc", True), (f"acc_{top}", f"{top} acc", True),
                        (f"f1_{low}", f"{low} macro-F1", True), ("hf1", "hier. F1", True),
                        ("mistake_distance", "mistake tree dist.", False),
                        (f"ece_{low}", f"{low} ECE", False),
                        ("acc_tail", "tail acc", True), ("acc_medium", "medium acc", True),
                        ("acc_head", "head acc", True), ("coherence", "heads coherent", True)]
    elif axis.startswith("partial-"):
        out = common + [(f"acc_{mid}", f"{mid} acc", True),
                        ("mistake_distance", "mistake tree dist.", False),
                        (f"ece_{low}", f"{low} ECE", False)]
    elif axis == "family-only":
        out = [("focus_acc", f"{grand} acc, {grand}-only taxa", True)] + common + [
            (f"ece_{low}", f"{low} ECE", False)]
    elif axis == "long-tail":
        out = [("focus_acc", f"{low} acc, tail taxa (2 images)", True)] + common + [
            ("acc_tail", "tail acc (bins)", True), (f"ece_{low}", f"{low} ECE", False)]
    else:  # unseen
        out = [("unseen_parent", f"unseen {mid} placement", True),
               ("unseen_grandparent", f"unseen {grand} placement", True)] + common + [
            (f"ece_{low}", f"{low} ECE (known)", False)]
    return [m for m in out if m[0] in columns and columns[m[0]].notna().any()]


def _fmt(mean: float, low: float, high: float, sign: bool = False) -> str:
    if mean is None or math.isnan(mean):
        return ""
    f = "{:+.3f}" if sign else "{:.3f}"
    if math.isnan(low):
        return f.format(mean)
    return f"{f.format(mean)} [{low:.3f}, {high:.3f}]"


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return ""
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.0e}"


def compare(result, axis: str, recipe: str, column: str) -> dict[str, Any]:
    """Over the selection seeds of ``axis``: ``recipe``'s mean and t interval of ``column``,
    the paired difference to the control (mean, interval, paired t p) and, for per-image
    metrics, the McNemar counts (splits where ``recipe`` is significantly better / worse
    at p < 0.05)."""
    from ..model.stats import mcnemar, paired_t, t_interval

    df = result.results
    sel = df[(df["split"] == "selection") & (df["axis"] == axis)]
    a = sel[sel["recipe"] == recipe].set_index("seed")[column].astype(float)
    b = sel[sel["recipe"] == result.control].set_index("seed")[column].astype(float)
    seeds = [s for s in result.seeds if s in a.index and s in b.index]
    out = {"mean": t_interval(a.to_numpy())}
    out["diff"] = paired_t(a[seeds].to_numpy(), b[seeds].to_numpy())
    better = worse = 0
    per_image = False
    for s in seeds:
        ra = result.right.get((s, axis, recipe, column))
        rb = result.right.get((s, axis, result.control, column))
        if ra is None or rb is None:
            continue
        per_image = True
        n_b, n_c, p = mcnemar(ra, rb)
        better += int(p < 0.05 and n_b > n_c)
        worse += int(p < 0.05 and n_c > n_b)
    out["mcnemar"] = (better, worse, len(seeds)) if per_image else None
    return out


def _axis_tables(result, axis: str, ranks) -> list[str]:
    df = result.results
    metrics = axis_metrics(axis, ranks, df[df["axis"] == axis])
    if not metrics:
        return []
    head = "| recipe | " + " | ".join(m[1] for m in metrics) + " |"
    lines = [f"### Axis `{axis}`", "", "Mean over the selection seeds with 95% t interval:", "",
             head, "|---" * (len(metrics) + 1) + "|"]
    diffs = [f"Paired against the control `{result.control}` (difference, 95% paired t "
             "interval, paired t p; McNemar: splits significantly better/worse at p < 0.05 "
             "of all splits):", "", head, "|---" * (len(metrics) + 1) + "|"]
    for recipe in result.recipes:
        cells, dcells = [], []
        for col, _, _ in metrics:
            c = compare(result, axis, recipe, col)
            cells.append(_fmt(*c["mean"]))
            if recipe == result.control:
                dcells.append("control")
                continue
            d, lo, hi, p = c["diff"]
            text = _fmt(d, lo, hi, sign=True)
            text += f", p={_p(p)}" if text and not math.isnan(p) else ""
            if c["mcnemar"]:
                text += " ({}/{} of {})".format(*c["mcnemar"])
            dcells.append(text)
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
        diffs.append(f"| {recipe} | " + " | ".join(dcells) + " |")
    return lines + [""] + diffs + [""]


def _final_tables(result, ranks) -> list[str]:
    from ..model.stats import mcnemar, wilson_interval

    if not result.final_seeds:
        return []
    df = result.results
    lines = ["## Kept-back seed(s) " + ", ".join(map(str, result.final_seeds)), "",
             "Never used to choose anything. Per-image metrics: value with 95% Wilson interval "
             "and exact McNemar p against the control on that split; others: the value.", ""]
    for axis in result.axes:
        metrics = axis_metrics(axis, ranks, df[df["axis"] == axis])[:3]
        if not metrics:
            continue
        lines += [f"### Axis `{axis}`", "",
                  "| seed | recipe | " + " | ".join(m[1] for m in metrics) + " |",
                  "|---|---" + "|---" * len(metrics) + "|"]
        for seed in result.final_seeds:
            for recipe in result.recipes:
                cells = []
                for col, _, _ in metrics:
                    row = df[(df["seed"] == seed) & (df["axis"] == axis)
                             & (df["recipe"] == recipe)]
                    value = float(row[col].iloc[0]) if len(row) else math.nan
                    ra = result.right.get((seed, axis, recipe, col))
                    rb = result.right.get((seed, axis, result.control, col))
                    if ra is None or not len(ra):
                        cells.append("" if math.isnan(value) else f"{value:.3f}")
                        continue
                    lo, hi = wilson_interval(int(ra.sum()), len(ra))
                    text = f"{ra.mean():.3f} [{lo:.3f}, {hi:.3f}]"
                    if recipe != result.control and rb is not None:
                        text += f", McNemar p={_p(mcnemar(ra, rb)[2])}"
                    cells.append(text)
                lines.append(f"| {seed} | {recipe} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def summary_markdown(result, ranks: tuple[str, ...]) -> str:
    """The protocol's tables as markdown (module doc of :mod:`..benchmark`)."""
    info = result.info
    sel = result.seeds
    lines = [
        f"# Benchmark: {info.get('data', 'data')}", "",
        f"{info.get('n_images')} images, taxa per rank {info.get('sizes')}; test share "
        f"{info.get('test_fraction')} per split"
        + (", whole groups (data.group_by) on one side" if info.get("grouped") else "")
        + ". Every recipe on the same splits, training labels and features.", "",
        f"Selection seeds {sel[0]}..{sel[-1]} ({len(sel)} splits; defaults may be chosen on "
        f"them); kept back: {', '.join(map(str, result.final_seeds)) or 'none'}. Intervals: "
        "Student-t over splits (95%). Tests against the control "
        f"`{result.control}`: paired t over splits; exact McNemar per split (not pooled: the "
        "splits share images).", "",
        f"Frequency bins of the lowest rank by training images in the split: tail <= "
        f"{result.bins[0]}, medium <= {result.bins[1]}, head above. ECE: 10 equal-width bins "
        "of the lowest rank's path probability. Mistake tree distance: over real mistakes "
        "(a correct back-off is not one). Placeholder classes are not scored as taxa of "
        "their rank.", ""]
    if result.info.get("settings"):
        lines += ["Settings for every recipe alike (a recipe's own loss.kind / decode.method "
                  f"win): `{_flat(result.info['settings'])}`.", ""]
    lines += ["## Selection seeds", ""]
    for axis in result.axes:
        lines += _axis_tables(result, axis, ranks)
    lines += _final_tables(result, ranks)
    times = result.results.groupby("recipe")["fit_s"].mean()
    lines += ["Mean fit + predict seconds per split: " + ", ".join(
        f"{k} {v:.1f}" for k, v in times.items()), ""]
    return "\n".join(lines)


def _flat(settings, prefix: str = "") -> str:
    """``{"train": {"epochs": 100}}`` -> ``train.epochs=100`` (comma-separated)."""
    items = []
    for k, v in settings.items():
        key = f"{prefix}{k}"
        items.append(_flat(v, key + ".") if isinstance(v, dict) else f"{key}={v}")
    return ", ".join(items)


def reliability_frame(result, n_bins: int = 10) -> pd.DataFrame:
    """Reliability bins of the lowest rank per recipe (selection seeds, first axis)."""
    from ..model.confidence import reliability_bins

    tables = []
    for recipe, (p, ok) in result.reliability.items():
        t = reliability_bins(p, ok, n_bins)
        t.insert(0, "recipe", recipe)
        tables.append(t)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def _plot_reliability(frame: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
    for recipe, t in frame.groupby("recipe", sort=False):
        t = t[t["count"] > 0]
        ax.plot(t["mean_confidence"], t["accuracy"], marker="o", ms=3, lw=1.2, label=recipe)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean path probability (bin)",
           ylabel="accuracy (bin)", title=title)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_benchmark(result, out: str | Path) -> Path:
    """``results.csv``, ``summary.md``, ``reliability.csv``, ``reliability.png``,
    ``per_image.npz`` (right/wrong per image of the McNemar metrics) and
    ``protocol.json`` in ``out``, written as one folder (:func:`load_benchmark` reads it
    back)."""
    out = Path(out)
    ranks = tuple(result.info["ranks"])
    with output_folder(out) as stage:
        atomic_write_csv(stage / "results.csv", result.results)
        (stage / "summary.md").write_text(summary_markdown(result, ranks), encoding="utf-8")
        _write_per_image(stage / "per_image.npz", result)
        atomic_write_json(stage / "protocol.json", _protocol(result))
        rel = reliability_frame(result)
        if not rel.empty:
            atomic_write_csv(stage / "reliability.csv", rel)
            _plot_reliability(rel, stage / "reliability.png",
                              f"{ranks[-1]}: reliability, axis {result.axes[0]}, "
                              f"{len(result.seeds)} splits")
    return out


_KEYS = ("seeds", "final_seeds", "axes", "recipes", "bins", "control")


def _protocol(result) -> dict[str, Any]:
    return {**{k: list(getattr(result, k)) if k != "control" else result.control
               for k in _KEYS}, "info": {k: (list(v) if isinstance(v, tuple) else v)
                                          for k, v in result.info.items()}}


def _write_per_image(path: Path, result) -> None:
    import io

    arrays = {"|".join(map(str, k)): np.asarray(v, dtype=bool) for k, v in result.right.items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path.write_bytes(buf.getvalue())


def load_benchmark(folder: str | Path):
    """A :class:`~taxoclass.pipelines.benchmark.BenchmarkResult` from a folder that
    :func:`write_benchmark` wrote (to summarise or combine runs again)."""
    import json

    folder = Path(folder)
    meta = json.loads((folder / "protocol.json").read_text())
    right = {}
    with np.load(folder / "per_image.npz") as z:
        for key in z.files:
            seed, axis, recipe, col = key.split("|")
            right[(int(seed), axis, recipe, col)] = z[key]
    return BenchmarkResult(
        results=pd.read_csv(folder / "results.csv"), control=meta["control"],
        seeds=tuple(meta["seeds"]), final_seeds=tuple(meta["final_seeds"]),
        axes=tuple(meta["axes"]), recipes=tuple(meta["recipes"]), bins=tuple(meta["bins"]),
        right=right, info=meta["info"])
