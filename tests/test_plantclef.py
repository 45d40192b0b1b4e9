"""PlantCLEF 2024 checkpoint layout → rank-aware tile classifier (zero training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from taxoclass.errors import AnnotationError
from taxoclass.io.images import load_image
from taxoclass.plots.plantclef import PlantCLEFClassifier, plantclef_taxonomy
from taxoclass.plots.tiling import TileClassifier, crop_tiles, make_tiles
from taxoclass.taxonomy.annotations import read_class_mapping, read_species_table

torch.set_num_threads(1)

SPECIES_CSV = "plantclef2024_species_DERIVED_genus_family_from_inat.csv"


@pytest.fixture(scope="module")
def plantclef_files(shared_data: Path, tmp_path_factory, tiny_dino_kwargs_module):
    folder = shared_data / "plantclef2024"
    if not (folder / "class_mapping.txt").is_file():
        pytest.skip(f"{folder} lacks class_mapping.txt")
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False,
                              num_classes=7806, **tiny_dino_kwargs_module)
    with torch.no_grad():  # a head with visible preferences, so softmax is not flat
        model.head.weight.mul_(50.0)
    ckpt = tmp_path_factory.mktemp("plantclef") / "model_best.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, ckpt)
    return ckpt, folder / "class_mapping.txt", folder / SPECIES_CSV


@pytest.fixture(scope="module")
def tiny_dino_kwargs_module():
    return dict(img_size=56, depth=2, embed_dim=64, num_heads=2)


@pytest.fixture(scope="module")
def classifier(plantclef_files, tiny_dino_kwargs_module):
    ckpt, mapping, table = plantclef_files
    return PlantCLEFClassifier.from_files(ckpt, mapping, table,
                                          model_kwargs=tiny_dino_kwargs_module, batch_size=4)


@pytest.fixture(scope="module")
def tiles(leaf_image_paths):
    img = load_image(leaf_image_paths[0])
    return crop_tiles(img, make_tiles(img.size, grids=(2,)))


def test_head_units_map_to_species_via_class_mapping(classifier, plantclef_files, tiles):
    _, mapping, table = plantclef_files
    ids = read_class_mapping(mapping)
    names = read_species_table(table).set_index("species_id")["species"]
    tax = classifier.taxonomy
    assert isinstance(classifier, TileClassifier)
    assert tax.n_classes("species") == 7806
    leaf = classifier.mapping.unit_to_leaf
    assert sorted(leaf.tolist()) == list(range(7806))  # a permutation
    for unit in (0, 1, 777, 7805):
        node = tax.node("species", int(leaf[unit]))
        assert node[-1] == names[ids[unit]]
        assert classifier.taxon_ids()[node] == ids[unit]
    units = classifier.unit_probabilities(tiles)
    dec = classifier.predict_tiles(tiles)
    assert units.shape == (4, 7806)
    np.testing.assert_allclose(dec.probs["species"][:, leaf], units, rtol=1e-5, atol=1e-7)
    best_unit = units.argmax(axis=1)
    assert (dec.path["species"] == leaf[best_unit]).all()


def test_genus_and_family_probs_are_sums_of_species(classifier, tiles):
    tax = classifier.taxonomy
    dec = classifier.predict_tiles(tiles)
    sp = dec.probs["species"]
    for rank in ("genus", "family"):
        up = tax.parent_index("species", rank)
        expected = np.zeros((len(sp), tax.n_classes(rank)))
        np.add.at(expected.T, up, sp.T)
        np.testing.assert_allclose(dec.probs[rank], expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(dec.probs[rank].sum(axis=1), 1.0, rtol=1e-4)
    carex = tax.find("Carex", "genus")[0]
    kids = [tax.index(k) for k in tax.children(carex)]
    np.testing.assert_allclose(dec.probs["genus"][:, tax.index(carex)], sp[:, kids].sum(axis=1),
                               rtol=1e-4, atol=1e-7)
    desc = classifier.describe()
    assert desc["kind"] == "plantclef-checkpoint" and desc["n_units"] == 7806
    assert desc["backbone"]["weights_source"] == "checkpoint"


def test_missing_species_named_in_error(plantclef_files):
    _, mapping, table = plantclef_files
    ids = read_class_mapping(mapping)
    df = read_species_table(table)
    dropped = df[~df["species_id"].isin(ids[:3])]
    with pytest.raises(AnnotationError, match=rf"3 of the 7806 .*{ids[0]}"):
        plantclef_taxonomy(ids, dropped)


def test_families_filled_for_species_without_one(plantclef_files):
    _, mapping, table = plantclef_files
    df = read_species_table(table)
    no_family = df[df["family"] == ""]
    assert len(no_family)
    mapped = plantclef_taxonomy(read_class_mapping(mapping), df)
    node = mapped.taxonomy.find(no_family.iloc[0]["species"], "species")[0]
    assert node[0]  # a family: the genus's family elsewhere in the table, or incertae sedis
