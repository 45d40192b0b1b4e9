"""Evaluation of rank-aware predictions: flat, hierarchical, abstentions, mistake severity.

Inputs are per-rank class-index arrays (``Decoded.path``) and targets (rank -> class
index, ``-1`` where the label stops above that rank). A prediction may also hold
``-1`` below the rank it backs off to.

Conventions (issue 17: the standard ones, stated):

- Labels at any rank, any rank list: each image is scored at the ranks it has a label
  for. Per rank, samples whose target is ``-1`` (the label stops above that rank) are
  skipped; ``n_scored`` (also ``n``) counts the rest, and the top level repeats them as
  ``n_scored: {rank: n}``.
- Placeholders are not taxa of the rank they stand at. A placeholder target
  ("Philadelphus sp.", the species-rank class the head has for an image known only to
  genus) is *not* scored at that rank: it is left out of the rank's accuracy, macro-F1,
  top-k, NLL and abstentions (``n_placeholder`` counts them; accuracy is over
  ``n_real = n_scored - n_placeholder``) and is scored at the rank of the taxon it
  stands for (genus), where it is real. This is the open-set evaluation's rule
  (``openset.evaluation.labelled_by_rank``). A *predicted* placeholder names no taxon
  at that rank: it is an abstention there, like ``-1``.
- Abstentions are not mistakes. At each rank a prediction that backs off above it
  (``-1``, or a placeholder) is an abstention: ``accuracy`` counts it as not right
  (top-1 over every scored row), ``abstention_rate`` is their share and
  ``accuracy_answered`` the accuracy over the rows answered at that rank.
- Macro-F1 as scikit-learn computes it: ``f1_score(average="macro")`` over the union of
  the true and the predicted classes (a false positive into a class absent from the test
  truth counts, as a class with F1 0). An abstention is a false negative of the true
  class and a false positive of none.
- Hierarchical precision/recall/F1 (Kiritchenko et al. 2005; the set-based measure that
  Kosmopoulos et al. 2015, "Evaluation measures for hierarchical classification", recommend
  for single-label tree hierarchies): each sample's true set is its deepest labelled node
  plus its ancestors (root excluded); the predicted set is the predicted node *at that
  same rank* (or the deepest one the prediction reports above it) plus its ancestors.
  hP = sum|P&T| / sum|P|, hR = sum|P&T| / sum|T| (micro-averaged over samples), hF =
  2 hP hR / (hP + hR). A partial label (image known to genus) is thus not penalised for
  the species the model adds, and a back-off loses recall, not precision. Placeholder
  nodes count as the taxon they stand for (``taxonomy.reported``).
- Mistake severity (Bertinetto et al. 2020): over *real mistakes* only, the samples
  whose predicted node (as above) is not the true node or one of its ancestors: mean tree
  distance, mean depth of the lowest common ancestor (ranks below the root; 0 = different
  top-rank taxa) and its height (``len(ranks) - depth``: larger is worse). A correct
  back-off (the prediction stops above the truth on its path) is not a mistake; it is
  counted in ``n_backoff``. ``rate`` = mistakes / labelled samples.
- Coherence (``coherence_rate``) is reported only for the heads' own per-rank arg-max
  (``head_argmax``, two ranks or more): the decoded path is coherent by construction, and
  a single head (a species-only model) agrees with itself, so otherwise there is no key.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from .decoding import is_coherent

__all__ = ["calibration_metrics", "confusion_summary", "evaluate_predictions", "flatten_metrics",
           "macro_f1"]


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
                         probs: Mapping[str, np.ndarray] | None = None,
                         head_argmax: Mapping[str, np.ndarray] | None = None) -> dict:
    """All metrics for one prediction set, as a JSON-able nested dict.

    Returns ``{"n", "n_scored": {rank: n}, "ranks": {rank: {accuracy, accuracy_answered,
    abstention_rate, macro_f1, n, n_scored, n_placeholder, n_real[, top5_accuracy][, nll]}},
    "hierarchical": {precision, recall, f1, n}, "mistake_severity": {mean_distance,
    mean_lca_depth, mean_lca_height, n_mistakes, n_backoff, rate}, "genus_distance":
    float|None, "genus_distance_n"[, "coherence_rate"]}``. ``probs`` (rank -> ``[n,
    n_classes]``) adds the mean negative log-likelihood per rank, and gives the top-k when
    ``topk_index`` is not given. ``head_argmax`` (rank -> each head's own arg-max,
    :attr:`Decoded.head_argmax`) adds ``coherence_rate``: the share of rows whose heads
    agree along the tree; None or fewer than two ranks add nothing (module doc).
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
    per_rank = {}
    for r in ranks:
        holders = _placeholders(taxonomy, r)
        per_rank[r] = _rank_metrics(true[r], pred[r], holders,
                                    topk[r] if topk is not None else None,
                                    prob[r] if prob is not None else None, k=k)
    hierarchical, severity = _hierarchical_metrics(true, pred, taxonomy, ranks)
    gd, gd_n = _genus_distance(true, pred, taxonomy, ranks)
    out = {
        "n": int(n_total),
        "n_scored": {r: per_rank[r]["n_scored"] for r in ranks},
        "ranks": per_rank,
        "hierarchical": hierarchical,
        "mistake_severity": severity,
        "genus_distance": gd,
        "genus_distance_n": gd_n,
    }
    if head_argmax and len(head_argmax) > 1:  # one head agrees with itself: no column
        heads = _arrays(head_argmax, tuple(r for r in ranks if r in head_argmax),
                        "head_argmax")
        out["coherence_rate"] = float(is_coherent(heads, taxonomy).mean()) if n_total else None
    return out


