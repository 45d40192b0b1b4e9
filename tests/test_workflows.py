"""End to end through the CLI, as a user runs it: embed → train → evaluate → predict.

Uses a tiny DINOv2-shaped ViT whose checkpoint the test saves itself (the DINOv2 code
path with local weights) on 40 real leaf images of 8 species.
"""

from __future__ import annotations

import json

import pandas as pd
import torch
import yaml
from click.testing import CliRunner

from taxoclass.cli import main

ARCH = "vit_base_patch14_reg4_dinov2"  # conftest.TINY_VIT, the small_leaf checkpoint


def test_embed_train_evaluate_predict(small_leaf):
    torch.set_num_threads(1)
    runner = CliRunner()
    d = small_leaf
    cache = d["dir"] / "emb"
    res = runner.invoke(main, ["embed", "--annotations", str(d["ann"]), "--images-root",
                               str(d["root"]), "--backbone", ARCH, "--checkpoint", str(d["ckpt"]),
                               "--model-kwargs", json.dumps(d["kwargs"]), "--out", str(cache),
                               "--batch-size", "16"])
    assert res.exit_code == 0, res.output
    assert f"{d['n']} embeddings of dim 64" in res.output
    prov = json.loads((cache / "provenance.json").read_text())
    assert prov["backbone"]["name"] == ARCH and prov["backbone"]["checkpoint_sha256"]
    assert "taxoclass embed" in prov["command"]

    cfg = {"data": {"annotations": str(d["ann"]), "images_root": str(d["root"]),
                    "val_fraction": 0.4},
           "backbone": {"name": ARCH, "checkpoint": str(d["ckpt"]), "model_kwargs": d["kwargs"]},
           "embeddings": {"cache": str(cache)},
           "train": {"epochs": 40, "patience": 40, "batch_size": 16},
           "out": str(d["dir"] / "model")}
    cfg_path = d["dir"] / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = runner.invoke(main, ["train", "--config", str(cfg_path), "--set", "train.lr=0.01"])
    assert res.exit_code == 0, res.output
    model = d["dir"] / "model"
    for name in ("bundle.json", "heads.safetensors", "taxonomy.json", "labels.json",
                 "config.yaml", "history.csv", "split.csv", "metrics_val.json",
                 "provenance.json"):
        assert (model / name).is_file(), name
    assert yaml.safe_load((model / "config.yaml").read_text())["train"]["lr"] == 0.01
    history = pd.read_csv(model / "history.csv")
    assert len(history) == 40 and history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    val = json.loads((model / "metrics_val.json").read_text())
    assert "coherence_rate" not in val or 0 <= val["coherence_rate"] <= 1  # heads' own
    split = pd.read_csv(model / "split.csv")
    assert (split["split"] == "val").sum() == 16  # 40% of 5 images = 2 per taxon, 8 taxa

    out = d["dir"] / "eval"
    res = runner.invoke(main, ["evaluate", "--model", str(model), "--annotations", str(d["ann"]),
                               "--images-root", str(d["root"]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["n_images"] == 16
    assert set(metrics["ranks"]) == {"family", "genus", "species"}
    assert "coherence_rate" not in metrics or 0 <= metrics["coherence_rate"] <= 1
    assert (out / "confusion.csv").is_file()  # evaluate --out is a folder

    images = [d["root"] / "images" / f"{i}.jpg" for i in (1, 2, 3)]
    pred_dir = d["dir"] / "pred"
    res = runner.invoke(main, ["predict", "--model", str(model), *map(str, images),
                               "--out", str(pred_dir)])
    assert res.exit_code == 0, res.output
    frame = pd.read_csv(pred_dir / "predictions.csv")
    assert len(frame) == 3
    tax = json.loads((model / "taxonomy.json").read_text())
    paths = {tuple(p) for p in tax["nodes"]}
    for row in frame.itertuples():
        assert (row.family, row.genus, row.species) in paths  # coherent path
        assert 0.0 <= row.species_prob <= row.genus_prob + 1e-6 <= row.family_prob + 2e-6
    assert json.loads((pred_dir / "predictions.json").read_text())["predictions"][0]["image"] \
        .endswith("1.jpg")
    reasons = {"species"} | {f"{pre}:{why}" for pre in ("backoff_to_genus", "backoff_to_family",
                                                        "unknown")
                             for why in ("outlier", "low_confidence")}
    assert set(frame["reason"]) <= reasons
    assert set(frame["taxon_rank"]) <= {"species", "genus", "family", "unknown"}

    # thresholds and detector survive the bundle round trip
    from taxoclass.bundle import ModelBundle

    assert (model / "openset.json").is_file() and (model / "openset.npz").is_file()
    saved = json.loads((model / "openset.json").read_text())["thresholds"]
    loaded = ModelBundle.load(model)
    assert loaded.scorer.thresholds.to_dict() == saved

    flags_dir = d["dir"] / "flags"
    res = runner.invoke(main, ["flag-unknowns", "--model", str(model), *map(str, images),
                               str(d["dir"] / "missing.jpg"), "--out", str(flags_dir)])
    assert res.exit_code == 0, res.output
    flags = pd.read_csv(flags_dir / "flags.csv")
    assert len(flags) == 4 and flags["flagged"].iloc[0]  # the missing image is flagged first
    assert flags["flagged"].is_monotonic_decreasing
    summary = json.loads((flags_dir / "flags_summary.json").read_text())
    assert summary["n_images"] == 4 and sum(summary["resolved_at"].values()) == 4


def test_train_refuses_missing_settings(tmp_path):
    res = CliRunner().invoke(main, ["train", "--set", "out=x"])
    assert res.exit_code == 2 and "data.annotations is not set" in res.output


def test_model_that_is_not_a_bundle(tmp_path):
    img = tmp_path / "a.jpg"
    img.write_bytes(b"")
    res = CliRunner().invoke(main, ["predict", "--model", str(tmp_path), str(img)])
    assert res.exit_code == 2 and "not a taxoclass model bundle" in res.output


def test_train_finetune_from_cli(small_leaf):
    """`taxoclass train --finetune`: backbone + heads end to end, then predict with the bundle."""
    torch.set_num_threads(1)
    d = small_leaf
    cfg = {"data": {"annotations": str(d["ann"]), "images_root": str(d["root"]),
                    "val_fraction": 0.4},
           "backbone": {"name": ARCH, "checkpoint": str(d["ckpt"]), "model_kwargs": d["kwargs"]},
           "finetune": {"epochs": 1, "batch_size": 8, "num_workers": 0, "warmup_epochs": 0.0},
           "out": str(d["dir"] / "ft-model")}
    cfg_path = d["dir"] / "ft.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--config", str(cfg_path), "--finetune",
                               "--unfreeze-blocks", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    model = d["dir"] / "ft-model"
    bundle = json.loads((model / "bundle.json").read_text())
    assert bundle["backbone"]["checkpoint"] == "backbone.pth"  # relative: the bundle can move
    # the fine-tuned bundle backs off too: detector and thresholds fitted and saved
    assert (model / "openset.json").is_file() and (model / "openset.npz").is_file()
    assert "openset_thresholds" in json.loads((model / "metrics_val.json").read_text())
    moved = d["dir"] / "moved-ft-model"
    model.rename(moved)
    res = runner.invoke(main, ["predict", "--model", str(moved),
                               str(d["root"] / "images" / "1.jpg")])
    assert res.exit_code == 0, res.output
    assert "reason" in res.output


def test_train_finetune_leaves_holdout_species_out(small_leaf):
    """`data.holdout_species` with --finetune: the species has no output in the model."""
    torch.set_num_threads(1)
    d = small_leaf
    named = [c for c in d["categories"] if c["species"]]
    by_genus: dict[str, list] = {}
    for c in named:
        by_genus.setdefault(c["genus"], []).append(c)
    genus, cats = next((g, cs) for g, cs in by_genus.items() if len(cs) >= 2)
    held = f"{genus} {cats[0]['species']}"
    cfg = {"data": {"annotations": str(d["ann"]), "images_root": str(d["root"]),
                    "val_fraction": 0.4, "holdout_species": [held]},
           "backbone": {"name": ARCH, "checkpoint": str(d["ckpt"]), "model_kwargs": d["kwargs"]},
           "finetune": {"epochs": 1, "batch_size": 8, "num_workers": 0, "warmup_epochs": 0.0},
           "out": str(d["dir"] / "ft-held")}
    cfg_path = d["dir"] / "ft-held.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["train", "--config", str(cfg_path), "--finetune",
                                    "--unfreeze-blocks", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    labels = json.loads((d["dir"] / "ft-held" / "labels.json").read_text())
    species = list(labels["species"])
    assert not any(held in str(s) for s in species) and len(species) == len(d["categories"]) - 1
    split = pd.read_csv(d["dir"] / "ft-held" / "split.csv")
    assert len(split) == d["n"] - 5  # the held-out species' 5 images are not used at all


def test_train_finetune_starts_from_probe_heads_with_tile_views(small_leaf):
    """finetune.probe_head (LP-FT): the fine-tuning starts from heads trained on the cached
    embeddings; with a vanishing learning rate the bundle keeps exactly those heads."""
    from safetensors.torch import load_file

    from taxoclass.config import load_config
    from taxoclass.pipelines.data import known_rows, validation_mask
    from taxoclass.pipelines.finetune import _probe_head
    from taxoclass.taxonomy.annotations import load_annotations
    from taxoclass.taxonomy.labels import encode_labels

    torch.set_num_threads(1)
    d = small_leaf
    cfg = {"data": {"annotations": str(d["ann"]), "images_root": str(d["root"]),
                    "val_fraction": 0.4},
           "backbone": {"name": ARCH, "checkpoint": str(d["ckpt"]), "model_kwargs": d["kwargs"]},
           "train": {"epochs": 30},
           "augment": {"size": 64},
           "finetune": {"epochs": 1, "batch_size": 8, "num_workers": 0, "warmup_epochs": 0.0,
                        "lr": 1e-12, "weight_decay": 0.0, "probe_head": True,
                        "tile_views": 1},
           "out": str(d["dir"] / "ft-probe")}
    cfg_path = d["dir"] / "ft-probe.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["train", "--config", str(cfg_path), "--finetune",
                                    "--unfreeze-blocks", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    model = d["dir"] / "ft-probe"
    info = json.loads((model / "bundle.json").read_text())["extra"]["finetune"]
    assert info["settings"]["probe_head"] and info["settings"]["tile_views"] == 1
    assert info["views"]["size"] == 64
    # the outlier detector also saw a tile-like view of every training image, else a
    # plot model would flag every tile of a plot as unknown
    from taxoclass.bundle import ModelBundle

    split = pd.read_csv(model / "split.csv")
    n_train = int((split["split"] == "train").sum())
    det = ModelBundle.load(model).scorer.detector
    assert len(det.train_groups_) == 2 * n_train

    full = load_config(cfg_path)
    ann = load_annotations(d["ann"])
    tax, rows = known_rows(ann, ann.labelled_images(d["root"]), full["data"])
    y, nodes = encode_labels(tax, rows)
    is_val = validation_mask([str(i) for i in rows["image_id"]], nodes, full["data"])
    torch.manual_seed(0)
    probe = _probe_head(full, rows, y, ~is_val, tax).state_dict()
    saved = load_file(str(model / "heads.safetensors"))
    assert set(saved) == set(probe)
    for k, v in probe.items():
        torch.testing.assert_close(saved[k], v, atol=1e-6, rtol=1e-6)



def test_embedding_folder_prefers_a_writable_training_store_and_removes_its_temp_dir(
        tmp_path, fixture_model):
    """evaluate's embeddings: an explicit cache, the bundle's training store when it can be
    written (vectors are found by content, so any image set may use it), else
    out/embeddings, else a temporary folder that is removed."""
    import shutil

    from taxoclass.pipelines.evaluate import embedding_folder

    with embedding_folder(None, None) as folder:
        folder.mkdir()
        (folder / "x.npy").write_bytes(b"0")
        temp = folder.parent
    assert temp.name.startswith("taxoclass-") and not temp.exists()
    with embedding_folder(tmp_path / "c", tmp_path) as folder:
        assert folder == tmp_path / "c"
    with embedding_folder(None, tmp_path, reuse=tmp_path / "absent") as folder:
        assert folder == tmp_path / "embeddings"
    emb = shutil.copytree(fixture_model["emb"], tmp_path / "emb")
    with embedding_folder(None, tmp_path, reuse=emb) as folder:  # whatever images
        assert folder == emb
    (tmp_path / "file").write_text("")
    with embedding_folder(None, None, reuse=tmp_path / "file") as folder:
        assert folder != emb and folder.name == "embeddings"


def test_train_logs_unreadable_images_instead_of_printing(fixture_set, tmp_path, caplog,
                                                         capsys):
    """A labelled image that cannot be embedded is left out with a logged warning (the
    library never prints); the CLI shows library warnings as ``warning: ...``."""
    import logging
    import shutil

    import torch

    from taxoclass.config import load_config
    from taxoclass.pipelines.train import train_from_config

    torch.set_num_threads(1)
    ann = json.loads(fixture_set["train"].read_text())
    ann["images"].append({"image_id": 999, "file_name": "images/train/broken.jpg",
                          "license": 0})
    ann["annotations"].append(dict(ann["annotations"][0], image_id=999))
    root = tmp_path / "data"
    shutil.copytree(fixture_set["images"], root / "images")
    (root / "images" / "train" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "annotations.json").write_text(json.dumps(ann))
    cfg = load_config(fixture_set["config"], [f"data.annotations={root / 'annotations.json'}",
                                              f"data.images_root={root}",
                                              f"out={tmp_path / 'model'}",
                                              "train.epochs=2"])
    with caplog.at_level(logging.WARNING, logger="taxoclass"):
        out = train_from_config(cfg)
    assert capsys.readouterr().out == ""
    [record] = [r for r in caplog.records if "have no embedding" in r.getMessage()]
    assert record.name == "taxoclass.pipelines.train"
    assert "1 labelled image(s) have no embedding" in record.getMessage()
    split = pd.read_csv(out / "split.csv", dtype={"image_id": str})
    assert split.loc[split["image_id"] == "999", "embedded"].tolist() == [False]
    res = CliRunner().invoke(main, ["train", "--config", str(fixture_set["config"]),
                                    "--set", f"data.annotations={root / 'annotations.json'}",
                                    "--set", f"data.images_root={root}",
                                    "--set", f"out={tmp_path / 'model2'}",
                                    "--set", f"embeddings.cache={tmp_path / 'model-embeddings'}",
                                    "--set", "train.epochs=2"])
    assert res.exit_code == 0, res.output
    assert "warning: 1 labelled image(s) have no embedding" in res.output
