"""Image ``file_name``s of an annotation file: inside the images root, and real names.

A ``file_name`` is relative to the images root. One that is absolute, or that climbs out
with ``..``, reads a file the root does not hold (``../../etc/passwd``): refused unless
allowed, by :func:`outside_root_allowed` (what ``--allow-outside-root`` and the config key
``data.allow_outside_root`` switch on for the jobs that load annotations) or by the
``allow_outside_root`` argument of the loaders.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar

_ALLOW_OUTSIDE_ROOT: ContextVar[bool] = ContextVar("allow_outside_root", default=False)


@contextlib.contextmanager
def outside_root_allowed(allow: bool = True) -> Iterator[None]:
    """Within this block, annotation files may name images outside the images root."""
    token = _ALLOW_OUTSIDE_ROOT.set(bool(allow) or _ALLOW_OUTSIDE_ROOT.get())
    try:
        yield
    finally:
        _ALLOW_OUTSIDE_ROOT.reset(token)


def outside_root_is_allowed() -> bool:
    """True inside an :func:`outside_root_allowed` block."""
    return _ALLOW_OUTSIDE_ROOT.get()


def outside_root_reason(file_name: str) -> str | None:
    """Why ``file_name`` is not a path inside the images root, or ``None`` if it is."""
    if os.path.isabs(file_name) or file_name.startswith(("/", "\\", "~")) or (
            file_name[:1].isalpha() and file_name[1:3] in (":/", ":\\")):
        return "an absolute path"
    norm = os.path.normpath(file_name.replace("\\", "/"))
    if norm == ".":
        return "the images root itself"
    if norm == ".." or norm.startswith("../"):
        return "a path that leaves the images root ('..')"
    return None


def control_characters(file_name: str) -> list[str]:
    """The control characters in ``file_name`` (``["\\x00"]``), which no real path holds."""
    return sorted({f"\\x{ord(c):02x}" for c in file_name if ord(c) < 32 or ord(c) == 127})
