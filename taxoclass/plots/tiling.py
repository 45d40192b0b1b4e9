"""Cut plot (quadrat) photos into grids of tiles and classify the tiles in batches.

A plot photo holds many plants; a classifier trained on single-plant images sees one
tile at a time. :func:`~taxoclass.plots.grid.make_tiles` (the tile geometry lives in
:mod:`taxoclass.plots.grid`) lays one or several grids over the photo (e.g. 2×2
and 4×4 at once, so large and small plants both fill some tile), with an optional
overlap so a plant on a tile border is whole in a neighbouring tile.

:class:`TileClassifier` is the interface the plot pipeline needs from a model: a
taxonomy and ``predict_tiles(images) -> Decoded``. :class:`BundleTileClassifier` wraps a
trained :class:`~taxoclass.bundle.ModelBundle` and, when the bundle has an open-set
scorer, backs every tile off through the bundle's own back-off
(:meth:`BundleTileClassifier.back_off_tiles`: the answers ``predict`` gives for the same
crops); the PlantCLEF checkpoint wrapper lives in :mod:`taxoclass.plots.plantclef`.

Tile back-off: a tile whose answer is at genus (``Quercus sp.``) gives evidence at genus
and above only (its probabilities below genus count 0, :func:`mask_below`); a tile is
unknown only when no rank of it passes. An outlier tile is therefore not thrown away: it
supports the genus or family its evidence supports.

:func:`classify_photo` is the one tile loop (open a photo, tile it, classify the tiles,
back them off) that plot reports, plot calibration and the Spark engine share;
:func:`classify_photos` runs it over many photos, recording unreadable ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, ImageError
from ..io.images import load_image, to_rgb
from ..vocab import UNKNOWN
from .grid import (  # the tile geometry, re-exported (in __all__) for callers of the loop
    DEFAULT_GRIDS,
    MAX_TILES,
    MIN_TILE_PX,
    Grid,
    Tile,
    check_grids,
    crop_tiles,
    grid_label,
    make_tiles,
    parse_grid,
)

__all__ = [
    "DEFAULT_GRIDS",
    "MAX_TILES",
    "MIN_TILE_PX",
    "BundleTileClassifier",
    "PhotoFailure",
    "PlotTiles",
    "Tile",
    "TileClassifier",
    "backbone_name",
    "check_grids",
    "tile_ranks",
    "classify_photo",
    "classify_photos",
    "crop_tiles",
    "embed_images",
    "embed_tiles",
    "grid_label",
    "make_tiles",
    "mask_below",
    "parse_grid",
    "plot_ids",
]

Progress = Callable[[int, int], None]
#: ``fn(decoded) -> array[n_tiles]``: per tile, the rank its back-off answer sits at (a rank
#: name of the taxonomy, or ``"unknown"`` where no rank passes); a bool array is read as
#: unknown flags (True: unknown; the other tiles count at every rank).
UnknownFlagger = Callable[[Any], np.ndarray]




def plot_ids(photos: Sequence[Any]) -> list[str]:
    """One plot id per photo: its file stem (``a/CBN-1.jpg`` -> ``CBN-1``); a stem seen
    again gets ``__2``, ``__3``... so ids stay unique."""
    seen: dict[str, int] = {}
    out = []
    for photo in photos:
        p = Path(photo)
        stem = p.stem or p.name
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}__{seen[stem]}")
    return out



@dataclass
class PlotTiles:
    """One plot photo, tiled and classified: what every plot job starts from.

    ``scales``: the grid label of each tile (``"4x4"``); ``probs``: rank -> coherent tile
    probabilities ``[n_tiles, n_classes]`` (float64), 0 below the rank each tile backed
    off to (:func:`mask_below`); ``unknown``: True for tiles where no rank passes
    back-off. ``ranks``: the rank of each tile's back-off answer (``"unknown"``; the
    lowest rank for every tile when nothing backs off). From :func:`classify_photo` also
    the tiles, the photo's ``size`` (width, height), the classifier's ``decoded`` output
    (probabilities before back-off) and, when asked for, the ``image``.
    """

    plot_id: str
    photo: str
    scales: np.ndarray
    probs: dict[str, np.ndarray]
    unknown: np.ndarray
    tiles: list[Tile] = field(default_factory=list, repr=False)
    size: tuple[int, int] | None = None
    decoded: Any = field(default=None, repr=False)
    image: Image.Image | None = field(default=None, repr=False)
    ranks: np.ndarray | None = None


def tile_ranks(result: Any, n: int, ranks: Sequence[str]) -> np.ndarray:
    """Per tile, the rank its answer sits at, from a back-off function's ``result``: rank
    names (``"unknown"`` where no rank passes) or bool unknown flags (True: ``"unknown"``,
    else the lowest rank); ``None``: every tile at the lowest rank."""
    lowest = str(ranks[-1])
    if result is None:
        return np.full(n, lowest, dtype=object)
    arr = np.asarray(result).reshape(n)
    if arr.dtype == bool:
        return np.where(arr, UNKNOWN, lowest).astype(object)
    out = arr.astype(str).astype(object)
    bad = sorted(set(out) - {*map(str, ranks), UNKNOWN})
    if bad:
        raise ValueError(f"Tile back-off gave rank(s) {bad}; expected one of "
                         f"{[*ranks, UNKNOWN]} per tile.")
    return out


def mask_below(probs: Mapping[str, np.ndarray], tile_rank: np.ndarray,
               ranks: Sequence[str]) -> dict[str, np.ndarray]:
    """Tile probabilities with every rank below each tile's answer rank set to 0: a tile
    backed off to genus gives evidence for its genus and family, never for a species. An
    ``"unknown"`` tile keeps its probabilities (it is flagged; the aggregation skips it)."""
    ranks = [str(r) for r in ranks]
    depth = np.array([ranks.index(r) if r in ranks else len(ranks) for r in tile_rank],
                     dtype=int)
    out = {}
    for j, r in enumerate(ranks):
        a = np.array(probs[r], dtype=np.float64)
        a[depth < j] = 0.0
        out[r] = a
    return out


@dataclass(frozen=True)
class PhotoFailure:
    """A photo that could not be read, and why (the other photos carry on)."""

    photo: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"photo": self.photo, "error": self.error}


def classify_photo(classifier: TileClassifier, photo: str | Path | Image.Image, *,
                   grids: Sequence[Grid] = (3,), overlap: float = 0.0,
                   plot_id: str | None = None, flag_unknown: UnknownFlagger | None = None,
                   keep_image: bool = False) -> PlotTiles:
    """Open one plot photo, tile it (:func:`make_tiles`), classify the tiles in one
    ``classifier.predict_tiles`` call and back them off with ``flag_unknown(decoded)``
    (:data:`UnknownFlagger`: each tile's answer rank, e.g.
    :meth:`BundleTileClassifier.back_off_tiles`; omitted: no back-off, every tile counts
    at every rank): the one tile loop of every plot job.

    ``photo``: a path (read with :func:`~taxoclass.io.images.load_image`, which raises
    :class:`~taxoclass.errors.ImageError` for an unreadable file) or an image in memory.
    ``plot_id``: default the file stem (``""`` for an image). ``keep_image``: keep the
    opened image in :attr:`PlotTiles.image` (a report draws it).
    """
    if isinstance(photo, Image.Image):
        image, source = to_rgb(photo), ""
    else:
        image, source = load_image(photo), str(photo)
    if plot_id is None:
        plot_id = Path(source).stem if source else ""
    tiles = make_tiles(image.size, grids=grids, overlap=overlap, plot_id=plot_id)
    decoded = classifier.predict_tiles(crop_tiles(image, tiles))
    ranks = list(classifier.taxonomy.ranks)
    answer = tile_ranks(None if flag_unknown is None else flag_unknown(decoded), len(tiles),
                        ranks)
    probs = mask_below({r: decoded.probs[r] for r in ranks}, answer, ranks)
    return PlotTiles(plot_id, source, np.array([t.scale for t in tiles], dtype=str), probs,
                     np.asarray(answer == UNKNOWN, dtype=bool), tiles=tiles, size=image.size,
                     decoded=decoded, image=image if keep_image else None, ranks=answer)


def classify_photos(classifier: TileClassifier, photos: Sequence[str | Path], *,
                    grids: Sequence[Grid] = (3,), overlap: float = 0.0,
                    flag_unknown: UnknownFlagger | None = None, keep_image: bool = False,
                    progress: Progress | None = None) -> Iterator[PlotTiles | PhotoFailure]:
    """:func:`classify_photo` for every photo (plot id: :func:`plot_ids`), in order.

    Yields a :class:`PlotTiles` per readable photo and a :class:`PhotoFailure` per photo
    that cannot be read; ``progress(done, total)`` is called once the caller has taken
    each item (so after whatever it does with it).
    """
    paths = [Path(p) for p in photos]
    for done, (plot_id, path) in enumerate(zip(plot_ids(paths), paths), start=1):
        try:
            item: PlotTiles | PhotoFailure = classify_photo(
                classifier, path, grids=grids, overlap=overlap, plot_id=plot_id,
                flag_unknown=flag_unknown, keep_image=keep_image)
        except ImageError as exc:
            item = PhotoFailure(str(path), str(exc))
        yield item
        if progress:
            progress(done, len(paths))


def backbone_name(classifier: Any) -> str:
    """The backbone a tile classifier embeds with (``backbone_name``, else its description)."""
    name = getattr(classifier, "backbone_name", None)
    if name:
        return str(name)
    bb = classifier.describe().get("backbone", {})
    return str(bb.get("name", UNKNOWN)) if isinstance(bb, Mapping) else str(bb)


def _batched(images: Sequence[Image.Image], backbone: Any, batch_size: int,
             fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([backbone.transform(to_rgb(im).convert("RGB"))
                         for im in images[i:i + batch_size]])
        out.append(fn(x).float().cpu().numpy())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out)


def embed_images(images: Sequence[Image.Image], backbone: Any,
                 batch_size: int = 32) -> np.ndarray:
    """Backbone embeddings ``[n, num_features]`` of in-memory images, in batches."""
    return _batched(list(images), backbone, batch_size, backbone.embed)


def embed_tiles(image: Image.Image, tiles: Sequence[Tile], backbone: Any,
                batch_size: int = 32) -> np.ndarray:
    """Backbone embeddings ``[n_tiles, num_features]`` of the tiles of one photo."""
    emb = embed_images(crop_tiles(image, tiles), backbone, batch_size)
    return emb.reshape(len(tiles), -1) if len(tiles) else emb


@runtime_checkable
class TileClassifier(Protocol):
    """What the plot pipeline needs from a model."""

    taxonomy: Any

    def predict_tiles(self, images: Sequence[Image.Image]):
        """Coherent per-rank predictions (:class:`~taxoclass.model.decoding.Decoded`) per image."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance: backbone, weights, head."""
        ...


