"""Plot-level F1 against hand-computed values."""

from __future__ import annotations

import pytest

from taxoclass.plots.evaluation import evaluate_plots, f1_score_sets
from taxoclass.plots.rules import PlotRecord
from taxoclass.taxonomy.tree import Taxonomy

TAX = Taxonomy.from_records([
    {"family": "Cyperaceae", "genus": "Carex", "species": "nigra"},
    {"family": "Cyperaceae", "genus": "Carex", "species": "flacca"},
    {"family": "Juncaceae", "genus": "Juncus", "species": "effusus"},
    {"family": "Poaceae", "genus": "Poa", "species": "annua"},
])


def rec(plot: str, node: tuple[str, ...]) -> PlotRecord:
    return PlotRecord(plot, TAX.rank_of(node), TAX.label(node), 0.9, 1, "max", node)


PRED = {
    "p1": [rec("p1", ("Cyperaceae", "Carex", "Carex nigra")), rec("p1", ("Poaceae", "Poa"))],
    "p2": [rec("p2", ("Cyperaceae", "Carex", "Carex flacca")),
           PlotRecord("p2", "unknown", "unknown", 0.5, 2, "outlier")],
}
TRUTH = {"p1": ["Carex nigra", "Poa annua"], "p2": ["Juncus effusus"]}


def test_f1_of_sets():
    assert f1_score_sets(set(), set()) == 1.0
    assert f1_score_sets({1}, set()) == 0.0
    assert f1_score_sets({1, 2}, {2, 3, 4}) == pytest.approx(2 / 5)


def test_species_rank_scores_match_hand_computation():
    s = evaluate_plots(PRED, TRUTH, TAX)["species"]
    # p1: {C. nigra} vs {C. nigra, P. annua} -> 2/3; p2: {C. flacca} vs {J. effusus} -> 0.
    assert s["macro_f1_per_plot"] == pytest.approx(1 / 3)
    # per species: C. nigra 1, P. annua 0, J. effusus 0, C. flacca 0.
    assert s["macro_f1_per_taxon"] == pytest.approx(0.25)
    # tp=1, fp=1, fn=2.
    assert s["micro_f1"] == pytest.approx(0.4)
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(1 / 3)


def test_genus_rank_credits_genus_level_records():
    res = evaluate_plots(PRED, TRUTH, TAX)
    g = res["genus"]
    # p1: {Carex, Poa} vs {Carex, Poa} -> 1 ("Poa sp." counts); p2: {Carex} vs {Juncus} -> 0.
    assert g["macro_f1_per_plot"] == pytest.approx(0.5)
    # Carex: tp 1, fp 1 -> 2/3; Poa 1; Juncus 0.
    assert g["macro_f1_per_taxon"] == pytest.approx(5 / 9)
    assert g["micro_f1"] == pytest.approx(2 / 3)
    assert res["family"]["macro_f1_per_plot"] == pytest.approx(0.5)
    per_plot = res["per_plot"].set_index("plot_id")
    assert per_plot.loc["p1", "species_f1"] == pytest.approx(2 / 3)
    assert per_plot.loc["p1", "genus_f1"] == pytest.approx(1.0)


def test_missing_plots_and_unseen_species_count_as_misses():
    truth = {**TRUTH, "p3": ["Quercus robur"]}
    s = evaluate_plots(PRED, truth, TAX)["species"]
    assert s["n_plots"] == 3
    assert s["macro_f1_per_plot"] == pytest.approx((2 / 3 + 0 + 0) / 3)
