"""The survey report: one self-contained HTML page and the per-tile table.

``report.html`` has an overview of all plots (a plot x taxon matrix at the rank each taxon
was reported, richness per plot, a bar chart as inline SVG, links to every file written)
and one section per plot (the photo with the tile grid coloured by taxon, the top-3 per
rank of every tile on hover, the taxa table). Tables sort by a click on their header
(a few lines of inline JS). ``tiles.csv`` is :func:`tiles_frame`: one row per tile.

Duck-typed on the report's ``PlotResult`` (``plot_id``, ``photo``, ``size``, ``tiles``,
``records``, ``tile_labels``, ``thumbnail``, optional ``top``: rank -> each tile's
top-3 (:func:`top_candidates`), optional ``metadata``: date/place) so that this module
imports nothing from :mod:`taxoclass.plots.report`.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from ..vocab import BACKOFF_PREFIX, REASON_HELP, UNKNOWN, Reason, unknown_reason

__all__ = ["TOP_K", "b64_jpeg", "draw_tiles", "explain_reason", "explain_rule", "lab_distance",
           "palette", "render_html", "tiles_frame", "top_candidates"]

#: Candidates listed per rank and tile (in ``tiles.csv`` and the tile tooltips).
TOP_K = 3
#: Colours kept for marks that are not taxa: unknown (red cross), no taxon (grey), black.
_RESERVED = ((230, 30, 30), (200, 200, 200), (20, 20, 20), (255, 255, 255))
_UNKNOWN_RGB = (20, 20, 20)


# ---------------------------------------------------------------------- colours
def _to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..255, ``[n, 3]``) to CIE Lab (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192],
                        [0.1805, 0.0722, 0.9505]])
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]),
                     200 * (f[:, 1] - f[:, 2])], axis=1)


def lab_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """Euclidean distance of two RGB colours in CIE Lab (about 2.3: just noticeable)."""
    la, lb = _to_lab(np.array([a, b]))
    return float(np.linalg.norm(la - lb))


def _candidates() -> tuple[np.ndarray, np.ndarray]:
    """A grid of RGB colours readable on a photo and as a swatch (not too dark or pale)."""
    steps = np.arange(0, 256, 17)
    rgb = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    lab = _to_lab(rgb)
    keep = (lab[:, 0] > 35) & (lab[:, 0] < 85)
    return rgb[keep], lab[keep]


def palette(labels: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """One colour per distinct label (first-seen order), ``unknown`` near-black.

    Farthest-point sampling in CIE Lab over a grid of readable colours: each new taxon gets
    the candidate farthest from every colour already given (and from the reserved marks:
    the red unknown cross, grey, black, white), so the taxa of a report, and hence of
    one plot, are pairwise as distinct as their number allows. Deterministic.
    """
    taxa = list(dict.fromkeys(x for x in labels if x and x != UNKNOWN))
    rgb, lab = _candidates()
    nearest = np.min(np.linalg.norm(lab[:, None] - _to_lab(np.array(_RESERVED))[None], axis=2),
                     axis=1)
    out: dict[str, tuple[int, int, int]] = {}
    for i, name in enumerate(taxa):
        # the first colour: the candidate closest to tab10 blue (a calm start)
        pick = (int(np.argmin(np.linalg.norm(lab - _to_lab(np.array([[31, 119, 180]])), axis=1)))
                if i == 0 else int(np.argmax(nearest)))
        out[name] = tuple(int(v) for v in rgb[pick])
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[pick], axis=1))
    out[UNKNOWN] = _UNKNOWN_RGB
    return out


# ---------------------------------------------------------------------- tiles
def _finest(tiles: Sequence[Any]) -> str | None:
    """The grid drawn on the photo: the one with the most tiles."""
    scales = [t.scale for t in tiles]
    return max(dict.fromkeys(scales), key=scales.count) if scales else None


def top_candidates(probs: Mapping[str, np.ndarray], k: int = TOP_K
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Rank -> (class indices ``[n_tiles, k]``, probabilities ``[n_tiles, k]``), best first:
    what the report keeps of a plot's tile probabilities (small for thousands of classes)."""
    out = {}
    for rank, p in probs.items():
        p = np.asarray(p)
        idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
        out[rank] = (idx.astype(np.int32), np.take_along_axis(p, idx, axis=1))
    return out


