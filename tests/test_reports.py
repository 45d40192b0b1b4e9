"""plot_report end to end: real leaf photos, a real (tiny) bundle classifier, every output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
import torch

from taxoclass import __version__
from taxoclass.plots.report import OUTPUT_FILES, plantclef_submission_frame, plot_report
from taxoclass.plots.rules import PlotRecord
from taxoclass.plots.tiling import BundleTileClassifier
from taxoclass.taxonomy.tree import Taxonomy

torch.set_num_threads(1)

SCHEMA = Path(__file__).resolve().parents[1] / "data_schemas" / "plot_report.schema.json"
TAX = Taxonomy.from_records([
    {"family": "Cyperaceae", "genus": "Carex", "species": "nigra"},
    {"family": "Cyperaceae", "genus": "Carex", "species": "flacca"},
    {"family": "Juncaceae", "genus": "Juncus", "species": "effusus"},
    {"family": "Poaceae", "genus": "Poa", "species": "annua"},
])


@pytest.fixture(scope="module")
def classifier(make_tile_classifier) -> BundleTileClassifier:
    """A tiny DINOv2-shaped backbone and a rank head trained for a few steps."""
    return make_tile_classifier(TAX, n=64, steps=20, batch_size=5, random_labels=True)


def low_confidence(decoded) -> np.ndarray:
    """Flag the least confident tile of each plot as unknown (a real decision on real output)."""
    top = decoded.probs["family"].max(axis=1)
    return top <= np.sort(top)[0]


def test_plot_report_writes_every_output(classifier, leaf_image_paths, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    photos = [leaf_image_paths[0], bad, leaf_image_paths[1]]
    calls = []
    out = tmp_path / "report"
    res = plot_report(classifier, photos, out, grids=(2, 3), overlap=0.2, rule="max",
                      thresholds={"species": 0.3, "genus": 0.4, "family": 0.5},
                      flag_unknown=low_confidence, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    for key, name in [*OUTPUT_FILES.items(), ("provenance", "provenance.json")]:
        assert (out / name).is_file() == (key != "plantclef"), name
    ids = [leaf_image_paths[0].stem, leaf_image_paths[1].stem]
    assert list(res.records) == ids

    # failures: the corrupt photo, and only it
    fails = pd.read_csv(out / "failures.csv")
    assert fails["photo"].tolist() == [str(bad)]
    assert "cannot be decoded" in fails["error"][0]

    # JSON validates against the schema and agrees with the CSV
    doc = json.loads((out / "plot_records.json").read_text())
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    assert [p["plot_id"] for p in doc["plots"]] == ids
    assert all(p["n_tiles"] == 4 + 9 for p in doc["plots"])
    csv = pd.read_csv(out / "plot_records.csv")
    assert list(csv.columns) == ["plot_id", "taxon_rank", "taxon", "confidence", "score",
                                 "n_tiles", "reason", "rule", "tile_share"]
    assert len(csv) == sum(len(p["records"]) for p in doc["plots"])
    for recs in res.records.values():
        unknown = [r for r in recs if r.taxon_rank == "unknown"]
        assert len(unknown) == 1 and unknown[0].n_tiles >= 1
        assert unknown[0].reason.startswith("unknown:")
        nodes = [r.node for r in recs if r.node]
        assert not any(a != b and b[: len(a)] == a for a in nodes for b in nodes)

    # HTML: self-contained, one embedded JPEG per readable plot, legend and taxa lists
    page = (out / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2
    assert "src='http" not in page and 'src="http' not in page and "<link" not in page
    assert "Legend" in page and "Taxa by rank" in page and "corrupt.jpg" in page
    assert "unknown" in page

    # PlantCLEF 2024 layout and Darwin Core occurrences. A user-trained model has no
    # PlantCLEF species ids: the rows (names) go to a names file, never the run file.
    assert res.files["plantclef"] == out / "plantclef_submission_names.csv"
    sub = (out / "plantclef_submission_names.csv").read_text().splitlines()
    assert sub[0] == "plot_id;species_ids" and len(sub) == 3
    assert all(line.split(";")[1].startswith("[") for line in sub[1:])
    dwc = pd.read_csv(out / "occurrences_dwc.csv", keep_default_na=False, dtype=str)
    assert set(dwc["basisOfRecord"]) <= {"MachineObservation"}
    n_taxa = sum(1 for recs in res.records.values() for r in recs if r.taxon_rank != "unknown")
    assert len(dwc) == n_taxa
    if n_taxa:
        # the model (its id), not the backbone; no local paths (issue 16)
        assert re.fullmatch(rf"taxoclass {re.escape(__version__)} model [0-9a-f]{{16}}",
                            dwc["identifiedBy"][0])
        assert set(dwc["eventID"]) <= set(ids)
        genus_rows = dwc[dwc["taxonRank"] == "genus"]
        assert (genus_rows["identificationQualifier"] == "sp.").all()
        assert set(dwc["associatedMedia"]) == {""}
        assert any(f"photo={p.name}" in dwc["identificationRemarks"][0]
                   for p in leaf_image_paths[:2])
        assert set(dwc["occurrenceStatus"]) == {"present"}
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["n_failures"] == 1 and prov["config"]["rule"] == "max"


def test_every_rule_runs_and_argmax_union_names_species(classifier, leaf_image_paths, tmp_path):
    for rule in ("argmax_union", "noisy_or", "mean"):
        res = plot_report(classifier, leaf_image_paths[:1], tmp_path / rule, grids=(2,),
                          rule=rule)
        recs = res.records[leaf_image_paths[0].stem]
        if rule == "argmax_union":  # baseline: every tile's arg-max species is reported
            assert recs and all(r.taxon_rank == "species" for r in recs)
            assert sum(r.n_tiles for r in recs) == 4


def test_submission_formats():
    node = ("Cyperaceae", "Carex", "Carex nigra")
    recs = {"CBN-1": [PlotRecord("CBN-1", "species", "Carex nigra", 0.9, 2, "max", node),
                      PlotRecord("CBN-1", "genus", "Poa sp.", 0.8, 1, "max", ("Poaceae", "Poa"))],
            "CBN-2": []}
    ids = {node: "1361281"}
    s24 = plantclef_submission_frame(recs, TAX, taxon_ids=ids, year=2024)
    assert s24.to_csv(index=False, sep=";").splitlines() == [
        "plot_id;species_ids", "CBN-1;[1361281]", "CBN-2;[]"]
    s25 = plantclef_submission_frame(recs, TAX, taxon_ids=ids, year=2025)
    assert s25.to_csv(index=False).splitlines()[0] == "quadrat_id,species_ids"


# ---------------------------------------------------------------------- unknown tiles
@pytest.fixture(scope="module")
def openset_model(shared_data, tmp_path_factory, write_leaf_subset) -> Path:
    """A real bundle with an open-set scorer: tiny DINOv2 checkpoint, 48 real leaf images.

    Trained by ``train_from_config`` (as ``taxoclass train`` does) on 6 images each of 8
    maple/oak/alder taxa; the kNN detector is fitted on the training embeddings and its
    thresholds on the validation half.
    """
    from taxoclass.config import load_config
    from taxoclass.pipelines.train import train_from_config

    tmp = tmp_path_factory.mktemp("openset")
    kwargs = write_leaf_subset(tmp, "ann.json", ("Acer", "Quercus", "Alnus"), 6)["kwargs"]
    cfg = load_config(None, [
        f"data.annotations={tmp / 'ann.json'}", f"data.images_root={shared_data / 'leaf'}",
        "data.val_fraction=0.5", "backbone.name=vit_base_patch14_reg4_dinov2",
        f"backbone.checkpoint={tmp / 'tiny_dinov2.pth'}", f"embeddings.cache={tmp / 'emb'}",
        "train.epochs=60", "train.lr=0.01", "train.batch_size=16", "openset.min_support=3",
        f"out={tmp / 'model'}"])
    cfg["backbone"]["model_kwargs"] = kwargs
    return train_from_config(cfg)


def test_bundle_classifier_backs_tiles_off_as_predict_does(openset_model, shared_data):
    from dataclasses import replace

    from taxoclass.io.images import load_image
    from taxoclass.plots.tiling import crop_tiles, make_tiles

    clf = BundleTileClassifier.load(openset_model, batch_size=8)
    assert clf.bundle.scorer is not None
    split = pd.read_csv(openset_model / "split.csv", dtype={"image_id": str})
    train_id = split.loc[split["split"] == "train", "image_id"].iloc[0]
    leaf = load_image(shared_data / "leaf" / "images" / f"{train_id}.jpg")
    quadrat = load_image(shared_data / "quadrat" / "CBN-can-A1-20230705.jpg")

    # a whole training leaf is known
    dec = clf.predict_tiles([leaf])
    flags = clf.flag_unknown(dec)
    assert flags.dtype == bool and flags.shape == (1,) and not flags[0]
    # every tile of a real vegetation photo is an outlier, yet it backs off as predict's
    # answer for its crop does (issue 16): unknown only where no rank passes
    tiles = make_tiles(quadrat.size, grids=(2, 3))
    dec = clf.predict_tiles(crop_tiles(quadrat, tiles))
    ranks, flags = clf.back_off_tiles(dec), clf.flag_unknown(dec)
    emb = clf.embed(crop_tiles(quadrat, tiles))
    frame, _ = clf.bundle.predict_with_backoff(emb)
    assert (frame["outlier_score"] > 0).all() and ranks.shape == (13,)
    np.testing.assert_array_equal(ranks, frame["taxon_rank"].to_numpy(object))
    np.testing.assert_array_equal(flags, (frame["taxon_rank"] == "unknown").to_numpy())
    np.testing.assert_array_equal(clf.unknown_flags(emb), flags)
    assert (ranks != "species").all() and not flags.all()
    with pytest.raises(ValueError, match="latest predict_tiles"):
        clf.flag_unknown(clf.predict_embeddings(emb))

    # without a scorer nothing backs off
    plain = BundleTileClassifier(replace(clf.bundle, scorer=None), clf.backbone)
    dec = plain.predict_tiles(crop_tiles(quadrat, tiles))
    assert not plain.flag_unknown(dec).any()
    assert set(plain.back_off_tiles(dec)) == {clf.taxonomy.ranks[-1]}


def test_plot_report_job_backs_outlier_tiles_off(openset_model, shared_data, tmp_path):
    from taxoclass.pipelines.plots import plot_report_job

    quadrat = shared_data / "quadrat" / "CBN-can-A1-20230705.jpg"
    res = plot_report_job(openset_model, [quadrat], tmp_path / "rep", grids=(2,), rule="max")
    recs = res.records[quadrat.stem]
    # the four outlier tiles back off (as predict's answers do) to a genus or its family,
    # not unknown; the genus record counts the tiles answered at genus only (family tiles
    # support no genus)
    tiles = pd.read_csv(tmp_path / "rep" / "tiles.csv")
    assert "unknown" not in set(tiles["answer_rank"].dropna())
    n_genus = int((tiles["answer_rank"] == "genus").sum())
    assert [(r.taxon_rank, r.n_tiles) for r in recs] == [("genus", n_genus)] and n_genus >= 1
    doc = json.loads((tmp_path / "rep" / "plot_records.json").read_text())
    assert doc["plots"][0]["n_unknown_tiles"] == 0 and doc["settings"]["outlier_check"] is True
    off = plot_report_job(openset_model, [quadrat], tmp_path / "off", grids=(2,), rule="max",
                          outlier_check=False)
    assert "unknown" not in {r.taxon_rank for r in off.records[quadrat.stem]}
    doc = json.loads((tmp_path / "off" / "plot_records.json").read_text())
    assert doc["settings"]["outlier_check"] is False
