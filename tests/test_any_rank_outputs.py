"""Outputs for any rank list (issue 15): predictions, flags, plot reports and Darwin Core
carry the model's own ranks, and predict / flag-unknowns / evaluate share one embedding
store that grows by the images it lacks.

Models are trained from the CLI on the small any-rank sets of ``tests/any_rank_data.py``
(the shipped fixture images): three ranks that skip genus (order/family/species) and four
ranks (order/family/genus/species) with family-, genus- and order-only labels.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from any_rank_data import five_rank_set, fixture_four_rank_set, three_rank_set, write_config
from PIL import Image, ImageOps

from taxoclass.bundle import ModelBundle
from taxoclass.errors import ConfigError
from taxoclass.plots.dwc import darwin_core_frame, dwc_columns
from taxoclass.plots.plantclef import plantclef_submission_frame
from taxoclass.plots.rules import PlotRecord, resolve_thresholds
from taxoclass.taxonomy.tree import Taxonomy

torch.set_num_threads(1)


def _train(cli, dataset, folder: Path) -> Path:
    """Train a bundle on ``dataset`` (20 epochs, the tiny fixture backbone); its store is
    ``folder/emb``."""
    model = folder / "model"
    cfg = write_config(dataset, model, epochs=20)
    cli("train", "--config", cfg, "--set", f"embeddings.cache={folder / 'emb'}")
    return model


@pytest.fixture(scope="module")
def three(cli, tmp_path_factory) -> dict:
    """An order/family/species model (no genus rank) and its data set."""
    folder = tmp_path_factory.mktemp("three-rank")
    dataset = three_rank_set(folder / "data")
    return {"data": dataset, "model": _train(cli, dataset, folder), "dir": folder}


@pytest.fixture(scope="module")
def four(cli, tmp_path_factory) -> dict:
    """An order/family/genus/species model with partial labels, and its data set."""
    folder = tmp_path_factory.mktemp("four-rank")
    dataset = fixture_four_rank_set(folder / "data")
    return {"data": dataset, "model": _train(cli, dataset, folder), "dir": folder}


def _test_images(dataset) -> list[Path]:
    data = json.loads(Path(dataset.test).read_text())
    return [Path(dataset.images_root) / im["file_name"] for im in data["images"]]


def _forced_answers(model: Path, rank: str, n: int = 12) -> pd.DataFrame:
    """Back-off rows of ``model`` with every rank below ``rank`` refused and ``rank``
    accepted (thresholds +inf / -inf), on random embeddings."""
    bundle = ModelBundle.load(model)
    ranks = bundle.taxonomy.ranks
    th = bundle.scorer.thresholds.thresholds
    for r in ranks:
        th[r] = math.inf if ranks.index(r) > ranks.index(rank) else -math.inf
    x = np.random.default_rng(0).normal(size=(n, bundle.head.in_features)).astype(np.float32)
    frame, _ = bundle.predict_with_backoff(x)
    return frame


# ------------------------------------------------------------------ three ranks (no genus)
def test_three_rank_predictions_have_the_model_ranks_and_no_genus(three, cli, tmp_path):
    out = tmp_path / "pred"
    cli("predict", "--model", three["model"], *_test_images(three["data"])[:8], "--out", out)
    frame = pd.read_csv(out / "predictions.csv")
    assert {"order", "family", "species", "order_prob", "family_prob", "species_prob"} <= set(
        frame.columns)
    assert not [c for c in frame.columns if c.startswith("genus")]
    assert len(frame) == 8
    assert set(frame["taxon_rank"]) <= {"order", "family", "species", "unknown"}
    for rank in ("order", "family", "species"):
        rows = frame[frame["taxon_rank"] == rank]
        assert (rows["taxon"] == rows[rank]).all(), rows  # no "sp." suffix without a genus


def test_a_family_answer_is_the_family_name_at_family_rank(three):
    frame = _forced_answers(three["model"], "family")
    tax = ModelBundle.load(three["model"]).taxonomy
    assert set(frame["taxon_rank"]) == {"family"}
    assert set(frame["taxon"]) <= set(tax.names("family"))  # "Fagaceae", not "Fagaceae sp."
    assert (frame["taxon"] == frame["family"]).all()
    assert frame["reason"].str.startswith("backoff_to_family:").all()


def test_three_rank_plot_report_darwin_core(three, cli, fixture_set, tmp_path):
    plots = sorted(Path(fixture_set["plots"]).glob("*.jpg"))[:2]
    out = tmp_path / "rep"
    cli("plot-report", "--model", three["model"], "--grid", "2", *plots, "--out", out)
    dwc = pd.read_csv(out / "occurrences_dwc.csv", dtype=str, keep_default_na=False)
    assert list(dwc.columns) == dwc_columns(["order", "family", "species"])
    assert "genus" not in dwc.columns and {"order", "family"} <= set(dwc.columns)
    assert len(dwc) >= 1
    assert set(dwc["taxonRank"]) <= {"order", "family", "species"}
    for rank in ("order", "family"):
        rows = dwc[dwc["taxonRank"] == rank]
        assert (rows["scientificName"] == rows[rank]).all()
    records = pd.read_csv(out / "plot_records.csv")
    assert set(records["taxon_rank"]) <= {"order", "family", "species", "unknown"}
    # the ranks end at species, but a user-trained model has no PlantCLEF ids: names file
    assert (out / "plantclef_submission_names.csv").is_file()
    assert not (out / "plantclef_submission.csv").exists()


def test_darwin_core_of_a_family_only_fish_and_an_order_answer():
    tax = Taxonomy.from_records([
        {"order": "Perciformes", "family": "Scaridae", "species": "Scarus ghobban"},
        {"order": "Perciformes", "family": "Labridae", "species": "Labrus bergylta"},
        {"order": "Tetraodontiformes", "family": "Balistidae", "species": ""},
    ], ranks=("order", "family", "species"))
    records = {"frame-1": [
        PlotRecord("frame-1", "family", tax.label(("Perciformes", "Scaridae")), 0.8, 3, "max",
                   ("Perciformes", "Scaridae")),
        PlotRecord("frame-1", "order", "Tetraodontiformes", 0.7, 1, "max",
                   ("Tetraodontiformes",)),
        PlotRecord("frame-1", "species", "Labrus bergylta", 0.9, 2, "max",
                   ("Perciformes", "Labridae", "Labrus bergylta")),
    ]}
    dwc = darwin_core_frame(records, tax, photos={"frame-1": "f1.jpg"}, identified_by="t")
    assert records["frame-1"][0].taxon == "Scaridae"
    assert dwc[["scientificName", "taxonRank", "order", "family",
                "identificationQualifier"]].values.tolist() == [
        ["Scaridae", "family", "Perciformes", "Scaridae", ""],
        ["Tetraodontiformes", "order", "Tetraodontiformes", "", ""],
        ["Labrus bergylta", "species", "Perciformes", "Labridae", ""]]
    assert "genus" not in dwc.columns


def test_five_ranks_fill_kingdom_and_a_rank_list_without_species_has_no_plantclef_file():
    ranks = ("kingdom", "class", "order", "family", "genus")
    tax = Taxonomy.from_records([{"kingdom": "Animalia", "class": "Insecta", "order": "Diptera",
                                  "family": "Syrphidae", "genus": "Eristalis"}], ranks=ranks)
    node = ("Animalia", "Insecta", "Diptera", "Syrphidae", "Eristalis")
    recs = {"p": [PlotRecord("p", "genus", tax.label(node), 0.9, 1, "max", node)]}
    dwc = darwin_core_frame(recs, tax, photos={}, identified_by="t")
    row = dwc.iloc[0]
    assert (row["scientificName"], row["taxonRank"], row["kingdom"], row["class"],
            row["genus"]) == ("Eristalis", "genus", "Animalia", "Insecta", "Eristalis")
    assert (row["occurrenceStatus"], row["identificationVerificationStatus"]) == (
        "present", "unverified")
    assert resolve_thresholds("argmax_union", ranks, None) == {
        "kingdom": 0.5, "class": 0.5, "order": 0.5, "family": 0.5, "genus": 0.0}
    with pytest.raises(ConfigError, match="species"):
        plantclef_submission_frame(recs, tax)
    # a threshold for a rank the model lacks is an error that names the model's ranks
    with pytest.raises(ConfigError, match="species.*lacks.*kingdom, class"):
        resolve_thresholds("max", ranks, {"species": 0.4})


# ------------------------------------------------------------------ four ranks
def test_four_rank_genus_answer_is_written_genus_sp(four):
    frame = _forced_answers(four["model"], "genus")
    assert set(frame["taxon_rank"]) == {"genus"}
    assert (frame["taxon"] == frame["genus"] + " sp.").all()  # "Quercus sp." as before


def test_four_rank_plot_report_writes_records_per_rank(four, cli, fixture_set, tmp_path):
    plots = sorted(Path(fixture_set["plots"]).glob("*.jpg"))[:2]
    out = tmp_path / "rep"
    # species can never pass (threshold 1.1): every find is at genus rank or above
    cli("plot-report", "--model", four["model"], "--grid", "2", "--rule", "max",
        "--threshold", "species=1.1", "--threshold", "genus=0.3", *plots, "--out", out)
    records = pd.read_csv(out / "plot_records.csv")
    ranks = set(records["taxon_rank"]) - {"unknown"}
    assert ranks and ranks <= {"order", "family", "genus"}
    genus = records[records["taxon_rank"] == "genus"]
    assert genus["taxon"].str.endswith(" sp.").all()
    dwc = pd.read_csv(out / "occurrences_dwc.csv", dtype=str, keep_default_na=False)
    assert {"order", "family", "genus"} <= set(dwc.columns)
    assert sorted(dwc["taxonRank"]) == sorted(records.loc[records["taxon_rank"] != "unknown",
                                                          "taxon_rank"])
    for rank in ("order", "family", "genus"):
        rows = dwc[dwc["taxonRank"] == rank]
        assert (rows["scientificName"] == rows[rank]).all()
    assert (dwc.loc[dwc["taxonRank"] == "genus", "identificationQualifier"] == "sp.").all()
    settings = json.loads((out / "plot_records.json").read_text())["settings"]["thresholds"]
    assert set(settings) == {"order", "family", "genus", "species"}
    html = (out / "report.html").read_text()
    for _, row in records[records["taxon_rank"] != "unknown"].iterrows():
        assert f"<tr><td>{row['taxon_rank']}</td>" in html and row["taxon"] in html


def test_five_rank_model_predicts_and_reports_every_rank(cli, fixture_set, tmp_path):
    dataset = five_rank_set(tmp_path / "data")
    model = _train(cli, dataset, tmp_path)
    ranks = ["class", "order", "family", "genus", "species"]
    assert list(ModelBundle.load(model).taxonomy.ranks) == ranks
    cli("predict", "--model", model, *_test_images(dataset)[:4], "--out", tmp_path / "pred")
    frame = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert set(ranks) <= set(frame.columns)
    assert set(frame["taxon_rank"]) <= {*ranks, "unknown"}
    plots = sorted(Path(fixture_set["plots"]).glob("*.jpg"))[:1]
    cli("plot-report", "--model", model, "--grid", "2", *plots, "--out", tmp_path / "rep")
    dwc = pd.read_csv(tmp_path / "rep" / "occurrences_dwc.csv", dtype=str,
                      keep_default_na=False)
    assert list(dwc.columns) == dwc_columns(ranks)
    assert [c for c in dwc.columns if c in ranks] == ranks[:-1]  # Darwin Core order
    for _, row in dwc.iterrows():
        assert row["taxonRank"] in ranks and row[ranks[0]] != ""  # class filled from the path


def test_four_rank_flag_unknowns_resolves_at_the_model_ranks(four, cli, tmp_path):
    out = tmp_path / "flags"
    text = cli("flag-unknowns", "--model", four["model"], *_test_images(four["data"])[:6],
               "--out", out)
    flags = pd.read_csv(out / "flags.csv")
    assert {"order", "family", "genus", "species", "flagged"} <= set(flags.columns)
    summary = json.loads((out / "flags_summary.json").read_text())
    assert summary["n_images"] == 6
    assert set(summary["resolved_at"]) <= {"order", "family", "genus", "species", "unknown"}
    assert (flags["flagged"] == (flags["reason"] != "species")).all()
    assert "embeddings:" in text


# ------------------------------------------------------------------ one growing store
def _count_forward_passes(monkeypatch) -> list[int]:
    """Images that go through the backbone, counted at the store's one embedding loop."""
    import taxoclass.features.store as store

    seen: list[int] = []
    real = store.embed_batches

    def counting(paths, backbone, batches, **kwargs):
        for ok_idx, feats, bad in real(paths, backbone, batches, **kwargs):
            seen.append(len(ok_idx) + len(bad))
            yield ok_idx, feats, bad

    monkeypatch.setattr(store, "embed_batches", counting)
    return seen