class BundleTileClassifier:
    """A trained :class:`~taxoclass.bundle.ModelBundle` (backbone + rank heads) on tiles."""

    def __init__(self, bundle: Any, backbone: Any | None = None, *, batch_size: int = 32,
                 top_k: int = 5) -> None:
        self.bundle = bundle
        self.backbone = backbone if backbone is not None else bundle.create_backbone()
        self.batch_size = int(batch_size)
        self.top_k = int(top_k)
        self._last: tuple[Any, np.ndarray] | None = None

    @classmethod
    def load(cls, path: Any, *, device: str = "cpu", batch_size: int = 32) -> BundleTileClassifier:
        from ..bundle import ModelBundle

        bundle = ModelBundle.load(path)
        return cls(bundle, bundle.create_backbone(device=device), batch_size=batch_size)

    @property
    def taxonomy(self) -> Any:
        return self.bundle.taxonomy

    @property
    def backbone_name(self) -> str:
        return self.backbone.name

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Backbone embeddings ``[n, num_features]`` of tile images (what the head sees)."""
        return embed_images(images, self.backbone, self.batch_size)

    def predict_embeddings(self, emb: np.ndarray):
        """Coherent per-rank predictions for tile embeddings (from :meth:`embed`)."""
        from ..model.decoding import decode_leaf_probabilities

        if not len(emb):
            n = self.taxonomy.n_classes(self.taxonomy.ranks[-1])
            return decode_leaf_probabilities(np.zeros((0, n), np.float32), self.taxonomy,
                                             top_k=self.top_k)
        return self.bundle.predict_embeddings(emb, top_k=self.top_k)

    def predict_tiles(self, images: Sequence[Image.Image]):
        emb = self.embed(images)
        decoded = self.predict_embeddings(emb)
        # Kept (one batch) so :meth:`flag_unknown` can run the detector on these tiles.
        self._last = (decoded, emb)
        return decoded

    def tile_answers(self, emb: np.ndarray):
        """The bundle's back-off answers for tile embeddings: exactly what ``predict``
        writes for the same crops (:meth:`~taxoclass.bundle.ModelBundle.predict_with_backoff`:
        ``taxon_rank``, ``taxon``, ``score``, ``reason``, ``outlier``, the path)."""
        frame, _ = self.bundle.predict_with_backoff(np.asarray(emb), top_k=self.top_k)
        return frame

    def unknown_flags(self, emb: np.ndarray, decoded=None) -> np.ndarray:
        """Per tile: True where back-off finds no rank that passes (answer ``"unknown"``).

        An outlier tile whose genus or family evidence passes is *not* unknown: it backs
        off to that rank (:meth:`back_off_tiles`). A bundle without a scorer flags nothing.
        """
        return tile_ranks(self._ranks(emb), len(emb), self.taxonomy.ranks) == UNKNOWN

    def _ranks(self, emb: np.ndarray) -> np.ndarray | None:
        if getattr(self.bundle, "scorer", None) is None or len(emb) == 0:
            return None
        ranks = self.tile_answers(emb)["taxon_rank"].fillna(UNKNOWN).astype(str)
        return ranks.to_numpy(dtype=object)

    def _last_embeddings(self, decoded) -> np.ndarray:
        last = getattr(self, "_last", None)
        if last is None or last[0] is not decoded:
            raise ValueError("back_off_tiles(decoded) needs the Decoded returned by the latest "
                             "predict_tiles call of this classifier (the tile embeddings are "
                             "kept for one batch only); call predict_tiles first, or use "
                             "tile_answers(embeddings).")
        return last[1]

    def back_off_tiles(self, decoded) -> np.ndarray:
        """Per tile of the last :meth:`predict_tiles` call (``decoded``: what it returned):
        the rank of its back-off answer, ``"unknown"`` where no rank passes
        (:data:`UnknownFlagger`); the lowest rank for every tile without a scorer."""
        emb = self._last_embeddings(decoded)
        return tile_ranks(self._ranks(emb), len(emb), self.taxonomy.ranks)

    def flag_unknown(self, decoded) -> np.ndarray:
        """Unknown flags (no rank passes) for the tiles of the last :meth:`predict_tiles`."""
        return self.back_off_tiles(decoded) == UNKNOWN

    def taxon_ids(self) -> dict[tuple[str, ...], str]:
        """External ids of leaf taxa (none for a trained bundle)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"kind": "model-bundle", "backbone": self.backbone.describe(),
                "head": self.bundle.head.config(), "decode_method": self.bundle.decode_method,
                "taxonomy": self.taxonomy.summary()}
