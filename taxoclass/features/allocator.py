"""Opt-in tuning of the process's CPU memory allocator for embedding loops.

The library never calls this on its own (it does not change process-wide state unasked):
the ``taxoclass`` CLI turns it on for its commands, a Python caller may call
:func:`tune_cpu_allocator` (or pass ``tune_allocator=True`` to
:func:`~taxoclass.features.backbones.create_backbone`). Imports nothing heavy, so the
CLI can call it before any command runs.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["MALLOC_TUNING_ENV", "tune_cpu_allocator"]

logger = logging.getLogger(__name__)

#: Set to ``0`` to keep glibc's defaults even where tuning is asked for.
MALLOC_TUNING_ENV = "TAXOCLASS_MALLOC_TUNING"
_tuned: list[bool] = []  # the result once applied: tuning is per process, done once


def tune_cpu_allocator() -> bool:
    """Keep freed activation buffers in glibc's heap instead of returning them to the OS.

    glibc serves buffers over its mmap threshold (dynamic, from 128 KiB) with fresh
    ``mmap`` calls and trims freed heap memory, so every CNN forward pass page-faults its
    activations in again: measured on 2 cores, EfficientNet-Lite0 embedding ran at ~47
    images/s by default and ~80-86 with the thresholds raised (bench/pipeline_throughput.py).
    Peak memory does not grow (the same buffers are reused). glibc on Linux only; a
    no-op elsewhere or with ``TAXOCLASS_MALLOC_TUNING=0``. Returns whether it applied.
    """
    if _tuned:
        return _tuned[0]
    applied = False
    if os.environ.get(MALLOC_TUNING_ENV, "1") != "0" and sys.platform.startswith("linux"):
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            applied = bool(libc.mallopt(m_mmap_threshold, 256 << 20)
                           and libc.mallopt(m_trim_threshold, 1 << 30))
        except (OSError, AttributeError):  # not glibc
            applied = False
    _tuned.append(applied)
    logger.debug("CPU allocator tuning %s", "applied" if applied else "not applied")
    return applied