def _embedding_line(text: str) -> tuple[int, int]:
    found = re.search(r"embeddings: (\d+) computed, (\d+) reused", text)
    assert found, text
    return int(found.group(1)), int(found.group(2))


def test_one_store_grows_by_the_missing_images_only(three, cli, monkeypatch, tmp_path):
    """Train on one file; evaluate, predict and flag-unknowns on others that share images:
    only the images the training store lacks go through the backbone."""
    data = three["data"]
    train = json.loads(Path(data.train).read_text())
    root = tmp_path / "other"
    root.mkdir()
    images = []
    for k, im in enumerate(train["images"][:8]):
        src = Path(data.images_root) / im["file_name"]
        dst = root / f"{k}.jpg"
        if k < 4:
            shutil.copyfile(src, dst)  # same bytes as a training image: reused
        else:  # new bytes: must be embedded
            ImageOps.mirror(Image.open(src).convert("RGB")).save(dst, quality=95)
        images.append({**im, "file_name": dst.name})
    ids = {im["image_id"] for im in images}
    other = {**train, "images": images,
             "annotations": [a for a in train["annotations"] if a["image_id"] in ids]}
    (root / "other.json").write_text(json.dumps(other))

    seen = _count_forward_passes(monkeypatch)
    cli("evaluate", "--model", three["model"], "--annotations", root / "other.json",
        "--images-root", root, "--split", "all", "--out", tmp_path / "eval")
    assert sum(seen) == 4  # the 4 mirrored images; the 4 copies were in the training store

    extra = tmp_path / "new.jpg"
    ImageOps.flip(Image.open(root / "4.jpg")).save(extra, quality=95)
    seen.clear()
    text = cli("predict", "--model", three["model"], root, extra, "--out", tmp_path / "pred")
    assert sum(seen) == 1 and _embedding_line(text) == (1, 8)
    assert str(three["dir"] / "emb") in text  # the training store, shared

    seen.clear()
    text = cli("flag-unknowns", "--model", three["model"], root, extra,
               "--out", tmp_path / "flags")
    assert sum(seen) == 0 and _embedding_line(text) == (0, 9)
    assert not (tmp_path / "flags" / "embeddings").exists()

    own = tmp_path / "own-cache"  # --cache: another store, filled from nothing
    seen.clear()
    text = cli("predict", "--model", three["model"], extra, "--cache", own)
    assert sum(seen) == 1 and _embedding_line(text) == (1, 0) and str(own) in text


