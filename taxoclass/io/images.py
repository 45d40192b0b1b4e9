"""Open images as RGB, with errors that name the file, the problem and the fix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from taxoclass.errors import AnnotationError, ImageError

__all__ = ["load_image", "load_transformed"]


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


def _open(path: str | Path) -> Image.Image:
    """Decode ``path`` fully (any mode), with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not an image file" if path.is_dir() else "does not exist"
        raise ImageError(
            f"Image {str(path)!r} {what}. Fix: check the path (relative paths are resolved "
            f"against the image root / current directory) or remove the record."
        )
    try:
        with Image.open(path) as img:
            img.load()
            out = img if img.mode in ("L", "RGB") else img.convert("RGB")
            if out is img:
                out = img.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(
            f"Image {str(path)!r} cannot be decoded ({type(exc).__name__}: {exc}). "
            f"Fix: re-download or re-export the file as JPEG/PNG, or remove the record."
        ) from exc
    return out


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image paths.

    A missing file with an image suffix is kept (it becomes a recorded failure, not a
    crash); anything else that does not exist raises :class:`~taxoclass.errors.AnnotationError`.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.exists() or p.suffix.lower() in IMAGE_SUFFIXES:
            out.append(p)
        else:
            raise AnnotationError(f"{p}: no such file or folder. Pass image files or folders.")
    if not out:
        raise AnnotationError(f"No images found in {[str(i) for i in inputs]} (looked for "
                              f"{', '.join(IMAGE_SUFFIXES)}).")
    return out
