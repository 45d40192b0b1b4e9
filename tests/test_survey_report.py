"""The survey report (plots/html.py): overview matrix, richness, per-tile CSV, colours, links.

A real report is written by ``plot_report`` on the shipped fixture plots (and the real
quadrat photo where ../shared exists) with a tiny trained classifier; the page and
``tiles.csv`` are parsed and checked against the records.
"""

from __future__ import annotations

import html
import re
from itertools import combinations
from pathlib import Path

import pandas as pd
import pytest
import torch

from taxoclass.plots.html import TOP_K, explain_reason, explain_rule, lab_distance, palette
from taxoclass.plots.report import plot_report
from taxoclass.taxonomy.tree import Taxonomy
from taxoclass.vocab import REASON_HELP

TAX = Taxonomy.from_records([
    {"family": "Sapindaceae", "genus": "Acer", "species": "campestre"},
    {"family": "Fagaceae", "genus": "Quercus", "species": "robur"},
    {"family": "Fagaceae", "genus": "Quercus", "species": "ilex"},
    {"family": "Betulaceae", "genus": "Alnus", "species": "glutinosa"},
    {"family": "Betulaceae", "genus": "Betula", "species": "pendula"},
    {"family": "Rosaceae", "genus": "Rosa", "species": "canina"},
])
MIN_LAB = 20.0  # pairwise CIE Lab distance of two taxa's colours (2.3: just noticeable)


@pytest.fixture(scope="module")
def report(make_tile_classifier, fixture_set, tmp_path_factory):
    torch.set_num_threads(1)
    clf = make_tile_classifier(TAX, n=36, steps=10, batch_size=4, random_labels=False)
    photos = sorted(Path(fixture_set["plots"]).glob("*.jpg"))
    out = tmp_path_factory.mktemp("survey") / "report"
    res = plot_report(clf, photos, out, grids=(2, 3), rule="argmax_union", thumbnail_px=360)
    return res, out


def _matrix_rows(page: str) -> list[str]:
    table = page.split("<table id='matrix'", 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr class='mrow'>(.*?)</tr>", table)


def test_overview_matrix_one_row_per_plot_and_richness(report):
    res, out = report
    page = (out / "report.html").read_text()
    rows = _matrix_rows(page)
    assert len(rows) == len(res.plots) == 3
    reported = {r.taxon for p in res.plots for r in p.records if r.taxon_rank != "unknown"}
    assert reported, "argmax_union reports every tile's arg-max taxon"
    head = page.split("<table id='matrix'", 1)[1].split("</thead>", 1)[0]
    assert sorted(re.findall(r"<th class='rot'>.*?<i>(.*?)</i>", head)) == sorted(reported)
    for plot, row in zip(res.plots, rows):
        assert f"href='#{plot.plot_id}'" in row
        found = {r.taxon: r.n_tiles for r in plot.records if r.taxon_rank != "unknown"}
        richness = int(re.search(r"class='n richness'>(\d+)<", row).group(1))
        assert richness == len(found)
        cells = re.findall(r"<td class='(?:n|z)' data-v='(\d+)'", row)
        assert len(cells) == len(reported)  # one cell per taxon column
        assert sorted(int(c) for c in cells if c != "0") == sorted(found.values())
    # the chart has one bar per plot
    svg = page.split("<svg id='richness-chart'", 1)[1].split("</svg>", 1)[0]
    assert svg.count("<rect") == 3


def test_tiles_csv_one_row_per_tile_with_top3_per_rank(report):
    res, out = report
    tiles = pd.read_csv(out / "tiles.csv", keep_default_na=False)
    assert len(tiles) == sum(len(p.tiles) for p in res.plots) == 3 * (4 + 9)
    assert tiles["tile_id"].is_unique
    assert set(tiles["grid"]) == {"2x2", "3x3"}
    for rank in TAX.ranks:
        for j in range(1, TOP_K + 1):
            assert f"{rank}_top{j}" in tiles and f"{rank}_top{j}_prob" in tiles
        probs = tiles[[f"{rank}_top{j}_prob" for j in range(1, TOP_K + 1)]].to_numpy(float)
        assert (probs[:, :-1] >= probs[:, 1:] - 1e-9).all() and (probs <= 1 + 1e-9).all()
    # top-1 of the species column agrees with the classifier's probabilities
    p0 = res.plots[0]
    best = p0.top["species"][0][:, 0]
    first = tiles[tiles["plot_id"] == p0.plot_id]
    assert first["species_top1"].tolist() == [TAX.label(TAX.node("species", int(b)))
                                              for b in best]
    # the answer is the taxon the tile supports, with the reason of that record
    assert first["answer"].tolist() == p0.tile_labels
    reasons = {r.taxon: r.reason for r in p0.records}
    for _, row in first.iterrows():
        if row["answer"] and row["answer"] != "unknown":
            assert row["reason"] == reasons[row["answer"]]


def test_taxa_of_one_plot_get_distinct_colours(report):
    res, _ = report
    labels = [lab for p in res.plots for lab in p.tile_labels] + [
        r.taxon for p in res.plots for r in p.records]
    colours = palette(labels)
    for p in res.plots:
        taxa = {r.taxon for r in p.records if r.taxon_rank != "unknown"}
        for a, b in combinations(sorted(taxa), 2):
            assert lab_distance(colours[a], colours[b]) >= MIN_LAB, (a, b)
    # also for many taxa at once: 24 names, pairwise distinct
    many = palette([f"taxon {i}" for i in range(24)])
    dists = [lab_distance(many[a], many[b]) for a, b in combinations(list(many)[:24], 2)]
    assert min(dists) >= 15.0
    assert palette(["a", "b"]) == palette(["a", "b"])  # deterministic


def test_every_written_file_is_linked(report):
    _, out = report
    page = (out / "report.html").read_text()
    links = set(re.findall(r"<a href='([^'#]+)'", page))
    written = {f.name for f in out.iterdir() if f.is_file()} - {"report.html"}
    assert written and written <= links, written - links
    assert links <= written | {"config.yaml"}, links - written


def test_plot_sections_show_photo_tooltips_and_legend(report):
    res, out = report
    page = (out / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == len(res.plots)
    p0 = res.plots[0]
    n_fine = sum(1 for t in p0.tiles if t.scale == "3x3")
    section = page.split(f"<div class='plot' id='{p0.plot_id}'>", 1)[1].split(
        "<div class='plot'", 1)[0]
    tips = re.findall(r"<div class='tile' title='(.*?)'", section, flags=re.S)
    assert len(tips) == n_fine
    assert all(tip.count("\n") == len(TAX.ranks) for tip in tips)  # a line per rank
    assert "Legend" in page and "confidence" in page and "table class='sortable'" in page
    for reason in {r.reason for p in res.plots for r in p.records}:
        assert f"<dt>{reason}</dt><dd>{html.escape(explain_reason(reason))}</dd>" in page


def test_explain_reason_words():
    assert explain_reason("species") == REASON_HELP["<lowest rank>"]
    assert "taxon at genus" in explain_reason("backoff_to_genus:low_confidence")
    assert "distance gate" in explain_reason("backoff_to_family:outlier")
    assert explain_reason("unknown:outlier") == REASON_HELP["unknown:outlier"]
    assert "checklist" in explain_rule("max+checklist")