def test_plot_truth_at_any_rank_is_scored_at_its_rank():
    from taxoclass.plots.calibration import check_plot_truth
    from taxoclass.plots.evaluation import evaluate_plots, truth_path

    tax = Taxonomy.from_records([
        {"order": "Perciformes", "family": "Scaridae", "species": "Scarus ghobban"},
        {"order": "Perciformes", "family": "Labridae", "species": "Labrus bergylta"},
    ], ranks=("order", "family", "species"))
    assert truth_path("Scaridae", tax) == ("Perciformes", "Scaridae")
    assert truth_path("Scarus ghobban", tax) == ("Perciformes", "Scaridae", "Scarus ghobban")
    # a name the model never saw: a path of its own, no genus slot to guess into
    assert truth_path("Sparus aurata", tax) == ("?Sparus aurata", "?Sparus aurata",
                                                "Sparus aurata")
    node = ("Perciformes", "Scaridae")
    pred = {"f1": [PlotRecord("f1", "family", "Scaridae", 0.9, 2, "max", node)]}
    scores = evaluate_plots(pred, {"f1": ["Scaridae"]}, tax)
    assert scores["family"]["micro_f1"] == 1.0 and scores["order"]["micro_f1"] == 1.0
    assert scores["species"]["n_taxa"] == 0  # nothing to score at species rank
    check_plot_truth({"f1": ["Scaridae", "Labrus bergylta"]}, ["f1.jpg"], tax)
    with pytest.raises(Exception, match="Scaridea"):
        check_plot_truth({"f1": ["Scaridea"]}, ["f1.jpg"], tax)


def test_evaluate_plots_takes_the_ranks_of_an_annotations_file(four, cli, fixture_set,
                                                                tmp_path):
    plots = sorted(Path(fixture_set["plots"]).glob("*.jpg"))
    cli("plot-report", "--model", four["model"], "--grid", "2", *plots, "--out", tmp_path / "r")
    truth = tmp_path / "truth.csv"  # names at any rank: a family, an order, a species
    truth.write_text("plot_id,taxon\nplot_1,Sapindaceae\nplot_2,Fagales\nplot_3,Acer campestre\n")
    cli("evaluate-plots", "--records", tmp_path / "r" / "plot_records.csv", "--truth", truth,
        "--taxonomy", four["data"].train, "--out", tmp_path / "m")
    metrics = json.loads((tmp_path / "m" / "plot_metrics.json").read_text())
    assert {"order", "family", "genus", "species"} <= set(metrics)
    # plot_2's truth is an order only: it adds a true taxon at order rank, none below
    assert metrics["order"]["n_plots"] == 3
    per_plot = pd.read_csv(tmp_path / "m" / "plot_metrics_per_plot.csv")
    assert list(per_plot.columns) == ["plot_id", "order_f1", "family_f1", "genus_f1",
                                      "species_f1"]
