"""The discover job: cluster the images a model flags as unknown into candidate new taxa.

Input is a ``flag-unknowns`` output folder (its flagged rows) or image files and folders
(the model's back-off decides which are flagged; ``include="all"`` clusters every image).
The images are embedded with the model's backbone through the embedding store (vectors
found by file content are reused, see :func:`~taxoclass.engines.embedding_folder`); an
image that cannot be read is a row of ``failures.csv`` and the others carry on.

Clustering (:func:`cluster_embeddings`): the embeddings are L2-normalised (as the heads
see them), reduced by PCA to at most :attr:`DiscoverSettings.dims` dimensions (density
estimates fail in a thousand dimensions), then clustered by scikit-learn's HDBSCAN with
leaf selection (the finest clusters of its tree: sibling species form nearby dense
groups); points in no dense region are *noise* (cluster ``-1``), listed apart.
``min_cluster_size`` defaults to :func:`auto_min_cluster_size` (a rule on the count).

Placement (:func:`place_cluster`): for each rank above the model's lowest, bottom-up, the
cluster's candidate is the taxon with the highest mean coherent probability over its
members; the cluster is placed at the lowest rank where that mean probability and the
share of members whose decoded path agrees both reach their thresholds (default 0.9 and
0.5), else ``unknown``; the evidence at every rank is written either way.

Outputs, written as a unit (:func:`~taxoclass.io.files.output_folder`): ``clusters.csv``,
``members.csv`` (one row per image, with an empty column per rank for the expert to fill
in; ``taxoclass import members.csv`` reads it back as labels), ``discover.html``,
``discover.json`` (with the output header), ``failures.csv`` and ``provenance.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import AnnotationError, ImageError
from ..io.files import atomic_write_csv, atomic_write_text, check_output_folder, output_folder
from ..io.images import collect_images
from ..io.provenance import model_id_for, write_json_output, write_provenance
from ..vocab import UNKNOWN
from .discover_page import render_discover_html
from .predict import FAILURE_COLUMNS, flagged_of

log = logging.getLogger(__name__)

__all__ = ["NOISE", "DiscoverResult", "DiscoverSettings", "auto_min_cluster_size",
           "cluster_embeddings", "cluster_space", "discover_taxa", "place_cluster"]

Progress = Callable[[int, int], None]
#: The cluster id of images in no cluster (HDBSCAN's convention).
NOISE = -1
#: What a rerun into the same ``out`` keeps (the local embedding store).
RESUME_STATE = ("embeddings",)
FLAGS_FILE = "flags.csv"


@dataclass(frozen=True)
class DiscoverSettings:
    """The settings of :func:`discover_taxa` and their defaults (the CLI shows these)."""

    #: smallest cluster HDBSCAN reports; None: :func:`auto_min_cluster_size` of the count.
    min_cluster_size: int | None = None
    #: HDBSCAN's min_samples (density of a core point); None: 1 (fewer noise points;
    #: HDBSCAN's own default equals min_cluster_size).
    min_samples: int | None = None
    #: PCA dimensions of the clustering space (at most the number of images - 1).
    dims: int = 16
    #: HDBSCAN's cluster_selection_method: "leaf" (the finest clusters of the tree; chosen
    #: on selection seeds of bench/discover.py: ARI 0.85 vs "eom" 0.77) or "eom".
    selection: str = "leaf"
    #: a placement needs this mean coherent probability of the taxon over the members...
    #: (chosen on bench/discover.py selection seeds 100-103 as the lowest of 0.5 .. 0.9
    #: whose placements are >= 75% right: 0.5 placed 54% of unseen-taxon clusters at 47%
    #: right, 0.9 placed 10% at 91% right; softmax evidence is overconfident off the tree)
    min_probability: float = 0.9
    #: ...and this share of members whose decoded path names it at that rank.
    min_agreement: float = 0.5
    #: representative thumbnails per cluster (members nearest the cluster centre).
    n_representatives: int = 6
    #: "flagged": cluster the images the model flags (not named at its lowest rank);
    #: "all": every readable image (e.g. a folder known to hold only novel taxa).
    include: str = "flagged"


INCLUDE = ("flagged", "all")
SELECTIONS = ("leaf", "eom")


@dataclass
class DiscoverResult:
    """What :func:`discover_taxa` found: one row per cluster, one row per image, the
    summary written into ``discover.json`` and the output folder."""

    clusters: pd.DataFrame
    members: pd.DataFrame
    summary: dict[str, Any]
    out: Path
    failures: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FAILURE_COLUMNS))


def auto_min_cluster_size(n: int) -> int:
    """The default smallest cluster for ``n`` clustered images: ``max(3, round(log2 n))``.

    Grows slowly with the survey: 3 up to ~11 images, 5 at 32, 7 at 128, 10 at 1,000,
    13 at 10,000; a candidate taxon needs a few images for an expert to judge, and a larger
    survey can afford to ignore the smallest groups (they are listed as noise)."""
    return max(3, round(math.log2(max(n, 2))))


def cluster_space(embeddings: np.ndarray, dims: int = DiscoverSettings.dims) -> np.ndarray:
    """The space clusters are found in: L2-normalised embeddings, PCA to at most ``dims``
    dimensions (fitted on these images; fewer when there are fewer images)."""
    from sklearn.decomposition import PCA

    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(dims, x.shape[1], max(len(x) - 1, 1))
    if len(x) < 3 or k >= x.shape[1]:
        return x
    return PCA(n_components=k, random_state=0).fit_transform(x)


def cluster_embeddings(embeddings: np.ndarray, *, min_cluster_size: int | None = None,
                       min_samples: int | None = None, dims: int = DiscoverSettings.dims,
                       selection: str = DiscoverSettings.selection
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """HDBSCAN clusters of ``embeddings``: ``(labels, space, min_cluster_size)`` with
    labels ``0..k-1`` ordered by size (largest first), :data:`NOISE` for noise, and the
    clustering space (:func:`cluster_space`). Fewer images than ``min_cluster_size``:
    every image is noise."""
    from sklearn.cluster import HDBSCAN

    n = len(embeddings)
    mcs = int(min_cluster_size or auto_min_cluster_size(n))
    space = cluster_space(embeddings, dims)
    if n < max(mcs, 2):
        return np.full(n, NOISE, dtype=int), space, mcs
    ms = min(int(min_samples or 1), n)
    raw = HDBSCAN(min_cluster_size=mcs, min_samples=ms, cluster_selection_method=selection,
                  copy=True).fit_predict(space)
    ids, counts = np.unique(raw[raw >= 0], return_counts=True)
    order = ids[np.lexsort((ids, -counts))]  # largest first, ties by first id
    relabel = {int(old): new for new, old in enumerate(order)}
    return np.array([relabel.get(int(v), NOISE) for v in raw], dtype=int), space, mcs


def place_cluster(probs: dict[str, np.ndarray], path: dict[str, np.ndarray], taxonomy,
                  *, min_probability: float = DiscoverSettings.min_probability,
                  min_agreement: float = DiscoverSettings.min_agreement) -> dict[str, Any]:
    """Where a cluster sits in the tree, with the evidence.

    ``probs[rank]``: the members' coherent probabilities ``[n, n_classes]``; ``path[rank]``:
    their decoded class index. Per rank the candidate is the taxon of highest mean
    probability; ``<rank>``, ``<rank>_prob`` (that mean) and ``<rank>_agree`` (share of
    members whose path names it) are returned for every rank, and ``placement_rank`` /
    ``placement`` is the lowest rank above the model's lowest where both pass their
    thresholds (``unknown`` where none does).
    """
    ranks = list(taxonomy.ranks)
    out: dict[str, Any] = {}
    placed = None
    for rank in ranks:
        mean = np.asarray(probs[rank], dtype=np.float64).mean(axis=0)
        best = int(np.argmax(mean))
        agree = float(np.mean(np.asarray(path[rank]) == best))
        out[rank] = taxonomy.names(rank)[best]
        out[f"{rank}_prob"] = float(mean[best])
        out[f"{rank}_agree"] = agree
    for rank in reversed(ranks[:-1]):
        if out[f"{rank}_prob"] >= min_probability and out[f"{rank}_agree"] >= min_agreement:
            placed = rank
            break
    head = {"placement_rank": placed or UNKNOWN, "placement": out[placed] if placed else UNKNOWN,
            "placement_prob": out[f"{placed}_prob"] if placed else None,
            "placement_agree": out[f"{placed}_agree"] if placed else None}
    return {**head, **out}


# ---------------------------------------------------------------------- inputs
def _flags_folder(inputs: Sequence[str | Path]) -> Path | None:
    """The flag-unknowns output folder, when the input is one (a folder with flags.csv)."""
    if len(inputs) == 1 and Path(inputs[0]).is_dir() and (Path(inputs[0]) / FLAGS_FILE).is_file():
        return Path(inputs[0])
    return None


def _flagged_images(folder: Path, model_id: str | None) -> list[Path]:
    """The readable flagged images of a flag-unknowns folder (paths as flags.csv has them;
    relative ones from the working directory, else from the folder)."""
    frame = pd.read_csv(folder / FLAGS_FILE, dtype={"image": str})
    missing = [c for c in ("image", "flagged") if c not in frame]
    if missing:
        raise AnnotationError(f"{folder / FLAGS_FILE}: expected the columns image and flagged "
                              f"of `taxoclass flag-unknowns`, found {list(frame.columns)}.")
    flagged = frame["flagged"].astype(str).str.lower().isin(["true", "1"])
    if "error" in frame:
        flagged &= frame["error"].isna() | (frame["error"].astype(str) == "")
    if not flagged.any():
        raise AnnotationError(
            f"{folder / FLAGS_FILE}: no flagged readable image to cluster (expected rows with "
            f"flagged=True; found {len(frame)} row(s), {int(flagged.sum())} flagged). Fix: "
            "pass images or folders instead, with --all to cluster every image.")
    _check_flags_model(folder, model_id)
    out = []
    for value in frame.loc[flagged, "image"]:
        p = Path(value)
        out.append(p if p.is_absolute() or p.exists() or not (folder / p).exists()
                   else folder / p)
    return out


def _check_flags_model(folder: Path, model_id: str | None) -> None:
    try:
        head = json.loads((folder / "flags_summary.json").read_text())["header"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if model_id and head.get("model_id") and head["model_id"] != model_id:
        log.warning("%s was written by model %s, not by this model (%s); its flags are used "
                    "as they are", folder, head["model_id"], model_id)


def _embed(bundle: Any, paths: list[Path], out: Path, *, cache: str | Path | None,
           device: str, batch_size: int | None, progress: Progress | None) -> tuple[Any, dict]:
    """The store's vectors of ``paths`` (computed where missing) and where they are."""
    from ..engines import embedding_folder
    from ..features.embeddings import check_cache_folder, embed_with_spec

    reuse = bundle.extra.get("embedding_cache")
    with embedding_folder(cache, out, reuse=reuse) as folder:
        check_cache_folder(folder)
        res = embed_with_spec([str(p) for p in paths], folder, bundle.backbone_spec(),
                              device=device, batch_size=batch_size, progress=progress)
    return res, {"folder": str(folder), "n_computed": int(res.n_computed),
                 "n_reused": int(res.n_reused)}


