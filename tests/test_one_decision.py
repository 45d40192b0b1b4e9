"""One decision, one vocabulary (issue 16): ``reason``, ``outlier`` and ``flagged`` come
from the same back-off decision in predict, flag-unknowns and plot-report; a genus answer
is written one way; unknown has one representation (no score)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from taxoclass.vocab import (
    REASON_HELP,
    Reason,
    backoff_reason,
    is_outlier_reason,
    unknown_reason,
)


def _vocabulary(ranks) -> set[str]:
    """Every reason word a model with these ranks can write."""
    whys = (Reason.OUTLIER, Reason.LOW_CONFIDENCE)
    return ({ranks[-1], Reason.FAILED.value}
            | {backoff_reason(r, w) for r in ranks[:-1] for w in whys}
            | {unknown_reason(w) for w in whys})


@pytest.fixture(scope="module")
def bundle(fixture_model):
    from taxoclass.bundle import ModelBundle

    return ModelBundle.load(fixture_model["model"])


@pytest.fixture(scope="module")
def screened(fixture_set, fixture_model, cli, tmp_path_factory):
    """flag-unknowns and predict on the unseen-species images and the known test images."""
    flag_out = tmp_path_factory.mktemp("flags")
    cli("flag-unknowns", "--model", fixture_model["model"], fixture_set["unknown"],
        fixture_set["images"] / "test", "--out", flag_out)
    pred_out = tmp_path_factory.mktemp("predict")
    cli("predict", "--model", fixture_model["model"], fixture_set["unknown"],
        fixture_set["images"] / "test", "--out", pred_out)
    return {"flags": pd.read_csv(flag_out / "flags.csv"),
            "predictions": pd.read_csv(pred_out / "predictions.csv"),
            "predictions_json": json.loads((pred_out / "predictions.json").read_text())}


def _check_rows(frame: pd.DataFrame, bundle) -> None:
    tax = bundle.taxonomy
    ranks, lowest = list(tax.ranks), tax.ranks[-1]
    assert set(frame["reason"]) <= _vocabulary(ranks)
    # outlier is read from the decision, never from another cut
    assert (frame["outlier"] == frame["reason"].map(is_outlier_reason)).all()
    # ... and it is exactly "the distance gate acted": z above the gate's cut (the
    # fixture model's combiner is the default gate at the lowest rank)
    comb = bundle.scorer.combiner
    assert comb.method == "gate" and lowest in comb.outlier_ranks_
    gate_acted = frame["outlier_score"].to_numpy() > comb.params_[lowest]["z_cut"]
    assert (frame["outlier"].to_numpy() == gate_acted).all()
    # the old contradiction: named at the lowest rank although flagged an outlier
    assert not (frame["outlier"] & (frame["reason"] == lowest)).any()
    for row in frame.itertuples():
        if row.reason == lowest:
            leaf = tuple(getattr(row, r) for r in ranks)
            placeholder = tax.is_placeholder(leaf)
            assert row.taxon_rank == (ranks[-2] if placeholder else lowest)
        elif row.reason.startswith("unknown:"):
            assert (row.taxon, row.taxon_rank) == ("unknown", "unknown")
            assert np.isnan(row.score)  # unknown has no score
        else:
            assert row.reason.startswith(f"backoff_to_{row.taxon_rank}:")
        if row.taxon_rank == "genus":  # one form: "Quercus sp." in taxon
            assert row.taxon == f"{row.genus} sp."


def test_predict_rows_carry_one_decision(screened, bundle):
    frame = screened["predictions"]
    assert len(frame) == 30
    _check_rows(frame, bundle)
    unseen = frame["image"].str.contains("/unknown/")
    # the unseen species are never named as a known species, and the gate is seen acting
    assert not (frame.loc[unseen, "reason"] == bundle.taxonomy.ranks[-1]).any()
    assert frame["outlier"].any()
    # JSON: the same words, and no number for an unknown row's score
    for rec in screened["predictions_json"]["predictions"]:
        assert rec["outlier"] == is_outlier_reason(rec["reason"])
        if rec["taxon_rank"] == "unknown":
            assert rec["score"] is None


def test_flag_unknowns_flagged_is_not_at_the_lowest_rank(screened, bundle):
    flags = screened["flags"]
    lowest = bundle.taxonomy.ranks[-1]
    _check_rows(flags, bundle)
    assert (flags["flagged"] == (flags["reason"] != lowest)).all()
    named = flags["taxon_rank"] == lowest
    assert not flags.loc[named, "flagged"].any()
    # the same decision as predict, image by image
    pred = screened["predictions"].set_index("image")
    for col in ("reason", "outlier", "taxon", "taxon_rank"):
        assert (flags.set_index("image")[col] == pred.loc[flags["image"], col]).all(), col


def test_a_failed_image_says_failed(fixture_set, fixture_model, cli, tmp_path, bundle):
    folder = tmp_path / "in"
    folder.mkdir()
    good = next(iter(sorted((fixture_set["images"] / "test").glob("*.jpg"))))
    shutil.copy(good, folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    cli("flag-unknowns", "--model", fixture_model["model"], folder, "--out", tmp_path / "o")
    flags = pd.read_csv(tmp_path / "o" / "flags.csv")
    broken = flags[flags["image"].str.endswith("broken.jpg")].iloc[0]
    assert (broken["reason"], bool(broken["flagged"]), bool(broken["outlier"])) == (
        "failed", True, False)
    assert set(flags["reason"]) <= _vocabulary(bundle.taxonomy.ranks)


def test_plot_records_use_the_same_words_and_a_rule_column(fixture_set, fixture_model, cli,
                                                           tmp_path, bundle, screened):
    out = cli("plot-report", "--model", fixture_model["model"], fixture_set["plots"],
              "--grid", 4, "--out", tmp_path, "--device", "cpu", "--rule", "max")
    tax = bundle.taxonomy
    doc = json.loads((tmp_path / "plot_records.json").read_text())
    records = [r for p in doc["plots"] for r in p["records"]]
    assert records
    assert {r["rule"] for r in records} == {"max"}  # the setting, not a reason
    assert {r["reason"] for r in records} <= _vocabulary(tax.ranks)
    for r in records:
        if r["taxon_rank"] == "unknown":
            assert r["taxon"] == "unknown" and r["reason"].startswith("unknown:")
            assert r["score"] is None and 0 < r["tile_share"] <= 1  # never a score of 1.0
        else:
            assert r["taxon"] == tax.label(tuple(r["node"]))
            assert r["reason"] == (tax.ranks[-1] if r["taxon_rank"] == tax.ranks[-1]
                                   or tax.is_placeholder(tuple(r["node"]))
                                   else backoff_reason(r["taxon_rank"], "low_confidence"))
        if r["taxon_rank"] == "genus":
            assert r["taxon"].endswith(" sp.")
    # a genus answer reads the same in predictions and in plot records
    pred_genera = set(screened["predictions"].query("taxon_rank == 'genus'")["taxon"])
    plot_genera = {r["taxon"] for r in records if r["taxon_rank"] == "genus"}
    for name in pred_genera | plot_genera:
        node = tax.find(name[: -len(" sp.")], "genus")
        assert node and tax.label(node[0]) == name
    # the console never prints a score for unknown
    assert "unknown (unknown" not in out
    csv = pd.read_csv(tmp_path / "plot_records.csv")
    unknown = csv[csv["taxon_rank"] == "unknown"]
    assert not (unknown["score"] == 1.0).any()


def test_every_reason_word_is_explained():
    words = {"<lowest rank>", "failed"} | {
        w.replace("genus", "<rank>") for w in (backoff_reason("genus", "outlier"),
                                               backoff_reason("genus", "low_confidence"))} | {
        unknown_reason("outlier"), unknown_reason("low_confidence")}
    assert set(REASON_HELP) == words


@pytest.mark.parametrize("combiner", ["gate", "rank_mean", "logistic"])
def test_outlier_is_the_gate_acting_for_every_combiner(combiner):
    """Synthetic: the ``outlier`` column is exactly "distance rejected the lowest rank",
    never the detector's own contamination cut, whatever the combiner."""
    from taxoclass.model.decoding import decode_leaf_probabilities
    from taxoclass.openset.scorer import fit_scorer, typical_outlier_score
    from taxoclass.taxonomy.tree import Taxonomy

    tax = Taxonomy.from_records([
        {"family": "Fagaceae", "genus": "Quercus", "species": "Quercus robur"},
        {"family": "Fagaceae", "genus": "Quercus", "species": "Quercus rubra"},
        {"family": "Sapindaceae", "genus": "Acer", "species": "Acer rubrum"},
    ], ("family", "genus", "species"))
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 6
    y_train = rng.integers(0, 3, 300)
    x_train = centres[y_train] + rng.normal(size=(300, 8))
    y_val = rng.integers(0, 3, 120)
    far = np.arange(120) >= 90  # 30 images far from every known species
    x_val = centres[y_val] + rng.normal(size=(120, 8)) + far[:, None] * 8
    leaf = np.full((120, 3), 0.05)
    leaf[np.arange(120), y_val] = rng.uniform(0.4, 0.95, 120)
    leaf /= leaf.sum(axis=1, keepdims=True)
    decoded = decode_leaf_probabilities(leaf, tax)
    correct = {"species": ~far, "genus": np.ones(120, bool), "family": np.ones(120, bool)}
    groups = tax.parent_index("species", "genus")[y_train]
    scorer = fit_scorer(x_train, groups, x_val, decoded, correct, combiner=combiner,
                        confidence="path_prob", labels_train=y_train, target_precision=0.9,
                        min_support=5)
    frame = scorer.predict(x_val, decoded, tax)
    assert (frame["outlier"] == frame["reason"].map(is_outlier_reason)).all()
    assert not (frame["outlier"] & (frame["reason"] == "species")).any()
    ev, z = scorer.evidence(x_val, decoded)
    gated = scorer.gated(decoded, ev, z)["species"]
    assert (frame["outlier"].to_numpy() == gated).all()
    np.testing.assert_allclose(frame["outlier_score"], z)
    assert frame.loc[far, "outlier"].any()  # the far images are seen rejected by distance
    if combiner == "gate":  # exactly "z above the gate's cut"
        cut = typical_outlier_score(scorer.combiner, "species")
        assert (frame["outlier"].to_numpy() == (z > cut)).all()
        assert frame.loc[far, "outlier"].mean() > 0.5 > frame.loc[~far, "outlier"].mean()


def test_python_api_rows_carry_the_same_decision(fixture_set, fixture_model, tmp_path):
    """TaxonClassifier.predict (the public API) writes the rows `taxoclass predict` writes:
    an unreadable file says `failed` (not an empty reason) and outlier follows the reason."""
    from taxoclass import TaxonClassifier

    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    good = sorted(fixture_set["unknown"].glob("*.jpg"))[:3]
    frame = TaxonClassifier.load(fixture_model["model"]).predict([*good, bad])
    assert list(frame["reason"])[-1] == "failed" and not frame["outlier"].iloc[-1]
    ok = frame.iloc[:-1]
    assert (ok["outlier"] == ok["reason"].str.endswith(":outlier")).all()
    assert ok["confidence"].dropna().between(0, 1).all()
