"""Issue 15, data side: labels at any rank, any rank list, empty categories.

Built on :mod:`any_rank_data` (the builders other tests use too).
"""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
from any_rank_data import (
    CHECKLIST_EXTRA,
    FOUR_RANKS,
    five_rank_set,
    fixture_four_rank_set,
    leaf_four_rank_set,
    three_rank_set,
    write_config,
)

from taxoclass.errors import AnnotationError
from taxoclass.pipelines.data import known_rows
from taxoclass.taxonomy.annotations import load_annotations, validate_annotations
from taxoclass.taxonomy.labels import encode_labels
from taxoclass.taxonomy.tree import Taxonomy


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return fixture_four_rank_set(tmp_path_factory.mktemp("four"), empty_taxa=True)


def _rows(ann, ids=None) -> pd.DataFrame:
    rows = ann.labelled_images()
    return rows if ids is None else rows[rows["image_id"].isin(ids)].reset_index(drop=True)


# ------------------------------------------------------------------ validation
def test_builder_sets_validate_with_labels_at_every_rank(four, tmp_path):
    assert four.label_ranks == {"species": 51, "genus": 3, "family": 3, "order": 3}
    report = validate_annotations(four.train, images_root=four.images_root)
    assert report.ok, report.format()
    assert report.counts["order-level categories"] == 1
    assert report.counts["family-level categories"] == 1
    assert report.counts["genus-level categories"] == 1
    assert report.counts["order taxa"] == 2 and report.counts["genus taxa"] == 4
    assert validate_annotations(four.test, images_root=four.images_root).ok
    for build in (three_rank_set, five_rank_set):
        ds = build(tmp_path / build.__name__)
        rep = validate_annotations(ds.train, images_root=ds.images_root)
        assert rep.ok, rep.format()
        assert [k for k in rep.counts if k.endswith(" taxa")] == [f"{r} taxa" for r in ds.ranks]
    three = json.loads((tmp_path / "three_rank_set" / "train.json").read_text())
    assert all("genus" not in c for c in three["categories"])
    assert {"Acer campestre", "Quercus robur"} <= {c["species"] for c in three["categories"]}


@pytest.mark.parametrize("emptied, rank_below, name_below", [
    ("family", "genus", "Aesculus"),     # genus-only label without its family
    ("order", "family", "Fagaceae"),     # family-only label without its order
    ("genus", "species", "robur"),       # species without its genus
])
def test_a_rank_missing_above_a_filled_one_is_an_error(four, emptied, rank_below, name_below):
    data = json.loads(four.train.read_text())

    def lowest(c: dict) -> str:
        return [r for r in FOUR_RANKS if c.get(r)][-1]

    target = next(c for c in data["categories"]
                  if c.get(rank_below) == name_below and lowest(c) == rank_below)
    target[emptied] = ""
    errors = [str(p) for p in validate_annotations(data).errors]
    assert len(errors) == 1, errors
    assert f"$.categories[{target['category_id']}].{emptied}" in errors[0]
    assert f"a non-empty {emptied} (above the {rank_below}" in errors[0]
    assert "a category may stop at any rank" in errors[0] and "Fix:" in errors[0]


def test_a_category_with_no_rank_is_an_error(four):
    data = json.loads(four.train.read_text())
    data["categories"][0].update(order="", family="", genus="", species="")
    errors = [str(p) for p in validate_annotations(data).errors]
    assert len(errors) == 1 and "every rank empty" in errors[0]


