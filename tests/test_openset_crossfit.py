"""Cross-fitted calibration of the open-set scorer (``openset.calibration: crossfit``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from taxoclass.cli import main
from taxoclass.config import load_config, openset_calibration
from taxoclass.errors import ConfigError
from taxoclass.openset.detectors import OutlierDetector
from taxoclass.openset.scorer import crossfit_folds, crossfit_predictions
from taxoclass.taxonomy.tree import Taxonomy

ARCH = "vit_base_patch14_reg4_dinov2"  # conftest.TINY_VIT, the small_leaf checkpoint


def _taxonomy() -> Taxonomy:
    recs = [{"family": f, "genus": g, "species": s}
            for f, g, sps in [("Fagaceae", "Quercus", ["robur", "ilex", "rubra"]),
                              ("Sapindaceae", "Acer", ["rubrum", "saccharum"]),
                              ("Betulaceae", "Alnus", ["glutinosa", "incana", "viridis"])]
            for s in sps]
    return Taxonomy.from_records(recs, ("family", "genus", "species"))


def _random_labels(tax: Taxonomy, n: int, dim: int, seed: int = 0, genus_signal: float = 0.0):
    """Random embeddings with random species: learnable only by memorising rows, except
    for a shift of ``genus_signal`` along a direction per genus (a learnable genus)."""
    rng = np.random.default_rng(seed)
    leaf = np.arange(n) % tax.n_classes("species")
    rng.shuffle(leaf)
    y = {r: np.asarray(tax.parent_index("species", r))[leaf] for r in ("family", "genus")}
    y["species"] = leaf
    x = rng.standard_normal((n, dim)) + genus_signal * np.eye(dim)[y["genus"]]
    return x.astype(np.float32), y


def test_crossfit_folds_are_stratified_seeded_and_checked():
    strata = np.repeat(np.array(["a", "b", "c"]), [10, 7, 3])
    fold = crossfit_folds(strata, 5, seed=3)
    assert np.array_equal(fold, crossfit_folds(strata, 5, seed=3))
    assert not np.array_equal(fold, crossfit_folds(strata, 5, seed=4))
    for s in ("a", "b", "c"):  # each stratum dealt round the folds: sizes differ by <= 1
        counts = np.bincount(fold[strata == s], minlength=5)
        assert counts.max() - counts.min() <= 1, (s, counts)
    with pytest.raises(ValueError, match="at least 2"):
        crossfit_folds(strata, 1)
    with pytest.raises(ValueError, match="cannot fill"):
        crossfit_folds(strata[:3], 5)


def test_crossfit_predictions_never_come_from_a_model_that_saw_the_row():
    """A 1-nearest-neighbour "head" memorises its rows: exact in-sample, chance out of fold."""
    tax = _taxonomy()
    x, y = _random_labels(tax, 180, 16)
    n_sp = tax.n_classes("species")
    seen: list[np.ndarray] = []

    def fit_fold(mask):
        seen.append(mask.copy())
        xt, yt = x[mask], y["species"][mask]

        def logits(q):
            nearest = yt[np.argmin(((q[:, None] - xt[None]) ** 2).sum(-1), axis=1)]
            sp = 10.0 * np.eye(n_sp, dtype=np.float32)[nearest]
            return {"family": np.zeros((len(q), tax.n_classes("family")), np.float32),
                    "genus": np.zeros((len(q), tax.n_classes("genus")), np.float32),
                    "species": sp}
        return logits, OutlierDetector("knn").fit(xt)

    strata = y["species"].astype(str)
    oof = crossfit_predictions(x, strata, fit_fold, tax, n_folds=4, seed=0,
                               decode_method="marginal")
    assert len(seen) == 4 and set(oof.fold.tolist()) == {0, 1, 2, 3}
    for k, mask in enumerate(seen):  # fold k's model trained on exactly the other folds
        assert np.array_equal(mask, oof.fold != k)
    acc = (oof.decoded.path["species"] == y["species"]).mean()
    assert acc < 0.3  # chance is 1/8; a leak would give 1.0
    in_sample = fit_fold(np.ones(len(x), bool))[0](x)["species"].argmax(1)
    assert (in_sample == y["species"]).mean() == 1.0
    assert oof.outlier.shape == (180,) and np.isfinite(oof.outlier).all()


def _cfg(**openset):
    return {"model": {"normalize": True}, "loss": {}, "decode": {"method": "path"},
            "train": {"epochs": 40, "batch_size": 0, "lr": 0.1, "weight_decay": 0.0,
                      "patience": None, "seed": 0},
            "openset": {"detector": "knn", "scope": "global", "combiner": "gate",
                        "confidence": "path_logit",
                        "target_precision": {"family": 0.9, "genus": 0.9, "species": 0.97},
                        "min_support": 5, "calibration": "crossfit", **openset}}


def test_crossfit_openset_head_memorises_but_calibration_is_out_of_fold(tmp_path, one_thread):
    """Genus learnable, species random within genus: the final head memorises its rows,
    the out-of-fold species answers stay at chance, and the bundle keeps the out-of-fold
    thresholds through save/load."""
    from taxoclass.bundle import ModelBundle
    from taxoclass.openset.evaluation import truth_names
    from taxoclass.pipelines.openset_fit import crossfit_openset

    tax = _taxonomy()
    x, y = _random_labels(tax, 96, 64, genus_signal=10.0)
    names = {r: np.asarray(tax.names(r), dtype=object)[y[r]] for r in tax.ranks}
    rows = pd.DataFrame({"family": names["family"], "genus": names["genus"],
                         "species": [s.split(" ", 1)[1] for s in names["species"]]})
    cf = crossfit_openset(x, y, tax, truth_names(rows), _cfg(folds=3), seed=1)
    assert cf.info == {"calibration": "crossfit", "folds": 3, "seed": 1,
                       "n_calibration_rows": 96, "out_of_fold": True}
    assert cf.correct["genus"].mean() > 0.9
    assert cf.correct["species"].mean() < 0.6  # chance within the genus (~0.4), not memory
    bundle = ModelBundle(head=cf.train.head, taxonomy=tax, backbone={}, normalize=True,
                         scorer=cf.scorer)
    assert (bundle.predict_embeddings(x).path["species"] == y["species"]).mean() > 0.95
    # thresholds rest on every row's out-of-fold prediction; genus is trusted, species not
    thr = cf.scorer.thresholds
    assert thr.n_validation["species"] == 96 and thr.support["genus"] >= 80
    assert np.isfinite(thr.thresholds["genus"]) and "species" in thr.unreachable
    bundle.save(tmp_path / "b")
    back = ModelBundle.load(tmp_path / "b")
    assert back.scorer.thresholds.to_dict() == thr.to_dict()
    frame = back.predict_with_backoff(x)[0]
    pd.testing.assert_frame_equal(frame, bundle.predict_with_backoff(x)[0])
    assert (frame["taxon_rank"] == "genus").mean() > 0.8  # in-sample species not trusted


def test_bad_calibration_settings_are_clear_errors(tmp_path):
    assert openset_calibration(load_config()["openset"]) == ("holdout", 5)
    expected = "openset.calibration: expected one of 'holdout', 'crossfit', found 'kfold'."
    with pytest.raises(ConfigError, match=expected):
        openset_calibration({"calibration": "kfold"})
    with pytest.raises(ConfigError, match=r"openset.folds: expected an integer >= 2, found 1\."):
        openset_calibration({"calibration": "crossfit", "folds": 1})
    res = CliRunner().invoke(main, ["train", "--set", "out=x", "--set", "data.annotations=a.json",
                                    "--set", "openset.calibration=kfold"])
    assert res.exit_code == 2 and expected in res.output
    from taxoclass.pipelines.finetune import finetune_from_config

    cfg = load_config(overrides=["out=x", "data.annotations=a.json",
                                 "openset.calibration=crossfit"])
    with pytest.raises(ConfigError, match="not supported with `train --finetune`"):
        finetune_from_config(cfg)


def test_train_crossfit_bundle_records_calibration(small_leaf, tmp_path):
    """`taxoclass train` with crossfit: head on every image, metrics out of fold, the
    calibration recorded, thresholds kept by the bundle, `evaluate` refuses in-sample."""
    from taxoclass.bundle import ModelBundle

    torch.set_num_threads(1)
    d = small_leaf
    cfg = {"data": {"annotations": str(d["ann"]), "images_root": str(d["root"])},
           "backbone": {"name": ARCH, "checkpoint": str(d["ckpt"]), "model_kwargs": d["kwargs"]},
           "embeddings": {"cache": str(d["dir"] / "emb-crossfit")},
           "train": {"epochs": 30, "patience": None, "batch_size": 0},
           "openset": {"calibration": "crossfit", "folds": 5, "min_support": 2},
           "out": str(tmp_path / "model")}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--config", str(cfg_path)])
    assert res.exit_code == 0, res.output
    assert "out-of-fold metrics" in res.output and "validation metrics" not in res.output
    model = tmp_path / "model"
    metrics = json.loads((model / "metrics_val.json").read_text())
    assert metrics["predictions"].startswith(f"out-of-fold: each of the {d['n']} images")
    assert metrics["openset_calibration"]["calibration"] == "crossfit"
    assert metrics["openset_calibration"]["n_calibration_rows"] == d["n"]
    # Issue 15: the 5 Philadelphus sp. (genus-only) images calibrate genus, not species.
    assert metrics["openset_thresholds"]["n_validation"]["genus"] == d["n"]
    assert metrics["openset_thresholds"]["n_validation"]["species"] == d["n"] - 5
    split = pd.read_csv(model / "split.csv")
    assert (split["split"] == "train").all() and sorted(set(split["fold"])) == [0, 1, 2, 3, 4]
    prov = json.loads((model / "provenance.json").read_text())
    assert prov["openset_calibration"]["folds"] == 5
    assert prov["training"]["n_train"] == d["n"] and prov["training"]["n_val"] == 0
    loaded = ModelBundle.load(model)
    assert loaded.extra["openset_calibration"]["calibration"] == "crossfit"
    assert loaded.scorer.thresholds.to_dict() == metrics["openset_thresholds"]
    res = runner.invoke(main, ["evaluate", "--model", str(model), "--annotations", str(d["ann"]),
                               "--images-root", str(d["root"])])
    assert res.exit_code == 2 and "no validation images" in res.output
