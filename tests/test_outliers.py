"""Outlier detectors (pyod wrappers), confidence scores and the evidence combiner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from taxoclass.openset.detectors import DETECTORS, OutlierDetector
from taxoclass.openset.evidence import GATED, EvidenceCombiner, confidence_scores

torch.set_num_threads(1)


def _clusters(seed: int = 0, n_per: int = 40, dim: int = 16):
    """Three tight clusters on the unit sphere (train), test inliers and far outliers."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((3, dim))
    centres[0, 0] = centres[1, 1] = centres[2, 2] = 1.0
    train = np.concatenate([c + 0.05 * rng.standard_normal((n_per, dim)) for c in centres])
    groups = np.repeat(np.arange(3), n_per)
    inl = np.concatenate([c + 0.05 * rng.standard_normal((10, dim)) for c in centres])
    far = np.zeros((30, dim))
    far[:, 3:] = rng.standard_normal((30, dim - 3))  # orthogonal to every cluster
    far += 0.05 * rng.standard_normal(far.shape)
    return train, groups, inl, np.repeat(np.arange(3), 10), far


@pytest.mark.parametrize("method", DETECTORS)
def test_detector_flags_points_far_from_every_cluster(method):
    train, groups, inl, g_inl, far = _clusters()
    x = np.concatenate([inl, far])
    y = np.r_[np.zeros(len(inl)), np.ones(len(far))]
    det = OutlierDetector(method).fit(train)
    assert roc_auc_score(y, det.decision_function(x)) >= 0.9
    g_far = np.zeros(len(far), dtype=int)
    gdet = OutlierDetector(method, scope="group", min_group_size=10).fit(train, groups)
    assert roc_auc_score(y, gdet.decision_function(x, np.r_[g_inl, g_far])) >= 0.9
    assert det.predict(far).mean() > det.predict(inl).mean()


@pytest.mark.parametrize("method", ["knn", "iforest", "ecod"])
def test_state_round_trip_gives_identical_scores(method, tmp_path):
    train, groups, inl, g_inl, far = _clusters(1)
    scope = "global" if method == "iforest" else "group"
    det = OutlierDetector(method, scope=scope, min_group_size=10, random_state=3)
    det.fit(train, groups)
    params, arrays = det.to_state()
    (tmp_path / "p.json").write_text(json.dumps(params))
    np.savez(tmp_path / "a.npz", **arrays)
    loaded = np.load(tmp_path / "a.npz", allow_pickle=False)
    back = OutlierDetector.from_state(json.loads((tmp_path / "p.json").read_text()),
                                      dict(loaded))
    x = np.concatenate([inl, far])
    g = np.r_[g_inl, np.zeros(len(far), dtype=int)]
    np.testing.assert_array_equal(back.decision_function(x, g), det.decision_function(x, g))
    assert back.get_params() == det.get_params()


def test_group_scope_falls_back_to_global_for_small_and_unseen_groups():
    train, groups, inl, g_inl, _ = _clusters(2)
    groups = groups.copy()
    groups[:3] = 7  # a group too small for its own detector
    det = OutlierDetector("knn", scope="group", min_group_size=10).fit(train, groups)
    assert 7 not in det.groups_ and set(det.groups_) == {0, 1, 2}
    glob = OutlierDetector("knn").fit(train)
    np.testing.assert_allclose(det.decision_function(inl, np.full(len(inl), 7)),
                               glob.decision_function(inl))
    np.testing.assert_allclose(det.decision_function(inl, np.full(len(inl), 99)),
                               glob.decision_function(inl))


def test_detector_contract_errors():
    det = OutlierDetector("knn")
    with pytest.raises(NotFittedError):
        det.decision_function(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="Unknown outlier method"):
        OutlierDetector("nope").fit(np.random.default_rng(0).random((10, 3)))
    with pytest.raises(ValueError, match="needs groups"):
        OutlierDetector(scope="group").fit(np.random.default_rng(0).random((10, 3)))
    det.fit(np.random.default_rng(0).random((10, 3)))
    with pytest.raises(ValueError, match="fitted on 3 features"):
        det.decision_function(np.zeros((2, 4)))


def test_confidence_scores_are_oriented_higher_is_more_confident():
    probs = {"species": np.array([[0.98, 0.01, 0.01], [0.34, 0.33, 0.33]])}
    logits = {"species": torch.tensor([[9.0, 0.0, 0.0], [0.1, 0.0, 0.0]])}
    cs = confidence_scores(probs, logits)["species"]
    for name in ("max_prob", "margin", "neg_entropy", "neg_energy"):
        assert cs[name][0] > cs[name][1], name
    np.testing.assert_allclose(cs["margin"], [0.97, 0.01])
    assert "neg_energy" not in confidence_scores(probs)["species"]


