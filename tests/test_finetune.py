"""Fine-tuning of a tiny DINOv2-shaped ViT on the shipped fixture images (CPU, no ../shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from taxoclass.errors import ConfigError
from taxoclass.model.finetune import FinetuneModel, FinetuneSettings, finetune
from taxoclass.model.heads import MultiRankHead
from taxoclass.model.image_data import LabelledImages, embed_image_files
from taxoclass.model.optim import (
    adamw,
    layer_decay_param_groups,
    set_trainable,
    warmup_cosine,
)
from taxoclass.pipelines.finetune import finetune_to_bundle, write_finetuned_bundle

SPECIES = [("Acer", "campestre"), ("Acer", "platanoides"), ("Aesculus", "pavia"),
           ("Quercus", "robur")]
PER_SPECIES = 6  # 4 train + 2 validation each: 24 images


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_data():
    """24 shipped fixture images of 4 species (2 families, 3 genera) with their targets."""
    from conftest import FIXTURES

    from taxoclass.taxonomy.annotations import load_annotations
    from taxoclass.taxonomy.labels import encode_labels
    from taxoclass.taxonomy.tree import Taxonomy

    leaf = FIXTURES
    if not (leaf / "annotations.json").is_file():
        pytest.skip(f"fixture set {leaf} is absent (rebuild: tests/fixtures/make_fixtures.py)")
    rows = load_annotations(leaf / "annotations.json").labelled_images(leaf)
    parts = []
    for genus, species in SPECIES:
        hit = rows[(rows["genus"] == genus) & (rows["species"] == species)]
        if len(hit) < PER_SPECIES:
            pytest.skip(f"leaf data has fewer than {PER_SPECIES} images of {genus} {species}")
        parts.append(hit.sort_values("image_id").head(PER_SPECIES))
    import pandas as pd

    sel = pd.concat(parts, ignore_index=True)
    tax = Taxonomy.from_records(sel[["family", "genus", "species"]].to_dict("records"))
    y, _ = encode_labels(tax, sel)
    is_val = np.tile(np.arange(PER_SPECIES) >= PER_SPECIES - 2, len(SPECIES))
    paths = np.asarray(sel["path"].tolist(), dtype=object)
    return {"tax": tax,
            "train": (list(paths[~is_val]), {r: v[~is_val] for r, v in y.items()}),
            "val": (list(paths[is_val]), {r: v[is_val] for r, v in y.items()})}


@pytest.fixture(scope="module")
def tiny_backbone():
    from conftest import TINY_DINO_KWARGS

    from taxoclass.features.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone("vit_base_patch14_reg4_dinov2", pretrained=False,
                           model_kwargs=dict(TINY_DINO_KWARGS))


BASE = dict(batch_size=4, num_workers=0, lr=2e-3, warmup_epochs=0.0, layer_decay=0.8,
            weight_decay=0.01, patience=0, seed=0)


def run(data, backbone, out, **settings):
    cfg = {**BASE, **settings}
    return finetune_to_bundle(LabelledImages(*data["train"]), LabelledImages(*data["val"]),
                              data["tax"], backbone=backbone, out_dir=out, settings=cfg,
                              model={"normalize": True})


def model_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(image_data, tiny_backbone, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ft") / "bundle"
    return run(image_data, tiny_backbone, out, epochs=4, unfreeze_blocks=-1, augment=False)


def test_loss_decreases_and_bundle_written(trained):
    h = trained.history
    assert trained.completed and len(h) == 4
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0] - 0.05
    assert np.isfinite(h["val_loss"]).all()
    assert (trained.bundle_dir / "backbone.pth").is_file()
    assert (trained.bundle_dir / "bundle.json").is_file()
    assert not (trained.bundle_dir / "finetune_state").exists()  # cleaned after success


def test_bundle_reproduces_finetuned_logits(trained, image_data):
    from taxoclass.bundle import ModelBundle
    from taxoclass.io.images import load_image

    bundle = ModelBundle.load(trained.bundle_dir)
    assert bundle.backbone["checkpoint"] == trained.backbone_checkpoint.name  # bundle-relative
    bb = bundle.create_backbone()
    x = bb.transform(load_image(image_data["val"][0][0])).unsqueeze(0)
    with torch.inference_mode():
        want = trained.model(x)
    got = bundle.logits(bb.embed(x))
    for r in bundle.taxonomy.ranks:
        torch.testing.assert_close(got[r], want[r], atol=1e-5, rtol=1e-5)
    assert bb.weights_source == "checkpoint"
    emb, ok = embed_image_files(trained.model, [image_data["val"][0][0]], bb.transform)
    assert ok.all()
    np.testing.assert_allclose(emb, bb.embed(x).numpy(), atol=1e-5)


def test_llrd_group_learning_rates(tiny_backbone, image_data):
    """timm's layer-decay groups: heads and final norm at lr, each block one factor lower,
    the stem lowest; no weight decay on 1-d tensors, tokens and the position embedding."""
    head = MultiRankHead.for_taxonomy(image_data["tax"], tiny_backbone.num_features)
    import copy

    model = FinetuneModel(copy.deepcopy(tiny_backbone.model), head)
    d = 0.5
    groups = layer_decay_param_groups(model, layer_decay=d, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    expected = {"head": 1.0, "layer2": d, "layer1": d**2, "stem": d**3}  # 2 blocks
    for name, scale in expected.items():
        if name != "stem":  # the stem's patch projection is decayed, its tokens are not
            assert by_name[name]["lr_scale"] == pytest.approx(scale)
            assert by_name[name]["weight_decay"] == 0.05
        assert by_name[f"{name}/no_decay"]["lr_scale"] == pytest.approx(scale)
        assert by_name[f"{name}/no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    head_nd = {names[id(p)] for p in by_name["head/no_decay"]["params"]}
    assert {"backbone.norm.weight", "backbone.norm.bias"} <= head_nd  # final norm at full lr
    assert {names[id(p)] for p in by_name["layer2"]["params"]} >= {
        "backbone.blocks.1.attn.qkv.weight", "backbone.blocks.1.mlp.fc2.weight"}
    # every trainable parameter in exactly one group; tokens and pos_embed not decayed
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    stem_nd = {id(p) for p in by_name["stem/no_decay"]["params"]}
    assert id(model.backbone.pos_embed) in stem_nd and id(model.backbone.cls_token) in stem_nd
    # only the unfrozen part gets groups
    assert set_trainable(model, 1) == ["backbone.patch_embed", "backbone.blocks.0"]
    names = {g["name"].split("/")[0] for g in layer_decay_param_groups(
        model, layer_decay=d, weight_decay=0.05)}
    assert names == {"head", "layer2"}
    set_trainable(model, 0)
    names = {g["name"].split("/")[0] for g in layer_decay_param_groups(
        model, layer_decay=d, weight_decay=0.05)}
    assert names == {"head"}


@pytest.mark.parametrize("warmup", [0, 1, 4, 20])
def test_schedule_follows_warmup_cosine_per_group(tiny_backbone, image_data, warmup):
    """Each group's lr in step ``k`` is ``lr * lr_scale`` times ``(k + 1) / W`` while
    ``k < W``, then ``f + (1 - f) * (1 + cos(pi * t)) / 2``, ``t = (k - W) / (T - W)``;
    the floor ``f * lr * lr_scale`` from step ``T`` on (the schedule taxoclass had before
    it used timm's scheduler)."""
    import copy
    import math

    head = MultiRankHead.for_taxonomy(image_data["tax"], tiny_backbone.num_features)
    model = FinetuneModel(copy.deepcopy(tiny_backbone.model), head)
    lr, d, total, f = 2e-3, 0.5, 20, 0.1
    opt = adamw(layer_decay_param_groups(model, layer_decay=d, weight_decay=0.05), lr=lr)
    sched = warmup_cosine(opt, warmup=warmup, total=total, lr=lr, min_lr_ratio=f)

    def want(k: int, scale: float) -> float:
        if k < warmup:
            return lr * scale * (k + 1) / warmup
        t = min((k - warmup) / max(total - warmup, 1), 1.0)
        return lr * scale * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * t)))

    seen = {}
    for k in range(total + 2):
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(want(k, g["lr_scale"]), rel=1e-12), (k, g["name"])
        seen[k] = {g["name"]: g["lr"] for g in opt.param_groups}
        sched.step_update(k + 1)
    scales = {g["name"]: g["lr_scale"] for g in opt.param_groups}
    assert scales["head"] == 1.0 and scales["stem"] == pytest.approx(d**3)
    # step 0, end of warm-up (peak), end of the run (floor), for the heads and the stem
    for name in ("head", "stem"):
        peak = lr * scales[name]
        assert seen[0][name] == pytest.approx(peak / warmup if warmup else peak)
        assert seen[min(warmup, total) - 1 if warmup else 0][name] == pytest.approx(peak)
        if warmup < total:  # (a warm-up as long as the run never decays)
            assert seen[total][name] == pytest.approx(f * peak)
            assert seen[total - 1][name] > f * peak


