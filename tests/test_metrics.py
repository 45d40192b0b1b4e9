"""Metrics on a hand-made prediction set (arithmetic in comments) and on real leaf labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA as DATA
from sklearn.metrics import f1_score

from taxoclass.model.decoding import decode
from taxoclass.model.metrics import confusion_summary, evaluate_predictions, flatten_metrics
from taxoclass.taxonomy.tree import Taxonomy

LEAF = DATA / "leaf" / "annotations.json"

RECORDS = [
    {"family": "Fagaceae", "genus": "Quercus", "species": "robur"},
    {"family": "Fagaceae", "genus": "Quercus", "species": "ilex"},
    {"family": "Fagaceae", "genus": "Fagus", "species": "sylvatica"},
    {"family": "Sapindaceae", "genus": "Acer", "species": "rubrum"},
    {"family": "Hydrangeaceae", "genus": "Philadelphus", "species": ""},  # placeholder child
]
ROBUR = ("Fagaceae", "Quercus", "Quercus robur")
ILEX = ("Fagaceae", "Quercus", "Quercus ilex")
FAGUS = ("Fagaceae", "Fagus", "Fagus sylvatica")
ACER = ("Sapindaceae", "Acer", "Acer rubrum")
PHIL = ("Hydrangeaceae", "Philadelphus", "Philadelphus sp.")


def _stack(tax: Taxonomy, nodes) -> dict[str, np.ndarray]:
    rows = [tax.path_indices(n) for n in nodes]
    return {r: np.array([row[r] for row in rows]) for r in tax.ranks}


@pytest.fixture
def case():
    tax = Taxonomy.from_records(RECORDS)
    tax.genus_distances = {("Quercus", "Fagus"): 0.2, ("Acer", "Philadelphus"): 0.9}
    true = _stack(tax, [ROBUR, ROBUR, ROBUR, PHIL, PHIL,
                        ("Fagaceae", "Quercus"),  # partial label: known to genus
                        ("Sapindaceae",)])  # partial label: known to family
    pred = _stack(tax, [ROBUR, ILEX, FAGUS, PHIL, ACER, ILEX, FAGUS])
    return tax, true, pred


def test_hand_computed_hierarchical_f1_and_mistake_severity(case):
    tax, true, pred = case
    res = evaluate_predictions(pred, true, tax)
    # Ancestor-augmented sets (root excluded), predicted node cut at the labelled rank,
    # placeholders read as their genus (Philadelphus sp. -> Philadelphus):
    #   sample  true set                 predicted set           |T| |P| |T&P|
    #   1       Fag,Querc,robur          Fag,Querc,robur          3   3   3
    #   2       Fag,Querc,robur          Fag,Querc,ilex           3   3   2
    #   3       Fag,Querc,robur          Fag,Fagus,sylvatica      3   3   1
    #   4       Hydr,Philadelphus        Hydr,Philadelphus        2   2   2
    #   5       Hydr,Philadelphus        Sapi,Acer (rubrum cut)   2   2   0
    #   6       Fag,Querc                Fag,Querc (ilex cut)     2   2   2
    #   7       Sapi                     Fag (sylvatica cut)      1   1   0
    #   sums                                                     16  16  10
    # hP = 10/16, hR = 10/16, hF = 10/16. (Issue 15: sample 5's prediction is cut at the
    # truth's rank, genus, like samples 6 and 7; it used to count rubrum: hP = 10/17.)
    h = res["hierarchical"]
    assert h["precision"] == pytest.approx(10 / 16)
    assert h["recall"] == pytest.approx(10 / 16)
    assert h["f1"] == pytest.approx(10 / 16)
    assert h["n"] == 7
    # Mistakes (samples 2, 3, 5, 7):
    #   2 robur vs ilex: LCA Quercus (depth 2), distance 1 + 1 = 2, height 3 - 2 = 1
    #   3 robur vs Fagus sylvatica: LCA Fagaceae (depth 1), distance 2 + 2 = 4, height 2
    #   5 Philadelphus vs Acer (cut): LCA root (depth 0), distance 2 + 2 = 4, height 3
    #   7 Sapindaceae vs Fagaceae: LCA root (depth 0), distance 1 + 1 = 2, height 3
    # mean distance 12/4, mean LCA depth 3/4, mean LCA height 9/4, rate 4/7.
    s = res["mistake_severity"]
    assert s["n_mistakes"] == 4
    assert s["mean_distance"] == pytest.approx(12 / 4)
    assert s["mean_lca_depth"] == pytest.approx(3 / 4)
    assert s["mean_lca_height"] == pytest.approx(9 / 4)
    assert s["rate"] == pytest.approx(4 / 7)
    # Wrong genus with a genus target: sample 3 (Quercus -> Fagus, 0.2) and sample 5
    # (Philadelphus -> Acer, 0.9, stored the other way round): mean 0.55.
    assert res["genus_distance"] == pytest.approx(0.55)
    assert res["genus_distance_n"] == 2
    assert res["coherence_rate"] == 1.0


def test_per_rank_accuracy_macro_f1_and_masking(case):
    tax, true, pred = case
    res = evaluate_predictions(pred, true, tax)
    # species labelled for samples 1-5: correct 1 and 4 -> 2/5
    # genus labelled for 1-6: correct 1, 2, 4, 6 -> 4/6
    # family labelled for all 7: wrong only 5 and 7 -> 5/7
    assert res["ranks"]["species"]["n"] == 5
    assert res["ranks"]["species"]["accuracy"] == pytest.approx(2 / 5)
    assert res["ranks"]["genus"]["accuracy"] == pytest.approx(4 / 6)
    assert res["ranks"]["family"]["accuracy"] == pytest.approx(5 / 7)
    for r in tax.ranks:
        m = true[r] >= 0
        expected = f1_score(true[r][m], pred[r][m], labels=np.unique(true[r][m]),
                            average="macro", zero_division=0)
        assert res["ranks"][r]["macro_f1"] == pytest.approx(expected)
    assert "top5_accuracy" not in res["ranks"]["species"]
    flat = flatten_metrics(res)
    assert flat["species/accuracy"] == pytest.approx(0.4)
    assert flat["hierarchical/f1"] == pytest.approx(10 / 16)


def test_topk_probs_and_coherence_rate(case):
    tax, true, pred = case
    sp = true["species"]
    topk = {r: np.stack([pred[r], pred[r]], axis=1) for r in tax.ranks}
    # Second guess for species: the true class for samples 2 and 3 -> top-2 hits 1, 2, 3, 4.
    topk["species"][:, 1] = np.where(sp >= 0, sp, 0)
    topk["species"][4, 1] = tax.index(ROBUR)  # sample 5: still wrong
    res = evaluate_predictions(pred, true, tax, topk_index=topk)
    assert res["ranks"]["species"]["top2_accuracy"] == pytest.approx(4 / 5)
    # Probabilities: uniform over 5 species gives nll = log 5 and a top-5 that always hits.
    probs = {r: np.full((7, tax.n_classes(r)), 1 / tax.n_classes(r)) for r in tax.ranks}
    res = evaluate_predictions(pred, true, tax, probs=probs)
    assert res["ranks"]["species"]["nll"] == pytest.approx(np.log(5))
    assert res["ranks"]["species"]["top5_accuracy"] == 1.0
    # An incoherent path (ilex under Acer) lowers the coherence rate to 6/7.
    broken = {r: v.copy() for r, v in pred.items()}
    broken["genus"][1] = tax.index(ACER[:2])
    assert evaluate_predictions(broken, true, tax)["coherence_rate"] == pytest.approx(6 / 7)


def test_genus_distance_is_none_without_a_distance_table(case):
    _, true, pred = case
    plain = Taxonomy.from_records(RECORDS)
    assert evaluate_predictions(pred, true, plain)["genus_distance"] is None


def test_back_off_prediction_counts_at_the_rank_it_reports(case):
    tax, true, _ = case
    # Predict only "Quercus" (species -1) for a Quercus robur image: hP = 2/2, hR = 2/3.
    pred = _stack(tax, [("Fagaceae", "Quercus")])
    one = {r: v[:1] for r, v in true.items()}
    res = evaluate_predictions(pred, one, tax)
    assert res["hierarchical"]["precision"] == pytest.approx(1.0)
    assert res["hierarchical"]["recall"] == pytest.approx(2 / 3)
    assert res["ranks"]["species"]["accuracy"] == 0.0
    assert res["mistake_severity"]["mean_distance"] == pytest.approx(1.0)
    assert res["coherence_rate"] == 1.0


def test_confusion_summary_orders_pairs(case):
    tax, _, _ = case
    true = _stack(tax, [ROBUR, ROBUR, ROBUR, PHIL, ACER, ACER])
    pred = _stack(tax, [ILEX, ILEX, ROBUR, ACER, ACER, FAGUS])
    df = confusion_summary(pred, true, tax, rank="species", top=2)
    assert list(df.columns) == ["true", "predicted", "count"]
    assert len(df) == 2
    assert df.iloc[0].tolist() == ["Quercus robur", "Quercus ilex", 2]
    assert df.iloc[1]["count"] == 1
    assert set(confusion_summary(pred, true, tax, rank="genus")["true"]) == {
        "Philadelphus sp.", "Acer sp."}
    none = confusion_summary(true, true, tax)
    assert none.empty and list(none.columns) == ["true", "predicted", "count"]


def test_real_leaf_labels_perfect_and_random_predictions():
    if not LEAF.is_file():
        pytest.skip(f"leaf annotations not found at {LEAF} (../shared/data absent)")
    from taxoclass.taxonomy.annotations import load_annotations

    ann = load_annotations(LEAF)
    tax = ann.taxonomy()
    rows = [tax.path_indices(tax.node_for(r)) for r in ann.labelled_images().to_dict("records")]
    targets = {r: np.array([row[r] for row in rows]) for r in tax.ranks}
    perfect = evaluate_predictions(targets, targets, tax)
    assert all(perfect["ranks"][r]["accuracy"] == 1.0 for r in tax.ranks)
    assert perfect["hierarchical"]["f1"] == 1.0
    assert perfect["mistake_severity"]["n_mistakes"] == 0
    assert perfect["genus_distance"] is None  # the leaf file has no distance table
    g = torch.Generator().manual_seed(0)
    logits = {r: torch.randn(len(rows), tax.n_classes(r), generator=g) for r in tax.ranks}
    d = decode(logits, tax)
    res = evaluate_predictions(d.path, targets, tax, topk_index=d.topk_index, probs=d.probs)
    assert res["coherence_rate"] == 1.0
    assert res["ranks"]["species"]["accuracy"] < 0.1
    assert 0.0 <= res["hierarchical"]["f1"] < 0.5
    assert 1.0 <= res["mistake_severity"]["mean_distance"] <= 6.0
