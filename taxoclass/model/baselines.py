"""Cheap baselines on cached embeddings, returning the same :class:`Decoded` as the heads.

All follow the scikit-learn contract: ``__init__`` stores parameters, ``fit(X, targets)``
learns (``targets``: rank -> class index, ``-1`` where the label stops), fitted state
ends in ``_``, ``predict(X)`` returns a :class:`~taxoclass.model.decoding.Decoded`, so
:func:`~taxoclass.model.metrics.evaluate_predictions` applies unchanged.

- :class:`FlatLinearProbe`: logistic regression on the lowest rank over L2-normalised
  features (the DS@GT PlantCLEF recipe); higher ranks by summing its probabilities up
  the tree. Coherent.
- :class:`NearestNeighbour`: cosine 1-NN. ``mode="species"`` takes the nearest image
  labelled at the lowest rank and reports its whole path (coherent).
  ``mode="per_rank"`` predicts each rank from the nearest image labelled at that rank
  (so genus-only images help the genus rank); that path need *not* be coherent, and its
  per-rank probabilities do not sum up the tree.
- :class:`ClassPrototype`: cosine similarity to each class's mean embedding, per rank,
  scaled by ``1 / temperature`` and decoded coherently by path scoring.

Probabilities of the nearest-neighbour baseline are a softmax of the best cosine
similarity per class over ``temperature``: a ranking device, not a calibrated estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted

from .decoding import Decoded, decode, decode_leaf_probabilities

if TYPE_CHECKING:  # pragma: no cover
    from ..taxonomy.tree import Taxonomy

__all__ = ["C_GRID", "ClassPrototype", "FlatLinearProbe", "HiclassBaseline", "NearestNeighbour",
           "check_embeddings", "check_targets", "choose_C", "hiclass_leaf_probabilities",
           "l2_normalise", "row_space"]

#: Logit given to classes a baseline never saw in training (finite, so softmax is safe).
UNSEEN_LOGIT = -1e4


def l2_normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as float32."""
    X = np.asarray(X, dtype=np.float32)
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norm, 1e-12)


def _check_X(X: object, n_features: int | None = None, who: str = "baseline") -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"{who}: expected embeddings of shape [n_images, n_features], got "
                         f"{X.shape}.")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"{who}: fitted on {n_features}-d embeddings, got {X.shape[1]}-d.")
    if not np.isfinite(X).all():
        raise ValueError(f"{who}: embeddings contain NaN or infinite values.")
    return X


def _check_targets(targets: Mapping[str, object], taxonomy, n: int,
                   who: str) -> dict[str, np.ndarray]:
    out = {}
    for r in taxonomy.ranks:
        if r not in targets:
            raise ValueError(f"{who}: targets have no rank {r!r}; expected one array per rank "
                             f"{taxonomy.ranks} (-1 where the label stops).")
        t = targets[r]
        if hasattr(t, "detach"):
            t = t.detach().cpu().numpy()
        t = np.asarray(t).astype(np.int64)
        if t.shape != (n,):
            raise ValueError(f"{who}: targets[{r!r}] has shape {t.shape}; expected ({n},).")
        bad = (t < -1) | (t >= taxonomy.n_classes(r))
        if bad.any():
            raise ValueError(f"{who}: targets[{r!r}] holds {t[bad][0]}, outside -1.."
                             f"{taxonomy.n_classes(r) - 1}.")
        out[r] = t
    return out


def check_embeddings(X: object, n_features: int | None = None,
                     who: str = "baseline") -> np.ndarray:
    """``X`` as float32 ``[n_images, n_features]``, finite (``ValueError`` naming ``who``)."""
    return _check_X(X, n_features, who)


def check_targets(targets: Mapping[str, object], taxonomy, n: int,
                  who: str = "baseline") -> dict[str, np.ndarray]:
    """One int64 class-index array of length ``n`` per rank, ``-1`` allowed (``ValueError``)."""
    return _check_targets(targets, taxonomy, n, who)