def test_unfreeze_last_block_only(image_data, tiny_backbone, tmp_path):
    before = model_state(tiny_backbone.model)
    res = run(image_data, tiny_backbone, tmp_path / "b", epochs=1, unfreeze_blocks=1)
    assert res.lr_groups.keys() >= {"head", "head/no_decay", "layer2"}
    assert res.lr_groups["layer2"] == pytest.approx(BASE["lr"] * BASE["layer_decay"])
    assert not any(k.startswith(("layer1", "stem")) for k in res.lr_groups)
    after = res.model.backbone.state_dict()
    assert model_state(tiny_backbone.model).keys() == before.keys()  # caller's model untouched
    for k, v in before.items():
        frozen = k.startswith(("blocks.0.", "patch_embed.")) or k in (
            "cls_token", "reg_token", "pos_embed")
        if frozen:
            assert torch.equal(after[k], v), f"frozen {k} changed"
        assert torch.equal(tiny_backbone.model.state_dict()[k], v)
    changed = [k for k in before if k.startswith("blocks.1.") and not torch.equal(after[k],
                                                                                  before[k])]
    assert len(changed) >= 8, changed
    assert not torch.equal(after["norm.weight"], before["norm.weight"])


def test_grad_accumulation_matches_larger_batch(image_data, tiny_backbone, tmp_path):
    a = run(image_data, tiny_backbone, tmp_path / "a", epochs=1, batch_size=4, accum_steps=2,
            grad_clip=None)
    b = run(image_data, tiny_backbone, tmp_path / "b", epochs=1, batch_size=8, accum_steps=1,
            grad_clip=None)
    assert a.steps == b.steps == 2
    sa, sb = a.model.state_dict(), b.model.state_dict()
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert worst < 1e-4, worst
    assert a.history["train_loss"].iloc[0] == pytest.approx(b.history["train_loss"].iloc[0],
                                                            abs=1e-5)


