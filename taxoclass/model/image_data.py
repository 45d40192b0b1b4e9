"""Images for end-to-end fine-tuning: a seeded, resumable dataset of (image, per-rank
targets), its collate function, the tile-like view transform, and embedding image files
through a fine-tuned model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ImageError
from ..io.images import load_image
from ..taxonomy.tree import Taxonomy
from .heads import HierarchicalClassifier

__all__ = ["ImageDataset", "LabelledImages", "TileViewTransform", "collate",
           "embed_image_files"]


@dataclass
class LabelledImages:
    """Image paths with a class index per rank and image (-1 where the label stops above
    that rank), as :func:`taxoclass.taxonomy.labels.encode_labels` makes them."""

    paths: Sequence[str | Path]
    targets: Mapping[str, np.ndarray] | None = None

    def checked(self, name: str, taxonomy: Taxonomy) -> LabelledImages:
        """Paths as strings and one int64 target array per rank, range-checked."""
        paths = [str(p) for p in self.paths]
        y = dict(self.targets or {})
        missing = [r for r in taxonomy.ranks if r not in y]
        if missing and paths:
            raise ValueError(f"finetune: {name} targets lack rank(s) {missing}; expected a "
                             f"class index array (-1 = unknown) for every rank "
                             f"{taxonomy.ranks}.")
        out = {r: np.asarray(y.get(r, np.zeros(0)), dtype=np.int64) for r in taxonomy.ranks}
        for r, v in out.items():
            if len(v) != len(paths):
                raise ValueError(f"finetune: {len(paths)} {name} images but {len(v)} {r} "
                                 f"targets.")
            if len(v) and (v.max() >= taxonomy.n_classes(r) or v.min() < -1):
                raise ValueError(f"finetune: {name} {r} targets must lie in [-1, "
                                 f"{taxonomy.n_classes(r) - 1}], found [{v.min()}, {v.max()}].")
        return LabelledImages(paths, out)


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

    def __getitem__(self, i: int) -> tuple[Any, dict[str, int], int, str | None]:
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


def collate(items: Sequence[tuple]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor],
                                             list[int], list[tuple[int, str]]]:
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

    def __call__(self, image: Any) -> Any:
        from ..features.views import tile_view

        seed = int(torch.randint(0, 2**62, (1,)))
        return self.then(tile_view(image, np.random.default_rng(seed), self.settings))


def embed_image_files(model: HierarchicalClassifier, paths: Sequence[str | Path],
                      transform: Callable, *, batch_size: int = 64, num_workers: int = 0,
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

