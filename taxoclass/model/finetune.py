"""End-to-end fine-tuning: a timm backbone and the rank heads trained together on images.

The cheap path trains heads on cached embeddings (:mod:`taxoclass.training`); this one
updates the backbone too, which is what a GPU is for. What it does:

* images opened with :func:`taxoclass.io.images.load_image`; training augmentation from
  timm's data config (``create_transform(**data_config, is_training=True)``),
  validation with the backbone's eval transform (the one embeddings are made with);
* ``unfreeze_blocks``: -1 trains everything, 0 only the heads, N the last N blocks
  (ViT ``blocks`` / CNN stages ``blocks`` or ``stages``) plus the final norms and the
  heads; frozen modules stay in eval mode, so BatchNorm statistics do not drift either;
* layer-wise learning-rate decay: heads and final norms at ``lr``, the last block at
  ``lr * layer_decay``, the one below at ``lr * layer_decay**2``, ..., the stem at
  ``lr * layer_decay**(n_blocks + 1)``;
* gradient accumulation (``accum_steps`` micro-batches per optimizer step, each loss
  weighted by its share of the step's images), AdamW, warmup then cosine decay per
  optimizer step, gradient clipping, bf16 autocast on CUDA (fp32 on CPU);
* early stopping on validation loss, best weights kept;
* resumable: an atomic checkpoint (model, optimizer, scheduler, RNG states, position in
  the epoch, history) after every epoch, every ``checkpoint_steps`` optimizer steps and
  when ``max_steps`` is reached. Data order is a function of (seed, epoch) and every
  image's augmentation a function of (seed, epoch, image), so a resumed run ends with
  the same weights as an uninterrupted one.

At the end it writes a model bundle: ``backbone.pth`` (the fine-tuned backbone as a
plain timm state dict, which :func:`~taxoclass.features.backbones.create_backbone` reads with
``torch.load(weights_only=True)``; it does not read safetensors) named as the recipe's
``checkpoint``, plus the head through :meth:`ModelBundle.save` (safetensors).
"""

from __future__ import annotations

import copy
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import FinetuneSettings
from ..errors import ConfigError, ImageError
from ..io.files import atomic_write
from ..io.images import load_image
from ..taxonomy.tree import Taxonomy
from .heads import HierarchicalClassifier, MultiRankHead
from .losses import ClassDependencyLoss, class_balanced_weights

__all__ = [
    "FINETUNE_DEFAULTS",
    "FinetuneModel",
    "FinetuneResult",
    "FinetuneSettings",
    "ImageDataset",
    "embed_images",
    "finetune",
    "finetune_from_config",
    "layerwise_param_groups",
    "set_trainable",
]

Progress = Callable[[int, int], None]
Callback = Callable[[dict[str, Any]], None]

STATE_DIR = "finetune_state"
LAST_CHECKPOINT = "last.pt"
BEST_WEIGHTS = "best.pt"
BACKBONE_FILE = "backbone.pth"
CHECKPOINT_VERSION = 1


FINETUNE_DEFAULTS: dict[str, Any] = asdict(FinetuneSettings())


# --------------------------------------------------------------------------- model
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


def _block_container(backbone: nn.Module) -> tuple[str, nn.Module]:
    for name in ("blocks", "stages"):
        mod = getattr(backbone, name, None)
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) > 0:
            return name, mod
    raise ConfigError(
        f"Backbone {type(backbone).__name__} has no 'blocks' or 'stages' sequence, so blocks "
        f"cannot be unfrozen one by one or given their own learning rate. Fix: set "
        f"finetune.unfreeze_blocks to -1 or 0 and finetune.layer_decay to 1.0, or use a "
        f"ViT / EfficientNet / ConvNeXt backbone.")


def _backbone_layout(backbone: nn.Module) -> tuple[str, int, dict[str, str]]:
    """(block container name, number of blocks, top-level child -> 'stem' | 'top')."""
    name, blocks = _block_container(backbone)
    where, seen = {}, False
    for child in backbone._modules:
        if child == name:
            seen = True
            continue
        where[child] = "top" if seen else "stem"
    return name, len(blocks), where


def _param_place(param_name: str, container: str, where: Mapping[str, str]) -> tuple[str, int]:
    """('stem'|'block'|'top', block index or -1) for a backbone parameter name."""
    first, _, rest = param_name.partition(".")
    if first == container:
        return "block", int(rest.split(".", 1)[0])
    if not rest:  # a parameter set directly on the model: cls/register tokens, pos_embed
        return "stem", -1
    return where.get(first, "top"), -1


