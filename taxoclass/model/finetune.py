"""End-to-end fine-tuning: a timm backbone and the rank heads trained together on images.

The cheap path trains heads on cached embeddings (:mod:`taxoclass.model.training`); this one
updates the backbone too, which is what a GPU is for. What it does:

* images opened with :func:`taxoclass.io.images.load_image`; training augmentation from
  timm's data config (``create_transform(**data_config, is_training=True)``),
  validation with the backbone's eval transform (the one embeddings are made with);
* ``unfreeze_blocks``: -1 trains everything, 0 only the heads, N the last N blocks
  (ViT blocks, CNN stages) plus the final norms and the heads; frozen modules stay in eval
  mode, so BatchNorm statistics do not drift either;
* layer-wise learning-rate decay with timm's ``param_groups_layer_decay``
  (:mod:`taxoclass.model.optim`): heads and final norms at ``lr``, the last block at
  ``lr * layer_decay``, ..., the stem at ``lr * layer_decay**(n_blocks + 1)``;
* gradient accumulation (``accum_steps`` micro-batches per optimizer step, each loss
  weighted by its share of the step's images), AdamW, timm's warm-up + cosine schedule per
  optimizer step, gradient clipping, bf16 autocast on CUDA (fp32 on CPU);
* early stopping on validation loss (:class:`~taxoclass.model.training.EarlyStopping`),
  best weights kept;
* resumable: an atomic checkpoint (model, optimizer, scheduler, RNG states, position in
  the epoch, history) after every epoch, every ``checkpoint_steps`` optimizer steps and
  when ``max_steps`` is reached. Data order is a function of (seed, epoch) and every
  image's augmentation a function of (seed, epoch, image), so a resumed run ends with
  the same weights as an uninterrupted one.

Writing the model bundle is the job's (:func:`taxoclass.pipelines.finetune.finetune_to_bundle`).
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import FinetuneSettings, ModelConfig
from ..errors import ConfigError
from ..taxonomy.tree import Taxonomy
from .checkpoint import atomic_torch_save, rng_states, set_rng_states
from .heads import HierarchicalClassifier, MultiRankHead
from .image_data import ImageDataset, LabelledImages, TileViewTransform, collate
from .losses import ClassDependencyLoss, criterion_from_config
from .optim import (
    adamw,
    check_layer_decay,
    layer_decay_param_groups,
    set_trainable,
    warmup_cosine,
)
from .training import EarlyStopping

if TYPE_CHECKING:
    import pandas as pd

    from ..features.backbones import Backbone

__all__ = ["FinetuneModel", "FinetuneResult", "FinetuneSettings", "LabelledImages", "finetune"]

Progress = Callable[[int, int], None]
Callback = Callable[[dict[str, Any]], None]

STATE_DIR = "finetune_state"
LAST_CHECKPOINT = "last.pt"
BEST_WEIGHTS = "best.pt"
CHECKPOINT_VERSION = 2  # 2: timm's scheduler state, early-stopping state under "best"
_UNSIGNED = ("max_steps", "checkpoint_steps", "resume", "keep_checkpoints", "num_workers",
             "compile")  # settings a resumed run may change


# --------------------------------------------------------------------------- inputs, outputs
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


@dataclass
class FinetuneResult:
    model: FinetuneModel              # best weights, eval mode, on the training device
    history: pd.DataFrame             # one row per epoch
    best_epoch: int
    steps: int                        # optimizer steps taken (over all resumed runs)
    completed: bool                   # False when paused by max_steps
    stopped_early: bool
    lr_groups: dict[str, float]       # group name -> peak learning rate
    frozen: list[str]
    resumed_from_step: int | None
    seconds: float
    images_per_second: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, error)
    backbone: Backbone | None = None  # the base backbone (recipe, transforms)
    settings: FinetuneSettings = field(default_factory=FinetuneSettings)
    views: dict[str, Any] | None = None  # the tile-view settings used, if any
    state_dir: Path | None = None     # checkpoints of this run
    bundle_dir: Path | None = None    # set by the job that writes the bundle
    backbone_checkpoint: Path | None = None

    @property
    def head(self) -> MultiRankHead:
        return self.model.head

    def discard_state(self) -> None:
        """Remove the run's checkpoints unless ``settings.keep_checkpoints``."""
        if self.state_dir is not None and not self.settings.keep_checkpoints:
            shutil.rmtree(self.state_dir, ignore_errors=True)


# --------------------------------------------------------------------------- building
def _as_backbone(backbone: Any) -> Backbone:
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


