"""Evaluation of rank-aware predictions: flat, hierarchical, mistake severity, coherence.

Inputs are per-rank class-index arrays (``Decoded.path``) and targets (rank -> class
index, ``-1`` where the label stops above that rank). A prediction may also hold
``-1`` below the rank it backs off to.

Conventions:

- Labels at any rank, any rank list: each image is scored at the ranks it has a label
  for. Per rank, samples whose target is ``-1`` (the label stops above that rank) are
  skipped; ``n_scored`` (also ``n``) counts the rest, and the top level repeats them as
  ``n_scored: {rank: n}``. A placeholder target ("Philadelphus sp.", the class the lowest
  head has for a taxon known only higher up) is scored as that class, as the head was
  trained; ``n_placeholder`` says how many of the scored targets are placeholders.
- Hierarchical precision/recall/F1 (Kiritchenko et al. 2005): each sample's true set is
  its deepest labelled node plus its ancestors (root excluded); the predicted set is the
  predicted node *at that same rank* (or the deepest one the prediction reports above
  it) plus its ancestors. A partial label (image known to genus) is thus not penalised
  for the species the model adds. Placeholder nodes ("Philadelphus sp.") count as the
  genus they stand for (``taxonomy.reported``), and the prediction is cut at that rank
  too. Micro-averaged over samples.
- Mistake severity: over samples whose predicted node (as above) differs from the true
  node: mean tree distance, mean depth of the lowest common ancestor (ranks below the
  root; 0 = different top-rank taxa) and its height (``len(ranks) - depth``, Bertinetto
  et al. 2020: larger is worse).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from .decoding import is_coherent

__all__ = ["confusion_summary", "evaluate_predictions", "flatten_metrics"]


def _arrays(d: Mapping[str, object], ranks: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    out = {}
    for r in ranks:
        if r not in d:
            raise ValueError(f"evaluate_predictions: {what} has no entry for rank {r!r}; expected "
                             f"one array per rank {ranks}.")
        x = d[r]
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        out[r] = np.asarray(x)
    n = {len(v) for v in out.values()}
    if len(n) != 1:
        raise ValueError(f"evaluate_predictions: {what} arrays differ in length: "
                         f"{ {r: len(v) for r, v in out.items()} }.")
    return out


def _deepest(cols: dict[str, np.ndarray], ranks: tuple[str, ...]) -> np.ndarray:
    """Per row, the position of the deepest rank with index >= 0 in an unbroken prefix."""
    n = len(cols[ranks[0]])
    depth = np.zeros(n, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    for i, r in enumerate(ranks):
        alive &= cols[r] >= 0
        depth[alive] = i + 1
    return depth  # 0 = nothing labelled


def _node(taxonomy, ranks, cols, row: int, depth: int) -> tuple[str, ...]:
    if depth == 0:
        return ()
    r = ranks[depth - 1]
    return taxonomy.reported(taxonomy.node(r, int(cols[r][row])))


def evaluate_predictions(decoded_path: Mapping[str, np.ndarray],
                         targets: Mapping[str, np.ndarray], taxonomy, *,
                         topk_index: Mapping[str, np.ndarray] | None = None,
                         probs: Mapping[str, np.ndarray] | None = None) -> dict:
    """All metrics for one prediction set, as a JSON-able nested dict.

    Returns ``{"n", "n_scored": {rank: n}, "ranks": {rank: {accuracy, macro_f1, n,
    n_scored, n_placeholder[, top5_accuracy][, nll]}},
    "hierarchical": {precision, recall, f1, n}, "mistake_severity": {mean_distance,
    mean_lca_depth, mean_lca_height, n_mistakes, rate}, "genus_distance": float|None,
    "genus_distance_n", "coherence_rate"}``. ``probs`` (rank -> ``[n, n_classes]``) adds
    the mean negative log-likelihood per rank, and gives the top-k when
    ``topk_index`` is not given.
    """
    ranks = tuple(taxonomy.ranks)
    pred = _arrays(decoded_path, ranks, "decoded_path")
    true = _arrays(targets, ranks, "targets")
    n_total = len(true[ranks[0]])
    if len(pred[ranks[0]]) != n_total:
        raise ValueError(f"evaluate_predictions: {len(pred[ranks[0]])} predictions for "
                         f"{n_total} targets.")
    prob = _arrays(probs, ranks, "probs") if probs is not None else None
    if topk_index is None and prob is not None:
        topk_index = {r: np.argsort(-prob[r], axis=1, kind="stable")[:, :5] for r in ranks}
    topk = _arrays(topk_index, ranks, "topk_index") if topk_index is not None else None
    k = max(v.shape[1] for v in topk.values()) if topk is not None else 0
    per_rank = {r: _rank_metrics(true[r], pred[r], topk[r] if topk is not None else None,
                                 prob[r] if prob is not None else None, k=k) for r in ranks}
    for r in ranks:
        per_rank[r]["n_placeholder"] = _n_placeholder(true[r], taxonomy, r)
    hierarchical, severity = _hierarchical_metrics(true, pred, taxonomy, ranks)
    gd, gd_n = _genus_distance(true, pred, taxonomy, ranks)
    coherent = is_coherent(pred, taxonomy)
    return {
        "n": int(n_total),
        "n_scored": {r: per_rank[r]["n_scored"] for r in ranks},
        "ranks": per_rank,
        "hierarchical": hierarchical,
        "mistake_severity": severity,
        "genus_distance": gd,
        "genus_distance_n": gd_n,
        "coherence_rate": float(coherent.mean()) if n_total else None,
    }


def _rank_metrics(true: np.ndarray, pred: np.ndarray, topk: np.ndarray | None,
                  prob: np.ndarray | None, *, k: int) -> dict[str, object]:
    """Accuracy, macro-F1 over the true classes, top-k accuracy (named by the widest
    rank's ``k``) and NLL at one rank."""
    m = true >= 0
    t, p = true[m].astype(np.int64), pred[m].astype(np.int64)
    res: dict[str, object] = {"n": int(m.sum()), "n_scored": int(m.sum())}
    if not m.any():
        res["accuracy"] = res["macro_f1"] = None
        if topk is not None:
            res[f"top{k}_accuracy"] = None
        return res
    res["accuracy"] = float(np.mean(p == t))
    res["macro_f1"] = float(f1_score(t, p, labels=np.unique(t), average="macro",
                                     zero_division=0))
    if topk is not None:
        res[f"top{k}_accuracy"] = float(np.mean((topk[m] == t[:, None]).any(axis=1)))
    if prob is not None:
        pt = prob[m][np.arange(len(t)), t]
        res["nll"] = float(-np.mean(np.log(np.clip(pt, 1e-12, None))))
    return res


def _hierarchical_metrics(true: Mapping[str, np.ndarray], pred: Mapping[str, np.ndarray],
                          taxonomy, ranks: tuple[str, ...]) -> tuple[dict, dict]:
    """Hierarchical P/R/F and mistake severity, on the deepest labelled rank."""
    t_depth = _deepest(true, ranks)
    p_depth = np.minimum(_deepest(pred, ranks), t_depth)
    inter = n_pred = n_true = 0
    dists, lca_depths, lca_heights = [], [], []
    labelled = np.flatnonzero(t_depth > 0)
    for i in labelled:
        tn = _node(taxonomy, ranks, true, i, int(t_depth[i]))
        # Compare down to the truth's (reported) rank only.
        pn = taxonomy.reported(_node(taxonomy, ranks, pred, i, int(p_depth[i]))[:len(tn)])
        lca = taxonomy.lca(tn, pn)
        inter += len(lca)
        n_pred += len(pn)
        n_true += len(tn)
        if pn != tn:
            dists.append(taxonomy.distance(tn, pn))
            lca_depths.append(len(lca))
            lca_heights.append(len(ranks) - len(lca))
    hp = inter / n_pred if n_pred else None
    hr = inter / n_true if n_true else None
    if hp is None or hr is None:
        hf = None
    else:
        hf = 2 * hp * hr / (hp + hr) if hp + hr > 0 else 0.0
    hierarchical = {"precision": hp, "recall": hr, "f1": hf, "n": int(len(labelled))}
    severity = {
        "mean_distance": float(np.mean(dists)) if dists else None,
        "mean_lca_depth": float(np.mean(lca_depths)) if dists else None,
        "mean_lca_height": float(np.mean(lca_heights)) if dists else None,
        "n_mistakes": len(dists),
        "rate": len(dists) / len(labelled) if len(labelled) else None,
    }
    return hierarchical, severity


def _n_placeholder(true: np.ndarray, taxonomy, rank: str) -> int:
    """How many targets at ``rank`` are placeholder classes."""
    holders = np.array([taxonomy.is_placeholder(n) for n in taxonomy.nodes(rank)], dtype=bool)
    t = true[true >= 0].astype(np.int64)
    return int(holders[t].sum()) if holders.any() and len(t) else 0


def _genus_distance(true: Mapping[str, np.ndarray], pred: Mapping[str, np.ndarray],
                    taxonomy, ranks: tuple[str, ...]) -> tuple[float | None, int]:
    """Mean phylogenetic genus distance over wrong-genus predictions (and how many)."""
    if "genus" not in ranks or not taxonomy.genus_distances:
        return None, 0
    m = (true["genus"] >= 0) & (pred["genus"] >= 0) & (pred["genus"] != true["genus"])
    vals = []
    for ti, pi in zip(true["genus"][m], pred["genus"][m]):
        d = taxonomy.genus_distance(taxonomy.node("genus", int(ti))[-1],
                                    taxonomy.node("genus", int(pi))[-1])
        if d is not None:
            vals.append(d)
    return (float(np.mean(vals)) if vals else None), len(vals)


def flatten_metrics(result: Mapping, prefix: str = "") -> dict[str, object]:
    """``{"ranks": {"species": {"accuracy": .9}}}`` -> ``{"species/accuracy": .9}`` (for logs)."""
    out: dict[str, object] = {}
    for key, value in result.items():
        name = key if key != "ranks" else ""
        full = "/".join(x for x in (prefix, name) if x)
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, full))
        else:
            out[full] = value
    return out