class Interrupt(RuntimeError):
    pass


def test_interrupted_run_resumes_to_same_weights(image_data, tiny_backbone, tmp_path):
    settings = dict(epochs=2, unfreeze_blocks=-1, augment=True, keep_checkpoints=True,
                    warmup_epochs=1.0)  # the pause falls inside the warm-up
    full = run(image_data, tiny_backbone, tmp_path / "full", **settings)
    assert full.steps == 8 and full.resumed_from_step is None

    # 1) a crash in the middle of epoch 2: resumes from the end-of-epoch-1 checkpoint
    out = tmp_path / "crash"

    def boom(event):
        if event["event"] == "step" and event["step"] == 6:
            raise Interrupt("simulated crash")

    with pytest.raises(Interrupt):
        finetune_to_bundle(LabelledImages(*image_data["train"]), LabelledImages(*image_data["val"]),
                           image_data["tax"], backbone=tiny_backbone, out_dir=out,
                           settings={**BASE, **settings}, callback=boom)
    assert (out / "finetune_state" / "last.pt").is_file()
    assert not (out / "bundle.json").exists()
    resumed = run(image_data, tiny_backbone, out, **settings)
    assert resumed.resumed_from_step == 4
    # 2) a pause after 3 steps (mid epoch 1), then the rest
    out2 = tmp_path / "paused"
    paused = run(image_data, tiny_backbone, out2, max_steps=3, **settings)
    assert not paused.completed and paused.steps == 3 and paused.bundle_dir is None
    with pytest.raises(ValueError, match="paused after 3 steps"):
        write_finetuned_bundle(paused, out2, image_data["tax"])
    again = run(image_data, tiny_backbone, out2, max_steps=3, **settings)  # no step taken
    assert not again.completed and again.steps == 3 and again.resumed_from_step == 3
    rest = run(image_data, tiny_backbone, out2, **settings)
    assert rest.resumed_from_step == 3 and rest.completed

    want = full.model.state_dict()
    for res in (resumed, rest):
        got = res.model.state_dict()
        worst = max(float((got[k] - want[k]).abs().max()) for k in want)
        assert worst <= 1e-6, worst
        np.testing.assert_allclose(res.history["val_loss"], full.history["val_loss"], atol=1e-6)


def test_resume_refuses_another_run(image_data, tiny_backbone, tmp_path):
    out = tmp_path / "x"
    run(image_data, tiny_backbone, out, epochs=2, max_steps=1)
    with pytest.raises(ConfigError, match="checkpoint of another run"):
        run(image_data, tiny_backbone, out, epochs=2, lr=1e-2)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="unknown key"):
        FinetuneSettings.from_mapping({"unfreeze": 2})
    with pytest.raises(ConfigError, match="accum_steps"):
        FinetuneSettings.from_mapping({"accum_steps": 0})
    with pytest.raises(ConfigError, match="unfreeze_blocks"):
        FinetuneSettings.from_mapping({"unfreeze_blocks": -2})