# ---------------------------------------------------------------------- the job
def discover_taxa(model: str | Path, inputs: Sequence[str | Path], *, out: str | Path,
                  settings: DiscoverSettings | None = None, cache: str | Path | None = None,
                  batch_size: int | None = None, device: str = "auto",
                  progress: Progress | None = None) -> DiscoverResult:
    """Cluster the images ``model`` flags as unknown into candidate new taxa (module doc).

    ``inputs``: one ``flag-unknowns`` output folder (its flagged, readable rows), or image
    files and folders (the model's back-off flags them; ``settings.include="all"``: every
    image). ``cache``: the embedding store, as for :func:`~taxoclass.predict` (default: the
    model's training store when writable, else ``out/embeddings``). Writes ``out`` as a
    unit and returns the clusters, the members and the summary. Raises
    :class:`~taxoclass.errors.AnnotationError` when nothing is left to cluster (an empty
    input, a flags folder without flagged images) and
    :class:`~taxoclass.errors.ImageError` when no image could be read.
    """
    from ..bundle import ModelBundle

    cfg = settings or DiscoverSettings()
    if cfg.selection not in SELECTIONS:
        raise AnnotationError(f"selection {cfg.selection!r}: expected one of "
                              f"{', '.join(SELECTIONS)}.")
    if cfg.include not in INCLUDE:
        raise AnnotationError(f"include {cfg.include!r}: expected one of {', '.join(INCLUDE)}.")
    if not inputs:
        raise AnnotationError("no input: expected a flag-unknowns output folder, or image "
                              "files or folders.")
    out = check_output_folder(out)
    bundle = ModelBundle.load(model)
    model_id = model_id_for(bundle)
    flags = _flags_folder(inputs)
    paths = _flagged_images(flags, model_id) if flags else collect_images(inputs)
    res, emb_record = _embed(bundle, paths, out, cache=cache, device=device,
                             batch_size=batch_size, progress=progress)
    found = np.asarray(res.found, dtype=bool)
    failures = pd.DataFrame({"image": [str(paths[i]) for i in np.flatnonzero(~found)],
                             "error": [res.errors.get(int(i), "not embedded")
                                       for i in np.flatnonzero(~found)]},
                            columns=FAILURE_COLUMNS)
    if not found.any():
        raise ImageError(f"None of the {len(paths)} image(s) could be read (first: "
                         f"{failures.iloc[0]['image']}: {failures.iloc[0]['error']}). Fix: pass "
                         "readable JPEG/PNG photos.")
    if len(failures):
        log.warning("%d of %d images could not be read; see %s", len(failures), len(paths),
                    out / "failures.csv")
    kept = [paths[i] for i in np.flatnonzero(found)]
    frame, decoded = bundle.predict_with_backoff(res.embeddings[found])
    chosen = (np.ones(len(kept), dtype=bool) if flags or cfg.include == "all"
              else flagged_of(frame, bundle.taxonomy.ranks[-1]).to_numpy())
    if not chosen.any():
        raise AnnotationError(
            f"none of the {len(kept)} readable image(s) is flagged by the model (all named "
            f"at {bundle.taxonomy.ranks[-1]}), so there is nothing to cluster. Fix: pass "
            "--all to cluster every image, or images the model does not know.")
    result = _cluster_and_place(bundle, kept, frame, decoded, chosen, res.embeddings[found], cfg)
    clusters, members, info = result
    summary = {"input": {"flags_folder": str(flags) if flags else None,
                         "n_inputs": len(paths)},
               "settings": {**asdict(cfg), "min_cluster_size": info["min_cluster_size"],
                            "min_samples": info["min_samples"]},
               "ranks": list(bundle.taxonomy.ranks),
               "n_images": int(chosen.sum()), "n_clusters": len(clusters),
               "n_clustered": int((members["cluster"] != NOISE).sum()),
               "n_noise": int((members["cluster"] == NOISE).sum()),
               "n_failed": len(failures), "embeddings": emb_record,
               "clusters": _json_rows(clusters)}
    _write(out, clusters, members, failures, summary, bundle, res, model_id)
    return DiscoverResult(clusters=clusters, members=members, summary=summary, out=out,
                          failures=failures)


