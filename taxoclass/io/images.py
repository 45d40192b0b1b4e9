"""The one image loader of every command, with errors that name the file, the problem
and the fix.

:func:`load_image` / :func:`load_transformed` decode a file fully, turn it upright (EXIF
orientation), scale high-bit-depth pixels to 8 bits (:func:`to_rgb`) and refuse, as an
:class:`~taxoclass.errors.ImageError` that batch jobs record per image, files that are
missing, unreadable, larger than PIL's decompression-bomb limit or smaller than
:data:`MIN_SIDE` px. :func:`collect_images` expands the files and folders a command is given.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from taxoclass.errors import AnnotationError, ImageError

log = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "MIN_SIDE", "collect_images", "load_image", "load_transformed",
           "to_rgb"]


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` fully decoded as an RGB :class:`PIL.Image.Image`.

    The pixels are decoded here (``img.load()``), so a truncated or corrupt file fails
    now with an :class:`ImageError` rather than later inside a transform.
    """
    return _open(path).convert("RGB")


def load_transformed(path: str | Path, transform: Callable) -> torch.Tensor:
    """``transform(load_image(path))``, with a faster path for grayscale images.

    A grayscale file (leaf silhouettes, herbarium scans) is resized and cropped in its
    one channel and only then turned into three identical channels: the same tensor,
    bit for bit, for a third of the resizing work. Transforms other than timm's usual
    resize / crop / to-tensor / normalise chain take the plain RGB path.
    """
    img = _open(path)
    steps = _gray_plan(transform) if img.mode == "L" else None
    if steps is None:
        return transform(img.convert("RGB"))
    geometric, to_tensor, normalize = steps
    for step in geometric:
        img = step(img)
    x = to_tensor(img)
    return normalize(x.expand(3, *x.shape[1:]))


def _gray_plan(transform: Callable):
    """(geometric steps, to-tensor, normalise) if ``transform`` is safe on one channel."""
    from timm.data.transforms import CenterCropOrPad, MaybeToTensor, ResizeKeepRatio
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 3 or not isinstance(steps[-1], T.Normalize) \
            or not isinstance(steps[-2], (MaybeToTensor, T.ToTensor)):
        return None
    geometric = steps[:-2]
    for step in geometric:
        if isinstance(step, CenterCropOrPad):
            fill = step.fill if isinstance(step.fill, (tuple, list)) else (step.fill,)
            if len(set(fill)) != 1 or step.padding_mode != "constant":
                return None  # a coloured border cannot be drawn in one channel
        elif not isinstance(step, (T.Resize, T.CenterCrop, ResizeKeepRatio)):
            return None
    if any(isinstance(s, CenterCropOrPad) for s in geometric):
        geometric = [_GrayPad(s) if isinstance(s, CenterCropOrPad) else s for s in geometric]
    return geometric, steps[-2], steps[-1]


class _GrayPad:
    """timm's CenterCropOrPad with its (grey) fill given as one value."""

    def __init__(self, step) -> None:
        self.step = step
        fill = step.fill if isinstance(step.fill, (tuple, list)) else (step.fill,)
        self.fill = int(fill[0])

    def __call__(self, img: Image.Image) -> Image.Image:
        from timm.data.transforms import center_crop_or_pad

        return center_crop_or_pad(img, self.step.size, fill=self.fill,
                                  padding_mode=self.step.padding_mode)


#: Images with more pixels than PIL's ``Image.MAX_IMAGE_PIXELS`` (89.5 Mpx unless a caller
#: raises it) are refused, per image, as possible decompression bombs: a PNG of a few bytes
#: can declare 30000x30000 pixels (3.6 GB decoded). A photo that big is downscaled first.
#: Images whose shorter side is under :data:`MIN_SIDE` px are refused too: an icon or a
#: broken export, not a photo of a plant (blown up to the backbone's 224 px input, each
#: pixel becomes a block of 28 px or more, and the model would still name a taxon).
MIN_SIDE = 8

