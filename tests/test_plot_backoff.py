"""Plot tiles back off through the same back-off as single images (issue 16, item 4).

An outlier tile is not ``unknown`` when its evidence passes at genus or family: it counts
at that rank in the plot records; unknown only where no rank passes. ``outlier_check=False``
turns the back-off off (every tile counts at every rank). The tile answers are the ones
``predict`` gives for the same crops, and the Spark engine's replay gives the same tiles.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from taxoclass.plots.report import plot_report
from taxoclass.plots.tiling import (
    BundleTileClassifier,
    classify_photo,
    crop_tiles,
    make_tiles,
    mask_below,
    tile_ranks,
)

GRIDS = (2,)


@pytest.fixture(scope="module")
def classifier(fixture_model) -> BundleTileClassifier:
    clf = BundleTileClassifier.load(fixture_model["model"], batch_size=8)
    assert clf.bundle.scorer is not None, "the fixture model has an open-set scorer"
    return clf


class _FarDetector:
    """The fixture's outlier detector, but every tile lies far from the training images."""

    def __init__(self, detector) -> None:
        self._detector = detector

    def decision_function(self, x, groups=None):
        return np.full(len(x), 1e3)

    def __getattr__(self, name: str):
        return getattr(self._detector, name)


def _with_scorer(clf: BundleTileClassifier, thresholds: dict[str, float], *,
                 all_outliers: bool) -> BundleTileClassifier:
    """``clf`` whose scorer uses these back-off thresholds (``None``: the fitted one) and,
    with ``all_outliers``, whose outlier detector puts every tile far away."""
    scorer = copy.copy(clf.bundle.scorer)
    fitted = scorer.thresholds.thresholds
    scorer.thresholds = replace(scorer.thresholds, thresholds={
        r: fitted[r] if thresholds.get(r) is None else thresholds[r] for r in fitted})
    if all_outliers:
        scorer.detector = _FarDetector(scorer.detector)
    return BundleTileClassifier(replace(clf.bundle, scorer=scorer), clf.backbone, batch_size=8)


def _photo(fixture_set):
    return sorted(fixture_set["plots"].glob("*.jpg"))[0]


def test_outlier_tiles_back_off_to_genus_instead_of_unknown(classifier, fixture_set, tmp_path):
    # every tile far from the training images (the old plot report: all unknown); the
    # species threshold stays the fitted one, genus and family always pass
    clf = _with_scorer(classifier, {"family": -math.inf, "genus": -math.inf,
                                    "species": None}, all_outliers=True)
    photo = _photo(fixture_set)
    pt = classify_photo(clf, photo, grids=GRIDS, flag_unknown=clf.back_off_tiles)
    answers = clf.tile_answers(clf.embed(crop_tiles(pt.image or _open(photo), pt.tiles)))
    assert answers["outlier"].any() and (answers["taxon_rank"] == "genus").all()
    assert pt.ranks.tolist() == ["genus"] * 4 and not pt.unknown.any()
    assert (pt.probs["species"] == 0).all()  # no species evidence from a genus answer
    np.testing.assert_allclose(pt.probs["genus"], pt.decoded.probs["genus"])

    res = plot_report(clf, [photo], tmp_path / "rep", grids=GRIDS, rule="max",
                      thresholds={"genus": 0.0, "family": 0.0},
                      flag_unknown=clf.back_off_tiles)
    recs = res.records[photo.stem]
    assert recs and {r.taxon_rank for r in recs} == {"genus"}  # not unknown, not species
    # each tile backed off to genus counts for its genus, at genus rank
    genus_names = np.asarray(clf.taxonomy.names("genus"), dtype=object)
    expected = Counter(f"{g} sp." for g in genus_names[pt.decoded.path["genus"]])
    assert {r.taxon: r.n_tiles for r in recs} == dict(expected)
    assert sum(r.n_tiles for r in recs) == 4
    doc = json.loads((tmp_path / "rep" / "plot_records.json").read_text())
    assert doc["plots"][0]["n_unknown_tiles"] == 0 and doc["settings"]["outlier_check"] is True
    # the tile grid shows each tile's genus record, never unknown
    assert sorted(res.plots[0].tile_labels) == sorted(expected.elements())


def _open(photo):
    from taxoclass.io.images import load_image

    return load_image(photo)