def _top(plot: Any, taxonomy, i: int) -> dict[str, list[tuple[str, float]]]:
    """Rank -> the top taxa of tile ``i`` with their probabilities (none when not kept).
    Bare names, as in the rank columns of predictions (``Acer``, not ``Acer sp.``: the rank
    says what it is); display labels are for ``taxon`` / ``answer`` only."""
    top = getattr(plot, "top", None)
    if not top:
        return {}
    return {rank: [(taxonomy.node(rank, int(j))[-1], float(q))
                   for j, q in zip(top[rank][0][i], top[rank][1][i])]
            for rank in taxonomy.ranks if rank in top}


def _tile_reason(plot: Any, label: str) -> tuple[str, str]:
    """(rank, reason) of the record a tile supports (the unknown record for a flagged
    tile); empty for a tile that supports no reported taxon."""
    for r in plot.records:
        if r.taxon == label:
            return str(r.taxon_rank), str(r.reason)
    if label == UNKNOWN:
        return UNKNOWN, unknown_reason(Reason.OUTLIER)
    return "", ""


def tiles_frame(plots: Sequence[Any], taxonomy) -> pd.DataFrame:
    """One row per tile: plot, tile id, grid, cell, pixel box, the top-3 taxa with
    probabilities per rank, the reported taxon the tile supports (``answer``, its
    ``answer_rank``; ``unknown`` for an outlier tile, empty when it supports none) and the
    ``reason`` of that answer."""
    tops = [f"{rank}_top{j}{s}" for rank in taxonomy.ranks for j in range(1, TOP_K + 1)
            for s in ("", "_prob")]
    columns = ["plot_id", "tile_id", "grid", "row", "col", "x0", "y0", "x1", "y1", *tops,
               "answer", "answer_rank", "reason"]
    rows = []
    for p in plots:
        for i, (tile, label) in enumerate(zip(p.tiles, p.tile_labels)):
            row: dict[str, Any] = {"plot_id": p.plot_id, "tile_id": tile.tile_id,
                                   "grid": tile.scale, "row": tile.row, "col": tile.col}
            row.update(zip(("x0", "y0", "x1", "y1"), (int(v) for v in tile.box)))
            for rank, cands in _top(p, taxonomy, i).items():
                for j, (name, prob) in enumerate(cands, 1):
                    row[f"{rank}_top{j}"] = name
                    row[f"{rank}_top{j}_prob"] = round(prob, 6)
            rank, reason = _tile_reason(p, label)
            row.update(answer=label, answer_rank=rank, reason=reason)
            rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def draw_tiles(plot: Any, colours: Mapping[str, tuple[int, int, int]]) -> Image.Image:
    """Thumbnail with the finest grid's tiles filled by the colour of the taxon they support."""
    thumb = plot.thumbnail.convert("RGBA")
    sx, sy = thumb.width / plot.size[0], thumb.height / plot.size[1]
    finest = _finest(plot.tiles)
    layer = Image.new("RGBA", thumb.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for tile, label in zip(plot.tiles, plot.tile_labels):
        if tile.scale != finest:
            continue
        x0, y0, x1, y1 = tile.box
        box = (x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1)
        if label == UNKNOWN:
            draw.rectangle(box, fill=(0, 0, 0, 110), outline=(230, 30, 30, 255), width=3)
            draw.line((box[0], box[1], box[2], box[3]), fill=(230, 30, 30, 255), width=3)
            draw.line((box[0], box[3], box[2], box[1]), fill=(230, 30, 30, 255), width=3)
        elif label:
            draw.rectangle(box, fill=(*colours[label], 90), outline=(*colours[label], 255),
                           width=3)
        else:
            draw.rectangle(box, outline=(200, 200, 200, 200), width=1)
    return Image.alpha_composite(thumb, layer).convert("RGB")


def b64_jpeg(img: Image.Image, quality: int = 80) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------- words
_RULES = {
    "argmax_union": "every tile votes for its most probable taxon; a taxon is reported when "
                    "tiles pass the rank's threshold",
    "max": "the taxon's best tile probability passed the rank's threshold",
    "noisy_or": "1 - prod(1 - p) over the tiles passed the rank's threshold",
    "mean": "the (weighted) mean tile probability passed the rank's threshold",
    "learned": "a learned plot scorer (calibrate-plots) passed its threshold",
    "checklist": "candidates were restricted to a checklist",
}


def explain_reason(reason: str, lowest: str = "species") -> str:
    """A sentence for a reason word of :mod:`taxoclass.vocab` (``species``,
    ``backoff_to_genus:low_confidence``, ``unknown:outlier``, ``failed``)."""
    reason = str(reason)
    if reason == lowest:
        return REASON_HELP.get("<lowest rank>", f"named at the lowest rank ({lowest})")
    if reason.startswith(BACKOFF_PREFIX) and ":" in reason:
        rank, _, why = reason[len(BACKOFF_PREFIX):].partition(":")
        text = REASON_HELP.get(f"{BACKOFF_PREFIX}<rank>:{why}")
        return text.replace("<rank>", rank) if text else f"backed off to {rank} ({why})"
    return REASON_HELP.get(reason, reason)


def explain_rule(rule: str) -> str:
    """A sentence for a plot record's ``rule`` (``max``, ``max+checklist``)."""
    return "; ".join(_RULES.get(part, part) for part in str(rule).split("+") if part)


# ---------------------------------------------------------------------- HTML
_CSS = (
    "body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}"
    ".plot{display:flex;gap:1.5em;margin-bottom:2em;border-top:1px solid #ccc;padding-top:1em}"
    ".sw{display:inline-block;width:1em;height:1em;margin-right:.4em;vertical-align:middle;"
    "border:1px solid #555}table{border-collapse:collapse;margin:.5em 0}"
    "td,th{padding:.15em .6em;text-align:left;border-bottom:1px solid #e4e4e4}"
    "th{background:#eee;cursor:pointer;vertical-align:bottom}th.rot{font-weight:normal;"
    "white-space:nowrap}#matrix td{white-space:nowrap}"
    "td.n{text-align:right}td.z{color:#bbb;text-align:center}.fail{color:#a00}"
    ".photo{position:relative;display:inline-block;line-height:0}"
    ".tile{position:absolute;box-sizing:border-box}.tile:hover{outline:2px solid #fff}"
    ".meta{color:#555}dl.leg dt{font-weight:bold;margin-top:.4em}dl.leg dd{margin-left:1.5em}"
    "small{color:#555}"
)
# click a header: sort that column (numbers as numbers), a second click reverses
_SORT_JS = (
    "<script>document.querySelectorAll('table.sortable th').forEach(function(th){"
    "th.title=th.title||'click to sort';th.addEventListener('click',function(){"
    "var t=th.closest('table'),i=[].indexOf.call(th.parentNode.children,th),"
    "rows=[].slice.call(t.querySelectorAll('tr')).slice(1),d=th.dataset.dir==='a'?-1:1;"
    "th.dataset.dir=d===1?'a':'d';rows.sort(function(a,b){"
    "var x=a.children[i].dataset.v||a.children[i].textContent,"
    "y=b.children[i].dataset.v||b.children[i].textContent,nx=parseFloat(x),ny=parseFloat(y);"
    "return (isNaN(nx)||isNaN(ny)?x.localeCompare(y):nx-ny)*d;});"
    "rows.forEach(function(r){t.tBodies[0].appendChild(r);});});});</script>"
)


def _sw(colours: Mapping[str, tuple[int, int, int]], taxon: str) -> str:
    c = colours.get(taxon)
    if taxon == UNKNOWN:  # as drawn on the photo: dark, outlined in red
        return f"<span class='sw' style='background:rgb{c};border:2px solid #e61e1e'></span>"
    return f"<span class='sw' style='background:rgb{c}'></span>" if c else ""


def _reported(plot: Any) -> list[Any]:
    return [r for r in plot.records if r.taxon_rank != UNKNOWN and r.taxon != UNKNOWN]


def _fmt(v: Any) -> str:
    """Three decimals; empty for a missing value (None, NaN)."""
    return "" if v is None or v != v else f"{float(v):.3f}"


def _meta_text(plot: Any) -> tuple[str, str]:
    """(date, place) of a plot from its optional ``metadata`` mapping."""
    m = getattr(plot, "metadata", None) or {}
    if hasattr(m, "to_dict"):  # a plots.metadata.PlotMetadata: its Darwin Core terms
        m = m.to_dict()
    date = m.get("eventDate") or m.get("date") or ""
    lat, lon = m.get("decimalLatitude", m.get("latitude")), m.get("decimalLongitude",
                                                                   m.get("longitude"))
    place = m.get("locality") or ""
    if lat not in (None, "") and lon not in (None, ""):
        place = f"{place} ({float(lat):.5f}, {float(lon):.5f})".strip()
    return str(date), str(place)


def _chart(plots: Sequence[Any]) -> str:
    """Inline SVG bars: richness (distinct reported taxa) per plot."""
    rich = [len({r.taxon for r in _reported(p)}) for p in plots]
    top = max([1, *rich])
    bar, gap, left, width = 18, 6, 160, 420
    h = len(plots) * (bar + gap) + 30
    out = [f"<svg id='richness-chart' width='{left + width + 60}' height='{h}' "
           "role='img' aria-label='richness per plot' style='font:12px sans-serif'>"]
    for i, (p, n) in enumerate(zip(plots, rich)):
        y = 20 + i * (bar + gap)
        w = width * n / top
        out.append(f"<text x='{left - 6}' y='{y + 13}' text-anchor='end'>"
                   f"{html.escape(p.plot_id)[:24]}</text><rect x='{left}' y='{y}' width='{w:.1f}'"
                   f" height='{bar}' fill='#4a7fb0'><title>{html.escape(p.plot_id)}: {n} "
                   f"taxa</title></rect><text x='{left + w + 4}' y='{y + 13}'>{n}</text>")
    out.append(f"<text x='{left}' y='12'>richness (taxa reported per plot)</text></svg>")
    return "".join(out)


def _matrix(plots: Sequence[Any], taxonomy, colours) -> str:
    """Plot x taxon table: tiles supporting each reported taxon (hover: its evidence)."""
    esc = html.escape
    order = {r: i for i, r in enumerate(taxonomy.ranks)}
    taxa: dict[str, str] = {}
    for p in plots:
        for r in _reported(p):
            taxa.setdefault(r.taxon, str(r.taxon_rank))
    cols = sorted(taxa, key=lambda t: (-order.get(taxa[t], -1), t))
    head = "".join(f"<th class='rot'>{_sw(colours, t)}<i>{esc(t)}</i><br><small>{esc(taxa[t])}"
                   f"</small></th>" for t in cols)
    parts = ["<table id='matrix' class='sortable'><thead><tr><th>plot</th><th>date</th>"
             f"<th>place</th><th>richness</th><th>unknown tiles</th>{head}</tr></thead><tbody>"]
    for p in plots:
        found = {r.taxon: r for r in _reported(p)}
        date, place = _meta_text(p)
        cells = []
        for t in cols:
            r = found.get(t)
            if r is None:
                cells.append("<td class='z' data-v='0'>·</td>")
                continue
            conf = _fmt(getattr(r, "confidence", None))
            tip = (f"{t}: {r.n_tiles} tiles, score {_fmt(r.score)}"
                   + (f", confidence {conf}" if conf else "")
                   + f", reason {r.reason}")
            cells.append(f"<td class='n' data-v='{r.n_tiles}' title='{esc(tip)}'>"
                         f"{r.n_tiles}</td>")
        parts.append(f"<tr class='mrow'><td><a href='#{esc(p.plot_id)}'>{esc(p.plot_id)}</a>"
                     f"</td><td>{esc(date)}</td><td>{esc(place)}</td>"
                     f"<td class='n richness'>{len(found)}</td>"
                     f"<td class='n'>{getattr(p, 'n_unknown', 0)}</td>{''.join(cells)}</tr>")
    parts.append("</tbody></table><p><small>Cells: tiles supporting the taxon (hover for its "
                 "score, confidence and reason); each taxon is counted at the rank it was "
                 "reported (the lowest rank its evidence passed).</small></p>")
    return "".join(parts)


def _legend(plots: Sequence[Any], lowest: str) -> str:
    reasons = sorted({str(r.reason) for p in plots for r in p.records})
    items = "".join(f"<dt>{html.escape(w)}</dt><dd>{html.escape(explain_reason(w, lowest))}"
                    "</dd>" for w in reasons)
    rules = sorted({str(getattr(r, "rule", "")) for p in plots for r in p.records} - {""})
    items += "".join(f"<dt>rule {html.escape(w)}</dt><dd>{html.escape(explain_rule(w))}</dd>"
                     for w in rules)
    return (
        "<h2>Legend: how to read this report</h2><dl class='leg'>"
        "<dt>rank</dt><dd>The rank a taxon is reported at: the lowest rank whose evidence "
        "passed its threshold (a genus answer is written <i>Genus sp.</i>). Lower ranks are "
        "more specific; a family or genus answer means the tiles did not support a species."
        "</dd><dt>score</dt><dd>The evidence the plot rule compares with the rank's "
        "threshold (not a probability of being right).</dd>"
        "<dt>confidence</dt><dd>Where shown: the highest calibrated confidence among the "
        "tiles counted at the taxon's rank (each tile's probability of the taxon through the "
        "model's calibration, the map single-image predictions use; fitted on whole images, "
        "so for a tile an estimate). None for unknown.</dd><dt>tiles</dt><dd>Tiles of the "
        "photo that support the taxon; on a photo, tiles are coloured by the taxon they "
        "support, tiles crossed in red were flagged unknown (outliers), grey outlines support "
        "no reported taxon. "
        "Hover a tile for its top-3 taxa per rank.</dd></dl>"
        f"<h3>Reasons and rules in this report</h3><dl class='leg'>{items}</dl>")


def _tile_overlay(plot: Any, taxonomy, shown: tuple[int, int]) -> str:
    """Transparent boxes over the finest grid's tiles; their title is the top-3 per rank."""
    sx, sy = shown[0] / plot.size[0], shown[1] / plot.size[1]
    finest = _finest(plot.tiles)
    out = []
    for i, (tile, label) in enumerate(zip(plot.tiles, plot.tile_labels)):
        if tile.scale != finest:
            continue
        x0, y0, x1, y1 = tile.box
        lines = [f"{tile.tile_id}: {label or 'no reported taxon'}"]
        for rank, cands in _top(plot, taxonomy, i).items():
            lines.append(f"{rank}: " + ", ".join(f"{n} {p:.2f}" for n, p in cands))
        out.append(f"<div class='tile' title='{html.escape(chr(10).join(lines))}' style='"
                   f"left:{x0 * sx:.0f}px;top:{y0 * sy:.0f}px;width:{(x1 - x0) * sx:.0f}px;"
                   f"height:{(y1 - y0) * sy:.0f}px'></div>")
    return "".join(out)


def _plot_section(p: Any, taxonomy, colours) -> str:
    esc = html.escape
    pic = draw_tiles(p, colours)
    date, place = _meta_text(p)
    when = " · ".join(x for x in (date, place) if x)
    parts = [f"<div class='plot' id='{esc(p.plot_id)}'><div><h2>{esc(p.plot_id)}</h2>"
             + (f"<p class='meta'>{esc(when)}</p>" if when else "")
             + f"<div class='photo'><img alt='{esc(p.plot_id)}' "
             f"src='data:image/jpeg;base64,{b64_jpeg(pic)}'>{_tile_overlay(p, taxonomy, pic.size)}"
             f"</div><br><small>{esc(str(p.photo))} ({p.size[0]}×{p.size[1]} px, "
             f"{len(p.tiles)} tiles)</small></div><div>"]
    conf = any(_fmt(getattr(r, "confidence", None)) for r in p.records)
    parts.append("<h3>Taxa by rank</h3><table class='sortable'><thead><tr><th>rank</th>"
                 "<th>taxon</th><th>tiles</th><th>score</th>"
                 + ("<th>confidence</th>" if conf else "")
                 + "<th>reason</th><th>rule</th></tr></thead><tbody>")
    lowest = taxonomy.ranks[-1]
    for rank in [*reversed(taxonomy.ranks), UNKNOWN]:
        for r in (x for x in p.records if x.taxon_rank == rank):
            parts.append(f"<tr><td>{esc(rank)}</td><td>{_sw(colours, r.taxon)}<i>"
                         f"{esc(r.taxon)}</i></td><td class='n'>{r.n_tiles}</td>"
                         f"<td class='n'>{_fmt(r.score)}</td>"
                         + (f"<td class='n'>{_fmt(getattr(r, 'confidence', None))}</td>"
                            if conf else "")
                         + f"<td title='{esc(explain_reason(r.reason, lowest))}'>"
                         f"{esc(r.reason)}</td><td>{esc(str(getattr(r, 'rule', '')))}</td></tr>")
    if not p.records:
        parts.append("<tr><td colspan='7'>nothing passed the thresholds</td></tr>")
    parts.append("</tbody></table></div></div>")
    return "".join(parts)


def render_html(plots: Sequence[Any], failures: Sequence[Mapping[str, str]], *, taxonomy,
                title: str, settings: Mapping[str, Any],
                files: Mapping[str, str] | None = None) -> str:
    """A self-contained HTML page (images inline as base64 JPEG, no external files).

    ``files``: what to link in the overview (a description -> a path relative to the page).
    """
    esc = html.escape
    colours = palette([lab for p in plots for lab in p.tile_labels]
                      + [r.taxon for p in plots for r in p.records])
    n_taxa = len({r.taxon for p in plots for r in _reported(p)})
    links = "".join(f"<li><a href='{esc(str(v))}'>{esc(str(v))}</a> <small>{esc(str(k))}"
                    "</small></li>" for k, v in (files or {}).items())
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{len(plots)} plot{'s' * (len(plots) != 1)}, {n_taxa} distinct "
        f"{'taxon' if n_taxa == 1 else 'taxa'} reported"
        + (f", <span class='fail'>{len(failures)} photo(s) could not be read</span>"
           if failures else "") + ".</p>",
        "<h2>Overview: plots × taxa</h2>", _matrix(plots, taxonomy, colours), _chart(plots),
        _legend(plots, taxonomy.ranks[-1]),
        f"<h2>Files</h2><ul id='files'>{links}</ul>",
        "<h2>Settings</h2><p><small>"
        + "; ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in settings.items())
        + "</small></p><h2>Plots</h2>",
    ]
    parts.extend(_plot_section(p, taxonomy, colours) for p in plots)
    if failures:
        parts.append("<h2 class='fail'>Photos that could not be read</h2><ul>")
        parts.extend(f"<li class='fail'>{esc(f['photo'])}: {esc(f['error'])}</li>"
                     for f in failures)
        parts.append("</ul>")
    parts.append(_SORT_JS + "</body></html>")
    return "\n".join(parts)
