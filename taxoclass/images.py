"""Open images as RGB, with errors that name the file, the problem and the fix."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from taxoclass.errors import ImageError

__all__ = ["load_image"]


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` fully decoded as an RGB :class:`PIL.Image.Image`.

    The pixels are decoded here (``img.load()``), so a truncated or corrupt file fails
    now with an :class:`ImageError` rather than later inside a transform.
    """
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
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(
            f"Image {str(path)!r} cannot be decoded ({type(exc).__name__}: {exc}). "
            f"Fix: re-download or re-export the file as JPEG/PNG, or remove the record."
        ) from exc
    return rgb
