"""Taxonomy: full-path identity, index arrays, LCA/distance, partial labels, real data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from taxoclass.errors import TaxonomyError
from taxoclass.taxonomy.tree import INCERTAE_SEDIS, Taxonomy

RECORDS = [
    {"family": "Fagaceae", "genus": "Quercus", "species": "robur"},
    {"family": "Fagaceae", "genus": "Quercus", "species": "ilex"},
    {"family": "Fagaceae", "genus": "Fagus", "species": "sylvatica"},
    {"family": "Sapindaceae", "genus": "Acer", "species": "rubrum"},
    {"family": "Hydrangeaceae", "genus": "Philadelphus", "species": ""},
]


@pytest.fixture
def tax() -> Taxonomy:
    return Taxonomy.from_records(RECORDS)


def test_counts_and_index_arrays(tax):
    assert tax.summary() == {"family": 3, "genus": 4, "species": 4, "placeholders": 1}
    species = tax.names("species")
    genus = tax.names("genus")
    family = tax.names("family")
    to_genus = tax.parent_index("species")
    to_family = tax.parent_index("species", "family")
    for i, sp in enumerate(species):
        assert sp.split()[0] == genus[to_genus[i]]
    assert family[to_family[species.index("Quercus robur")]] == "Fagaceae"
    assert family[tax.parent_index("genus")[genus.index("Acer")]] == "Sapindaceae"
    assert to_genus.dtype == np.int64 and len(to_genus) == tax.n_classes("species")


def test_genus_only_label_maps_to_placeholder_and_reports_genus(tax):
    node = tax.node_for({"family": "Hydrangeaceae", "genus": "Philadelphus", "species": ""})
    assert node == ("Hydrangeaceae", "Philadelphus", "Philadelphus sp.")
    assert tax.is_placeholder(node)
    assert tax.reported(node) == ("Hydrangeaceae", "Philadelphus")
    assert tax.label(node) == "Philadelphus sp."
    assert all(v >= 0 for v in tax.path_indices(node).values())


def test_genus_label_in_genus_with_species_is_partial(tax):
    node = tax.node_for({"family": "Fagaceae", "genus": "Quercus", "species": ""})
    assert node == ("Fagaceae", "Quercus")
    idx = tax.path_indices(node)
    assert idx["species"] == -1 and idx["genus"] == tax.names("genus").index("Quercus")
    assert tax.label(node) == "Quercus sp."


def test_same_genus_name_under_two_families_stays_two_nodes():
    tax = Taxonomy.from_records([
        {"family": "Asteraceae", "genus": "Aster", "species": "alpinus"},
        {"family": "Rosaceae", "genus": "Aster", "species": "fictus"},
    ])
    assert tax.n_classes("genus") == 2
    assert len(tax.find("Aster", "genus")) == 2


def test_lca_and_distance(tax):
    robur = tax.node_for(RECORDS[0])
    ilex = tax.node_for(RECORDS[1])
    fagus = tax.node_for(RECORDS[2])
    acer = tax.node_for(RECORDS[3])
    assert tax.lca(robur, ilex) == ("Fagaceae", "Quercus")
    assert tax.distance(robur, ilex) == 2
    assert tax.distance(robur, fagus) == 4
    assert tax.lca(robur, acer) == ()
    assert tax.distance(robur, acer) == 6
    assert tax.ancestors(robur) == [("Fagaceae", "Quercus"), ("Fagaceae",), ()]


def test_missing_family_filled_from_other_rows_or_incertae_sedis():
    tax = Taxonomy.from_records([
        {"family": "Fagaceae", "genus": "Quercus", "species": "robur"},
        {"family": "", "genus": "Quercus", "species": "ilex"},
        {"family": "", "genus": "Nothus", "species": "novus"},
    ])
    assert tax.node_for({"family": "Fagaceae", "genus": "Quercus", "species": "ilex"})
    assert (INCERTAE_SEDIS, "Nothus") in tax.nodes("genus")


def test_unknown_taxon_and_rank_errors(tax):
    with pytest.raises(TaxonomyError, match="not in this taxonomy"):
        tax.node_for({"family": "Fagaceae", "genus": "Quercus", "species": "suber"})
    with pytest.raises(TaxonomyError, match="Unknown rank 'tribe'"):
        tax.names("tribe")


def test_round_trip_through_json(tax):
    again = Taxonomy.from_dict(json.loads(json.dumps(tax.to_dict())))
    assert again == tax
    node = ("Hydrangeaceae", "Philadelphus", "Philadelphus sp.")
    assert again.is_placeholder(node)
    np.testing.assert_array_equal(again.parent_index("species"), tax.parent_index("species"))


def test_naflora_mini_exact_counts(shared_data):
    from taxoclass.taxonomy.annotations import load_annotations

    ann = load_annotations(shared_data / "naflora-mini" / "metadata.json")
    tax = ann.taxonomy()
    assert tax.summary() == {"family": 162, "genus": 829, "species": 1863}
    # every category maps to a species node whose genus and family match the record
    for rec in ann.categories.sample(200, random_state=0).to_dict("records"):
        node = tax.node_for(rec)
        assert node[0] == rec["family"] and node[1] == rec["genus"]


def test_plantclef_species_table(shared_data):
    from taxoclass.taxonomy.loading import load_taxonomy

    tax = load_taxonomy(shared_data / "plantclef2024"
                        / "plantclef2024_species_DERIVED_genus_family_from_inat.csv")
    assert tax.n_classes("species") == 7806
    assert "Lactuca virosa L." in tax.names("species")


def test_ranks_must_come_top_down():
    with pytest.raises(TaxonomyError, match="not in top-down order.*family,genus,species"):
        Taxonomy.from_records([{"family": "F", "genus": "G", "species": "s"}],
                              ("species", "genus", "family"))
    # rank names of the caller's own are not ordered
    tax = Taxonomy.from_records([{"clade": "C", "genus": "G", "species": "s"}],
                                ("clade", "genus", "species"))
    assert tax.sizes == {"clade": 1, "genus": 1, "species": 1}


def test_species_table_without_a_rank_column_is_refused(tmp_path):
    from taxoclass.errors import AnnotationError
    from taxoclass.taxonomy.loading import load_taxonomy

    table = tmp_path / "t.csv"
    table.write_text("species,genus\nAcer rubrum,Acer\n")
    with pytest.raises(AnnotationError, match="no 'order' column"):
        load_taxonomy(table, ("order", "family", "genus", "species"))
