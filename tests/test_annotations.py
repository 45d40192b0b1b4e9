"""Annotation validation: the real leaf file is clean; each kind of breakage is named."""

from __future__ import annotations

import copy
import json

import pytest

from taxoclass.errors import AnnotationError
from taxoclass.taxonomy.annotations import (
    load_annotations,
    read_class_mapping,
    read_species_table,
    validate_annotations,
)


@pytest.fixture(scope="module")
def leaf_dict(shared_data):
    return json.loads((shared_data / "leaf" / "annotations.json").read_text())


def test_leaf_annotations_validate_clean(shared_data):
    report = validate_annotations(shared_data / "leaf" / "annotations.json",
                                  images_root=shared_data / "leaf")
    assert report.ok, report.format()
    assert report.counts["images"] == 990
    assert report.counts["species taxa"] == 98
    assert report.counts["genus taxa"] == 34
    assert report.counts["genus-level categories"] == 1


def test_extra_fields_are_kept(shared_data):
    ann = load_annotations(shared_data / "leaf" / "annotations.json")
    assert "order" in ann.categories.columns
    df = ann.labelled_images()
    assert len(df) == 990 and {"family", "genus", "species", "path"} <= set(df.columns)


def _messages(data, **kw):
    return [str(p) for p in validate_annotations(data, **kw).errors]


def test_every_semantic_problem_is_listed(leaf_dict, shared_data):
    d = copy.deepcopy(leaf_dict)
    d["images"][2]["image_id"] = d["images"][0]["image_id"]  # duplicate id
    d["annotations"][3]["category_id"] = 999  # missing category
    d["annotations"][5]["genus_id"] = 7  # genus_id disagrees with category
    d["categories"][1]["family"] = "Rosaceae"  # Acer under two families: homonyms, a warning
    d["images"][4]["file_name"] = "images/nope.jpg"  # missing on disk
    report = validate_annotations(d, images_root=shared_data / "leaf")
    msgs = [str(p) for p in report.errors]
    joined = "\n".join(msgs)
    assert "$.images[2].image_id" in joined and "unique image_id" in joined
    assert "$.annotations[3].category_id" in joined and "found 999" in joined
    assert "$.annotations[5].genus_id" in joined and "Cercis" in joined
    assert "under one parent" not in joined  # the homonym is no error...
    warned = "\n".join(str(p) for p in report.warnings)
    assert "genus 'Acer' under one parent" in warned and "'Rosaceae'" in warned  # ...but named
    assert "homonyms" in warned
    assert "'images/nope.jpg' missing" in joined
    # the annotation of the renamed image now points at a missing image
    assert "$.annotations[2].image_id" in joined
    assert all("Fix:" in m for m in msgs)


def test_schema_violations_name_path_and_field(leaf_dict):
    d = copy.deepcopy(leaf_dict)
    d["images"][0]["file_name"] = 5
    d["categories"][2]["family"] = 7
    msgs = _messages(d)
    assert any(m.startswith("ERROR $.images[0].file_name") and "type string" in m for m in msgs)
    assert any(m.startswith("ERROR $.categories[2].family") and "type string" in m
               for m in msgs)


def test_a_missing_rank_above_a_filled_one_is_named(leaf_dict):
    """Issue 15: rank fields are optional (a label may stop at any rank), but a genus
    missing above a species is a gap: named with the rank, the taxon below and a fix."""
    d = copy.deepcopy(leaf_dict)
    del d["categories"][2]["genus"]
    msgs = [m for m in _messages(d) if "$.categories" in m]
    assert len(msgs) == 1
    assert msgs[0].startswith("ERROR $.categories[2].genus")
    assert "a non-empty genus (above the species" in msgs[0]
    assert "every rank above its lowest one must be filled" in msgs[0]


def test_broken_json_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"image_id": 1,,}\n]}')
    with pytest.raises(AnnotationError, match=r"bad\.json: broken JSON at line 2"):
        load_annotations(bad)


