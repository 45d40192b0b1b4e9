"""Multi-rank loss with a class-dependency term (after Bjerge et al. 2023).

Per rank: weighted cross-entropy that ignores ``-1`` targets (partial labels). Across
ranks: a differentiable penalty on probability mass that the child head puts on
classes whose parent the parent head does not predict.

The dependency term, for each adjacent (parent, child) rank pair, is

    D = mean_batch( 1 - sum_k p_child(k) * p_parent(parent(k)) )

i.e. the probability that a class drawn from the child head and one drawn from the
parent head are *incoherent* (the drawn child is not under the drawn parent). It is 0
only when both heads put all their mass on one consistent (parent, child) pair, lies in
[0, 1], and for a fixed per-rank confidence it is lower when the heads agree. Like
Bjerge's term it also mildly rewards confident heads.

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

__all__ = ["ClassDependencyLoss", "class_balanced_weights", "criterion_from_config",
           "dependency_penalty"]


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
        self.last_parts: dict[str, float] = {}

    def forward(self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
        missing = [r for r in self.ranks if r not in logits]
        if missing:
            raise ValueError(f"ClassDependencyLoss: no logits for rank(s) {missing}; expected "
                             f"one tensor per rank {self.ranks}.")
        # Start from a zero that is attached to every head, so backward() always works.
        total = sum(logits[r].sum() for r in self.ranks) * 0.0
        parts: dict[str, Tensor] = {}
        for rank in self.ranks:
            if rank not in targets:
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
        self.last_parts = {k: float(v.detach()) for k, v in parts.items()}
        self.last_parts["total"] = float(total.detach())
        return total


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


def criterion_from_config(taxonomy, y_train: Mapping[str, np.ndarray | Tensor],
                          loss: LossConfig | Mapping | None = None) -> ClassDependencyLoss:
    """The training criterion from the ``loss`` config section, the taxonomy and the
    training targets (class index per rank, -1 unknown), which the class-balanced weights
    (``loss.class_balanced``) count. Head training and fine-tuning both build it here."""
    cfg = loss if isinstance(loss, LossConfig) else LossConfig.from_dict(loss)
    class_weights = None
    if cfg.class_balanced:
        class_weights = {}
        for r in taxonomy.ranks:
            y = np.asarray(y_train[r])
            counts = np.bincount(y[y >= 0], minlength=taxonomy.n_classes(r))
            class_weights[r] = class_balanced_weights(counts, float(cfg.class_balanced_beta))
    return ClassDependencyLoss(taxonomy, rank_weights=cfg.rank_weights,
                               dependency_weight=float(cfg.dependency_weight),
                               class_weights=class_weights,
                               label_smoothing=float(cfg.label_smoothing))
