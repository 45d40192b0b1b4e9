"""Atomic writes: a reader never sees a half-written file or a half-replaced folder.

Single files: :func:`atomic_write` writes to a temporary file in the target's folder,
fsyncs it and renames it into place (``os.replace`` is atomic on POSIX and Windows). Files
get the mode the process umask gives (``mkstemp`` alone would make them 0600).

Folders: :func:`output_folder` stages a whole output folder and swaps it in as a unit.
For ``out = P/N`` and a fresh token ``T``:

1. the job writes every file into the stage ``P/.N.stage-T`` (a hidden sibling, so
   renames stay on one file system); the stage is locked (``flock``) while its run lives;
2. commit: every file and folder of the stage is fsynced;
3. each ``keep`` entry is renamed ``P/N/E -> P/.N.stage-T/E`` (unless the job wrote its own
   ``E``), the stage is fsynced;
4. the stage and ``P/N`` are exchanged in one atomic step (Linux ``renameat2`` with
   ``RENAME_EXCHANGE``): ``P/N`` is the new folder, the stage holds the old one. Where the
   system cannot exchange: rename ``P/N -> P/.N.old-T``, then ``P/.N.stage-T -> P/N``;
5. ``P`` is fsynced and the old folder removed.

A kill at any point leaves the complete new folder at ``out`` (after 4) or the old one,
whose keep entries may sit in the stage (3) and which, in the two-rename fallback, may sit
at ``.N.old-T`` with ``out`` absent (between the two renames of 4). The next
:func:`output_folder` or :func:`recover_output_folder` call on ``out`` (train calls it at
its start, a bundle load when ``out`` is missing) repairs this: with ``out`` absent it
renames ``.N.old-T`` back to ``out``, with ``out`` present it removes ``.N.old-T``; keep
entries in a dead run's stage go back into ``out``, then the stage is removed, as are
``.*.tmp`` orphans of :func:`atomic_write` at the top of ``out``. Stages and old folders of
a run that still holds its lock are left alone.

What is carried over: only the ``keep`` entries (names or glob patterns) of the previous
folder, e.g. a persistent embedding store or Spark's resumable ``*.parquet`` folders, which
the job may update in place in ``out`` while it runs. Everything else in the previous
folder belongs to the previous output and is replaced: a file the new run did not write
(say, an old ``failures.csv`` or ``openset.npz``) must not sit beside the new outputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

try:  # POSIX; elsewhere a stage is never taken for a live run's
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

from ..errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_write_csv",
           "check_output_folder", "output_folder", "recover_output_folder", "fsync_tree",
           "file_mode", "process_umask"]


# ---------------------------------------------------------------------------- modes
def process_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``); 0o022 when
    it cannot be read (setting it to read it back would race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def file_mode(*, folder: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file (folder) under the umask."""
    return (0o777 if folder else 0o666) & ~process_umask()


