"""Open-set recipe selection (issue 18 items 1-2): hiding taxa by rank, precision over all
images with simulated unknowns, the choice rule on synthetic rounds, the too-small fallback,
and one real selection on synthetic embeddings (any rank names)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from taxoclass.openset.candidates import (
    Candidate,
    SimulatedRows,
    candidates,
    choose,
    nested_estimate,
    score_candidates,
)
from taxoclass.openset.evaluation import (
    hold_out_taxa,
    known_taxonomy_without,
    split_known_unknown_taxa,
    truth_names,
)
from taxoclass.openset.selection import plan_rounds, select_recipe
from taxoclass.openset.thresholds import fit_thresholds, precision_all_known

pytestmark = pytest.mark.usefixtures("one_thread_module")

RANKS = ["order", "family", "genus"]  # any rank names: the lowest is the "species" rank


def _tree(n_orders=3, fam_per=3, gen_per=3, per_gen=4):
    """Category-like rows: orders > families > genera, ``per_gen`` rows per genus."""
    recs = []
    for o in range(n_orders):
        for f in range(fam_per):
            for g in range(gen_per):
                recs += [{"order": f"O{o}", "family": f"F{o}{f}", "genus": f"G{o}{f}{g}"}
                         ] * per_gen
    return pd.DataFrame(recs)


def _children(rows, parent, child):
    t = truth_names(rows, RANKS)
    out: dict[str, set] = {}
    for p, c in zip(t[parent], t[child]):
        out.setdefault(p, set()).add(c)
    return out


def test_hold_out_taxa_by_rank_keeps_a_known_child_in_every_parent():
    rows = _tree()
    for seed in range(5):
        for rank, parent in (("genus", "family"), ("family", "order")):
            held = hold_out_taxa(rows, RANKS, rank=rank, n=100, seed=seed)
            assert held == hold_out_taxa(rows, RANKS, rank=rank, n=100, seed=seed)  # seeded
            for kids in _children(rows, parent, rank).values():
                assert kids - set(held), f"{parent} lost every {rank}"
            # as many as allowed: all but one child per parent
            assert len(held) == sum(len(k) - 1 for k in _children(rows, parent, rank).values())
        top = hold_out_taxa(rows, RANKS, rank="order", n=10, seed=seed)
        assert len(top) == 2  # the top rank keeps one taxon known
    assert len(hold_out_taxa(rows, RANKS, rank="genus", fraction=0.25, seed=0)) == 7  # of 27
    # shuffled rows: same draw (independent of row order)
    shuffled = rows.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert hold_out_taxa(shuffled, RANKS, rank="family", n=2, seed=4) == \
        hold_out_taxa(rows, RANKS, rank="family", n=2, seed=4)


def test_split_and_known_taxonomy_without_whole_taxa():
    rows = _tree()
    held = {"family": ["F00"], "genus": ["G110"]}
    mask = split_known_unknown_taxa(rows, held, RANKS)
    assert mask.sum() == 3 * 4 + 4  # a family of 3 genera, one genus
    tax = known_taxonomy_without(rows.drop_duplicates(), held, RANKS)
    assert "F00" not in tax.names("family") and "G110" not in tax.names("genus")
    assert "G001" not in tax.names("genus") and tax.n_classes("genus") == 27 - 4
    assert tax.ranks == tuple(RANKS)


def test_precision_over_all_images_hand_example():
    # 10 known rows (8 accepted: 7 right), 5 unknown rows (2 accepted, never right).
    acc = np.array([1] * 8 + [0] * 2 + [1] * 2 + [0] * 3, dtype=bool)
    correct = np.array([1] * 7 + [0] * 3 + [0] * 5, dtype=bool)
    unknown = np.array([0] * 10 + [1] * 5, dtype=bool)
    p_all, p_known, cov = precision_all_known(acc, correct, unknown, 0.2)
    # known weight 0.8/10 each, unknown 0.2/5 each:
    # right mass 7 * 0.08 = 0.56; accepted mass 8 * 0.08 + 2 * 0.04 = 0.72
    assert p_all == pytest.approx(0.56 / 0.72)
    assert p_known == pytest.approx(7 / 8)
    assert cov == pytest.approx(0.8)
    # fit_thresholds: the same rows as scores; the all-images precision is what it targets
    scores = {"genus": np.array([9, 8, 7, 6, 5, 4, 3, 2.5, 0, 0, 8.5, 2.8, -1, -1, -1.0])}
    thr = fit_thresholds(scores, {"genus": correct}, target_precision=0.9, min_support=2,
                         unknown=unknown, unknown_share=0.2)
    # highest coverage with precision over all >= 0.9: accept scores >= 3 (7 known right
    # + the unknown at 8.5): 7*0.08 / (7*0.08 + 0.04) = 0.933; at 2.8 the second unknown
    # drops it to 0.56 / 0.64 = 0.875. Over known images only it would go down to 2.5.
    assert thr.thresholds["genus"] == 3.0
    assert thr.precision_all["genus"] == pytest.approx(0.56 / 0.60)
    assert thr.precision_known["genus"] == 1.0
    assert thr.coverage["genus"] == pytest.approx(0.7)
    assert thr.unknown_share == 0.2 and thr.n_unknown["genus"] == 5
    d = thr.to_dict()
    assert d["precision_all"]["genus"] == pytest.approx(0.933, abs=1e-3)
    assert type(thr).from_dict(d).precision_known == thr.precision_known
    # without unknowns: precision over known images only, as before
    plain = fit_thresholds(scores, {"genus": correct}, target_precision=0.9, min_support=2)
    assert plain.unknown_share is None and plain.precision_all == {}
    # ... where an unknown counts as one more wrong known image: 7 of 8 at 3 is 0.875
    assert plain.thresholds["genus"] == float("inf")



def _synthetic_sim(n_rounds=3, n_known=120, n_unknown=40, seed=0):
    """Pooled rows of simulated rounds: a 'good' detector separates the unknowns, a 'bad'
    one is noise; the confidence is informative about right/wrong on known rows."""
    rng = np.random.default_rng(seed)
    parts = []
    for r in range(n_rounds):
        unk = np.r_[np.zeros(n_known, bool), np.ones(n_unknown, bool)]
        right = ~unk & (rng.random(len(unk)) < 0.9)
        conf = np.where(right, rng.normal(2, 1, len(unk)), rng.normal(0, 1, len(unk)))
        conf[unk] = rng.normal(1.5, 1, unk.sum())  # unknowns look confident
        good = np.where(unk, rng.normal(4, 1, len(unk)), rng.normal(0, 1, len(unk)))
        parts.append((np.full(len(unk), r), unk, right, conf, good,
                      rng.normal(0, 1, len(unk)), rng.integers(0, 2, len(unk))))
    cat = [np.concatenate(v) for v in zip(*parts)]
    rnd, unk, right, conf, good, bad, half = cat
    ranks = ("genus", "species")
    return SimulatedRows(
        ranks=ranks, round=rnd, row=np.arange(len(rnd)), unknown=unk, half=half,
        conf={"path_logit": {r: conf for r in ranks}, "path_prob": {r: conf for r in ranks}},
        z={"good": good, "bad": bad},
        correct={"genus": right | unk, "species": right},
        labelled={r: np.ones(len(rnd), bool) for r in ranks})


def test_selection_picks_the_clearly_better_candidate():
    sim = _synthetic_sim()
    cands = [Candidate(d, "gate", "path_logit", 0.95) for d in ("bad", "good")]
    cfg = {"target_precision": 0.95, "min_support": 5, "unknown_share": 0.2}
    table = score_candidates(sim, cands, cfg)
    by = {t["detector"]: t for t in table}
    assert by["good"]["auroc"] > 0.9 > by["bad"]["auroc"]
    assert by["good"]["n_rounds"] == 3 and len(by["good"]["auroc_rounds"]) == 3
    lo, hi = by["good"]["precision_species_all_ci95"]
    assert 0 <= lo <= by["good"]["precision_species_all"] <= hi <= 1
    assert by["good"]["unknown_named_species"] < by["bad"]["unknown_named_species"]
    assert choose(table, 0.95, 0.01)["detector"] == "good"
    nested = nested_estimate(table, 0.95, 0.01)  # choose on 2 rounds, score the third
    assert nested["chosen_per_round"] == [by["good"]["key"]] * 3
    assert nested["auroc"] == pytest.approx(by["good"]["auroc"])
    assert nested_estimate([{**t, "auroc_rounds": t["auroc_rounds"][:1]} for t in table],
                           0.95) is None  # one round: nothing to nest
    # the rule itself: coverage among those meeting the target, else precision then AUROC
    rows = [{"key": "a", "precision_species_all": 0.99, "coverage_known_species": 0.5,
             "auroc": 0.9},
            {"key": "b", "precision_species_all": 0.955, "coverage_known_species": 0.8,
             "auroc": 0.8},
            {"key": "c", "precision_species_all": 0.90, "coverage_known_species": 0.95,
             "auroc": 0.99}]
    assert choose(rows, 0.96, 0.01)["key"] == "b"
    assert choose(rows, 0.96, 0.0)["key"] == "a"
    assert choose(rows, 0.999, 0.0)["key"] == "a"  # none meets: precision over all first


def test_candidates_grid_and_fixed():
    grid = candidates({})
    assert len(grid) == 3 * 2 * (4 + 1 + 1)  # detectors x confidences x (gate qs + 2)
    assert len({c.key for c in grid}) == len(grid)
    fixed = candidates({"recipe": "fixed", "detector": "knn", "combiner": "logistic"})
    assert [(c.detector, c.combiner) for c in fixed] == [("knn", "logistic")]


def test_too_small_data_fall_back_with_the_reason(caplog):
    rows = _tree(n_orders=1, fam_per=2, gen_per=3, per_gen=5)  # 6 genera ("species")
    reason = plan_rounds(rows, RANKS, {})
    assert isinstance(reason, str) and "6 genus taxa" in reason and "min_species" in reason
    tax = known_taxonomy_without(rows.drop_duplicates(), {}, RANKS)
    y = {r: np.zeros(len(rows), dtype=np.int64) for r in RANKS}
    with caplog.at_level("WARNING"):
        sel = select_recipe(np.zeros((len(rows), 4)), y, rows, tax,
                            {"data": {"ranks": RANKS}})
    assert sel.fallback == reason and sel.combiner is None
    assert sel.record["used"] == "fixed" and sel.record["fallback"] == reason
    assert sel.record["chosen"]["detector"] == "mahalanobis" and sel.record["rounds"] == 0
    assert "fixed recipe" in caplog.text
    assert "openset.rounds is 0" in plan_rounds(_tree(), RANKS, {"rounds": 0})


def test_rounds_keep_groups_on_one_side():
    rows = _tree(fam_per=4, per_gen=6)  # 12 families: each under 10% of the images
    groups = np.arange(len(rows)) // 3  # 3 images per group (e.g. a video track)
    plans = plan_rounds(rows, RANKS, {"rounds": 2, "min_support": 3}, seed=1, groups=groups)
    assert isinstance(plans, list) and len(plans) == 2
    for p in plans:
        assert p.held["genus"] and p.held.get("family")
        scored = p.unknown | p.calibration
        assert not (p.fit & scored).any()
        assert not set(groups[p.fit]) & set(groups[scored])
        assert p.fit.any() and p.unknown.any() and p.calibration.any()
    assert plans[0].held != plans[1].held


def test_select_recipe_on_synthetic_embeddings():
    """A whole selection: 3 orders x 4 families x 3 genera, clustered embeddings."""
    from taxoclass.taxonomy.labels import encode_labels

    rows = _tree(fam_per=4, per_gen=10)
    rng = np.random.default_rng(0)
    centres = {g: rng.normal(0, 1, 16) for g in rows["genus"].unique()}
    x = np.stack([centres[g] * 3 + rng.normal(0, 1, 16) for g in rows["genus"]])
    tax = known_taxonomy_without(rows.drop_duplicates(), {}, RANKS)
    y, _ = encode_labels(tax, rows)
    cfg = {"data": {"ranks": RANKS}, "train": {"epochs": 40, "lr": 0.05},
           "openset": {"rounds": 2, "min_support": 5, "candidate_detectors": ["mahalanobis"],
                       "candidate_confidences": ["path_prob"]}}
    seen = []
    sel = select_recipe(x, y, rows, tax, cfg, seed=0, progress=lambda d, n: seen.append(n))
    rec = sel.record
    assert sel.fallback is None and rec["used"] == "auto" and rec["rounds"] == 2
    assert len(rec["candidates"]) == 4 + 2 and rec["chosen_key"] in {
        c["key"] for c in rec["candidates"]}
    assert rec["expected"]["auroc"] > 0.7  # hidden genera sit far from the known ones
    assert set(rec["held_out"][0]) == {"family", "genus"} and seen[-1] == 2 * 40
    assert sel.thresholds.unknown_share == 0.2 and sel.thresholds.precision_all


def test_a_dominant_taxon_is_never_hidden():
    rows = _tree(fam_per=4, per_gen=6)
    big = pd.DataFrame([{"order": "O0", "family": "F00", "genus": "G000"}] * 400)
    rows = pd.concat([rows, big], ignore_index=True)  # G000 (and F00) hold 2/3 of the rows
    for seed in range(4):
        plans = plan_rounds(rows, RANKS, {"rounds": 2, "min_support": 3}, seed=seed)
        for p in plans:
            assert "F00" not in p.held.get("family", []) and "G000" not in p.held["genus"]
            assert p.unknown.mean() < 0.3


def test_thresholds_move_to_the_final_scale_at_the_rounds_known_coverage():
    from taxoclass.openset.thresholds import RankThresholds, at_known_coverage

    thr = RankThresholds(target={"genus": 0.9, "species": 0.9, "family": 0.9},
                         thresholds={"genus": 0.3, "species": 5.0, "family": float("inf")},
                         precision={"genus": 0.95, "species": 0.95, "family": None},
                         coverage={"genus": 0.5, "species": 0.25, "family": 0.0},
                         support={"genus": 20, "species": 10, "family": 0},
                         min_support=4)
    # the final head's evidence on 8 known validation images: another scale (x10)
    ev = {"genus": np.arange(8) * 10.0, "species": np.arange(8) * 10.0 - 30.0,
          "family": np.arange(8) * 1.0}
    out = at_known_coverage(thr, ev, floor={"species": 0.0})
    assert out.thresholds["genus"] == 40.0  # 4 of 8 (50%) at or above it, as in the rounds
    assert (ev["genus"] >= out.thresholds["genus"]).mean() == 0.5
    assert out.thresholds["species"] == 30.0  # 2 of 8 (25%) pass: 40 - 30 and 30
    assert out.thresholds["family"] == float("inf")  # never trusted stays never trusted
    low = at_known_coverage(thr, {"species": np.full(8, -1.0)}, floor={"species": 0.0})
    assert low.thresholds["species"] == 0.0  # the gate's floor holds
    unlabelled = {"genus": np.array([True] * 2 + [False] * 6)}
    assert at_known_coverage(thr, ev, unlabelled).thresholds["genus"] == 0.3  # < min_support
    assert thr.thresholds["genus"] == 0.3  # the input is not changed