def _cluster_and_place(bundle: Any, paths: list[Path], frame: pd.DataFrame, decoded: Any,
                       chosen: np.ndarray, embeddings: np.ndarray, cfg: DiscoverSettings
                       ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Cluster the chosen images, place each cluster and pick its representatives."""
    tax = bundle.taxonomy
    idx = np.flatnonzero(chosen)
    labels, space, mcs = cluster_embeddings(embeddings[idx], min_cluster_size=cfg.min_cluster_size,
                                            min_samples=cfg.min_samples, dims=cfg.dims,
                                            selection=cfg.selection)
    rows, placement_of, dist = [], {}, np.full(len(idx), np.nan)
    rep = np.zeros(len(idx), dtype=bool)
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        sel = np.flatnonzero(labels == c)
        centre = space[sel].mean(axis=0)
        d = np.linalg.norm(space[sel] - centre, axis=1)
        dist[sel] = d
        reps = sel[np.argsort(d, kind="stable")[:cfg.n_representatives]]
        rep[reps] = True
        place = place_cluster({r: decoded.probs[r][idx[sel]] for r in tax.ranks},
                              {r: decoded.path[r][idx[sel]] for r in tax.ranks}, tax,
                              min_probability=cfg.min_probability,
                              min_agreement=cfg.min_agreement)
        placement_of[c] = place
        rows.append({"cluster": c, "size": len(sel), **place,
                     "representatives": ";".join(str(Path(paths[idx[i]]).absolute())
                                                    for i in reps)})
    clusters = pd.DataFrame(rows, columns=_cluster_columns(tax.ranks))
    members = _members(tax, paths, frame, decoded, idx, labels, placement_of, dist, rep)
    return clusters, members, {"min_cluster_size": mcs,
                               "min_samples": min(int(cfg.min_samples or 1), len(idx))}


def _cluster_columns(ranks: Sequence[str]) -> list[str]:
    per_rank = [c for r in ranks for c in (r, f"{r}_prob", f"{r}_agree")]
    return ["cluster", "size", "placement_rank", "placement", "placement_prob",
            "placement_agree", *per_rank, "representatives"]


def _members(tax: Any, paths: list[Path], frame: pd.DataFrame, decoded: Any, idx: np.ndarray,
             labels: np.ndarray, placement_of: dict, dist: np.ndarray, rep: np.ndarray
             ) -> pd.DataFrame:
    """One row per clustered image (clusters by size, representatives first, noise last),
    with the expert's empty rank columns."""
    rows = []
    for j, i in enumerate(idx):
        c = int(labels[j])
        place = placement_of.get(c, {})
        rank, name = place.get("placement_rank", ""), place.get("placement", "")
        prob = None
        if rank and rank != UNKNOWN:
            prob = float(decoded.probs[rank][i, tax.names(rank).index(name)])
        rows.append({"image": str(Path(paths[i]).absolute()), "cluster": c,
                     "representative": bool(rep[j]),
                     "distance": None if np.isnan(dist[j]) else float(dist[j]),
                     "placement_rank": rank, "placement": name, "probability": prob,
                     "taxon_rank": frame["taxon_rank"].iloc[i], "taxon": frame["taxon"].iloc[i],
                     "reason": frame["reason"].iloc[i],
                     **{r: "" for r in tax.ranks}, "notes": ""})
    members = pd.DataFrame(rows)
    key = members["cluster"].where(members["cluster"] != NOISE, np.iinfo(np.int64).max)
    members = members.assign(_k=key, _r=~members["representative"])
    return members.sort_values(["_k", "_r", "distance", "image"], kind="stable").drop(
        columns=["_k", "_r"]).reset_index(drop=True)


def _json_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    for row in rows:
        row["representatives"] = [p for p in str(row.get("representatives") or "").split(";") if p]
    return rows


def _write(out: Path, clusters: pd.DataFrame, members: pd.DataFrame, failures: pd.DataFrame,
           summary: dict, bundle: Any, res: Any, model_id: str | None) -> None:
    with output_folder(out, keep=RESUME_STATE) as stage:
        stage = Path(stage)
        atomic_write_csv(stage / "clusters.csv", clusters)
        atomic_write_csv(stage / "members.csv", members)
        atomic_write_csv(stage / "failures.csv", failures)
        write_json_output(stage / "discover.json", summary, model_id=model_id)
        atomic_write_text(stage / "discover.html", render_discover_html(
            clusters, members, failures, ranks=list(bundle.taxonomy.ranks), summary=summary))
        write_provenance(stage, backbone=dict(getattr(res, "description", {}) or {}),
                         extra={"model_id": model_id, "model": str(bundle.path),
                                "settings": summary["settings"]})
