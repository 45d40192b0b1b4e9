"""`taxoclass train` with the open-set recipe chosen on the training data (issue 18 items
1-3): the shipped fixtures fall back (too few species) and say so; with the size limits
lowered they run the leave-taxa-out rounds, record and print the choice; a fixed recipe is
honoured; back-off reasons say which rule rejected the species."""

from __future__ import annotations

import json

import numpy as np
import pytest

from taxoclass.bundle import ModelBundle
from taxoclass.features.embeddings import load_embeddings
from taxoclass.openset.scorer import confidence_of
from taxoclass.vocab import accepted_reason

pytestmark = pytest.mark.usefixtures("one_thread_module")

# The fixtures hold 6 species: below the default openset.min_species (10) and too few
# images for min_support 10, so these settings let the rounds run on them.
SMALL = ("--set", "openset.min_species=4", "--set", "openset.min_support=3",
         "--set", "openset.rounds=2")
FIXED = ("--set", "openset.recipe=fixed", "--set", "openset.detector=knn",
         "--set", "openset.confidence=path_prob", "--set", "openset.gate_quantile=0.9")


@pytest.fixture(scope="module")
def trained(fixture_set, fixture_model, cli, tmp_path_factory):
    """Two bundles on the fixture set: auto (rounds run) and fixed (knn gate)."""
    out = {}
    for name, extra in (("auto", SMALL), ("fixed", SMALL + FIXED)):
        model = tmp_path_factory.mktemp(name) / "model"
        text = cli("train", "--config", fixture_set["config"], "--set", f"out={model}",
                   "--set", f"embeddings.cache={fixture_model['emb']}", *extra)
        out[name] = {"model": model, "output": text,
                     "metrics": json.loads((model / "metrics_val.json").read_text())}
    return out


def test_shipped_fixtures_fall_back_to_the_fixed_recipe_and_say_why(fixture_model):
    m = json.loads((fixture_model["model"] / "metrics_val.json").read_text())
    sel = m["openset_selection"]
    assert sel["recipe"] == "auto" and sel["used"] == "fixed" and sel["rounds"] == 0
    assert "6 species taxa" in sel["fallback"] and "min_species" in sel["fallback"]
    assert sel["chosen"] == {"detector": "mahalanobis", "combiner": "gate",
                             "confidence": "path_logit", "gate_quantile": 0.975}
    assert "open-set recipe: fixed mahalanobis/gate@0.975/path_logit" in \
        fixture_model["train_output"]
    assert m["openset_thresholds"]["unknown_share"] is None  # no simulated unknowns


def test_auto_recipe_is_recorded_and_printed(trained):
    t = trained["auto"]
    sel = t["metrics"]["openset_selection"]
    assert sel["used"] == "auto" and sel["rounds"] == 2 and sel.get("fallback") is None
    assert len(sel["candidates"]) == 36  # 3 detectors x 2 confidences x (4 gate qs + 2)
    keys = {c["key"] for c in sel["candidates"]}
    assert sel["chosen_key"] in keys
    for c in sel["candidates"]:
        assert len(c["auroc_rounds"]) == c["n_rounds"] == 2
        lo, hi = c["precision_species_all_ci95"]
        assert lo is None or 0 <= lo <= hi <= 1
    exp = sel["expected"]
    for k in ("auroc", "precision_species_all", "precision_species_known",
              "coverage_known_species"):
        assert k in exp and f"{k}_ci95" in exp
    assert len(sel["held_out"]) == 2 and all("species" in h for h in sel["held_out"])
    thr = t["metrics"]["openset_thresholds"]
    assert thr["unknown_share"] == 0.2 and thr["n_unknown"]["species"] == \
        sel["n_scored"]["unknown"]
    assert set(thr["precision_all"]) == set(thr["precision_known"]) == {
        "family", "genus", "species"}
    assert "leave-taxa-out" in t["metrics"]["openset_calibration"]["thresholds_from"]
    extra = json.loads((t["model"] / "bundle.json").read_text())["extra"]
    assert extra["openset_selection"]["chosen_key"] == sel["chosen_key"]
    bundle = ModelBundle.load(t["model"])
    c = sel["chosen"]
    assert (bundle.scorer.detector.method, bundle.scorer.combiner.method,
            bundle.scorer.combiner.confidence) == (c["detector"], c["combiner"],
                                                   c["confidence"])
    assert "open-set recipe (auto, 2 leave-taxa-out rounds, 36 candidate(s))" in t["output"]
    assert f"detector {c['detector']}, combiner {c['combiner']}" in t["output"]
    assert "unknown-detection AUROC" in t["output"] and "over all images at 20% unknown" \
        in t["output"]
    nested = sel["expected_nested"]
    assert len(nested["chosen_per_round"]) == 2 and set(nested["chosen_per_round"]) <= keys
    assert "the choice itself (chosen on the other rounds" in t["output"]


