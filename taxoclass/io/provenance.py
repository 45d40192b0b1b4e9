"""Provenance: what produced an output directory (version, config, backbone, command).

The command line is passed in (``write_provenance(command=...)``); without it, the one
recorded for the current call by :func:`recorded_command` (the CLI wraps each invocation
in it), else this process's ``sys.argv``. Nothing is kept in a module global: a command
recorded by one CLI call never leaks into a later library call.
"""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml

from .._version import __version__
from .files import atomic_write_json, atomic_write_text

PROVENANCE_FILE = "provenance.json"
CONFIG_FILE = "config.yaml"


def environment() -> dict[str, str]:
    """Versions of the packages that decide the numbers we write."""
    info = {"taxoclass": __version__, "python": platform.python_version(),
            "platform": platform.platform()}
    for mod in ("torch", "timm", "numpy", "pandas", "sklearn", "pyod"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    return info


_RECORDED: ContextVar[tuple[str, ...] | None] = ContextVar("taxoclass_command", default=None)


@contextmanager
def recorded_command(argv: Sequence[str]) -> Iterator[None]:
    """Within the block, provenance written without a ``command`` records ``argv``.

    The CLI runs each invocation inside ``recorded_command(["taxoclass", *args])``; the
    value is restored on exit (a context variable, not a process-wide global).
    """
    token = _RECORDED.set(tuple(str(a) for a in argv))
    try:
        yield
    finally:
        _RECORDED.reset(token)


def command_line(argv: Sequence[str] | None = None) -> str:
    """``argv`` as one shell-quoted string; default: the :func:`recorded_command`, else
    ``sys.argv`` (program name without its folder)."""
    if argv is None:
        argv = _RECORDED.get() or [Path(sys.argv[0]).name, *sys.argv[1:]]
    return " ".join(shlex.quote(str(a)) for a in argv)


def write_provenance(out_dir: str | Path, *, config: Mapping[str, Any] | None = None,
                     backbone: Mapping[str, Any] | None = None,
                     extra: Mapping[str, Any] | None = None,
                     command: str | Sequence[str] | None = None) -> Path:
    """Write ``provenance.json`` (and ``config.yaml`` when a config is given) into ``out_dir``.

    ``command``: the command line that produced the outputs (a string, or argv to quote);
    default :func:`command_line`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(command, str):
        command = command_line(command)  # None: the recorded command, else sys.argv
    elif not command:
        command = command_line()
    record = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "environment": environment(),
        "backbone": dict(backbone) if backbone else None,
        "config": dict(config) if config else None,
    }
    if extra:
        record.update(extra)
    if config:
        atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(_plain(dict(config)), sort_keys=False))
    return atomic_write_json(out / PROVENANCE_FILE, record)


def _plain(obj: Any) -> Any:
    """Make a config YAML-safe (paths and tuples to str/list)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return obj
