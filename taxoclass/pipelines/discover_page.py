"""``discover.html``: one self-contained page (thumbnails inline as base64 JPEG) showing each
candidate taxon of ``taxoclass discover``: its size, its placement with the evidence per
rank, the members nearest its centre, then the noise images and the unreadable files.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import ImageError
from ..vocab import UNKNOWN

__all__ = ["THUMB_PX", "render_discover_html"]

#: Longest side of a thumbnail, pixels.
THUMB_PX = 160
#: Noise images shown as thumbnails (the rest are listed by name).
MAX_NOISE_THUMBS = 48

_CSS = (
    "body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}"
    "section{border-top:1px solid #ccc;padding-top:.6em;margin-bottom:1.6em}"
    "table{border-collapse:collapse;margin:.4em 0}"
    "td,th{padding:.15em .6em;text-align:left;border-bottom:1px solid #e4e4e4}"
    "th{background:#eee}td.n{text-align:right}.fail{color:#a00}small{color:#555}"
    ".thumbs{display:flex;flex-wrap:wrap;gap:.6em}"
    "figure{margin:0;width:" + str(THUMB_PX) + "px;font-size:.75em;word-break:break-all}"
    "figure img{display:block;width:" + str(THUMB_PX) + "px;height:" + str(THUMB_PX)
    + "px;object-fit:contain;background:#eee}"
    ".unplaced{color:#a60}code{background:#f4f4f4;padding:0 .2em}"
)


def _thumb(path: str) -> str:
    """A figure with the image's thumbnail (or why there is none) and its file name."""
    from ..io.images import load_image
    from ..plots.html import b64_jpeg

    esc = html.escape
    name = esc(Path(path).name)
    try:
        img = load_image(path)
        img.thumbnail((THUMB_PX, THUMB_PX))
        body = f"<img alt='{name}' src='data:image/jpeg;base64,{b64_jpeg(img)}'>"
    except (ImageError, OSError) as exc:
        body = f"<span class='fail'>{esc(str(exc))[:200]}</span>"
    return f"<figure title='{esc(path)}'>{body}<figcaption>{name}</figcaption></figure>"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return f"{value:.2f}" if isinstance(value, float) else html.escape(str(value))


def _evidence(row: Mapping[str, Any], ranks: Sequence[str]) -> str:
    cells = "".join(f"<tr><td>{html.escape(r)}</td><td><i>{_fmt(row[r])}</i></td>"
                    f"<td class='n'>{_fmt(row[f'{r}_prob'])}</td>"
                    f"<td class='n'>{_fmt(row[f'{r}_agree'])}</td></tr>" for r in ranks)
    return ("<table><tr><th>rank</th><th>most likely taxon (each rank on its own)</th>"
            "<th>mean probability</th>"
            f"<th>members agreeing</th></tr>{cells}</table>")


def _cluster_section(row: Mapping[str, Any], members: pd.DataFrame,
                     ranks: Sequence[str]) -> str:
    esc = html.escape
    c = int(row["cluster"])
    if row["placement_rank"] == UNKNOWN:
        where = "<span class='unplaced'>not placed (no rank passed the evidence rule)</span>"
    else:
        where = (f"placed in {esc(str(row['placement_rank']))} <b><i>"
                 f"{esc(str(row['placement']))}</i></b> (mean probability "
                 f"{_fmt(row['placement_prob'])}, {_fmt(row['placement_agree'])} of members "
                 "agree)")
    reps = [p for p in str(row["representatives"]).split(";") if p]
    names = members.loc[members["cluster"] == c, "image"].map(lambda p: Path(p).name)
    return (f"<section id='cluster-{c}'><h2>Cluster {c}: {int(row['size'])} images</h2>"
            f"<p>{where}</p>{_evidence(row, ranks)}"
            f"<p><small>members nearest the cluster centre:</small></p>"
            f"<div class='thumbs'>{''.join(_thumb(p) for p in reps)}</div>"
            f"<details><summary>all {len(names)} members</summary><p><small>"
            f"{esc(', '.join(names))}</small></p></details></section>")


def render_discover_html(clusters: pd.DataFrame, members: pd.DataFrame,
                         failures: pd.DataFrame, *, ranks: Sequence[str],
                         summary: Mapping[str, Any]) -> str:
    """The page: summary and how to label, one section per cluster, noise, failures."""
    esc = html.escape
    noise = members.loc[members["cluster"] < 0, "image"].tolist()
    settings = summary.get("settings", {})
    rank_cols = ", ".join(f"<code>{esc(r)}</code>" for r in ranks)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>taxoclass discover</title><style>{_CSS}</style></head><body>",
        "<h1>Candidate new taxa</h1>",
        f"<p>{summary.get('n_images', 0)} images clustered: {len(clusters)} cluster(s), "
        f"{len(noise)} image(s) in no cluster (noise)"
        + (f", <span class='fail'>{len(failures)} unreadable</span>" if len(failures) else "")
        + f". HDBSCAN, smallest cluster {settings.get('min_cluster_size')} images; a cluster "
        f"is placed at the lowest rank where its most likely taxon has mean probability "
        f"&ge; {settings.get('min_probability')} and at least "
        f"{settings.get('min_agreement')} of its members' decoded paths name it.</p>",
        f"<p>To label: fill in the columns {rank_cols} of <a href='members.csv'>members.csv"
        "</a> (leave a row empty to skip it), then <code>taxoclass import members.csv --out "
        "new.json --images-root FOLDER</code>. Also: <a href='clusters.csv'>clusters.csv</a>, "
        "<a href='discover.json'>discover.json</a>.</p>",
    ]
    parts += [_cluster_section(row, members, ranks) for row in clusters.to_dict("records")]
    if noise:
        shown = "".join(_thumb(p) for p in noise[:MAX_NOISE_THUMBS])
        rest = noise[MAX_NOISE_THUMBS:]
        parts.append(f"<section id='noise'><h2>Noise: {len(noise)} images in no cluster</h2>"
                     f"<div class='thumbs'>{shown}</div>"
                     + (f"<p><small>and {len(rest)} more: "
                        f"{esc(', '.join(Path(p).name for p in rest))}</small></p>"
                        if rest else "") + "</section>")
    if len(failures):
        items = "".join(f"<li class='fail'>{esc(str(r['image']))}: {esc(str(r['error']))}</li>"
                        for r in failures.to_dict("records"))
        parts.append(f"<section id='failures'><h2 class='fail'>Images that could not be read"
                     f"</h2><ul>{items}</ul></section>")
    parts.append("</body></html>")
    return "\n".join(parts)
