"""``taxoclass discover`` (issue 18 item 5): clusters of flagged images, their placement in
the tree, the files an expert labels, and the labels read back by ``taxoclass import``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from taxoclass.pipelines.discover import (
    NOISE,
    DiscoverSettings,
    auto_min_cluster_size,
    cluster_embeddings,
    place_cluster,
)
from taxoclass.taxonomy.tree import Taxonomy

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _run(*args) -> tuple[int, str]:
    from taxoclass.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


# ---------------------------------------------------------------------- clustering
def test_well_separated_synthetic_clusters_are_recovered_and_stragglers_are_noise():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 64)) * 3.0
    sizes = [30, 20, 12, 8]
    x = np.concatenate([c + 0.3 * rng.normal(size=(n, 64)) for c, n in zip(centres, sizes)])
    truth = np.repeat(np.arange(4), sizes)
    stragglers = rng.normal(size=(5, 64)) * 3.0  # far points: they must not merge the blobs
    labels, space, mcs = cluster_embeddings(np.concatenate([x, stragglers]))
    assert mcs == auto_min_cluster_size(len(x) + 5) == 6
    assert space.shape == (len(x) + 5, DiscoverSettings.dims)
    assert adjusted_rand_score(truth, labels[:len(x)]) > 0.95
    assert set(labels[:len(x)]) == {0, 1, 2, 3}  # ids by size, largest first
    assert np.bincount(labels[:len(x)][labels[:len(x)] >= 0]).tolist() == sizes


def test_min_cluster_size_rule_and_too_few_images():
    assert [auto_min_cluster_size(n) for n in (1, 10, 32, 128, 1000, 10000)] == \
        [3, 3, 5, 7, 10, 13]
    labels, _, mcs = cluster_embeddings(np.eye(4, 8), min_cluster_size=5)
    assert mcs == 5 and (labels == NOISE).all()


# ---------------------------------------------------------------------- placement
def _taxonomy() -> Taxonomy:
    """Ranks order / family / species (no genus: placement reads the model's ranks)."""
    rows = [{"order": "O1", "family": "F1", "species": "a"},
            {"order": "O1", "family": "F1", "species": "b"},
            {"order": "O1", "family": "F2", "species": "c"},
            {"order": "O2", "family": "F3", "species": "d"}]
    return Taxonomy.from_records(rows, ranks=("order", "family", "species"))


def _evidence(tax: Taxonomy, species_probs: np.ndarray) -> tuple[dict, dict]:
    probs = {"species": species_probs}
    for rank in ("order", "family"):
        parent = tax.parent_index("species", rank)
        probs[rank] = np.stack([species_probs[:, parent == k].sum(axis=1)
                                for k in range(tax.n_classes(rank))], axis=1)
    return probs, {r: p.argmax(axis=1) for r, p in probs.items()}


def test_placement_is_the_lowest_rank_above_the_lowest_whose_evidence_passes():
    tax = _taxonomy()
    fam = {n: i for i, n in enumerate(tax.names("family"))}
    # split between species a and b of F1: placed at family F1, not at species
    probs, path = _evidence(tax, np.array([[0.45, 0.4, 0.1, 0.05], [0.4, 0.45, 0.1, 0.05]]))
    got = place_cluster(probs, path, tax, min_probability=0.5)
    assert (got["placement_rank"], got["placement"]) == ("family", "F1")
    # the default asks for 0.9: F1 (0.85) fails, order O1 (0.95) passes
    assert place_cluster(probs, path, tax)["placement"] == "O1"
    assert got["family_prob"] == pytest.approx(0.85) and got["family_agree"] == 1.0
    assert got["species_prob"] == pytest.approx(0.425)
    # F1 vs F2 split evenly inside O1: family fails, order O1 passes
    probs, path = _evidence(tax, np.array([[0.5, 0.0, 0.45, 0.05], [0.0, 0.05, 0.9, 0.05],
                                           [0.9, 0.0, 0.05, 0.05]]))
    got = place_cluster(probs, path, tax, min_probability=0.5)
    assert (got["placement_rank"], got["placement"]) == ("order", "O1")
    assert got["family"] in fam
    # nothing reaches 0.5 anywhere: not placed
    flat = np.full((3, 4), 0.25)  # order O1 0.75, family F1 0.5: below 0.8
    got = place_cluster(*_evidence(tax, flat), tax, min_probability=0.8)
    assert (got["placement_rank"], got["placement"], got["placement_prob"]) == \
        ("unknown", "unknown", None)


# ---------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def discovered(fixture_model, fixture_set, tmp_path_factory):
    """discover --all on the fixture's test images, the 6 unseen Acer rubrum images and
    one corrupt file."""
    tmp = tmp_path_factory.mktemp("discover")
    bad = tmp / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp / "disc"
    code, output = _run("discover", "--model", fixture_model["model"],
                        fixture_set["images"] / "test", fixture_set["unknown"], bad,
                        "--all", "--out", out)
    assert code == 0, output
    return {"out": out, "output": output, "bad": bad, "tmp": tmp}


def test_discover_writes_clusters_members_page_and_json(discovered, fixture_model, fixture_set):
    out = discovered["out"]
    assert {p.name for p in out.iterdir()} >= {"clusters.csv", "members.csv", "discover.html",
                                                "discover.json", "failures.csv",
                                                "provenance.json"}
    ranks = ["family", "genus", "species"]  # the fixture model's taxonomy.ranks
    clusters = pd.read_csv(out / "clusters.csv")
    assert clusters.columns.tolist() == [
        "cluster", "size", "placement_rank", "placement", "placement_prob", "placement_agree",
        *[c for r in ranks for c in (r, f"{r}_prob", f"{r}_agree")], "representatives"]
    members = pd.read_csv(out / "members.csv", keep_default_na=False)
    assert members.columns.tolist() == [
        "image", "cluster", "representative", "distance", "placement_rank", "placement",
        "probability", "taxon_rank", "taxon", "reason", *ranks, "notes"]
    n_images = len(list((fixture_set["images"] / "test").glob("*.jpg"))) + 6
    assert len(members) == n_images  # every readable image, the corrupt one apart
    assert (members[ranks] == "").all().all()  # the expert's columns, empty
    assert clusters["size"].sum() + (members["cluster"] == NOISE).sum() == n_images
    assert clusters["size"].tolist() == sorted(clusters["size"], reverse=True)
    for row in clusters.to_dict("records"):
        mine = members[members["cluster"] == row["cluster"]]
        reps = row["representatives"].split(";")
        assert len(reps) == min(6, row["size"])
        assert set(mine.loc[mine["representative"].astype(str) == "True", "image"]) == set(reps)
        if row["placement_rank"] != "unknown":
            assert row["placement_prob"] >= DiscoverSettings.min_probability
            assert row["placement_agree"] >= DiscoverSettings.min_agreement
    # the unseen Acer rubrum images form one cluster whose genus evidence names Acer
    rubrum = members[members["image"].str.contains("rubrum")]
    assert rubrum["cluster"].nunique() == 1 and (rubrum["cluster"] != NOISE).all()
    mine = clusters.set_index("cluster").loc[rubrum["cluster"].iloc[0]]
    assert mine["genus"] == "Acer" and mine["family"] == "Sapindaceae"
    assert rubrum["placement"].iloc[0] in ("Acer", "Sapindaceae", "unknown")
    failures = pd.read_csv(out / "failures.csv")
    assert failures["image"].tolist() == [str(discovered["bad"])]
    summary = json.loads((out / "discover.json").read_text())
    assert set(summary["header"]) == {"tool", "version", "model_id", "created", "command"}
    assert summary["header"]["model_id"] and summary["ranks"] == ranks
    assert summary["n_images"] == n_images and summary["n_failed"] == 1
    assert summary["n_clusters"] == len(clusters) == len(summary["clusters"])
    assert summary["settings"]["min_cluster_size"] == auto_min_cluster_size(n_images)
    page = (out / "discover.html").read_text()
    assert page.count("<section id='cluster-") == len(clusters)
    assert page.count("data:image/jpeg;base64,") >= clusters["size"].clip(upper=6).sum()
    assert "broken.jpg" in page and "members.csv" in page
    assert f"{len(clusters)} cluster(s)" in discovered["output"]


def _documented_columns() -> set[str]:
    """The columns docs/outputs.md lists in its discover section (``<rank>`` as is)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()
    section = text.split("## `discover`", 1)[1].split("\n## ", 1)[0]
    cells = re.findall(r"^\| (`[^|]+`)[^|]*\|", section, re.M)
    return {c for cell in cells for c in re.findall(r"`([^`]+)`", cell)}


def test_docs_list_every_discover_column(discovered):
    documented = _documented_columns()
    ranks = ("family", "genus", "species")
    for name in ("clusters.csv", "members.csv"):
        for col in pd.read_csv(discovered["out"] / name, nrows=0).columns:
            generic = col
            for r in ranks:
                if col == r or col.startswith(f"{r}_"):
                    generic = "<rank>" + col[len(r):]
            assert generic in documented, (name, col)


def test_annotated_members_import_as_labels_that_validate(discovered, fixture_set, tmp_path):
    members = pd.read_csv(discovered["out"] / "members.csv", keep_default_na=False)
    rubrum = members["image"].str.contains("rubrum")
    # the expert names the unseen cluster and one more image; every other row stays empty
    members.loc[rubrum, ["family", "genus", "species"]] = ["Sapindaceae", "Acer", "rubrum"]
    other = members.index[~rubrum][0]
    members.loc[other, ["family", "genus"]] = ["Fagaceae", "Quercus"]
    table = tmp_path / "members.csv"
    members.to_csv(table, index=False)
    code, output = _run("import", table, "--out", tmp_path / "new.json",
                        "--images-root", fixture_set["dir"])
    assert code == 0, output
    data = json.loads((tmp_path / "new.json").read_text())
    assert len(data["images"]) == int(rubrum.sum()) + 1
    names = {c["scientificName"]: c["taxonRank"] for c in data["categories"]}
    assert names == {"Acer rubrum": "species", "Quercus": "genus"}
    code, output = _run("validate", tmp_path / "new.json", "--images-root", fixture_set["dir"])
    assert code == 0, output


def test_flags_folder_input_clusters_its_flagged_images(fixture_model, fixture_set, tmp_path):
    flags = tmp_path / "flags"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    code, output = _run("flag-unknowns", "--model", fixture_model["model"],
                        fixture_set["images"] / "test", fixture_set["unknown"], bad,
                        "--out", flags)
    assert code == 0, output
    table = pd.read_csv(flags / "flags.csv")
    flagged = table[table["flagged"] & table["error"].isna()]
    out = tmp_path / "disc"
    code, output = _run("discover", "--model", fixture_model["model"], flags, "--out", out,
                        "--min-cluster-size", 3)
    assert code == 0, output
    members = pd.read_csv(out / "members.csv")
    assert sorted(members["image"]) == sorted(str(Path(p).absolute()) for p in flagged["image"])
    summary = json.loads((out / "discover.json").read_text())
    assert summary["input"]["flags_folder"] == str(flags)
    assert summary["settings"]["min_cluster_size"] == 3
    assert summary["embeddings"]["n_computed"] == 0  # flag-unknowns stored every vector


# ---------------------------------------------------------------------- errors
def test_bad_inputs_are_clear_errors(fixture_model, fixture_set, tmp_path):
    code, output = _run("discover", "--model", tmp_path / "nomodel", fixture_set["unknown"],
                        "--out", tmp_path / "o1")
    assert code == 2 and "not a taxoclass model bundle" in output
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = _run("discover", "--model", fixture_model["model"], empty,
                        "--out", tmp_path / "o2")
    assert code == 2 and "No images found" in output
    flags = tmp_path / "flags"
    flags.mkdir()
    pd.DataFrame({"image": ["a.jpg", "b.jpg"], "flagged": [False, False],
                  "error": [None, None]}).to_csv(flags / "flags.csv", index=False)
    code, output = _run("discover", "--model", fixture_model["model"], flags,
                        "--out", tmp_path / "o3")
    assert code == 2
    assert re.search(r"no flagged readable image.*found 2 row\(s\), 0 flagged", output)
    pd.DataFrame({"image": ["a.jpg"]}).to_csv(flags / "flags.csv", index=False)
    code, output = _run("discover", "--model", fixture_model["model"], flags,
                        "--out", tmp_path / "o4")
    assert code == 2 and "expected the columns image and flagged" in output
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()


def test_help_states_the_library_defaults():
    code, output = _run("discover", "--help")
    assert code == 0
    d = DiscoverSettings()
    text = " ".join(output.split())
    assert f"[default: {d.dims}]" in text and d.min_samples is None
    assert f"[default: {d.min_probability}]" in text
    assert f"[default: {d.min_agreement}]" in text
    assert f"[default: {d.selection}]" in text
    assert "max(3, round(log2 N))" in text
