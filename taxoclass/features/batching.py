"""Batches of images through a backbone: decode (in workers or on a thread), embed.

The local engine, the embedding cache and the Spark executors all call
:func:`embed_batches`, so they compute the same numbers.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from taxoclass.errors import CacheError, ImageError
from taxoclass.features.backbones import Backbone
from taxoclass.io.images import load_transformed

__all__ = ["auto_batch_size", "embed_batches"]


def auto_batch_size(device: torch.device | str = "cpu") -> int:
    """Default batch size: 64 on a GPU; 8 on a CPU, where small batches stay in cache
    (EfficientNet-Lite0 on 2 cores: 46 images/s at batch 8 vs 29 at batch 64, decode
    included; see BENCHMARKS.md).
    """
    return 64 if torch.device(device).type == "cuda" else 8



class _ImageDataset(Dataset):
    """Opens and transforms images; a bad image yields ``None`` plus the error text."""

    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, load_transformed(self.paths[index], self.transform), None
        except ImageError as exc:
            return index, None, str(exc)
        except Exception as exc:  # a transform that chokes on an odd image
            return index, None, f"{type(exc).__name__}: {exc} (image {self.paths[index]!r})"


def _collate(
    batch: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, err or "unknown error") for i, x, err in batch if x is None]
    tensor = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], tensor, failed


def _prefetch(batches: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Produce ``batches`` on a background thread, ``depth`` ahead of the consumer.

    Without DataLoader worker processes this still overlaps JPEG decoding and resizing
    (PIL and torch release the GIL) with the forward pass of the previous batch.
    """
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((done, exc))

    thread = threading.Thread(target=produce, name="taxoclass-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = slots.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)


def embed_batches(
    paths: Sequence[str | Path],
    backbone: Backbone,
    batches: Sequence[Sequence[int]],
    *,
    num_workers: int = 0,
    prefetch: int = 2,
) -> Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]]]]:
    """Embed ``paths`` batch by batch: yields ``(ok_indices, features, failures)``.

    ``batches`` lists indices into ``paths`` (one list per forward pass).
    ``features`` is float32 ``[len(ok_indices), num_features]`` (``None`` when the whole
    batch failed); ``failures`` holds ``(index, error)`` for missing or undecodable
    images. Decoding overlaps the forward pass: in ``num_workers`` DataLoader processes,
    or with ``num_workers=0`` on one background thread where a core is free for it
    (on a CPU whose cores all run the forward pass, decoding runs in turn). Memory is
    bounded by the batches in flight, whatever the number of images. The local engine and the Spark
    executors both call this, so they compute the same numbers.
    """
    if num_workers < 0:
        raise CacheError(f"num_workers must be >= 0 (found {num_workers}).")
    device = backbone.device
    on_cuda = device.type == "cuda"
    loader_kwargs: dict[str, Any] = {}
    if num_workers > 0:
        loader_kwargs["prefetch_factor"] = max(1, prefetch)
    loader = DataLoader(
        _ImageDataset([str(p) for p in paths], backbone.transform),
        batch_sampler=[list(b) for b in batches],
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=on_cuda,
        **loader_kwargs,
    )
    source: Iterator[Any] = iter(loader)
    # A decoding thread only pays where a core is free for it: on a GPU, or when torch's
    # intra-op threads leave one. With every core in the forward pass it slows both down
    # (measured on 2 cores: 40 -> 44 images/s fp32, 69 -> 76 bf16 without the thread).
    spare_core = (os.cpu_count() or 1) > torch.get_num_threads()
    if num_workers == 0 and prefetch > 0 and (on_cuda or spare_core):
        source = _prefetch(source, depth=prefetch)
    with torch.inference_mode():
        for ok_idx, tensor, bad in source:
            feats = None
            if tensor is not None:
                if on_cuda:
                    tensor = tensor.to(device, non_blocking=True)
                out = backbone.embed(tensor).float().cpu().numpy()
                feats = np.ascontiguousarray(out, dtype=np.float32)
            yield ok_idx, feats, bad
