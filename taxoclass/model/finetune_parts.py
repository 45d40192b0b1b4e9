"""Building blocks of a fine-tuning run (:mod:`taxoclass.model.finetune`): the model
(backbone + rank heads), the backbone argument, and the training and validation sets."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import FinetuneSettings, ModelConfig
from ..errors import ConfigError
from ..taxonomy.tree import Taxonomy
from .heads import HierarchicalClassifier, MultiRankHead
from .image_data import ImageDataset, LabelledImages, TileViewTransform

if TYPE_CHECKING:
    from ..features.backbones import Backbone

__all__ = ["FinetuneModel", "as_backbone", "build_model", "datasets"]


class FinetuneModel(HierarchicalClassifier):
    """Backbone + :class:`MultiRankHead`, L2-normalising the embedding first when
    ``normalize`` (as :class:`~taxoclass.bundle.ModelBundle` does), so the bundle
    reproduces this model's logits from ``Backbone.embed``."""

    def __init__(self, backbone: nn.Module, head: MultiRankHead, normalize: bool = True) -> None:
        super().__init__(backbone, head)
        self.normalize = bool(normalize)

    def forward_head(self, emb: Tensor) -> dict[str, Tensor]:
        if self.normalize:
            emb = F.normalize(emb.float(), dim=1)
        return self.head(emb)


def as_backbone(backbone: Any) -> Backbone:
    from ..features.backbones import Backbone, backbone_from_spec, backbone_spec, create_backbone

    if isinstance(backbone, Backbone):
        return backbone
    if isinstance(backbone, str):
        return create_backbone(backbone)
    if isinstance(backbone, Mapping):
        spec = dict(backbone)
        if not spec.get("name"):
            raise ConfigError(f"finetune: backbone spec {spec} has no 'name'; expected the "
                              f"config's backbone section (name, checkpoint, model_kwargs).")
        return backbone_from_spec(backbone_spec(spec))
    raise ConfigError(f"finetune: backbone must be a taxoclass Backbone, a model name or a "
                      f"backbone config mapping, got {type(backbone).__name__}.")


def build_model(bb: Backbone, taxonomy: Taxonomy, head_init: MultiRankHead | None,
                 model_cfg: ModelConfig, seed: int) -> FinetuneModel:
    """A copy of the backbone's network (classifier removed) plus the rank heads."""
    torch.manual_seed(int(seed))
    net = copy.deepcopy(bb.model).cpu()
    if int(getattr(net, "num_classes", 0) or 0) and hasattr(net, "reset_classifier"):
        net.reset_classifier(0)  # the rank heads replace any classifier of the backbone
    if head_init is not None:
        head = copy.deepcopy(head_init).cpu()
        if head.in_features != int(bb.num_features) or dict(head.n_classes) != taxonomy.sizes:
            raise ConfigError(f"finetune: head_init has in_features={head.in_features}, "
                              f"n_classes={dict(head.n_classes)}, but the backbone gives "
                              f"{bb.num_features}-d features and the taxonomy has "
                              f"{taxonomy.sizes}. Pass a head trained for this backbone and "
                              f"taxonomy, or none.")
    else:
        head = MultiRankHead.for_taxonomy(taxonomy, int(bb.num_features),
                                          hidden=model_cfg.hidden,
                                          dropout=float(model_cfg.dropout))
    return FinetuneModel(net, head, normalize=bool(model_cfg.normalize))


def datasets(bb: Backbone, s: FinetuneSettings, train: LabelledImages,
              val: LabelledImages, views: Any) -> tuple[ImageDataset, ImageDataset | None,
                                                        dict[str, Any] | None]:
    """The training set (the images, then ``tile_views`` tile-like passes of them), the
    validation set (eval transform) and the view settings used."""
    from timm.data import create_transform

    n_views = int(s.tile_views)
    train_tf = (create_transform(**bb.data_config, is_training=True) if s.augment
                else bb.transform)
    view_tf = view_settings = None
    if n_views:
        view_tf = TileViewTransform(views, bb.transform)
        view_settings = view_tf.settings.to_dict()
    train_ds = ImageDataset(list(train.paths) * (1 + n_views),
                            {r: np.tile(v, 1 + n_views) for r, v in train.targets.items()},
                            train_tf, seed=int(s.seed), view_transform=view_tf,
                            n_plain=len(train.paths))
    val_ds = ImageDataset(val.paths, val.targets, bb.transform) if val.paths else None
    return train_ds, val_ds, view_settings
