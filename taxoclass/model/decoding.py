"""Coherent decoding: per-rank probabilities that agree along the tree, and one path.

Four methods, all vectorised over the taxonomy's index arrays (no Python loop over taxa):

- ``"path"``: every full path (leaf = lowest-rank class) is scored by the sum of the
  per-rank log-softmax along it; a softmax over paths gives leaf probabilities, which
  are summed up the tree. All heads vote; a species is only likely if its genus and
  family heads agree. Caveat: a head that only repeats the species head's evidence
  (e.g. a genus head equal to the species marginals) is counted twice, which sharpens
  the result and favours species-rich genera when the heads are uncertain.
- ``"marginal"``: the lowest-rank softmax alone, summed up the tree. The higher heads
  are ignored (useful when they were not trained, e.g. a flat species model).
- ``"topdown"``: greedy from the top rank: the top head's arg-max, then at each rank
  below the arg-max of that rank's head among the children of the class chosen above
  (the local-classifier-per-parent-node decision, e.g. Silla & Freitas 2011, "A survey of
  hierarchical classification across different application domains", DMKD 22:31-72).
  Its probabilities are the chain rule of the heads, each renormalised over the children
  of its parent: ``P(leaf) = prod_rank p_rank(node | parent)``.
- ``"crm"``: conditional-risk minimisation (Karthik et al. 2021, "No Cost Likelihood
  Manipulation at Test Time for Making Better Mistakes in Deep Networks", ICLR): the
  reported leaf minimises the *expected* tree distance to the truth under the path
  probabilities, ``argmin_j sum_i p_i d(i, j)``. With every leaf at full depth,
  ``d(i, j) = 2 * (n_ranks - depth of their LCA)``, so this is the leaf maximising the
  sum over ranks of its ancestors' probabilities (computed without a leaf x leaf matrix).
  :func:`decode_leaf_probabilities` applies it to any method's leaf probabilities.

For ``"path"`` and ``"marginal"`` the reported path is the arg-max leaf and its ancestors;
for ``"topdown"`` and ``"crm"`` the leaf that rule chooses. Either way the species
reported is a child of the genus reported, and so on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..config import DecodeConfig

__all__ = ["METHODS", "Decoded", "coherent_probabilities", "decode", "decode_leaf_probabilities",
           "is_coherent", "marginal_logits", "marginalise", "min_risk_leaf", "topdown"]

METHODS: tuple[str, ...] = ("path", "marginal", "topdown", "crm")
#: How a leaf is chosen from leaf probabilities (:func:`decode_leaf_probabilities`).
CHOICES: tuple[str, ...] = ("argmax", "crm")


@dataclass
class Decoded:
    """Coherent predictions for a batch; every array has one row per image.

    ``path``/``path_prob``: class index and coherent probability, per rank, of the single
    best path (arg-max leaf and its ancestors). ``probs``: full coherent probabilities.
    ``topk_index``/``topk_prob``: the ``k`` most probable classes per rank, best first.
    ``method`` says how the probabilities were made (the reason behind the answer).

    The path follows one *leaf* (the best one, or the one ``topdown``/``crm`` choose), so
    its genus need not be the most probable genus (two oaks at 0.3 each beat one maple
    at 0.4 at genus rank, yet the maple is the best leaf); rank-level decisions (back-off)
    should read ``probs`` / ``topk_*``.
    """

    ranks: tuple[str, ...]
    probs: dict[str, np.ndarray]
    path: dict[str, np.ndarray]
    path_prob: dict[str, np.ndarray]
    topk_index: dict[str, np.ndarray]
    topk_prob: dict[str, np.ndarray]
    method: str = "path"
    top_k: int = field(default=5)
    #: Raw head logit of the path's class, per rank (when decoded from logits; empty for
    #: decoders that start from probabilities); for a rank whose head is absent or left
    #: untrained, the :func:`marginal_logits` of the lowest head. An unnormalised
    #: confidence: unlike the softmax probability it stays low when no known class fits.
    path_logit: dict[str, np.ndarray] = field(default_factory=dict)
    #: Per rank, the arg-max of that rank's own head before coherent decoding (when
    #: decoded from logits; empty for methods without per-rank heads, and without the
    #: ranks whose head a loss left untrained at zero). Unlike ``path`` it need not be
    #: coherent: :func:`is_coherent` on it measures how well the heads agree.
    head_argmax: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.path[self.ranks[-1]])

    def to_frame(self, taxonomy, ids: Sequence | None = None) -> pd.DataFrame:
        """One row per image: ``<rank>``, ``<rank>_prob``, ``<rank>_top5`` ("name:prob;...")."""
        n = len(self)
        if ids is not None and len(ids) != n:
            raise ValueError(f"Decoded.to_frame: got {len(ids)} ids for {n} predictions.")
        cols: dict[str, object] = {}
        if ids is not None:
            cols["id"] = list(ids)
        for rank in self.ranks:
            names = np.asarray(taxonomy.names(rank), dtype=object)
            cols[rank] = names[self.path[rank]]
            cols[f"{rank}_prob"] = self.path_prob[rank]
            idx, prob = self.topk_index[rank], self.topk_prob[rank]
            cols[f"{rank}_top{self.top_k}"] = [
                ";".join(f"{names[i]}:{p:.4f}" for i, p in zip(row_i, row_p))
                for row_i, row_p in zip(idx, prob)]
        cols["method"] = self.method
        return pd.DataFrame(cols)


def _check(logits: Mapping[str, object], taxonomy) -> dict[str, Tensor]:
    lowest = taxonomy.ranks[-1]
    if lowest not in logits:
        raise ValueError(f"Decoding needs logits for the lowest rank {lowest!r}; got ranks "
                         f"{list(logits)}.")
    out: dict[str, Tensor] = {}
    batch = None
    for rank in taxonomy.ranks:
        if rank not in logits:
            continue
        x = torch.as_tensor(logits[rank])
        if not x.is_floating_point():
            x = x.float()
        n = taxonomy.n_classes(rank)
        if x.ndim != 2 or x.shape[1] != n:
            raise ValueError(f"Logits for rank {rank!r} must have shape [batch, {n}], got "
                             f"{tuple(x.shape)}.")
        if batch is not None and x.shape[0] != batch:
            raise ValueError(f"Logits disagree on the batch size: {rank!r} has {x.shape[0]} "
                             f"rows, the rank above has {batch}.")
        batch = x.shape[0]
        out[rank] = x
    extra = sorted(set(logits) - set(taxonomy.ranks))
    if extra:
        raise ValueError(f"Logits name rank(s) {extra} that the taxonomy {taxonomy.ranks} lacks.")
    return out


def _index(taxonomy, rank: str, parent: str, device: torch.device) -> Tensor:
    return torch.as_tensor(taxonomy.parent_index(rank, parent), device=device)


def marginalise(leaf_probs: Tensor, taxonomy) -> dict[str, Tensor]:
    """Sum lowest-rank probabilities ``[batch, n_leaf]`` up the tree, per rank."""
    lowest = taxonomy.ranks[-1]
    out = {lowest: leaf_probs}
    for rank in taxonomy.ranks[:-1]:
        idx = _index(taxonomy, lowest, rank, leaf_probs.device)
        acc = leaf_probs.new_zeros((leaf_probs.shape[0], taxonomy.n_classes(rank)))
        out[rank] = acc.index_add_(1, idx, leaf_probs)
    return {r: out[r] for r in taxonomy.ranks}


def _leaf_scores(logits: Mapping[str, Tensor], taxonomy, method: str) -> Tensor:
    """Log-scores of every leaf (full path), before the softmax over leaves."""
    if method not in METHODS:
        raise ValueError(f"Unknown decoding method {method!r}; expected one of {METHODS}.")
    x = _check(logits, taxonomy)
    lowest = taxonomy.ranks[-1]
    if method == "topdown":
        return _topdown_scores(x, taxonomy)
    score = x[lowest].log_softmax(dim=1)
    if method in ("path", "crm"):
        for rank, z in x.items():
            if rank != lowest:
                idx = _index(taxonomy, lowest, rank, z.device)
                score = score + z.log_softmax(dim=1).index_select(1, idx)
    return score


def _group_log_softmax(z: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """``log softmax`` of each row of ``z`` within groups of columns (stable)."""
    idx = group.expand(z.shape[0], -1)
    top = z.new_full((z.shape[0], n_groups), float("-inf")).scatter_reduce(
        1, idx, z.detach(), reduce="amax")  # a shift for range only: no gradient needed
    shifted = z - top.gather(1, idx)
    total = z.new_zeros((z.shape[0], n_groups)).index_add_(1, group, shifted.exp())
    return shifted - total.log().gather(1, idx)


def _topdown_steps(x: Mapping[str, Tensor], taxonomy):
    """Per present rank, top-down: (rank, parent rank present above or None, log of the
    head's probability renormalised over the children of each class's parent)."""
    above = None
    for rank in taxonomy.ranks:
        if rank not in x:
            continue
        z = x[rank]
        if above is None:
            cond = z.log_softmax(dim=1)
        else:
            group = _index(taxonomy, rank, above, z.device)
            cond = _group_log_softmax(z, group, taxonomy.n_classes(above))
        yield rank, above, cond
        above = rank


def _topdown_scores(x: Mapping[str, Tensor], taxonomy) -> Tensor:
    """Leaf log-probabilities by the chain rule of the heads (each renormalised over
    the children of its parent)."""
    lowest = taxonomy.ranks[-1]
    score = None
    for rank, _, cond in _topdown_steps(x, taxonomy):
        part = cond if rank == lowest else cond.index_select(
            1, _index(taxonomy, lowest, rank, cond.device))
        score = part if score is None else score + part
    return score


def topdown(logits: Mapping[str, Tensor], taxonomy) -> Tensor:
    """The leaf (lowest-rank index) that greedy top-down decoding reaches, per row: the
    top head's arg-max, then per rank the arg-max among the children of the choice above."""
    x = _check(logits, taxonomy)
    chosen = None
    for rank, above, cond in _topdown_steps(x, taxonomy):
        if above is not None:
            group = _index(taxonomy, rank, above, cond.device)
            cond = cond.masked_fill(group[None, :] != chosen[:, None], float("-inf"))
        chosen = cond.argmax(dim=1)
    return chosen


