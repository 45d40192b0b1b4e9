"""Per-rank thresholds fitted to a target precision."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from taxoclass.openset.thresholds import RankThresholds, fit_thresholds


def _validation(seed=0, n=2000):
    rng = np.random.default_rng(seed)
    s = rng.uniform(size=n)
    correct = rng.uniform(size=n) < s  # P(correct | s) = s
    return s, correct


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_thresholds_reach_target_precision(target):
    s, c = _validation()
    g, cg = _validation(1)
    th = fit_thresholds({"genus": g, "species": s}, {"genus": cg, "species": c},
                        target_precision=target, min_support=20)
    for rank, (sc, cc) in {"genus": (g, cg), "species": (s, c)}.items():
        t = th.thresholds[rank]
        acc = sc >= t
        assert acc.sum() >= 20
        assert cc[acc].mean() >= target
        assert th.precision[rank] == pytest.approx(cc[acc].mean())
        assert th.coverage[rank] == pytest.approx(acc.mean())
        # smallest such threshold: one step lower falls below the target or support
        lower = sc[sc < t]
        if len(lower):
            acc2 = sc >= lower.max()
            assert cc[acc2].mean() < target
    assert th.unreachable == []


def test_unreachable_target_is_inf_and_reported_and_json_round_trips():
    s, c = _validation()
    bad = np.zeros_like(c)  # nothing is ever right
    th = fit_thresholds({"family": s, "species": s}, {"family": c, "species": bad},
                        target_precision={"family": 0.9, "species": 0.95}, min_support=10)
    assert math.isinf(th.thresholds["species"]) and th.unreachable == ["species"]
    assert th.precision["species"] is None and th.coverage["species"] == 0.0
    text = th.to_json()
    assert json.loads(text)["thresholds"]["species"] is None
    back = RankThresholds.from_json(text)
    assert back == th
    assert back.target == {"family": 0.9, "species": 0.95}


def test_min_support_blocks_tiny_perfect_sets():
    s = np.array([0.99, 0.98, 0.5, 0.4, 0.3])
    c = np.array([True, True, False, True, False])
    th = fit_thresholds({"species": s}, {"species": c}, target_precision=0.95, min_support=3)
    assert math.isinf(th.thresholds["species"])
    th = fit_thresholds({"species": s}, {"species": c}, target_precision=0.95, min_support=2)
    assert th.thresholds["species"] == 0.98


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="one per validation image"):
        fit_thresholds({"species": np.ones(3)}, {"species": np.ones(2, bool)})
    with pytest.raises(ValueError, match="target precision"):
        fit_thresholds({"species": np.ones(3)}, {"species": np.ones(3, bool)},
                       target_precision=1.5)


def test_default_targets_are_the_configs_and_name_every_rank():
    from taxoclass.config import OpensetConfig

    s, c = _validation()
    th = fit_thresholds({"genus": s, "species": s}, {"genus": c, "species": c})
    cfg = OpensetConfig()
    assert th.target == {"genus": 0.95, "species": 0.97} == {
        r: cfg.target_precision[r] for r in ("genus", "species")}
    assert th.min_support == cfg.min_support
    # Issue 15: a rank the default does not name (order) gets its 'default' target.
    th = fit_thresholds({"order": s, "family": s}, {"order": c, "family": c})
    assert th.target == {"order": cfg.target_precision["default"], "family": 0.95}
    with pytest.raises(ValueError, match=r"no value for rank\(s\) \['order'\]"):
        fit_thresholds({"order": s}, {"order": c}, target_precision={"family": 0.9})