# ------------------------------------------------------------------ encoding
@pytest.mark.parametrize("stop", FOUR_RANKS)
def test_a_label_at_any_rank_is_minus_one_below_or_placeholders(stop):
    """A record stopping at ``stop``: beside a named sibling it trains only the ranks it
    names (-1 below); alone (no named child anywhere) it stands on placeholders."""
    full = {"order": "Perciformes", "family": "Labridae", "genus": "Labrus",
            "species": "bergylta"}
    cut = FOUR_RANKS.index(stop) + 1
    partial = {r: (v if i < cut else "") for i, (r, v) in enumerate(full.items())}
    lonely = {r: (v if i < cut else "") for i, (r, v) in
              enumerate({"order": "Tetraodontiformes", "family": "Scaridae", "genus": "Scarus",
                         "species": "ghobban"}.items())}
    tax = Taxonomy.from_records([full, partial, lonely], FOUR_RANKS)
    y, nodes = encode_labels(tax, pd.DataFrame([partial, lonely]))
    for i, r in enumerate(FOUR_RANKS):
        assert (y[r][0] >= 0) == (i < cut), (r, y[r][0])
        assert y[r][1] >= 0
    names = ["Tetraodontiformes", "Scaridae", "Scarus", "Scarus ghobban"][:cut]
    assert tax.reported(nodes[1]) == tuple(names)
    assert tax.label(nodes[1]) == (f"{names[-1]} sp." if stop == "genus" else names[-1])
    assert tax.summary()["species"] == (1 if stop != "species" else 2)


def test_fixture_partial_labels_encode_down_to_their_rank(four):
    ann = load_annotations(four.train)
    tax = ann.taxonomy(FOUR_RANKS)
    rows = _rows(ann)
    y, _ = encode_labels(tax, rows)
    stops = rows[FOUR_RANKS].fillna("").astype(bool).sum(axis=1).to_numpy()
    for k, r in enumerate(FOUR_RANKS):
        assert ((y[r] >= 0) == (stops > k)).all(), r
    fam_only = (rows["family"] == "Fagaceae") & (rows["genus"] == "")
    assert fam_only.sum() == 3 and (y["family"][fam_only] == tax.index(
        ("Fagales", "Fagaceae"))).all()


def test_leaf_family_without_genera_gets_placeholders(shared_data, tmp_path):
    ds = leaf_four_rank_set(tmp_path, shared_data / "leaf")
    assert ds.label_ranks["order"] > 0 and ds.label_ranks["family"] > 0
    assert validate_annotations(ds.train, images_root=ds.images_root).ok
    ann = load_annotations(ds.train)
    tax = ann.taxonomy(FOUR_RANKS)
    rows = _rows(ann)
    y, nodes = encode_labels(tax, rows)
    ginkgo = (rows["family"] == "Ginkgoaceae").to_numpy()
    assert ginkgo.sum() == 8 and all(y[r][ginkgo].min() >= 0 for r in FOUR_RANKS)
    assert {tax.label(n) for n, g in zip(nodes, ginkgo) if g} == {"Ginkgoaceae"}
    fam_only = ((rows["genus"] == "") & (rows["family"] != "Ginkgoaceae")).to_numpy()
    assert fam_only.sum() > 0 and (y["genus"][fam_only] == -1).all()


# ------------------------------------------------------------------ rank lists
def test_ranks_from_the_config_are_checked_against_the_categories(four):
    ann = load_annotations(four.train)
    rows = _rows(ann)
    with pytest.raises(AnnotationError) as err:
        known_rows(ann, rows, {"ranks": ["order", "family", "tribe", "genus", "species"]})
    msg = str(err.value)
    assert "no category has a 'tribe'" in msg
    assert "['order', 'family', 'genus', 'species']" in msg and "'auto'" in msg
    tax, _ = known_rows(ann, rows, {"ranks": "auto"})
    assert tax.ranks == tuple(FOUR_RANKS)
    tax, _ = known_rows(ann, rows, {"ranks": ["family", "genus", "species"]})
    assert tax.ranks == ("family", "genus", "species")


def test_auto_ranks_follow_the_canonical_order(fixture_set, tmp_path):
    # the shipped fixture has an empty 'order' on every category: not a rank
    assert load_annotations(fixture_set["train"]).taxonomy("auto").ranks == (
        "family", "genus", "species")
    five = load_annotations(five_rank_set(tmp_path / "5").train).taxonomy("auto")
    assert five.ranks == ("class", "order", "family", "genus", "species")
    three = load_annotations(three_rank_set(tmp_path / "3").train).taxonomy("auto")
    assert three.ranks == ("order", "family", "species")
    assert ("Sapindales", "Sapindaceae", "Acer campestre") in three.nodes("species")


