"""Provenance: what produced an output directory (version, config, backbone, command)."""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import sys
from collections.abc import Mapping
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


_COMMAND_LINE: list[str] | None = None


def set_command_line(argv: list[str]) -> None:
    """Record the command line being run (the CLI calls this; tests may too)."""
    global _COMMAND_LINE
    _COMMAND_LINE = list(argv)


def command_line() -> str:
    argv = _COMMAND_LINE or [Path(sys.argv[0]).name, *sys.argv[1:]]
    return " ".join(shlex.quote(str(a)) for a in argv)


def write_provenance(out_dir: str | Path, *, config: Mapping[str, Any] | None = None,
                     backbone: Mapping[str, Any] | None = None,
                     extra: Mapping[str, Any] | None = None,
                     command: str | None = None) -> Path:
    """Write ``provenance.json`` (and ``config.yaml`` when a config is given) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or command_line(),
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
