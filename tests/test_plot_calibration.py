"""Plot calibration: thresholds and tile settings per rule, the learned rule (scored
out-of-fold), settings files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from taxoclass.cli import main
from taxoclass.errors import AnnotationError, ConfigError
from taxoclass.model.decoding import decode_leaf_probabilities
from taxoclass.plots.calibration import (
    calibrate_plots,
    calibrate_rules,
    check_plot_truth,
    plot_records,
)
from taxoclass.plots.evaluation import evaluate_plots
from taxoclass.plots.learned import LearnedPlotRule
from taxoclass.plots.report import plot_report
from taxoclass.plots.rules import aggregate_plot
from taxoclass.plots.search import CANDIDATE_THRESHOLDS, species_f1, tile_options
from taxoclass.plots.selection import LEARNED, RULES, TileSettings
from taxoclass.plots.settings import (
    SETTINGS_FILE,
    TABLE_FILE,
    PlotSettings,
    resolve_report_settings,
)
from taxoclass.plots.tiling import PlotTiles
from taxoclass.taxonomy.tree import Taxonomy

torch.set_num_threads(1)

SCHEMAS = Path(__file__).resolve().parents[1] / "data_schemas"
TAX = Taxonomy.from_records([{"family": f, "genus": g, "species": s} for f, g, s in [
    ("Cyperaceae", "Carex", "nigra"), ("Cyperaceae", "Carex", "flacca"),
    ("Cyperaceae", "Carex", "panicea"), ("Juncaceae", "Juncus", "effusus"),
    ("Juncaceae", "Juncus", "articulatus"), ("Poaceae", "Poa", "annua"),
    ("Poaceae", "Poa", "pratensis"), ("Poaceae", "Festuca", "rubra"),
    ("Poaceae", "Festuca", "ovina"), ("Fabaceae", "Trifolium", "repens"),
    ("Fabaceae", "Trifolium", "pratense"), ("Hydrangeaceae", "Philadelphus", "")]])
NAMED = [n for n in TAX.nodes("species") if not TAX.is_placeholder(n)]
GRIDS = ("2x2", "4x4")


def synthetic_plots(n: int, seed: int) -> tuple[dict[str, PlotTiles], dict[str, list[str]]]:
    """Plots of 1-3 species: each true species at a moderate probability (0.25-0.45 over
    background) in ~60% of the tiles; one false species as a single spiky tile."""
    rng = np.random.default_rng(seed)
    k = TAX.n_classes("species")
    scales = np.array(["2x2"] * 4 + ["4x4"] * 16)
    plots, truth = {}, {}
    for i in range(n):
        true = rng.choice(len(NAMED), size=rng.integers(1, 4), replace=False)
        false = rng.choice([j for j in range(len(NAMED)) if j not in true])
        rows = rng.dirichlet(np.ones(k), size=len(scales)) * 0.4
        for t in true:
            hit = rng.random(len(scales)) < 0.6
            rows[hit, TAX.index(NAMED[t])] += rng.uniform(0.25, 0.45, hit.sum())
        rows[rng.integers(len(scales)), TAX.index(NAMED[false])] += 2.0
        rows /= rows.sum(axis=1, keepdims=True)
        probs = decode_leaf_probabilities(rows, TAX).probs
        pid = f"s{seed}-{i}"
        plots[pid] = PlotTiles(pid, f"{pid}.jpg", scales,
                               {r: np.asarray(a, dtype=np.float64) for r, a in probs.items()},
                               np.zeros(len(scales), dtype=bool))
        truth[pid] = [TAX.label(NAMED[t]) for t in true]
    return plots, truth


def peaked_plots(n: int, seed: int) -> tuple[dict[str, PlotTiles], dict[str, list[str]]]:
    """Few tiles, each sure of one or two taxa: taxa that no tile ranks first still reach
    noisy-or and mean thresholds (where aggregate_plot's tile support decides)."""
    rng = np.random.default_rng(seed)
    scales = np.array(["2x2"] * 4 + ["4x4"] * 2)
    plots, truth = {}, {}
    for i in range(n):
        rows = rng.dirichlet(np.full(TAX.n_classes("species"), 0.2), size=len(scales))
        probs = decode_leaf_probabilities(rows, TAX).probs
        pid = f"q{seed}-{i}"
        plots[pid] = PlotTiles(pid, f"{pid}.jpg", scales,
                               {r: np.asarray(a, dtype=np.float64) for r, a in probs.items()},
                               rng.random(len(scales)) < 0.1)
        truth[pid] = [TAX.label(NAMED[t]) for t in
                      rng.choice(len(NAMED), size=rng.integers(0, 4), replace=False)]
    return plots, truth


def confuser_plots(n: int, seed: int) -> tuple[dict[str, PlotTiles], dict[str, list[str]]]:
    """One true species, first in 12 of 20 tiles (~0.45); a confuser second in 16 tiles
    (0.40), so its mean beats the true species' unless each tile keeps only its best
    class (``top_k=1``); a false species sure (0.85) in 4 tiles, which defeats ``max``,
    ``argmax_union`` (even with ``min_tiles=3``) and ``noisy_or``, not ``mean``."""
    rng = np.random.default_rng(seed)
    k = TAX.n_classes("species")
    scales = np.array(["2x2"] * 4 + ["4x4"] * 16)
    plots, truth = {}, {}
    for i in range(n):
        true, spike, confuser, *others = (TAX.index(NAMED[j]) for j in
                                          rng.choice(len(NAMED), 7, replace=False))
        rows = rng.dirichlet(np.ones(k), size=len(scales)) * 0.1
        for tile, role in enumerate(rng.permutation(np.repeat([0, 1, 2], [12, 4, 4]))):
            if role == 1:
                rows[tile, spike] += 0.85
            else:
                rows[tile, true if role == 0 else others[tile % 4]] += rng.uniform(0.43, 0.47)
                rows[tile, confuser] += 0.40
        rows /= rows.sum(axis=1, keepdims=True)
        probs = decode_leaf_probabilities(rows, TAX).probs
        pid = f"c{seed}-{i}"
        plots[pid] = PlotTiles(pid, f"{pid}.png", scales,
                               {r: np.asarray(a, dtype=np.float64) for r, a in probs.items()},
                               np.zeros(len(scales), dtype=bool))
        truth[pid] = [TAX.label(TAX.node("species", true))]
    return plots, truth


@pytest.fixture(scope="module")
def calibrated():
    cal, cal_truth = synthetic_plots(30, seed=0)
    return cal, cal_truth, calibrate_rules(cal, cal_truth, TAX, grids=GRIDS, overlap=0.1)


@pytest.fixture(scope="module")
def calibrated_peaked():
    cal, cal_truth = peaked_plots(30, seed=0)
    return cal, cal_truth, calibrate_rules(cal, cal_truth, TAX, grids=GRIDS)


def records_f1(plots, truth, rule, thresholds, learned=None, tiles=None, scores=None) -> float:
    recs = plot_records(plots, TAX, rule=rule, thresholds=thresholds, learned=learned,
                        tiles=tiles, scores=scores)
    return evaluate_plots(recs, truth, TAX)["species"]["macro_f1_per_plot"]


# ---------------------------------------------------------------------- quality
def test_learned_rule_beats_max_on_spread_evidence(calibrated):
    _, _, s = calibrated
    test, test_truth = synthetic_plots(30, seed=1)
    learned = records_f1(test, test_truth, LEARNED, s.thresholds_for(LEARNED), s.learned)
    best_max = max(records_f1(test, test_truth, "max", {"species": t})
                   for t in CANDIDATE_THRESHOLDS[::4])  # max at its best, even on test plots
    assert learned >= 0.9
    assert learned >= best_max + 0.15
    table = s.table().set_index("rule")
    # calibrated, max needs several supporting tiles and so drops the one spiky tile
    assert table.loc["max", "min_tiles"] > 1
    assert table.loc[LEARNED, "species_f1"] >= table.loc["max", "species_f1"]
    assert s.rule in ("mean", LEARNED) and table.loc[s.rule, "chosen"]
    assert table["chosen"].sum() == 1


@pytest.mark.parametrize("data", ["calibrated", "calibrated_peaked"])
@pytest.mark.parametrize("rule", [*RULES, LEARNED])
def test_chosen_thresholds_are_the_best_aggregate_plot_can_do(request, data, rule):
    """The numpy sweep picks what aggregate_plot itself scores best (species threshold and
    tile settings, then genus); the learned rule on its out-of-fold scores."""
    cal, truth, s = request.getfixturevalue(data)
    th, tiles = s.thresholds_for(rule), s.tiles_for(rule)
    scores = s.learned.oof_scores_ if rule == LEARNED else None
    row = next(r for r in s.calibration if r["rule"] == rule)
    ev = evaluate_plots(plot_records(cal, TAX, rule=rule, thresholds=th, learned=s.learned,
                                     tiles=tiles, scores=scores), truth, TAX)
    assert row["macro_f1_per_plot"] == {r: pytest.approx(ev[r]["macro_f1_per_plot"])
                                        for r in TAX.ranks}
    for opt in tile_options(rule):
        for t in CANDIDATE_THRESHOLDS[::3 if opt == tiles else 12]:
            assert records_f1(cal, truth, rule, {**th, "species": t}, s.learned, opt,
                              scores) <= row["macro_f1_per_plot"]["species"] + 1e-9
    for t in CANDIDATE_THRESHOLDS[::6]:
        ev = evaluate_plots(plot_records(cal, TAX, rule=rule, thresholds={**th, "genus": t},
                                         learned=s.learned, tiles=tiles, scores=scores),
                            truth, TAX)
        assert ev["genus"]["macro_f1_per_plot"] <= row["macro_f1_per_plot"]["genus"] + 1e-9


@pytest.mark.parametrize("data", ["calibrated", "calibrated_peaked"])
@pytest.mark.parametrize("rule", [*RULES, LEARNED])
def test_sweep_matches_aggregate_plot_for_every_tile_setting(request, data, rule):
    """Species F1 of the numpy sweep at every searched top_k / min_tile_prob / min_tiles
    equals aggregate_plot's (the peaked plots have flagged tiles; the spread ones tiles
    under the tile gate)."""
    cal, truth, s = request.getfixturevalue(data)
    ids = list(cal)[:12]
    cal, truth = {p: cal[p] for p in ids}, {p: truth[p] for p in ids}
    scores = s.learned.oof_scores_ if rule == LEARNED else None
    options = tile_options(rule)
    assert len(options) == {"noisy_or": 27, "mean": 27, LEARNED: 1}.get(rule, 3)
    assert options[0] == TileSettings()
    for opt in options:
        curve = species_f1(cal, truth, TAX, rule, opt, scores=scores)[0]
        for i in range(0, len(CANDIDATE_THRESHOLDS), 9):
            assert curve[i] == pytest.approx(records_f1(
                cal, truth, rule, {"species": float(CANDIDATE_THRESHOLDS[i])}, s.learned, opt,
                scores)), (opt, CANDIDATE_THRESHOLDS[i])


def test_learned_rule_is_scored_out_of_fold(calibrated_peaked):
    """On noisy plots (species lists unrelated to the tiles) the learned rule's in-sample
    F1 flatters it; its reported F1 comes from plots each fold's model did not see."""
    cal, truth, s = calibrated_peaked
    inside = calibrate_rules(cal, truth, TAX, grids=GRIDS, folds=1)
    table, table_in = s.table().set_index("rule"), inside.table().set_index("rule")
    assert table.loc[LEARNED, "evaluation"] == "out-of-fold (k=5)"
    assert table_in.loc[LEARNED, "evaluation"] == "in-sample"
    assert set(table.drop(index=LEARNED)["evaluation"]) == {"in-sample"}
    assert table.loc[LEARNED, "species_f1"] < table_in.loc[LEARNED, "species_f1"]
    # the model kept is fitted on every plot either way; only thresholds and F1 differ
    for r in TAX.ranks:
        np.testing.assert_allclose(s.learned.coef_[r], inside.learned.coef_[r])
    pid = next(iter(cal))
    full = s.learned.scores(cal[pid].probs, cal[pid].scales, cal[pid].unknown)
    assert not np.allclose(full["species"], s.learned.oof_scores_[pid]["species"])
    doc = s.to_dict()
    assert doc["learned"]["evaluation"] == "out-of-fold (k=5)" and doc["learned"]["folds"] == 5
    assert next(r for r in doc["calibration"] if r["rule"] == LEARNED)["evaluation"] == \
        "out-of-fold (k=5)"
    # the same seed gives the same folds
    again = calibrate_rules(cal, truth, TAX, grids=GRIDS)
    assert again.table()["species_f1"].tolist() == s.table()["species_f1"].tolist()


@pytest.mark.parametrize("n,evaluation", [
    (3, "out-of-fold (k=3: only 3 plots)"),
    (1, "in-sample (out-of-fold needs 2 plots or more)")])
def test_few_plots_say_how_the_learned_rule_was_scored(n, evaluation):
    plots, truth = synthetic_plots(n, seed=4)
    s = calibrate_rules(plots, truth, TAX, grids=GRIDS)
    table = s.table().set_index("rule")
    assert table.loc[LEARNED, "evaluation"] == evaluation
    assert s.learned.evaluation_ == evaluation


class ReplayTiles:
    """A tile classifier that hands back known tile probabilities, one plot per photo."""

    def __init__(self, plots):
        self.taxonomy = TAX
        self._plots = list(plots)

    def predict_tiles(self, images):
        tp = self._plots.pop(0)
        assert len(images) == len(tp.scales)
        return decode_leaf_probabilities(tp.probs["species"], TAX)

    def describe(self):
        return {"kind": "replay"}


def test_mean_with_top_k_1_is_calibrated_and_applied(tmp_path):
    cal, truth = confuser_plots(16, seed=0)
    s = calibrate_rules(cal, truth, TAX, grids=GRIDS)
    table = s.table().set_index("rule")
    th, tiles = s.thresholds_for("mean"), s.tiles_for("mean")
    assert s.rule == "mean" and tiles.top_k == 1 and table.loc["mean", "top_k"] == 1
    without = max(records_f1(cal, truth, "mean", {**th, "species": float(t)},
                             tiles=TileSettings(None, tiles.min_tile_prob, tiles.min_tiles))
                  for t in CANDIDATE_THRESHOLDS)
    assert table.loc["mean", "species_f1"] == 1.0 > without + 0.2
    assert table.drop(index=["mean", LEARNED])["species_f1"].max() < 0.9
    path = s.save(tmp_path / "cal")
    assert json.loads(path.read_text())["tiles"]["top_k"] == 1

    photos = []
    for pid in cal:
        photos.append(tmp_path / f"{pid}.png")
        Image.new("RGB", (64, 64), (90, 120, 60)).save(photos[-1])
    schema = json.loads((SCHEMAS / "plot_report.schema.json").read_text())
    expected = plot_records(cal, TAX, rule="mean", thresholds=th, tiles=tiles)
    for extra, top_k, overridden in (({}, 1, []), ({"top_k": 0}, None, ["top_k"])):
        out = tmp_path / f"rep{len(extra)}"
        res = plot_report(ReplayTiles(cal.values()), photos, out, settings=path, **extra)
        doc = json.loads((out / "plot_records.json").read_text())
        jsonschema.validate(doc, schema)
        used = doc["settings"]
        assert (used["rule"], used["top_k"], used["min_tile_prob"], used["min_tiles"]) == \
            ("mean", top_k, tiles.min_tile_prob, tiles.min_tiles)
        assert used["overridden"] == overridden
        if top_k == 1:
            def _plain(records):  # the report adds each record's calibrated confidence
                return {p: [{k: v for k, v in r.to_dict().items() if k != "confidence"}
                            for r in rs] for p, rs in records.items()}
            assert _plain(res.records) == _plain(expected)
            assert evaluate_plots(res.records, truth, TAX)["species"]["macro_f1_per_plot"] == 1.0
        else:
            assert evaluate_plots(res.records, truth, TAX)["species"]["macro_f1_per_plot"] < 0.9


def test_settings_without_tile_settings_or_evaluation_still_load(calibrated, tmp_path):
    """plot_settings.json written before tile settings and out-of-fold scoring."""
    _, _, s = calibrated
    doc = s.to_dict()
    del doc["tiles"]
    for row in doc["calibration"]:
        del row["tiles"], row["evaluation"]
    for key in ("evaluation", "folds", "seed"):
        del doc["learned"][key]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    old = PlotSettings.load(path)
    assert all(old.tiles_for(r) == TileSettings() for r in (*RULES, LEARNED))
    assert old.tiles == TileSettings()
    assert set(old.table()["evaluation"]) == {"in-sample"}
    assert old.learned.evaluation_ == "in-sample"
    r = resolve_report_settings(path)
    assert (r.rule, r.top_k, r.min_tile_prob, r.min_tiles) == (s.rule, None, 0.0, 1)
    assert r.thresholds == s.thresholds
    jsonschema.validate(old.to_dict(),
                        json.loads((SCHEMAS / "plot_settings.schema.json").read_text()))


def test_ties_go_to_the_simpler_rule():
    plots, truth = synthetic_plots(4, seed=3)
    # every tile sure of one true species: every rule is perfect, so the simplest wins
    for pid, tp in plots.items():
        leaf = np.zeros_like(tp.probs["species"])
        leaf[:, TAX.index(TAX.find(truth[pid][0], "species")[0])] = 1.0
        tp.probs = decode_leaf_probabilities(leaf, TAX).probs
        truth[pid] = truth[pid][:1]
    s = calibrate_rules(plots, truth, TAX, grids=GRIDS)
    assert s.table()["species_f1"].tolist() == [1.0] * 5
    assert s.rule == "argmax_union"


# ---------------------------------------------------------------------- records
def test_settings_json_round_trip_gives_identical_records(calibrated, tmp_path):
    cal, _, s = calibrated
    path = s.save(tmp_path)
    assert path == tmp_path / SETTINGS_FILE
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, json.loads((SCHEMAS / "plot_settings.schema.json").read_text()))
    assert doc["provenance"]["n_calibration_plots"] == 30
    assert doc["learned"]["features"][:5] == ["2x2:max", "2x2:mean", "2x2:noisy_or",
                                              "2x2:first", "2x2:top3"]
    back = PlotSettings.load(tmp_path)
    assert back.to_dict() == s.to_dict() and back.source == path
    for rule in (LEARNED, s.rule, "noisy_or"):
        a = plot_records(cal, TAX, rule=rule, thresholds=s.thresholds_for(rule),
                         learned=s.learned)
        b = plot_records(cal, TAX, rule=rule, thresholds=back.thresholds_for(rule),
                         learned=back.learned)
        assert {k: [r.to_dict() for r in v] for k, v in a.items()} == \
            {k: [r.to_dict() for r in v] for k, v in b.items()}