def test_load_refuses_inconsistent_file(tmp_path, leaf_dict):
    d = copy.deepcopy(leaf_dict)
    d["annotations"][1]["category_id"] = 999
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(d))
    with pytest.raises(AnnotationError, match=r"ann\.json: ERROR \$\.annotations\[1\]") as err:
        load_annotations(path)  # one problem: one line
    assert "\n" not in str(err.value) and "Fix:" in str(err.value)
    d["annotations"][2]["category_id"] = 998
    path.write_text(json.dumps(d))
    with pytest.raises(AnnotationError, match="has 2 problems") as err:
        load_annotations(path)  # several: the list, and where the full report is
    assert "taxoclass validate" in str(err.value)


def test_embed_load_refuses_image_problems_and_warns_about_labels(tmp_path, leaf_dict, caplog):
    d = copy.deepcopy(leaf_dict)
    d["annotations"][1]["category_id"] = 999
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(d))
    with caplog.at_level("WARNING", logger="taxoclass"):
        ann = load_annotations(path, check=False)  # label problems: a warning
    assert len(ann.images) == 990 and "training and evaluation will refuse" in caplog.text
    d["images"][0]["file_name"] = "../outside.jpg"
    path.write_text(json.dumps(d))
    with pytest.raises(AnnotationError, match="leaves the images root"):
        load_annotations(path, check=False)
    assert len(load_annotations(path, check=False, allow_outside_root=True).images) == 990


def test_outside_root_and_text_collisions(leaf_dict):
    from taxoclass.taxonomy.annotations import outside_root_allowed, outside_root_reason

    assert outside_root_reason("images/1.jpg") is None
    assert outside_root_reason("images/../images/1.jpg") is None
    assert outside_root_reason("images/../../x.jpg") == "a path that leaves the images root ('..')"
    for absolute in ("/etc/passwd", "~/x.jpg", "C:\\x.jpg", "\\\\server\\x.jpg"):
        assert outside_root_reason(absolute) == "an absolute path", absolute
    d = copy.deepcopy(leaf_dict)
    d["images"][0]["file_name"] = "/etc/hostname"
    assert not validate_annotations(d).ok
    with outside_root_allowed():
        assert validate_annotations(d).ok
    assert not validate_annotations(d).ok  # the context ends with the block
    d = copy.deepcopy(leaf_dict)
    d["images"][5]["image_id"] = str(d["images"][0]["image_id"])
    msgs = _messages(d)
    assert any("$.images[5].image_id" in m and "reads as '1'" in m for m in msgs)


def test_missing_images_root_is_reported(leaf_dict, tmp_path):
    msgs = _messages(leaf_dict, images_root=tmp_path / "nowhere")
    assert len(msgs) == 1 and "no such directory" in msgs[0]


def test_image_list_without_categories_is_valid(shared_data):
    report = validate_annotations(shared_data / "leaf" / "unlabelled.json",
                                  images_root=shared_data / "leaf")
    assert report.ok and report.counts["images"] == 594


def test_species_table_and_class_mapping(shared_data):
    pc = shared_data / "plantclef2024"
    table = read_species_table(pc / "plantclef2024_species_DERIVED_genus_family_from_inat.csv")
    assert {"species_id", "species", "genus", "family"} <= set(table.columns)
    assert len(table) == 7806
    names = read_species_table(pc / "species_id_to_name.txt")
    assert names.loc[0, "genus"] == "Taxus"
    ids = read_class_mapping(pc / "class_mapping.txt")
    assert len(ids) == 7806 and ids[0] == "1355868"
    assert set(ids) <= set(names["species_id"])


def test_control_characters_in_file_names_are_refused(leaf_dict):
    d = copy.deepcopy(leaf_dict)
    d["images"][3]["file_name"] = "images/4.jpg\x00.png"  # the OS cannot even open it
    msgs = _messages(d)
    assert len(msgs) == 1 and "$.images[3].file_name" in msgs[0] and "\\x00" in msgs[0]
