"""Tile-like views of training images: the object rotated, rescaled, cut by the border.

A head trained on whole, centred single-object images transfers poorly to tiles of
plot (quadrat) photos, where leaves are rotated, partly outside the tile, at varied
scale, on cluttered soil. :func:`write_views` writes augmented copies of training
images that look like such tiles; they are embedded like any other image and added to
the training rows with the source image's label.

Folder written by :func:`write_views`::

    views.json      the settings the views were made with (ViewSettings.to_dict())
    views/          <safe image id>__v<k>.jpg, one file per view
    failures.csv    image_id, path, error (sources that could not be opened)

View ``k`` of an image depends only on the settings, the image id and ``k`` (never on
the order of the items or on which views already exist), so a folder can be filled in
several runs and reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from taxoclass.config import AugmentConfig
from taxoclass.errors import CacheError, ConfigError, ImageError
from taxoclass.io.files import atomic_write, atomic_write_csv, atomic_write_json
from taxoclass.io.images import load_image, to_rgb

__all__ = [
    "BACKGROUND_KINDS",
    "VIEW_COLUMNS",
    "ViewSettings",
    "clutter_background",
    "paste_object",
    "stable_int",
    "tile_view",
    "write_views",
]

BACKGROUND_KINDS = ("black", "noise", "clutter")
MASK_KINDS = ("threshold", "none")
BACKGROUND_SUFFIXES = (".jpg", ".jpeg", ".png")
VIEW_COLUMNS = ["view_id", "source_id", "path", "k"]
SETTINGS_FILE = "views.json"
VIEWS_DIR = "views"
FAILURES = "failures.csv"
FORMAT_VERSION = 1
# Settings that do not change what view k looks like: a folder may be reused with others.
_NOT_IDENTITY = ("views_per_image",)
_CROP_MIN = 0.3  # background crops: side uniform(_CROP_MIN, 1) of the photo's shorter side


# ---------------------------------------------------------------------------- settings


_AUGMENT = AugmentConfig()


@dataclass(frozen=True)
class ViewSettings:
    """How tile-like views are made (see the module docstring)."""

    # Defaults: the config's ``augment`` section (taxoclass.config.AugmentConfig).
    views_per_image: int = _AUGMENT.views_per_image  # 0 disables
    size: int = _AUGMENT.size                   # square output view, pixels
    scale: tuple[float, float] = _AUGMENT.scale  # object's longest side / view side
    rotate: bool = _AUGMENT.rotate              # uniform 0-360 degrees
    max_cut: float = _AUGMENT.max_cut           # share of the object allowed outside per axis
    background: str = _AUGMENT.background       # "black" | "noise" | "clutter" | a folder
    object_threshold: int = _AUGMENT.object_threshold  # grey level above which: object
    mask: str = _AUGMENT.mask                   # "threshold": object pixels; "none": whole image
    seed: int = _AUGMENT.seed

    def __post_init__(self) -> None:
        if isinstance(self.scale, (list, tuple)) and len(self.scale) == 2 and all(
            _is_number(v) for v in self.scale
        ):
            object.__setattr__(self, "scale", (float(self.scale[0]), float(self.scale[1])))
        if isinstance(self.background, os.PathLike):
            object.__setattr__(self, "background", os.fspath(self.background))
        if _is_number(self.max_cut):
            object.__setattr__(self, "max_cut", float(self.max_cut))
        for key in ("views_per_image", "size", "object_threshold", "seed"):
            if _is_int(getattr(self, key)):
                object.__setattr__(self, key, int(getattr(self, key)))
        self.validate()

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> ViewSettings:
        """Settings from a config mapping; unknown keys or bad values raise ConfigError."""
        if m is None:
            return cls()
        if not isinstance(m, Mapping):
            raise ConfigError(f"view settings: expected a mapping of keys to values, found "
                              f"{type(m).__name__} ({m!r}).")
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in m if k not in names)
        if unknown:
            raise ConfigError(f"view settings: unknown key(s) {unknown}. Expected some of "
                              f"{names}; check the spelling.")
        return cls(**dict(m))

    def validate(self) -> None:
        """Raise ConfigError naming the first bad setting, its value and what is expected."""

        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"view setting {key!r}: expected {expected}, found "
                                  f"{getattr(self, key)!r}.")

        need(_is_int(self.views_per_image) and self.views_per_image >= 0, "views_per_image",
             "an integer >= 0 (0 disables views)")
        need(_is_int(self.size) and self.size >= 8, "size", "an integer >= 8 (pixels)")
        lo_hi = self.scale
        need(isinstance(lo_hi, tuple) and len(lo_hi) == 2 and all(map(_is_number, lo_hi))
             and 0 < lo_hi[0] <= lo_hi[1] and math.isfinite(lo_hi[1]), "scale",
             "two numbers [low, high] with 0 < low <= high (object's longest side relative "
             "to the view side)")
        need(isinstance(self.rotate, bool), "rotate", "true or false")
        need(_is_number(self.max_cut) and 0 <= self.max_cut < 1, "max_cut",
             "a number in [0, 1) (share of the object allowed outside the view per axis)")
        need(_is_int(self.object_threshold) and 0 <= self.object_threshold <= 254,
             "object_threshold", "an integer grey level in [0, 254]")
        need(self.mask in MASK_KINDS, "mask", f"one of {list(MASK_KINDS)}")
        need(_is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0")
        need(isinstance(self.background, str) and bool(self.background), "background",
             f"one of {list(BACKGROUND_KINDS)} or a folder of background photos")
        if self.background not in BACKGROUND_KINDS:
            folder = Path(self.background)
            if not folder.is_dir():
                raise ConfigError(
                    f"view setting 'background': expected one of {list(BACKGROUND_KINDS)} or "
                    f"a folder of background photos, found {self.background!r} (no such "
                    f"folder). Fix: check the path or use 'clutter'.")
            _background_files(folder)  # raises ConfigError naming an empty folder

    def to_dict(self) -> dict:
        """JSON-friendly dict of all settings (``scale`` as a list)."""
        out = asdict(self)
        out["scale"] = list(self.scale)
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and math.isfinite(float(value)))


# ---------------------------------------------------------------------------- backgrounds


def clutter_background(size: int, rng: np.random.Generator, clutter: bool = True) -> Image.Image:
    """Dark soil-like noise with grey stones, twigs and blobs (clutter, unless switched off).

    Draws from ``rng`` exactly as ``bench/synthetic_plots.background`` does, so both give
    the same image for the same generator state.
    """
    noise = rng.normal(45, 18, (max(1, size // 4), max(1, size // 4), 3))
    img = Image.fromarray(noise.clip(0, 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BILINEAR)
    if not clutter:
        return img.filter(ImageFilter.GaussianBlur(1))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(15, 40)):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(5, 40))
        g = int(rng.integers(60, 140))
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r // 2, x + r, y + r // 2), fill=(g, g - 10, g - 20))
        else:
            x2, y2 = x + int(rng.integers(-120, 120)), y + int(rng.integers(-120, 120))
            draw.line((x, y, x2, y2), fill=(g, g - 20, g - 40), width=int(rng.integers(2, 6)))
    return img.filter(ImageFilter.GaussianBlur(1))


def _background_files(folder: str | Path) -> list[Path]:
    """The *.jpg/*.jpeg/*.png files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    files = []
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() in BACKGROUND_SUFFIXES)
    if not files:
        what = "holds no" if folder.is_dir() else "does not exist, so it has no"
        raise ConfigError(
            f"Background folder {str(folder)!r} {what} .jpg/.jpeg/.png files. Fix: put "
            f"background photos (bare soil, litter) there, or set background to 'clutter'.")
    return files


@lru_cache(maxsize=16)
def _background_photo(path: str, size: int) -> Image.Image:
    """A background photo as RGB, shrunk (never below what a crop needs) and cached."""
    need = math.ceil(size / _CROP_MIN)  # a crop of the smallest share still has >= size px
    try:
        with Image.open(path) as img:
            img.draft("RGB", (need, need))  # JPEG: decode at a reduced scale when possible
            img.load()
            rgb = to_rgb(ImageOps.exif_transpose(img)).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(
            f"Background photo {path!r} cannot be decoded ({type(exc).__name__}: {exc}). "
            f"Fix: re-export it as JPEG/PNG or remove it from the background folder.") from exc
    short = min(rgb.size)
    if short > need:
        f = need / short
        rgb = rgb.resize((max(need, round(rgb.width * f)), max(need, round(rgb.height * f))),
                         Image.Resampling.BILINEAR)
    return rgb


def _photo_crop(files: Sequence[Path], size: int, rng: np.random.Generator) -> Image.Image:
    photo = _background_photo(str(files[int(rng.integers(len(files)))]), size)
    w, h = photo.size
    side = max(1, round(rng.uniform(_CROP_MIN, 1.0) * min(w, h)))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)


def _make_background(settings: ViewSettings, rng: np.random.Generator,
                     backgrounds: Sequence[Path]) -> Image.Image:
    size = settings.size
    if settings.background == "black":
        return Image.new("RGB", (size, size))
    if settings.background in ("noise", "clutter"):
        return clutter_background(size, rng, clutter=settings.background == "clutter")
    files = list(backgrounds) or _background_files(settings.background)
    return _photo_crop(files, size, rng)


# ---------------------------------------------------------------------------- one view


def _binary(grey: Image.Image, threshold: int) -> Image.Image:
    return grey.point(lambda v: 255 if v > threshold else 0)


def _object(image: Image.Image, settings: ViewSettings) -> tuple[Image.Image, bool]:
    """The source cropped to its object, and whether the object is thresholded (or whole)."""
    if settings.mask == "threshold":
        box = _binary(image.convert("L"), settings.object_threshold).getbbox()
        if box is not None:
            return image.crop(box), True
    # mask "none", or no pixel above the threshold: the whole image is the object
    return image, False


def _place(obj: Image.Image, use_threshold: bool, longest: float, angle: float,
           settings: ViewSettings) -> tuple[Image.Image, Image.Image] | None:
    """Resize ``obj`` to ``longest`` px, rotate it; return (pixels, mask) cropped to the mask."""
    f = longest / max(obj.size)
    w, h = max(1, round(obj.width * f)), max(1, round(obj.height * f))
    pix = obj.resize((w, h), Image.Resampling.BICUBIC)
    if use_threshold:
        if angle:
            pix = pix.rotate(angle, Image.Resampling.BICUBIC, expand=True)
        mask = _binary(pix.convert("L"), settings.object_threshold)
    else:
        mask = Image.new("L", (w, h), 255)
        if angle:
            pix = pix.rotate(angle, Image.Resampling.BICUBIC, expand=True)
            mask = _binary(mask.rotate(angle, Image.Resampling.BILINEAR, expand=True), 127)
    box = mask.getbbox()
    if box is None:
        return None
    return pix.crop(box), mask.crop(box)


def _position(extent: int, size: int, max_cut: float, rng: np.random.Generator) -> int:
    """Offset such that at most ``max_cut * extent`` pixels fall outside ``[0, size)``."""
    allowed = math.floor(max_cut * extent)
    lo, hi = -allowed, size - extent + allowed
    if hi < lo:  # only by rounding: the object was fitted to the view
        return (size - extent) // 2
    return int(rng.integers(lo, hi + 1))


def tile_view(image: Image.Image, rng: np.random.Generator, settings: ViewSettings,
              backgrounds: Sequence[Path] = ()) -> Image.Image:
    """One RGB ``settings.size`` square view of ``image`` that looks like a plot tile.

    Background (``settings.background``; ``backgrounds`` are the photo files to use for a
    folder background, listed from the folder when empty), then the source object
    (pixels above ``object_threshold``, or the whole image for ``mask="none"`` or when no
    pixel is above it) resized so its longest side is ``uniform(*scale) * size``, rotated
    (``expand=True``) when ``rotate``, pasted at a random position with at most
    ``max_cut`` of its width and of its height outside the view. A rotated object too big
    for that is shrunk until it fits.
    """
    size = settings.size
    view = _make_background(settings, rng, backgrounds).convert("RGB")
    obj, use_threshold = _object(image.convert("RGB"), settings)
    longest = float(rng.uniform(*settings.scale)) * size
    angle = float(rng.uniform(0.0, 360.0)) if settings.rotate else 0.0
    placed = _place(obj, use_threshold, longest, angle, settings)
    for _ in range(8):  # too big to meet max_cut (rotated, scale > 1): shrink until it fits
        if placed is None:
            return view
        extent = max(placed[0].size)
        if extent * (1.0 - settings.max_cut) <= size:
            break
        longest = min(longest * size / (extent * (1.0 - settings.max_cut)), longest - 1.0)
        placed = _place(obj, use_threshold, longest, angle, settings)
    if placed is None:
        return view
    pix, mask = placed
    x = _position(pix.width, size, settings.max_cut, rng)
    y = _position(pix.height, size, settings.max_cut, rng)
    view.paste(pix, (x, y), mask)
    return view


def paste_object(view: Image.Image, image: Image.Image, rng: np.random.Generator,
                 settings: ViewSettings, *, max_cut: float | None = None) -> bool:
    """Paste the object of ``image`` into ``view`` (in place), as :func:`tile_view` places
    one: longest side ``uniform(*scale) * size``, rotated ``uniform(0, 360)`` degrees when
    ``rotate``, at a random position with at most ``max_cut`` (default the settings') of
    its width and height outside a ``size`` square. Draws from ``rng`` in that order.
    Returns False (``view`` untouched) when the object vanished at that scale.
    """
    obj, use_threshold = _object(image.convert("RGB"), settings)
    longest = float(rng.uniform(*settings.scale)) * settings.size
    angle = float(rng.uniform(0.0, 360.0)) if settings.rotate else 0.0
    placed = _place(obj, use_threshold, longest, angle, settings)
    if placed is None:
        return False
    pix, mask = placed
    cut = settings.max_cut if max_cut is None else float(max_cut)
    view.paste(pix, (_position(pix.width, settings.size, cut, rng),
                     _position(pix.height, settings.size, cut, rng)), mask)
    return True


# ---------------------------------------------------------------------------- many views


def stable_int(text: str) -> int:
    """A 63-bit integer from the SHA-256 of ``text`` (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(str(text).encode("utf-8")).digest()[:8], "big") >> 1


def _safe_name(image_id: str) -> str:
    """A file-name-safe form of ``image_id``; ids that had to change get a hash suffix."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", image_id)
    if safe == image_id and 0 < len(safe) <= 100 and not safe.startswith("."):
        return safe
    digest = hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:10]
    return f"{safe.lstrip('.')[:80]}-{digest}"


def _check_folder(root: Path, settings: ViewSettings) -> None:
    """Raise CacheError unless ``root`` is new or was made with the same settings."""
    expected = {"format_version": FORMAT_VERSION, **settings.to_dict()}
    path = root / SETTINGS_FILE
    fix = (f"Fix: use a new folder for these settings, or delete {str(root)!r} to rebuild "
           f"it.")
    if not path.is_file():
        views = root / VIEWS_DIR
        if views.is_dir() and any(views.glob("*.jpg")):
            raise CacheError(f"View folder {str(root)!r} holds views but no {SETTINGS_FILE}, "
                             f"so their settings are unknown. {fix}")
        return
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(found, dict):
            raise ValueError(f"expected a JSON object, found {type(found).__name__}")
    except (OSError, ValueError) as exc:
        raise CacheError(f"View folder {str(root)!r}: {SETTINGS_FILE} is unreadable "
                         f"({exc}). {fix}") from exc
    diffs = [f"{key}: expected {json.dumps(expected.get(key))}, found "
             f"{json.dumps(found.get(key))}"
             for key in sorted(set(expected) | set(found))
             if key not in _NOT_IDENTITY and expected.get(key) != found.get(key)]
    if diffs:
        raise CacheError(f"View folder {str(root)!r} was made with other settings: "
                         f"{'; '.join(diffs)}. {fix}")


def _save_jpeg(path: Path, view: Image.Image) -> None:
    atomic_write(path, lambda fh: view.save(fh, format="JPEG", quality=90), mode="wb")


def write_views(items: Sequence[tuple[str, str | Path]], out_dir: str | Path,
                settings: ViewSettings, *, progress: bool = False) -> pd.DataFrame:
    """Write ``settings.views_per_image`` views of each ``(image_id, path)`` item.

    Views go to ``out_dir/views/<safe image_id>__v<k>.jpg``; the result has one row per
    view: ``view_id`` (``"<image_id>#v<k>"``), ``source_id``, ``path`` (absolute) and
    ``k``. Existing view files are reused, new ones written atomically. Sources that
    cannot be opened are listed in ``out_dir/failures.csv`` (always written) and left out
    of the result; :class:`ImageError` when all fail. :class:`CacheError` when
    ``out_dir`` was made with other settings (``views_per_image`` may differ).
    """
    items = [(str(image_id), Path(path)) for image_id, path in items]
    if settings.views_per_image == 0 or not items:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "k" else "object")
                             for c in VIEW_COLUMNS})
    names: dict[str, str] = {}
    for image_id, _ in items:
        name = _safe_name(image_id)
        if name in names:
            first = names[name]
            raise CacheError(
                f"Image ids must be unique within one view run; {image_id!r} "
                + ("repeats" if first == image_id else f"and {first!r} give the same file "
                   f"name {name!r}") + ". Fix: deduplicate or rename the ids.")
        names[name] = image_id

    root = Path(out_dir).resolve()
    _check_folder(root, settings)
    views_dir = root / VIEWS_DIR
    views_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / SETTINGS_FILE, {"format_version": FORMAT_VERSION,
                                             **settings.to_dict()})
    files = (_background_files(settings.background)
             if settings.background not in BACKGROUND_KINDS else [])

    rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="views", unit="image", dynamic_ncols=True)
    try:
        for image_id, src in items:
            name = _safe_name(image_id)
            targets = [views_dir / f"{name}__v{k}.jpg" for k in range(settings.views_per_image)]
            missing = [k for k, t in enumerate(targets) if not t.is_file()]
            if missing:
                try:
                    image = load_image(src)
                except ImageError as exc:
                    failures.append({"image_id": image_id, "path": str(src), "error": str(exc)})
                    if bar is not None:
                        bar.update(1)
                    continue
                for k in missing:
                    rng = np.random.default_rng([settings.seed, stable_int(image_id), k])
                    _save_jpeg(targets[k], tile_view(image, rng, settings, files))
            rows.extend({"view_id": f"{image_id}#v{k}", "source_id": image_id,
                         "path": str(t), "k": k} for k, t in enumerate(targets))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    atomic_write_csv(root / FAILURES, pd.DataFrame(failures,
                                                   columns=["image_id", "path", "error"]))
    if not rows:
        shown = "; ".join(f["error"] for f in failures[:3])
        raise ImageError(
            f"None of the {len(items)} source image(s) could be opened, so no views were "
            f"written (see {str(root / FAILURES)!r}; first: {shown}). Fix: check the image "
            f"paths / image root.")
    return pd.DataFrame(rows, columns=VIEW_COLUMNS).astype({"k": "int64"})
