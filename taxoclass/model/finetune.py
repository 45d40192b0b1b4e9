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

Under ``torchrun`` (a process group initialised, :mod:`taxoclass.model.distributed`) the
model is wrapped in DistributedDataParallel: ``batch_size`` stays the global batch (each of
W processes takes ``batch_size / W`` images of the same (seed, epoch) permutation, through
a ``DistributedSampler`` without its padding), each micro-batch loss is weighted by its
share of the global step's images, process 0 alone writes checkpoints, and the epoch's
validation loss and accuracies are sums over every process's shard of the validation set.
SyncBatchNorm on CUDA; on a CPU, ``freeze_bn`` (or a backbone without BatchNorm) gives the
same result as one process. Dropout masks come from each process's own seeded stream.

Writing the model bundle is the job's (:func:`taxoclass.pipelines.finetune.finetune_to_bundle`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..config import FinetuneSettings, ModelConfig
from ..errors import ConfigError
from ..taxonomy.tree import Taxonomy
from . import distributed as dist
from .checkpoint import FinetuneState as _State
from .checkpoint import atomic_torch_save, rng_states, set_rng_states
from .finetune_parts import FinetuneModel, as_backbone, build_model, datasets
from .heads import MultiRankHead
from .image_data import ImageDataset, LabelledImages, collate
from .losses import ClassDependencyLoss, criterion_from_config
from .optim import (
    adamw,
    check_layer_decay,
    layer_decay_param_groups,
    set_trainable,
    warmup_cosine,
)
from .training import EarlyStopping, freeze_untrained_heads

log = logging.getLogger(__name__)
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
             "compile")  # settings a resumed run may change (so may the process count)


# --------------------------------------------------------------------------- inputs, outputs
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
    world_size: int = 1               # processes that trained it (torchrun)

    @property
    def head(self) -> MultiRankHead:
        return self.model.head

    def discard_state(self) -> None:
        """Remove the run's checkpoints unless ``settings.keep_checkpoints``."""
        if self.state_dir is not None and not self.settings.keep_checkpoints:
            shutil.rmtree(self.state_dir, ignore_errors=True)


