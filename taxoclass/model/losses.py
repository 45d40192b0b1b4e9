"""Training losses on the rank heads, one per ``loss.kind`` (:func:`criterion_from_config`).

- ``dependency`` (ours, :class:`ClassDependencyLoss`): per-rank cross-entropy plus a
  smooth, label-free class-dependency term.
- ``bjerge`` (:class:`BjergeDependencyLoss`): per-rank cross-entropy plus Bjerge et al.
  (2023)'s dependency loss as they define it (arg-max based, needs labels).
- ``flat``, ``soft_labels``, ``hxe`` (:class:`LeafLoss`): on the lowest rank's softmax
  only: plain cross-entropy (the species-only control), and Bertinetto et al. (2020)'s
  soft hierarchical labels and hierarchical cross-entropy.

Our dependency term, for each adjacent (parent, child) rank pair, is

    D = mean_batch( 1 - sum_k p_child(k) * p_parent(parent(k)) )

i.e. the probability that a class drawn from the child head and one drawn from the
parent head are *incoherent* (the drawn child is not under the drawn parent). It is 0
only when both heads put all their mass on one consistent (parent, child) pair, lies in
[0, 1], and for a fixed per-rank confidence it is lower when the heads agree. How it
differs from Bjerge et al.'s: theirs counts arg-max incoherence and only when a head is
also wrong (so it needs labels) and, being piecewise constant, sends no gradient; ours
is smooth, label-free and rewards confident heads, which is why (issue 17) it can push
an unlabelled head to confident answers.

Labels at any rank: the mean runs over the samples labelled at the child rank only
(target ``>= 0``), so a masked rank contributes nothing, to either term: a family-only
image trains the family head only. A pair with no such sample adds 0; the sum over pairs
is still divided by the number of pairs, so fully labelled batches give the same value
as before.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LossConfig
from ..errors import ConfigError

__all__ = ["BjergeDependencyLoss", "ClassDependencyLoss", "LeafLoss", "class_balanced_weights",
           "criterion_from_config", "dependency_penalty"]


def dependency_penalty(p_child: Tensor, p_parent: Tensor, parent_of_child: Tensor) -> Tensor:
    """Per-sample ``1 - sum_k p_child(k) * p_parent(parent(k))`` for probability rows."""
    return 1.0 - (p_child * p_parent[:, parent_of_child]).sum(dim=1)


class ClassDependencyLoss(nn.Module):
    """Sum over ranks of ``weight * CE`` plus ``dependency_weight * class-dependency``.

    ``forward(logits, targets)`` takes dicts rank -> ``[batch, n_classes]`` logits and
    rank -> ``[batch]`` class indices (``-1`` where the label stops above that rank).
    A rank with no labelled sample in the batch (or absent from ``targets``) contributes
    0, never NaN. The parts of the last call are kept as floats in ``last_parts``
    (``ce/<rank>``, ``dependency``, ``total``); reading them syncs a GPU once per call.
    """

    def __init__(self, taxonomy, *, rank_weights: Mapping[str, float] | None = None,
                 dependency_weight: float = 1.0, class_weights: Mapping[str, Tensor] | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ranks: tuple[str, ...] = tuple(taxonomy.ranks)
        unknown = sorted(set(rank_weights or {}) - set(self.ranks))
        if unknown:
            raise ConfigError(f"rank_weights name unknown rank(s) {unknown}; the taxonomy has "
                              f"ranks {self.ranks}.")
        self.rank_weights = {r: float((rank_weights or {}).get(r, 1.0)) for r in self.ranks}
        if dependency_weight < 0:
            raise ConfigError(f"dependency_weight must be >= 0, got {dependency_weight}.")
        self.dependency_weight = float(dependency_weight)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.label_smoothing = float(label_smoothing)
        self.n_classes = {r: taxonomy.n_classes(r) for r in self.ranks}
        self._weighted: set[str] = set()
        for rank, w in (class_weights or {}).items():
            if rank not in self.ranks:
                raise ConfigError(f"class_weights names unknown rank {rank!r}; the taxonomy has "
                                  f"ranks {self.ranks}.")
            w = torch.as_tensor(w, dtype=torch.float32).flatten()
            if w.numel() != self.n_classes[rank]:
                raise ConfigError(f"class_weights[{rank!r}] has {w.numel()} entries; expected one "
                                  f"per {rank} class ({self.n_classes[rank]}).")
            self.register_buffer(f"class_weight_{rank}", w)
            self._weighted.add(rank)
        self._pairs: list[tuple[str, str]] = list(zip(self.ranks[:-1], self.ranks[1:]))
        for parent, child in self._pairs:
            idx = torch.as_tensor(taxonomy.parent_index(child, parent), dtype=torch.long)
            self.register_buffer(f"parent_of_{child}", idx)
        self._parts: dict[str, Tensor] = {}
        #: The ranks whose heads this loss trains (a rank weighted 0 gets no gradient).
        self.trained_ranks: tuple[str, ...] = tuple(r for r in self.ranks
                                                    if self.rank_weights[r] > 0
                                                    or (self.dependency_weight > 0
                                                        and len(self.ranks) > 1))

    def forward(self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
        missing = [r for r in self.trained_ranks if r not in logits]
        if missing:
            raise ValueError(f"ClassDependencyLoss: no logits for rank(s) {missing}; expected "
                             f"one tensor per rank it trains {self.trained_ranks}.")
        # Start from a zero that is attached to every head, so backward() always works.
        total = sum(logits[r].sum() for r in self.ranks if r in logits) * 0.0
        parts: dict[str, Tensor] = {}
        for rank in self.ranks:
            if rank not in targets or rank not in logits:
                continue
            x = logits[rank]
            t = torch.as_tensor(targets[rank], device=x.device).long()
            if x.ndim != 2 or x.shape[1] != self.n_classes[rank] or t.shape != x.shape[:1]:
                raise ValueError(f"ClassDependencyLoss: rank {rank!r} expected logits "
                                 f"[batch, {self.n_classes[rank]}] and targets [batch], got "
                                 f"{tuple(x.shape)} and {tuple(t.shape)}.")
            if not bool((t >= 0).any()):
                continue
            weight = getattr(self, f"class_weight_{rank}") if rank in self._weighted else None
            ce = F.cross_entropy(x, t, weight=weight, ignore_index=-1,
                                 label_smoothing=self.label_smoothing)
            parts[f"ce/{rank}"] = ce
            total = total + self.rank_weights[rank] * ce
        if self.dependency_weight > 0 and self._pairs:
            dep = self._dependency(logits, targets)
            parts["dependency"] = dep
            total = total + self.dependency_weight * dep
        self._parts = {**{k: v.detach() for k, v in parts.items()}, "total": total.detach()}
        return total

    @property
    def last_parts(self) -> dict[str, float]:
        """The parts of the last call as floats (converted when read, not every step)."""
        return {k: float(v) for k, v in self._parts.items()}


    def _dependency(self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
        """Mean over adjacent pairs of the penalty over samples labelled at the child rank
        (every sample when ``targets`` lacks the child rank)."""
        probs = {r: logits[r].softmax(dim=1) for r in self.ranks}
        dep = probs[self.ranks[0]].sum() * 0.0
        for p, c in self._pairs:
            pen = dependency_penalty(probs[c], probs[p], getattr(self, f"parent_of_{c}"))
            if c in targets:
                keep = torch.as_tensor(targets[c], device=pen.device).long() >= 0
                if not bool(keep.all()):
                    if not bool(keep.any()):
                        continue
                    pen = pen[keep]
            dep = dep + pen.mean()
        return dep / len(self._pairs)


def class_balanced_weights(counts: np.ndarray, beta: float = 0.999) -> torch.Tensor:
    """Cui et al. 2019 weights ``(1 - beta) / (1 - beta**n)``, normalised to mean 1.

    Classes with no samples are weighted like classes with one (they never occur as a
    target, so only the normalisation sees them).
    """
    counts = np.asarray(counts, dtype=np.float64).ravel()
    if counts.size == 0:
        raise ValueError("class_balanced_weights: counts is empty; expected one count per class.")
    if np.any(counts < 0):
        raise ValueError("class_balanced_weights: counts must be >= 0.")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"class_balanced_weights: beta must be in [0, 1), got {beta}.")
    n = np.maximum(counts, 1.0)
    effective = -np.expm1(n * np.log(beta)) if beta > 0 else np.ones_like(n)
    w = (1.0 - beta) / effective
    w = w / w.mean()
    return torch.as_tensor(w, dtype=torch.float32)


class BjergeDependencyLoss(ClassDependencyLoss):
    """Per-rank cross-entropy plus the dependency loss of Bjerge et al. (2023, "Hierarchical
    classification of insects with multitask learning and anomaly detection", Ecological
    Informatics 77:102278), which takes it from Gao et al. (2020, "Deep hierarchical
    classification for category prediction in e-commerce system", ECNLP workshop at ACL).

    Source of the formula: the paper's text was not retrievable from the tool library; this
    is the dependence loss as Gao et al. define it and as the public implementation
    ``Ugenteraan/Deep_Hierarchical_Classification`` (``model/hierarchical_loss.py``,
    ``calculate_dloss``) reproduces it. For each adjacent (parent, child) rank pair::

        D   = 1 if the child head's arg-max is not a child of the parent head's arg-max
        l_r = 1 if the arg-max at rank r is wrong (needs the label), else 0
        L_D = mean_batch( p ** (D * l_parent) * p ** (D * l_child) - 1 )

    with penalty ``p`` (``loss.bjerge_penalty``, 3 in that implementation), averaged over
    the pairs and added with ``dependency_weight``. Unlike our term
    (:class:`ClassDependencyLoss`) it needs labels and is built from arg-maxes: it is
    piecewise constant in the logits, so it adds **no gradient** and training equals
    per-rank cross-entropy; it only shows in the loss value (``last_parts``). Kept as
    defined so the benchmark can show that, not "fixed". Samples without a label at the
    child rank are left out of a pair's mean.
    """

    def __init__(self, taxonomy, *, penalty: float = 3.0, **kwargs) -> None:
        super().__init__(taxonomy, **kwargs)
        if penalty < 1:
            raise ConfigError(f"bjerge_penalty must be >= 1, got {penalty}.")
        self.penalty = float(penalty)
        self.trained_ranks = tuple(r for r in self.ranks if self.rank_weights[r] > 0)

    def _dependency(self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
        first = logits[self.ranks[0]]
        dep = first.new_zeros(())
        for p, c in self._pairs:
            if p not in targets or c not in targets:
                continue
            t_c = torch.as_tensor(targets[c], device=first.device).long()
            t_p = torch.as_tensor(targets[p], device=first.device).long()
            keep = t_c >= 0
            if not bool(keep.any()):
                continue
            pred_c, pred_p = logits[c].detach().argmax(1), logits[p].detach().argmax(1)
            incoherent = (getattr(self, f"parent_of_{c}")[pred_c] != pred_p).float()
            wrong_p, wrong_c = (pred_p != t_p).float(), (pred_c != t_c).float()
            term = self.penalty ** (incoherent * wrong_p) * self.penalty ** (incoherent * wrong_c)
            dep = dep + (term - 1.0)[keep].mean()
        return dep / len(self._pairs)


class LeafLoss(nn.Module):
    """A loss on the lowest rank's softmax only (the other heads get no gradient).

    ``kind``:

    - ``"flat"``: cross-entropy on the lowest rank (label smoothing and class weights as
      in :class:`ClassDependencyLoss`); the species-only control.
    - ``"soft_labels"``: Bertinetto et al. (2020, "Making Better Mistakes: Leveraging
      Class Hierarchies with Deep Networks", CVPR), soft hierarchical labels: cross-entropy
      against ``y(j) ∝ exp(-beta * h(j, label) / h_max)``, ``h`` the height of the lowest
      common ancestor counted in ranks above the lowest, ``h_max`` its largest value
      between two leaves (their code divides by the largest distance, as here).
    - ``"hxe"``: Bertinetto et al. (2020) hierarchical cross-entropy
      ``-sum_r exp(-alpha * h(C_r)) * log p(C_r | C_(r-1))`` along the label's path, where
      ``p(node)`` sums the leaf softmax under it and ``h(C_r)`` is the height of the node
      (0 at the lowest rank). ``alpha = 0`` is the plain cross-entropy.

    Labels at any rank: a sample counts at its deepest labelled rank. For ``flat`` a
    sample without a lowest-rank label adds nothing. ``soft_labels`` spreads a genus-only
    label over that genus's species (they all have the same, smallest LCA height to the
    labelled genus, so equal weight), i.e. the same formula with the labelled node in
    place of the leaf. ``hxe`` keeps the path terms down to the labelled rank and drops
    those below. ``soft_labels`` and ``hxe`` ignore label smoothing (their targets are
    already distributions). The mean runs over samples with any label.
    """

    KINDS = ("flat", "soft_labels", "hxe")

    def __init__(self, taxonomy, kind: str = "flat", *, label_smoothing: float = 0.0,
                 class_weights: Mapping[str, Tensor] | None = None, beta: float = 10.0,
                 alpha: float = 0.1) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ConfigError(f"LeafLoss kind must be one of {self.KINDS}, got {kind!r}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        if beta < 0 or alpha < 0:
            raise ConfigError(f"soft_labels_beta and hxe_alpha must be >= 0, got {beta}, "
                              f"{alpha}.")
        self.kind, self.beta, self.alpha = kind, float(beta), float(alpha)
        self.label_smoothing = float(label_smoothing)
        self.ranks: tuple[str, ...] = tuple(taxonomy.ranks)
        self.lowest = self.ranks[-1]
        self.trained_ranks: tuple[str, ...] = (self.lowest,)
        self.n_leaf = taxonomy.n_classes(self.lowest)
        extra = sorted(set(class_weights or {}) - {self.lowest})
        if extra or (class_weights and kind != "flat"):
            raise ConfigError(f"LeafLoss: class weights only for kind 'flat' at the lowest rank "
                              f"{self.lowest!r}; got ranks {sorted(class_weights or {})}.")
        w = (class_weights or {}).get(self.lowest)
        self.register_buffer("class_weight", None if w is None else
                             torch.as_tensor(w, dtype=torch.float32).flatten())
        # ancestor of every leaf at every rank: [n_ranks, n_leaf]
        anc = np.stack([taxonomy.parent_index(self.lowest, r) if r != self.lowest
                        else np.arange(self.n_leaf) for r in self.ranks])
        self.register_buffer("ancestors", torch.as_tensor(anc, dtype=torch.long))
        self.n_groups = [taxonomy.n_classes(r) for r in self.ranks]
        self.edge_weight = [float(np.exp(-self.alpha * (len(self.ranks) - 1 - k)))
                            for k in range(len(self.ranks))]
        # largest LCA height between two leaves: n ranks minus those above the first
        # rank that branches (1 when there is one leaf, to avoid a division by 0)
        branching = [k for k in range(len(self.ranks)) if np.unique(anc[k]).size > 1]
        self.h_max = float(len(self.ranks) - branching[0]) if branching else 1.0
        self._parts: dict[str, Tensor] = {}

    def forward(self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
        if self.lowest not in logits:
            raise ValueError(f"LeafLoss: no logits for the lowest rank {self.lowest!r}.")
        z = logits[self.lowest]
        if z.ndim != 2 or z.shape[1] != self.n_leaf:
            raise ValueError(f"LeafLoss: expected logits [batch, {self.n_leaf}] for rank "
                             f"{self.lowest!r}, got {tuple(z.shape)}.")
        t = torch.stack([torch.as_tensor(targets[r], device=z.device).long()
                         if r in targets else torch.full((z.shape[0],), -1, device=z.device)
                         for r in self.ranks])  # [n_ranks, batch]
        if self.kind == "flat":
            value = self._flat(z, t[-1])
        else:
            keep = t[0] >= 0
            if not bool(keep.any()):
                value = z.sum() * 0.0
            else:
                fn = self._soft if self.kind == "soft_labels" else self._hxe
                value = fn(z[keep], t[:, keep])
        self._parts = {self.kind: value.detach(), "total": value.detach()}
        return value

    @property
    def last_parts(self) -> dict[str, float]:
        """The parts of the last call as floats (converted when read)."""
        return {k: float(v) for k, v in self._parts.items()}

    def _flat(self, z: Tensor, t: Tensor) -> Tensor:
        if not bool((t >= 0).any()):
            return z.sum() * 0.0
        return F.cross_entropy(z, t, weight=self.class_weight, ignore_index=-1,
                               label_smoothing=self.label_smoothing)

    def _soft(self, z: Tensor, t: Tensor) -> Tensor:
        # depth of the LCA of every leaf with the labelled node = number of labelled ranks
        # at which the leaf's ancestor is the label's (a tree: matches are a prefix)
        match = (self.ancestors[:, None, :] == t[:, :, None]) & (t[:, :, None] >= 0)
        depth = match.sum(dim=0).to(z.dtype)  # [batch, n_leaf]
        target = (self.beta * depth / self.h_max).softmax(dim=1)  # ∝ exp(-beta*h/h_max)
        return -(target * z.log_softmax(dim=1)).sum(dim=1).mean()

    def _hxe(self, z: Tensor, t: Tensor) -> Tensor:
        logp = z.log_softmax(dim=1)
        n = len(self.ranks)
        total = z.new_zeros(z.shape[0])
        above = z.new_zeros(z.shape[0])  # log p(root) = 0
        for k in range(n):
            lab = t[k]
            has = lab >= 0
            if k == n - 1:
                node = logp.gather(1, lab.clamp(min=0)[:, None])[:, 0]
            else:
                node = _group_logsumexp(logp, self.ancestors[k], self.n_groups[k]
                                        ).gather(1, lab.clamp(min=0)[:, None])[:, 0]
            total = total - torch.where(has, self.edge_weight[k] * (node - above),
                                        torch.zeros_like(node))
            above = node
        return total.mean()


def _group_logsumexp(logp: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """Per row, ``log sum exp`` of ``logp`` over the columns of each group (stable)."""
    idx = group.expand(logp.shape[0], -1)
    # the shift only keeps exp() in range; detached, it costs no backward pass and the
    # gradient of log-sum-exp does not depend on it
    top = logp.new_full((logp.shape[0], n_groups), float("-inf")).scatter_reduce(
        1, idx, logp.detach(), reduce="amax")
    summed = logp.new_zeros((logp.shape[0], n_groups)).index_add_(
        1, group, (logp - top.gather(1, idx)).exp())
    return summed.log() + top


def criterion_from_config(taxonomy, y_train: Mapping[str, np.ndarray | Tensor],
                          loss: LossConfig | Mapping | None = None) -> nn.Module:
    """The training criterion from the ``loss`` config section (``kind``), the taxonomy
    and the training targets (class index per rank, -1 unknown), which the class-balanced
    weights (``loss.class_balanced``) count. Head training and fine-tuning both build it
    here. Every criterion has ``forward(logits, targets)``, ``last_parts`` and
    ``trained_ranks`` (the heads it trains)."""
    cfg = loss if isinstance(loss, LossConfig) else LossConfig.from_dict(loss)
    class_weights = None
    if cfg.class_balanced:
        class_weights = {}
        ranks = taxonomy.ranks if cfg.kind in ("dependency", "bjerge") else taxonomy.ranks[-1:]
        for r in ranks:
            y = np.asarray(y_train[r])
            counts = np.bincount(y[y >= 0], minlength=taxonomy.n_classes(r))
            class_weights[r] = class_balanced_weights(counts, float(cfg.class_balanced_beta))
    if cfg.kind in LeafLoss.KINDS:
        return LeafLoss(taxonomy, cfg.kind, label_smoothing=float(cfg.label_smoothing),
                        class_weights=class_weights, beta=float(cfg.soft_labels_beta),
                        alpha=float(cfg.hxe_alpha))
    common = dict(rank_weights=cfg.rank_weights, dependency_weight=float(cfg.dependency_weight),
                  class_weights=class_weights, label_smoothing=float(cfg.label_smoothing))
    if cfg.kind == "bjerge":
        return BjergeDependencyLoss(taxonomy, penalty=float(cfg.bjerge_penalty), **common)
    return ClassDependencyLoss(taxonomy, **common)
