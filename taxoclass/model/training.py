"""Train the multi-rank head on cached embeddings: mini-batch AdamW, the configured loss
(``loss.kind``: hxe by default, or per-rank heads with the class-dependency loss), early
stopping on validation loss when set (best weights kept).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..config import ModelConfig, TrainConfig
from ..errors import ConfigError
from ..taxonomy.tree import Taxonomy
from .heads import MultiRankHead
from .losses import criterion_from_config
from .optim import adamw
from .splits import stratified_split  # noqa: F401  (its home is model.splits)

Progress = Callable[[int, int], None]


def normalize(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """L2-normalise rows (the heads see unit-length embeddings)."""
    t = torch.as_tensor(x, dtype=torch.float32)
    return torch.nn.functional.normalize(t, dim=1)


def make_optimizer(head: torch.nn.Module | _FusedHeads, train: Mapping | None = None
                   ) -> torch.optim.Optimizer:
    """AdamW (:func:`taxoclass.model.optim.adamw`, fused where torch can) with the ``train``
    section's ``lr`` and ``weight_decay``."""
    settings = TrainConfig.from_dict(train)
    return adamw((p for p in head.parameters() if p.requires_grad),
                 lr=float(settings.lr), weight_decay=float(settings.weight_decay))


def freeze_untrained_heads(head: MultiRankHead, trained: tuple[str, ...] | list[str]) -> None:
    """Zero and freeze the heads of ranks the loss does not train (``loss.kind`` flat,
    soft_labels, hxe train the lowest only): their logits are exactly 0, a uniform
    softmax that adds the same constant to every path score, so ``path`` and ``crm``
    decoding equal their marginal versions instead of reading an untrained head."""
    for rank in head.ranks:
        if rank not in trained:
            layer = head.heads[rank]
            with torch.no_grad():
                layer.weight.zero_()
                layer.bias.zero_()
            layer.requires_grad_(False)


class _FusedHeads:
    """The trained rank heads of a :class:`MultiRankHead` as one weight matrix for the
    training loop: one matmul forward and one backward instead of one per rank. AdamW is
    elementwise, so training the concatenation is training the heads (the same numbers);
    :meth:`sync` copies the weights back into the heads."""

    def __init__(self, head: MultiRankHead, ranks: tuple[str, ...]) -> None:
        self.head, self.ranks = head, ranks
        self.sizes = [head.n_classes[r] for r in ranks]
        self.weight = torch.nn.Parameter(torch.cat([head.heads[r].weight.detach()
                                                    for r in ranks]))
        self.bias = torch.nn.Parameter(torch.cat([head.heads[r].bias.detach() for r in ranks]))

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.nn.functional.linear(self.head.trunk(x), self.weight, self.bias)
        return dict(zip(self.ranks, z.split(self.sizes, dim=1)))

    def parameters(self):
        yield from (p for p in self.head.trunk.parameters() if p.requires_grad)
        yield from (self.weight, self.bias)

    def sync(self) -> None:
        with torch.no_grad():
            for r, w, b in zip(self.ranks, self.weight.split(self.sizes),
                               self.bias.split(self.sizes)):
                self.head.heads[r].weight.copy_(w)
                self.head.heads[r].bias.copy_(b)


@dataclass
class EarlyStopping:
    """Best-epoch tracking for a loop that scores every epoch (lower is better).

    ``patience > 0``: an epoch is the new best when its score beats the best by more than
    ``min_delta``, and the loop stops once ``patience`` epochs pass without one.
    ``patience == 0``: no early stopping; every epoch is the new best (the last one wins).
    Head training and fine-tuning both use it.
    """

    patience: int = 0
    min_delta: float = 1e-6
    best_score: float = math.inf
    best_epoch: int = 0

    def update(self, epoch: int, score: float) -> bool:
        """Record ``epoch``'s (1-based) score; True when it is the new best."""
        if self.patience <= 0 or score < self.best_score - self.min_delta:
            self.best_score, self.best_epoch = float(score), int(epoch)
            return True
        return False

    def should_stop(self, epoch: int) -> bool:
        """True once ``patience`` epochs have passed since the best one."""
        return self.patience > 0 and epoch - self.best_epoch >= self.patience


@dataclass
class TrainResult:
    head: MultiRankHead
    history: pd.DataFrame  # epoch, train_loss, val_loss, val_<rank>_acc, seconds
    best_epoch: int
    seconds: float
    samples_per_second: float


