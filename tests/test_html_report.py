"""The HTML plot report as a person sees it: rendered by headless Chromium, then checked.

A small real report (two real leaf photos as plots, a tiny DINOv2-shaped backbone with a
briefly trained rank head, a 2x2 grid) is written by ``plot_report``; Chromium takes a
screenshot and dumps the DOM. The test checks that the screenshot is not blank, that
the place where the first plot's picture is laid out really shows that picture (pixels
compared with the embedded JPEG, and the colour of the first reported taxon's tiles is
there), and that the taxa table names the reported taxa; the overview matrix has a row per plot.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from taxoclass.plots.html import palette as _palette
from taxoclass.plots.report import plot_report
from taxoclass.plots.tiling import BundleTileClassifier
from taxoclass.taxonomy.tree import Taxonomy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (`chromium`) is not "
                                "on PATH; the rendered-report check needs a browser")

TAX = Taxonomy.from_records([
    {"family": "Sapindaceae", "genus": "Acer", "species": "campestre"},
    {"family": "Fagaceae", "genus": "Quercus", "species": "robur"},
    {"family": "Fagaceae", "genus": "Quercus", "species": "ilex"},
    {"family": "Betulaceae", "genus": "Alnus", "species": "glutinosa"},
])
WINDOW = (1200, 2600)  # tall: the overview (matrix, chart, legend) comes first
# Appended to a copy of the page: writes where each picture is laid out into the DOM,
# which ``--dump-dom`` prints after scripts ran (same window size as the screenshot).
GEOMETRY_JS = ("<script>document.body.insertAdjacentHTML('beforeend', '<pre id=\"geom\">' + "
               "JSON.stringify([...document.images].map(i => {const r = "
               "i.getBoundingClientRect(); return [r.left, r.top, r.width, r.height];})) + "
               "'</pre>');</script>")


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--user-data-dir={tmp_path / 'chromium-profile'}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def classifier(make_tile_classifier) -> BundleTileClassifier:
    """A tiny DINOv2-shaped backbone and a rank head trained for a few steps."""
    return make_tile_classifier(TAX, n=32, steps=10, batch_size=4, random_labels=False)


def test_rendered_report_shows_photos_and_taxa(classifier, leaf_image_paths, tmp_path):
    torch.set_num_threads(1)
    res = plot_report(classifier, leaf_image_paths[:2], tmp_path / "report", grids=(2,),
                      rule="argmax_union", thumbnail_px=400)
    page = res.files["html"]
    first = res.plots[0]
    taxa = [r.taxon for r in first.records]
    assert taxa, "argmax_union reports every tile's arg-max species"

    # the table is in the DOM, with the plot ids and every reported taxon
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Taxa by rank" in dom.stdout
    # the overview matrix: one row per plot, a column per reported taxon, each plot linked
    matrix = dom.stdout.split('<table id="matrix"', 1)[1].split("</table>", 1)[0]
    assert matrix.count('<tr class="mrow">') == len(res.plots)
    reported = {r.taxon for p in res.plots for r in p.records if r.taxon_rank != "unknown"}
    assert matrix.count('<th class="rot"') == len(reported)
    assert all(f'href="#{p.plot_id}"' in matrix for p in res.plots)
    for plot in res.plots:
        assert f"<h2>{plot.plot_id}</h2>" in dom.stdout
        for r in plot.records:
            assert f"<i>{r.taxon}</i>" in dom.stdout, r.taxon

    # where the first picture is laid out (same window size as the screenshot)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", GEOMETRY_JS + "</body>"))
    geom_dom = _chromium(tmp_path, "--dump-dom", probe.as_uri())
    geom = json.loads(re.findall(r"<pre id=\"geom\">(\[.*?\])</pre>", geom_dom.stdout)[-1])
    assert len(geom) == 2
    left, top, width, height = (int(round(v)) for v in geom[0])
    embedded = page.read_text().split("data:image/jpeg;base64,")[1].split("'")[0]
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(embedded))).convert("RGB"),
                         dtype=np.float64)
    assert (width, height) == picture.shape[1::-1]
    assert top + height <= WINDOW[1], "the first plot's picture should fit in the screenshot"

    shot = tmp_path / "report.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", page.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    screen = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert screen.shape[:2] == (WINDOW[1], WINDOW[0])
    assert screen.std() > 20, "the screenshot is blank"

    # the picture's place on screen shows the picture: photo-like, and the same pixels
    region = screen[top:top + height, left:left + width]
    assert region.std() > 30 and len(np.unique(region.reshape(-1, 3), axis=0)) > 200
    assert np.abs(region - picture).mean() < 6.0

    # the first reported taxon's tile colour (full-strength outline) is drawn on the photo
    colour = np.array(_palette([lab for p in res.plots for lab in p.tile_labels]
                               + [r.taxon for p in res.plots for r in p.records])[taxa[0]])
    close = np.abs(region - colour).max(axis=2) <= 24
    assert close.sum() >= 100, f"tile colour {tuple(colour)} not found in the picture"