# ---------------------------------------------------------------------------- single files
def atomic_write(path: str | Path, write: Callable[[IO], None], *, mode: str = "w") -> Path:
    """Call ``write(fh)`` on a temporary file, fsync it, then move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda fh: json.dump(obj, fh, indent=2, default=_jsonable))


def atomic_write_csv(path: str | Path, frame) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    return atomic_write(path, lambda fh: frame.to_csv(fh, index=False))


def _jsonable(obj: Any) -> Any:
    """json.dump fallback for numpy scalars/arrays, paths and tuples."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems refuse fsync on folders
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` (files first, then their folders)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = Path(folder) / name
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(folder))


# ---------------------------------------------------------------------------- folders
def check_output_folder(out: str | Path) -> Path:
    """Refuse, before any work, an output folder that cannot be written.

    ``out`` must be a folder or not exist yet; the nearest existing folder above it must be
    writable (the output is swapped in by renames in its parent). Raises ConfigError
    naming the path and the fix.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out} is an existing file, not a folder. Choose "
                          "another output path (--out / config 'out') or remove the file.")
    parent = out.parent if out.is_dir() else out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output folder {out}: {parent} is a file, so the folder cannot be "
                          "created. Choose another output path (--out / config 'out').")
    for folder in ([out] if out.is_dir() else []) + [parent]:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"output folder {out}: {folder} is not writable. Choose another "
                              "output path (--out / config 'out') or fix its permissions.")
    return out


def _names(out: Path) -> tuple[str, str]:
    return f".{out.name}.stage-", f".{out.name}.old-"


def _lock(path: Path) -> int | None:
    """An exclusive lock on folder ``path`` held by this process (its fd), or None."""
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _is_live(path: Path) -> bool:
    """True when a running process holds the lock of stage ``path``."""
    if fcntl is None or not path.is_dir():  # pragma: no cover
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we took
    return False


def _rmtree(path: Path) -> None:
    """Remove a file or folder; entries another process removes meanwhile are no error."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    for _ in range(3):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            continue


def _keep_entries(folder: Path, keep: Iterable[str]) -> list[str]:
    pats = list(keep)
    if not pats or not folder.is_dir():
        return []
    return sorted(e.name for e in folder.iterdir()
                  if any(fnmatch.fnmatchcase(e.name, p) for p in pats))


def recover_output_folder(out: str | Path, keep: Iterable[str] = ()) -> None:
    """Repair what a killed :func:`output_folder` left beside ``out`` (see the module doc)."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return
    stage_prefix, old_prefix = _names(out)
    siblings = sorted(parent.iterdir())
    stages = {p.name[len(stage_prefix):]: p for p in siblings if p.name.startswith(stage_prefix)}
    dead = {t: p for t, p in stages.items() if not _is_live(p)}
    for old in (p for p in siblings if p.name.startswith(old_prefix)):
        token = old.name[len(old_prefix):]
        if token in stages and token not in dead:
            continue  # a running swap
        if out.exists():
            _rmtree(old)
            continue
        try:
            os.rename(old, out)
            log.warning("restored %s: a run was killed while replacing it", out)
        except OSError as exc:  # e.g. another run's folder appeared meanwhile
            log.warning("could not restore %s from %s: %s", out, old, exc)
    for stage in dead.values():
        try:
            if out.is_dir():  # keep entries moved out of ``out`` go back
                for name in _keep_entries(stage, keep):
                    if not (out / name).exists():
                        os.rename(stage / name, out / name)
        except OSError as exc:
            log.warning("left %s in place: %s", stage, exc)
            continue
        _rmtree(stage)
    if out.is_dir():
        for tmp in out.glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def output_folder(out: str | Path, keep: Iterable[str] = ()) -> Iterator[Path]:
    """Stage an output folder and replace ``out`` with it as a unit on normal exit.

    Yields the stage (a hidden sibling of ``out``): write every output file there. On an
    exception the stage is removed and ``out`` is untouched. ``keep``: names or glob
    patterns of entries of the previous ``out`` (e.g. ``"embeddings"``, ``"*.parquet"``)
    that are carried over into the new folder unless the job wrote its own; every other
    entry of the previous folder is replaced. See the module doc for the protocol.
    """
    out = Path(out)
    if out.is_symlink():
        out = out.resolve()
    keep = tuple(keep)
    check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_output_folder(out, keep)
    stage_prefix, old_prefix = _names(out)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=stage_prefix))
    lock, committing = None, False
    try:
        os.chmod(stage, file_mode(folder=True))
        lock = _lock(stage)
        yield stage
        committing = True
        _commit(stage, out, keep)
    except BaseException:
        held = [n for n in _keep_entries(stage, keep) if not (out / n).exists()]
        old = out.parent / (old_prefix + stage.name[len(stage_prefix):])
        if not committing or not (held or old.exists()):
            _rmtree(stage)  # else a failed undo: the next call's recovery needs the stage
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _commit(stage: Path, out: Path, keep: tuple[str, ...]) -> None:
    """Steps 2-5 of the module doc; a failed swap puts the previous folder back."""
    fsync_tree(stage)
    stage_prefix, old_prefix = _names(out)
    old = out.parent / (old_prefix + stage.name[len(stage_prefix):])
    for attempt in range(5):
        try:
            if out.exists():
                for name in _keep_entries(out, keep):
                    if not (stage / name).exists():
                        os.rename(out / name, stage / name)
                _fsync_path(stage)
                if _exchange(stage, out):  # one atomic step: the stage now holds the old
                    old = stage
                    break
                os.rename(out, old)
            os.rename(stage, out)
            break
        except OSError as exc:
            _undo_swap(stage, old, out, keep)
            # another run's folder appeared at ``out`` meanwhile: swap again, over it
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 4:
                raise
        except BaseException:
            _undo_swap(stage, old, out, keep)
            raise
    _fsync_path(out.parent)
    _rmtree(old)


def _undo_swap(stage: Path, old: Path, out: Path, keep: Iterable[str]) -> None:
    """Put the previous folder back at ``out`` with the keep entries moved to the stage."""
    if old.exists():
        if out.exists():  # another run's complete folder took its place: ours is obsolete
            _rmtree(old)
        else:
            os.rename(old, out)
    if out.is_dir() and stage.is_dir():
        for name in _keep_entries(stage, keep):
            if not (out / name).exists():
                os.rename(stage / name, out / name)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot, and the caller falls back to two renames."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None