def test_fixed_recipe_is_honoured(trained):
    sel = trained["fixed"]["metrics"]["openset_selection"]
    assert sel["recipe"] == sel["used"] == "fixed"
    assert sel["chosen"] == {"detector": "knn", "combiner": "gate",
                             "confidence": "path_prob", "gate_quantile": 0.9}
    assert [c["key"] for c in sel["candidates"]] == ["knn/gate@0.9/path_prob"]
    scorer = ModelBundle.load(trained["fixed"]["model"]).scorer
    assert scorer.detector.method == "knn" and scorer.combiner.confidence == "path_prob"
    assert scorer.combiner.gate_quantile == 0.9
    assert "open-set recipe (fixed, 2 leave-taxa-out rounds, 1 candidate(s))" in \
        trained["fixed"]["output"]


def _typical_z(comb, rank: str) -> float:
    """An outlier score at which the combiner holds no distance against the rank, from
    its parameters (gate: its cut; rank_mean: the reference median; logistic: the mean)."""
    par = comb.params_[rank]
    if "z_cut" in par:
        return float(par["z_cut"])
    if "z_ref" in par:
        return -float(np.median(par["z_ref"]))
    return float(par["mean"][1])


def _check_reasons(scorer, x, decoded, taxonomy):
    """Every rejected species: ':outlier' exactly when the distance made the difference."""
    lowest = taxonomy.ranks[-1]
    frame = scorer.predict(x, decoded, taxonomy)
    conf = confidence_of(decoded, scorer.combiner.confidence)
    z = frame["outlier_score"].to_numpy()
    thr = scorer.thresholds.thresholds[lowest]
    ev = scorer.combiner.score(conf, z)[lowest]
    typical = np.full(len(z), _typical_z(scorer.combiner, lowest))
    ev_typical = scorer.combiner.score(conf, typical)[lowest]
    rejected = ~(ev >= thr)
    by_distance = rejected & (ev_typical >= thr)  # a typical distance would have passed
    reason = frame["reason"].to_numpy(dtype=str)
    assert np.array_equal(np.char.endswith(reason, ":outlier"), by_distance)
    assert np.array_equal(frame["outlier"].to_numpy(), by_distance)
    assert np.array_equal(np.char.endswith(reason, ":low_confidence"), rejected & ~by_distance)
    assert (reason[~rejected] == accepted_reason(lowest)).all()  # named at the lowest rank
    return reason, by_distance, rejected


@pytest.mark.parametrize("name", ["auto", "fixed"])
def test_reasons_tell_which_rule_rejected_the_species(trained, fixture_model, name):
    bundle = ModelBundle.load(trained[name]["model"])
    emb = load_embeddings(fixture_model["emb"]).embeddings
    rng = np.random.default_rng(0)
    far = rng.normal(0, 1, (20, emb.shape[1])) * np.abs(emb).mean() * 3  # unlike any image
    x = bundle.scorer_input(np.vstack([emb, far]))
    decoded = bundle.predict_embeddings(np.vstack([emb, far]))
    scorer, tax = bundle.scorer, bundle.taxonomy
    _check_reasons(scorer, x, decoded, tax)
    # Move the cuts so that both rules act on known images: half of them too far for the
    # gate (or the distance term), a third too unsure for the confidence threshold.
    lowest = tax.ranks[-1]
    z = scorer.evidence(x, decoded)[1]
    par = scorer.combiner.params_[lowest]
    if "z_cut" in par:
        par["z_cut"] = float(np.median(z[: len(emb)]))
    ev_typ = scorer.combiner.score(
        confidence_of(decoded, scorer.combiner.confidence),
        np.full(len(z), _typical_z(scorer.combiner, lowest)))[lowest]
    scorer.thresholds.thresholds[lowest] = float(np.quantile(ev_typ[: len(emb)], 0.33))
    reason, by_distance, rejected = _check_reasons(scorer, x, decoded, tax)
    assert by_distance.any() and (rejected & ~by_distance).any()
    assert any(r.startswith("backoff_to_") and r.endswith(":outlier") for r in reason) or \
        any(r == "unknown:outlier" for r in reason)


def test_auto_recipe_with_crossfit_calibration(fixture_set, fixture_model, cli, tmp_path):
    model = tmp_path / "model"
    cli("train", "--config", fixture_set["config"], "--set", f"out={model}",
        "--set", f"embeddings.cache={fixture_model['emb']}", *SMALL,
        "--set", "openset.calibration=crossfit", "--set", "openset.folds=3")
    m = json.loads((model / "metrics_val.json").read_text())
    sel, cal = m["openset_selection"], m["openset_calibration"]
    assert sel["used"] == "auto" and cal["calibration"] == "crossfit"
    assert "leave-taxa-out" in cal["thresholds_from"]
    scorer = ModelBundle.load(model).scorer
    assert scorer.detector.method == sel["chosen"]["detector"]
    assert scorer.thresholds.unknown_share == 0.2
