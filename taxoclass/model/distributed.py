"""Several processes fine-tuning one model: the torchrun / DistributedDataParallel plumbing.

``torchrun`` starts one process per GPU (or per CPU share) and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
:func:`process_group` turns that into a ``torch.distributed`` process group (NCCL on
CUDA, gloo on the CPU) for the length of a job and destroys it afterwards, also when the
job fails. Without those variables (a plain ``taxoclass train --finetune``) nothing is
initialised and :func:`current` reports one process of one.

The rules the fine-tuning loop (:mod:`taxoclass.model.finetune`) follows with them:

* ``finetune.batch_size`` (and ``accum_steps``) are *global*: each process takes
  ``batch_size / world_size`` images per forward pass (:func:`per_process_batch`
  refuses a batch size the process count does not divide);
* data order is :class:`torch.utils.data.DistributedSampler`'s (seed, epoch)
  permutation, the same one a single process uses; the sampler's padding (the first
  images repeated so every process gets as many) is dropped (:func:`shard`), so every
  image is seen once per epoch, as in one process;
* process 0 alone writes checkpoints, the bundle and progress; the others wait at a
  barrier where they must not run ahead of a file (:func:`barrier`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["DistInfo", "all_gather_objects", "all_reduce_grads", "all_reduce_sum", "barrier",
           "current", "launched_by_torchrun", "main_first", "micro_batches", "per_process_batch",
           "process_group", "resolve_device", "shard"]

log = logging.getLogger(__name__)

# How long a process waits in a collective (e.g. while process 0 alone computes the probe
# heads' embedding cache, or writes a checkpoint) before the job fails.
TIMEOUT = _dt.timedelta(hours=2)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job: rank, world size, local rank (its GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process: gradients, metrics and counts are reduced."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes files and reports progress."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set ``WORLD_SIZE`` > 1 and ``RANK``."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> DistInfo:
    """This process's place in the initialised process group (one of one when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device for this process: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun;
    None means CUDA when available, else the CPU."""
    dev = torch.device(device if device is not None else
                       ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None and launched_by_torchrun():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


@contextmanager
def process_group(device: str | torch.device | None = None) -> Iterator[DistInfo]:
    """Initialise the process group when launched by torchrun (NCCL for a CUDA ``device``,
    gloo otherwise), yield :func:`current`, and destroy the group at the end, also on an
    error. Not under torchrun, or with a group the caller already initialised: nothing is
    created or destroyed."""
    if not launched_by_torchrun() or dist.is_initialized():
        yield current()
        return
    dev = resolve_device(device)
    # torchrun's store outlives a restart (--max-restarts): the keys of the killed attempt
    # would send the new processes to dead peers (pytorch/pytorch#135712), so each
    # attempt gets its own prefix.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=TIMEOUT))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"taxoclass/attempt-{attempt}", store)
    kwargs: dict[str, Any] = dict(store=store, rank=rank, world_size=world_size,
                                  timeout=TIMEOUT)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev, **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def per_process_batch(global_batch: int, info: DistInfo) -> int:
    """``global_batch / world_size``; a :class:`ConfigError` when that is not a whole
    number (the processes would not add up to the configured batch)."""
    if global_batch % info.world_size:
        raise ConfigError(
            f"finetune.batch_size: {global_batch} images per step cannot be split evenly over "
            f"{info.world_size} processes (batch_size is the global batch; each process takes "
            f"batch_size / world_size). Fix: a multiple of {info.world_size}, e.g. "
            f"--set finetune.batch_size={_nearest_multiple(global_batch, info.world_size)}.")
    return global_batch // info.world_size


def _nearest_multiple(n: int, k: int) -> int:
    return max(1, round(n / k)) * k


def shard(n_items: int, seed: int, epoch: int, info: DistInfo) -> list[int]:
    """This process's share of the epoch's (seed, epoch) permutation of ``n_items`` items,
    from :class:`~torch.utils.data.DistributedSampler`, without the sampler's padding.

    Process ``r`` gets the items at global positions ``r, r + W, r + 2W, ...``; its k-th
    run of ``B / W`` items together with the other processes' k-th runs is exactly the
    k-th batch of ``B`` that one process makes from the same permutation.
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n_items), num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=int(seed), drop_last=False)
    sampler.set_epoch(int(epoch))
    return [i for j, i in enumerate(sampler) if info.rank + j * info.world_size < n_items]


def micro_batches(items: Sequence[int], n_micro: int, per_process: int) -> list[list[int]]:
    """``n_micro`` runs of ``per_process`` items (the last ones shorter or empty), so that
    every process has as many micro-batches as one process would."""
    return [list(items[k * per_process:(k + 1) * per_process]) for k in range(n_micro)]


def barrier() -> None:
    """Wait for every process (nothing without a process group)."""
    if current().enabled:
        dist.barrier()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over all processes (float64, on the CPU or the
    group's device)."""
    info = current()
    if not info.enabled:
        return [float(v) for v in values]
    dev = (torch.device("cuda", torch.cuda.current_device())
           if dist.get_backend() == "nccl" else torch.device("cpu"))
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order."""
    info = current()
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads(params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``params`` over the processes by hand (one flat buffer);
    a parameter without a gradient counts as zeros. Used for the rare optimizer step in
    which some process has no image left for the last micro-batch, where DDP's own
    reduction (which needs a backward pass on every process) cannot run."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@contextmanager
def main_first() -> Iterator[None]:
    """Process 0 runs the block first (e.g. downloads or caches something), the others
    after it finished (each process runs it once)."""
    info = current()
    if info.enabled and not info.is_main:
        dist.barrier()
    yield
    if info.enabled and info.is_main:
        dist.barrier()