def _placeholders(taxonomy, rank: str) -> np.ndarray:
    """Per class of ``rank``: whether it is a placeholder."""
    return np.array([taxonomy.is_placeholder(n) for n in taxonomy.nodes(rank)], dtype=bool)


def _rank_metrics(true: np.ndarray, pred: np.ndarray, holders: np.ndarray,
                  topk: np.ndarray | None, prob: np.ndarray | None, *, k: int
                  ) -> dict[str, object]:
    """Accuracy (abstentions not right), accuracy over answered rows, abstention rate,
    scikit-learn macro-F1 over the union of true and predicted classes, top-k accuracy
    (named by the widest rank's ``k``) and NLL at one rank, over the rows whose target is
    a real taxon of the rank (module doc)."""
    labelled = true >= 0
    placeholder = labelled & holders[np.maximum(true, 0)] if len(holders) else labelled & False
    m = labelled & ~placeholder
    t, p = true[m].astype(np.int64), pred[m].astype(np.int64)
    res: dict[str, object] = {"n": int(labelled.sum()), "n_scored": int(labelled.sum()),
                              "n_placeholder": int(placeholder.sum()), "n_real": int(m.sum())}
    if not m.any():
        res.update(accuracy=None, accuracy_answered=None, abstention_rate=None, macro_f1=None)
        if topk is not None:
            res[f"top{k}_accuracy"] = None
        return res
    answered = (p >= 0) & (p < len(holders))
    answered[answered] = ~holders[p[answered]]
    right = answered & (p == t)
    res["accuracy"] = float(np.mean(right))
    res["accuracy_answered"] = float(right[answered].mean()) if answered.any() else None
    res["abstention_rate"] = float(1.0 - answered.mean())
    res["macro_f1"] = macro_f1(t, np.where(answered, p, -1))
    if topk is not None:
        res[f"top{k}_accuracy"] = float(np.mean((topk[m] == t[:, None]).any(axis=1)))
    if prob is not None:
        pt = prob[m][np.arange(len(t)), t]
        res["nll"] = float(-np.mean(np.log(np.clip(pt, 1e-12, None))))
    return res


def macro_f1(true: np.ndarray, pred: np.ndarray) -> float:
    """scikit-learn's macro-F1 over the union of the true and predicted classes; ``-1`` in
    ``pred`` (an abstention) is a false negative of the true class, a positive of none."""
    t = np.asarray(true, dtype=np.int64)
    p = np.asarray(pred, dtype=np.int64)
    labels = np.union1d(t[t >= 0], p[p >= 0])
    if not len(labels):
        return 0.0
    return float(f1_score(t, p, labels=labels, average="macro", zero_division=0))


def _hierarchical_metrics(true: Mapping[str, np.ndarray], pred: Mapping[str, np.ndarray],
                          taxonomy, ranks: tuple[str, ...]) -> tuple[dict, dict]:
    """Hierarchical P/R/F and mistake severity, on the deepest labelled rank."""
    t_depth = _deepest(true, ranks)
    p_depth = np.minimum(_deepest(pred, ranks), t_depth)
    inter = n_pred = n_true = n_backoff = 0
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
        if lca == pn:  # right as far as it goes: the truth, or a correct back-off
            n_backoff += int(len(pn) < len(tn))
            continue
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
        "n_backoff": int(n_backoff),
        "rate": len(dists) / len(labelled) if len(labelled) else None,
    }
    return hierarchical, severity


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
