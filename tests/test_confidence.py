"""One calibrated confidence (issue 16): fitting, the bundle part, predict and evaluate."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from taxoclass.bundle import CONFIDENCE_FILE, ModelBundle
from taxoclass.model.confidence import (
    ConfidenceCalibration,
    confidence_of,
    expected_calibration_error,
    fit_confidence,
    reliability_bins,
)

RANKS = ("family", "genus", "species")


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw probabilities in [0.3, 1) that are right only p**3 of the time."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.3, 0.999, n)
    return p, rng.uniform(size=n) < p ** 3


def test_fit_lowers_ece_on_held_out_synthetic_data():
    p_fit, ok_fit = _overconfident(3000, 0)
    p_new, ok_new = _overconfident(3000, 1)
    cal = fit_confidence({"species": p_fit}, {"species": ok_fit}, source="synthetic")
    before = expected_calibration_error(p_new, ok_new)
    after = expected_calibration_error(cal.calibrate("species", p_new), ok_new)
    assert before > 0.15  # over-confident by construction
    assert after < 0.05 and after < before / 3
    slope, _ = cal.params["species"]
    assert slope > 1.0  # p**3 is sharper in log-odds than p: the map steepens, stays monotone
    q = cal.calibrate("species", np.sort(p_new))
    assert np.all(np.diff(q) >= 0) and q.min() >= 0 and q.max() <= 1
    assert cal.info["ranks"]["species"]["n"] == 3000


def test_fit_uses_only_labelled_rows_and_degenerate_ranks_stay_near_identity():
    p = np.array([0.9, 0.8, 0.7, 0.95])
    cal = fit_confidence({"genus": p}, {"genus": np.ones(4, bool)},
                         {"genus": np.array([True, True, False, False])})
    assert cal.info["ranks"]["genus"]["n"] == 2
    a, b = cal.params["genus"]
    assert np.isfinite(a) and np.isfinite(b) and abs(a - 1) < 3 and abs(b) < 3
    back = ConfidenceCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.params == cal.params


def test_reliability_bins_and_ece_values():
    conf = np.array([0.05, 0.15, 0.95, 0.95, np.nan])
    right = np.array([False, False, True, False, True])
    bins = reliability_bins(conf, right, n_bins=10)
    assert bins["count"].sum() == 4 and bins.loc[9, "count"] == 2
    assert bins.loc[9, "accuracy"] == 0.5 and bins.loc[9, "mean_confidence"] == pytest.approx(0.95)
    # (0.05*1 + 0.15*1 + 0.45*2) / 4
    assert expected_calibration_error(conf, right) == pytest.approx(0.275)
    assert expected_calibration_error(np.array([]), np.array([], bool)) is None


def test_confidence_of_rows_takes_the_reported_rank_and_nan_for_unknown():
    frame = pd.DataFrame({"taxon_rank": ["species", "genus", "unknown"],
                          "family_prob": [0.9, 0.8, 0.3], "genus_prob": [0.8, 0.6, 0.2],
                          "species_prob": [0.7, 0.1, 0.1]})
    cal = ConfidenceCalibration(params={"species": (2.0, 0.0), "genus": (1.0, 0.0)})
    c = confidence_of(frame, RANKS, cal)
    assert c[0] == pytest.approx(0.7 ** 2 / (0.7 ** 2 + 0.3 ** 2))
    assert c[1] == pytest.approx(0.6) and np.isnan(c[2])


def test_bundle_round_trips_the_fitted_calibration(fixture_model, tmp_path):
    bundle = ModelBundle.load(fixture_model["model"])
    assert bundle.confidence is not None and set(bundle.confidence.params) == set(RANKS)
    assert CONFIDENCE_FILE in bundle.parts
    assert bundle.confidence.info["source"] == "holdout"
    bundle.save(tmp_path / "copy")
    again = ModelBundle.load(tmp_path / "copy")
    assert again.confidence.params == bundle.confidence.params
    meta = json.loads((tmp_path / "copy" / "bundle.json").read_text())
    assert CONFIDENCE_FILE in meta["parts"]
    (tmp_path / "copy" / CONFIDENCE_FILE).write_text(
        json.dumps({**bundle.confidence.to_dict(), "method": "platt", "info": {"x": 1}}))
    from taxoclass.errors import BundleError

    with pytest.raises(BundleError, match="sha256"):
        ModelBundle.load(tmp_path / "copy")


def test_bundle_without_calibration_warns_and_reports_raw_probability(
        fixture_model, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(fixture_model["model"], old)
    meta = json.loads((old / "bundle.json").read_text())
    del meta["parts"][CONFIDENCE_FILE]
    (old / "bundle.json").write_text(json.dumps(meta))
    (old / CONFIDENCE_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="taxoclass.bundle"):
        bundle = ModelBundle.load(old)
    assert bundle.confidence is None
    assert any("uncalibrated" in r.getMessage() for r in caplog.records)
    bundle.scorer = None  # every answer at the lowest rank: each row reports a taxon
    frame, _ = bundle.predict_with_backoff(np.random.default_rng(0).normal(
        size=(4, bundle.head.config()["in_features"])).astype(np.float32))
    assert (frame["taxon_rank"] != "unknown").all()
    for _, row in frame.iterrows():
        assert row["confidence"] == pytest.approx(row[f"{row['taxon_rank']}_prob"])


def test_predict_writes_calibrated_confidence(fixture_model, fixture_set, cli, tmp_path):
    cli("predict", "--model", fixture_model["model"], fixture_set["images"] / "test",
        "--out", tmp_path)
    frame = pd.read_csv(tmp_path / "predictions.csv")
    cols = list(frame.columns)
    assert cols.index("confidence") == cols.index("taxon") + 1 and "score" in cols
    bundle = ModelBundle.load(fixture_model["model"])
    done = frame[frame["taxon_rank"].isin(RANKS)]
    assert len(done) >= 0.8 * len(frame)
    assert done["confidence"].between(0, 1).all()
    for rank, rows in done.groupby("taxon_rank"):
        want = bundle.confidence.calibrate(rank, rows[f"{rank}_prob"].to_numpy())
        np.testing.assert_allclose(rows["confidence"].to_numpy(), want, rtol=1e-5)
    assert frame.loc[frame["taxon_rank"] == "unknown", "confidence"].isna().all()


def test_evaluate_writes_ece_per_rank_and_reliability_bins(fixture_model, fixture_set, cli,
                                                           tmp_path):
    out = tmp_path / "ev"
    cli("evaluate", "--model", fixture_model["model"], "--annotations", fixture_set["test"],
        "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["calibrated"] is True and cal["method"] == "platt"
    bins = pd.read_csv(out / "reliability.csv")
    assert list(bins.columns) == ["rank", "bin", "lower", "upper", "count",
                                  "mean_confidence", "accuracy"]
    for rank in RANKS:
        assert 0.0 <= cal["ece"][rank] <= 1.0
        n = metrics["ranks"][rank]["n_scored"]
        assert cal["n_scored"][rank] == n == 24
        assert bins.loc[bins["rank"] == rank, "count"].sum() == n
    full = bins[bins["count"] > 0]
    assert full["accuracy"].between(0, 1).all() and full["mean_confidence"].between(0, 1).all()
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    preds = pd.read_csv(out / "predictions.csv")
    bundle = ModelBundle.load(fixture_model["model"])
    for rank in RANKS:
        np.testing.assert_allclose(preds[f"{rank}_confidence"], bundle.confidence.calibrate(
            rank, preds[f"{rank}_prob"].to_numpy()), rtol=1e-5)


def test_crossfit_training_calibrates_on_out_of_fold_predictions(fixture_model, fixture_set,
                                                                  cli, tmp_path):
    model = tmp_path / "cf"
    cli("train", "--config", fixture_set["config"], "--set", f"out={model}",
        "--set", f"embeddings.cache={fixture_model['emb']}", "--set", "train.epochs=20",
        "--set", "openset.calibration=crossfit", "--set", "openset.folds=3")
    bundle = ModelBundle.load(model)
    metrics = json.loads((model / "metrics_val.json").read_text())
    assert metrics["predictions"].startswith("out-of-fold")
    info = bundle.confidence.info
    assert info["source"] == "crossfit"
    for rank in RANKS:  # every image, each predicted by a fold head that did not train on it
        assert info["ranks"][rank]["n"] == metrics["ranks"][rank]["n_scored"] == metrics["n"]


def test_open_set_evaluation_calibrates_its_retrained_model(fixture_model, fixture_set, cli,
                                                            tmp_path):
    cli("evaluate", "--model", fixture_model["model"], "--annotations", fixture_set["train"],
        "--holdout-species", "Acer platanoides", "--out", tmp_path)
    metrics = json.loads((tmp_path / "openset_metrics.json").read_text())
    assert set(metrics["confidence_ece"]) == {*RANKS, "all"}
    assert 0.0 <= metrics["confidence_ece"]["all"] <= 1.0
    frame = pd.read_csv(tmp_path / "openset_predictions.csv")
    answered = frame[frame["taxon_rank"].isin(RANKS)]
    assert len(answered) and answered["confidence"].between(0, 1).all()
    assert frame.loc[frame["taxon_rank"] == "unknown", "confidence"].isna().all()