def min_risk_leaf(probs: Mapping[str, Tensor], taxonomy) -> Tensor:
    """Karthik et al. 2021's conditional-risk choice: per row, the leaf with the least
    expected tree distance to the truth, from coherent per-rank ``probs`` (rank ->
    ``[batch, n]``, each rank the sum of the lowest up the tree): the leaf maximising the
    sum over ranks of the probability of its ancestor there. Ties go to the lower index."""
    lowest = taxonomy.ranks[-1]
    p = probs[lowest]
    gain = p.clone()
    for rank in taxonomy.ranks[:-1]:
        gain = gain + probs[rank].index_select(1, _index(taxonomy, lowest, rank, p.device))
    return gain.argmax(dim=1)


def coherent_probabilities(logits: Mapping[str, Tensor], taxonomy,
                           method: str = "path") -> dict[str, Tensor]:
    """Per-rank probabilities that sum up the tree (genus = sum of its species).

    ``logits``: rank -> ``[batch, n_classes]`` (tensors or arrays). Methods ``"path"`` and
    ``"crm"`` use every rank present (the lowest rank is required) by path scoring,
    ``"topdown"`` every rank by the chain rule, ``"marginal"`` only the lowest.
    Differentiable; runs on the logits' device.
    """
    return marginalise(_leaf_scores(logits, taxonomy, method).softmax(dim=1), taxonomy)


