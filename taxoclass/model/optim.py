"""Optimiser pieces for fine-tuning, built on timm: trainable blocks, layer-wise learning-rate
decay (:func:`timm.optim.param_groups_layer_decay`), AdamW and warm-up + cosine schedule
(:class:`timm.scheduler.CosineLRScheduler`).

Layers are timm's coarse layer groups of the backbone (``group_matcher(coarse=True)``: the
stem, then one layer per ViT block or CNN stage, the final norms sharing the last block's
layer as in timm) and, on top at the full learning rate, the rank heads together with any
backbone module timm leaves unmatched (a ConvNeXt's ``head.norm``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .heads import HierarchicalClassifier

__all__ = ["adamw", "check_layer_decay", "frozen_modules", "layer_decay_param_groups",
           "layer_ids", "set_trainable", "warmup_cosine"]


def layer_ids(model: HierarchicalClassifier) -> dict[str, int]:
    """Parameter name -> timm layer id (0: stem, ..., highest: the rank heads)."""
    from timm.models import group_parameters

    return group_parameters(model, model.group_matcher(), reverse=True)


def set_trainable(model: HierarchicalClassifier, unfreeze_blocks: int) -> list[str]:
    """Set ``requires_grad`` for ``unfreeze_blocks`` and return the frozen module names.

    -1: everything trains; 0: only the heads; N > 0: the last N blocks (ViT blocks, CNN
    stages), the final norms and the heads. N >= the number of blocks trains every block but
    keeps the stem (patch / conv stem, tokens, position embedding) frozen. The names are the
    largest modules whose parameters are all frozen (to be kept in eval mode).
    """
    for p in model.parameters():
        p.requires_grad_(True)
    n = int(unfreeze_blocks)
    if n == -1:
        return []
    if n == 0:
        model.freeze_backbone(True)
        return ["backbone"]
    ids = layer_ids(model)
    top = max(ids.values())
    first_trained = max(top - n, 1)
    for name, p in model.named_parameters():
        p.requires_grad_(ids[name] >= first_trained)
    return frozen_modules(model)


def frozen_modules(model: nn.Module) -> list[str]:
    """Names of the largest submodules that have parameters, all of them frozen."""
    frozen: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{f}.") for f in frozen):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.append(name)
    return frozen


def layer_decay_param_groups(model: HierarchicalClassifier, *, layer_decay: float,
                             weight_decay: float) -> list[dict[str, Any]]:
    """timm's layer-decay parameter groups of the trainable parameters, each named.

    A group's ``lr_scale`` is ``layer_decay ** (top - layer)``: 1 for the heads, one factor
    per block below them, the stem lowest. Biases, other 1-d tensors and the backbone's
    ``no_weight_decay()`` tensors (tokens, position embedding) get no weight decay. The
    groups carry no ``lr``: the optimiser's default and the scheduler (which multiplies by
    ``lr_scale``) set it.
    """
    from timm.optim import param_groups_layer_decay

    skip = getattr(model.backbone, "no_weight_decay", None)
    no_wd = [f"backbone.{n}" for n in (skip() if callable(skip) else ())]
    groups = param_groups_layer_decay(model, weight_decay=float(weight_decay),
                                      no_weight_decay_list=no_wd,
                                      layer_decay=float(layer_decay))
    ids = layer_ids(model)
    top = max(ids.values())
    name_of = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        first = g["params"][0]
        layer = ids[name_of[id(first)]]
        decayed = first.ndim > 1 and name_of[id(first)] not in no_wd
        base = "head" if layer == top else "stem" if layer == 0 else f"layer{layer}"
        g["name"] = base if decayed else f"{base}/no_decay"
    return groups


def adamw(params: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for the parameters' device.

    On a CPU the default (a Python loop over tensors) takes ~90 ms per step for a
    7,806-species head, the fused step ~7 ms (bench/plantclef_scale_training.py).
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def warmup_cosine(opt: torch.optim.Optimizer, *, warmup: int, total: int, lr: float,
                  min_lr_ratio: float) -> Any:
    """timm's cosine schedule per optimizer step (call ``step_update(k)`` before step ``k``).

    Step ``k`` (0-based) of a group with peak ``lr * s`` runs at ``lr * s * (k + 1) / W``
    while ``k < W`` (linear warm-up over ``W = warmup`` steps, the last one at the peak),
    then at ``lr * s * (f + (1 - f) * (1 + cos(pi * t)) / 2)`` with
    ``t = min((k - W) / max(total - W, 1), 1)`` and ``f = min_lr_ratio``.
    """
    from timm.scheduler import CosineLRScheduler

    class WarmupCosine(CosineLRScheduler):
        """timm counts warm-up step ``k`` at ``k / W`` of the peak, reaching it at step
        ``W``; here step ``k < W`` trains at ``(k + 1) / W``, so no step runs at lr 0."""

        def _get_lr(self, t: int) -> list[float]:
            return super()._get_lr(t + 1 if t < self.warmup_t else t)

    total = max(int(total), 1)
    w = min(max(int(warmup), 0), total)
    sched = WarmupCosine(opt, t_initial=max(total - w, 1), lr_min=float(lr) * float(min_lr_ratio),
                         warmup_t=w, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    sched.step_update(0)
    return sched


def check_layer_decay(model: HierarchicalClassifier, layer_decay: float,
                      unfreeze_blocks: int) -> None:
    """A backbone without timm's ``group_matcher`` has no blocks to decay or unfreeze."""
    if hasattr(model.backbone, "group_matcher"):
        return
    if float(layer_decay) != 1.0 or int(unfreeze_blocks) > 0:
        raise ConfigError(
            f"Backbone {type(model.backbone).__name__} has no group_matcher(), so its blocks "
            f"cannot be unfrozen one by one or given their own learning rate. Fix: set "
            f"finetune.unfreeze_blocks to -1 or 0 and finetune.layer_decay to 1.0, or use a "
            f"ViT / EfficientNet / ConvNeXt backbone.")

