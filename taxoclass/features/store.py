"""Content-addressed embedding store: one vector per (image bytes, backbone identity).

Layout of a store folder (``<cache folder>/store``)::

    .lock                         fcntl lock: one writer at a time (others wait)
    paths.json                    resolved path -> [size, mtime_ns, ctime_ns, sha256, hashed_at_ns]
    specs.json                    backbone spec key -> identity hash (finds vectors without
                                  loading the model)
    <identity>/identity.json      the backbone description (name, weights, preprocessing)
    <identity>/vectors/*.npz      keys (sha256 of the image bytes), embeddings [k, d] float32

A vector is found by the sha256 of the image's bytes, never by an image id or a path, so
two paths with the same bytes share a vector and a file replaced in place is embedded
again. ``paths.json`` only saves rehashing: its entry is trusted while size, mtime and
ctime are unchanged and the file was already older than the hash (else it is rehashed).
Each backbone identity (weights and preprocessing) has its own sub-folder, so several
live side by side. Vector files are written atomically under content-derived names;
a damaged one is reported, removed and its vectors computed again. Failed images are
never stored: they are tried again on every run.

:func:`embed_into_store` gives the vectors of a list of files in that order, computing
the missing ones chunk by chunk (chunk and batch boundaries fixed by the list, so a
resumed run gives bit-identical vectors).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from taxoclass.errors import CacheError
from taxoclass.features.backbones import Backbone
from taxoclass.features.batching import auto_batch_size, embed_batches
from taxoclass.io.files import atomic_write, atomic_write_json

try:  # POSIX; elsewhere runs on one store are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = ["IDENTITY_KEYS", "STORE_DIR", "EmbeddingStore", "StoreResult", "embed_into_store",
           "identity_hash", "sha256_file"]

Progress = Callable[[int, int], None]

STORE_DIR = "store"
LOCK = ".lock"
PATHS_INDEX = "paths.json"
SPECS = "specs.json"
IDENTITY_FILE = "identity.json"
VECTOR_DIR = "vectors"
STORE_FORMAT = 1
# Backbone description keys that decide whether two vectors are comparable.
IDENTITY_KEYS = (
    "name",
    "checkpoint_sha256",
    "weights_fingerprint",
    "model_kwargs",
    "num_features",
    "memory_format",
    "data_config",
    "transform",
    "autocast",
    "data_overrides",
)
# What an identity key means when an older description lacks it.
IDENTITY_DEFAULTS = {"data_overrides": {}}
# A file changed less than this before it was hashed may change again within one mtime
# tick unseen, so its index entry is not trusted (as git does for "racy" files).
RACY_NS = 2_000_000_000
_DAMAGE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def identity_hash(description: dict[str, Any]) -> str:
    """A short hash of the identity keys of a backbone description."""
    ident = {k: description.get(k, IDENTITY_DEFAULTS.get(k)) for k in IDENTITY_KEYS}
    text = json.dumps({"format": STORE_FORMAT, **ident}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def can_write(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (its nearest existing ancestor)."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return False
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".taxoclass-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


class EmbeddingStore:
    """The vectors under ``root``; use it inside :meth:`session` (the lock)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.writable = False
        self._index: dict[str, list] | None = None
        self._index_dirty = False
        self._catalog: dict[str, dict[str, tuple[Path, int]]] = {}
        self._arrays: dict[Path, np.ndarray] = {}

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def session(self, *, overwrite: bool = False) -> Iterator[EmbeddingStore]:
        """Hold the store's lock (waiting for another run that holds it) for a batch of
        work; ``overwrite`` deletes every stored vector first. A folder that cannot be
        written is used read-only (:attr:`writable` false)."""
        self.writable = can_write(self.root)
        if self.writable:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = self._open_lock()
        try:
            if fd is not None:
                self._acquire(fd)
            if overwrite:
                self._clear()
            elif self.writable:
                self._remove_orphans()
            yield self
            self.flush_index()
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def _open_lock(self) -> int | None:
        if fcntl is None or not self.root.is_dir():
            return None
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
            try:
                return os.open(self.root / LOCK, flags, 0o644)
            except OSError:
                continue
        return None

    def _acquire(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another taxoclass run is using the embedding store %s; waiting for "
                        "it to finish", self.root)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: run unserialised

    def require_writable(self, what: str) -> None:
        if not self.writable:
            raise CacheError(f"Embedding store {str(self.root)!r} is read-only and {what}. "
                             f"Fix: make the folder writable, or pass another --out folder.")

    def _remove_orphans(self) -> None:
        """Temporary files of killed runs (no writer is active: this run holds the lock)."""
        for pattern in (".*.tmp", "*/.*.tmp", f"*/{VECTOR_DIR}/.*.tmp"):
            for tmp in self.root.glob(pattern):
                tmp.unlink(missing_ok=True)

    def _clear(self) -> None:
        self.require_writable("--overwrite would delete it")
        for entry in self.root.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self._index, self._catalog, self._arrays = None, {}, {}

    # ------------------------------------------------------------------ content keys
    def _load_json(self, name: str) -> dict:
        path = self.root / name
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s); rebuilding it", path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def content_keys(self, paths: Sequence[str | Path]) -> list[str | None]:
        """The sha256 of each file's bytes (``None`` for a missing or unreadable file)."""
        if self._index is None:
            self._index = self._load_json(PATHS_INDEX)
        return [self._key(Path(p)) for p in paths]

    def _key(self, path: Path) -> str | None:
        try:
            resolved = str(path.resolve())
            st = os.stat(resolved)
        except (OSError, RuntimeError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = self._index.get(resolved)
        if (isinstance(entry, list) and len(entry) == 5 and entry[:3] == stamp
                and max(stamp[1], stamp[2]) < entry[4] - RACY_NS):
            return str(entry[3])
        now = time.time_ns()
        try:
            sha = sha256_file(resolved)
        except OSError:
            return None
        self._index[resolved] = [*stamp, sha, now]
        self._index_dirty = True
        return sha

    def unchanged(self, path: str | Path) -> bool:
        """Whether ``path`` still has the size and times it had when it was hashed (a file
        replaced while it was embedded must not store its vector under the old hash)."""
        try:
            resolved = str(Path(path).resolve())
            st = os.stat(resolved)
        except (OSError, RuntimeError):
            return False
        entry = (self._index or {}).get(resolved)
        return isinstance(entry, list) and entry[:3] == [st.st_size, st.st_mtime_ns,
                                                        st.st_ctime_ns]

    def flush_index(self) -> None:
        """Save the path index when it changed (and the folder can be written)."""
        if self._index_dirty and self.writable:
            atomic_write_json(self.root / PATHS_INDEX, self._index)
            self._index_dirty = False

    # ------------------------------------------------------------------ identities
    def spec_identity(self, spec_key: str) -> str | None:
        """The identity a backbone spec built before (``None``: not known yet)."""
        ident = self._load_json(SPECS).get(spec_key)
        return ident if ident and (self.root / ident / IDENTITY_FILE).is_file() else None

    def remember(self, description: dict[str, Any], spec_key: str | None = None) -> str:
        """Register a backbone (its identity folder, and ``spec_key`` -> identity)."""
        ident = identity_hash(description)
        if not self.writable:
            return ident
        if not (self.root / ident / IDENTITY_FILE).is_file():
            atomic_write_json(self.root / ident / IDENTITY_FILE, description)
        if spec_key is not None:
            specs = self._load_json(SPECS)
            if specs.get(spec_key) != ident:
                atomic_write_json(self.root / SPECS, {**specs, spec_key: ident})
        return ident

    def description(self, ident: str) -> dict[str, Any]:
        return self._load_json(f"{ident}/{IDENTITY_FILE}")

    # ------------------------------------------------------------------ vectors
    def _vector_files(self, ident: str) -> dict[str, tuple[Path, int]]:
        """key -> (file, row) of every intact vector file of ``ident``."""
        if ident in self._catalog:
            return self._catalog[ident]
        where: dict[str, tuple[Path, int]] = {}
        for path in sorted((self.root / ident / VECTOR_DIR).glob("*.npz")):
            try:
                with np.load(path, allow_pickle=False) as z:
                    keys = z["keys"].tolist()
            except _DAMAGE as exc:
                self._damaged(path, exc)
                continue
            for row, key in enumerate(keys):
                where.setdefault(key, (path, row))
        self._catalog[ident] = where
        return where

    def _damaged(self, path: Path, exc: BaseException) -> None:
        log.warning("embedding store file %s is damaged (%s: %s); its vectors are computed "
                    "again", path, type(exc).__name__, exc)
        if self.writable:
            path.unlink(missing_ok=True)

    def _embeddings_of(self, path: Path, dim: int) -> np.ndarray | None:
        if path not in self._arrays:
            try:
                with np.load(path, allow_pickle=False) as z:
                    emb, n_keys = z["embeddings"], len(z["keys"])
                if emb.ndim != 2 or emb.shape != (n_keys, dim) or emb.dtype != np.float32:
                    raise ValueError(f"embeddings of shape {emb.shape} {emb.dtype}, expected "
                                     f"({n_keys}, {dim}) float32")
            except _DAMAGE as exc:
                self._damaged(path, exc)
                return None
            self._arrays[path] = emb
        return self._arrays[path]

    def lookup(self, ident: str, keys: Sequence[str | None], dim: int
               ) -> dict[str, np.ndarray]:
        """The stored vectors of ``keys`` (those found)."""
        where = self._vector_files(ident)
        found: dict[str, np.ndarray] = {}
        for key in keys:
            if key is None or key in found or key not in where:
                continue
            path, row = where[key]
            emb = self._embeddings_of(path, dim)
            if emb is None:  # damaged: forget every key of that file
                self._catalog[ident] = {k: v for k, v in where.items() if v[0] != path}
                where = self._catalog[ident]
                continue
            found[key] = emb[row]
        return found

    def put(self, ident: str, keys: list[str], embeddings: np.ndarray) -> None:
        """Store vectors (one file, named by its keys, written atomically)."""
        if not keys:
            return
        self.require_writable(f"{len(keys)} new vector(s) must be stored")
        name = hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:24]
        path = self.root / ident / VECTOR_DIR / f"v-{name}.npz"
        arrays = {"keys": np.array(keys, dtype=str),
                  "embeddings": np.ascontiguousarray(embeddings, dtype=np.float32)}
        atomic_write(path, lambda fh: np.savez(fh, **arrays), mode="wb")
        where = self._catalog.setdefault(ident, {})
        for row, key in enumerate(keys):
            where.setdefault(key, (path, row))
        self._arrays[path] = arrays["embeddings"]


