"""Grouped splits (``data.group_by``): no group on both sides of any split of images.

Covers :mod:`taxoclass.model.splits` (validation split, crossfit folds, group codes), the
group column of ``Annotations.labelled_images``, train's validation split and crossfit
folds from the CLI (split.csv records each image's group), the open-set hold-out test
share, and that without ``group_by`` every split equals the implementation before groups.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from taxoclass.errors import ConfigError
from taxoclass.model.splits import crossfit_folds, group_codes, validation_split


# ----------------------------------------------- copies of the splits before issue 15
def old_stratified_split(strata: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(strata), dtype=bool)
    for value in sorted(set(strata.tolist())):
        idx = np.flatnonzero(strata == value)
        if len(idx) < 2:
            continue
        k = int(min(max(round(val_fraction * len(idx)), 1), len(idx) - 1))
        is_val[rng.choice(idx, size=k, replace=False)] = True
    return is_val


def old_crossfit_folds(strata: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fold = np.full(len(strata), -1, dtype=np.int64)
    for value in np.unique(strata):
        rows = np.flatnonzero(strata == value)
        rng.shuffle(rows)
        fold[rows] = (np.arange(len(rows)) + rng.integers(n_folds)) % n_folds
    return fold


# ------------------------------------------------------------------------ helpers
def tracked(n_species: int = 6, per_species: int = 30, seed: int = 0):
    """(species per row, track per row): each species' images in tracks of 2-4 frames,
    rows shuffled."""
    rng = np.random.default_rng(seed)
    species, tracks = [], []
    for s in range(n_species):
        left, t = per_species, 0
        while left:
            size = min(int(rng.integers(2, 5)), left)
            species += [f"sp{s}"] * size
            tracks += [f"sp{s}-track{t}"] * size
            left, t = left - size, t + 1
    order = rng.permutation(len(species))
    return np.array(species)[order], np.array(tracks)[order]


def straddling(groups, side) -> set:
    """Groups with rows of more than one value of ``side``."""
    frame = pd.DataFrame({"g": np.asarray(groups), "s": np.asarray(side)})
    n = frame.groupby("g")["s"].nunique()
    return set(n.index[n > 1])


def with_tracks(src, dst, *, missing_every: int = 0, on: str = "images") -> dict:
    """The fixture annotations with a ``track`` field (3 consecutive images per track of a
    species), on the images or on the annotations; every ``missing_every``-th image without
    one."""
    data = json.loads(src.read_text())
    cat_of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
    seen: dict = {}
    track = {}
    for n, img in enumerate(data["images"]):
        c = cat_of.get(img["image_id"])
        k = seen.get(c, 0)
        seen[c] = k + 1
        if not (missing_every and n % missing_every == 0):
            track[img["image_id"]] = f"c{c}-t{k // 3}"
    records = data["images"] if on == "images" else data["annotations"]
    for rec in records:
        if rec["image_id"] in track:
            rec["track"] = track[rec["image_id"]]
    dst.write_text(json.dumps(data))
    return track


# ----------------------------------------------------------- model.splits directly
def test_grouped_validation_split_keeps_tracks_together_and_stratifies():
    species, tracks = tracked()
    is_val = validation_split(species, 0.3, seed=0, groups=tracks)
    assert straddling(tracks, is_val) == set()
    assert 0.2 <= is_val.mean() <= 0.4
    for s in np.unique(species):  # every species both trains and validates
        mine = is_val[species == s]
        assert mine.any() and not mine.all(), s
    again = validation_split(species, 0.3, seed=0, groups=tracks)
    np.testing.assert_array_equal(is_val, again)  # seeded, deterministic
    assert not np.array_equal(is_val, validation_split(species, 0.3, seed=1, groups=tracks))


def test_species_in_one_group_trains_like_a_singleton():
    species = np.array(["a"] * 4 + ["b"] * 6 + ["c"] * 6)
    groups = np.array(["a0"] * 4 + ["b0", "b0", "b1", "b1", "b2", "b2"]
                      + ["c0", "c0", "c1", "c1", "c2", "c2"])
    is_val = validation_split(species, 0.3, seed=0, groups=groups)
    assert not is_val[species == "a"].any()          # its only group stays in training
    assert straddling(groups, is_val) == set()
    for s in ("b", "c"):
        assert is_val[species == s].any() and not is_val[species == s].all()


def test_one_group_only_means_no_validation_and_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="taxoclass.model.splits"):
        is_val = validation_split(np.array(list("aabbcc")), 0.3, 0, groups=["site"] * 6)
    assert not is_val.any()
    assert "at least 2 are needed" in caplog.text


def test_grouped_crossfit_folds_keep_tracks_together():
    species, tracks = tracked()
    fold = crossfit_folds(species, 5, seed=0, groups=tracks)
    assert set(fold.tolist()) == set(range(5))
    assert straddling(tracks, fold) == set()
    sizes = np.bincount(fold)
    assert sizes.min() >= 0.5 * len(fold) / 5  # folds of similar size
    for s in np.unique(species):  # each species spread over at least 3 folds
        assert len(set(fold[species == s].tolist())) >= 3, s
    np.testing.assert_array_equal(fold, crossfit_folds(species, 5, seed=0, groups=tracks))


def test_too_few_groups_for_the_folds_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"3 group\(s\).*5 folds.*openset.folds: 3"):
        crossfit_folds(np.array(list("aabbccdd")), 5, groups=list("xxyyzzxx"))


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_without_groups_the_splits_are_the_old_ones(seed):
    rng = np.random.default_rng(100 + seed)
    strata = np.array([f"f/g/s{i}" for i in rng.integers(0, 12, size=200)])
    np.testing.assert_array_equal(validation_split(strata, 0.3, seed),
                                  old_stratified_split(strata, 0.3, seed))
    np.testing.assert_array_equal(crossfit_folds(strata, 5, seed),
                                  old_crossfit_folds(strata, 5, seed))


def test_missing_group_values_are_their_own_groups(caplog):
    with caplog.at_level(logging.WARNING, logger="taxoclass.model.splits"):
        codes = group_codes(["t1", None, "t1", float("nan"), "", "t2"], "track")
    assert codes[0] == codes[2]
    assert len(set(codes.tolist())) == 5  # t1, t2 and the three missing ones alone
    assert "3 of 6 image(s) have no 'track' value" in caplog.text


# ------------------------------------------------------------ annotations: the column
def test_group_column_image_field_then_annotation_field(fixture_set, tmp_path):
    from taxoclass.taxonomy.annotations import load_annotations

    path = tmp_path / "ann.json"
    data = json.loads(fixture_set["train"].read_text())
    data["images"][0]["site"] = "image-site"
    for a in data["annotations"]:
        a["site"] = "annotation-site"
    path.write_text(json.dumps(data))
    rows = load_annotations(path).labelled_images(fixture_set["dir"], group_by="site")
    first = data["images"][0]["image_id"]
    assert rows.loc[rows["image_id"] == first, "group"].tolist() == ["image-site"]
    assert set(rows.loc[rows["image_id"] != first, "group"]) == {"annotation-site"}


def test_group_by_a_field_nobody_has_names_the_fields_found(fixture_set, tmp_path):
    from taxoclass.taxonomy.annotations import load_annotations

    path = tmp_path / "ann.json"
    with_tracks(fixture_set["train"], path)
    ann = load_annotations(path)
    with pytest.raises(ConfigError) as err:
        ann.labelled_images(fixture_set["dir"], group_by="trak")
    msg = str(err.value)
    assert "'trak'" in msg and "'track'" in msg and "institution_id" in msg


# ------------------------------------------------------------ pipelines: train, open set
def fixture_rows(path, fixture_set, group_by=None):
    from taxoclass.pipelines.data import known_rows
    from taxoclass.taxonomy.annotations import load_annotations
    from taxoclass.taxonomy.labels import encode_labels

    data = {"ranks": ["family", "genus", "species"], "holdout_species": []}
    ann = load_annotations(path)
    tax, rows = known_rows(ann, ann.labelled_images(fixture_set["dir"], group_by=group_by),
                           data)
    return rows, encode_labels(tax, rows)[1]


def test_validation_mask_without_group_by_equals_the_session_model_split(fixture_set,
                                                                         fixture_model):
    from taxoclass.pipelines.data import validation_mask

    rows, nodes = fixture_rows(fixture_set["train"], fixture_set)
    ids = [str(i) for i in rows["image_id"]]
    data = {"val_fraction": 0.3, "split_seed": 0}
    strata = np.array(["/".join(n) for n in nodes])
    mask = validation_mask(ids, nodes, data)
    np.testing.assert_array_equal(mask, old_stratified_split(strata, 0.3, 0))
    split = pd.read_csv(fixture_model["model"] / "split.csv", dtype={"image_id": str})
    assert "group" not in split.columns
    written = dict(zip(split["image_id"], split["split"] == "val"))
    assert [written[i] for i in ids] == mask.tolist()


def test_cli_train_with_group_by_track(fixture_set, fixture_model, cli, tmp_path):
    ann = tmp_path / "tracked.json"
    track = with_tracks(fixture_set["train"], ann, missing_every=7)
    common = ("--config", fixture_set["config"], "--set", f"data.annotations={ann}",
              "--set", f"data.images_root={fixture_set['dir']}",
              "--set", f"embeddings.cache={fixture_model['emb']}",
              "--set", "data.group_by=track", "--set", "train.epochs=5")
    cli("train", *common, "--set", f"out={tmp_path / 'holdout'}")
    split = pd.read_csv(tmp_path / "holdout" / "split.csv", dtype={"image_id": str},
                        keep_default_na=False)
    assert split["group"].tolist() == [track.get(int(i), "") for i in split["image_id"]]
    tracked_rows = split[split["group"] != ""]
    assert straddling(tracked_rows["group"], tracked_rows["split"]) == set()
    assert 0.15 <= (split["split"] == "val").mean() <= 0.45

    cli("train", *common, "--set", f"out={tmp_path / 'crossfit'}",
        "--set", "openset.enabled=true", "--set", "openset.calibration=crossfit",
        "--set", "openset.folds=3")
    split = pd.read_csv(tmp_path / "crossfit" / "split.csv", dtype={"image_id": str},
                        keep_default_na=False)
    tracked_rows = split[split["group"] != ""]
    assert straddling(tracked_rows["group"], tracked_rows["fold"]) == set()
    assert set(split["fold"]) == {0, 1, 2}


@pytest.mark.parametrize("calibration", ["holdout", "crossfit"])
def test_openset_holdout_test_share_keeps_tracks_together(fixture_set, fixture_model,
                                                           tmp_path, calibration):
    import yaml

    from taxoclass.bundle import ModelBundle
    from taxoclass.config import complete_config
    from taxoclass.pipelines.evaluate import _holdout_split

    ann = tmp_path / "tracked.json"
    with_tracks(fixture_set["train"], ann, on="annotations")
    model = fixture_model["model"]
    cfg = complete_config(yaml.safe_load((model / "config.yaml").read_text()))
    cfg["data"]["group_by"] = "track"
    cfg["train"]["epochs"] = 5
    cfg["openset"].update(enabled=True, calibration=calibration, folds=3)
    _, h = _holdout_split(ModelBundle.load(model), ann, fixture_set["dir"],
                          {"n_species": 1}, cfg, 0, 0.3, tmp_path / "eval", None)
    groups = h.known["group"].to_numpy()
    assert h.is_test.any() and (h.is_val.any() or calibration == "crossfit")
    assert h.calibration.get("grouped_folds", False) == (calibration == "crossfit")
    side = np.where(h.is_test, "test", np.where(h.is_val, "val", "train"))
    assert straddling(groups, side) == set()
    assert set(h.known.loc[h.is_test, "species"]) == set(h.known["species"])


def test_four_rank_set_with_partial_labels_trains_grouped_by_track(fixture_model, cli,
                                                                  tmp_path):
    """tests/any_rank_data.py's four-rank set (genus-, family- and order-only labels) with
    data.group_by=track: validation split and crossfit folds keep every track whole."""
    from any_rank_data import fixture_four_rank_set, write_config

    data = fixture_four_rank_set(tmp_path / "set")
    config = write_config(data, tmp_path / "model", epochs=5, group_by="track")
    cache = ("--set", f"embeddings.cache={fixture_model['emb']}")
    cli("train", "--config", config, *cache)
    split = pd.read_csv(tmp_path / "model" / "split.csv", dtype={"image_id": str})
    assert split["group"].notna().all()
    assert straddling(split["group"], split["split"]) == set()
    assert (split["split"] == "val").any()
    cli("train", "--config", config, *cache, "--set", f"out={tmp_path / 'cf'}",
        "--set", "openset.calibration=crossfit", "--set", "openset.folds=3")
    split = pd.read_csv(tmp_path / "cf" / "split.csv", dtype={"image_id": str})
    assert straddling(split["group"], split["fold"]) == set()
    assert set(split["fold"]) == {0, 1, 2}


def test_finetune_validation_split_keeps_tracks_together(fixture_set, cli, tmp_path):
    import torch

    ann = tmp_path / "tracked.json"
    with_tracks(fixture_set["train"], ann)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli("train", "--config", fixture_set["config"], "--finetune", "--unfreeze-blocks", 1,
            "--device", "cpu", "--set", f"data.annotations={ann}",
            "--set", f"data.images_root={fixture_set['dir']}", "--set", "data.group_by=track",
            "--set", f"out={tmp_path / 'ft'}", "--set", f"embeddings.cache={tmp_path / 'emb'}",
            "--set", "finetune.epochs=1", "--set", "finetune.batch_size=8",
            "--set", "finetune.num_workers=0", "--set", "finetune.warmup_epochs=0")
    finally:
        torch.set_num_threads(before)
    split = pd.read_csv(tmp_path / "ft" / "split.csv", dtype={"image_id": str})
    assert split["group"].notna().all()
    assert straddling(split["group"], split["split"]) == set()
    assert (split["split"] == "val").any()