def confusion_summary(decoded_path: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                      taxonomy, rank: str | None = None, top: int = 10) -> pd.DataFrame:
    """The ``top`` most frequent (true, predicted) confusions at ``rank`` (default: the
    lowest rank).

    Columns ``true``, ``predicted`` (display labels, placeholders as ``Genus sp.``) and
    ``count``; samples unlabelled at ``rank`` and correct predictions are left out.
    """
    rank = rank or taxonomy.ranks[-1]
    if rank not in taxonomy.ranks:
        raise ValueError(f"confusion_summary: unknown rank {rank!r}; taxonomy has "
                         f"{taxonomy.ranks}.")
    t = np.asarray(targets[rank]).astype(np.int64)
    p = np.asarray(decoded_path[rank]).astype(np.int64)
    m = (t >= 0) & (p != t)
    cols = ["true", "predicted", "count"]
    if not m.any():
        return pd.DataFrame(columns=cols)
    pairs = pd.DataFrame({"t": t[m], "p": p[m]}).value_counts().reset_index(name="count")
    pairs = pairs.sort_values(["count", "t", "p"], ascending=[False, True, True]).head(top)

    def label(i: int) -> str:
        return taxonomy.label(taxonomy.node(rank, i)) if i >= 0 else "(none)"

    return pd.DataFrame({"true": [label(i) for i in pairs["t"]],
                         "predicted": [label(i) for i in pairs["p"]],
                         "count": pairs["count"].to_numpy()}, columns=cols).reset_index(drop=True)