def _class_max_similarity(sims: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per query and class, the best cosine similarity to a training image of that class."""
    out = sims.new_full((sims.shape[0], n_classes), float("-inf"))
    return out.scatter_reduce_(1, labels.expand(sims.shape[0], -1), sims, reduce="amax")


class FlatLinearProbe(BaseEstimator):
    """Logistic regression on the lowest rank; other ranks by summing up the tree."""

    def __init__(self, taxonomy, *, C: float = 1.0, max_iter: int = 1000, top_k: int = 5) -> None:
        self.taxonomy = taxonomy
        self.C = C
        self.max_iter = max_iter
        self.top_k = top_k

    def fit(self, X: np.ndarray, targets: Mapping[str, object]) -> FlatLinearProbe:
        X = _check_X(X, who="FlatLinearProbe")
        t = _check_targets(targets, self.taxonomy, len(X), "FlatLinearProbe")
        y = t[self.taxonomy.ranks[-1]]
        m = y >= 0
        if len(np.unique(y[m])) < 2:
            raise ValueError("FlatLinearProbe: needs images of at least two classes labelled at "
                             f"the lowest rank {self.taxonomy.ranks[-1]!r}.")
        self.model_ = LogisticRegression(C=self.C, max_iter=self.max_iter)
        self.model_.fit(l2_normalise(X[m]), y[m])
        self.classes_ = self.model_.classes_
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Lowest-rank probabilities ``[n, n_classes]`` (0 for classes never seen)."""
        check_is_fitted(self)
        X = _check_X(X, self.n_features_in_, "FlatLinearProbe")
        p = self.model_.predict_proba(l2_normalise(X))
        full = np.zeros((len(X), self.taxonomy.n_classes(self.taxonomy.ranks[-1])), np.float32)
        full[:, self.classes_] = p
        return full

    def predict(self, X: np.ndarray) -> Decoded:
        return decode_leaf_probabilities(self.predict_proba(X), self.taxonomy, top_k=self.top_k,
                                         method="linear_probe+marginal")


class NearestNeighbour(BaseEstimator):
    """Cosine 1-NN on embeddings, from the species (coherent) or rank by rank (may not be)."""

    MODES = ("species", "per_rank")

    def __init__(self, taxonomy, *, mode: str = "species", temperature: float = 0.05,
                 top_k: int = 5, batch_size: int = 1024) -> None:
        self.taxonomy = taxonomy
        self.mode = mode
        self.temperature = temperature
        self.top_k = top_k
        self.batch_size = batch_size

    def fit(self, X: np.ndarray, targets: Mapping[str, object]) -> NearestNeighbour:
        if self.mode not in self.MODES:
            raise ValueError(f"NearestNeighbour: mode must be one of {self.MODES}, got "
                             f"{self.mode!r}.")
        X = _check_X(X, who="NearestNeighbour")
        t = _check_targets(targets, self.taxonomy, len(X), "NearestNeighbour")
        ranks = self.taxonomy.ranks[-1:] if self.mode == "species" else self.taxonomy.ranks
        self.embeddings_: dict[str, np.ndarray] = {}
        self.labels_: dict[str, np.ndarray] = {}
        for r in ranks:
            m = t[r] >= 0
            if not m.any():
                raise ValueError(f"NearestNeighbour: no training image is labelled at rank {r!r}.")
            self.embeddings_[r] = l2_normalise(X[m])
            self.labels_[r] = t[r][m]
        self.n_features_in_ = X.shape[1]
        return self

    def _scores(self, Xn: np.ndarray, rank: str) -> torch.Tensor:
        ref = torch.from_numpy(self.embeddings_[rank])
        labels = torch.from_numpy(self.labels_[rank])[None, :]
        n_cls = self.taxonomy.n_classes(rank)
        parts = [_class_max_similarity(torch.from_numpy(Xn[i:i + self.batch_size]) @ ref.T,
                                       labels, n_cls)
                 for i in range(0, len(Xn), self.batch_size)]
        return torch.cat(parts) / self.temperature

    def predict(self, X: np.ndarray) -> Decoded:
        check_is_fitted(self)
        Xn = l2_normalise(_check_X(X, self.n_features_in_, "NearestNeighbour"))
        tax = self.taxonomy
        if self.mode == "species":
            leaf = self._scores(Xn, tax.ranks[-1]).softmax(dim=1)
            return decode_leaf_probabilities(leaf, tax, top_k=self.top_k,
                                             method="nearest_neighbour+species")
        probs, path, path_prob, topk_index, topk_prob = {}, {}, {}, {}, {}
        for r in tax.ranks:
            p = self._scores(Xn, r).softmax(dim=1)
            best = p.argmax(dim=1)
            val, ind = p.topk(min(self.top_k, p.shape[1]), dim=1)
            probs[r] = p.numpy()
            path[r] = best.numpy()
            path_prob[r] = p.gather(1, best[:, None])[:, 0].numpy()
            topk_index[r], topk_prob[r] = ind.numpy(), val.numpy()
        return Decoded(ranks=tuple(tax.ranks), probs=probs, path=path, path_prob=path_prob,
                       topk_index=topk_index, topk_prob=topk_prob,
                       method="nearest_neighbour+per_rank", top_k=self.top_k)


class ClassPrototype(BaseEstimator):
    """Cosine similarity to per-class mean embeddings at every rank, decoded by path scoring."""

    def __init__(self, taxonomy, *, temperature: float = 0.05, method: str = "path",
                 top_k: int = 5) -> None:
        self.taxonomy = taxonomy
        self.temperature = temperature
        self.method = method
        self.top_k = top_k

    def fit(self, X: np.ndarray, targets: Mapping[str, object]) -> ClassPrototype:
        X = _check_X(X, who="ClassPrototype")
        t = _check_targets(targets, self.taxonomy, len(X), "ClassPrototype")
        Xn = l2_normalise(X)
        self.prototypes_: dict[str, np.ndarray] = {}
        self.seen_: dict[str, np.ndarray] = {}
        for r in self.taxonomy.ranks:
            m = t[r] >= 0
            if not m.any():
                raise ValueError(f"ClassPrototype: no training image is labelled at rank {r!r}.")
            n_cls = self.taxonomy.n_classes(r)
            sums = np.zeros((n_cls, X.shape[1]), np.float32)
            np.add.at(sums, t[r][m], Xn[m])
            self.seen_[r] = np.bincount(t[r][m], minlength=n_cls) > 0
            self.prototypes_[r] = l2_normalise(sums)
        self.n_features_in_ = X.shape[1]
        return self

    def logits(self, X: np.ndarray) -> dict[str, torch.Tensor]:
        """Per-rank ``cosine / temperature``; classes never seen get a very low logit."""
        check_is_fitted(self)
        Xn = torch.from_numpy(l2_normalise(_check_X(X, self.n_features_in_, "ClassPrototype")))
        out = {}
        for r in self.taxonomy.ranks:
            z = Xn @ torch.from_numpy(self.prototypes_[r]).T / self.temperature
            z[:, torch.from_numpy(~self.seen_[r])] = UNSEEN_LOGIT
            out[r] = z
        return out

    def predict(self, X: np.ndarray) -> Decoded:
        return decode(self.logits(X), self.taxonomy, method=self.method, top_k=self.top_k)


# ----------------------------------------------------------------- C by inner CV, hiclass
#: Starting grid of logistic-regression C (factor 10); extended while the best is at an edge.
C_GRID: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)


