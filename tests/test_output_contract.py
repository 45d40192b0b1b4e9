"""The output contract (issue 16): every JSON output carries one header, top-k are JSON lists,
predictions.json follows its JSON Schema, evaluate --out is a folder with per-image
predictions, plot records carry a documented confidence, a genus answer is spelt one way
everywhere, and docs/outputs.md lists exactly the columns each command writes.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest

from taxoclass.io.provenance import HEADER_FIELDS, output_header, write_json_output
from taxoclass.io.schemas import load_schema
from taxoclass.plots.report import record_confidence
from taxoclass.plots.rules import PlotRecord
from taxoclass.taxonomy.tree import Taxonomy

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "outputs.md"
RANKS = ("family", "genus", "species")


# ---------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def runs(fixture_model, fixture_set, cli, tmp_path_factory) -> dict[str, Path]:
    """predict (one unreadable file among the images), flag-unknowns, evaluate, plot-report
    and evaluate-plots on the fixtures, once for the module."""
    tmp = tmp_path_factory.mktemp("contract")
    images = tmp / "images"
    shutil.copytree(fixture_set["unknown"], images)
    for p in sorted((fixture_set["images"] / "test").glob("*.jpg"))[:6]:
        shutil.copy(p, images / p.name)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    model = fixture_model["model"]
    out = {k: tmp / k for k in ("pred", "flags", "eval", "plots", "plot_metrics")}
    cli("predict", "--model", model, images, "--out", out["pred"])
    cli("flag-unknowns", "--model", model, images, "--out", out["flags"])
    cli("evaluate", "--model", model, "--annotations", fixture_set["test"], "--out", out["eval"])
    cli("plot-report", "--model", model, fixture_set["plots"], "--out", out["plots"])
    cli("evaluate-plots", "--records", out["plots"] / "plot_records.csv", "--truth",
        fixture_set["truth"], "--taxonomy", model, "--out", out["plot_metrics"])
    return {**out, "images": images}


def _check_header(doc: dict, *, model_id: bool = True, key: str = "header") -> None:
    head = doc[key]
    assert list(doc)[0] == key and tuple(head)[:5] == HEADER_FIELDS
    assert head["tool"] == "taxoclass" and head["version"]
    created = dt.datetime.fromisoformat(head["created"])
    assert created.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 3600
    assert head["command"].startswith("taxoclass ")
    if model_id:
        assert re.fullmatch(r"[0-9a-f]{16}", head["model_id"]), head
    else:
        assert head["model_id"] is None


# ---------------------------------------------------------------------- item 1: header
def test_every_json_output_has_the_same_header(runs):
    docs = {name: json.loads(path.read_text()) for name, path in {
        "predictions": runs["pred"] / "predictions.json",
        "flags_predictions": runs["flags"] / "predictions.json",
        "flags_summary": runs["flags"] / "flags_summary.json",
        "metrics": runs["eval"] / "metrics.json",
        "plot_records": runs["plots"] / "plot_records.json"}.items()}
    for doc in docs.values():
        _check_header(doc)
    assert len({d["header"]["model_id"] for d in docs.values()}) == 1  # one model, one id
    assert docs["predictions"]["header"]["command"].startswith("taxoclass predict ")
    # the model id is the one provenance and the Darwin Core identifiedBy name
    mid = docs["predictions"]["header"]["model_id"]
    assert json.loads((runs["pred"] / "provenance.json").read_text())["model_id"] == mid
    dwc = pd.read_csv(runs["plots"] / "occurrences_dwc.csv")
    assert set(dwc["identifiedBy"].str.split().str[-1]) == {mid}
    _check_header(json.loads((runs["plot_metrics"] / "plot_metrics.json").read_text()),
                  model_id=False)


def test_header_helper_wraps_lists_and_mappings(tmp_path):
    write_json_output(tmp_path / "a.json", [1, 2], model_id="m", items="rows", command="x y")
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["rows"] == [1, 2] and a["header"]["command"] == "x y"
    write_json_output(tmp_path / "b.json", {"info": {"old": 1}, "images": []}, key="info")
    b = json.loads((tmp_path / "b.json").read_text())
    assert list(b) == ["info", "images"] and b["info"]["tool"] == "taxoclass"
    assert set(output_header(model_id=None)) == set(HEADER_FIELDS)


def test_imported_annotations_stay_coco_with_the_header_under_info(tmp_path, cli):
    photos = tmp_path / "photos" / "Sapindaceae" / "Acer" / "campestre"
    photos.mkdir(parents=True)
    for p in sorted((REPO / "tests" / "fixtures" / "images" / "train").glob("*.jpg"))[:2]:
        shutil.copy(p, photos / p.name)
    cli("import", tmp_path / "photos", "--out", tmp_path / "train.json")
    data = json.loads((tmp_path / "train.json").read_text())
    _check_header(data, model_id=False, key="info")
    assert "header" not in data and len(data["images"]) == 2
    jsonschema.validate(data, load_schema("herbarium2022_annotations.schema.json"))


# ---------------------------------------------------------------------- items 2, 3: JSON
def test_predictions_json_follows_its_schema_with_top_k_lists(runs):
    schema = load_schema("predictions.schema.json")
    jsonschema.Draft202012Validator.check_schema(schema)
    for folder in ("pred", "flags"):
        doc = json.loads((runs[folder] / "predictions.json").read_text())
        jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()
                                        ).validate(doc)
    rows = doc["predictions"]
    csv = pd.read_csv(runs["flags"] / "predictions.csv")
    assert len(rows) == len(csv) == len(list(runs["images"].iterdir()))
    ok = [r for r in rows if r["error"] is None]
    for r in ok:
        for rank in RANKS:
            top = r[f"{rank}_top5"]
            assert isinstance(top, list) and 1 <= len(top) <= 5
            assert all(c["rank"] == rank for c in top)
            probs = [c["probability"] for c in top]
            assert probs == sorted(probs, reverse=True)
    failed = [r for r in rows if r["error"] is not None]
    assert len(failed) == 1 and failed[0]["reason"] == "failed"
    assert failed[0]["species_top5"] is None
    # the CSV keeps its packed string
    assert csv["species_top5"].dropna().str.contains(":").all()
    # a broken row is refused by the schema (it validates something)
    bad = {**doc, "predictions": [{**ok[0], "species_top5": "Acer:0.9"}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# ---------------------------------------------------------------------- item 4: evaluate
def test_evaluate_out_is_a_folder_with_per_image_predictions(runs, fixture_set, fixture_model,
                                                             tmp_path):
    from click.testing import CliRunner

    from taxoclass.cli import main

    folder = runs["eval"]
    assert {"metrics.json", "predictions.csv", "confusion.csv", "reliability.csv",
            "provenance.json"} <= {p.name for p in folder.iterdir()}
    table = pd.read_csv(folder / "predictions.csv", dtype={"image_id": str})
    truth = json.loads(Path(fixture_set["test"]).read_text())
    assert len(table) == len(truth["images"]) == 24
    assert table["image"].map(lambda p: Path(p).is_file()).all()
    for rank in RANKS:
        right = table[f"{rank}_correct"].astype(bool)
        assert (right == (table[rank] == table[f"{rank}_true"])).all()
        metrics = json.loads((folder / "metrics.json").read_text())
        assert right.mean() == pytest.approx(metrics["ranks"][rank]["accuracy"])
    answered = table[table["taxon_rank"].isin(RANKS)]
    for _, row in answered.iterrows():
        true = row[f"{row['taxon_rank']}_true"]
        assert row["correct"] == (row["taxon"].removesuffix(" sp.") == true)
    # an existing file is refused with the fix; a folder of other files is not replaced
    runner = CliRunner()
    afile = tmp_path / "a.txt"
    afile.write_text("keep")
    res = runner.invoke(main, ["evaluate", "--model", str(fixture_model["model"]),
                               "--annotations", str(fixture_set["test"]), "--out", str(afile)])
    assert res.exit_code == 2 and "existing file" in res.output and "Fix" in res.output
    assert afile.read_text() == "keep"
    res = runner.invoke(main, ["evaluate", "--model", str(fixture_model["model"]),
                               "--annotations", str(fixture_set["test"]), "--out",
                               str(tmp_path)])
    assert res.exit_code == 2 and "did not write" in res.output and afile.is_file()


# ---------------------------------------------------------------------- item 5: confidence
def test_plot_records_confidence_is_the_best_calibrated_tile_and_unknown_has_none():
    from taxoclass.model.confidence import ConfidenceCalibration

    tax = Taxonomy.from_records([
        {"family": "Cyperaceae", "genus": "Carex", "species": "Carex nigra"},
        {"family": "Cyperaceae", "genus": "Carex", "species": "Carex flacca"}], ranks=RANKS)
    nigra = tax.find("Carex nigra", "species")[0]
    species = np.zeros((4, 2))
    species[:, tax.index(nigra)] = [0.9, 0.6, 0.2, 0.5]
    species[:, 1 - tax.index(nigra)] = 1 - species[:, tax.index(nigra)]
    probs = {"species": species, "genus": np.ones((4, 1)), "family": np.ones((4, 1))}
    recs = [PlotRecord("p", "species", "Carex nigra", 0.9, 2, "species", nigra),
            PlotRecord("p", "genus", "Carex sp.", 0.9, 1, "backoff_to_genus:low_confidence",
                       nigra[:2]),
            PlotRecord("p", "unknown", "unknown", float("nan"), 1, "unknown:outlier")]
    tile_rank = np.array(["species", "species", "genus", "unknown"])
    unknown = tile_rank == "unknown"
    cal = ConfidenceCalibration(params={"species": (2.0, 0.0), "genus": (1.0, -1.0)})
    record_confidence(recs, probs, tax, tile_rank, unknown, cal)
    # species: tiles 0 and 1 count at species (tile 2 backed off to genus, tile 3 unknown)
    assert recs[0].confidence == pytest.approx(float(cal.calibrate("species", np.array(0.9))))
    assert recs[1].confidence == pytest.approx(float(cal.calibrate("genus", np.array(1.0))))
    assert np.isnan(recs[2].confidence) and recs[2].to_dict()["confidence"] is None


def test_plot_records_confidence_in_csv_and_json(runs):
    csv = pd.read_csv(runs["plots"] / "plot_records.csv")
    doc = json.loads((runs["plots"] / "plot_records.json").read_text())
    jsonschema.validate(doc, load_schema("plot_report.schema.json"))
    known = csv[csv["taxon_rank"] != "unknown"]
    assert len(known) and known["confidence"].between(0, 1).all()
    assert csv.loc[csv["taxon_rank"] == "unknown", "confidence"].isna().all()
    from_json = [r["confidence"] for p in doc["plots"] for r in p["records"]]
    np.testing.assert_allclose(csv["confidence"].to_numpy(float),
                               np.array(from_json, dtype=float), atol=1e-6)


# ---------------------------------------------------------------------- item 6: genus
def test_a_genus_answer_is_spelt_one_way_in_tiles_records_and_predictions(runs):
    preds = pd.read_csv(runs["pred"] / "predictions.csv")
    records = pd.read_csv(runs["plots"] / "plot_records.csv")
    tiles = pd.read_csv(runs["plots"] / "tiles.csv", keep_default_na=False)
    genus_preds = preds[preds["taxon_rank"] == "genus"]
    assert len(genus_preds) and (genus_preds["taxon"] == genus_preds["genus"] + " sp.").all()
    genus_records = records[records["taxon_rank"] == "genus"]
    assert len(genus_records) and genus_records["taxon"].str.endswith(" sp.").all()
    # rank columns hold bare names everywhere, display labels carry "sp." at genus
    top_cols = [c for c in tiles.columns if re.fullmatch(r"[a-z]+_top[0-9]", c)]
    assert top_cols and not tiles[top_cols].apply(lambda c: c.str.endswith(" sp.")).any().any()
    assert not preds.filter(regex=r"^(family|genus|species)$").stack().str.endswith(" sp.").any()
    genus_tiles = tiles[tiles["answer_rank"] == "genus"]
    assert len(genus_tiles) and genus_tiles["answer"].str.endswith(" sp.").all()
    for _, t in genus_tiles.iterrows():
        assert t["answer"] in set(records.loc[records["plot_id"] == t["plot_id"], "taxon"])
        assert t["answer"].removesuffix(" sp.") in {t["genus_top1"], t["genus_top2"],
                                                    t["genus_top3"]}


# ---------------------------------------------------------------------- item 7: docs
def _documented() -> dict[str, tuple[set[str], set[str]]]:
    """docs/outputs.md: ``command:file`` (from a heading like ``## `evaluate`:
    `predictions.csv```) -> (columns always written, columns written only in some case),
    from the section's ``| `column` | meaning |`` table."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    name = None
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            ticks = re.findall(r"`([^`]+)`", line)
            files = [t for t in ticks if re.search(r"\.(csv|json)$", t)]
            name = f"{ticks[0]}:{files[-1]}" if files else None
            continue
        if line.startswith("| file |"):
            name = None  # a table of files, not of one file's columns
        if name is None or not line.startswith("| `"):
            continue
        first, meaning = line.split("|")[1:3]
        optional = meaning.strip().lower().startswith("only")
        always, some = out.setdefault(name, (set(), set()))
        (some if optional else always).update(re.findall(r"`([^`]+)`", first))
    return out


