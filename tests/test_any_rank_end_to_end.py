"""Issue 15 end to end on the real leaf images: four ranks (order from a table), labels that
stop at genus, family and order, a family without genera, a `track` group field, and a
separate test file; then a three-rank order/family/species model. Every command runs from
the CLI. Skips without ``../shared/data``; the fixture-image versions of each step are in
test_any_rank_data/model/outputs.py, test_grouped_splits.py and test_importers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from any_rank_data import FOUR_RANKS, leaf_four_rank_set, three_rank_set, write_config

from taxoclass.cli.app import print_metrics, show_predictions


def _test_images(dataset, n: int) -> list[Path]:
    data = json.loads(Path(dataset.test).read_text())
    return [Path(dataset.images_root) / im["file_name"] for im in data["images"][:n]]


def test_metrics_table_prints_a_dash_for_a_rank_without_labelled_images(capsys):
    print_metrics({"ranks": {
        "family": {"n_scored": 5, "accuracy": 0.8, "top5_accuracy": 1.0, "macro_f1": 0.5},
        "species": {"n_scored": 0, "accuracy": None, "top5_accuracy": None,
                    "macro_f1": None}}}, "val")
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["family", "5", "0.800", "1.000", "0.500"]
    assert lines[3].split() == ["species", "0", "-", "-", "-"]


def test_prediction_table_shows_the_model_lowest_rank(capsys):
    frame = pd.DataFrame({"image": ["/x/a.jpg"], "taxon_rank": ["family"], "taxon": ["Fagaceae"],
                          "score": [0.5], "reason": ["backoff_to_family:low_confidence"],
                          "order": ["Fagales"], "order_prob": [0.9], "family": ["Fagaceae"],
                          "family_prob": [0.8], "family_top5": ["Fagaceae:0.8"]})
    show_predictions(frame)
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[-2:] == ["family", "family_prob"] and row.split()[0] == "a.jpg"


def test_leaf_four_ranks_partial_labels_groups_every_command(shared_data, cli, one_thread,
                                                             fixture_set, tmp_path):
    ds = leaf_four_rank_set(tmp_path / "data", shared_data / "leaf")
    model, emb = tmp_path / "model", tmp_path / "emb"
    cli("train", "--config", write_config(ds, model, epochs=30, group_by="track"),
        "--set", f"embeddings.cache={emb}")
    split = pd.read_csv(model / "split.csv")
    sides = split.groupby("group")["split"].nunique()
    assert (sides == 1).all(), "a track on both sides of the validation split"

    out = cli("evaluate", "--model", model, "--annotations", ds.test, "--images-root",
              ds.images_root, "--out", tmp_path / "eval")
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    n_test = len(json.loads(Path(ds.test).read_text())["images"])
    assert m["n_images"] == n_test and list(m["n_scored"]) == FOUR_RANKS
    assert m["n_scored"]["order"] == n_test >= m["n_scored"]["species"]
    assert m["ranks"]["order"]["accuracy"] > 1 / 16 and m["ranks"]["family"]["accuracy"] > 1 / 24
    assert "n scored" in out

    pred = tmp_path / "pred"
    cli("predict", "--model", model, *_test_images(ds, 10), "--out", pred)
    frame = pd.read_csv(pred / "predictions.csv")
    assert len(frame) == 10 and set(FOUR_RANKS) <= set(frame.columns)
    assert set(frame["taxon_rank"]) <= {*FOUR_RANKS, "unknown"}

    flags = tmp_path / "flags"
    cli("flag-unknowns", "--model", model, *_test_images(ds, 10), "--out", flags)
    summary = json.loads((flags / "flags_summary.json").read_text())
    assert summary["n_images"] == 10 and sum(summary["resolved_at"].values()) == 10

    rep = tmp_path / "plots"
    cli("plot-report", "--model", model, fixture_set["plots"], "--grid", "2", "--out", rep)
    dwc = pd.read_csv(rep / "occurrences_dwc.csv")
    assert set(dwc["taxonRank"].dropna()) <= set(FOUR_RANKS)
    assert (rep / "report.html").is_file()


def test_leaf_three_ranks_without_genus_report_taxon_rank(shared_data, cli, one_thread,
                                                          fixture_set, tmp_path):
    ds = three_rank_set(tmp_path / "data", source="leaf")
    model = tmp_path / "model"
    cli("train", "--config", write_config(ds, model, epochs=30),
        "--set", f"embeddings.cache={tmp_path / 'emb'}")
    pred = tmp_path / "pred"
    cli("predict", "--model", model, *_test_images(ds, 8), "--out", pred)
    frame = pd.read_csv(pred / "predictions.csv")
    assert "genus" not in frame.columns and {"order", "family", "species"} <= set(frame.columns)
    assert set(frame["taxon_rank"]) <= {"order", "family", "species", "unknown"}
    rep = tmp_path / "plots"
    cli("plot-report", "--model", model, fixture_set["plots"], "--grid", "2", "--out", rep)
    dwc = pd.read_csv(rep / "occurrences_dwc.csv")
    assert set(dwc["taxonRank"].dropna()) <= {"order", "family", "species"}
    assert "genus" not in dwc.columns or dwc["genus"].isna().all()



def test_evaluate_cache_option_grows_the_given_store(fixture_set, fixture_model, cli, tmp_path):
    """`evaluate --cache DIR` embeds into DIR (a store of its own), not the training store."""
    cache = tmp_path / "store"
    out = cli("evaluate", "--model", fixture_model["model"], "--annotations", fixture_set["test"],
              "--cache", cache, "--out", tmp_path / "ev")
    n_test = len(json.loads(Path(fixture_set["test"]).read_text())["images"])
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_images"] == n_test
    assert (cache / "store").is_dir() and "n scored" in out
    files = {p: p.stat().st_mtime_ns for p in (cache / "store").rglob("*.npz")}
    assert files
    cli("evaluate", "--model", fixture_model["model"], "--annotations", fixture_set["test"],
        "--cache", cache)
    assert {p: p.stat().st_mtime_ns for p in (cache / "store").rglob("*.npz")} == files