def calibration_metrics(path: Mapping[str, np.ndarray], path_prob: Mapping[str, np.ndarray],
                        targets: Mapping[str, np.ndarray], ranks, calibration=None, *,
                        n_bins: int = 10) -> tuple[dict, pd.DataFrame]:
    """Reliability of ``confidence`` per rank: the (calibrated) path probability at each
    rank against whether the path is right there, over the rows labelled at that rank.

    ``calibration``: a :class:`~taxoclass.model.confidence.ConfidenceCalibration` (None:
    the raw path probability, as a bundle without one reports). Returns ``({"method",
    "calibrated", "n_bins", "ece": {rank: float|None}, "ece_uncalibrated": {...},
    "n_scored": {rank: n}}, bins)`` where ``bins`` has one row per rank and bin: ``rank``,
    ``bin``, ``lower``, ``upper``, ``count``, ``mean_confidence``, ``accuracy``.
    """
    from .confidence import expected_calibration_error, reliability_bins

    ece, raw_ece, n, tables = {}, {}, {}, []
    for r in ranks:
        t = np.asarray(targets[r]).astype(np.int64)
        keep = t >= 0
        right = np.asarray(path[r])[keep] == t[keep]
        raw = np.asarray(path_prob[r], dtype=np.float64)[keep]
        conf = raw if calibration is None else calibration.calibrate(r, raw)
        ece[r] = expected_calibration_error(conf, right, n_bins)
        raw_ece[r] = expected_calibration_error(raw, right, n_bins)
        n[r] = int(keep.sum())
        bins = reliability_bins(conf, right, n_bins)
        bins.insert(0, "rank", r)
        tables.append(bins)
    summary = {"method": calibration.method if calibration is not None else "uncalibrated",
               "calibrated": calibration is not None, "n_bins": int(n_bins), "ece": ece,
               "ece_uncalibrated": raw_ece, "n_scored": n}
    return summary, pd.concat(tables, ignore_index=True)