def _expand(columns: set[str], ranks=RANKS) -> set[str]:
    return {c.replace("<rank>", r) for c in columns for r in ranks}


def _check(key: str, written: set[str], docs) -> None:
    always, some = (_expand(c) for c in docs[key])
    assert always - written == set(), f"{key}: documented in docs/outputs.md, not written"
    assert written - always - some == set(), f"{key}: written, not in docs/outputs.md"


def test_docs_list_exactly_the_columns_written(runs):
    docs = _documented()
    pred = set(pd.read_csv(runs["pred"] / "predictions.csv").columns)
    _check("predict:predictions.csv", pred, docs)
    doc = json.loads((runs["pred"] / "predictions.json").read_text())
    _check("predict:predictions.json", set(doc), docs)
    for row in doc["predictions"]:  # the records have the CSV's columns
        _check("predict:predictions.csv", set(row), docs)
    flags = set(pd.read_csv(runs["flags"] / "flags.csv").columns)
    _check("flag-unknowns:flags.csv", flags - pred, docs)
    summary = json.loads((runs["flags"] / "flags_summary.json").read_text())
    _check("flag-unknowns:flags_summary.json", set(summary), docs)
    _check("predict:failures.csv", set(pd.read_csv(runs["pred"] / "failures.csv").columns),
           docs)
    ev = runs["eval"]
    for name in ("predictions.csv", "confusion.csv", "reliability.csv"):
        _check(f"evaluate:{name}", set(pd.read_csv(ev / name).columns), docs)
    plots = runs["plots"]
    for name in ("plot_records.csv", "tiles.csv"):
        _check(f"plot-report:{name}", set(pd.read_csv(plots / name).columns), docs)
    _check("plot-report:plot_records.json",
           set(json.loads((plots / "plot_records.json").read_text())), docs)


def test_the_docs_check_catches_a_missing_or_a_stale_column():
    docs = {"x:a.csv": ({"plot_id", "<rank>_top1"}, {"error"})}
    _check("x:a.csv", {"plot_id", *(f"{r}_top1" for r in RANKS)}, docs)
    with pytest.raises(AssertionError, match="not in docs"):
        _check("x:a.csv", {"plot_id", "new", *(f"{r}_top1" for r in RANKS)}, docs)
    with pytest.raises(AssertionError, match="not written"):
        _check("x:a.csv", {"plot_id"}, docs)