def test_a_broken_settings_file_names_the_problem(calibrated, tmp_path):
    _, _, s = calibrated
    doc = s.to_dict()
    doc["learned"]["coef"]["species"] = doc["learned"]["coef"]["species"][:-1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="coefficients"):
        PlotSettings.load(bad)
    doc = s.to_dict()
    doc["rule"] = "median"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"bad\.json: \$\.rule"):
        PlotSettings.load(bad)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), th=st.tuples(*[st.floats(0.0, 1.0)] * 3),
       n_flags=st.integers(0, 5))
def test_learned_records_never_name_a_taxon_with_its_ancestor(calibrated, seed, th, n_flags):
    _, _, s = calibrated
    plots, _ = synthetic_plots(1, seed=seed)
    tp = next(iter(plots.values()))
    tp.unknown[:n_flags] = True
    scores = s.learned.scores(tp.probs, tp.scales, tp.unknown)
    recs = aggregate_plot(tp.probs, TAX, rule=LEARNED, scores=scores, unknown=tp.unknown,
                          thresholds=dict(zip(("family", "genus", "species"), th)))
    nodes = [r.node for r in recs if r.taxon_rank != "unknown"]
    assert len(nodes) == len(set(nodes))
    for a in nodes:
        assert not any(b != a and b[:len(a)] == a for b in nodes), (a, nodes)
    assert all(r.rule == "learned" for r in recs)
    unknown = [r for r in recs if r.taxon_rank == "unknown"]
    assert [r.n_tiles for r in unknown] == ([n_flags] if n_flags else [])


