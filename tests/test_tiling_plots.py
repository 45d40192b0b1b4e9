"""Tiling geometry and plot aggregation across the taxonomic tree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from taxoclass.errors import ConfigError, TaxonomyError
from taxoclass.model.decoding import decode_leaf_probabilities
from taxoclass.plots.rules import aggregate_plot, apply_checklist, tile_assignments
from taxoclass.plots.selection import RULES, keep_top_k
from taxoclass.plots.tiling import (
    PhotoFailure,
    PlotTiles,
    classify_photo,
    classify_photos,
    crop_tiles,
    embed_tiles,
    make_tiles,
)
from taxoclass.taxonomy.tree import Taxonomy

torch.set_num_threads(1)

RECORDS = [
    {"family": "Cyperaceae", "genus": "Carex", "species": "nigra"},
    {"family": "Cyperaceae", "genus": "Carex", "species": "flacca"},
    {"family": "Juncaceae", "genus": "Juncus", "species": "effusus"},
    {"family": "Poaceae", "genus": "Poa", "species": "annua"},
    {"family": "Poaceae", "genus": "Poa", "species": "pratensis"},
    {"family": "Hydrangeaceae", "genus": "Philadelphus", "species": ""},
]
TAX = Taxonomy.from_records(RECORDS)
N_LEAF = TAX.n_classes("species")


def leaf_probs(*tiles: dict[str, float]) -> dict[str, np.ndarray]:
    """Coherent per-rank probabilities from ``{species name: prob}`` per tile (rest spread)."""
    rows = []
    for tile in tiles:
        row = np.zeros(N_LEAF)
        for name, p in tile.items():
            row[TAX.index(TAX.find(name, "species")[0])] = p
        rest = 1.0 - row.sum()
        free = row == 0
        row[free] = rest / free.sum() if free.any() else 0.0
        rows.append(row)
    return decode_leaf_probabilities(np.array(rows), TAX).probs


# ---------------------------------------------------------------------- tiling
@pytest.mark.parametrize("overlap", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("size", [(1000, 700), (517, 389)])
def test_tiles_cover_the_image_with_the_requested_overlap(size, overlap):
    w, h = size
    tiles = make_tiles(size, grids=(3, (2, 4)), overlap=overlap, plot_id="p1")
    assert len(tiles) == 9 + 8
    assert {t.scale for t in tiles} == {"3x3", "2x4"}
    for scale in ("3x3", "2x4"):
        ts = [t for t in tiles if t.scale == scale]
        covered = np.zeros((h, w), dtype=int)
        for t in ts:
            x0, y0, x1, y1 = t.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            covered[y0:y1, x0:x1] += 1
        assert covered.min() >= 1, "every pixel lies in a tile"
        # Neighbours along a row share `overlap` of a tile's width (±1 px rounding).
        row0 = sorted((t for t in ts if t.row == 0), key=lambda t: t.col)
        for a, b in zip(row0, row0[1:]):
            shared = a.box[2] - b.box[0]
            assert abs(shared - overlap * a.width) <= 1.5
        widths = {t.width for t in ts}
        assert max(widths) - min(widths) <= 1
    assert all(t.plot_id == "p1" for t in tiles)


def test_tile_size_mode_and_crops():
    img = Image.new("RGB", (1200, 800), (10, 120, 10))
    tiles = make_tiles(img.size, tile_size=518, overlap=0.25)
    assert all(t.scale == "2x3" for t in tiles)  # ceil((800-518)/388.5)+1 rows, 3 columns
    crops = crop_tiles(img, tiles)
    assert [c.size for c in crops] == [(t.width, t.height) for t in tiles]
    with pytest.raises(ConfigError, match="overlap"):
        make_tiles(img.size, overlap=1.0)
    with pytest.raises(ConfigError, match="grid"):
        make_tiles(img.size, grids=("axb",))


def test_tilings_are_bounded():
    """At most MAX_TILES tiles per photo (refused before any photo is read), tiles of at
    least MIN_TILE_PX px (else that photo is an ImageError, a failure row of a batch)."""
    from taxoclass.errors import ImageError
    from taxoclass.plots.tiling import MAX_TILES, MIN_TILE_PX, check_grids, parse_grid

    assert parse_grid(50) == (50, 50) and MAX_TILES == 2500
    with pytest.raises(ConfigError, match="1,000,000 tiles"):
        parse_grid(1000)
    with pytest.raises(ConfigError, match="3,160 tiles"):
        check_grids(["40", "39x40"])
    assert check_grids([2, "2x2", "4"]) == ["2x2", "4x4"]
    with pytest.raises(ImageError, match="tiles"):
        make_tiles((3000, 3000), tile_size=10)
    with pytest.raises(ImageError, match="4x4 grid does not fit.*coarser grid"):
        make_tiles((4 * MIN_TILE_PX - 1, 400), grids=(4,))
    assert len(make_tiles((4 * MIN_TILE_PX, 4 * MIN_TILE_PX), grids=(4,))) == 16


def test_embed_tiles_in_batches(leaf_image_paths, tiny_dino_kwargs):
    from taxoclass.features.backbones import create_backbone
    from taxoclass.io.images import load_image

    bb = create_backbone("vit_base_patch14_reg4_dinov2", pretrained=False,
                         model_kwargs=tiny_dino_kwargs)
    img = load_image(leaf_image_paths[0])
    tiles = make_tiles(img.size, grids=(2,), overlap=0.1)
    emb = embed_tiles(img, tiles, bb, batch_size=3)
    assert emb.shape == (4, 64) and np.isfinite(emb).all()
    one = embed_tiles(img, tiles[:1], bb, batch_size=3)
    np.testing.assert_allclose(one[0], emb[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("rule,th", [("max", None), ("noisy_or", None),
                                     ("mean", {"species": 0.5, "genus": 0.6}),
                                     ("argmax_union", {"species": 0.6})])
def test_genus_record_when_tiles_agree_on_genus_but_split_on_species(rule, th):
    probs = leaf_probs({"Carex nigra": 0.48, "Carex flacca": 0.47},
                       {"Carex nigra": 0.47, "Carex flacca": 0.48},
                       {"Carex nigra": 0.46, "Carex flacca": 0.49})
    recs = aggregate_plot(probs, TAX, plot_id="q", rule=rule, thresholds=th)
    assert [(r.taxon_rank, r.taxon) for r in recs] == [("genus", "Carex sp.")]
    assert recs[0].n_tiles == 3 and recs[0].reason == "backoff_to_genus:low_confidence"
    assert recs[0].rule == rule and recs[0].tile_share == pytest.approx(1.0)
    assert recs[0].score == pytest.approx(0.95 if rule != "noisy_or" else 1 - 0.05 ** 3)


def test_species_reported_not_its_genus():
    probs = leaf_probs({"Carex nigra": 0.9}, {"Carex nigra": 0.4, "Carex flacca": 0.5})
    recs = aggregate_plot(probs, TAX, rule="max")
    assert [r.taxon for r in recs] == ["Carex nigra", "Carex flacca"] or \
        [r.taxon for r in recs] == ["Carex nigra"]
    assert "Carex sp." not in {r.taxon for r in recs}


def test_argmax_union_is_the_baseline():
    probs = leaf_probs({"Carex nigra": 0.3}, {"Poa annua": 0.2}, {"Carex nigra": 0.25})
    recs = aggregate_plot(probs, TAX, rule="argmax_union")
    assert {r.taxon: r.n_tiles for r in recs} == {"Carex nigra": 2, "Poa annua": 1}


def test_unknown_tiles_are_counted_not_named():
    probs = leaf_probs({"Poa annua": 0.95}, {"Juncus effusus": 0.9}, {"Poa annua": 0.97},
                       {"Juncus effusus": 0.8})
    recs = aggregate_plot(probs, TAX, plot_id="q", rule="max", unknown=[True, False, True, False])
    assert [(r.taxon_rank, r.taxon, r.n_tiles) for r in recs] == [
        ("species", "Juncus effusus", 2), ("unknown", "unknown", 2)]
    assert recs[-1].reason == "unknown:outlier" and recs[-1].tile_share == pytest.approx(0.5)
    assert np.isnan(recs[-1].score) and recs[-1].to_dict()["score"] is None  # no score 1.0
    assert (recs[0].reason, recs[0].rule) == ("species", "max")
    labels = tile_assignments(recs, probs, TAX, unknown=[True, False, True, False])
    assert labels == ["unknown", "Juncus effusus", "unknown", "Juncus effusus"]


def test_placeholder_species_reported_once_at_genus_rank():
    probs = leaf_probs({"Philadelphus sp.": 0.9}, {"Philadelphus sp.": 0.8})
    recs = aggregate_plot(probs, TAX, rule="noisy_or")
    assert [(r.taxon_rank, r.taxon, r.node) for r in recs] == [
        ("genus", "Philadelphus sp.", ("Hydrangeaceae", "Philadelphus"))]


def test_family_record_when_genera_split():
    probs = leaf_probs({"Poa annua": 0.3, "Carex nigra": 0.35, "Carex flacca": 0.34})
    recs = aggregate_plot(probs, TAX, rule="max", thresholds={"species": 0.5, "genus": 0.8,
                                                              "family": 0.6})
    assert [(r.taxon_rank, r.taxon) for r in recs] == [("family", "Cyperaceae")]


def test_checklist_restricts_and_renormalises():
    probs = leaf_probs({"Carex nigra": 0.6, "Poa annua": 0.3, "Poa pratensis": 0.1})
    restricted, empty = apply_checklist(probs, TAX, ["Poa", "Juncus effusus"])
    i = TAX.index(TAX.find("Poa annua", "species")[0])
    assert restricted["species"][0, i] == pytest.approx(0.3 / 0.4, rel=1e-5)
    assert restricted["genus"][0, TAX.index(("Poaceae", "Poa"))] == pytest.approx(1.0)
    assert not empty.any()
    recs = aggregate_plot(probs, TAX, rule="max", checklist=["Poaceae"])
    assert [r.taxon for r in recs] == ["Poa annua"] and (recs[0].reason, recs[0].rule) == (
        "species", "max+checklist")
    off = leaf_probs({"Carex nigra": 1.0})
    recs = aggregate_plot(off, TAX, rule="max", checklist=["Poa"])
    assert [(r.taxon, r.reason) for r in recs] == [("unknown", "unknown:outlier")]
    with pytest.raises(TaxonomyError, match="checklist"):
        apply_checklist(probs, TAX, ["Quercus robur"])


def test_keep_top_k():
    a = np.array([[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.1, 0.1]])
    np.testing.assert_allclose(keep_top_k(a, 2), [[0, 0.5, 0.3, 0], [0.7, 0.1, 0, 0]])
    np.testing.assert_allclose(keep_top_k(a, 4), a)
    with pytest.raises(ConfigError, match="top_k"):
        keep_top_k(a, 0)


def test_top_k_stops_small_probabilities_adding_up():
    # Poa annua is second in 4 tiles at 0.3 and first in one at 0.4: noisy-or gives
    # 1 - 0.7**4 * 0.6 = 0.86, though no tile is sure of it
    tiles = [{"Carex nigra": 0.6, "Poa annua": 0.3}, {"Juncus effusus": 0.6, "Poa annua": 0.3},
             {"Carex flacca": 0.6, "Poa annua": 0.3}, {"Poa pratensis": 0.6, "Poa annua": 0.3},
             {"Poa annua": 0.4, "Carex nigra": 0.35}]
    probs = leaf_probs(*tiles)
    th = {"species": 0.7, "genus": 0.99, "family": 0.99}
    names = {r.taxon for r in aggregate_plot(probs, TAX, rule="noisy_or", thresholds=th)}
    assert "Poa annua" in names
    names = {r.taxon for r in aggregate_plot(probs, TAX, rule="noisy_or", thresholds=th,
                                              top_k=1)}
    assert "Poa annua" not in names


def test_min_tile_prob_drops_unsure_tiles_without_calling_them_unknown():
    probs = leaf_probs({"Carex nigra": 0.9}, {"Poa annua": 0.25}, {"Poa annua": 0.25})
    th = {"species": 0.2, "genus": 0.9, "family": 0.9}
    recs = aggregate_plot(probs, TAX, rule="mean", thresholds=th)
    assert {r.taxon for r in recs} == {"Carex nigra"}  # mean 0.3 vs 0.18
    recs = aggregate_plot(probs, TAX, rule="max", thresholds=th, min_tile_prob=0.5)
    assert [(r.taxon, r.n_tiles) for r in recs] == [("Carex nigra", 1)]
    recs = aggregate_plot(probs, TAX, rule="max", thresholds=th, min_tile_prob=0.95)
    assert recs == []


def test_min_tiles_needs_two_supporting_tiles():
    probs = leaf_probs({"Carex nigra": 0.9}, {"Poa annua": 0.8}, {"Poa annua": 0.7})
    recs = aggregate_plot(probs, TAX, rule="max", thresholds={"species": 0.5}, min_tiles=2)
    assert [(r.taxon, r.n_tiles) for r in recs] == [("Poa annua", 2)]


tile_rows = st.lists(st.lists(st.floats(0.0, 1.0), min_size=N_LEAF, max_size=N_LEAF),
                     min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(rows=tile_rows, rule=st.sampled_from(RULES),
       th=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
       flags=st.lists(st.booleans(), min_size=6, max_size=6))
def test_never_a_taxon_and_its_own_ancestor(rows, rule, th, flags):
    leaf = np.asarray(rows) + 1e-6
    leaf = leaf / leaf.sum(axis=1, keepdims=True)
    probs = decode_leaf_probabilities(leaf, TAX).probs
    thresholds = dict(zip(("family", "genus", "species"), th))
    recs = aggregate_plot(probs, TAX, rule=rule, thresholds=thresholds,
                          unknown=flags[: len(leaf)])
    nodes = [r.node for r in recs if r.taxon_rank != "unknown"]
    assert len(nodes) == len(set(nodes))
    for a in nodes:
        for b in nodes:
            if a != b:
                assert b[: len(a)] != a, f"{a} reported together with its descendant {b}"
    for r in recs:
        if r.taxon_rank == "unknown":  # no score: the share of tiles has its own column
            assert np.isnan(r.score) and 0.0 < r.tile_share <= 1.0
            continue
        assert 0.0 <= r.score <= 1.0 + 1e-9
        assert r.taxon == TAX.label(r.node)


class _FixedClassifier:
    """Every tile gets the same leaf probabilities; records the tile sizes it was shown."""

    taxonomy = TAX

    def __init__(self) -> None:
        self.seen: list[list[tuple[int, int]]] = []

    def predict_tiles(self, images):
        self.seen.append([im.size for im in images])
        leaf = np.full((len(images), N_LEAF), 1.0 / N_LEAF, dtype=np.float32)
        return decode_leaf_probabilities(leaf, TAX)

    def describe(self) -> dict:
        return {"kind": "fixed", "backbone": {"name": "none"}}


def test_classify_photo_tiles_classifies_and_flags(tmp_path):
    photo = tmp_path / "CBN-1.png"
    Image.new("RGB", (40, 30), (90, 120, 60)).save(photo)
    clf = _FixedClassifier()
    pt = classify_photo(clf, photo, grids=(1, 2), flag_unknown=lambda d: np.arange(5) == 4)
    assert pt.plot_id == "CBN-1" and pt.photo == str(photo) and pt.size == (40, 30)
    assert pt.scales.tolist() == ["1x1"] + ["2x2"] * 4
    assert clf.seen == [[(40, 30), (20, 15), (20, 15), (20, 15), (20, 15)]]
    assert pt.unknown.tolist() == [False, False, False, False, True]
    assert pt.probs["species"].dtype == np.float64 and pt.probs["genus"].shape == (5, 4)
    assert np.allclose(pt.probs["species"], 1.0 / N_LEAF) and pt.image is None
    in_memory = classify_photo(clf, Image.open(photo), grids=(2,), keep_image=True)
    assert in_memory.plot_id == "" and in_memory.image.size == (40, 30)
    assert not in_memory.unknown.any() and len(in_memory.tiles) == 4


def test_classify_photos_records_unreadable_photos_and_reports_progress(tmp_path):
    good = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(good)
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"not an image")
    calls = []
    items = list(classify_photos(_FixedClassifier(), [good, bad, good], grids=(2,),
                                 progress=lambda d, t: calls.append((d, t))))
    assert [type(i) for i in items] == [PlotTiles, PhotoFailure, PlotTiles]
    assert [items[0].plot_id, items[2].plot_id] == ["a", "a__2"]
    assert items[1].photo == str(bad) and items[1].error
    assert items[1].to_dict() == {"photo": str(bad), "error": items[1].error}
    assert calls == [(1, 3), (2, 3), (3, 3)]