_ORIENTATION = 0x0112  # EXIF tag: how the camera was held
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _open(path: str | Path) -> Image.Image:
    """Decode ``path`` fully as an ``"L"`` or ``"RGB"`` image, upright (EXIF orientation
    applied) and scaled to 8 bits; errors name the file, the reason and the fix."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not an image file" if path.is_dir() else "does not exist"
        raise ImageError(
            f"Image {str(path)!r} {what}. Fix: check the path (relative paths are resolved "
            f"against the image root / current directory) or remove the record."
        )
    try:
        with Image.open(path) as img:
            _check_size(path, img.size)
            img.load()
            out = to_rgb(_upright(img))
            if out is img:
                out = img.copy()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # over twice PIL's limit: refused by open()
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        found = f"{int(pixels.group(1)):,} pixels" if pixels else str(exc).rstrip(".")
        raise ImageError(_too_large(path, found)) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"Image {str(path)!r} cannot be decoded (cannot identify image file: empty, not "
            f"an image, or a format PIL does not read). Fix: re-export it as JPEG/PNG, or "
            f"remove the record.") from exc
    except Exception as exc:  # noqa: BLE001 - a decoder may raise anything on a broken file
        raise ImageError(
            f"Image {str(path)!r} cannot be decoded ({type(exc).__name__}: {exc}). "
            f"Fix: re-download or re-export the file as JPEG/PNG, or remove the record."
        ) from exc
    return out


def _too_large(path: Path, found: str) -> str:
    return (f"Image {str(path)!r} is too large: {found}; taxoclass decodes at most "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels (PIL.Image.MAX_IMAGE_PIXELS; larger files are "
            f"refused as possible decompression bombs). Fix: downscale it (e.g. to 8000 px "
            f"on the long side) or remove the record.")


def _check_size(path: Path, size: tuple[int, int]) -> None:
    """Refuse decompression bombs and degenerate images before decoding a pixel."""
    w, h = size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        raise ImageError(_too_large(path, f"{w}x{h} = {w * h:,} pixels"))
    if min(w, h) < MIN_SIDE:
        raise ImageError(
            f"Image {str(path)!r} is {w}x{h} px; taxoclass needs at least {MIN_SIDE} px on "
            f"each side (a smaller image is an icon or a broken export, not a photo of a "
            f"plant, and would still be named as a taxon). Fix: use the full-size photo or "
            f"remove the record.")


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (the image itself when no tag)."""
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - broken EXIF: the pixels are still usable
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as ``"L"`` (grayscale) or ``"RGB"`` with 8 bits per channel.

    ``"L"`` and ``"RGB"`` images are returned as they are. High-bit-depth grayscale is
    *scaled*, not clipped: 16-bit modes (``I;16``...) by 255/65535, so a 16-bit copy of an
    8-bit photo gives back the 8-bit pixels; 32-bit integer (``I``) and float (``F``) images
    by the range their values use (0-255, 0-65535, or 0-1 for floats; else their min-max).
    Every other mode (RGBA, palette, CMYK, LA, 1-bit...) goes through PIL's RGB conversion.
    """
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in _HIGH_BIT_MODES:
        return Image.fromarray(_to_8bit(np.asarray(img), img.mode), mode="L")
    return img.convert("RGB")


def _to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """Gray values of any depth as uint8, scaled by the range the mode or data uses."""
    x = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        top, lo = 65535.0, 0.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        top, lo = 1.0, 0.0
    elif lo >= 0.0 and hi <= 255.0:
        top, lo = 255.0, 0.0
    elif lo >= 0.0 and hi <= 65535.0:
        top, lo = 65535.0, 0.0
    else:
        top = hi if hi > lo else lo + 1.0
    scaled = (x - lo) * (255.0 / (top - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


#: What folder scans pick up (GIF: its first frame is read).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image paths.

    A missing file with an image suffix is kept (it becomes a recorded failure, not a
    crash); anything else that does not exist raises :class:`~taxoclass.errors.AnnotationError`.
    Files in a folder without an image suffix (:data:`IMAGE_SUFFIXES`; ``readme.txt``,
    ``.DS_Store``...) are left out, never silently: a warning counts them and names a few.
    """
    out: list[Path] = []
    skipped: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.rglob("*"))
            out.extend(q for q in found if q.suffix.lower() in IMAGE_SUFFIXES)
            skipped.extend(q for q in found
                           if q.suffix.lower() not in IMAGE_SUFFIXES and not q.is_dir())
        elif p.exists() or p.suffix.lower() in IMAGE_SUFFIXES:
            out.append(p)
        else:
            raise AnnotationError(f"{p}: no such file or folder. Pass image files or folders.")
    if skipped:
        names = ", ".join(q.name for q in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        log.warning("skipped %d file(s) that are not images (%s): %s", len(skipped),
                    "suffix not one of " + " ".join(IMAGE_SUFFIXES), names)
    if not out:
        raise AnnotationError(f"No images found in {[str(i) for i in inputs]} (looked for "
                              f"{', '.join(IMAGE_SUFFIXES)}).")
    return out