def test_learned_rule_rolls_up_to_genus_when_species_are_unsure(calibrated):
    _, _, s = calibrated
    plots, _ = synthetic_plots(1, seed=5)
    tp = next(iter(plots.values()))
    scores = s.learned.scores(tp.probs, tp.scales)
    sp, ge = scores["species"], scores["genus"]
    # thresholds no species passes but the best genus does: a genus record, no species
    recs = aggregate_plot(tp.probs, TAX, rule=LEARNED, scores=scores,
                          thresholds={"species": 1.0, "genus": float(ge.max()), "family": 1.0})
    assert sp.max() < 1.0
    assert [(r.taxon_rank, r.reason, r.rule) for r in recs] == [
        ("genus", "backoff_to_genus:low_confidence", "learned")]


def test_learned_rule_needs_its_scores_and_grids(calibrated):
    _, _, s = calibrated
    plots, _ = synthetic_plots(1, seed=2)
    tp = next(iter(plots.values()))
    with pytest.raises(ConfigError, match="learned rule needs its scores"):
        aggregate_plot(tp.probs, TAX, rule=LEARNED)
    with pytest.raises(ConfigError, match="fitted on tiles of the grids"):
        s.learned.scores(tp.probs, np.array(["3x3"] * len(tp.scales)))
    with pytest.raises(ConfigError, match="not fitted"):
        LearnedPlotRule(GRIDS).scores(tp.probs, tp.scales)


