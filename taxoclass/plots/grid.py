"""Tile grids over a plot photo: grid parsing, bounds (:data:`MAX_TILES` per photo, tiles of
at least :data:`MIN_TILE_PX`), the tiles of one or several grids with overlap, and crops.

Geometry only; classifying the tiles is :mod:`taxoclass.plots.tiling`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import ConfigError, ImageError

__all__ = ["DEFAULT_GRIDS", "MAX_TILES", "MIN_TILE_PX", "Grid", "Tile", "check_grids",
           "crop_tiles", "grid_label", "make_tiles", "parse_grid"]

Grid = int | tuple[int, int] | str


@dataclass(frozen=True)
class Tile:
    """One tile of a plot photo: its grid (``scale``, e.g. ``"3x3"``), cell and pixel box.

    ``box`` is ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive (PIL crop order).
    """

    plot_id: str
    scale: str
    row: int
    col: int
    box: tuple[int, int, int, int]

    @property
    def tile_id(self) -> str:
        return f"{self.plot_id}/{self.scale}/r{self.row}c{self.col}"

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


#: Bounds of every tiling: at most this many tiles per photo (all grids together: a
#: 50x50 grid; a --grid 1000 would be a million crops and hours of work for one photo) ...
MAX_TILES = 2500
#: ... and tiles at least this many px on each side (a smaller crop holds no plant; the
#: photo is then reported as a failure naming a coarser grid).
MIN_TILE_PX = 8


def parse_grid(grid: Grid) -> tuple[int, int]:
    """``3 -> (3, 3)``, ``(2, 4) -> (2, 4)``, ``"2x4" -> (2, 4)`` (rows × cols)."""
    try:
        if isinstance(grid, str):
            parts = grid.lower().replace("×", "x").split("x")
            rows, cols = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (
                int(parts[0]), int(parts[1]))
        elif isinstance(grid, (int, np.integer)):
            rows = cols = int(grid)
        else:
            rows, cols = (int(v) for v in grid)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"Tile grid {grid!r} is not understood. Expected an int (3 means "
                          f"3x3), a pair (rows, cols) or a string like '2x4'.") from exc
    if rows < 1 or cols < 1:
        raise ConfigError(f"Tile grid {grid!r} must have at least one row and one column.")
    if rows * cols > MAX_TILES:
        raise ConfigError(f"Tile grid {grid!r} has {rows * cols:,} tiles; a photo is cut into "
                          f"at most {MAX_TILES:,} tiles (e.g. --grid 50). Fix: use a coarser "
                          "grid.")
    return rows, cols


def check_grids(grids: Sequence[Grid]) -> list[str]:
    """The grid labels of ``grids``, refused at once when together they cut a photo into
    more than :data:`MAX_TILES` tiles (before any model loads or photo is read)."""
    shapes = list(dict.fromkeys(parse_grid(g) for g in grids))
    total = sum(r * c for r, c in shapes)
    if total > MAX_TILES:
        labels = ", ".join(f"{r}x{c}" for r, c in shapes)
        raise ConfigError(f"Tile grids {labels} cut each photo into {total:,} tiles; at most "
                          f"{MAX_TILES:,} are allowed. Fix: use fewer or coarser grids.")
    return [f"{r}x{c}" for r, c in shapes]


def _starts(length: int, n: int, overlap: float) -> list[tuple[int, int]]:
    """``n`` intervals of equal size covering ``[0, length)`` with the given overlap."""
    size = length / (1.0 + (n - 1) * (1.0 - overlap))
    step = size * (1.0 - overlap)
    out = []
    for i in range(n):
        a = int(round(i * step))
        b = length if i == n - 1 else int(round(i * step + size))
        out.append((a, max(b, a + 1)))
    return out


def _count_for_size(length: int, size: int, overlap: float) -> int:
    """How many tiles of ``size`` px (overlapping by ``overlap``) cover ``length`` px."""
    if size >= length:
        return 1
    step = size * (1.0 - overlap)
    return int(math.ceil((length - size) / step - 1e-9)) + 1


def make_tiles(image_size: tuple[int, int], *, grids: Sequence[Grid] = (3,),
               tile_size: int | tuple[int, int] | None = None, overlap: float = 0.0,
               plot_id: str = "") -> list[Tile]:
    """Tiles covering an image of ``image_size = (width, height)``, for every grid.

    ``grids``: one or more grids (``3`` = 3×3, ``(2, 4)``, ``"2x4"``); all scales are
    returned together, coarsest first as given. ``tile_size`` (px, square or
    ``(w, h)``) replaces ``grids``: as many tiles of about that size as cover the image.
    ``overlap`` is the fraction of a tile shared with its neighbour (0 ≤ overlap < 1).
    Tiles of a grid have equal size (±1 px) and the last row/column ends at the border.
    A grid that is not understood raises :class:`~taxoclass.errors.ConfigError`; a tiling of
    this image with more than :data:`MAX_TILES` tiles or tiles under :data:`MIN_TILE_PX` px
    raises :class:`~taxoclass.errors.ImageError` (a batch job records that photo).
    """
    width, height = int(image_size[0]), int(image_size[1])
    if width < 1 or height < 1:
        raise ConfigError(f"Cannot tile an image of size {image_size}; expected width and "
                          "height of at least 1 px.")
    if not 0.0 <= float(overlap) < 1.0:
        raise ConfigError(f"Tile overlap must be a fraction in [0, 1), got {overlap}.")
    if tile_size is not None:
        tw, th = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
        if tw < 1 or th < 1:
            raise ConfigError(f"tile_size must be positive, got {tile_size}.")
        shapes = [(_count_for_size(height, int(th), overlap),
                   _count_for_size(width, int(tw), overlap))]
    else:
        if not grids:
            raise ConfigError("make_tiles needs at least one grid (e.g. grids=(3,)) or a "
                              "tile_size.")
        shapes = [parse_grid(g) for g in grids]
    _check_fits(list(dict.fromkeys(shapes)), width, height, overlap)
    tiles: list[Tile] = []
    for rows, cols in dict.fromkeys(shapes):
        ys, xs = _starts(height, rows, overlap), _starts(width, cols, overlap)
        scale = f"{rows}x{cols}"
        for r, (y0, y1) in enumerate(ys):
            for c, (x0, x1) in enumerate(xs):
                tiles.append(Tile(plot_id, scale, r, c, (x0, y0, x1, y1)))
    return tiles


def _check_fits(shapes: Sequence[tuple[int, int]], width: int, height: int,
                overlap: float) -> None:
    """Refuse a tiling with too many tiles or tiles too small for this image: an
    :class:`~taxoclass.errors.ImageError`, so a batch job records the photo and carries on."""
    total = sum(r * c for r, c in shapes)
    if total > MAX_TILES:
        raise ImageError(f"Tiling an image of {width}x{height} px gives {total:,} tiles; at most "
                         f"{MAX_TILES:,} are allowed. Fix: use a coarser grid or a larger "
                         "tile size.")
    for rows, cols in shapes:
        tw = width / (1.0 + (cols - 1) * (1.0 - overlap))
        th = height / (1.0 + (rows - 1) * (1.0 - overlap))
        if min(tw, th) < MIN_TILE_PX:
            raise ImageError(f"A {rows}x{cols} grid does not fit an image of {width}x{height} "
                             f"px: its tiles would be {tw:.0f}x{th:.0f} px, under the "
                             f"{MIN_TILE_PX} px minimum. Fix: use a coarser grid (--grid "
                             f"{max(1, min(rows, cols) // 2)}) or a larger photo.")


def crop_tiles(image: Image.Image, tiles: Sequence[Tile]) -> list[Image.Image]:
    """The pixels of each tile, as RGB images."""
    return [image.crop(t.box) for t in tiles]

#: The grids ``calibrate-plots`` tiles with unless told (a plot report without settings: 3x3).
DEFAULT_GRIDS: tuple[str, ...] = ("2x2", "4x4")


def grid_label(grid: Grid) -> str:
    """``4 -> "4x4"``, ``"2x3" -> "2x3"`` (the tile scale label)."""
    rows, cols = parse_grid(grid)
    return f"{rows}x{cols}"
