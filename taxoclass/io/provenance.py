"""Provenance: what produced an output directory (version, config, backbone, command).

Every JSON file a command writes for its user carries the same small header
(:func:`output_header`: tool, version, model id, creation time, command), written by
:func:`write_json_output` under ``"header"`` (or another key, e.g. ``"info"`` in a COCO
annotation file, where COCO readers ignore it).

The command line is passed in (``write_provenance(command=...)``); without it, the one
recorded for the current call by :func:`recorded_command` (the CLI wraps each invocation
in it), else this process's ``sys.argv``. Nothing is kept in a module global: a command
recorded by one CLI call never leaks into a later library call.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
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
TOOL = "taxoclass"
HEADER_KEY = "header"
HEADER_FIELDS = ("tool", "version", "model_id", "created", "command")


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
        "created": _now(),
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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def model_id_of(parts: Mapping[str, str] | None = None, description: Any = None) -> str:
    """A model's id: 16 hex digits of the sha256 of its part hashes (a bundle's
    ``bundle.json`` ``parts``), else of its description (e.g. a checkpoint's settings)."""
    obj = dict(sorted(parts.items())) if parts else description
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def model_id_for(model: Any) -> str:
    """The id of a model object: its ``model_id`` if it has one, else :func:`model_id_of`
    its bundle's ``parts`` (a classifier's ``.bundle`` or a bundle), else its
    ``describe()`` (a checkpoint without parts)."""
    bundle = getattr(model, "bundle", model)
    own = getattr(bundle, "model_id", None)
    if isinstance(own, str) and own:
        return own
    parts = getattr(bundle, "parts", None)
    if parts:
        return model_id_of(parts)
    describe = getattr(model, "describe", None)
    return model_id_of(description=describe() if callable(describe) else repr(model))


def output_header(*, model_id: str | None = None,
                  command: str | Sequence[str] | None = None) -> dict[str, Any]:
    """The header of every JSON output: ``tool``, ``version``, ``model_id`` (None when no
    model wrote it), ``created`` (ISO-8601 UTC) and ``command`` (default
    :func:`command_line`)."""
    if not isinstance(command, str) or not command:
        command = command_line(command or None)
    return {"tool": TOOL, "version": __version__, "model_id": model_id, "created": _now(),
            "command": command}


def write_json_output(path: str | Path, payload: Mapping[str, Any] | Sequence[Any], *,
                      model_id: str | None = None, key: str = HEADER_KEY,
                      items: str = "items", command: str | Sequence[str] | None = None
                      ) -> Path:
    """Write ``payload`` as JSON with :func:`output_header` under ``key`` (first).

    A mapping keeps its own keys after the header (an existing ``key`` entry is replaced);
    a list becomes ``{key: header, items: payload}``.
    """
    head = output_header(model_id=model_id, command=command)
    if isinstance(payload, Mapping):
        body = {key: head, **{k: v for k, v in payload.items() if k != key}}
    else:
        body = {key: head, items: list(payload)}
    return atomic_write_json(path, body)


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
