"""Intervals for plot benchmarks whose plots share source images (taxoclass.plots.bootstrap)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from taxoclass.plots.bootstrap import (
    bootstrap_means,
    membership_matrix,
    percentile_interval,
    shared_source_kernel,
    shared_source_se,
)

# plots a and b share leaf x.jpg; c has its own images; a pastes y.jpg twice
SOURCES = {"a": ["x.jpg", "y.jpg", "y.jpg"], "b": ["x.jpg", "z.jpg"], "c": ["w.jpg"]}


def test_membership_matrix_marks_each_plots_images_once():
    m, names = membership_matrix(SOURCES, ["a", "b", "c"])
    assert names == ["w.jpg", "x.jpg", "y.jpg", "z.jpg"]
    assert m.tolist() == [[False, True, True, False],
                          [False, True, False, True],
                          [True, False, False, False]]


def test_shared_source_kernel_by_hand():
    m, _ = membership_matrix(SOURCES, ["a", "b", "c"])
    assert shared_source_kernel(m).tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_shared_source_se_by_hand():
    m, _ = membership_matrix(SOURCES, ["a", "b", "c"])
    # u = (1, 2, 6) - 3 = (-2, -1, 3); u'Ku = 4 + 1 + 9 + 2 * (-2) * (-1) = 18
    assert shared_source_se(np.array([1.0, 2.0, 6.0]), m) == pytest.approx([math.sqrt(18) / 3])
    # no image shared: the independent-plots formula sqrt(sum u^2) / P
    alone = np.eye(3, dtype=bool)
    assert shared_source_se(np.array([1.0, 2.0, 6.0]), alone) == pytest.approx([math.sqrt(14) / 3])


def test_shared_source_bootstrap_matches_closed_form_when_kernel_is_psd():
    # 4 disjoint clusters of 5 plots (K block-diagonal ones: PSD), one column per method
    rng = np.random.default_rng(3)
    mem = np.kron(np.eye(4, dtype=bool), np.ones((5, 1), dtype=bool))
    values = rng.normal(size=(20, 2))
    samples = bootstrap_means(values, mem, n_resamples=40000, seed=1)
    assert samples.shape == (40000, 2)
    # the one-way cluster variance: sum over clusters of (cluster sum of u)^2 / P^2
    u = values - values.mean(axis=0)
    by_hand = np.sqrt((u.reshape(4, 5, 2).sum(axis=1) ** 2).sum(axis=0)) / 20
    assert shared_source_se(values, mem) == pytest.approx(by_hand)
    assert samples.std(axis=0) == pytest.approx(by_hand, rel=0.03)
    assert samples.mean(axis=0) == pytest.approx(values.mean(axis=0), abs=0.01)


def test_plot_scheme_is_the_iid_bootstrap():
    values = np.arange(10.0)
    samples = bootstrap_means(values, scheme="plot", n_resamples=40000, seed=0)
    # multinomial resampling: variance of the mean = population variance / P
    assert samples.std() == pytest.approx(values.std() / math.sqrt(10), rel=0.03)


def test_source_scheme_with_one_image_per_plot_is_the_cluster_bootstrap():
    # 6 images, each in its own 3 plots: the classic one-way cluster bootstrap
    rng = np.random.default_rng(5)
    mem = np.kron(np.eye(6, dtype=bool), np.ones((3, 1), dtype=bool))
    values = rng.normal(size=18)
    samples = bootstrap_means(values, mem, scheme="source", n_resamples=40000, seed=2)
    totals = (values - values.mean()).reshape(6, 3).sum(axis=1)
    # C multinomial draws of C clusters (Var 1 - 1/C, Cov -1/C) on centred cluster sums:
    # Var(sum_c n_c S_c) = sum_c (S_c - mean S)^2, and every resample holds 18 plots
    expected = math.sqrt((totals ** 2).sum()) / 18
    assert samples.std() == pytest.approx(expected, rel=0.05)


def test_differences_are_paired_within_the_same_resamples():
    rng = np.random.default_rng(0)
    mem = rng.random((30, 12)) < 0.3
    values = rng.random((30, 2))
    diff = (values[:, 1] - values[:, 0])[:, None]
    for scheme in ("shared_source", "plot", "source"):
        both = bootstrap_means(values, mem, scheme=scheme, n_resamples=300, seed=7)
        alone = bootstrap_means(diff, mem, scheme=scheme, n_resamples=300, seed=7)
        np.testing.assert_allclose(both[:, 1] - both[:, 0], alone[:, 0], atol=1e-12)
        again = bootstrap_means(values, mem, scheme=scheme, n_resamples=300, seed=7)
        np.testing.assert_array_equal(both, again)  # seeded


def test_with_many_images_per_plot_only_shared_source_covers_the_true_spread():
    """Additive image effects, 7 images per plot out of 270 (like the leaf benchmark):
    the true spread of the mean over fresh data vs what each scheme reports."""
    rng = np.random.default_rng(11)
    n_plots, n_src, k = 120, 270, 7
    mem = np.zeros((n_plots, n_src), dtype=bool)
    for p in range(n_plots):
        mem[p, rng.choice(n_src, k, replace=False)] = True
    sigma_a, sigma_e = 1.0, 0.3
    # exact sd of the mean: sum_i c_i^2 sigma_a^2 + sigma_e^2 / P, c_i = (plots with i)/(P k)
    c = mem.sum(axis=0) / (n_plots * k)
    true_sd = math.sqrt((c ** 2).sum() * sigma_a ** 2 + sigma_e ** 2 / n_plots)
    sd = {s: [] for s in ("plot", "source", "shared_source")}
    for rep in range(25):
        f = mem @ rng.normal(0, sigma_a, n_src) / k + rng.normal(0, sigma_e, n_plots)
        for s in sd:
            sd[s].append(bootstrap_means(f, mem, scheme=s, n_resamples=400, seed=rep).std())
    mean_sd = {s: float(np.mean(v)) for s, v in sd.items()}
    assert mean_sd["shared_source"] > 0.9 * true_sd
    assert mean_sd["plot"] < 0.75 * true_sd      # independence understates
    assert mean_sd["source"] < 0.4 * true_sd     # the literal image bootstrap, far worse


def test_percentile_interval_and_errors():
    lo, hi = percentile_interval(np.arange(101.0)[:, None], 0.95)
    assert lo == pytest.approx([2.5]) and hi == pytest.approx([97.5])
    with pytest.raises(ValueError, match="scheme"):
        bootstrap_means(np.ones(3), np.eye(3), scheme="images")
    with pytest.raises(ValueError, match="membership"):
        bootstrap_means(np.ones(3), None, scheme="source")
    with pytest.raises(ValueError, match="level"):
        percentile_interval(np.ones((5, 1)), 1.5)