@dataclass
class StoreResult:
    """Vectors of a list of files, in that order, from (and into) a store."""

    embeddings: np.ndarray          # [n, d] float32; zero rows where not ``found``
    found: np.ndarray               # [n] bool
    keys: list[str | None]          # sha256 of each file's bytes (None: unreadable)
    errors: dict[int, str]          # index -> why that image failed in this run
    n_computed: int
    n_reused: int
    complete: bool                  # False when ``max_chunks`` stopped the run early
    description: dict = field(default_factory=dict)
    identity: str = ""


# ---------------------------------------------------------------------------- embedding


def _chunks_to_embed(keys: list[str | None], have: dict, chunk_size: int) -> list[list[int]]:
    """Per chunk of the request (fixed boundaries), the rows whose vector must be
    computed: unreadable files (tried again) and the first row of each new content."""
    seen = set(have)
    chunks = []
    for start in range(0, len(keys), chunk_size):
        todo = []
        for i in range(start, min(start + chunk_size, len(keys))):
            key = keys[i]
            if key is None or key not in seen:
                todo.append(i)
                if key is not None:
                    seen.add(key)
        if todo:
            chunks.append(todo)
    return chunks


def _embed_chunks(store: EmbeddingStore, ident: str, dim: int, paths: Sequence[str],
                  keys: list[str | None], pending: list[list[int]], backbone: Backbone, *,
                  batch_size: int, num_workers: int, done: int,
                  progress: Progress | None) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Embed the ``pending`` rows; each chunk goes to the store when it is finished."""
    computed: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    batches = [todo[s : s + batch_size] for todo in pending
               for s in range(0, len(todo), batch_size)]
    chunk_of = {i: c for c, todo in enumerate(pending) for i in todo}
    left = [len(todo) for todo in pending]
    for ok_idx, feats, bad in embed_batches(paths, backbone, batches, num_workers=num_workers):
        if feats is not None and feats.shape[1] != dim:
            raise CacheError(f"Backbone returned {feats.shape[1]}-dim features but its "
                             f"num_features says {dim}. Fix: check the backbone's forward_head.")
        for row, i in enumerate(ok_idx):
            computed[i] = feats[row]
        errors.update(bad)
        chunk = chunk_of[(ok_idx or [i for i, _ in bad])[0]]
        left[chunk] -= len(ok_idx) + len(bad)
        if left[chunk] == 0 and store.writable:  # read-only: the vectors are only returned
            rows = [i for i in pending[chunk] if i in computed and keys[i] is not None
                    and store.unchanged(paths[i])]
            store.put(ident, [keys[i] for i in rows],
                      np.stack([computed[i] for i in rows]) if rows else np.zeros((0, dim)))
        done += len(ok_idx) + len(bad)
        if progress is not None:
            progress(done, len(paths))
    return computed, errors


def embed_into_store(store: EmbeddingStore, paths: Sequence[str], *, ident: str, dim: int,
                     get_backbone: Callable[[], Backbone], batch_size: int | None = None,
                     num_workers: int = 0, chunk_size: int = 512,
                     progress: Progress | None = None,
                     max_chunks: int | None = None) -> StoreResult:
    """Vectors of ``paths`` (in that order): stored ones reused by content, the rest
    computed in chunks and stored. ``get_backbone`` is called only when something must
    be computed; ``max_chunks`` stops after that many chunks (``complete`` false)."""
    keys = store.content_keys(paths)
    have = store.lookup(ident, keys, dim)
    n_reused = sum(k in have for k in keys if k is not None)
    todo = _chunks_to_embed(keys, have, chunk_size)
    pending = todo if max_chunks is None else todo[: max(0, max_chunks)]
    if progress is not None:
        progress(n_reused, len(paths))
    computed: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    if pending:
        if not store.writable:
            log.warning("embedding store %s is read-only: %d image(s) are embedded without "
                        "being stored", store.root, sum(map(len, pending)))
        backbone = get_backbone()
        computed, errors = _embed_chunks(
            store, ident, dim, paths, keys, pending, backbone,
            batch_size=batch_size or auto_batch_size(backbone.device),
            num_workers=num_workers, done=n_reused, progress=progress)
    by_key = {keys[i]: v for i, v in computed.items() if keys[i] is not None}
    emb = np.zeros((len(paths), dim), dtype=np.float32)
    found = np.zeros(len(paths), dtype=bool)
    for i, key in enumerate(keys):
        vec = computed.get(i)
        if vec is None and key is not None:
            vec = have.get(key, by_key.get(key))
        if vec is not None:
            emb[i], found[i] = vec, True
    if progress is not None and len(pending) == len(todo):
        progress(len(paths), len(paths))
    return StoreResult(embeddings=emb, found=found, keys=keys, errors=errors,
                       n_computed=sum(map(len, pending)), n_reused=n_reused,
                       complete=len(pending) == len(todo), identity=ident)