def decode_leaf_probabilities(leaf_probs: Tensor | np.ndarray, taxonomy, *, top_k: int = 5,
                              method: str = "marginal", choice: str = "argmax",
                              leaf: np.ndarray | None = None) -> Decoded:
    """Build a :class:`Decoded` from lowest-rank probabilities (rows summing to 1).

    ``choice``: ``"argmax"`` reports the most probable leaf, ``"crm"`` the leaf of least
    expected tree distance (:func:`min_risk_leaf`, Karthik et al. 2021). ``leaf`` (one
    lowest-rank index per row) reports the leaf a method chose itself instead."""
    if choice not in CHOICES:
        raise ValueError(f"Unknown leaf choice {choice!r}; expected one of {CHOICES}.")
    p = torch.as_tensor(leaf_probs)
    if not p.is_floating_point():
        p = p.float()
    probs = marginalise(p, taxonomy)
    chosen = None if leaf is None else torch.as_tensor(np.asarray(leaf), dtype=torch.long)
    if chosen is None and choice == "crm":
        chosen = min_risk_leaf(probs, taxonomy)
    return _decoded(probs, taxonomy, top_k=top_k, method=method, leaf=chosen)


@torch.no_grad()
def decode(logits: Mapping[str, Tensor], taxonomy, *, method: str = DecodeConfig.method,
           top_k: int = 5) -> Decoded:
    """Coherent probabilities, the chosen path and the top-k per rank, as numpy arrays
    (``head_argmax``: each head's own arg-max, before decoding)."""
    probs = coherent_probabilities(logits, taxonomy, method)
    leaf = None
    if method == "crm":
        leaf = min_risk_leaf(probs, taxonomy)
    elif method == "topdown":
        leaf = topdown(logits, taxonomy)
    out = _decoded(probs, taxonomy, top_k=top_k, method=method, leaf=leaf)
    lowest = taxonomy.ranks[-1]
    for rank in taxonomy.ranks:
        lg = torch.as_tensor(logits[rank]).float() if rank in logits else None
        if lg is not None and bool(lg.any()):  # a trained head: its own raw logit
            out.head_argmax[rank] = lg.argmax(dim=1).cpu().numpy()
        else:  # absent or all-zero (left untrained by a leaf-only loss): marginal logit
            lg = marginal_logits(torch.as_tensor(logits[lowest]).float(), taxonomy, rank)
        idx = torch.as_tensor(out.path[rank], device=lg.device)
        out.path_logit[rank] = lg.gather(1, idx[:, None])[:, 0].cpu().numpy()
    return out