def row_space(X: np.ndarray) -> np.ndarray:
    """An orthonormal basis ``[d, r]`` of the span of the rows of ``X``.

    L2-penalised logistic regression depends on the data through ``X @ W`` only and its
    optimal ``W`` lies in that span (representer theorem), so fitting on ``X @ basis``
    (``r <= n`` columns instead of ``d``) gives the same model, faster when ``n < d``."""
    _, s, vt = np.linalg.svd(np.asarray(X, dtype=np.float64), full_matrices=False)
    keep = s > s[0] * 1e-10 if s.size else s > 0
    return vt[keep].T.astype(np.float32)


def choose_C(X: np.ndarray, y: np.ndarray, *, folds: int = 3, seed: int = 0,
             grid: tuple[float, ...] = C_GRID, max_extend: int = 6,
             max_iter: int = 3000) -> tuple[float, dict[float, float]]:
    """The C of best mean inner-CV accuracy (stratified ``folds``, seeded) on ``X, y``
    (training data only), and every C's score. The grid (factor 10 apart) grows by one
    step beyond an edge while the best C sits at that edge (at most ``max_extend``
    steps; a flat plateau at the bottom edge does not extend it); ties go to the smaller
    C (stronger regularisation)."""
    import warnings

    from sklearn.model_selection import StratifiedKFold

    with warnings.catch_warnings():  # classes with fewer images than folds: still valid
        warnings.simplefilter("ignore", UserWarning)
        splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y))
    scores: dict[float, float] = {}
    # each fold fitted in the span of its own training rows: the same models, fewer columns
    folds_z = []
    for tr, va in splits:
        basis = row_space(X[tr])
        folds_z.append((X[tr] @ basis, y[tr], X[va] @ basis, y[va]))

    def score(C: float) -> float:
        if C not in scores:
            acc = []
            for z_tr, y_tr, z_va, y_va in folds_z:
                m = LogisticRegression(C=C, max_iter=max_iter).fit(z_tr, y_tr)
                acc.append(float((m.predict(z_va) == y_va).mean()))
            scores[C] = float(np.mean(acc))
        return scores[C]

    cs = sorted(grid)
    for _ in range(max_extend):
        best = max(cs, key=lambda c: (score(c), -c))
        if best == cs[-1]:  # (ties go to the smaller C: the top edge is strictly best)
            cs.append(cs[-1] * 10)
        elif best == cs[0] and (len(cs) == 1 or score(cs[0]) > score(cs[1])):
            cs.insert(0, cs[0] / 10)  # strictly best at the bottom edge (not a plateau)
        else:
            break
    for c in cs:
        score(c)
    best = max(scores, key=lambda c: (scores[c], -c))
    return best, scores


