"""`taxoclass train --finetune` end to end on the tiny shipped fixtures (no ../shared).

The last block of the tiny random ViT and the heads train for three epochs on the CPU;
the bundle then moves to another folder and predicts with its own fine-tuned weights.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from taxoclass.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finetuned(fixture_set, cli, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("finetune")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = cli("train", "--config", fixture_set["config"], "--finetune",
                  "--unfreeze-blocks", 1, "--device", "cpu",
                  "--set", f"out={tmp / 'ft'}", "--set", f"embeddings.cache={tmp / 'emb'}",
                  "--set", "finetune.epochs=3", "--set", "finetune.batch_size=8",
                  "--set", "finetune.num_workers=0", "--set", "finetune.warmup_epochs=0",
                  "--set", "finetune.lr=0.01")
    finally:
        torch.set_num_threads(before)
    return {"dir": tmp, "model": tmp / "ft", "output": out}


def test_finetune_trains_only_the_unfrozen_block(fixture_set, finetuned):
    start = torch.load(fixture_set["ckpt"], map_location="cpu", weights_only=True)
    tuned = torch.load(finetuned["model"] / "backbone.pth", map_location="cpu",
                       weights_only=True)
    assert set(tuned) == set(start)
    changed = {k for k in start if not torch.equal(start[k], tuned[k])}
    assert any(k.startswith("blocks.1.") for k in changed)  # the unfrozen last block
    assert {k for k in changed if k.startswith(("blocks.0.", "patch_embed.", "pos_embed",
                                                 "cls_token", "reg_token"))} == set()


def test_finetune_loss_goes_down_and_the_heads_learn(finetuned):
    history = pd.read_csv(finetuned["model"] / "history.csv")
    assert len(history) == 3
    assert history["train_loss"].is_monotonic_decreasing
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
    val = json.loads((finetuned["model"] / "metrics_val.json").read_text())
    assert val.get("coherence_rate", 1.0) <= 1.0  # heads' own, or absent (B17)
    assert val["ranks"]["species"]["accuracy"] >= 0.5  # chance: 1/6
    assert "openset_thresholds" in val  # the fine-tuned bundle backs off too
    # the open-set recipe is chosen (openset.recipe auto) or, on the 6-species fixture,
    # the fixed one with the reason recorded
    sel = val["openset_selection"]
    assert sel["used"] == "fixed" and sel["fallback"] and sel["chosen"]["detector"]
    from taxoclass.io.provenance import model_id_of  # the one JSON output header, this bundle's id
    parts = json.loads((finetuned["model"] / "bundle.json").read_text())["parts"]
    assert list(val)[0] == "header" and val["header"]["model_id"] == model_id_of(parts)


def test_finetuned_bundle_moves_and_predicts(fixture_set, finetuned, cli, tmp_path):
    bundle = json.loads((finetuned["model"] / "bundle.json").read_text())
    assert bundle["backbone"]["checkpoint"] == "backbone.pth"  # relative: the bundle can move
    moved = tmp_path / "moved"
    shutil.copytree(finetuned["model"], moved)
    (moved / "backbone.pth").rename(moved / "backbone.pth.bak")
    res = CliRunner().invoke(main, ["predict", "--model", str(moved),
                                    str(fixture_set["images"] / "test" / "1001.jpg")])
    assert res.exit_code != 0  # it really reads its own copy of the weights
    (moved / "backbone.pth.bak").rename(moved / "backbone.pth")
    cli("predict", "--model", moved, fixture_set["images"] / "test", "--out", tmp_path / "pred",
        "--device", "cpu")
    frame = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    data = json.loads(fixture_set["test"].read_text())
    name = {c["category_id"]: f"{c['genus']} {c['species']}" for c in data["categories"]}
    label = {a["image_id"]: name[a["category_id"]] for a in data["annotations"]}
    image_id = frame["image"].map(lambda p: int(p.rsplit("/", 1)[-1].split(".")[0]))
    assert len(frame) == 24 and set(frame["species"]) <= set(name.values())
    assert (frame["species"] == image_id.map(label)).mean() >= 0.5  # chance: 1/6
