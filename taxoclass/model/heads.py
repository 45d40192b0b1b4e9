"""Rank heads: one linear output per taxonomic rank on top of backbone embeddings.

`MultiRankHead` trains on cached embeddings on a CPU; `HierarchicalClassifier` puts the
same head on a live timm backbone (timm style: ``forward_features`` then
``forward_head``) for end-to-end fine-tuning later. Rank order follows ``n_classes``
(top-down, as in :attr:`Taxonomy.ranks`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["HierarchicalClassifier", "MultiRankHead"]


class MultiRankHead(nn.Module):
    """One linear classifier per rank, optionally after a shared small MLP.

    ``hidden=None``: ``dropout -> Linear`` per rank. ``hidden=h``: a shared
    ``Linear(in, h) -> GELU -> Dropout`` trunk, then ``Linear(h, n_rank)`` per rank.
    """

    def __init__(self, in_features: int, n_classes: Mapping[str, int], hidden: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if int(in_features) <= 0:
            raise ConfigError(f"MultiRankHead: in_features must be positive, got {in_features}.")
        if not n_classes:
            raise ConfigError("MultiRankHead: n_classes is empty; expected one entry per rank, "
                              "e.g. {'family': 23, 'genus': 34, 'species': 99}.")
        bad = {r: n for r, n in n_classes.items() if int(n) <= 0}
        if bad:
            raise ConfigError(f"MultiRankHead: every rank needs at least one class, got {bad}.")
        if hidden is not None and int(hidden) <= 0:
            raise ConfigError(f"MultiRankHead: hidden must be positive or None, got {hidden}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"MultiRankHead: dropout must be in [0, 1), got {dropout}.")
        self.in_features = int(in_features)
        self.n_classes: dict[str, int] = {str(r): int(n) for r, n in n_classes.items()}
        self.ranks: tuple[str, ...] = tuple(self.n_classes)
        self.hidden = None if hidden is None else int(hidden)
        self.dropout = float(dropout)
        if self.hidden is None:
            self.trunk: nn.Module = nn.Dropout(self.dropout)
            width = self.in_features
        else:
            self.trunk = nn.Sequential(nn.Linear(self.in_features, self.hidden), nn.GELU(),
                                       nn.Dropout(self.dropout))
            width = self.hidden
        self.heads = nn.ModuleDict({r: nn.Linear(width, n) for r, n in self.n_classes.items()})

    @classmethod
    def for_taxonomy(cls, taxonomy: Any, in_features: int, *, hidden: int | None = None,
                     dropout: float = 0.0) -> MultiRankHead:
        """A head with one output per class of every rank of ``taxonomy``."""
        return cls(in_features, taxonomy.sizes, hidden=hidden, dropout=dropout)

    def forward(self, x: Tensor, ranks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Logits per rank; ``ranks`` limits them to those ranks (training skips the
        heads a loss does not train)."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"MultiRankHead expected embeddings of shape [batch, "
                             f"{self.in_features}], got {tuple(x.shape)}.")
        h = self.trunk(x)
        return {r: self.heads[r](h) for r in (self.ranks if ranks is None else ranks)}

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments; :meth:`from_config` rebuilds the module."""
        return {"in_features": self.in_features, "n_classes": dict(self.n_classes),
                "hidden": self.hidden, "dropout": self.dropout}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> MultiRankHead:
        try:
            return cls(int(cfg["in_features"]), dict(cfg["n_classes"]), hidden=cfg.get("hidden"),
                       dropout=float(cfg.get("dropout", 0.0)))
        except KeyError as exc:
            raise ConfigError(f"MultiRankHead config lacks {exc}; expected keys in_features, "
                              f"n_classes, hidden, dropout, found {sorted(cfg)}.") from None

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, hidden={self.hidden}, dropout={self.dropout}"


class HierarchicalClassifier(nn.Module):
    """A timm backbone plus a :class:`MultiRankHead`.

    ``forward_features(images)`` gives pooled embeddings (timm's pre-logits), the same
    vectors an embedding cache stores, so a head trained on the cache drops in here.
    """

    def __init__(self, backbone: nn.Module, head: MultiRankHead) -> None:
        super().__init__()
        width = getattr(backbone, "num_features", None)
        if width is not None and int(width) != head.in_features:
            raise ConfigError(f"Backbone gives {width}-d embeddings but the head expects "
                              f"{head.in_features}; build the head with in_features={width}.")
        self.backbone = backbone
        self.head = head

    @classmethod
    def create(cls, model_name: str, n_classes: Mapping[str, int], *, pretrained: bool = False,
               hidden: int | None = None, dropout: float = 0.0,
               **timm_kwargs: Any) -> HierarchicalClassifier:
        """Build ``timm.create_model(model_name, num_classes=0)`` plus a fitting head."""
        import timm

        backbone = timm.create_model(model_name, pretrained=pretrained, num_classes=0,
                                     **timm_kwargs)
        head = MultiRankHead(backbone.num_features, n_classes, hidden=hidden, dropout=dropout)
        return cls(backbone, head)

    @property
    def ranks(self) -> tuple[str, ...]:
        return self.head.ranks

    def forward_features(self, images: Tensor) -> Tensor:
        """Pooled embeddings ``[batch, num_features]``."""
        feats = self.backbone.forward_features(images)
        return self.backbone.forward_head(feats, pre_logits=True)

    def forward_head(self, emb: Tensor) -> dict[str, Tensor]:
        return self.head(emb)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.forward_head(self.forward_features(images))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any] | Callable:
        """timm's layer grouping (for ``param_groups_layer_decay``): the backbone's coarse
        groups (stem, ViT blocks or CNN stages) under ``backbone.``, always coarse whatever
        ``coarse`` says, so that a "block" is what ``unfreeze_blocks`` counts. The rank heads
        match nothing, which puts them in the top layer, and so do the modules timm attaches
        to the last block (final norms, suffix ``(99999,)``): they train at the heads' rate.
        A backbone without a ``group_matcher`` is one layer."""
        inner = getattr(self.backbone, "group_matcher", None)
        if inner is None:
            return {"backbone": r"backbone\."}
        spec = inner(coarse=True)
        if callable(spec):
            def match(name: str) -> Any:
                if name.startswith("backbone."):
                    return spec(name[len("backbone."):])
                return float("inf")
            return match
        return {group: _under_backbone(m) for group, m in spec.items()}

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Stop (or restart) gradient flow into the backbone, e.g. for head warm-up."""
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)


_MATCH_PREV_GROUP = (99999,)  # timm's suffix for "part of the previous (last) block"


def _under_backbone(spec: Any) -> Any:
    """A timm group-matcher entry (regex, list of (regex, suffix) or None) re-rooted at
    ``backbone.`` (timm matches with ``re.match``, so a leading ``^`` is redundant)."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        return [(_under_backbone(regex), suffix) for regex, suffix in spec
                if tuple(suffix or ()) != _MATCH_PREV_GROUP]
    return r"backbone\.(?:" + re.sub(r"(^|\|)\^", r"\1", spec) + ")"