def set_trainable(model: HierarchicalClassifier, unfreeze_blocks: int) -> list[str]:
    """Set ``requires_grad`` for ``unfreeze_blocks`` and return the frozen module names.

    -1: everything trains; 0: only the heads; N > 0: the last N blocks, the modules after
    them (final norms) and the heads. N >= the number of blocks trains every block but
    keeps the stem (patch / conv stem, tokens, position embedding) frozen.
    """
    for p in model.parameters():
        p.requires_grad_(True)
    n = int(unfreeze_blocks)
    if n == -1:
        return []
    if n == 0:
        model.freeze_backbone(True)
        return ["backbone"]
    bb = model.backbone
    container, n_blocks, where = _backbone_layout(bb)
    first_trained = max(n_blocks - n, 0)
    frozen: list[str] = []
    for pname, p in bb.named_parameters():
        place, idx = _param_place(pname, container, where)
        if place == "stem" or (place == "block" and idx < first_trained):
            p.requires_grad_(False)
    frozen += [f"backbone.{c}" for c, w in where.items() if w == "stem"]
    frozen += [f"backbone.{container}.{i}" for i in range(first_trained)]
    return frozen


def layerwise_param_groups(model: HierarchicalClassifier, *, lr: float, layer_decay: float,
                           weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise learning-rate decay, trainable params only.

    Depth from the top: heads and final norms 0, last block 1, ..., first block
    ``n_blocks``, stem ``n_blocks + 1``; a group's lr is ``lr * layer_decay**depth``.
    Biases, 1-d weights (norms) and the backbone's ``no_weight_decay()`` tensors get no
    weight decay. Each group carries ``name`` and ``lr_scale``.
    """
    bb = model.backbone
    skip = set(bb.no_weight_decay()) if hasattr(bb, "no_weight_decay") else set()
    if float(layer_decay) == 1.0:
        try:
            container, n_blocks, where = _backbone_layout(bb)
        except ConfigError:
            container, n_blocks, where = "", 0, {}
    else:
        container, n_blocks, where = _backbone_layout(bb)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}

    def add(group: str, depth: int, pname: str, p: Tensor) -> None:
        if not p.requires_grad:
            return
        decay = p.ndim > 1 and pname not in skip and not pname.endswith(".bias")
        key = (group, decay)
        if key not in groups:
            scale = float(layer_decay) ** depth
            groups[key] = {"name": f"{group}{'' if decay else '/no_decay'}", "params": [],
                           "lr": float(lr) * scale, "lr_scale": scale,
                           "weight_decay": float(weight_decay) if decay else 0.0}
        groups[key]["params"].append(p)

    for pname, p in model.head.named_parameters():
        add("head", 0, pname, p)
    for pname, p in bb.named_parameters():
        if not container:
            add("backbone", 0, pname, p)
            continue
        place, idx = _param_place(pname, container, where)
        if place == "top":
            add("top", 0, pname, p)
        elif place == "block":
            add(f"{container}.{idx}", n_blocks - idx, pname, p)
        else:
            add("stem", n_blocks + 1, pname, p)
    return list(groups.values())


class _WarmupCosine:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``floor`` at ``total``."""

    def __init__(self, warmup: int, total: int, floor: float) -> None:
        self.warmup, self.total, self.floor = int(warmup), int(total), float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        t = min(max(step - self.warmup, 0) / span, 1.0)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------- data
class ImageDataset(torch.utils.data.Dataset):
    """(path, per-rank targets) pairs as ``(image, targets, index, error)``.

    With ``seed`` set, each image's random augmentation is drawn from generators seeded
    by (seed, epoch, index) and the caller's RNG states are restored afterwards, so the
    result does not depend on batching, worker count or resuming. An unreadable image
    yields ``error`` (the message) instead of raising, and is dropped by :func:`collate`.
    Items from ``n_plain`` on use ``view_transform`` instead of ``transform`` (the
    fine-tuning set repeats its images there to show them as tile-like views).
    """

    def __init__(self, paths: Sequence[str | Path], targets: Mapping[str, np.ndarray],
                 transform: Callable, *, seed: int | None = None,
                 view_transform: Callable | None = None, n_plain: int | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self.view_transform = view_transform
        self.n_plain = len(self.paths) if n_plain is None else int(n_plain)
        self.targets = {r: np.asarray(v, dtype=np.int64) for r, v in targets.items()}
        bad = {r: len(v) for r, v in self.targets.items() if len(v) != len(self.paths)}
        if bad:
            raise ValueError(f"ImageDataset: {len(self.paths)} images but targets of lengths "
                             f"{bad}; expected one target per image and rank.")
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        y = {r: int(v[i]) for r, v in self.targets.items()}
        try:
            img = load_image(self.paths[i])
        except ImageError as exc:
            return None, y, i, str(exc)
        transform = (self.transform if i < self.n_plain or self.view_transform is None
                     else self.view_transform)
        if self.seed is None:
            return transform(img), y, i, None
        s = (int(self.seed) * 1_000_003 + int(self.epoch)) * 10_000_019 + int(i)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s % (2**63))
            random.seed(s)
            try:
                x = transform(img)
            finally:
                random.setstate(py_state)
        return x, y, i, None


def collate(items):
    """Stack readable images; returns (images or None, targets, indices, failures)."""
    ok = [it for it in items if it[3] is None]
    failures = [(it[2], it[3]) for it in items if it[3] is not None]
    if not ok:
        return None, {}, [], failures
    x = torch.stack([it[0] for it in ok])
    ranks = ok[0][1].keys()
    y = {r: torch.tensor([it[1][r] for it in ok], dtype=torch.long) for r in ranks}
    return x, y, [it[2] for it in ok], failures


class TileViewTransform:
    """A fresh tile-like view of the image (:func:`taxoclass.features.views.tile_view`), then
    ``then`` (the backbone's evaluation transform).

    The view's random draws come from torch's generator, so :class:`ImageDataset`'s
    per-(seed, epoch, image) seeding makes them reproducible and resumable.
    """

    def __init__(self, settings: Any, then: Callable) -> None:
        from ..features.views import ViewSettings

        self.settings = (settings if isinstance(settings, ViewSettings)
                         else ViewSettings.from_mapping(settings))
        self.then = then

    def __call__(self, image):
        from ..features.views import tile_view

        seed = int(torch.randint(0, 2**62, (1,)))
        return self.then(tile_view(image, np.random.default_rng(seed), self.settings))


def embed_images(model: HierarchicalClassifier, paths: Sequence[str | Path], transform: Callable,
                 *, batch_size: int = 64, num_workers: int = 0,
                 device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Pooled embeddings of ``paths`` through ``model.forward_features`` (eval mode).

    Returns (embeddings ``[n, d]`` float32 with zero rows for unreadable images, ok mask).
    """
    dev = torch.device(device)
    ds = ImageDataset(paths, {}, transform)
    batches = [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds),
                                                                          batch_size)]
    dl = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=num_workers,
                                     collate_fn=collate, pin_memory=dev.type == "cuda")
    width = int(getattr(model.head, "in_features", 0)) if hasattr(model, "head") else 0
    emb = np.zeros((len(ds), width), dtype=np.float32)
    ok = np.zeros(len(ds), dtype=bool)
    model.eval()
    with torch.inference_mode():
        for x, _, idx, _ in dl:
            if x is None:
                continue
            x = x.to(dev, non_blocking=True)
            if dev.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    e = model.forward_features(x)
            else:
                e = model.forward_features(x)
            emb[idx] = e.float().cpu().numpy()
            ok[idx] = True
    return emb, ok


# --------------------------------------------------------------------------- checkpoints
def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh), mode="wb")


def _rng_states(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = states["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _state_to_cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


# --------------------------------------------------------------------------- result
@dataclass
class FinetuneResult:
    model: FinetuneModel              # best weights, eval mode, on the training device
    history: Any                      # pandas DataFrame: one row per epoch
    best_epoch: int
    steps: int                        # optimizer steps taken (over all resumed runs)
    completed: bool                   # False when paused by max_steps
    stopped_early: bool
    bundle_dir: Path | None           # written only when completed
    backbone_checkpoint: Path | None
    lr_groups: dict[str, float]       # group name -> peak learning rate
    frozen: list[str]
    resumed_from_step: int | None
    seconds: float
    images_per_second: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, error)

    @property
    def head(self) -> MultiRankHead:
        return self.model.head


# --------------------------------------------------------------------------- training
def _as_backbone(backbone: Any):
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


def _make_criterion(taxonomy: Taxonomy, y_train: Mapping[str, np.ndarray],
                    loss: Mapping[str, Any]) -> ClassDependencyLoss:
    class_weights = None
    if loss.get("class_balanced"):
        class_weights = {}
        for r in taxonomy.ranks:
            y = np.asarray(y_train[r])
            counts = np.bincount(y[y >= 0], minlength=taxonomy.n_classes(r))
            class_weights[r] = class_balanced_weights(
                counts, float(loss.get("class_balanced_beta", 0.999)))
    return ClassDependencyLoss(taxonomy, rank_weights=loss.get("rank_weights"),
                               dependency_weight=float(loss.get("dependency_weight", 1.0)),
                               class_weights=class_weights,
                               label_smoothing=float(loss.get("label_smoothing", 0.0)))


def _check_targets(name: str, paths: Sequence, y: Mapping[str, np.ndarray] | None,
                   taxonomy: Taxonomy) -> dict[str, np.ndarray]:
    y = dict(y or {})
    missing = [r for r in taxonomy.ranks if r not in y]
    if missing and len(paths):
        raise ValueError(f"finetune: {name} targets lack rank(s) {missing}; expected a class "
                         f"index array (-1 = unknown) for every rank {taxonomy.ranks}.")
    out = {r: np.asarray(y.get(r, np.zeros(0)), dtype=np.int64) for r in taxonomy.ranks}
    for r, v in out.items():
        if len(v) != len(paths):
            raise ValueError(f"finetune: {len(paths)} {name} images but {len(v)} {r} targets.")
        if len(v) and (v.max() >= taxonomy.n_classes(r) or v.min() < -1):
            raise ValueError(f"finetune: {name} {r} targets must lie in [-1, "
                             f"{taxonomy.n_classes(r) - 1}], found [{v.min()}, {v.max()}].")
    return out


def finetune(train_paths: Sequence[str | Path], y_train: Mapping[str, np.ndarray],
             val_paths: Sequence[str | Path] | None, y_val: Mapping[str, np.ndarray] | None,
             taxonomy: Taxonomy, *, backbone: Any, out_dir: str | Path,
             config: Mapping[str, Any] | FinetuneSettings | None = None,
             head_init: MultiRankHead | None = None, model: Mapping[str, Any] | None = None,
             loss: Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
             decode_method: str = "path", extra: Mapping[str, Any] | None = None,
             progress: Progress | None = None,
             callback: Callback | None = None,
             views: Mapping[str, Any] | Any | None = None) -> FinetuneResult:
    """Fine-tune ``backbone`` and rank heads end to end on images; write a bundle.

    ``y_train`` / ``y_val``: class index per rank and image (-1 where the label stops
    above that rank), as :func:`taxoclass.pipelines.jobs._targets` makes them. ``backbone``:
    a :class:`~taxoclass.features.backbones.Backbone` (its model is copied, not changed), a
    model name or a backbone config mapping. ``config``: the ``finetune`` section;
    ``model`` / ``loss``: the sections of the same names (head ``hidden``/``dropout``/
    ``normalize``; loss weights). ``head_init``: a head to start from, e.g. one trained on
    cached embeddings (it must have been trained with the same ``normalize``).
    ``progress(step, total_steps)`` is called after each optimizer step, ``callback``
    with a dict after each step (``event="step"``) and epoch (``event="epoch"``);
    an exception raised there aborts the run, which then resumes from the last
    checkpoint in ``out_dir/finetune_state``. ``views``: the ``augment`` section (or a
    :class:`~taxoclass.features.views.ViewSettings`) for ``tile_views``: each epoch then shows
    every training image once as usual and ``tile_views`` more times as a freshly drawn
    tile-like view (rotated, rescaled, cut by the border, on a background), followed by
    the evaluation transform: a backbone for plot tiles.
    """
    import pandas as pd

    s = config if isinstance(config, FinetuneSettings) else FinetuneSettings.from_mapping(config)
    s.validate()
    model_cfg = dict(model or {})
    loss_cfg = dict(loss or {})
    normalize = bool(model_cfg.get("normalize", True))
    out = Path(out_dir)
    state_dir = out / STATE_DIR
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    val_paths = list(val_paths or [])
    y_train = _check_targets("train", train_paths, y_train, taxonomy)
    y_val = _check_targets("validation", val_paths, y_val, taxonomy)
    if len(train_paths) == 0:
        raise ValueError("finetune: no training images.")
    t_start = time.perf_counter()

    bb = _as_backbone(backbone)
    torch.manual_seed(int(s.seed))
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
                                          hidden=model_cfg.get("hidden"),
                                          dropout=float(model_cfg.get("dropout", 0.0)))
    clf = FinetuneModel(net, head, normalize=normalize)
    frozen = set_trainable(clf, int(s.unfreeze_blocks))
    frozen_modules = [clf.get_submodule(n) for n in frozen]
    clf.to(dev)
    if bb.channels_last and on_cuda:
        clf.to(memory_format=torch.channels_last)
    groups = layerwise_param_groups(clf, lr=float(s.lr), layer_decay=float(s.layer_decay),
                                    weight_decay=float(s.weight_decay))
    lr_groups = {g["name"]: g["lr"] for g in groups}
    try:
        opt = torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device/dtype
        opt = torch.optim.AdamW(groups, foreach=True)

    n_train = len(train_paths)
    n_views = int(s.tile_views)
    n_items = n_train * (1 + n_views)  # the images, then n_views tile-like passes of them
    bs, accum = int(s.batch_size), int(s.accum_steps)
    n_micro = math.ceil(n_items / bs)
    steps_per_epoch = math.ceil(n_micro / accum)
    total_steps = steps_per_epoch * int(s.epochs)
    warmup = round(float(s.warmup_epochs) * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _WarmupCosine(min(warmup, total_steps), total_steps, float(s.min_lr_ratio)))
    criterion = _make_criterion(taxonomy, y_train, loss_cfg).to(dev)

    from timm.data import create_transform

    train_tf = (create_transform(**bb.data_config, is_training=True) if s.augment
                else bb.transform)
    view_tf = view_settings = None
    if n_views:
        view_tf = TileViewTransform(views, bb.transform)
        view_settings = view_tf.settings.to_dict()
    train_ds = ImageDataset(list(train_paths) * (1 + n_views),
                            {r: np.tile(v, 1 + n_views) for r, v in y_train.items()},
                            train_tf, seed=int(s.seed), view_transform=view_tf,
                            n_plain=n_train)
    val_ds = ImageDataset(val_paths, y_val, bb.transform) if val_paths else None

    signature = {"n_train": n_train, "n_val": len(val_paths), "sizes": taxonomy.sizes,
                 "views": view_settings,
                 "backbone": bb.name, "settings": {k: v for k, v in asdict(s).items() if k not in
                                                   ("max_steps", "checkpoint_steps", "resume",
                                                    "keep_checkpoints", "num_workers",
                                                    "compile")}}
    # Training state; a checkpoint restores all of it.
    epoch, micro_done, step = 0, 0, 0
    epoch_loss, epoch_seen = 0.0, 0
    best = {"score": float("inf"), "epoch": 0, "bad": 0}
    history: list[dict[str, Any]] = []
    failures: dict[int, str] = {}
    finished, stopped_early = False, False
    resumed_from: int | None = None
    ckpt_path = state_dir / LAST_CHECKPOINT
    if s.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("version") != CHECKPOINT_VERSION or ck.get("signature") != signature:
            raise ConfigError(
                f"{ckpt_path}: checkpoint of another run (data, taxonomy, backbone or finetune "
                f"settings differ: saved {ck.get('signature')}, now {signature}). Fix: use a new "
                f"output folder, delete {state_dir}, or set finetune.resume to false.")
        clf.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        epoch, micro_done, step = int(ck["epoch"]), int(ck["micro_done"]), int(ck["step"])
        epoch_loss, epoch_seen = float(ck["epoch_loss"]), int(ck["epoch_seen"])
        best = dict(ck["best"])
        history = [dict(r) for r in ck["history"]]
        failures = {int(k): str(v) for k, v in ck["failures"].items()}
        finished, stopped_early = bool(ck["finished"]), bool(ck["stopped_early"])
        _set_rng_states(ck["rng"], dev)
        resumed_from = step
    elif state_dir.exists():
        shutil.rmtree(state_dir)

    def save_checkpoint() -> None:
        _atomic_torch_save({
            "version": CHECKPOINT_VERSION, "signature": signature,
            "model": clf.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "epoch": epoch, "micro_done": micro_done,
            "step": step, "epoch_loss": epoch_loss, "epoch_seen": epoch_seen, "best": best,
            "history": history, "failures": {str(k): v for k, v in failures.items()},
            "finished": finished, "stopped_early": stopped_early, "rng": _rng_states(dev),
        }, ckpt_path)

    runner: nn.Module = clf
    if s.compile and on_cuda:
        runner = torch.compile(clf)

    def set_train_mode() -> None:
        clf.train()
        for m in frozen_modules:
            m.eval()

    def forward(x: Tensor) -> dict[str, Tensor]:
        x = x.to(dev, non_blocking=True)
        if bb.channels_last and on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        if on_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = runner(x)
        else:
            out = runner(x)
        return {r: v.float() for r, v in out.items()}

    def loader(ds, batches):
        return torch.utils.data.DataLoader(
            ds, batch_sampler=batches, num_workers=int(s.num_workers), collate_fn=collate,
            pin_memory=on_cuda, persistent_workers=False)

    def validate() -> dict[str, float]:
        clf.eval()
        n, total = 0, 0.0
        correct = {r: 0 for r in taxonomy.ranks}
        labelled = {r: 0 for r in taxonomy.ranks}
        batches = [list(range(i, min(i + bs, len(val_ds)))) for i in range(0, len(val_ds), bs)]
        with torch.inference_mode():
            for x, y, idx, fails in loader(val_ds, batches):
                for i, msg in fails:
                    failures[-1 - i] = msg
                if x is None:
                    continue
                logits = forward(x)
                y = {r: v.to(dev) for r, v in y.items()}
                total += float(criterion(logits, y)) * len(idx)
                n += len(idx)
                for r in taxonomy.ranks:
                    mask = y[r] >= 0
                    labelled[r] += int(mask.sum())
                    correct[r] += int((logits[r].argmax(1)[mask] == y[r][mask]).sum())
        row = {"val_loss": total / max(n, 1)}
        row.update({f"val_{r}_acc": correct[r] / labelled[r] for r in taxonomy.ranks
                    if labelled[r]})
        return row

    images_seen = 0
    paused = False
    while not finished and epoch < int(s.epochs):
        train_ds.epoch = epoch
        gen = torch.Generator().manual_seed(int(s.seed) * 7_919 + epoch)
        order = torch.randperm(n_items, generator=gen).tolist()
        micro = [order[i:i + bs] for i in range(0, n_items, bs)]
        set_train_mode()
        t_epoch = time.perf_counter()
        it = iter(loader(train_ds, micro[micro_done:]))
        while micro_done < n_micro:
            if s.max_steps is not None and step >= int(s.max_steps):
                paused = True  # resumed with the same max_steps: nothing more to do
                break
            group_end = min((micro_done // accum + 1) * accum, n_micro)
            batches = [next(it) for _ in range(group_end - micro_done)]
            for _x, _, _, fails in batches:
                for i, msg in fails:
                    failures[i % n_train] = msg  # an image fails in each of its passes
            n_group = sum(len(b[2]) for b in batches)
            opt.zero_grad(set_to_none=True)
            group_loss = 0.0
            for x, y, idx, _ in batches:
                if x is None:
                    continue
                logits = forward(x)
                value = criterion(logits, {r: v.to(dev) for r, v in y.items()})
                (value * (len(idx) / n_group)).backward()
                group_loss += float(value.detach()) * len(idx)
            micro_done = group_end
            if n_group:
                if s.grad_clip:
                    params = [p for g in opt.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, float(s.grad_clip))
                opt.step()
            sched.step()
            step += 1
            images_seen += n_group
            epoch_loss += group_loss
            epoch_seen += n_group
            if progress:
                progress(step, total_steps)
            if callback:
                callback({"event": "step", "step": step, "epoch": epoch + 1,
                          "loss": group_loss / max(n_group, 1),
                          "lr": opt.param_groups[0]["lr"]})
            at_limit = s.max_steps is not None and step >= int(s.max_steps)
            if micro_done < n_micro and (at_limit or (s.checkpoint_steps and
                                                      step % int(s.checkpoint_steps) == 0)):
                save_checkpoint()
            if at_limit and micro_done < n_micro:
                paused = True
                break
        if paused:
            break
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": epoch_loss / max(epoch_seen, 1)}
        if val_ds is not None:
            row.update(validate())
            score = row["val_loss"]
        else:
            score = row["train_loss"]
        row["lr"] = opt.param_groups[0]["lr"]
        row["seconds"] = time.perf_counter() - t_epoch
        history.append(row)
        epoch += 1
        micro_done, epoch_loss, epoch_seen = 0, 0.0, 0
        if score < best["score"] - 1e-6 or val_ds is None or not s.patience:
            best = {"score": score, "epoch": epoch, "bad": 0}
            _atomic_torch_save(clf.state_dict(), state_dir / BEST_WEIGHTS)
        else:
            best["bad"] += 1
        if s.patience and val_ds is not None and best["bad"] >= int(s.patience):
            stopped_early = True
        finished = stopped_early or epoch >= int(s.epochs)
        save_checkpoint()
        if callback:
            callback({"event": "epoch", **row})
        if s.max_steps is not None and step >= int(s.max_steps) and not finished:
            paused = True
            break

    seconds = time.perf_counter() - t_start
    fail_list = [(train_paths[i] if i >= 0 else val_paths[-1 - i], msg)
                 for i, msg in sorted(failures.items())]
    result = FinetuneResult(
        model=clf, history=pd.DataFrame(history), best_epoch=int(best["epoch"]), steps=step,
        completed=not paused, stopped_early=stopped_early, bundle_dir=None,
        backbone_checkpoint=None, lr_groups=lr_groups, frozen=frozen,
        resumed_from_step=resumed_from, seconds=seconds,
        images_per_second=images_seen / max(seconds, 1e-9), failures=fail_list)
    if paused:
        clf.eval()
        return result
    if (state_dir / BEST_WEIGHTS).is_file():
        clf.load_state_dict(torch.load(state_dir / BEST_WEIGHTS, map_location=dev,
                                       weights_only=True))
    clf.eval()
    _write_bundle(result, out, bb=bb, taxonomy=taxonomy, settings=s,
                  decode_method=decode_method, extra=extra, views=view_settings)
    if not s.keep_checkpoints:
        shutil.rmtree(state_dir, ignore_errors=True)
    return result


def _write_bundle(result: FinetuneResult, out: Path, *, bb, taxonomy: Taxonomy,
                  settings: FinetuneSettings, decode_method: str,
                  extra: Mapping[str, Any] | None, views: Mapping[str, Any] | None = None
                  ) -> None:
    from ..bundle import ModelBundle
    from ..io.files import atomic_write_csv

    clf = result.model
    backbone_file = out / BACKBONE_FILE
    _atomic_torch_save(_state_to_cpu(clf.backbone.state_dict()), backbone_file)
    head = copy.deepcopy(clf.head).cpu().eval()
    recipe = {"name": bb.name, "checkpoint": backbone_file.name, "pretrained": False,
              "class_mapping": None, "model_kwargs": dict(bb.model_kwargs or {}),
              "data_overrides": dict(bb.data_overrides or {}), "finetuned": True,
              "base_checkpoint": bb.checkpoint,
              "base_weights_source": bb.weights_source, "base_description": bb.describe()}
    info = {"settings": asdict(settings), "views": views, "best_epoch": result.best_epoch,
            "steps": result.steps, "stopped_early": result.stopped_early,
            "lr_groups": result.lr_groups, "frozen": result.frozen}
    bundle = ModelBundle(head=head, taxonomy=taxonomy, backbone=recipe,
                         normalize=clf.normalize, decode_method=decode_method,
                         extra={**dict(extra or {}), "finetune": info,
                                "best_epoch": result.best_epoch})
    bundle.save(out)
    atomic_write_csv(out / "history.csv", result.history)
    result.bundle_dir = out
    result.backbone_checkpoint = backbone_file


# --------------------------------------------------------------------------- config job
def _probe_head(cfg: Mapping[str, Any], rows, y: Mapping[str, np.ndarray], train: np.ndarray,
                taxonomy: Taxonomy, embed_progress: Progress | None = None) -> MultiRankHead:
    """Heads trained on the frozen backbone's embeddings of the ``train`` rows (and their
    tile-like views when ``augment.views_per_image > 0``) with the config's ``train``
    settings: the linear-probe start of LP-FT, from the same caches `taxoclass train`
    uses. Rows without an embedding (unreadable images) are left out."""
    from ..pipelines.data import config_embeddings, view_embeddings, with_views
    from .training import train_head

    x, found, _ = config_embeddings(dict(cfg), rows, progress=embed_progress)
    tr = train & found
    tr_idx = np.flatnonzero(tr)
    xv, src = view_embeddings(dict(cfg), rows.iloc[tr_idx].reset_index(drop=True),
                              progress=embed_progress)
    x_tr, y_tr = with_views(x, dict(y), tr, (xv, tr_idx[src]))
    return train_head(x_tr, y_tr, None, None, taxonomy, model=cfg["model"], loss=cfg["loss"],
                      train=cfg["train"],
                      normalize_inputs=bool(cfg["model"].get("normalize", True))).head


def _detector_views(cfg: Mapping[str, Any], rows, settings: FinetuneSettings):
    """Tile-like view files of the training ``rows`` for the outlier detector of a model
    trained for plots (``augment.views_per_image`` views each, or ``tile_views`` when only
    those are set; the same files the probe heads use), as (frame of view files, index
    into ``rows`` of each view's source); None when the config makes no views."""
    from ..features.views import ViewSettings, write_views
    from ..pipelines.data import embedding_cache

    section = _view_section(cfg)
    n = int(section.get("views_per_image", 0) or 0) or int(settings.tile_views)
    if n == 0 or not len(rows):
        return None
    folder = (dict(cfg.get("augment") or {}).get("dir")
              or f"{embedding_cache(dict(cfg))}-views")
    ids = [str(i) for i in rows["image_id"]]
    frame = write_views(list(zip(ids, rows["path"].tolist())), folder,
                        ViewSettings.from_mapping({**section, "views_per_image": n}))
    index = {i: k for k, i in enumerate(ids)}
    return frame, np.array([index[str(i)] for i in frame["source_id"]], dtype=int)


def _view_section(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config's ``augment`` section as view settings (``dir`` is where the cheap path
    writes its view files; fine-tuning draws fresh views in memory instead)."""
    return {k: v for k, v in dict(cfg.get("augment") or {}).items() if k != "dir"}


def finetune_from_config(cfg: Mapping[str, Any], *, progress: Progress | None = None,
                         device: str | None = None,
                         embed_progress: Progress | None = None) -> Path:
    """``taxoclass train --finetune``: fine-tune as configured and write the bundle.

    Uses the ``data``, ``backbone``, ``model``, ``loss``, ``decode`` and ``out`` sections
    like :func:`~taxoclass.pipelines.jobs.train_from_config` (same split rules) plus the
    ``finetune`` section. Writes ``split.csv``, ``metrics_val.json``, ``failures.csv``
    (unreadable images, if any) and ``provenance.json`` beside the bundle; the
    validation metrics come from the written bundle on embeddings of the fine-tuned
    backbone. As for heads on cached embeddings, ``data.holdout_species`` are left out
    and (``openset.enabled``) the outlier detector and the back-off thresholds are
    fitted, on embeddings of the training and validation images by the fine-tuned
    backbone.
    """
    import pandas as pd

    from ..config import openset_calibration
    from ..features.backbones import backbone_from_spec, backbone_spec
    from ..io.files import atomic_write_csv, atomic_write_json
    from ..io.provenance import write_provenance
    from ..pipelines.data import known_rows, require_training_settings, validation_mask
    from ..pipelines.openset_fit import fit_openset_scorer
    from ..taxonomy.labels import encode_labels as _targets
    from ..taxonomy.annotations import load_annotations

    cfg = dict(cfg)
    data = require_training_settings(cfg)
    if openset_calibration(cfg.get("openset"))[0] == "crossfit":
        raise ConfigError("openset.calibration: crossfit is not supported with `train "
                          "--finetune` (it would fine-tune the backbone once per fold). Fix: "
                          "--set openset.calibration=holdout.")
    settings = FinetuneSettings.from_mapping(cfg.get("finetune"))
    out = Path(cfg["out"])
    root = Path(data.get("images_root") or Path(data["annotations"]).parent)
    ann = load_annotations(data["annotations"])
    tax, rows = known_rows(ann, ann.labelled_images(root), data)
    y, nodes = _targets(tax, rows)
    ids = [str(i) for i in rows["image_id"]]
    is_val = validation_mask(ids, nodes, data)
    paths = np.asarray(rows["path"].tolist(), dtype=object)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bcfg = cfg["backbone"]
    bb = backbone_from_spec(backbone_spec(bcfg))
    head_init = (_probe_head(cfg, rows, y, ~is_val, tax, embed_progress)
                 if settings.probe_head else None)
    result = finetune(list(paths[~is_val]), {r: v[~is_val] for r, v in y.items()},
                      list(paths[is_val]), {r: v[is_val] for r, v in y.items()}, tax,
                      backbone=bb, out_dir=out, config=settings, model=cfg.get("model"),
                      loss=cfg.get("loss"), device=dev,
                      decode_method=cfg.get("decode", {}).get("method", "path"),
                      extra={"annotations": str(Path(data["annotations"]).resolve())},
                      progress=progress, views=_view_section(cfg), head_init=head_init)
    if not result.completed:
        return out
    atomic_write_csv(out / "split.csv", pd.DataFrame(
        {"image_id": ids, "split": np.where(is_val, "val", "train")}))
    if result.failures:
        atomic_write_csv(out / "failures.csv", pd.DataFrame(result.failures,
                                                            columns=["path", "error"]))
    from ..bundle import ModelBundle
    from .metrics import evaluate_predictions

    metrics: dict[str, Any] = {}
    if is_val.any():
        bundle = ModelBundle.load(out)

        def embed(mask):
            return embed_images(result.model, list(paths[mask]), bb.transform,
                                batch_size=settings.batch_size,
                                num_workers=settings.num_workers, device=dev)

        x_val, ok = embed(is_val)
        decoded = bundle.predict_embeddings(x_val[ok], top_k=int(
            cfg.get("decode", {}).get("top_k", 5)))
        metrics = evaluate_predictions(decoded.path, {r: v[is_val][ok] for r, v in y.items()},
                                       tax, topk_index=decoded.topk_index)
        ocfg = cfg.get("openset") or {}
        if ocfg.get("enabled", True):
            x_tr, ok_tr = embed(~is_val)
            lowest = tax.ranks[-1]
            x_det = x_tr[ok_tr]
            y_det = {r: v[~is_val][ok_tr] for r, v in y.items()}
            # A model for plot tiles: the detector also learns what tile-like views of
            # the training images look like, or every tile of a plot would be "unknown".
            views = _detector_views(cfg, rows[~is_val].reset_index(drop=True), settings)
            if views is not None:
                frame, src = views
                xv, okv = embed_images(result.model, frame["path"].tolist(), bb.transform,
                                       batch_size=settings.batch_size,
                                       num_workers=settings.num_workers, device=dev)
                keep = okv & ok_tr[src]
                x_det = np.concatenate([x_det, xv[keep]])
                y_det = {r: np.concatenate([y_det[r], v[~is_val][src[keep]]])
                         for r, v in y.items()}
            bundle.scorer = fit_openset_scorer(
                bundle, x_det, y_det["genus"], x_val[ok],
                rows[is_val].reset_index(drop=True)[ok], ocfg, species_train=y_det[lowest])
            bundle.save(out)
            metrics["openset_thresholds"] = bundle.scorer.thresholds.to_dict()
    metrics["best_epoch"] = result.best_epoch
    atomic_write_json(out / "metrics_val.json", metrics)
    write_provenance(out, config=cfg, backbone=bb.describe(), extra={
        "finetune": {"best_epoch": result.best_epoch, "steps": result.steps,
                     "stopped_early": result.stopped_early, "seconds": result.seconds,
                     "images_per_second": result.images_per_second,
                     "n_train": int((~is_val).sum()), "n_val": int(is_val.sum())}})
    return out