def test_three_and_five_rank_sets_encode(tmp_path):
    for build, n_ranks in ((three_rank_set, 3), (five_rank_set, 5)):
        ds = build(tmp_path / build.__name__)
        ann = load_annotations(ds.train)
        tax, rows = known_rows(ann, _rows(ann), {"ranks": ds.ranks})
        y, _ = encode_labels(tax, rows)
        assert len(tax.ranks) == n_ranks and len(y) == n_ranks
        assert (y[ds.ranks[0]] >= 0).all()  # every label names the top rank
        assert int((y["species"] >= 0).sum()) == ds.label_ranks["species"]


def test_species_without_a_genus_rank_is_named_by_its_binomial():
    ranks = ("order", "family", "species")
    tax = Taxonomy.from_records([
        {"order": "Sapindales", "family": "Sapindaceae", "species": "Acer campestre"},
        {"order": "Sapindales", "family": "Sapindaceae", "genus": "Acer",
         "species": "platanoides"}], ranks)
    assert tax.names("species") == ["Acer campestre", "Acer platanoides"]
    assert tax.node_for({"order": "Sapindales", "family": "Sapindaceae", "genus": "Acer",
                         "species": "campestre"})[-1] == "Acer campestre"


# ------------------------------------------------------------------ empty categories
def test_empty_taxa_are_left_out_with_one_warning(four, caplog):
    ann = load_annotations(four.train)
    rows = _rows(ann)
    with caplog.at_level(logging.WARNING, logger="taxoclass"):
        tax, _ = known_rows(ann, rows, {"ranks": FOUR_RANKS})
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    assert "2 categories have no labelled image and are left out" in warned[0]
    assert "Nothofagus antarctica" in warned[0] and "Quercus frainetto" in warned[0]
    assert "data.keep_empty_taxa" in warned[0]
    assert tax.summary() == {"order": 2, "family": 2, "genus": 3, "species": 6}
    assert not tax.find("Nothofagaceae") and not tax.find("Quercus frainetto")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="taxoclass"):
        kept, _ = known_rows(ann, rows, {"ranks": FOUR_RANKS, "keep_empty_taxa": True})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert kept.summary() == {"order": 2, "family": 3, "genus": 4, "species": 8}
    assert len(CHECKLIST_EXTRA) == 2


# ------------------------------------------------------------------ CLI
def test_cli_train_on_the_four_rank_partial_label_set(four, cli, one_thread, tmp_path):
    model = tmp_path / "model"
    cfg = write_config(four, model, epochs=10, group_by="track")
    out = cli("train", "--config", cfg, "--set", f"embeddings.cache={tmp_path / 'emb'}")
    assert out.count("left out of the model") == 1 and "Nothofagus antarctica" in out
    tax = Taxonomy.load(model / "taxonomy.json")
    assert tax.ranks == tuple(FOUR_RANKS)
    assert tax.summary() == {"order": 2, "family": 2, "genus": 3, "species": 6}
    assert not tax.find("Nothofagus")
    labels = json.loads((model / "labels.json").read_text())
    assert labels["order"] == ["Fagales", "Sapindales"]


@pytest.fixture(scope="module")
def emb_cache(tmp_path_factory):
    """One embedding cache for the CLI trainings of this module (same images)."""
    return tmp_path_factory.mktemp("emb")


@pytest.mark.parametrize("build", [three_rank_set, five_rank_set])
def test_cli_train_on_three_and_five_ranks(build, cli, one_thread, emb_cache, tmp_path):
    ds = build(tmp_path / "data")
    model = tmp_path / "model"
    out = cli("train", "--config", write_config(ds, model, epochs=5), "--set",
              f"embeddings.cache={emb_cache}", "--set", "data.ranks=auto")
    assert "model bundle written" in out
    tax = Taxonomy.load(model / "taxonomy.json")
    assert list(tax.ranks) == ds.ranks
    assert "Acer campestre" in tax.names("species")
    assert out.count(ds.ranks[0]) >= 1 and "species" in out


def test_cli_validate_counts_labels_at_each_rank(four, cli):
    out = cli("validate", four.train, "--images-root", four.images_root)
    assert "OK" in out and "1 family-level categories" in out
    assert "1 order-level categories" in out and "2 order taxa" in out


