"""Open-set evaluation: held-out species on synthetic rows and on the real leaf embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from taxoclass.openset.evaluation import (
    choose_holdout,
    correct_by_rank,
    detection_table,
    fpr_at_tpr,
    known_taxonomy,
    outcome_summary,
    path_names,
    risk_coverage,
    split_known_unknown,
    truth_names,
)
from taxoclass.openset.scorer import OpenSetScorer, fit_scorer

torch.set_num_threads(1)

def _rows():
    recs = []
    for fam, gen, sps in [("Fagaceae", "Quercus", ["robur", "ilex", "rubra"]),
                          ("Sapindaceae", "Acer", ["rubrum", "saccharum"]),
                          ("Betulaceae", "Alnus", ["glutinosa"])]:
        for s in sps:
            recs += [{"family": fam, "genus": gen, "species": s}] * 3
    return pd.DataFrame(recs)


def test_choose_holdout_keeps_a_known_species_in_every_genus():
    rows = _rows()
    for seed in range(10):
        held = choose_holdout(rows, n_species=10, seed=seed)
        assert len(held) == 3  # Quercus gives 2, Acer 1, Alnus none
        assert "Alnus glutinosa" not in held
        assert choose_holdout(rows, n_species=10, seed=seed) == held  # seeded
    frac = choose_holdout(rows, holdout_fraction=0.4, seed=1)
    assert len(frac) == 2
    mask = split_known_unknown(rows, ["Quercus ilex"])
    assert mask.sum() == 3
    tax = known_taxonomy(rows.drop_duplicates(), ["Quercus ilex"])
    assert "Quercus ilex" not in tax.names("species") and tax.sizes["species"] == 5
    with pytest.raises(ValueError, match="not in the rows"):
        choose_holdout(rows, species=["Quercus alba"])


def test_detection_metrics():
    y = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    perfect = np.r_[np.zeros(100), np.ones(100)]
    table = detection_table(y, {"perfect": perfect, "flipped": -perfect})
    assert table.set_index("method").loc["perfect", "auroc"] == 1.0
    assert table.set_index("method").loc["flipped", "auroc"] == 0.0
    assert fpr_at_tpr(y, perfect) == 0.0
    rng = np.random.default_rng(0)
    assert 0.8 < fpr_at_tpr(y, rng.uniform(size=200)) <= 1.0


def test_risk_coverage_precision_rises_as_coverage_falls():
    rng = np.random.default_rng(0)
    s = rng.uniform(size=500)
    c = rng.uniform(size=500) < s
    rc = risk_coverage({"species": s}, {"species": c}, coverages=(1.0, 0.5, 0.2))
    assert list(rc.coverage) == [1.0, 0.5, 0.2]
    assert rc.precision.is_monotonic_increasing


@pytest.fixture(scope="module")
def leaf(shared_data, leaf_embedding_cache):
    from taxoclass.features.embeddings import load_embeddings
    from taxoclass.taxonomy.annotations import load_annotations

    ann = load_annotations(shared_data / "leaf" / "annotations.json")
    rows = ann.labelled_images().reset_index(drop=True)
    cache = load_embeddings(leaf_embedding_cache)
    pos = {k: i for i, k in enumerate(cache.image_ids.tolist())}
    return ann, rows, cache.embeddings[[pos[str(i)] for i in rows["image_id"]]]


def test_heldout_species_on_real_leaf_embeddings(leaf):
    from taxoclass.model.decoding import decode
    from taxoclass.model.training import normalize, stratified_split, train_head
    from taxoclass.taxonomy.labels import encode_labels

    ann, rows, x = leaf
    held = choose_holdout(rows, n_species=12, seed=0)
    calib = choose_holdout(rows[~split_known_unknown(rows, held)], n_species=8, seed=1)
    unk, cal = split_known_unknown(rows, held), split_known_unknown(rows, calib)
    tax = known_taxonomy(ann.categories, [*held, *calib])
    assert not set(held) & set(tax.names("species"))
    kn = ~unk & ~cal
    kr, xk = rows[kn].reset_index(drop=True), x[kn]
    y, nodes = encode_labels(tax, kr)
    strata = np.array(["/".join(n) for n in nodes])
    test = stratified_split(strata, 0.3, 0)
    tr_idx = np.flatnonzero(~test)
    val = np.zeros(len(kr), bool)
    val[tr_idx[stratified_split(strata[tr_idx], 0.25, 1)]] = True
    tr = ~test & ~val
    head = train_head(xk[tr], {r: a[tr] for r, a in y.items()}, None, None, tax,
                      train={"epochs": 80, "lr": 0.003, "batch_size": 128, "seed": 0}).head

    def dec(a):
        with torch.inference_mode():
            return decode(head(normalize(a)), tax)

    x_val = np.concatenate([xk[val], x[cal]])
    d_val = dec(x_val)
    c_val = correct_by_rank(path_names(d_val.path, tax),
                            truth_names(pd.concat([kr[val], rows[cal]])), tax.ranks)
    scorer = fit_scorer(xk[tr], y["genus"][tr], x_val, d_val, c_val, method="knn",
                        scope="group", combiner="rank_mean", confidence="path_prob",
                        target_precision={"family": 0.9, "genus": 0.9, "species": 0.97})
    x_test = np.concatenate([xk[test], x[unk]])
    is_unk = np.r_[np.zeros(test.sum(), bool), np.ones(unk.sum(), bool)]
    d_test = dec(x_test)
    frame = scorer.predict(x_test, d_test, tax)
    truth = truth_names(pd.concat([kr[test], rows[unk]]))
    s = outcome_summary(frame, truth, is_unk, tax.ranks)
    # Floors measured on this split (see bench/results/openset.md for the full run).
    assert s["unknown_correct_higher"] >= FLOOR_CORRECT_HIGHER, str(s)
    assert s["unknown_named_species"] <= CEIL_NAMED_SPECIES, str(s)
    assert s["known_precision_genus"] >= 0.9, str(s)
    if s["known_coverage_species"] > 0:
        assert s["known_precision_species"] >= 0.9, str(s)
    ev, _ = scorer.evidence(x_test, d_test)
    auroc = detection_table(is_unk, {"evidence": -ev["species"]}).auroc[0]
    assert auroc >= 0.65
    # class-conditional Mahalanobis on species labels: at least as good an unknown score
    maha = fit_scorer(xk[tr], y["genus"][tr], x_val, d_val, c_val, method="mahalanobis",
                      labels_train=y["species"][tr], scope="group", combiner="rank_mean",
                      confidence="path_prob",
                      target_precision={"family": 0.9, "genus": 0.9, "species": 0.97})
    assert maha.detector.method == "mahalanobis"
    ev_m, _ = maha.evidence(x_test, d_test)
    z_m, _ = maha.outlier(x_test, d_test)
    assert detection_table(is_unk, {"z": z_m}).auroc[0] >= auroc - 0.02
    assert maha.predict(x_test, d_test, tax)["reason"].notna().all()
    # the whole scorer survives a JSON + arrays round trip with identical answers
    params, arrays = scorer.to_state()
    import json
    back = OpenSetScorer.from_state(json.loads(json.dumps(params)), arrays)
    pd.testing.assert_frame_equal(back.predict(x_test, d_test, tax), frame)


def test_fit_scorer_mahalanobis_on_species_labels_and_config_default():
    from taxoclass.model.decoding import decode
    from taxoclass.taxonomy.tree import Taxonomy

    rows = _rows().drop_duplicates()
    tax = Taxonomy.from_records(rows.to_dict("records"), ("family", "genus", "species"))
    rng = np.random.default_rng(0)
    n_sp = tax.n_classes("species")
    leaf = rng.integers(0, n_sp, 120)
    centres = rng.standard_normal((n_sp, 8))
    x = centres[leaf] + 0.1 * rng.standard_normal((120, 8))
    genus_of = np.array([list(tax.nodes("genus")).index(n[:2]) for n in tax.nodes("species")])
    logits = {r: torch.zeros(60, tax.n_classes(r)) for r in tax.ranks}
    logits["species"] = torch.as_tensor(np.eye(n_sp)[leaf[60:]] * 3, dtype=torch.float32)
    d_val = decode(logits, tax)
    correct = {r: d_val.path["species"] == leaf[60:] for r in tax.ranks}
    s1 = fit_scorer(x[:60], genus_of[leaf[:60]], x[60:], d_val, correct,
                    method="mahalanobis", labels_train=leaf[:60], min_support=1)
    s2 = fit_scorer(x[:60], genus_of[leaf[:60]], x[60:], d_val, correct, min_support=1)
    s3 = fit_scorer(x[:60], genus_of[leaf[:60]], x[60:], d_val, correct, min_support=1,
                    method="knn", scope="group")
    # defaults: the config's openset section, as a CLI user gets them
    assert (s1.detector.method, s2.detector.method) == ("mahalanobis", "mahalanobis")
    assert (s2.detector.scope, s2.combiner.method, s2.combiner.confidence) == (
        "global", "gate", "path_logit")
    assert s2.thresholds.target == {"family": 0.95, "genus": 0.95, "species": 0.97}
    # group detectors score with the predicted class of the rank above the lowest
    assert s3.group_rank == "genus" and sorted(s3.detector.groups_) == sorted(
        set(genus_of[leaf[:60]].tolist()))
    assert s1.outlier(x[60:], d_val)[0].shape == (60,)


FLOOR_CORRECT_HIGHER = 0.3
CEIL_NAMED_SPECIES = 0.15


def test_path_logit_gate_scorer_never_accepts_a_gated_row():
    """decode() keeps the raw logit of the path's class; with the gate combiner a row
    beyond the distance cut is never named to species, even at a lax precision target."""
    from taxoclass.model.decoding import concat_decoded, decode, decode_leaf_probabilities
    from taxoclass.openset.evidence import GATED
    from taxoclass.openset.scorer import confidence_of
    from taxoclass.taxonomy.tree import Taxonomy

    rows = _rows().drop_duplicates()
    tax = Taxonomy.from_records(rows.to_dict("records"), ("family", "genus", "species"))
    rng = np.random.default_rng(0)
    n_sp = tax.n_classes("species")
    leaf = rng.integers(0, n_sp, 160)
    centres = 3 * rng.standard_normal((n_sp, 8))
    x = centres[leaf] + 0.3 * rng.standard_normal((160, 8))
    x[-10:] = 3 * rng.standard_normal(8) + 0.3 * rng.standard_normal((10, 8))  # a new species
    genus_of = np.array([list(tax.nodes("genus")).index(n[:2]) for n in tax.nodes("species")])
    logits = {r: torch.as_tensor(rng.standard_normal((100, tax.n_classes(r))),
                                 dtype=torch.float32) for r in tax.ranks}
    logits["species"][np.arange(90), leaf[60:150]] += 4.0  # the novel rows get no boost
    d_val = decode(logits, tax)
    lg = logits["species"].numpy()
    np.testing.assert_allclose(d_val.path_logit["species"],
                               lg[np.arange(100), d_val.path["species"]], rtol=1e-6)
    halves = concat_decoded([decode({r: v[:40] for r, v in logits.items()}, tax),
                             decode({r: v[40:] for r, v in logits.items()}, tax)])
    np.testing.assert_allclose(halves.path_logit["species"], d_val.path_logit["species"])
    right = (d_val.path["species"] == leaf[60:]) & (np.arange(100) < 90)
    correct = {r: right for r in tax.ranks}
    scorer = fit_scorer(x[:60], genus_of[leaf[:60]], x[60:], d_val, correct,
                        method="mahalanobis", scope="global", labels_train=leaf[:60],
                        combiner="gate", confidence="path_logit", gate_quantile=0.95,
                        target_precision=0.01, min_support=1)
    ev, _ = scorer.evidence(x[60:], d_val)
    gated = ev["species"] == GATED
    assert gated[-10:].all() and gated[:-10].mean() < 0.2
    assert scorer.thresholds.thresholds["species"] >= 0.0
    frame = scorer.predict(x[60:], d_val, tax)
    assert not (frame["taxon_rank"].to_numpy()[gated] == "species").any()
    # a decoder that starts from probabilities has no logits: a clear error, not a guess
    probs_only = decode_leaf_probabilities(torch.softmax(logits["species"], 1), tax)
    with pytest.raises(ValueError, match="openset.confidence: path_prob"):
        confidence_of(probs_only, "path_logit")
