"""Backbone preprocessing (image size, letterbox) and tile-like training views, end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from taxoclass.bundle import ModelBundle
from taxoclass.cli import main
from taxoclass.errors import BackboneError
from taxoclass.features.backbones import backbone_spec, create_backbone, preprocess_overrides
from taxoclass.features.embeddings import load_embeddings
from taxoclass.pipelines.data import config_embeddings


@pytest.fixture(scope="module")
def lite0_random():
    """Random-weight EfficientNet-Lite0 builder (no weights file needed)."""
    def build(**overrides):
        return create_backbone("efficientnet-lite0", pretrained=False,
                               data_overrides=preprocess_overrides(**overrides) or None)
    return build


def _long_leaf() -> Image.Image:
    """A white bar 300x60 on black: a long leaf whose tips a centre crop loses."""
    img = Image.new("RGB", (300, 60))
    img.paste((255, 255, 255), (0, 0, 300, 60))
    return img


def test_letterbox_keeps_the_whole_image_and_crop_does_not(lite0_random):
    crop = lite0_random(image_size=64, resize="crop")
    box = lite0_random(image_size=64, resize="letterbox", pad_fill="black")
    t_crop, t_box = crop.transform(_long_leaf()), box.transform(_long_leaf())
    assert t_crop.shape == t_box.shape == (3, 64, 64)
    white, black = (1 - 0.5) / 0.5, (0 - 0.5) / 0.5  # lite0 normalisation: mean = std = 0.5
    # centre crop: the bar fills the whole square (its ends are cut away)
    assert torch.allclose(t_crop, torch.full_like(t_crop, white), atol=0.05)
    # letterbox: whole bar across the width, black bands above and below
    row_mean = t_box[0].mean(dim=1)
    assert row_mean[:20].max() == pytest.approx(black, abs=1e-4)
    assert row_mean[-20:].max() == pytest.approx(black, abs=1e-4)
    assert row_mean[30].item() == pytest.approx(white, abs=0.05)
    assert t_box[0, 32, 1].item() == pytest.approx(white, abs=0.1)  # the bar's left tip is kept


def test_pad_fill_default_is_the_normalisation_mean(lite0_random):
    t = lite0_random(image_size=64, resize="letterbox").transform(_long_leaf())
    assert t[0, :5].abs().max().item() < 0.01  # mean grey normalises to 0


@pytest.mark.parametrize("kwargs,match", [
    ({"resize": "stretch"}, "expected one of crop, letterbox, squash"),
    ({"image_size": 8}, "at least 16 pixels"),
    ({"resize": "crop", "pad_fill": "black"}, "only applies to resize 'letterbox'"),
    ({"resize": "letterbox", "pad_fill": "purple"}, "grey level 0-255"),
])
def test_preprocess_errors_name_the_value_and_the_fix(kwargs, match):
    with pytest.raises(BackboneError, match=match):
        preprocess_overrides(**kwargs)


def test_backbone_spec_round_trips_through_describe(lite0_random):
    spec = backbone_spec({"name": "efficientnet-lite0", "image_size": 96, "resize": "squash",
                          "pretrained": False})
    assert spec["data_overrides"] == {"input_size": [3, 96, 96], "crop_mode": "squash",
                                      "crop_pct": 1.0}
    bb = lite0_random(image_size=96, resize="squash")
    assert bb.describe()["data_overrides"]["crop_mode"] == "squash"
    assert bb.data_config["input_size"] == (3, 96, 96)
    assert bb.transform(_long_leaf()).shape == (3, 96, 96)


def _config(d, tmp, **backbone):
    return {"data": {"annotations": str(d["ann"]), "images_root": str(d["root"]),
                     "val_fraction": 0.4},
            "backbone": {"name": d["arch"], "checkpoint": str(d["ckpt"]),
                         "model_kwargs": d["kwargs"], **backbone},
            "embeddings": {"cache": str(tmp / "emb")},
            "train": {"epochs": 5, "patience": None, "batch_size": 16},
            "openset": {"enabled": False},
            "out": str(tmp / "model")}


def test_train_with_views_and_letterbox(small_leaf, tmp_path):
    """`taxoclass train` with tile-like views: views of training images only, embedded with
    the configured preprocessing, counted in provenance; the bundle rebuilds that
    preprocessing."""
    torch.set_num_threads(1)
    d = small_leaf
    cfg = _config(d, tmp_path, image_size=56, resize="letterbox")
    cfg["augment"] = {"views_per_image": 2, "size": 64, "seed": 3}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["train", "--config", str(cfg_path)])
    assert res.exit_code == 0, res.output

    model = tmp_path / "model"
    prov = json.loads((model / "provenance.json").read_text())
    split = pd.read_csv(model / "split.csv", dtype={"image_id": str})
    train_ids = set(split.loc[split["split"] == "train", "image_id"])
    assert prov["training"]["n_train"] == len(train_ids) == 24
    assert prov["training"]["n_train_views"] == 2 * len(train_ids)
    views_dir = tmp_path / "emb-views"
    sources = {p.name.split("__v")[0] for p in (views_dir / "views").glob("*.jpg")}
    assert sources == train_ids  # never a view of a validation image
    with Image.open(next((views_dir / "views").glob("*.jpg"))) as im:
        assert im.size == (64, 64)

    bundle = ModelBundle.load(model)
    assert bundle.backbone["data_overrides"]["crop_mode"] == "border"
    bb = bundle.create_backbone()
    assert bb.data_config["crop_mode"] == "border" and bb.data_config["crop_pct"] == 1.0
    # the head was trained on the same features the bundle's backbone makes now
    cache = load_embeddings(tmp_path / "emb")
    files = {str(im["image_id"]): im["file_name"]
             for im in json.loads(d["ann"].read_text())["images"]}
    first = d["root"] / files[str(cache.image_ids[0])]
    again = bb.embed(bb.transform(Image.open(first).convert("RGB")).unsqueeze(0)).numpy()
    assert np.abs(again - cache.embeddings[:1]).max() < 1e-4


def test_other_preprocessing_is_stored_beside_the_first(small_leaf, tmp_path):
    """Issue 14: one cache folder holds the vectors of several preprocessing settings side
    by side (it used to refuse the second); each setting gets its own vectors."""
    d = small_leaf
    from taxoclass.config import DEFAULTS, deep_merge
    from taxoclass.taxonomy.annotations import load_annotations

    rows = load_annotations(d["ann"]).labelled_images(d["root"]).head(4)
    crop = deep_merge(DEFAULTS, _config(d, tmp_path, image_size=56, resize="crop"))
    x, found, desc = config_embeddings(crop, rows)
    assert found.all() and x.shape == (4, 64)
    box = deep_merge(DEFAULTS, _config(d, tmp_path, image_size=56, resize="letterbox"))
    xb, found_b, desc_b = config_embeddings(box, rows)
    assert found_b.all() and not np.allclose(x, xb)
    assert desc["data_config"]["crop_mode"] == "center"
    assert desc_b["data_config"]["crop_mode"] == "border"
    again, _, _ = config_embeddings(crop, rows)
    assert np.array_equal(again, x)


@pytest.mark.parametrize("overrides", [{}, {"image_size": 96, "resize": "letterbox"},
                                       {"image_size": 80, "resize": "letterbox",
                                        "pad_fill": "black"},
                                       {"image_size": 64, "resize": "squash"}])
def test_grayscale_fast_path_is_bit_identical(lite0_random, real_leaf_image_paths, tmp_path,
                                              overrides):
    from taxoclass.io.images import _gray_plan, load_image, load_transformed

    bb = lite0_random(**overrides)
    assert _gray_plan(bb.transform) is not None  # the fast path is really taken
    grey = tmp_path / "grey.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 130), np.uint8)).save(grey)
    for path in [*real_leaf_image_paths[:5], grey]:
        with Image.open(path) as im:
            assert im.mode == "L"
        fast = load_transformed(path, bb.transform)
        slow = bb.transform(load_image(path))
        assert fast.shape == slow.shape and torch.equal(fast, slow), path
    # a colour border cannot be drawn in one channel: the plain path is used instead
    from timm.data.transforms import CenterCropOrPad

    pad = next(t for t in bb.transform.transforms if isinstance(t, CenterCropOrPad)) \
        if overrides.get("resize") == "letterbox" else None
    if pad is not None:
        pad.fill = (10, 20, 30)
        assert _gray_plan(bb.transform) is None
        assert torch.equal(load_transformed(grey, bb.transform),
                           bb.transform(load_image(grey)))


def test_bf16_precision_on_cpu_is_recorded_and_close_to_fp32(real_leaf_image_paths, tmp_path):
    from taxoclass.errors import ConfigError
    from taxoclass.io.images import load_transformed
    from taxoclass.pipelines.embed import embed_annotations

    fp32 = create_backbone("efficientnet-lite0", pretrained=False)
    bf16 = create_backbone("efficientnet-lite0", pretrained=False, precision="bf16")
    bf16.model.load_state_dict(fp32.model.state_dict())
    assert (fp32.autocast, bf16.autocast) == (None, "bfloat16")
    assert bf16.describe()["autocast"] == "bfloat16"  # part of the cache identity
    x = torch.stack([load_transformed(p, fp32.transform) for p in real_leaf_image_paths[:4]])
    a, b = fp32.embed(x), bf16.embed(x)
    assert b.dtype == torch.float32 and a.shape == b.shape
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert (cos > 0.99).all() and not torch.equal(a, b)
    with pytest.raises(BackboneError, match="expected one of auto, fp32, bf16"):
        create_backbone("efficientnet-lite0", pretrained=False, precision="half")
    with pytest.raises(ConfigError, match="--precision bf16 is for the local engine"):
        embed_annotations(tmp_path / "none.json", out=tmp_path / "c", engine="spark",
                          precision="bf16", backbone="efficientnet-lite0")
