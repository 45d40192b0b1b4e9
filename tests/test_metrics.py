"""Metrics on a hand-made prediction set (arithmetic in comments) and on real leaf labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA as DATA
from sklearn.metrics import f1_score

from taxoclass.model.decoding import decode
from taxoclass.model.metrics import (
    confusion_summary,
    evaluate_predictions,
    flatten_metrics,
    macro_f1,
)
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
    assert res["mistake_severity"]["n_backoff"] == 0
    # The decoded path is coherent by construction: no coherence column without head_argmax.
    assert "coherence_rate" not in res


def test_per_rank_accuracy_macro_f1_and_masking(case):
    tax, true, pred = case
    res = evaluate_predictions(pred, true, tax)
    # species labelled for samples 1-5, but 4 and 5 are the placeholder "Philadelphus sp."
    # (known to genus only): not scored as species. Real species targets 1-3, right: 1.
    # genus labelled for 1-6: correct 1, 2, 4, 6 -> 4/6
    # family labelled for all 7: wrong only 5 and 7 -> 5/7
    sp = res["ranks"]["species"]
    assert (sp["n_scored"], sp["n_placeholder"], sp["n_real"]) == (5, 2, 3)
    assert sp["accuracy"] == pytest.approx(1 / 3)
    assert sp["abstention_rate"] == 0.0 and sp["accuracy_answered"] == pytest.approx(1 / 3)
    assert res["ranks"]["genus"]["accuracy"] == pytest.approx(4 / 6)
    assert res["ranks"]["family"]["accuracy"] == pytest.approx(5 / 7)
    holders = {r: np.array([tax.is_placeholder(n) for n in tax.nodes(r)]) for r in tax.ranks}
    for r in tax.ranks:
        m = (true[r] >= 0) & ~holders[r][np.maximum(true[r], 0)]
        # scikit-learn's default macro-F1: over the union of true and predicted labels
        expected = f1_score(true[r][m], pred[r][m], average="macro", zero_division=0)
        assert res["ranks"][r]["macro_f1"] == pytest.approx(expected)
    # species: robur F1 2*(1*1/3)/(1+1/3) = 0.5, ilex and sylvatica 0 -> 1/6
    assert sp["macro_f1"] == pytest.approx(1 / 6)
    assert "top5_accuracy" not in res["ranks"]["species"]
    flat = flatten_metrics(res)
    assert flat["species/accuracy"] == pytest.approx(1 / 3)
    assert flat["hierarchical/f1"] == pytest.approx(10 / 16)


def test_macro_f1_counts_false_positives_into_classes_absent_from_the_truth():
    # truth {A, B}, predicted {A, C}: A F1 1, B 0, C 0. Averaging over the true classes
    # only (the old convention) gave 0.5; scikit-learn's union gives 1/3.
    t, p = np.array([0, 1]), np.array([0, 2])
    assert macro_f1(t, p) == pytest.approx(1 / 3)
    assert macro_f1(t, p) == pytest.approx(f1_score(t, p, average="macro"))
    # an abstention (-1) is a false negative of B and a positive of no class: 0.5
    assert macro_f1(t, np.array([0, -1])) == pytest.approx(
        f1_score(t, [0, -1], labels=[0, 1], average="macro", zero_division=0))
    assert macro_f1(t, np.array([0, -1])) == pytest.approx(0.5)


def test_predicted_placeholder_is_an_abstention_at_its_rank(case):
    tax, _, _ = case
    true = _stack(tax, [ACER, ACER])
    pred = _stack(tax, [ACER, PHIL])
    res = evaluate_predictions(pred, true, tax)
    sp = res["ranks"]["species"]
    assert sp["accuracy"] == 0.5 and sp["abstention_rate"] == 0.5
    assert sp["accuracy_answered"] == 1.0
    # at genus Philadelphus is real (and wrong): a mistake, distance Acer rubrum ->
    # Philadelphus = 3 + 2 = 5 edges
    assert res["ranks"]["genus"]["accuracy"] == 0.5
    assert res["mistake_severity"]["n_mistakes"] == 1
    assert res["mistake_severity"]["mean_distance"] == pytest.approx(5.0)


def test_topk_probs_and_coherence_rate(case):
    tax, true, pred = case
    sp = true["species"]
    topk = {r: np.stack([pred[r], pred[r]], axis=1) for r in tax.ranks}
    # Second guess for species: the true class for samples 2 and 3 -> top-2 hits all of the
    # real species targets 1-3 (4 and 5 are placeholders, not scored as species).
    topk["species"][:, 1] = np.where(sp >= 0, sp, 0)
    topk["species"][4, 1] = tax.index(ROBUR)  # sample 5: still wrong
    res = evaluate_predictions(pred, true, tax, topk_index=topk)
    assert res["ranks"]["species"]["top2_accuracy"] == pytest.approx(3 / 3)
    # Probabilities: uniform over 5 species gives nll = log 5 and a top-5 that always hits.
    probs = {r: np.full((7, tax.n_classes(r)), 1 / tax.n_classes(r)) for r in tax.ranks}
    res = evaluate_predictions(pred, true, tax, probs=probs)
    assert res["ranks"]["species"]["nll"] == pytest.approx(np.log(5))
    assert res["ranks"]["species"]["top5_accuracy"] == 1.0
    # Coherence only from the heads' own arg-max: ilex under Acer lowers it to 6/7.
    assert "coherence_rate" not in res
    heads = {r: v.copy() for r, v in pred.items()}
    heads["genus"][1] = tax.index(ACER[:2])
    res = evaluate_predictions(pred, true, tax, head_argmax=heads)
    assert res["coherence_rate"] == pytest.approx(6 / 7)
    assert "coherence_rate" not in evaluate_predictions(pred, true, tax, head_argmax={})
    one_head = {"species": pred["species"]}  # a species-only model: nothing to agree with
    assert "coherence_rate" not in evaluate_predictions(pred, true, tax, head_argmax=one_head)


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
    sp = res["ranks"]["species"]
    assert sp["accuracy"] == 0.0 and sp["abstention_rate"] == 1.0
    assert sp["accuracy_answered"] is None
    # A correct back-off is an abstention, not a mistake (issue 17; it used to count as a
    # mistake at distance 1).
    sev = res["mistake_severity"]
    assert sev["n_mistakes"] == 0 and sev["n_backoff"] == 1
    assert sev["mean_distance"] is None and sev["rate"] == 0.0
    # A wrong back-off (Fagus for a Quercus robur image) is a mistake: 1 + 2 = 3 edges.
    wrong = evaluate_predictions(_stack(tax, [("Fagaceae", "Fagus")]), one, tax)
    assert wrong["mistake_severity"]["n_mistakes"] == 1
    assert wrong["mistake_severity"]["mean_distance"] == pytest.approx(3.0)


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
    assert "coherence_rate" not in res
    assert res["ranks"]["species"]["accuracy"] < 0.1
    assert 0.0 <= res["hierarchical"]["f1"] < 0.5
    assert 1.0 <= res["mistake_severity"]["mean_distance"] <= 6.0