# ---------------------------------------------------------------------- report settings
def test_resolve_report_settings(calibrated, tmp_path):
    _, _, s = calibrated
    path = s.save(tmp_path)
    r = resolve_report_settings(path)
    assert (r.rule, r.grids, r.overlap, r.thresholds) == (s.rule, list(GRIDS), 0.1, s.thresholds)
    assert (r.top_k, r.min_tile_prob, r.min_tiles) == (s.tiles.top_k, s.tiles.min_tile_prob,
                                                       s.tiles.min_tiles)
    assert r.source == str(path) and r.overridden == []
    r = resolve_report_settings(path, rule="max")
    assert r.min_tiles == s.tiles_for("max").min_tiles
    r = resolve_report_settings(path, top_k=0, min_tiles=2, min_tile_prob=0.3)
    assert (r.top_k, r.min_tile_prob, r.min_tiles) == (None, 0.3, 2)
    assert r.overridden == ["top_k", "min_tile_prob", "min_tiles"]
    r = resolve_report_settings(path, rule="max", thresholds={"species": 0.42}, overlap=0.0)
    assert r.thresholds == {**s.thresholds_for("max"), "species": 0.42} and r.overlap == 0.0
    assert r.overridden == ["overlap", "rule", "thresholds"] and r.learned is None
    r = resolve_report_settings(path, rule=LEARNED)
    assert r.learned is not None and r.thresholds == s.thresholds_for(LEARNED)
    with pytest.raises(ConfigError, match="fitted on the grids"):
        resolve_report_settings(path, rule=LEARNED, grids=[3])
    with pytest.raises(ConfigError, match="needs its fitted parameters"):
        resolve_report_settings(None, rule=LEARNED)
    plain = resolve_report_settings(None)
    assert (plain.rule, plain.grids, plain.overlap, plain.source) == ("max", ["3x3"], 0.0, None)
    assert (plain.top_k, plain.min_tile_prob, plain.min_tiles) == (None, 0.0, 1)
    assert resolve_report_settings(None, top_k=3).top_k == 3
    with pytest.raises(ConfigError, match="min_tiles must be at least 1"):
        resolve_report_settings(None, min_tiles=0)


