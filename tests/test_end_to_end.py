"""End to end through the CLI on the tiny shipped fixtures (tests/fixtures), no ../shared.

validate → embed → train → evaluate → predict → flag-unknowns, then plot-report,
calibrate-plots and evaluate-plots on the fixture plot photos. The fixture species differ
by colour and their genera by shape, so a tiny random backbone separates them: the
assertions are quality floors that random guessing (1/6 at species) fails.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from taxoclass.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

RANKS = ("family", "genus", "species")


def _truth_by_file(annotations) -> dict[str, str]:
    """File name → binomial of every labelled image of an annotation file."""
    data = json.loads(annotations.read_text())
    name = {c["category_id"]: f"{c['genus']} {c['species']}" for c in data["categories"]}
    files = {im["image_id"]: im["file_name"].rsplit("/", 1)[-1] for im in data["images"]}
    return {files[a["image_id"]]: name[a["category_id"]] for a in data["annotations"]}


def _paths(model) -> set[tuple[str, ...]]:
    return {tuple(p) for p in json.loads((model / "taxonomy.json").read_text())["nodes"]}


@pytest.fixture(scope="module")
def predicted(fixture_set, fixture_model, cli, tmp_path_factory):
    """`predict` on the fixture test images folder: (frame with a ``truth`` column, folder)."""
    out = tmp_path_factory.mktemp("predict")
    cli("predict", "--model", fixture_model["model"], fixture_set["images"] / "test",
        "--out", out)
    frame = pd.read_csv(out / "predictions.csv")
    truth = _truth_by_file(fixture_set["test"])
    frame["truth"] = [truth[p.rsplit("/", 1)[-1]] for p in frame["image"]]
    return frame, out


@pytest.fixture(scope="module")
def calibrated(fixture_set, fixture_model, cli, tmp_path_factory):
    """`calibrate-plots` on the fixture plots, then `plot-report --settings` with its file."""
    tmp = tmp_path_factory.mktemp("plots")
    f, model = fixture_set, fixture_model["model"]
    cal_out = cli("calibrate-plots", "--model", model, f["plots"], "--truth", f["truth"],
                  "--out", tmp / "cal", "--device", "cpu")
    cli("plot-report", "--model", model, f["plots"], "--settings",
        tmp / "cal" / "plot_settings.json", "--out", tmp / "report", "--device", "cpu")
    return {"dir": tmp, "cal": tmp / "cal", "report": tmp / "report", "output": cal_out}


def test_validate_fixture_files_and_a_broken_copy(fixture_set, tmp_path):
    runner = CliRunner()
    for name in ("train", "test"):
        res = runner.invoke(main, ["validate", str(fixture_set[name]),
                                   "--images-root", str(fixture_set["dir"])])
        assert res.exit_code == 0, res.output
        assert "2 family taxa, 3 genus taxa, 6 species taxa" in res.output
    data = json.loads(fixture_set["train"].read_text())
    data["categories"][0]["family"] = "Fagaceae"  # Acer now in two families
    data["images"][1]["file_name"] = "images/train/missing.jpg"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    report = tmp_path / "problems.csv"
    res = runner.invoke(main, ["validate", str(broken), "--images-root", str(fixture_set["dir"]),
                               "--report", str(report)])
    assert res.exit_code == 1 and "FAILED" in res.output
    problems = pd.read_csv(report)
    assert (problems["severity"] == "error").sum() >= 1  # Acer in two families: a warning
    assert problems["found"].str.contains("missing.jpg").any()
    assert problems.apply(lambda r: "Acer" in f"{r['record']} {r['found']}", axis=1).any()


def test_embed_writes_a_resumable_cache(fixture_set, fixture_model, cli):
    emb = fixture_model["emb"]
    assert "60 embeddings of dim 64" in fixture_model["embed_output"]
    assert "60 computed, 0 reused" in fixture_model["embed_output"]
    prov = json.loads((emb / "provenance.json").read_text())
    assert prov["backbone"]["name"] == fixture_set["arch"]
    assert prov["backbone"]["checkpoint_sha256"] and "taxoclass embed" in prov["command"]
    f = fixture_set
    again = cli("embed", "--annotations", f["train"], "--images-root", f["dir"],
                "--backbone", f["arch"], "--checkpoint", f["ckpt"],
                "--model-kwargs", json.dumps(f["kwargs"]), "--batch-size", 16, "--out", emb)
    assert "0 computed, 60 reused" in again  # nothing is embedded twice


def test_embed_records_a_corrupt_image_and_carries_on(fixture_set, cli, tmp_path):
    data = json.loads(fixture_set["test"].read_text())
    data["images"] = data["images"][:3] + [{"image_id": 999, "file_name": "broken.jpg"}]
    data["annotations"] = data["annotations"][:3] + [dict(data["annotations"][0], image_id=999)]
    (tmp_path / "images" / "test").mkdir(parents=True)
    for im in data["images"][:3]:
        shutil.copy(fixture_set["dir"] / im["file_name"], tmp_path / im["file_name"])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 8)
    (tmp_path / "ann.json").write_text(json.dumps(data))
    f = fixture_set
    out = cli("embed", "--annotations", tmp_path / "ann.json", "--backbone", f["arch"],
              "--checkpoint", f["ckpt"], "--model-kwargs", json.dumps(f["kwargs"]),
              "--out", tmp_path / "emb")
    assert "3 embeddings of dim 64" in out
    failures = pd.read_csv(tmp_path / "emb" / "failures.csv")
    assert failures["image_id"].astype(str).tolist() == ["999"]
    assert "cannot be decoded" in failures["error"].item()


def test_taxonomy_counts_and_csv(fixture_set, cli, tmp_path):
    out = cli("taxonomy", fixture_set["train"], "--csv", tmp_path / "tree.csv")
    assert [line.split() for line in out.splitlines()[:3]] == [
        ["family:", "2"], ["genus:", "3"], ["species:", "6"]]
    tree = pd.read_csv(tmp_path / "tree.csv")
    assert tree["rank"].value_counts().to_dict() == {"species": 6, "genus": 3, "family": 2}


def test_train_writes_a_bundle_that_learned_the_fixture_species(fixture_model):
    model = fixture_model["model"]
    for name in ("bundle.json", "heads.safetensors", "taxonomy.json", "labels.json",
                 "config.yaml", "history.csv", "split.csv", "metrics_val.json",
                 "provenance.json", "openset.json", "openset.npz"):
        assert (model / name).is_file(), name
    history = pd.read_csv(model / "history.csv")
    assert len(history) == 60  # train.yaml: 60 epochs, no early stopping
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    split = pd.read_csv(model / "split.csv")
    assert (split["split"] == "val").sum() == 18  # 30% of 10 images of each of 6 species
    val = json.loads((model / "metrics_val.json").read_text())
    # The default loss (hxe) trains the species head only: no heads' arg-max to compare,
    # so no coherence column (loss.kind dependency writes one: test_metrics, test_recipes).
    assert "coherence_rate" not in val
    from taxoclass.io.provenance import model_id_of  # the header names the bundle written
    parts = json.loads((model / "bundle.json").read_text())["parts"]
    assert val["header"]["model_id"] == model_id_of(parts)
    assert val["ranks"]["species"]["accuracy"] >= 0.7
    assert val["ranks"]["genus"]["accuracy"] >= 0.8
    labels = json.loads((model / "labels.json").read_text())
    assert len(labels["species"]) == 6 and len(labels["family"]) == 2


def test_evaluate_scores_the_validation_split(fixture_set, fixture_model, cli, tmp_path):
    out = tmp_path / "eval"
    cli("evaluate", "--model", fixture_model["model"], "--annotations", fixture_set["train"],
        "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["n_images"] == 18
    assert set(metrics["ranks"]) == set(RANKS) and "coherence_rate" not in metrics
    assert metrics["ranks"]["species"]["accuracy"] >= 0.7
    val = json.loads((fixture_model["model"] / "metrics_val.json").read_text())
    assert metrics["ranks"]["species"]["accuracy"] == pytest.approx(
        val["ranks"]["species"]["accuracy"])  # the same images, the same answer
    assert {"confusion.csv", "predictions.csv", "provenance.json"} <= {
        p.name for p in out.iterdir()}


def test_evaluate_on_a_separate_test_file(fixture_set, fixture_model, cli, tmp_path):
    """Another annotation file's images are embedded into the model's (writable) training
    store beside the training vectors; the training request's files are left as they were."""
    out = tmp_path / "eval"
    cli("evaluate", "--model", fixture_model["model"], "--annotations", fixture_set["test"],
        "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 24 and metrics.get("coherence_rate", 1) <= 1
    assert metrics["ranks"]["species"]["accuracy"] >= 0.7  # chance: 1/6
    assert metrics["ranks"]["genus"]["accuracy"] >= 0.85  # chance: 1/3
    # the training request's embeddings.npy / image_ids.npy still list the 60 training images
    assert len(np.load(fixture_model["emb"] / "image_ids.npy", allow_pickle=False)) == 60


def test_openset_evaluation_places_a_held_out_species_in_its_genus(fixture_set, fixture_model,
                                                                   cli, tmp_path):
    """evaluate --holdout-species: the recipe retrains without Acer platanoides; its images
    are told apart from known species and land on the Acer path, never on a species."""
    cli("evaluate", "--model", fixture_model["model"], "--annotations", fixture_set["train"],
        "--holdout-species", "Acer platanoides", "--out", tmp_path / "openset")
    metrics = json.loads((tmp_path / "openset" / "openset_metrics.json").read_text())
    assert metrics["header"]["tool"] == "taxoclass" and metrics["header"]["model_id"]
    assert metrics["held_out_species"] == ["Acer platanoides"]
    assert metrics["n_test_held_out"] == 10  # every image of the held-out species
    assert metrics["held_out_right_genus_on_path"] >= 0.8
    assert metrics["outcomes"]["unknown_named_species"] == 0.0
    assert metrics["known_test_accuracy"]["species"] >= 0.6
    detection = pd.read_csv(tmp_path / "openset" / "openset_detection.csv")
    detection = detection.set_index("method")["auroc"]
    assert detection["pyod mahalanobis (global)"] >= 0.8  # chance: 0.5


def test_predict_names_test_images_on_coherent_paths(fixture_model, predicted):
    frame, out = predicted
    assert len(frame) == 24 and (out / "predictions.json").is_file()
    assert (frame["species"] == frame["truth"]).mean() >= 0.7  # chance: 1/6
    genus_truth = frame["truth"].str.split().str[0]
    assert (frame["genus"] == genus_truth).mean() >= 0.85  # chance: 1/3
    paths = _paths(fixture_model["model"])
    for row in frame.itertuples():
        assert (row.family, row.genus, row.species) in paths
        assert row.species_prob <= row.genus_prob + 1e-6 <= row.family_prob + 2e-6
    assert frame["species_top5"].str.split(";").map(len).eq(5).all()
    # a backed-off answer names the taxon of the rank it backs off to
    backed = frame[frame["taxon_rank"] == "genus"]
    assert (backed["taxon"] == backed["genus"] + " sp.").all()


def test_flag_unknowns_flags_the_unseen_species(fixture_set, fixture_model, cli, tmp_path):
    cli("flag-unknowns", "--model", fixture_model["model"], fixture_set["unknown"],
        fixture_set["images"] / "test", "--out", tmp_path)
    flags = pd.read_csv(tmp_path / "flags.csv")
    assert len(flags) == 30 and flags["flagged"].is_monotonic_decreasing  # flagged first
    unseen = flags["image"].str.contains("/unknown/")
    assert unseen.sum() == 6
    assert flags.loc[unseen, "flagged"].mean() >= 0.8
    assert flags.loc[~unseen, "flagged"].mean() <= 0.4
    # Acer rubrum is never named as one of the known species
    assert not (flags.loc[unseen, "taxon_rank"] == "species").any()
    summary = json.loads((tmp_path / "flags_summary.json").read_text())
    assert summary["n_images"] == 30 and summary["n_flagged"] == int(flags["flagged"].sum())
    assert sum(summary["resolved_at"].values()) == 30


def _records_vs_truth(records: pd.DataFrame, truth: pd.DataFrame) -> tuple[float, float]:
    """(share of true species listed, share of absent fixture species listed), over plots."""
    species = sorted(set(truth["species"]))
    hit = miss = n_true = n_absent = 0
    for plot, rows in truth.groupby("plot_id"):
        listed = set(records.loc[(records["plot_id"] == plot)
                                 & (records["taxon_rank"] == "species"), "taxon"])
        present = set(rows["species"])
        hit += len(listed & present)
        miss += len(listed - present)
        n_true += len(present)
        n_absent += len(set(species) - present)
    return hit / n_true, miss / max(n_absent, 1)


def test_plot_report_lists_the_species_of_each_plot(fixture_set, fixture_model, cli, tmp_path):
    out = cli("plot-report", "--model", fixture_model["model"], fixture_set["plots"],
              "--grid", 4, "--out", tmp_path, "--device", "cpu")
    assert "plot_1:" in out
    for name in ("plot_records.csv", "plot_records.json", "report.html",
                 "plantclef_submission_names.csv", "occurrences_dwc.csv",
                 "occurrences_dwca.zip", "failures.csv", "provenance.json"):
        assert (tmp_path / name).is_file(), name
    records = pd.read_csv(tmp_path / "plot_records.csv")
    assert list(records.columns[:5]) == ["plot_id", "taxon_rank", "taxon", "confidence",
                                         "score"]
    assert set(records["plot_id"]) == {"plot_1", "plot_2", "plot_3"}
    truth = pd.read_csv(fixture_set["truth"])
    listed, absent = _records_vs_truth(records, truth)
    assert listed >= 0.6 and absent <= 0.2 and listed > absent
    # a user-trained model has no PlantCLEF species ids: names go to another file
    assert not (tmp_path / "plantclef_submission.csv").exists()
    assert "plantclef_submission_names.csv" in out
    sub = pd.read_csv(tmp_path / "plantclef_submission_names.csv", sep=";")
    assert list(sub.columns) == ["plot_id", "species_ids"] and len(sub) == 3
    dwc = pd.read_csv(tmp_path / "occurrences_dwc.csv")
    assert set(dwc["basisOfRecord"]) == {"MachineObservation"}
    assert set(dwc.loc[dwc["taxonRank"] == "species", "scientificName"]) <= set(truth["species"])
    assert "plot_1.jpg" in (tmp_path / "report.html").read_text()


def test_calibrate_plots_chooses_a_rule_and_plot_report_uses_it(fixture_set, calibrated):
    settings = json.loads((calibrated["cal"] / "plot_settings.json").read_text())
    table = pd.read_csv(calibrated["cal"] / "plot_calibration.csv")
    assert table["chosen"].sum() == 1
    chosen = table.loc[table["chosen"], "rule"].item()
    assert "chosen rule: " + chosen in calibrated["output"]
    assert settings["rule"] == chosen and settings["grids"] == ["2x2", "4x4"]
    assert table.loc[table["chosen"], "species_f1"].item() == table["species_f1"].max()
    assert table["species_f1"].max() >= 0.6
    records = pd.read_csv(calibrated["report"] / "plot_records.csv")
    report_cfg = yaml.safe_load((calibrated["report"] / "config.yaml").read_text())
    assert report_cfg["rule"] == chosen  # plot-report --settings applied the chosen rule
    assert report_cfg["settings_file"].endswith("plot_settings.json")
    listed, absent = _records_vs_truth(records, pd.read_csv(fixture_set["truth"]))
    assert listed >= 0.6 and listed > absent


def test_evaluate_plots_scores_the_report(fixture_set, fixture_model, calibrated, cli, tmp_path):
    cli("evaluate-plots", "--records", calibrated["report"] / "plot_records.csv",
        "--truth", fixture_set["truth"], "--taxonomy", fixture_model["model"], "--out", tmp_path)
    metrics = json.loads((tmp_path / "plot_metrics.json").read_text())
    assert set(metrics) >= set(RANKS)
    assert all(metrics[r]["n_plots"] == 3 for r in RANKS)
    assert metrics["species"]["macro_f1_per_plot"] >= 0.6  # chance lists score far lower
    assert metrics["family"]["macro_f1_per_plot"] >= metrics["species"]["macro_f1_per_plot"]
    per_plot = pd.read_csv(tmp_path / "plot_metrics_per_plot.csv")
    assert list(per_plot.columns) == ["plot_id", "family_f1", "genus_f1", "species_f1"]
    assert per_plot["species_f1"].mean() == pytest.approx(metrics["species"]["macro_f1_per_plot"])


def test_train_config_is_recorded_with_the_bundle(fixture_set, fixture_model):
    cfg = yaml.safe_load((fixture_model["model"] / "config.yaml").read_text())
    assert cfg["backbone"]["model_kwargs"] == fixture_set["kwargs"]
    assert cfg["train"]["epochs"] == 60 and cfg["out"] == str(fixture_model["model"])


def test_fixture_generator_rebuilds_the_shipped_files(fixture_set, tmp_path):
    """tests/fixtures/make_fixtures.py (seeded) writes what is committed: text files byte for
    byte, images pixel for pixel (up to JPEG decoder rounding), the same checkpoint."""
    import importlib.util

    import torch
    from PIL import Image

    here = fixture_set["dir"]
    spec = importlib.util.spec_from_file_location("make_fixtures", here / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    shipped = sorted(p.relative_to(here) for p in here.rglob("*") if p.is_file()
                     and p.suffix not in (".py", ".pyc")
                     and p.relative_to(here).parts[0] != "dwc")  # standards, not generated
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == shipped
    for rel in shipped:
        if rel.suffix in (".json", ".csv", ".yaml"):
            assert (tmp_path / rel).read_bytes() == (here / rel).read_bytes(), rel
        elif rel.suffix == ".jpg":
            a = np.asarray(Image.open(here / rel), dtype=float)
            b = np.asarray(Image.open(tmp_path / rel), dtype=float)
            assert a.shape == b.shape and np.abs(a - b).mean() < 1.0, rel
    old, new = (torch.load(d / "tiny_dinov2.pth", weights_only=True) for d in (here, tmp_path))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_plot_settings_json_carries_the_output_header(calibrated, fixture_model):
    """calibrate-plots' plot_settings.json has the one JSON header, naming the model it was
    calibrated with (the same id as predictions), and plot-report still reads it."""
    from taxoclass.io.provenance import HEADER_FIELDS, model_id_for
    from taxoclass.pipelines.classifier import TaxonClassifier

    doc = json.loads((calibrated["cal"] / "plot_settings.json").read_text())
    assert list(doc)[0] == "header" and tuple(doc["header"])[:5] == HEADER_FIELDS
    assert doc["header"]["command"].startswith("taxoclass calibrate-plots ")
    model_id = model_id_for(TaxonClassifier.load(fixture_model["model"]))
    assert doc["header"]["model_id"] == doc["provenance"]["model_id"] == model_id
    assert (calibrated["report"] / "plot_records.csv").is_file()
