"""Torch thread counts for head training, chosen on purpose and restored afterwards.

A small head (a few linear layers on cached embeddings) does too little work per batch
for several intra-op threads to pay: every operation pays a fork/join between threads,
and when anything else keeps a core busy each join waits for a descheduled thread. On
2 shared cores the leaf head (1280-d Lite0 features) trained at about 1 epoch/s with
torch's default threads and about 35 with one thread when another process was busy
(issue 19; ``bench/head_threads.py`` measures it). So the training jobs wrap their fits
in :func:`torch_threads` with :func:`head_threads`'s choice, and restore the process's
setting afterwards (a library never leaves process state changed).

    with torch_threads(head_threads(None, n_weights=x.shape[1] * n_outputs)):
        result = train_head(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["SMALL_HEAD_WEIGHTS", "head_threads", "torch_threads"]

# Heads with fewer weights than this train on one thread by default (the rule of
# ``train.threads: null``). Measured on 2 shared cores (bench/head_threads.py, load 12-15):
# one thread beat torch's default of 2 at every size tried, by 30x for the leaf head
# (1280 x 157 = 0.2 M weights) down to 3.7x for a 768-d head of 8,000 species (6.3 M,
# PlantCLEF's size). Larger heads keep torch's default (not measured here; on many cores
# they may gain from more threads): set ``train.threads`` to choose.
SMALL_HEAD_WEIGHTS = 8_000_000


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Torch intra-op threads = ``n`` inside the block, then what they were (also after an
    exception). ``None`` or a value equal to the current one changes nothing. Yields the
    thread count in force inside the block."""
    import torch

    before = torch.get_num_threads()
    if n is None or int(n) == before:
        yield before
        return
    if int(n) < 1:
        raise ValueError(f"torch_threads: expected a thread count >= 1, found {n!r}.")
    torch.set_num_threads(int(n))
    try:
        yield int(n)
    finally:
        torch.set_num_threads(before)


def head_threads(setting: int | None, *, n_weights: int) -> int | None:
    """The thread count to train a head with ``n_weights`` weights: ``setting`` when it
    is given (``train.threads``); else 1 for a head under :data:`SMALL_HEAD_WEIGHTS`
    weights; else ``None`` (torch's own default, all cores)."""
    if setting is not None:
        return int(setting)
    return 1 if int(n_weights) < SMALL_HEAD_WEIGHTS else None