def test_truth_and_photos_must_match():
    photos = [Path("a/p1.jpg"), Path("a/p2.jpg")]
    check_plot_truth({"p1": ["Carex nigra"], "p2": []}, photos, TAX, truth_file="t.csv")
    with pytest.raises(AnnotationError, match=r"t\.csv: plot_id 'p3' has no photo.*p3\.jpg"):
        check_plot_truth({"p1": [], "p2": [], "p3": []}, photos, truth_file="t.csv")
    with pytest.raises(AnnotationError, match=r"p2\.jpg: plot 'p2' has no row in t\.csv"):
        check_plot_truth({"p1": []}, photos, truth_file="t.csv")
    with pytest.raises(AnnotationError, match=r"species='Carex nigrra'.*Did you mean "
                                              r"'Carex nigra'"):
        check_plot_truth({"p1": ["Carex nigrra"], "p2": []}, photos, TAX, truth_file="t.csv")


# ---------------------------------------------------------------------- end to end
SMALL = Taxonomy.from_records([
    {"family": "Cyperaceae", "genus": "Carex", "species": "nigra"},
    {"family": "Cyperaceae", "genus": "Carex", "species": "flacca"},
    {"family": "Juncaceae", "genus": "Juncus", "species": "effusus"},
    {"family": "Poaceae", "genus": "Poa", "species": "annua"},
])