def train_head(x_train: np.ndarray, y_train: Mapping[str, np.ndarray],
               x_val: np.ndarray | None, y_val: Mapping[str, np.ndarray] | None,
               taxonomy: Taxonomy, *, model: Mapping | None = None, loss: Mapping | None = None,
               train: Mapping | None = None, normalize_inputs: bool = True,
               progress: Progress | None = None) -> TrainResult:
    """Fit a :class:`MultiRankHead` on embeddings; targets: class index per rank, -1 unknown.

    ``model``, ``loss`` and ``train`` are the config sections of the same names (partial
    mappings take the defaults of :class:`~taxoclass.config.TrainConfig` and friends, so a
    Python caller gets the model a CLI user gets).
    """
    model_cfg = ModelConfig.from_dict(model)
    train_cfg = TrainConfig.from_dict(train)
    loss = dict(loss or {})
    seed = int(train_cfg.seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ranks = taxonomy.ranks
    xt = normalize(x_train) if normalize_inputs else torch.as_tensor(x_train, dtype=torch.float32)
    yt = {r: torch.as_tensor(np.asarray(y_train[r]), dtype=torch.long) for r in ranks}
    has_val = x_val is not None and len(x_val) > 0
    if has_val:
        xv = normalize(x_val) if normalize_inputs else torch.as_tensor(x_val, dtype=torch.float32)
        yv = {r: torch.as_tensor(np.asarray(y_val[r]), dtype=torch.long) for r in ranks}

    head = MultiRankHead(xt.shape[1], {r: taxonomy.n_classes(r) for r in ranks},
                         hidden=model_cfg.hidden, dropout=float(model_cfg.dropout))
    criterion = criterion_from_config(taxonomy, yt, loss)
    trained = tuple(r for r in ranks if r in getattr(criterion, "trained_ranks", ranks))
    if not trained:
        raise ConfigError(f"loss: trains no head (every loss.rank_weights entry is 0 and "
                          f"dependency_weight is 0); give at least one of the ranks "
                          f"{tuple(ranks)} a weight above 0.")
    freeze_untrained_heads(head, trained)
    fused = _FusedHeads(head, trained)
    opt = make_optimizer(fused, train_cfg.to_dict())
    epochs = int(train_cfg.epochs)
    n = len(xt)
    batch_size = int(train_cfg.batch_size or 0)
    if batch_size <= 0 or batch_size > n:
        batch_size = n  # full batch
    stopper = EarlyStopping(patience=int(train_cfg.patience or 0))
    best_state = copy.deepcopy(head.state_dict()) if stopper.patience else None
    rows = []
    t0 = time.perf_counter()
    seen = 0
    y_all = torch.stack([yt[r] for r in ranks], dim=1)  # [n, n_ranks]
    for epoch in range(1, epochs + 1):
        head.train()
        order = torch.randperm(n, generator=gen)
        # one gather per epoch, then contiguous slices: the batches of the same order
        xs, ys = xt[order], y_all[order]
        total, t_epoch = xt.new_zeros(()), time.perf_counter()
        for start in range(0, n, batch_size):
            yb = ys[start:start + batch_size]
            out = fused(xs[start:start + batch_size])
            value = criterion(out, {r: yb[:, k] for k, r in enumerate(ranks)})
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total += value.detach() * len(yb)
        seen += n
        fused.sync()
        row = {"epoch": epoch, "train_loss": float(total) / n,
               "seconds": time.perf_counter() - t_epoch}
        if has_val:
            head.eval()
            with torch.inference_mode():
                out = head(xv)
                row["val_loss"] = float(criterion(out, yv))
                for r in ranks:
                    mask = yv[r] >= 0
                    if mask.any():
                        acc = (out[r].argmax(1)[mask] == yv[r][mask]).float().mean()
                        row[f"val_{r}_acc"] = float(acc)
            score = row["val_loss"]
        else:
            score = row["train_loss"]
        rows.append(row)
        if stopper.update(epoch, score) and stopper.patience:
            best_state = copy.deepcopy(head.state_dict())
        if progress:
            progress(epoch, epochs)
        if stopper.should_stop(epoch):
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    seconds = time.perf_counter() - t0
    return TrainResult(head=head, history=pd.DataFrame(rows), best_epoch=stopper.best_epoch,
                       seconds=seconds, samples_per_second=seen / max(seconds, 1e-9))