@pytest.mark.parametrize("method", ["logistic", "rank_mean"])
def test_evidence_combiner_uses_both_signals_and_round_trips(method):
    rng = np.random.default_rng(0)
    n = 400
    p = rng.uniform(0.2, 1.0, n)
    z = rng.normal(0, 1, n)
    correct = rng.uniform(size=n) < 1 / (1 + np.exp(-(4 * (p - 0.6) - 1.5 * z)))
    comb = EvidenceCombiner(method, confidence="path_prob").fit({"species": p}, z,
                                                                {"species": correct})
    ev = comb.score({"species": p}, z)["species"]
    assert roc_auc_score(correct, ev) > roc_auc_score(correct, p)
    back = EvidenceCombiner.from_dict(json.loads(json.dumps(comb.to_dict())))
    np.testing.assert_allclose(back.score({"species": p}, z)["species"], ev)
    # farther out (higher z) never raises the evidence
    assert comb.score({"species": np.full(2, 0.8)}, np.array([0.0, 3.0]))["species"][1] <= \
        comb.score({"species": np.full(2, 0.8)}, np.array([0.0, 3.0]))["species"][0]


def test_mahalanobis_is_class_conditional_and_round_trips():
    """A new class between two known ones is typical globally but far from every class."""
    rng = np.random.default_rng(5)
    train, labels, inl, _, _ = _clusters(3)
    mid = np.zeros(16)
    mid[0] = mid[1] = 1.0
    novel = mid / np.linalg.norm(mid) + 0.05 * rng.standard_normal((30, 16))
    x = np.concatenate([inl, novel])
    y = np.r_[np.zeros(len(inl)), np.ones(len(novel))]
    det = OutlierDetector("mahalanobis").fit(train, labels)
    assert roc_auc_score(y, det.decision_function(x)) >= 0.9
    # scoring needs no groups even with scope="group"; the groups are the classes
    gdet = OutlierDetector("mahalanobis", scope="group").fit(train, labels)
    np.testing.assert_allclose(gdet.decision_function(x), det.decision_function(x))
    params, arrays = det.to_state()
    back = OutlierDetector.from_state(json.loads(json.dumps(params)), arrays)
    np.testing.assert_allclose(back.decision_function(x), det.decision_function(x))


def test_gate_rejects_far_rows_whatever_their_confidence_and_round_trips():
    rng = np.random.default_rng(1)
    n = 300
    p = rng.uniform(0.0, 1.0, n)
    z = rng.normal(0, 1, n)
    correct = rng.uniform(size=n) < p
    comb = EvidenceCombiner("gate", gate_quantile=0.9).fit({"genus": p, "species": p}, z,
                                                          {"genus": correct, "species": correct})
    cut = comb.params_["species"]["z_cut"]
    assert cut == pytest.approx(np.quantile(z[correct], 0.9))  # set on rows that are right
    ev = comb.score({"genus": np.full(3, 0.99), "species": np.array([0.99, 0.99, 0.2])},
                    np.array([cut - 0.1, cut + 0.1, cut - 0.1]))
    assert ev["species"][1] == GATED and ev["species"][0] > ev["species"][2] >= 0.0
    assert (ev["genus"] >= 0).all()  # only the lowest rank is gated by default
    back = EvidenceCombiner.from_dict(json.loads(json.dumps(comb.to_dict())))
    assert back.gate_quantile == 0.9
    np.testing.assert_array_equal(back.score({"genus": p, "species": p}, z)["species"],
                                  comb.score({"genus": p, "species": p}, z)["species"])


def test_combiner_rejects_unknown_method_confidence_and_quantile():
    p, z, c = np.ones(3), np.zeros(3), {"species": np.ones(3, bool)}
    with pytest.raises(ValueError, match="expected one of"):
        EvidenceCombiner("vote").fit({"species": p}, z, c)
    with pytest.raises(ValueError, match="Unknown confidence"):
        EvidenceCombiner("gate", confidence="softmax").fit({"species": p}, z, c)
    with pytest.raises(ValueError, match="gate_quantile"):
        EvidenceCombiner("gate", gate_quantile=0.0).fit({"species": p}, z, c)