class HiclassBaseline(BaseEstimator):
    """hiclass ``LocalClassifierPerParentNode`` with logistic regression (C) on
    L2-normalised features: a classifier per parent node, decided top-down. Labels stop
    where the target is -1 (hiclass pads with ""). Probabilities: each parent classifier's
    probability of the child multiplied along the path (:func:`hiclass_leaf_probabilities`;
    hiclass 5.0.8's own ``predict_proba`` applies every parent's classifier to every image,
    scikit-learn-contrib/hiclass#159, and its leaf columns came out near uniform: species
    ECE 0.898 on the leaf data), summed up the tree; the reported path is hiclass's own
    top-down one (when it stops above the lowest rank, the most probable leaf below where
    it stopped)."""

    def __init__(self, taxonomy, *, C: float = 1.0, max_iter: int = 3000, top_k: int = 5) -> None:
        self.taxonomy = taxonomy
        self.C = C
        self.max_iter = max_iter
        self.top_k = top_k

    def fit(self, X: np.ndarray, targets: Mapping[str, object]) -> HiclassBaseline:
        from hiclass import LocalClassifierPerParentNode

        X = _check_X(X, who="HiclassBaseline")
        t = _check_targets(targets, self.taxonomy, len(X), "HiclassBaseline")
        keep = t[self.taxonomy.ranks[0]] >= 0
        cols = [np.where(t[r][keep] >= 0, t[r][keep].astype(str), "") for r in self.taxonomy.ranks]
        self.model_ = LocalClassifierPerParentNode(
            local_classifier=LogisticRegression(C=self.C, max_iter=self.max_iter),
            return_all_probabilities=True)
        self.model_.fit(l2_normalise(X[keep]), np.array(cols, dtype=object).T)
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: np.ndarray) -> Decoded:
        check_is_fitted(self)
        tax = self.taxonomy
        Xn = l2_normalise(_check_X(X, self.n_features_in_, "HiclassBaseline"))
        pred = self.model_.predict(Xn)
        lowest = tax.ranks[-1]
        leaf_p = hiclass_leaf_probabilities(self.model_, Xn, tax).astype(np.float64)
        leaf = np.empty(len(Xn), dtype=np.int64)
        for i, row in enumerate(pred):
            filled = [(k, v) for k, v in enumerate(row) if str(v) != ""]
            k, v = filled[-1] if filled else (-1, "")
            if k == len(tax.ranks) - 1:
                leaf[i] = int(v)
                continue
            under = (np.ones(leaf_p.shape[1], bool) if k < 0 else
                     tax.parent_index(lowest, tax.ranks[k]) == int(v))
            leaf[i] = int(np.argmax(np.where(under, leaf_p[i], -1.0)))
        return decode_leaf_probabilities(leaf_p.astype(np.float32), tax, top_k=self.top_k,
                                         method="hiclass+topdown", leaf=leaf)


def hiclass_leaf_probabilities(model: Any, x: np.ndarray, taxonomy: Taxonomy) -> np.ndarray:
    """Lowest-rank probabilities of a fitted hiclass ``LocalClassifierPerParentNode`` on
    (normalised) ``x``: each node's probability is its parent's times the parent
    classifier's probability of it (a parent without a classifier splits evenly); mass
    that stops above the lowest rank is dropped and the rows renormalised (uniform where
    nothing reaches a lowest-rank taxon)."""
    import networkx as nx

    graph, sep = model.hierarchy_, model.separator_
    depth = len(taxonomy.ranks)
    out = np.zeros((len(x), taxonomy.n_classes(taxonomy.ranks[-1])), dtype=np.float64)
    prob = {model.root_: np.ones(len(x))}
    for node in nx.topological_sort(graph):
        kids = list(graph.successors(node))
        if node not in prob or not kids:
            continue
        clf = graph.nodes[node].get("classifier")
        if clf is None:
            p, cols = np.ones((len(x), 1)) / len(kids), {k: 0 for k in kids}
        else:
            p, cols = clf.predict_proba(x), {c: i for i, c in enumerate(clf.classes_)}
        for k in kids:
            prob[k] = prob[node] * (p[:, cols[k]] if k in cols else 0.0)
            parts = str(k).split(sep)
            if len(parts) == depth and parts[-1] != "":
                out[:, int(parts[-1])] += prob[k]
    total = out.sum(1, keepdims=True)
    return np.where(total > 0, out / np.maximum(total, 1e-300), 1.0 / out.shape[1]).astype(
        np.float32)