def _build_model(bb: Backbone, taxonomy: Taxonomy, head_init: MultiRankHead | None,
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


def _datasets(bb: Backbone, s: FinetuneSettings, train: LabelledImages,
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


@dataclass
class _State:
    """Everything a checkpoint restores besides model, optimizer, scheduler and RNGs."""

    epoch: int = 0
    micro_done: int = 0
    step: int = 0
    epoch_loss: float = 0.0
    epoch_seen: int = 0
    best: EarlyStopping = field(default_factory=EarlyStopping)
    history: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)  # image index (val: -1 - i) -> error
    finished: bool = False
    stopped_early: bool = False

    def to_checkpoint(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = {str(k): v for k, v in self.failures.items()}
        return d

    @classmethod
    def from_checkpoint(cls, d: Mapping[str, Any]) -> _State:
        return cls(epoch=int(d["epoch"]), micro_done=int(d["micro_done"]), step=int(d["step"]),
                   epoch_loss=float(d["epoch_loss"]), epoch_seen=int(d["epoch_seen"]),
                   best=EarlyStopping(**d["best"]), history=[dict(r) for r in d["history"]],
                   failures={int(k): str(v) for k, v in d["failures"].items()},
                   finished=bool(d["finished"]), stopped_early=bool(d["stopped_early"]))


# --------------------------------------------------------------------------- the run
class _Run:
    """One fine-tuning run: model, optimizer, schedule, data and the resumable state."""

    def __init__(self, clf: FinetuneModel, bb: Backbone, s: FinetuneSettings,
                 taxonomy: Taxonomy, train_ds: ImageDataset, val_ds: ImageDataset | None,
                 n_train: int, criterion: ClassDependencyLoss, device: torch.device) -> None:
        self.clf, self.bb, self.s, self.taxonomy = clf, bb, s, taxonomy
        self.train_ds, self.val_ds, self.n_train = train_ds, val_ds, n_train
        self.dev, self.on_cuda = device, device.type == "cuda"
        self.frozen = set_trainable(clf, int(s.unfreeze_blocks))
        self.frozen_modules = [clf.get_submodule(n) for n in self.frozen]
        clf.to(device)
        if bb.channels_last and self.on_cuda:
            clf.to(memory_format=torch.channels_last)
        groups = layer_decay_param_groups(clf, layer_decay=float(s.layer_decay),
                                          weight_decay=float(s.weight_decay))
        self.lr_groups = {g["name"]: float(s.lr) * g["lr_scale"] for g in groups}
        self.opt = adamw(groups, lr=float(s.lr))
        self.bs, self.accum = int(s.batch_size), int(s.accum_steps)
        self.n_items = len(train_ds)
        self.n_micro = math.ceil(self.n_items / self.bs)
        self.total_steps = math.ceil(self.n_micro / self.accum) * int(s.epochs)
        warmup = round(float(s.warmup_epochs) * math.ceil(self.n_micro / self.accum))
        self.sched = warmup_cosine(self.opt, warmup=warmup, total=self.total_steps,
                                   lr=float(s.lr), min_lr_ratio=float(s.min_lr_ratio))
        self.criterion = criterion.to(device)
        self.runner: nn.Module = torch.compile(clf) if s.compile and self.on_cuda else clf
        self.state = _State(best=EarlyStopping(patience=int(s.patience) if val_ds else 0))
        self.images_seen = 0

    # ---- checkpoints
    state_dir: Path
    signature: dict[str, Any]

    def restore(self) -> int:
        """Load the last checkpoint; returns the step it was taken at."""
        path, signature = self.state_dir / LAST_CHECKPOINT, self.signature
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck.get("version") != CHECKPOINT_VERSION or ck.get("signature") != signature:
            raise ConfigError(
                f"{path}: checkpoint of another run (data, taxonomy, backbone or finetune "
                f"settings differ: saved {ck.get('signature')}, now {signature}). Fix: use a "
                f"new output folder, delete {path.parent}, or set finetune.resume to false.")
        self.clf.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.state = _State.from_checkpoint(ck["state"])
        set_rng_states(ck["rng"], self.dev)
        return self.state.step

    def save(self) -> None:
        """Checkpoint everything a resumed run needs (atomically)."""
        atomic_torch_save({
            "version": CHECKPOINT_VERSION, "signature": self.signature,
            "model": self.clf.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "state": self.state.to_checkpoint(),
            "rng": rng_states(self.dev)}, self.state_dir / LAST_CHECKPOINT)

    # ---- forward passes
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = x.to(self.dev, non_blocking=True)
        if self.bb.channels_last and self.on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.on_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self.runner(x)
        else:
            out = self.runner(x)
        return {r: v.float() for r, v in out.items()}

    def loader(self, ds: ImageDataset, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            ds, batch_sampler=batches, num_workers=int(self.s.num_workers), collate_fn=collate,
            pin_memory=self.on_cuda, persistent_workers=False)

    def set_train_mode(self) -> None:
        self.clf.train()
        for m in self.frozen_modules:
            m.eval()

    def lr(self) -> float:
        """The heads' (highest) learning rate now."""
        return max(g["lr"] for g in self.opt.param_groups)

    def validate(self) -> dict[str, float]:
        """Validation loss and per-rank top-1 accuracy (ranks with a labelled image)."""
        self.clf.eval()
        ranks, ds, bs = self.taxonomy.ranks, self.val_ds, self.bs
        n, total = 0, 0.0
        correct = {r: 0 for r in ranks}
        labelled = {r: 0 for r in ranks}
        batches = [list(range(i, min(i + bs, len(ds)))) for i in range(0, len(ds), bs)]
        with torch.inference_mode():
            for x, y, idx, fails in self.loader(ds, batches):
                for i, msg in fails:
                    self.state.failures[-1 - i] = msg
                if x is None:
                    continue
                logits = self.forward(x)
                y = {r: v.to(self.dev) for r, v in y.items()}
                total += float(self.criterion(logits, y)) * len(idx)
                n += len(idx)
                for r in ranks:
                    mask = y[r] >= 0
                    labelled[r] += int(mask.sum())
                    correct[r] += int((logits[r].argmax(1)[mask] == y[r][mask]).sum())
        row = {"val_loss": total / max(n, 1)}
        row.update({f"val_{r}_acc": correct[r] / labelled[r] for r in ranks if labelled[r]})
        return row

    # ---- training
    def optimizer_step(self, batches: list[tuple]) -> tuple[float, int]:
        """One optimizer step over ``batches`` (micro-batches, each loss weighted by its
        share of the step's images); returns (summed loss, images)."""
        st = self.state
        for _x, _, _, fails in batches:
            for i, msg in fails:
                st.failures[i % self.n_train] = msg  # an image fails in each of its passes
        n_group = sum(len(b[2]) for b in batches)
        self.opt.zero_grad(set_to_none=True)
        group_loss = 0.0
        for x, y, idx, _ in batches:
            if x is None:
                continue
            value = self.criterion(self.forward(x), {r: v.to(self.dev) for r, v in y.items()})
            (value * (len(idx) / n_group)).backward()
            group_loss += float(value.detach()) * len(idx)
        if n_group:
            if self.s.grad_clip:
                params = [p for g in self.opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, float(self.s.grad_clip))
            self.opt.step()
        st.step += 1
        self.sched.step_update(st.step)
        return group_loss, n_group

    def train_epoch(self, progress: Progress | None, callback: Callback | None) -> bool:
        """Train (the rest of) the current epoch; True when paused by ``max_steps``."""
        s, st = self.s, self.state
        max_steps = None if s.max_steps is None else int(s.max_steps)
        self.train_ds.epoch = st.epoch
        gen = torch.Generator().manual_seed(int(s.seed) * 7_919 + st.epoch)
        order = torch.randperm(self.n_items, generator=gen).tolist()
        micro = [order[i:i + self.bs] for i in range(0, self.n_items, self.bs)]
        self.set_train_mode()
        it = iter(self.loader(self.train_ds, micro[st.micro_done:]))
        while st.micro_done < self.n_micro:
            if max_steps is not None and st.step >= max_steps:
                return True  # resumed with the same max_steps: nothing more to do
            group_end = min((st.micro_done // self.accum + 1) * self.accum, self.n_micro)
            batches = [next(it) for _ in range(group_end - st.micro_done)]
            group_loss, n_group = self.optimizer_step(batches)
            st.micro_done = group_end
            self.images_seen += n_group
            st.epoch_loss += group_loss
            st.epoch_seen += n_group
            if progress:
                progress(st.step, self.total_steps)
            if callback:
                callback({"event": "step", "step": st.step, "epoch": st.epoch + 1,
                          "loss": group_loss / max(n_group, 1), "lr": self.lr()})
            at_limit = max_steps is not None and st.step >= max_steps
            mid_epoch = st.micro_done < self.n_micro
            if mid_epoch and (at_limit or (s.checkpoint_steps
                                           and st.step % int(s.checkpoint_steps) == 0)):
                self.save()
            if at_limit and mid_epoch:
                return True
        return False

    def end_epoch(self, seconds_since: float, callback: Callback | None) -> None:
        """Validate, record the epoch, keep the best weights, checkpoint."""
        st = self.state
        row: dict[str, Any] = {"epoch": st.epoch + 1,
                               "train_loss": st.epoch_loss / max(st.epoch_seen, 1)}
        if self.val_ds is not None:
            row.update(self.validate())
            score = row["val_loss"]
        else:
            score = row["train_loss"]
        row["lr"] = self.lr()
        row["seconds"] = time.perf_counter() - seconds_since
        st.history.append(row)
        st.epoch += 1
        st.micro_done, st.epoch_loss, st.epoch_seen = 0, 0.0, 0
        if st.best.update(st.epoch, score):
            atomic_torch_save(self.clf.state_dict(), self.state_dir / BEST_WEIGHTS)
        st.stopped_early = st.best.should_stop(st.epoch)
        st.finished = st.stopped_early or st.epoch >= int(self.s.epochs)
        self.save()
        if callback:
            callback({"event": "epoch", **row})

    def run(self, progress: Progress | None, callback: Callback | None) -> bool:
        """Train until done, stopped early or paused; True when paused."""
        s, st = self.s, self.state
        while not st.finished and st.epoch < int(s.epochs):
            t_epoch = time.perf_counter()
            if self.train_epoch(progress, callback):
                return True
            self.end_epoch(t_epoch, callback)
            if s.max_steps is not None and st.step >= int(s.max_steps) and not st.finished:
                return True
        return False


# --------------------------------------------------------------------------- entry point
def finetune(train: LabelledImages, val: LabelledImages | None, taxonomy: Taxonomy, *,
             backbone: Any, out_dir: str | Path,
             settings: Mapping[str, Any] | FinetuneSettings | None = None,
             head_init: MultiRankHead | None = None,
             model: Mapping[str, Any] | ModelConfig | None = None,
             loss: Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
             progress: Progress | None = None, callback: Callback | None = None,
             views: Mapping[str, Any] | Any | None = None) -> FinetuneResult:
    """Fine-tune ``backbone`` and rank heads end to end on images (no bundle written).

    ``backbone``: a :class:`~taxoclass.features.backbones.Backbone` (its model is copied,
    not changed), a model name or a backbone config mapping. ``settings``: the ``finetune``
    section; ``model`` / ``loss``: the sections of the same names (head ``hidden``/
    ``dropout``/``normalize``; loss weights). ``head_init``: a head to start from, e.g. one
    trained on cached embeddings (with the same ``normalize``). ``progress(step,
    total_steps)`` is called after each optimizer step, ``callback`` with a dict after each
    step (``event="step"``) and epoch (``event="epoch"``); an exception raised there aborts
    the run, which then resumes from the last checkpoint in ``out_dir/finetune_state``.
    ``views``: the ``augment`` section (or a :class:`~taxoclass.features.views.ViewSettings`)
    for ``tile_views``: each epoch then shows every training image once as usual and
    ``tile_views`` more times as a freshly drawn tile-like view, followed by the evaluation
    transform: a backbone for plot tiles. The result holds the best weights when completed;
    its checkpoints stay until :meth:`FinetuneResult.discard_state`.
    """
    import pandas as pd

    s = (settings if isinstance(settings, FinetuneSettings)
         else FinetuneSettings.from_mapping(settings))
    s.validate()
    mcfg = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model)
    train = train.checked("train", taxonomy)
    val = (val or LabelledImages([])).checked("validation", taxonomy)
    if not train.paths:
        raise ValueError("finetune: no training images.")
    t_start = time.perf_counter()
    bb = _as_backbone(backbone)
    clf = _build_model(bb, taxonomy, head_init, mcfg, int(s.seed))
    check_layer_decay(clf, float(s.layer_decay), int(s.unfreeze_blocks))
    train_ds, val_ds, view_settings = _datasets(bb, s, train, val, views)
    run = _Run(clf, bb, s, taxonomy, train_ds, val_ds, len(train.paths),
               criterion_from_config(taxonomy, train.targets, loss), torch.device(device))
    run.state_dir = Path(out_dir) / STATE_DIR
    run.signature = {"n_train": len(train.paths), "n_val": len(val.paths),
                     "sizes": taxonomy.sizes, "views": view_settings, "backbone": bb.name,
                     "settings": {k: v for k, v in asdict(s).items() if k not in _UNSIGNED}}
    resumed_from = None
    if s.resume and (run.state_dir / LAST_CHECKPOINT).is_file():
        resumed_from = run.restore()
    elif run.state_dir.exists():
        shutil.rmtree(run.state_dir)
    paused = run.run(progress, callback)
    st = run.state
    seconds = time.perf_counter() - t_start
    if not paused and (run.state_dir / BEST_WEIGHTS).is_file():
        clf.load_state_dict(torch.load(run.state_dir / BEST_WEIGHTS, map_location=run.dev,
                                       weights_only=True))
    clf.eval()
    return FinetuneResult(
        model=clf, history=pd.DataFrame(st.history), best_epoch=st.best.best_epoch,
        steps=st.step, completed=not paused, stopped_early=st.stopped_early,
        lr_groups=run.lr_groups, frozen=run.frozen, resumed_from_step=resumed_from,
        seconds=seconds, images_per_second=run.images_seen / max(seconds, 1e-9),
        failures=[(train.paths[i] if i >= 0 else val.paths[-1 - i], msg)
                  for i, msg in sorted(st.failures.items())],
        backbone=bb, settings=s, views=view_settings, state_dir=run.state_dir)
