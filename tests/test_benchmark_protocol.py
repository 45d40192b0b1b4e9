"""The evaluation protocol (issue 17): interval and test arithmetic against scipy and hand
values, identical splits for every method, the kept-back seed never used for a choice,
the axes' label changes, and the written folder."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from taxoclass.errors import ConfigError
from taxoclass.model.decoding import decode_leaf_probabilities
from taxoclass.model.stats import mcnemar, paired_t, t_interval, wilson_interval
from taxoclass.pipelines.benchmark import (
    BenchmarkData,
    benchmark,
    select_on_selection_seeds,
    split_for,
)
from taxoclass.pipelines.benchmark_report import load_benchmark, summary_markdown
from taxoclass.taxonomy.tree import Taxonomy


# ------------------------------------------------------------------------------ stats
def test_t_interval_matches_scipy_and_hand_values():
    v = [0.90, 0.92, 0.94, 0.96]
    mean, lo, hi = t_interval(v)
    # mean 0.93, sd 0.0258199, t(3, .975) = 3.182446 -> half 0.0410833
    assert mean == pytest.approx(0.93)
    assert hi - mean == pytest.approx(3.182446 * 0.0258199 / 2, rel=1e-5)
    ref = stats.t.interval(0.95, 3, loc=np.mean(v), scale=stats.sem(v))
    assert (lo, hi) == pytest.approx(ref)
    assert math.isnan(t_interval([0.5])[1]) and math.isnan(t_interval([])[0])


def test_paired_t_matches_scipy_ttest_rel():
    a = np.array([0.91, 0.93, 0.90, 0.95, 0.92])
    b = np.array([0.90, 0.90, 0.91, 0.92, 0.90])
    d, lo, hi, p = paired_t(a, b)
    assert d == pytest.approx(np.mean(a - b))
    assert p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert (lo, hi) == pytest.approx(t_interval(a - b)[1:])
    assert paired_t([1, 1, 1], [1, 1, 1])[3] == 1.0  # identical: no evidence


def test_mcnemar_exact_and_wilson_by_hand():
    # 8 discordant pairs, 7 for a: p = 2 * P(X <= 1), X ~ Bin(8, .5) = 2 * 9/256
    a = np.array([1] * 7 + [0] + [1] * 10, bool)
    b = np.array([0] * 7 + [1] + [1] * 10, bool)
    n_b, n_c, p = mcnemar(a, b)
    assert (n_b, n_c) == (7, 1) and p == pytest.approx(18 / 256)
    assert mcnemar(a, a)[2] == 1.0
    # Wilson 95% of 8/10: (0.4902, 0.9433)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)


# ------------------------------------------------------------------------------ data
def _data(seed: int = 0, per_species: int = 12) -> BenchmarkData:
    """3 families x 2 genera x 3 species, Gaussian embeddings around nested means."""
    rng = np.random.default_rng(seed)
    recs, x, labels = [], [], []
    for f in range(3):
        fm = rng.normal(0, 3, 16)
        for g in range(2):
            gm = fm + rng.normal(0, 1.5, 16)
            for s in range(3):
                sm = gm + rng.normal(0, 1.0, 16)
                rec = {"family": f"F{f}", "genus": f"G{f}{g}", "species": f"s{s}"}
                recs.append(rec)
                x.append(sm + rng.normal(0, 0.8, (per_species, 16)))
                labels += [rec] * per_species
    tax = Taxonomy.from_records(recs)
    y = {r: np.zeros(len(labels), np.int64) for r in tax.ranks}
    for i, rec in enumerate(labels):
        for r, k in tax.path_indices(tax.node_for(rec)).items():
            y[r][i] = k
    return BenchmarkData(x=np.concatenate(x).astype(np.float32), y=y, taxonomy=tax,
                         name="synthetic")


class _Means:
    """Nearest species mean (softmax over negative squared distances); ``noise`` blurs it."""

    def __init__(self, x, y, tax, noise: float, seed: int):
        low = tax.ranks[-1]
        self.tax, self.noise, self.rng = tax, noise, np.random.default_rng(seed)
        self.means = np.stack([x[y[low] == k].mean(0) if (y[low] == k).any()
                               else np.full(x.shape[1], 1e3) for k in range(tax.n_classes(low))])

    def predict(self, x):
        d = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        d = d + self.noise * self.rng.normal(0, d.std(), d.shape)
        z = -(d - d.min(1, keepdims=True)) / 4
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        return decode_leaf_probabilities(p, self.tax)


SEEN: list[tuple] = []


def _recipe(noise: float):
    def fit(name, x, y, tax, *, seed=0, settings=None):
        SEEN.append((name, seed, x.shape, float(x.sum()), int((y[tax.ranks[-1]] >= 0).sum())))
        return _Means(x, y, tax, noise, seed)
    return fit


RECIPES = {"species-only": _recipe(0.0), "noisy": _recipe(0.6)}


# ------------------------------------------------------------------------------ protocol
def test_every_method_sees_identical_splits_and_the_control_wins_where_it_should():
    SEEN.clear()
    data = _data()
    res = benchmark(data, RECIPES, seeds=3, final_seeds=(0,), axes=("full", "partial-50"))
    df = res.results
    assert len(df) == 2 * 4 * 2  # recipes x seeds (3 + kept-back) x axes
    assert set(df["split"]) == {"selection", "final"}
    assert set(df.loc[df["split"] == "final", "seed"]) == {0}
    # the same training rows, features and labels for both recipes at each seed and axis
    by_key: dict[tuple, set] = {}
    for name, seed, shape, total, n_low in SEEN:
        by_key.setdefault((seed, shape, total, n_low), set()).add(name)
    assert all(v == set(RECIPES) for v in by_key.values())
    # one split per seed (the axes share it: same training features), labels per axis
    assert len({(s, t) for _, s, _, t, _ in SEEN}) == 4
    assert len({(s, t, n) for _, s, _, t, n in SEEN}) == 8
    full = df[df["axis"] == "full"].pivot(index="seed", columns="recipe", values="acc_species")
    assert (full["species-only"] >= full["noisy"]).all() and full["species-only"].min() > 0.8
    # partial-50: half of the species labels hidden, the rank above kept
    s = split_for(data, 1, "partial-50")
    assert (s["y_train"]["species"] >= 0).mean() == pytest.approx(0.5, abs=0.02)
    assert (s["y_train"]["genus"] >= 0).all()


def test_kept_back_seed_is_never_used_for_a_choice():
    res = benchmark(_data(), RECIPES, seeds=[1, 2], final_seeds=(0,))
    df = res.results.copy()
    choice = select_on_selection_seeds(df, list(RECIPES), "acc_species")
    assert choice == "species-only"
    # Make the kept-back seed say the opposite: the choice does not move.
    final = df["split"] == "final"
    df.loc[final & (df["recipe"] == "noisy"), "acc_species"] = 1.0
    df.loc[final & (df["recipe"] == "species-only"), "acc_species"] = 0.0
    assert select_on_selection_seeds(df, list(RECIPES), "acc_species") == choice
    with pytest.raises(ConfigError, match="kept-back"):
        benchmark(_data(), RECIPES, seeds=[0, 1], final_seeds=(0,))
    assert res.seeds == (1, 2) and 0 not in res.seeds


def test_axes_change_training_labels_as_stated():
    data = _data()
    fo = split_for(data, 1, "family-only")
    lost = fo["y_train"]["genus"] < 0
    assert lost.any() and (fo["y_train"]["species"][lost] < 0).all()
    assert (fo["y_train"]["family"] >= 0).all() and len(fo["focus"])
    lt = split_for(data, 1, "long-tail")
    counts = np.bincount(lt["y_train"]["species"], minlength=18)
    assert (counts == 2).sum() == 9 and (counts > 2).sum() == 9  # half the species keep 2
    un = split_for(data, 1, "unseen")
    known, full = un["taxonomy"], data.taxonomy
    assert known.n_classes("species") == full.n_classes("species") - len(un["held_out"])
    assert known.n_classes("genus") == full.n_classes("genus")  # every genus keeps a species
    assert (un["y_focus"]["species"] == -1).all() and (un["y_focus"]["genus"] >= 0).all()


def test_unseen_and_long_tail_axes_report_their_own_columns():
    res = benchmark(_data(), RECIPES, seeds=2, final_seeds=(), axes=("unseen", "long-tail"))
    df = res.results
    un = df[df["axis"] == "unseen"]
    assert un["unseen_parent"].between(0, 1).all() and un["unseen_parent"].mean() > 0.5
    assert df[df["axis"] == "long-tail"]["focus_acc"].notna().all()


def test_benchmark_writes_the_folder(tmp_path):
    out = tmp_path / "bench"
    res = benchmark(_data(), RECIPES, seeds=3, final_seeds=(0,), out=out)
    assert sorted(p.name for p in out.iterdir()) == [
        "per_image.npz", "protocol.json", "reliability.csv", "reliability.png", "results.csv",
        "summary.md"]
    table = pd.read_csv(out / "results.csv")
    assert len(table) == len(res.results) and {"seed", "split", "axis", "recipe",
                                               "acc_species", "ece_species",
                                               "mistake_distance"} <= set(table.columns)
    text = (out / "summary.md").read_text()
    assert "Kept-back seed(s) 0" in text and "paired t" in text and "McNemar" in text
    assert "| noisy |" in text and "control" in text
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    # read back: the same tables (McNemar counts need the per-image file)
    back = load_benchmark(out)
    assert summary_markdown(back, back.info["ranks"]) == text
    assert back.right.keys() == res.right.keys()


def test_bad_input_is_refused_clearly():
    with pytest.raises(ConfigError, match="unknown axis"):
        benchmark(_data(), RECIPES, seeds=2, axes=("sideways",))
    with pytest.raises(ConfigError, match="control"):
        benchmark(_data(), {"noisy": RECIPES["noisy"]}, seeds=2)
    with pytest.raises(ConfigError, match="at least 2"):
        benchmark(_data(), RECIPES, seeds=1)


# ------------------------------------------------------------------------------ CLI
def test_cli_benchmark_writes_the_folder_from_a_config(fixture_set, fixture_model, tmp_path,
                                                       cli, one_thread):
    out = tmp_path / "bench"
    text = cli("benchmark", "--config", fixture_set["config"], "--set",
               f"embeddings.cache={fixture_model['emb']}", "--set", f"out={tmp_path / 'm'}",
               "--set", "train.epochs=20", "--seeds", 2, "--final-seeds", "none",
               "--recipes", "knn", "--out", out)
    assert "Benchmark: annotations.json" in text and f"benchmark written to {out}" in text
    table = pd.read_csv(out / "results.csv")
    # the control is always added; 2 selection seeds x 2 recipes, full axis
    assert sorted(set(table["recipe"])) == ["knn", "species-only"] and len(table) == 4
    assert set(table["split"]) == {"selection"} and table["acc_species"].min() > 1 / 6
    assert (out / "reliability.png").is_file()


def test_cli_benchmark_refuses_bad_input_clearly(fixture_set, tmp_path):
    from click.testing import CliRunner

    from taxoclass.cli import main

    def run(*args):
        return CliRunner().invoke(main, ["benchmark", "--config", str(fixture_set["config"]),
                                         "--out", str(tmp_path / "b"), *map(str, args)])

    res = run("--axes", "full,sideways")
    assert res.exit_code == 2 and "unknown axis ['sideways']" in res.output
    res = run("--seeds", 1)
    assert res.exit_code == 2 and "--seeds" in res.output
    res = run("--recipes", "knn,nope", "--set", "embeddings.cache=" + str(tmp_path / "none"))
    assert res.exit_code == 2 and "unknown recipe(s) ['nope']" in res.output
    assert not (tmp_path / "none").exists()  # refused before any embedding work
    assert not (tmp_path / "b").exists()