def test_unknown_only_when_no_rank_passes_and_the_switch_turns_it_off(classifier, fixture_set,
                                                                       tmp_path):
    nothing = _with_scorer(classifier, {"family": math.inf, "genus": math.inf,
                                        "species": math.inf}, all_outliers=False)
    photo = _photo(fixture_set)
    on = plot_report(nothing, [photo], tmp_path / "on", grids=GRIDS, rule="max",
                     flag_unknown=nothing.back_off_tiles)
    assert [(r.taxon_rank, r.n_tiles) for r in on.records[photo.stem]] == [("unknown", 4)]
    off = plot_report(nothing, [photo], tmp_path / "off", grids=GRIDS, rule="max",
                      thresholds={"species": 0.0}, flag_unknown=nothing.back_off_tiles,
                      outlier_check=False)
    recs = off.records[photo.stem]
    assert recs and "unknown" not in {r.taxon_rank for r in recs}
    assert {r.taxon_rank for r in recs} == {"species"}  # every tile counts at every rank
    assert off.plots[0].n_unknown == 0 and "unknown" not in off.plots[0].tile_labels
    doc = json.loads((tmp_path / "off" / "plot_records.json").read_text())
    assert doc["settings"]["outlier_check"] is False and doc["plots"][0]["n_unknown_tiles"] == 0


def test_tile_answers_are_predicts_answers_on_the_same_crops(classifier, fixture_set,
                                                             fixture_model, tmp_path):
    from taxoclass.pipelines.predict import predict_images

    photo = _photo(fixture_set)
    image = _open(photo)
    tiles = make_tiles(image.size, grids=(1, 2))
    crops = crop_tiles(image, tiles)
    paths = []
    for i, crop in enumerate(crops):
        paths.append(tmp_path / "crops" / f"tile{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        crop.save(paths[-1])
    frame = predict_images(fixture_model["model"], paths, device="cpu",
                           cache=tmp_path / "cache", batch_size=8)
    pt = classify_photo(classifier, photo, grids=(1, 2), flag_unknown=classifier.back_off_tiles)
    answers = classifier.tile_answers(classifier.embed(crops))
    for col in ("taxon_rank", "taxon", "reason"):
        assert frame[col].tolist() == answers[col].tolist(), col
    assert pt.ranks.tolist() == frame["taxon_rank"].tolist()
    assert pt.unknown.tolist() == (frame["taxon_rank"] == "unknown").tolist()


def test_spark_replay_gives_the_local_tiles(classifier, fixture_set):
    from taxoclass.engines.spark_plots import _pack_decoded, _pack_flags, _ReplayClassifier

    clf = _with_scorer(classifier, {"family": -math.inf, "genus": 0.5, "species": math.inf},
                       all_outliers=True)
    photo = _photo(fixture_set)
    local = classify_photo(clf, photo, grids=(1, 2), flag_unknown=clf.back_off_tiles)
    replay = _ReplayClassifier(clf.taxonomy, [{
        "photo": str(photo), "n_tiles": len(local.tiles), "decoded": _pack_decoded(local.decoded),
        "flags": _pack_flags(local.ranks)}], {"kind": "model-bundle"}, {}, "tiny")
    driver = classify_photo(replay, photo, grids=(1, 2), flag_unknown=replay.flag_unknown)
    assert driver.ranks.tolist() == local.ranks.tolist()
    assert driver.unknown.tolist() == local.unknown.tolist()
    for r in clf.taxonomy.ranks:
        np.testing.assert_allclose(driver.probs[r], local.probs[r], rtol=1e-6)


def test_tile_ranks_and_mask_below():
    ranks = ("family", "genus", "species")
    assert tile_ranks(None, 2, ranks).tolist() == ["species", "species"]
    assert tile_ranks(np.array([True, False]), 2, ranks).tolist() == ["unknown", "species"]
    assert tile_ranks(np.array(["genus", "unknown"]), 2, ranks).tolist() == ["genus", "unknown"]
    with pytest.raises(ValueError, match="order"):
        tile_ranks(np.array(["order", "genus"]), 2, ranks)
    probs = {r: np.full((4, 2), 0.5) for r in ranks}
    out = mask_below(probs, np.array(["species", "genus", "family", "unknown"], dtype=object),
                     ranks)
    assert pd.DataFrame({r: out[r][:, 0] for r in ranks}).to_dict("list") == {
        "family": [0.5, 0.5, 0.5, 0.5], "genus": [0.5, 0.5, 0.0, 0.5],
        "species": [0.5, 0.0, 0.0, 0.5]}


def test_a_tile_backed_off_above_a_rank_supports_no_class_there():
    """All-zero probabilities at a rank (a tile backed off to a higher rank) count for no
    class: with argmax_union it must not report that rank's first class."""
    import numpy as np

    from taxoclass.plots.selection import rank_evidence
    from taxoclass.vocab import Rule

    probs = np.array([[0.0, 0.0, 0.0], [0.1, 0.7, 0.2]])
    ev = rank_evidence(probs, Rule.ARGMAX_UNION, lowest=True)
    assert ev.n_first.tolist() == [0, 1, 0]
    assert ev.score.tolist() == [0.0, 0.7, 0.0]
