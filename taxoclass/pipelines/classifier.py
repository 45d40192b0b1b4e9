"""``TaxonClassifier``: a trained model bundle as one Python object that names images.

    clf = TaxonClassifier.load("runs/leaf")
    frame = clf.predict(["photo.jpg", PIL.Image.open("other.png")])

The rows are those of ``taxoclass predict`` (:func:`~taxoclass.pipelines.predict.predict_images`):
the same embedding code and back-off, without a cache on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..engines.base import prediction_frame
from .predict import one_decision

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..bundle import ModelBundle
    from ..taxonomy.tree import Taxonomy


class TaxonClassifier:
    """Names organisms in images at the rank the evidence supports.

    ``bundle``: a :class:`~taxoclass.bundle.ModelBundle`; ``backbone``: its backbone, built
    from the bundle's recipe on ``device`` when omitted. ``batch_size``: images per forward
    pass (default: 8 on a CPU, 64 on a GPU).
    """

    def __init__(self, bundle: ModelBundle, backbone: Any = None, *, device: str = "auto",
                 batch_size: int | None = None) -> None:
        self.bundle = bundle
        self.device = device
        self.batch_size = batch_size
        self._backbone = backbone

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto",
             batch_size: int | None = None) -> TaxonClassifier:
        """The model bundle folder ``path`` (written by ``taxoclass train``); the backbone
        is built on the first :meth:`predict`."""
        from ..bundle import ModelBundle

        return cls(ModelBundle.load(path), device=device, batch_size=batch_size)

    @property
    def taxonomy(self) -> Taxonomy:
        return self.bundle.taxonomy

    @property
    def backbone(self) -> Any:
        if self._backbone is None:
            self._backbone = self.bundle.create_backbone(device=self.device)
        return self._backbone

    def embed(self, images: Sequence[str | Path | Image.Image]
              ) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
        """Embeddings of the readable ``images`` (paths or PIL images), their positions in
        ``images`` and ``(position, error)`` for each path that cannot be read."""
        from PIL import Image

        from ..features.batching import auto_batch_size, embed_batches
        from ..plots.tiling import embed_images

        bb = self.backbone
        size = self.batch_size or auto_batch_size(bb.device)
        feats: dict[int, np.ndarray] = {}
        failures: list[tuple[int, str]] = []
        paths = [(k, str(im)) for k, im in enumerate(images) if not isinstance(im, Image.Image)]
        batches = [list(range(i, min(i + size, len(paths)))) for i in range(0, len(paths), size)]
        for ok, x, bad in embed_batches([p for _, p in paths], bb, batches):
            feats.update({paths[i][0]: row for i, row in zip(ok, x if x is not None else [])})
            failures.extend((paths[i][0], err) for i, err in bad)
        pil = [(k, im) for k, im in enumerate(images) if isinstance(im, Image.Image)]
        if pil:
            x = embed_images([im for _, im in pil], bb, batch_size=size)
            feats.update(zip((k for k, _ in pil), x))
        order = sorted(feats)
        dim = int(bb.num_features)
        emb = (np.stack([feats[k] for k in order]).astype(np.float32) if order
               else np.zeros((0, dim), dtype=np.float32))
        return emb, order, sorted(failures)

    def predict(self, images: Sequence[str | Path | Image.Image], *,
                top_k: int = 5) -> pd.DataFrame:
        """One row per image, in input order: ``image`` (the path, or ``<image N>`` for an
        in-memory image), ``taxon_rank``, ``taxon``, ``confidence``, ``score``, ``reason``
        (why that rank), ``outlier``, the coherent path with its probabilities and the top-k
        per rank; an unreadable file gets an ``error`` and reason ``failed`` instead. A
        folder stands for its images (sorted, recursively, as ``taxoclass predict`` reads
        it)."""
        from PIL import Image

        images = expand_folders(images)
        names = [f"<image {k}>" if isinstance(im, Image.Image) else str(im)
                 for k, im in enumerate(images)]
        emb, order, failures = self.embed(images)
        frame = prediction_frame(self.bundle, emb, [names[k] for k in order], top_k)
        frame["_k"] = order
        if failures:
            fails = pd.DataFrame({"image": [names[k] for k, _ in failures],
                                  "error": [e for _, e in failures],
                                  "_k": [k for k, _ in failures]})
            frame = pd.concat([frame, fails], ignore_index=True)
        frame = one_decision(frame)  # a failed row says `failed`, as in `taxoclass predict`
        return frame.sort_values("_k", kind="stable").drop(columns="_k").reset_index(drop=True)


def expand_folders(images: Sequence[str | Path | Image.Image]) -> list:
    """``images`` with each folder replaced by the images in it (sorted, recursively)."""
    from ..io.images import collect_images

    out: list = []
    for im in images:
        is_folder = isinstance(im, (str, Path)) and Path(im).is_dir()
        out.extend(collect_images([im]) if is_folder else [im])
    return out