def test_config_takes_rank_lists_auto_and_keep_empty_taxa():
    from taxoclass.config import load_config

    cfg = load_config(None, ["data.ranks=auto", "data.keep_empty_taxa=true"])
    assert cfg["data"]["ranks"] == "auto" and cfg["data"]["keep_empty_taxa"] is True
    cfg = load_config(None, ["data.ranks=[order,family,species]"])
    assert cfg["data"]["ranks"] == ["order", "family", "species"]
    assert load_config(None, [])["data"]["keep_empty_taxa"] is False


def test_leaf_default_ranks_stay_three_and_auto_adds_its_order(shared_data):
    """Why ``auto`` is not the default: the leaf categories carry an order, so auto would
    add an order head and change every leaf result."""
    ann = load_annotations(shared_data / "leaf" / "annotations.json")
    rows = ann.labelled_images()
    tax, kept = known_rows(ann, rows, {"ranks": ["family", "genus", "species"]})
    assert tax.ranks == ("family", "genus", "species") and len(kept) == 990
    assert tax.summary() == {"family": 24, "genus": 34, "species": 98, "placeholders": 1}
    auto, _ = known_rows(ann, rows, {"ranks": "auto"})
    assert auto.ranks == ("order", "family", "genus", "species")


def test_cli_train_on_the_leaf_four_rank_set(shared_data, cli, one_thread, tmp_path):
    """The real leaf images (no copy): partial labels at every rank, a family without
    genera (Ginkgoaceae, on placeholders), a checklist with two image-less species."""
    ds = leaf_four_rank_set(tmp_path / "data", shared_data / "leaf", empty_taxa=True)
    model = tmp_path / "model"
    out = cli("train", "--config", write_config(ds, model, epochs=20, group_by="track"),
              "--set", f"embeddings.cache={tmp_path / 'emb'}")
    assert "2 categories have no labelled image" in out and "Nothofagus antarctica" in out
    tax = Taxonomy.load(model / "taxonomy.json")
    assert tax.ranks == tuple(FOUR_RANKS)
    assert tax.summary() == {"order": 16, "family": 24, "genus": 33, "species": 97,
                             "placeholders": 3}
    assert not tax.find("Nothofagus") and not tax.find("Ginkgo", "genus")
    assert tax.is_placeholder(("Ginkgoales", "Ginkgoaceae", "Ginkgoaceae sp."))
    ranks_line = {ln.split()[0]: ln.split() for ln in out.splitlines()
                  if ln.split() and ln.split()[0] in FOUR_RANKS}
    assert float(ranks_line["species"][2]) > 3 / 97  # validation accuracy above chance


def test_subfamily_and_tribe_are_known_ranks_in_order():
    from taxoclass.errors import TaxonomyError

    ranks = ("family", "subfamily", "tribe", "genus", "species")
    tax = Taxonomy.from_records([
        {"family": "Fabaceae", "subfamily": "Faboideae", "tribe": "Robinieae",
         "genus": "Robinia", "species": "pseudoacacia"},
        {"family": "Fabaceae", "subfamily": "Faboideae"}], ranks)
    assert tax.sizes == {"family": 1, "subfamily": 1, "tribe": 1, "genus": 1, "species": 1}
    y, _ = encode_labels(tax, pd.DataFrame([{"family": "Fabaceae", "subfamily": "Faboideae"}]))
    assert [int(y[r][0]) for r in ranks] == [0, 0, -1, -1, -1]
    with pytest.raises(TaxonomyError, match="not in top-down order"):
        Taxonomy.from_records([], ("family", "tribe", "subfamily", "genus"))


def test_cli_taxonomy_with_auto_ranks(four, cli):
    out = cli("taxonomy", four.train, "--ranks", "auto")  # the checklist: every category
    assert out.split() == ["order:", "2", "family:", "3", "genus:", "4", "species:", "8"]


def test_a_bare_epithet_without_a_genus_rank_is_a_warning(tmp_path):
    data = json.loads(three_rank_set(tmp_path).train.read_text())
    data["categories"][0]["species"] = "campestre"
    report = validate_annotations(data)
    assert report.ok
    warned = [str(p) for p in report.warnings if "binomial" in str(p)]
    assert len(warned) == 1 and "$.categories[0].species" in warned[0]
