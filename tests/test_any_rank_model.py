"""Issue 15, model side: labels at any rank and any rank list in the loss, decoding,
metrics, open-set thresholds and back-off.

Hand-made taxonomies and label arrays (-1 below the rank a label stops at, as
:func:`~taxoclass.taxonomy.labels.encode_labels` gives them), then the four-rank data set
of :mod:`any_rank_data` (fixture categories, family-only / order-only / genus-only
labels) through a trained head and the open-set calibration.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from taxoclass.model.decoding import decode, is_coherent
from taxoclass.model.heads import MultiRankHead
from taxoclass.model.losses import ClassDependencyLoss, dependency_penalty
from taxoclass.model.metrics import evaluate_predictions
from taxoclass.openset.backoff import back_off, back_off_batch
from taxoclass.openset.evaluation import (
    correct_by_rank,
    labelled_by_rank,
    outcome_summary,
    path_names,
    truth_names,
)
from taxoclass.openset.thresholds import fit_thresholds
from taxoclass.taxonomy.tree import Taxonomy
from taxoclass.vocab import parse_backoff_reason

FOUR = ("order", "family", "genus", "species")
RECORDS = [
    {"order": "Fagales", "family": "Fagaceae", "genus": "Quercus", "species": "robur"},
    {"order": "Fagales", "family": "Fagaceae", "genus": "Quercus", "species": "petraea"},
    {"order": "Fagales", "family": "Fagaceae", "genus": "Fagus", "species": "sylvatica"},
    {"order": "Fagales", "family": "Betulaceae", "genus": "Alnus", "species": "glutinosa"},
    {"order": "Sapindales", "family": "Sapindaceae", "genus": "Acer", "species": "rubrum"},
    {"order": "Sapindales", "family": "Sapindaceae", "genus": "Acer", "species": "campestre"},
]
ROBUR = ("Fagales", "Fagaceae", "Quercus", "Quercus robur")
PETRAEA = ("Fagales", "Fagaceae", "Quercus", "Quercus petraea")
SYLV = ("Fagales", "Fagaceae", "Fagus", "Fagus sylvatica")
ALNUS = ("Fagales", "Betulaceae", "Alnus", "Alnus glutinosa")
RUBRUM = ("Sapindales", "Sapindaceae", "Acer", "Acer rubrum")


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return Taxonomy.from_records(RECORDS, FOUR)


def _stack(tax: Taxonomy, nodes) -> dict[str, np.ndarray]:
    rows = [tax.path_indices(n) for n in nodes]
    return {r: np.array([row[r] for row in rows], dtype=np.int64) for r in tax.ranks}


# ---------------------------------------------------------------------------- loss
def test_masked_loss_equals_the_loss_over_labelled_ranks_only(tax):
    torch.manual_seed(0)
    # species-labelled, family-only, order-only, genus-only
    y = _stack(tax, [ROBUR, ROBUR[:2], ROBUR[:1], RUBRUM[:3]])
    logits = {r: torch.randn(4, tax.n_classes(r)) for r in tax.ranks}
    targets = {r: torch.as_tensor(v) for r, v in y.items()}
    value = ClassDependencyLoss(tax, dependency_weight=0.5)(logits, targets)
    ce = 0.0
    for r in tax.ranks:
        keep = targets[r] >= 0
        ce += F.cross_entropy(logits[r][keep], targets[r][keep])
    dep = 0.0
    probs = {r: logits[r].softmax(1) for r in tax.ranks}
    for parent, child in zip(FOUR[:-1], FOUR[1:]):
        keep = targets[child] >= 0  # rows labelled at the child rank only
        up = torch.as_tensor(tax.parent_index(child, parent))
        dep += dependency_penalty(probs[child], probs[parent], up)[keep].mean() / 3
    assert float(value) == pytest.approx(float(ce + 0.5 * dep), rel=1e-6)
    # Rows labelled at species: 1 (ROBUR); at genus: 2; family: 3; order: 4.
    assert {r: int((targets[r] >= 0).sum()) for r in FOUR} == {
        "order": 4, "family": 3, "genus": 2, "species": 1}


def test_full_labels_give_the_unmasked_loss(tax):
    torch.manual_seed(1)
    y = _stack(tax, [ROBUR, PETRAEA, SYLV, ALNUS, RUBRUM])
    logits = {r: torch.randn(5, tax.n_classes(r)) for r in tax.ranks}
    value = ClassDependencyLoss(tax)(logits, {r: torch.as_tensor(v) for r, v in y.items()})
    expected = sum(F.cross_entropy(logits[r], torch.as_tensor(y[r])) for r in FOUR)
    probs = {r: logits[r].softmax(1) for r in FOUR}
    expected += sum(dependency_penalty(probs[c], probs[p],
                                       torch.as_tensor(tax.parent_index(c, p))).mean()
                    for p, c in zip(FOUR[:-1], FOUR[1:])) / 3
    assert float(value) == pytest.approx(float(expected), rel=1e-6)


def test_family_only_images_train_the_ranks_they_name_only(tax):
    torch.manual_seed(0)
    head = MultiRankHead(8, tax.sizes)
    y = _stack(tax, [ROBUR[:2], ALNUS[:2], RUBRUM[:2]])  # family-only
    ClassDependencyLoss(tax, dependency_weight=1.0)(
        head(torch.randn(3, 8)), {r: torch.as_tensor(v) for r, v in y.items()}).backward()
    grads = {r: int(torch.count_nonzero(head.heads[r].weight.grad)) for r in FOUR}
    assert grads["genus"] == 0 and grads["species"] == 0
    assert grads["family"] > 0 and grads["order"] > 0


# ---------------------------------------------------------------------------- metrics
def test_metrics_score_each_image_at_the_ranks_it_has(tax):
    # truth:  A robur (species)   B Fagaceae (family-only)  C Acer (genus-only)  D Fagales
    # pred:   A robur             B Fagus sylvatica         C Acer campestre     D Alnus
    true = _stack(tax, [ROBUR, ROBUR[:2], RUBRUM[:3], ROBUR[:1]])
    pred = _stack(tax, [ROBUR, SYLV, ("Sapindales", "Sapindaceae", "Acer", "Acer campestre"),
                        ALNUS])
    res = evaluate_predictions(pred, true, tax)
    assert res["n"] == 4
    assert res["n_scored"] == {"order": 4, "family": 3, "genus": 2, "species": 1}
    acc = {r: res["ranks"][r]["accuracy"] for r in FOUR}
    # order: all 4 right; family: A, B, C right; genus: A, C right; species: A right.
    assert acc == {"order": 1.0, "family": 1.0, "genus": 1.0, "species": 1.0}
    assert all(res["ranks"][r]["n_scored"] == res["n_scored"][r] for r in FOUR)
    # Compared only down to the truth's rank: no mistake at all.
    assert res["hierarchical"]["precision"] == res["hierarchical"]["recall"] == 1.0
    assert res["mistake_severity"]["n_mistakes"] == 0
    assert res["genus_distance"] is None  # no distance table


def test_a_family_only_truth_never_counts_at_species(tax):
    true = _stack(tax, [ROBUR, PETRAEA, ROBUR[:2]])
    right = _stack(tax, [ROBUR, SYLV, ROBUR])      # B wrong at genus and species
    wrong = _stack(tax, [ROBUR, SYLV, SYLV])       # C's species differs, same family
    a, b = (evaluate_predictions(p, true, tax) for p in (right, wrong))
    for r in ("genus", "species"):
        assert a["ranks"][r]["n_scored"] == b["ranks"][r]["n_scored"] == 2
        assert a["ranks"][r]["accuracy"] == b["ranks"][r]["accuracy"] == 0.5
    assert a["hierarchical"] == b["hierarchical"]
    # C wrong at family: counted at family and order-level hierarchy, not at species.
    c = evaluate_predictions(_stack(tax, [ROBUR, SYLV, ALNUS]), true, tax)
    assert c["ranks"]["family"]["accuracy"] == pytest.approx(2 / 3)
    assert c["ranks"]["species"]["accuracy"] == 0.5
    # B: petraea vs Fagus sylvatica, LCA Fagaceae (depth 2); C: truth {Fagales, Fagaceae},
    # prediction cut to {Fagales, Betulaceae}, LCA Fagales (depth 1), distance 1 + 1.
    assert c["mistake_severity"]["n_mistakes"] == 2
    assert c["mistake_severity"]["mean_lca_depth"] == pytest.approx((2 + 1) / 2)
    assert c["mistake_severity"]["mean_distance"] == pytest.approx((4 + 2) / 2)


def test_metrics_of_a_rank_list_without_genus():
    three = Taxonomy.from_records(
        [{"order": "Fagales", "family": "Fagaceae", "species": "Quercus robur"},
         {"order": "Fagales", "family": "Betulaceae", "species": "Alnus glutinosa"},
         {"order": "Sapindales", "family": "Sapindaceae", "species": "Acer rubrum"}],
        ("order", "family", "species"))
    rob, aln = ("Fagales", "Fagaceae", "Quercus robur"), ("Fagales", "Betulaceae",
                                                          "Alnus glutinosa")
    true = _stack(three, [rob, aln, rob[:2]])
    pred = _stack(three, [rob, rob, aln])
    res = evaluate_predictions(pred, true, three)
    assert res["n_scored"] == {"order": 3, "family": 3, "species": 2}
    assert res["ranks"]["species"]["accuracy"] == 0.5
    assert res["ranks"]["family"]["accuracy"] == pytest.approx(1 / 3)
    assert res["genus_distance"] is None and "coherence_rate" not in res  # path only


# ---------------------------------------------------------------------------- decoding
def test_five_rank_decode_is_coherent_and_sums_up_the_tree():
    five = ("class", "order", "family", "genus", "species")
    recs = [dict(r, **{"class": "Magnoliopsida"}) for r in RECORDS]
    recs.append({"class": "Pinopsida", "order": "Pinales", "family": "Pinaceae",
                 "genus": "Pinus", "species": "sylvestris"})
    tax5 = Taxonomy.from_records(recs, five)
    assert tax5.sizes == {"class": 2, "order": 3, "family": 4, "genus": 5, "species": 7}
    torch.manual_seed(0)
    logits = {r: torch.randn(6, tax5.n_classes(r)) for r in five}
    dec = decode(logits, tax5, top_k=3)
    assert dec.ranks == five and is_coherent(dec.path, tax5).all()
    leaf = dec.probs["species"]
    for r in five[:-1]:
        summed = np.zeros((6, tax5.n_classes(r)))
        np.add.at(summed.T, tax5.parent_index("species", r), leaf.T)
        np.testing.assert_allclose(dec.probs[r], summed, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dec.probs[r].sum(1), 1.0, rtol=1e-5)
    assert (dec.path["species"] == leaf.argmax(1)).all()
    frame = dec.to_frame(tax5)
    assert {"class", "class_prob", "class_top3", "species"} <= set(frame.columns)
    # Back-off over five ranks: species and genus rejected, family accepted.
    thr = {"class": 0.0, "order": 0.0, "family": 0.0, "genus": math.inf, "species": math.inf}
    ev = {r: dec.path_prob[r] for r in five}
    out = back_off_batch(dec, ev, thr, None, tax5)
    assert (out["taxon_rank"] == "family").all()
    assert {parse_backoff_reason(x) for x in out["reason"]} == {("family", "low_confidence")}
    one = back_off(path={r: int(dec.path[r][0]) for r in five},
                   scores={r: 1.0 for r in five}, thresholds=thr, taxonomy=tax5,
                   outlier_flags={"species": True})
    assert one.taxon_rank == "family" and one.reason == "backoff_to_family:outlier"


# ---------------------------------------------------------------------------- open set
def _validation(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.uniform(size=n)
    return s, rng.uniform(size=n) < 0.3 + 0.7 * s  # higher score, more often right


@pytest.mark.parametrize("ranks", [("order", "family", "genus", "species"),
                                   ("order", "family", "species")])
def test_thresholds_for_any_rank_list_use_the_config_default(ranks):
    from taxoclass.config import OpensetConfig

    s, c = _validation()
    th = fit_thresholds({r: s for r in ranks}, {r: c for r in ranks}, min_support=10)
    default = OpensetConfig().target_precision
    assert th.target == {r: default.get(r, default["default"]) for r in ranks}
    assert th.target["order"] == 0.95 and th.target["species"] == 0.97
    assert set(th.thresholds) == set(ranks)
    for r in ranks:
        if not math.isinf(th.thresholds[r]):
            assert th.precision[r] >= th.target[r]


def test_thresholds_calibrate_a_rank_on_images_labelled_there():
    s, c = _validation(300)
    # 100 family-only images that score high and are never "right" at species: counted
    # as wrong they would pull the species threshold up; they must be ignored instead.
    s_all = np.r_[s, np.full(100, 0.999)]
    c_all = np.r_[c, np.zeros(100, bool)]
    lab = np.r_[np.ones(300, bool), np.zeros(100, bool)]
    kw = dict(target_precision=0.9, min_support=10)
    ref = fit_thresholds({"species": s}, {"species": c}, **kw)
    masked = fit_thresholds({"species": s_all}, {"species": c_all},
                            labelled={"species": lab}, **kw)
    naive = fit_thresholds({"species": s_all}, {"species": c_all}, **kw)
    assert masked.thresholds == ref.thresholds and masked.precision == ref.precision
    assert masked.n_validation == {"species": 300}
    assert naive.thresholds["species"] != ref.thresholds["species"]


def test_truth_correctness_and_outcomes_with_partial_labels():
    rows = pd.DataFrame({"order": ["Fagales", "Fagales", "Sapindales"],
                         "family": ["Fagaceae", "Fagaceae", "Sapindaceae"],
                         "genus": ["Quercus", "", "Acer"],
                         "species": ["robur", "", ""]})
    truth = truth_names(rows, FOUR)
    assert list(truth["species"]) == ["Quercus robur", "", ""]
    lab = labelled_by_rank(truth, FOUR)
    assert {r: int(v.sum()) for r, v in lab.items()} == {
        "order": 3, "family": 3, "genus": 2, "species": 1}
    pred = {"order": np.array(["Fagales"] * 2 + ["Sapindales"], dtype=object),
            "family": np.array(["Fagaceae"] * 2 + ["Sapindaceae"], dtype=object),
            "genus": np.array(["Quercus", "Fagus", "Acer"], dtype=object),
            "species": np.array(["Quercus robur", "Fagus sylvatica", "Acer rubrum"],
                                dtype=object)}
    correct = correct_by_rank(pred, truth, FOUR)
    # Known images all named to species: precision at species counts row 0 only.
    frame = pd.DataFrame({**pred, "taxon_rank": ["species"] * 3})
    out = outcome_summary(frame, truth, np.zeros(3, bool), FOUR)
    assert out["known_precision_species"] == 1.0
    assert out["known_precision_genus"] == 1.0  # rows 0 and 2; row 1 has no genus
    assert out["known_precision_family"] == 1.0
    assert correct["species"].tolist() == [True, False, False]


# ---------------------------------------------------------------- the four-rank data set
def test_four_rank_set_trains_scores_and_calibrates(tmp_path):
    from any_rank_data import fixture_four_rank_set

    from taxoclass.bundle import ModelBundle
    from taxoclass.model.training import train_head
    from taxoclass.pipelines.openset_fit import fit_openset_scorer
    from taxoclass.taxonomy.annotations import load_annotations
    from taxoclass.taxonomy.labels import encode_labels

    torch.set_num_threads(1)
    data = fixture_four_rank_set(tmp_path)
    ann = load_annotations(data.train, images_root=None)
    tax = ann.taxonomy(data.ranks)
    rows = ann.labelled_images()
    y, nodes = encode_labels(tax, rows)
    n = len(rows)
    n_at = {r: int((y[r] >= 0).sum()) for r in tax.ranks}
    assert n_at == {"order": n, "family": n - 3, "genus": n - 6, "species": n - 9}
    # Separable synthetic embeddings: one direction per deepest labelled node.
    rng = np.random.default_rng(0)
    keys = sorted(set(nodes))
    centre = {k: rng.normal(size=32) * 3 for k in keys}
    x = np.stack([centre[nd] + rng.normal(size=32) * 0.3 for nd in nodes]).astype(np.float32)
    va = np.zeros(n, bool)
    va[::3] = True
    res = train_head(x[~va], {r: v[~va] for r, v in y.items()}, None, None, tax,
                     train={"epochs": 60, "batch_size": 0, "lr": 0.02, "patience": None})
    bundle = ModelBundle(head=res.head, taxonomy=tax, backbone={}, normalize=True)
    dec = bundle.predict_embeddings(x[va])
    m = evaluate_predictions(dec.path, {r: v[va] for r, v in y.items()}, tax)
    assert m["n_scored"] == {r: int((y[r][va] >= 0).sum()) for r in tax.ranks}
    assert m["n_scored"]["species"] < m["n_scored"]["order"]
    assert m["ranks"]["species"]["accuracy"] >= 0.7  # chance about 1/6
    # Open-set calibration on the same ranks (order included): no KeyError, and species
    # calibrated on the validation images labelled at species only.
    rows_va = rows[va].reset_index(drop=True)
    scorer = fit_openset_scorer(bundle, x[~va], y[tax.ranks[-2]][~va], x[va], rows_va,
                                {"min_support": 2}, species_train=y[tax.ranks[-1]][~va])
    th = scorer.thresholds
    assert set(th.target) == set(FOUR) and th.target["order"] == 0.95
    lab = labelled_by_rank(truth_names(rows_va, tax.ranks), tax.ranks)
    assert th.n_validation == {r: int(lab[r].sum()) for r in tax.ranks}
    assert th.n_validation["species"] == m["n_scored"]["species"]


def test_train_and_evaluate_write_n_scored_per_rank(tmp_path, cli):
    """`taxoclass train` on the four-rank set (family/order/genus-only labels, order rank),
    then `evaluate` on its separate test file with one family-only image: every rank is
    written with the number of images scored there, the open-set targets name order."""
    import json

    from any_rank_data import fixture_four_rank_set, write_config

    torch.set_num_threads(1)
    data = fixture_four_rank_set(tmp_path / "set")
    cfg = write_config(data, tmp_path / "model", epochs=30)
    out = cli("train", "--config", cfg)
    assert "species" in out and "order" in out
    val = json.loads((tmp_path / "model" / "metrics_val.json").read_text())
    assert list(val["n_scored"]) == ["order", "family", "genus", "species"]
    thr = val["openset_thresholds"]
    assert thr["target"]["order"] == 0.95 and set(thr["n_validation"]) == set(val["n_scored"])
    cli("evaluate", "--model", tmp_path / "model", "--annotations", data.test,
        "--images-root", data.images_root, "--out", tmp_path / "eval")
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    n = m["n_images"]
    assert n == 24
    # One test image is family-only: scored at order and family, not at genus or species.
    assert m["n_scored"] == {"order": n, "family": n, "genus": n - 1, "species": n - 1}
    assert m["ranks"]["species"]["n_scored"] == n - 1
    assert m["ranks"]["family"]["accuracy"] >= 0.8  # chance about 1/4


def test_openset_evaluation_without_a_genus_rank(tmp_path, cli):
    """`evaluate --holdout-species` on order/family/species: the held-out species' parent
    on the path is its family; known images are scored at the ranks they have."""
    import json

    from any_rank_data import three_rank_set, write_config

    torch.set_num_threads(1)
    data = three_rank_set(tmp_path / "set")
    cfg = write_config(data, tmp_path / "model", epochs=30)
    cli("train", "--config", cfg)
    cli("evaluate", "--model", tmp_path / "model", "--annotations", data.train,
        "--images-root", data.images_root, "--holdout-species", "Acer campestre",
        "--out", tmp_path / "os")
    m = json.loads((tmp_path / "os" / "openset_metrics.json").read_text())
    assert m["held_out_parent_rank"] == "family" and m["held_out_right_genus_on_path"] is None
    assert m["n_test_held_out"] == 10 and 0.0 <= m["held_out_right_parent_on_path"] <= 1.0
    assert set(m["known_test_n_scored"]) == {"order", "family", "species"}
    assert m["known_test_n_scored"]["species"] <= m["known_test_n_scored"]["family"]
    assert set(m["thresholds"]["target"]) == {"order", "family", "species"}


def test_leaf_partial_labels_through_metrics_and_calibration(shared_data, tmp_path):
    """Real leaf taxa (order/family/genus/species) with genus-, family- and order-only
    labels, and Ginkgoaceae family-only (a family without a genus: its images stand on
    placeholders). Synthetic embeddings per labelled node keep it fast."""
    from any_rank_data import leaf_four_rank_set

    from taxoclass.taxonomy.annotations import load_annotations
    from taxoclass.taxonomy.labels import encode_labels

    data = leaf_four_rank_set(tmp_path, shared_data / "leaf")
    ann = load_annotations(data.train, images_root=None)
    tax = ann.taxonomy(data.ranks)
    rows = ann.labelled_images()
    y, nodes = encode_labels(tax, rows)
    truth = truth_names(rows, tax.ranks)
    lab = labelled_by_rank(truth, tax.ranks)
    # Labelled at a rank by name <=> a real class there (-1 or a placeholder otherwise).
    for r in tax.ranks:
        holders = np.array([tax.is_placeholder(nd) for nd in tax.nodes(r)])
        real = (y[r] >= 0) & ~holders[np.maximum(y[r], 0)]
        assert (real == lab[r]).all(), r
    ginkgo = np.array([len(nd) > 1 and nd[1] == "Ginkgoaceae" for nd in nodes])
    assert ginkgo.any() and not lab["genus"][ginkgo].any() and (y["species"][ginkgo] >= 0).all()
    # A perfect prediction of every image's path: each rank right where labelled.
    rng = np.random.default_rng(0)
    full = {r: np.where(y[r] >= 0, y[r], 0) for r in tax.ranks}
    for r in tax.ranks[1:]:  # fill unlabelled ranks with a child of the labelled node
        up = tax.parent_index(r, tax.ranks[tax.ranks.index(r) - 1])
        for i in np.flatnonzero(y[r] < 0):
            full[r][i] = int(np.flatnonzero(up == full[tax.ranks[tax.ranks.index(r) - 1]][i])[0])
    m = evaluate_predictions(full, y, tax)
    assert all(m["ranks"][r]["accuracy"] == 1.0 for r in tax.ranks)
    assert m["n_scored"] == {r: int((y[r] >= 0).sum()) for r in tax.ranks}
    assert m["ranks"]["species"]["n_placeholder"] >= int(ginkgo.sum())
    # Calibration: species thresholds rest on images labelled at species only.
    s = rng.uniform(size=len(rows))
    correct = correct_by_rank(path_names(full, tax), truth, tax.ranks)
    assert not correct["species"][~lab["species"]].any()
    th = fit_thresholds({r: s for r in tax.ranks}, correct, labelled=lab, min_support=5)
    assert th.n_validation == {r: int(lab[r].sum()) for r in tax.ranks}
    assert th.precision["species"] == 1.0  # every labelled species is right
    assert th.target["order"] == 0.95