def test_unreadable_image_is_reported_and_skipped(image_data, tiny_backbone, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    paths, y = image_data["train"]
    paths = [str(bad), *paths[1:]]
    res = finetune_to_bundle(LabelledImages(paths, y), None, image_data["tax"],
                             backbone=tiny_backbone, out_dir=tmp_path / "o",
                             settings={**BASE, "epochs": 1, "unfreeze_blocks": 0})
    assert res.completed and [p for p, _ in res.failures] == [str(bad)]
    assert "cannot be decoded" in res.failures[0][1]
    assert Path(res.bundle_dir, "bundle.json").is_file()


def test_tile_views_are_fresh_reproducible_and_recorded(image_data, tiny_backbone, tmp_path):
    """``tile_views``: each epoch shows every image once plus N tile-like views of it,
    drawn anew per epoch but the same for the same (seed, epoch, image)."""
    from taxoclass.bundle import ModelBundle
    from taxoclass.model.image_data import ImageDataset, TileViewTransform

    views = {"size": 64, "background": "clutter", "scale": [0.5, 1.0]}
    tf = TileViewTransform(views, tiny_backbone.transform)
    paths, y = image_data["train"]
    ds = ImageDataset(paths[:2] * 2, {r: np.tile(v[:2], 2) for r, v in y.items()},
                      tiny_backbone.transform, seed=3, view_transform=tf, n_plain=2)
    plain, view = ds[0][0], ds[2][0]
    assert ds[2][1] == ds[0][1]  # a view keeps its image's labels
    assert plain.shape == view.shape and not torch.allclose(plain, view)
    torch.testing.assert_close(ds[2][0], view)  # same seed, epoch, item: same view
    ds.epoch = 1
    assert not torch.allclose(ds[2][0], view)  # next epoch: a new view
    with pytest.raises(ConfigError, match="tile_views: expected an integer >= 0"):
        FinetuneSettings.from_mapping({"tile_views": -1})

    res = finetune_to_bundle(LabelledImages(paths, y), None, image_data["tax"],
                             backbone=tiny_backbone, out_dir=tmp_path / "v", views=views,
                             settings={**BASE, "epochs": 1, "unfreeze_blocks": 0,
                                       "tile_views": 2})
    assert res.steps == 3 * len(paths) // BASE["batch_size"]  # 16 images seen 3 times
    info = ModelBundle.load(tmp_path / "v").extra["finetune"]
    assert info["settings"]["tile_views"] == 2 and info["views"]["size"] == 64


def test_model_layer_run_writes_no_bundle(image_data, tiny_backbone, tmp_path):
    """``finetune`` (model layer) trains only; the checkpoints stay until discarded and the
    job layer writes the bundle from the result."""
    paths, y = image_data["train"]
    res = finetune(LabelledImages(paths, y), None, image_data["tax"], backbone=tiny_backbone,
                   out_dir=tmp_path / "m", settings={**BASE, "epochs": 1, "unfreeze_blocks": 0})
    assert res.completed and res.bundle_dir is None and res.steps == len(paths) // 4
    assert not (tmp_path / "m" / "bundle.json").exists()
    assert (res.state_dir / "best.pt").is_file() and res.frozen == ["backbone"]
    write_finetuned_bundle(res, tmp_path / "m", image_data["tax"])
    assert (tmp_path / "m" / "bundle.json").is_file() and not res.state_dir.exists()


def test_heads_a_flat_loss_does_not_train_stay_zero(image_data, tiny_backbone, tmp_path):
    """With ``loss.kind: flat`` only the lowest-rank head learns; the others stay exactly zero
    (as train_head leaves them), so path decoding of the fine-tuned model is the marginal one."""
    paths, y = image_data["train"]
    res = finetune(LabelledImages(paths, y), None, image_data["tax"], backbone=tiny_backbone,
                   out_dir=tmp_path / "f", settings={**BASE, "epochs": 1, "unfreeze_blocks": 0},
                   loss={"kind": "flat"})
    heads = res.model.head.heads
    lowest, *higher = image_data["tax"].ranks[::-1]
    assert heads[lowest].weight.abs().sum() > 0
    for rank in higher:
        assert heads[rank].weight.abs().sum() == 0 and heads[rank].bias.abs().sum() == 0