# --------------------------------------------------------------------------- the run
class _Run:
    """One fine-tuning run: model, optimizer, schedule, data and the resumable state."""

    def __init__(self, clf: FinetuneModel, bb: Backbone, s: FinetuneSettings,
                 taxonomy: Taxonomy, train_ds: ImageDataset, val_ds: ImageDataset | None,
                 n_train: int, criterion: ClassDependencyLoss, device: torch.device) -> None:
        self.clf, self.bb, self.s, self.taxonomy = clf, bb, s, taxonomy
        self.train_ds, self.val_ds, self.n_train = train_ds, val_ds, n_train
        self.dev, self.on_cuda = device, device.type == "cuda"
        self.dist = dist.current()
        self.frozen = set_trainable(clf, int(s.unfreeze_blocks))
        # set_trainable thaws every head: heads the loss does not train stay frozen at zero
        # (DDP refuses parameters that get no gradient)
        freeze_untrained_heads(clf.head, criterion.trained_ranks)
        if self.dist.enabled and self.on_cuda and not s.freeze_bn:
            nn.SyncBatchNorm.convert_sync_batchnorm(clf)  # same parameters, shared statistics
        self.frozen_modules = [clf.get_submodule(n) for n in self.frozen]
        clf.to(device)
        if bb.channels_last and self.on_cuda:
            clf.to(memory_format=torch.channels_last)
        groups = layer_decay_param_groups(clf, layer_decay=float(s.layer_decay),
                                          weight_decay=float(s.weight_decay))
        self.lr_groups = {g["name"]: float(s.lr) * g["lr_scale"] for g in groups}
        self.opt = adamw(groups, lr=float(s.lr))
        self.bs, self.accum = int(s.batch_size), int(s.accum_steps)
        self.local_bs = dist.per_process_batch(self.bs, self.dist)
        self.n_items = len(train_ds)
        self.n_micro = math.ceil(self.n_items / self.bs)
        self.total_steps = math.ceil(self.n_micro / self.accum) * int(s.epochs)
        warmup = round(float(s.warmup_epochs) * math.ceil(self.n_micro / self.accum))
        self.sched = warmup_cosine(self.opt, warmup=warmup, total=self.total_steps,
                                   lr=float(s.lr), min_lr_ratio=float(s.min_lr_ratio))
        self.criterion = criterion.to(device)
        compiled = s.compile and self.on_cuda
        self.eval_runner: nn.Module = torch.compile(clf) if compiled else clf
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self.runner = self.eval_runner
        if self.dist.enabled:  # broadcasts process 0's weights and buffers to the others
            self.ddp = nn.parallel.DistributedDataParallel(
                clf, device_ids=[device.index] if self.on_cuda else None)
            self.runner = torch.compile(self.ddp) if compiled else self.ddp
            self._warn_batch_norm()
        self.state = _State(best=EarlyStopping(patience=int(s.patience) if val_ds else 0))
        self.images_seen = 0

    def _warn_batch_norm(self) -> None:
        self.set_train_mode()
        training_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                          and not isinstance(m, nn.SyncBatchNorm) for m in self.clf.modules())
        if training_bn and self.dist.is_main:
            log.warning("finetune: %d processes on %s train BatchNorm layers with per-process "
                        "batch statistics (%d images each; SyncBatchNorm needs CUDA), so the "
                        "result differs from one process's. Set finetune.freeze_bn: true for "
                        "the same result.", self.dist.world_size, self.dev.type, self.local_bs)

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
        per_rank = ck.get("rng_ranks") or []
        same_world = len(per_rank) == self.dist.world_size
        set_rng_states(per_rank[self.dist.rank] if same_world else ck["rng"], self.dev)
        return self.state.step

    def save(self) -> None:
        """Checkpoint everything a resumed run needs (atomically; called by every process,
        process 0 writes what all of them saw, the others wait until it is written)."""
        rngs = dist.all_gather_objects(rng_states(self.dev))
        if self.dist.enabled:
            for failures in dist.all_gather_objects(self.state.failures):
                self.state.failures.update(failures)
        if self.dist.is_main:
            atomic_torch_save({
                "version": CHECKPOINT_VERSION, "signature": self.signature,
                "model": self.clf.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "state": self.state.to_checkpoint(),
                "rng": rngs[0], "rng_ranks": rngs}, self.state_dir / LAST_CHECKPOINT)
        dist.barrier()

    # ---- forward passes
    def forward(self, x: Tensor, train: bool = True) -> dict[str, Tensor]:
        """Logits; ``train``: through DDP (gradients reduced), else the plain model."""
        runner = self.runner if train else self.eval_runner
        x = x.to(self.dev, non_blocking=True)
        if self.bb.channels_last and self.on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.on_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = runner(x)
        else:
            out = runner(x)
        return {r: v.float() for r, v in out.items()}

    def loader(self, ds: ImageDataset, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            ds, batch_sampler=batches, num_workers=int(self.s.num_workers), collate_fn=collate,
            pin_memory=self.on_cuda, persistent_workers=False)

    def set_train_mode(self) -> None:
        self.clf.train()
        for m in self.frozen_modules:
            m.eval()
        if self.s.freeze_bn:
            for m in self.clf.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def lr(self) -> float:
        """The heads' (highest) learning rate now."""
        return max(g["lr"] for g in self.opt.param_groups)

    def validate(self) -> dict[str, float]:
        """Validation loss and per-rank top-1 accuracy (ranks with a labelled image); with
        several processes each takes every W-th image and the sums are reduced."""
        self.clf.eval()
        ranks, ds, bs, info = self.taxonomy.ranks, self.val_ds, self.local_bs, self.dist
        n, total = 0, 0.0
        correct = {r: 0 for r in ranks}
        labelled = {r: 0 for r in ranks}
        mine = list(range(info.rank, len(ds), info.world_size))
        batches = [mine[i:i + bs] for i in range(0, len(mine), bs)]
        with torch.inference_mode():
            for x, y, idx, fails in self.loader(ds, batches):
                for i, msg in fails:
                    self.state.failures[-1 - i] = msg
                if x is None:
                    continue
                logits = self.forward(x, train=False)
                y = {r: v.to(self.dev) for r, v in y.items()}
                total += float(self.criterion(logits, y)) * len(idx)
                n += len(idx)
                for r in ranks:
                    mask = y[r] >= 0
                    labelled[r] += int(mask.sum())
                    correct[r] += int((logits[r].argmax(1)[mask] == y[r][mask]).sum())
        if info.enabled:
            sums = dist.all_reduce_sum([total, n, *correct.values(), *labelled.values()])
            total, n = sums[0], int(sums[1])
            correct = {r: int(v) for r, v in zip(ranks, sums[2:2 + len(ranks)])}
            labelled = {r: int(v) for r, v in zip(ranks, sums[2 + len(ranks):])}
        row = {"val_loss": total / max(n, 1)}
        row.update({f"val_{r}_acc": correct[r] / labelled[r] for r in ranks if labelled[r]})
        return row

    # ---- training
    def optimizer_step(self, batches: list[tuple]) -> tuple[float, int]:
        """One optimizer step over ``batches`` (micro-batches, each loss weighted by its
        share of the step's images over all processes); returns (summed loss, images),
        both over all processes."""
        st = self.state
        for _x, _, _, fails in batches:
            for i, msg in fails:
                st.failures[i % self.n_train] = msg  # an image fails in each of its passes
        n_group, ddp_sync = self.count_step(batches)
        self.opt.zero_grad(set_to_none=True)
        group_loss = 0.0
        world = self.dist.world_size
        for k, (x, y, idx, _) in enumerate(batches):
            if x is None:
                continue
            sync = ddp_sync and k == len(batches) - 1  # DDP reduces in this backward pass
            with (self.ddp.no_sync() if self.ddp is not None and not sync
                  else contextlib.nullcontext()):
                value = self.criterion(self.forward(x),
                                       {r: v.to(self.dev) for r, v in y.items()})
                (value * (len(idx) * world / n_group)).backward()  # DDP divides by world
            group_loss += float(value.detach()) * len(idx)
        if self.dist.enabled:
            if not ddp_sync:
                dist.all_reduce_grads([p for p in self.clf.parameters() if p.requires_grad],
                                      world)
            group_loss = dist.all_reduce_sum([group_loss])[0]
        if n_group:
            if self.s.grad_clip:
                params = [p for g in self.opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, float(self.s.grad_clip))
            self.opt.step()
        st.step += 1
        self.sched.step_update(st.step)
        return group_loss, n_group

    def count_step(self, batches: list[tuple]) -> tuple[int, bool]:
        """The step's readable images over all processes, and whether DDP can reduce the
        gradients itself (every process has an image in the last micro-batch; else they
        are reduced by hand after the backward passes)."""
        n_local = sum(len(b[2]) for b in batches)
        if not self.dist.enabled:
            return n_local, True
        last_empty = 0 if batches and len(batches[-1][2]) else 1
        n_group, n_empty = dist.all_reduce_sum([n_local, last_empty])
        return int(n_group), n_empty == 0

    def train_epoch(self, progress: Progress | None, callback: Callback | None) -> bool:
        """Train (the rest of) the current epoch; True when paused by ``max_steps``."""
        s, st = self.s, self.state
        max_steps = None if s.max_steps is None else int(s.max_steps)
        self.train_ds.epoch = st.epoch
        # DistributedSampler's (seed, epoch) permutation, this process's share of it, in
        # n_micro runs of batch_size / W (for one process: the permutation in batches)
        order = dist.shard(self.n_items, int(s.seed) * 7_919, st.epoch, self.dist)
        micro = dist.micro_batches(order, self.n_micro, self.local_bs)
        self.set_train_mode()
        it = iter(self.loader(self.train_ds, micro[st.micro_done:]))
        while st.micro_done < self.n_micro:
            if max_steps is not None and st.step >= max_steps:
                return True  # resumed with the same max_steps: nothing more to do
            group_end = min((st.micro_done // self.accum + 1) * self.accum, self.n_micro)
            batches = [next(it) for _ in range(group_end - st.micro_done)]
            group_loss, n_group = self.optimizer_step(batches)
            st.micro_done = group_end
            self.images_seen += n_group  # over all processes
            st.epoch_loss += group_loss
            st.epoch_seen += n_group
            if progress and self.dist.is_main:
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
        if st.best.update(st.epoch, score) and self.dist.is_main:
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
    bb = as_backbone(backbone)
    clf = build_model(bb, taxonomy, head_init, mcfg, int(s.seed))
    info = dist.current()
    if info.rank:  # each process its own dropout stream (process 0's is one process's)
        torch.manual_seed(int(s.seed) * 1_000_003 + info.rank)
    check_layer_decay(clf, float(s.layer_decay), int(s.unfreeze_blocks))
    train_ds, val_ds, view_settings = datasets(bb, s, train, val, views)
    criterion = criterion_from_config(taxonomy, train.targets, loss)
    # heads the loss does not train (loss.kind flat, soft_labels, hxe) stay at zero, as in
    # train_head, so path/crm decoding of the fine-tuned bundle equals the marginal one
    freeze_untrained_heads(clf.head, criterion.trained_ranks)
    run = _Run(clf, bb, s, taxonomy, train_ds, val_ds, len(train.paths), criterion,
               dist.resolve_device(device))
    run.state_dir = Path(out_dir) / STATE_DIR
    run.signature = {"n_train": len(train.paths), "n_val": len(val.paths),
                     "sizes": taxonomy.sizes, "views": view_settings, "backbone": bb.name,
                     "settings": {k: v for k, v in asdict(s).items() if k not in _UNSIGNED}}
    resumed_from = _start(run)
    paused = run.run(progress, callback)
    st = run.state
    if not paused and (run.state_dir / BEST_WEIGHTS).is_file():
        clf.load_state_dict(torch.load(run.state_dir / BEST_WEIGHTS, map_location=run.dev,
                                       weights_only=True))
    dist.barrier()  # every process has read best.pt before process 0 may remove it
    seconds = time.perf_counter() - t_start
    clf.eval()
    return FinetuneResult(
        model=clf, history=pd.DataFrame(st.history), best_epoch=st.best.best_epoch,
        steps=st.step, completed=not paused, stopped_early=st.stopped_early,
        lr_groups=run.lr_groups, frozen=run.frozen, resumed_from_step=resumed_from,
        seconds=seconds, images_per_second=run.images_seen / max(seconds, 1e-9),
        failures=[(train.paths[i] if i >= 0 else val.paths[-1 - i], msg)
                  for i, msg in sorted(st.failures.items())],
        backbone=bb, settings=s, views=view_settings, state_dir=run.state_dir,
        world_size=info.world_size)


def _start(run: _Run) -> int | None:
    """Resume from the last checkpoint (every process from the same one), or start afresh
    (process 0 removes old checkpoints); returns the step resumed from."""
    s, info = run.s, run.dist
    found = dist.all_gather_objects((run.state_dir / LAST_CHECKPOINT).is_file())
    if len(set(found)) > 1:
        raise ConfigError(
            f"{run.state_dir / LAST_CHECKPOINT}: only processes "
            f"{[r for r, f in enumerate(found) if f]} of {info.world_size} see this checkpoint. "
            f"Fix: put the output folder on storage every node shares (NFS, a parallel file "
            f"system).")
    if s.resume and found[0]:
        return run.restore()
    if info.is_main and run.state_dir.exists():
        shutil.rmtree(run.state_dir)
    dist.barrier()
    return None