def marginal_logits(leaf_logits: Tensor, taxonomy, rank: str) -> Tensor:
    """Log-sum-exp of the lowest rank's logits over the leaves under each class of ``rank``
    (``[batch, n_rank]``): an unnormalised confidence for a rank whose own head is absent
    or untrained (``loss.kind`` flat / soft_labels / hxe). Like the raw head logit, and
    unlike the summed probability, it stays low when no known leaf fits (it is the
    negative free energy of the class's leaves, Liu et al. 2020, "Energy-based
    Out-of-distribution Detection", NeurIPS)."""
    lowest = taxonomy.ranks[-1]
    if rank == lowest:
        return leaf_logits
    idx = _index(taxonomy, lowest, rank, leaf_logits.device)
    top = leaf_logits.max(dim=1, keepdim=True).values
    acc = leaf_logits.new_zeros((leaf_logits.shape[0], taxonomy.n_classes(rank)))
    acc.index_add_(1, idx, (leaf_logits - top).exp())
    return acc.log() + top


def _decoded(probs: dict[str, Tensor], taxonomy, *, top_k: int, method: str,
             leaf: Tensor | None = None) -> Decoded:
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    lowest = taxonomy.ranks[-1]
    if leaf is None:
        leaf = probs[lowest].argmax(dim=1)
    path, path_prob, topk_index, topk_prob = {}, {}, {}, {}
    for rank in taxonomy.ranks:
        p = probs[rank]
        idx = leaf if rank == lowest else _index(taxonomy, lowest, rank, p.device)[leaf]
        path[rank] = idx.cpu().numpy()
        path_prob[rank] = p.gather(1, idx[:, None])[:, 0].detach().cpu().numpy()
        val, ind = p.topk(min(top_k, p.shape[1]), dim=1)
        topk_index[rank] = ind.cpu().numpy()
        topk_prob[rank] = val.detach().cpu().numpy()
    return Decoded(ranks=tuple(taxonomy.ranks),
                   probs={r: probs[r].detach().cpu().numpy() for r in taxonomy.ranks},
                   path=path, path_prob=path_prob, topk_index=topk_index, topk_prob=topk_prob,
                   method=method, top_k=top_k)


def is_coherent(path: Mapping[str, np.ndarray], taxonomy) -> np.ndarray:
    """Per row: every reported class sits under the class reported at the rank above.

    ``-1`` means "not reported" (a prediction that backs off to a higher rank); it is
    coherent only below the reported ranks, never above one.
    """
    ranks = [r for r in taxonomy.ranks if r in path]
    if not ranks:
        raise ValueError(f"is_coherent: path names none of the ranks {taxonomy.ranks}.")
    n = len(np.asarray(path[ranks[0]]))
    ok = np.ones(n, dtype=bool)
    cols = {}
    for r in ranks:
        c = np.asarray(path[r]).astype(np.int64)
        size = taxonomy.n_classes(r)
        ok &= (c >= -1) & (c < size)
        cols[r] = np.where((c >= 0) & (c < size), c, -1)
    for parent, child in zip(ranks[:-1], ranks[1:]):
        up = taxonomy.parent_index(child, parent)
        c, p = cols[child], cols[parent]
        has_child = c >= 0
        ok &= ~has_child | ((p >= 0) & (up[np.maximum(c, 0)] == p))
    return ok


def concat_decoded(parts: Sequence[Decoded]) -> Decoded:
    """Join batch-wise :class:`Decoded` results (same ranks, method and k) row-wise."""
    if not parts:
        raise ValueError("concat_decoded needs at least one part.")
    first = parts[0]
    if len(parts) == 1:
        return first

    def cat(attr: str) -> dict[str, np.ndarray]:
        return {r: np.concatenate([getattr(p, attr)[r] for p in parts]) for r in first.ranks}

    logit_ranks = [r for r in first.ranks
                   if all(r in p.path_logit for p in parts)]
    head_ranks = [r for r in first.ranks if all(r in p.head_argmax for p in parts)]
    return Decoded(ranks=first.ranks, probs=cat("probs"), path=cat("path"),
                   path_prob=cat("path_prob"), topk_index=cat("topk_index"),
                   topk_prob=cat("topk_prob"), method=first.method, top_k=first.top_k,
                   path_logit={r: np.concatenate([p.path_logit[r] for p in parts])
                               for r in logit_ranks},
                   head_argmax={r: np.concatenate([p.head_argmax[r] for p in parts])
                                for r in head_ranks})
