"""Fine-tuning checkpoints: atomic ``torch.save``, the RNG states a resumed run restores,
the loop's resumable state, and CPU copies of state dicts."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io.files import atomic_write
from .training import EarlyStopping

__all__ = ["FinetuneState", "atomic_torch_save", "rng_states", "set_rng_states",
           "state_to_cpu"]


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file (never a half-written file)."""
    atomic_write(path, lambda fh: torch.save(obj, fh), mode="wb")


def rng_states(device: torch.device) -> dict[str, Any]:
    """torch, Python, NumPy (and CUDA) RNG states in a ``weights_only``-loadable form."""
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


def set_rng_states(states: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_states` saved."""
    torch.set_rng_state(states["torch"])
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = states["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def state_to_cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU copies of a state dict's tensors."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


@dataclass
class FinetuneState:
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
    def from_checkpoint(cls, d: Mapping[str, Any]) -> FinetuneState:
        return cls(epoch=int(d["epoch"]), micro_done=int(d["micro_done"]), step=int(d["step"]),
                   epoch_loss=float(d["epoch_loss"]), epoch_seen=int(d["epoch_seen"]),
                   best=EarlyStopping(**d["best"]), history=[dict(r) for r in d["history"]],
                   failures={int(k): str(v) for k, v in d["failures"].items()},
                   finished=bool(d["finished"]), stopped_early=bool(d["stopped_early"]))
