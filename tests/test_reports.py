"""plot_report end to end: real leaf photos, a real (tiny) bundle classifier, every output."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
import torch

from taxoclass import __version__
from taxoclass.backbones import create_backbone
from taxoclass.bundle import ModelBundle
from taxoclass.heads import MultiRankHead
from taxoclass.plots import PlotRecord
from taxoclass.reports import OUTPUT_FILES, plantclef_submission_frame, plot_report
from taxoclass.taxonomy import Taxonomy
from taxoclass.tiling import BundleTileClassifier

torch.set_num_threads(1)

SCHEMA = Path(__file__).resolve().parents[1] / "data_schemas" / "plot_report.schema.json"
TAX = Taxonomy.from_records([
    {"family": "Cyperaceae", "genus": "Carex", "species": "nigra"},
    {"family": "Cyperaceae", "genus": "Carex", "species": "flacca"},
    {"family": "Juncaceae", "genus": "Juncus", "species": "effusus"},
    {"family": "Poaceae", "genus": "Poa", "species": "annua"},
])


@pytest.fixture(scope="module")
def classifier() -> BundleTileClassifier:
    """A tiny DINOv2-shaped backbone and a rank head trained for a few steps."""
    torch.manual_seed(0)
    kwargs = dict(img_size=56, depth=2, embed_dim=64, num_heads=2)
    backbone = create_backbone("vit_base_patch14_reg4_dinov2", pretrained=False,
                               model_kwargs=kwargs)
    head = MultiRankHead.for_taxonomy(TAX, 64)
    x = torch.nn.functional.normalize(torch.randn(64, 64), dim=1)
    leaf = torch.randint(0, TAX.n_classes("species"), (64,))
    targets = {r: torch.as_tensor(TAX.parent_index("species", r))[leaf] for r in ("family",
                                                                                  "genus")}
    targets["species"] = leaf
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(20):
        out = head(x)
        loss = sum(torch.nn.functional.cross_entropy(out[r], targets[r]) for r in TAX.ranks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bundle = ModelBundle(head=head.eval(), taxonomy=TAX,
                         backbone={"name": backbone.name, "pretrained": False,
                                   "model_kwargs": kwargs})
    return BundleTileClassifier(bundle, backbone, batch_size=5)


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
    for name in [*OUTPUT_FILES.values(), "provenance.json"]:
        assert (out / name).is_file(), name
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
    assert list(csv.columns) == ["plot_id", "taxon_rank", "taxon", "score", "n_tiles", "reason"]
    assert len(csv) == sum(len(p["records"]) for p in doc["plots"])
    for recs in res.records.values():
        unknown = [r for r in recs if r.taxon_rank == "unknown"]
        assert len(unknown) == 1 and unknown[0].reason == "outlier" and unknown[0].n_tiles >= 1
        nodes = [r.node for r in recs if r.node]
        assert not any(a != b and b[: len(a)] == a for a in nodes for b in nodes)

    # HTML: self-contained, one embedded JPEG per readable plot, legend and taxa lists
    page = (out / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2
    assert "src='http" not in page and 'src="http' not in page and "<link" not in page
    assert "Legend" in page and "Taxa by rank" in page and "corrupt.jpg" in page
    assert "unknown" in page

    # PlantCLEF 2024 run file and Darwin Core occurrences
    sub = (out / "plantclef_submission.csv").read_text().splitlines()
    assert sub[0] == "plot_id;species_ids" and len(sub) == 3
    assert all(line.split(";")[1].startswith("[") for line in sub[1:])
    dwc = pd.read_csv(out / "occurrences_dwc.csv", keep_default_na=False, dtype=str)
    assert set(dwc["basisOfRecord"]) <= {"MachineObservation"}
    n_taxa = sum(1 for recs in res.records.values() for r in recs if r.taxon_rank != "unknown")
    assert len(dwc) == n_taxa
    if n_taxa:
        assert dwc["identifiedBy"][0] == f"taxoclass {__version__} (vit_base_patch14_reg4_dinov2)"
        assert set(dwc["eventID"]) <= set(ids)
        genus_rows = dwc[dwc["taxonRank"] == "genus"]
        assert (genus_rows["identificationQualifier"] == "sp.").all()
        assert dwc["associatedMedia"][0] in {str(p) for p in leaf_image_paths[:2]}
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
