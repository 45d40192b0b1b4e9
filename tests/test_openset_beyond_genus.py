"""Issue 18 item 4: back-off beyond genus. Whole genera and whole families are held out of
training (``openset.evaluation.hold_out_taxa``) and their images are scored with the
open-set outcome summary: none may count as right at a rank the model cannot know.

The fixture set: Sapindaceae (Acer 2 spp., Aesculus 2 spp.) and Fagaceae (Quercus 2 spp.),
10 training + 4 test images per species.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from taxoclass.openset.evaluation import (
    hold_out_taxa,
    outcome_summary,
    split_known_unknown_taxa,
    truth_names,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")
RANKS = ("family", "genus", "species")
OUTCOMES = ("unknown_named_species", "unknown_correct_genus", "unknown_correct_family",
            "unknown_wrong_higher", "unknown_unknown")


def _rows(fixture_set, name: str) -> pd.DataFrame:
    from taxoclass import load_annotations

    return load_annotations(fixture_set[name]).labelled_images(fixture_set["dir"]) \
        .reset_index(drop=True)


def test_whole_genus_draw_leaves_its_family_a_known_genus(fixture_set):
    rows = _rows(fixture_set, "train")
    drawn = {tuple(hold_out_taxa(rows, RANKS, rank="genus", n=1, seed=s)) for s in range(8)}
    # Quercus is Fagaceae's only genus: holding it out would leave the family unknown
    assert drawn <= {("Acer",), ("Aesculus",)} and len(drawn) == 2
    held = split_known_unknown_taxa(rows, {"genus": ["Aesculus"]}, RANKS)
    assert held.sum() == 20 and set(rows["genus"][held]) == {"Aesculus"}


def test_outcomes_of_a_held_out_genus_by_hand():
    """Five Aesculus images (genus held out), one per outcome; a genus answer is wrong."""
    truth = {"family": np.array(["Sapindaceae"] * 5, dtype=object),
             "genus": np.array(["Aesculus"] * 5, dtype=object),
             "species": np.array(["Aesculus pavia"] * 5, dtype=object)}
    frame = pd.DataFrame({
        "taxon_rank": ["species", "genus", "family", "family", "unknown"],
        "family": ["Sapindaceae", "Sapindaceae", "Sapindaceae", "Fagaceae", "Sapindaceae"],
        "genus": ["Acer", "Acer", "Acer", "Quercus", "Acer"],
        "species": ["Acer campestre", "Acer campestre", "Acer campestre", "Quercus robur",
                    "Acer platanoides"]})
    s = outcome_summary(frame, truth, np.ones(5, dtype=bool), RANKS)
    assert s["n_unknown"] == 5
    assert [s[k] for k in OUTCOMES] == pytest.approx([0.2, 0.0, 0.2, 0.4, 0.2])
    assert s["unknown_correct_higher"] == pytest.approx(0.2)  # the Sapindaceae answer only


def _train_without(fixture_set, cli, tmp: Path, held: dict) -> tuple[Path, Path]:
    """`taxoclass train` on the fixture's training images minus the ``held`` taxa."""
    rows = _rows(fixture_set, "train")
    keep = set(rows["image_id"][~split_known_unknown_taxa(rows, held, RANKS)])
    src = json.loads(fixture_set["train"].read_text())
    anns = [a for a in src["annotations"] if a["image_id"] in keep]
    cats = {a["category_id"] for a in anns}
    ann = tmp / "known.json"
    ann.write_text(json.dumps({**src, "annotations": anns,
                               "images": [i for i in src["images"] if i["image_id"] in keep],
                               "categories": [c for c in src["categories"]
                                              if c["category_id"] in cats]}))
    model, emb = tmp / "model", tmp / "emb"
    cli("train", "--config", fixture_set["config"], "--set", f"data.annotations={ann}",
        "--set", f"data.images_root={fixture_set['dir']}", "--set", f"out={model}",
        "--set", f"embeddings.cache={emb}")
    return model, emb


def _outcomes(fixture_set, model: Path, emb: Path, held: dict) -> tuple[dict, pd.DataFrame,
                                                                         np.ndarray]:
    """Predict every image of the held taxa (train + test files) and the known test images."""
    from taxoclass import predict

    rows = pd.concat([_rows(fixture_set, "train"), _rows(fixture_set, "test")],
                     ignore_index=True)
    unk = split_known_unknown_taxa(rows, held, RANKS)
    test = unk | (rows["path"].str.contains("/test/").to_numpy())
    rows, unk = rows[test].reset_index(drop=True), unk[test]
    frame = predict(model, rows["path"].tolist(), cache=emb)
    truth = truth_names(rows, RANKS)
    return outcome_summary(frame, truth, unk, RANKS), frame, unk


def test_held_out_genus_never_counts_as_right_genus(fixture_set, cli, tmp_path):
    held = {"genus": ["Aesculus"]}
    model, emb = _train_without(fixture_set, cli, tmp_path, held)
    s, frame, unk = _outcomes(fixture_set, model, emb, held)
    assert (s["n_unknown"], s["n_known"]) == (28, 16)  # 2 spp. x 14 held; 4 spp. x 4 test
    # the model has no Aesculus: every path names a known genus, none is right
    assert set(frame["genus"][unk]) <= {"Acer", "Quercus"}
    assert s["unknown_correct_genus"] == 0.0
    assert sum(s[k] for k in OUTCOMES) == pytest.approx(1.0)
    rank, family = frame["taxon_rank"][unk], frame["family"][unk]
    at_genus = float(np.mean(rank == "genus"))
    assert at_genus >= 0.5  # most are backed off to a (known, so wrong) genus
    # every genus answer is a wrong higher taxon, as is a family answer other than theirs
    wrong_family = float(np.mean((rank == "family") & (family != "Sapindaceae")))
    assert s["unknown_wrong_higher"] == pytest.approx(at_genus + wrong_family)
    right_family = float(np.mean((rank == "family") & (family == "Sapindaceae")))
    assert s["unknown_correct_family"] == pytest.approx(right_family)
    # the known test species are still told apart by the model trained without Aesculus
    assert s["known_precision_genus"] >= 0.9 and s["known_coverage_genus"] >= 0.5


def test_held_out_family_is_right_only_as_unknown(fixture_set, cli, tmp_path):
    held = {"family": ["Fagaceae"]}
    model, emb = _train_without(fixture_set, cli, tmp_path, held)
    s, frame, unk = _outcomes(fixture_set, model, emb, held)
    assert (s["n_unknown"], s["n_known"]) == (28, 16)
    assert set(frame["family"][unk]) == {"Sapindaceae"}  # the only family left
    assert s["unknown_correct_higher"] == 0.0
    assert s["unknown_named_species"] + s["unknown_wrong_higher"] + s["unknown_unknown"] \
        == pytest.approx(1.0)
    named = float(np.mean(frame["taxon_rank"][unk] == "species"))
    assert s["unknown_named_species"] == pytest.approx(named)