@pytest.fixture(scope="module")
def bundle_dir(make_tile_classifier, tmp_path_factory) -> Path:
    """A saved tiny bundle whose backbone weights travel with it (a checkpoint file)."""
    clf = make_tile_classifier(SMALL, n=64, steps=20, batch_size=10, random_labels=True)
    out = tmp_path_factory.mktemp("plot-cal-model")
    torch.save(clf.backbone.model.state_dict(), out / "backbone.pth")
    clf.bundle.backbone = {**clf.bundle.backbone, "checkpoint": str(out / "backbone.pth")}
    clf.bundle.save(out / "model")
    return out / "model"


@pytest.fixture(scope="module")
def plot_photos(tmp_path_factory) -> tuple[list[Path], Path]:
    """Four small generated plot photos (coloured patches on soil) and their truth CSV."""
    folder = tmp_path_factory.mktemp("plot-photos")
    rng = np.random.default_rng(0)
    photos = []
    for i in range(4):
        a = np.empty((96, 96, 3), dtype=np.uint8)
        a[:] = (110, 80, 50)
        for _ in range(3 + i):
            y, x = rng.integers(0, 72, 2)
            a[y:y + 24, x:x + 24] = rng.integers(0, 255, 3)
        photos.append(folder / f"plot{i}.png")
        Image.fromarray(a).save(photos[-1])
    truth = folder / "truth.csv"
    truth.write_text("plot_id,species\nplot0,Carex nigra\nplot1,Carex nigra;Poa annua\n"
                     "plot2,Juncus effusus\nplot3,Carex flacca\nplot3,Poa annua\n")
    return photos, truth


def test_calibrate_plots_cli_then_plot_report_uses_the_settings(bundle_dir, plot_photos,
                                                                 tmp_path, one_thread):
    photos, truth = plot_photos
    runner = CliRunner()
    cal = tmp_path / "cal"
    res = runner.invoke(main, ["calibrate-plots", "--model", str(bundle_dir), "--truth",
                               str(truth), *map(str, photos), "--out", str(cal), "--grid", "2",
                               "--grid", "3", "--overlap", "0.2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "chosen rule:" in res.output and "learned" in res.output
    doc = json.loads((cal / SETTINGS_FILE).read_text())
    jsonschema.validate(doc, json.loads((SCHEMAS / "plot_settings.schema.json").read_text()))
    assert doc["grids"] == ["2x2", "3x3"] and doc["overlap"] == 0.2
    prov = doc["provenance"]
    assert prov["n_calibration_plots"] == 4 and prov["model"] == str(bundle_dir)
    assert prov["backbone"] and prov["taxoclass_version"] and prov["created"]
    table = pd.read_csv(cal / TABLE_FILE)
    assert table["rule"].tolist() == ["argmax_union", "max", "mean", "noisy_or", "learned"]
    assert table["chosen"].sum() == 1 and table.loc[table["chosen"], "rule"].item() == doc["rule"]
    assert {"species_f1", "genus_f1", "species_threshold"} <= set(table.columns)

    schema = json.loads((SCHEMAS / "plot_report.schema.json").read_text())
    for extra, rule in (([], doc["rule"]), (["--rule", "learned"], "learned"),
                        (["--rule", "max", "--threshold", "species=0.33"], "max")):
        rep = tmp_path / f"rep-{rule}-{len(extra)}"
        res = runner.invoke(main, ["plot-report", "--model", str(bundle_dir), *map(str, photos),
                                   "--out", str(rep), "--settings", str(cal / SETTINGS_FILE),
                                   "--device", "cpu", *extra])
        assert res.exit_code == 0, res.output
        rj = json.loads((rep / "plot_records.json").read_text())
        jsonschema.validate(rj, schema)
        used = rj["settings"]
        assert used["settings_file"] == str(cal / SETTINGS_FILE)
        assert used["rule"] == rule and used["grids"] == ["2x2", "3x3"] and used["overlap"] == 0.2
        calibrated_th = next(r["thresholds"] for r in doc["calibration"] if r["rule"] == rule)
        expected = {**calibrated_th, **({"species": 0.33} if "--threshold" in extra else {})}
        assert used["thresholds"] == pytest.approx(expected)
        assert used["overridden"] == (["rule", "thresholds"] if "--threshold" in extra else
                                      ["rule"] if extra else [])
        assert rj["plots"][0]["n_tiles"] == 4 + 9
        records = [r for p in rj["plots"] for r in p["records"]]
        assert {r["rule"].split("+")[0] for r in records} == {rule}
        assert {r["reason"] for r in records} <= {
            "species", "backoff_to_genus:low_confidence", "backoff_to_family:low_confidence",
            "unknown:outlier", "unknown:low_confidence"}
        prov = json.loads((rep / "provenance.json").read_text())
        assert prov["config"]["settings_file"] == str(cal / SETTINGS_FILE)
        tiles = next(r["tiles"] for r in doc["calibration"] if r["rule"] == rule)
        assert (used["top_k"], used["min_tile_prob"], used["min_tiles"]) == \
            (tiles["top_k"], tiles["min_tile_prob"], tiles["min_tiles"])
    assert table.loc[table["rule"] == "learned", "evaluation"].item() == \
        "out-of-fold (k=4: only 4 plots)"

    rep = tmp_path / "rep-tiles"
    res = runner.invoke(main, ["plot-report", "--model", str(bundle_dir), *map(str, photos),
                               "--out", str(rep), "--settings", str(cal / SETTINGS_FILE),
                               "--device", "cpu", "--rule", "mean", "--top-k", "2",
                               "--min-tile-prob", "0.05", "--min-tiles", "2"])
    assert res.exit_code == 0, res.output
    used = json.loads((rep / "plot_records.json").read_text())["settings"]
    assert (used["top_k"], used["min_tile_prob"], used["min_tiles"]) == (2, 0.05, 2)
    assert used["overridden"] == ["rule", "top_k", "min_tile_prob", "min_tiles"]


def test_calibrate_plots_library_reports_unreadable_photos(bundle_dir, plot_photos, tmp_path,
                                                           one_thread):
    from taxoclass.plots.tiling import BundleTileClassifier

    photos, _ = plot_photos
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    clf = BundleTileClassifier.load(bundle_dir, batch_size=10)
    calls = []
    truth = {"plot0": ["Carex nigra"], "plot1": ["Poa annua"], "broken": ["Carex flacca"]}
    res = calibrate_plots(clf, [photos[0], bad, photos[1]], truth, grids=(2,),
                          progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert [f["photo"] for f in res.failures] == [str(bad)]
    assert set(res.predictions.plots) == {"plot0", "plot1"}
    assert res.settings.provenance["n_calibration_plots"] == 2
    assert res.settings.provenance["n_failures"] == 1


@pytest.mark.parametrize("truth_text,message", [
    ("plot_id,species\nplot0,Carex nigra\nplot1,Poa annua\nplot9,Poa annua\n",
     r"truth\.csv: plot_id 'plot9' has no photo"),
    ("plot_id,species\nplot0,Carex nigra\n",
     r"plot1\.png: plot 'plot1' has no row in .*truth\.csv"),
    ("plot_id,species\nplot0,Carex nigra\nplot1,Poa anua\n",
     r"truth\.csv: record plot_id='plot1', species='Poa anua'.* not in the model's taxonomy"
     r".*Did you mean 'Poa annua'"),
])
def test_calibrate_plots_cli_names_truth_problems(bundle_dir, plot_photos, tmp_path, truth_text,
                                                  message):
    photos, _ = plot_photos
    truth = tmp_path / "truth.csv"
    truth.write_text(truth_text)
    res = CliRunner().invoke(main, ["calibrate-plots", "--model", str(bundle_dir), "--truth",
                                    str(truth), *map(str, photos[:2]), "--out",
                                    str(tmp_path / "cal"), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    # one Error line (the hand-built bundle also warns that it has no confidence calibration)
    assert sum(ln.startswith("Error: ") for ln in res.output.splitlines()) == 1, res.output
    import re

    assert re.search(message, " ".join(res.output.split())), res.output
    assert not (tmp_path / "cal" / SETTINGS_FILE).exists()


def test_plot_report_rule_learned_needs_settings(bundle_dir, plot_photos, tmp_path):
    photos, _ = plot_photos
    res = CliRunner().invoke(main, ["plot-report", "--model", str(bundle_dir), str(photos[0]),
                                    "--out", str(tmp_path / "rep"), "--rule", "learned",
                                    "--device", "cpu"])
    assert res.exit_code == 2 and "needs its fitted parameters" in res.output, res.output


@pytest.mark.parametrize("rule", ["max", "noisy_or", "mean", "argmax_union"])
@pytest.mark.parametrize("coarse", [0.0, 0.5, 2.0])
def test_species_f1_weights_tiles_by_scale_as_aggregate_plot_does(calibrated_peaked, rule,
                                                                   coarse):
    """The sweep's scale_weights (the benchmark's weight of coarse tiles) give the F1 that
    aggregate_plot(weights=...) gives, at every min_tiles and threshold."""
    cal, truth, _ = calibrated_peaked
    ids = list(cal)[:10]
    cal, truth = {p: cal[p] for p in ids}, {p: truth[p] for p in ids}
    tile = TileSettings(top_k=3 if rule in ("noisy_or", "mean") else None)
    curves = species_f1(cal, truth, TAX, rule, tile, min_tiles=(1, 2),
                        scale_weights={"2x2": coarse})
    assert curves.shape == (2, len(CANDIDATE_THRESHOLDS))
    for row, m in enumerate((1, 2)):
        for i in range(0, len(CANDIDATE_THRESHOLDS), 11):
            t = float(CANDIDATE_THRESHOLDS[i])
            recs = {p: aggregate_plot(tp.probs, TAX, plot_id=p, rule=rule,
                                      thresholds={"species": t}, unknown=tp.unknown,
                                      weights=np.where(tp.scales == "2x2", coarse, 1.0),
                                      top_k=tile.top_k, min_tiles=m) for p, tp in cal.items()}
            expected = evaluate_plots(recs, truth, TAX)["species"]["macro_f1_per_plot"]
            assert curves[row, i] == pytest.approx(expected), (m, t)
