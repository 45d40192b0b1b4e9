"""Embeddings of image files: a content-addressed store plus the files of one request.

Layout of a cache folder (``embed --out``, ``embeddings.cache``, ``predict --out/embeddings``)::

    store/                   every vector ever computed here, keyed by the sha256 of the
                             image's bytes and the backbone identity (features/store.py)
    manifest.json            this request: backbone, the (id, path) plan, counts, complete,
                             size and sha256 of each file below (written last)
    embeddings.npy           float32 [n, d], the request's embedded images in request order
    image_ids.npy            their ids (unicode)
    failures.csv             image_id, path, error of the images that failed this run

Image ids only label a request; vectors are found by content. A changed file is embedded
again, a failed image is tried again on every run (it stays in failures.csv until it
succeeds), and other backbones or preprocessing settings live beside the first in
``store/``. Vectors reach the store in chunks, each written atomically, so a killed run
resumes with the chunks it finished; the chunk and batch boundaries are fixed by the
request, so a resumed run gives bit-identical vectors. One run at a time holds the
store's lock; a second waits. A complete folder that cannot be written is still read.
``train`` reads the store by the files its annotations name; it writes its rows' request
files only into a folder that holds no other request (see :func:`embed_with_spec`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from taxoclass.errors import CacheError
from taxoclass.features.backbones import Backbone
from taxoclass.features.batching import auto_batch_size
from taxoclass.features.store import (
    IDENTITY_KEYS,
    STORE_DIR,
    EmbeddingStore,
    StoreResult,
    can_write,
    embed_into_store,
    identity_hash,
    sha256_file,
)
from taxoclass.io.files import atomic_write, atomic_write_csv, atomic_write_json

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "IDENTITY_KEYS",
    "EmbedResult",
    "EmbeddingCache",
    "StoreResult",
    "check_cache_folder",
    "compute_embeddings",
    "embed_with_spec",
    "load_embeddings",
    "put_vectors",
]

CACHE_FORMAT_VERSION = 2
MANIFEST = "manifest.json"
FAILURES = "failures.csv"
EMBEDDINGS_NPY = "embeddings.npy"
IMAGE_IDS_NPY = "image_ids.npy"
REQUEST_FILES = (EMBEDDINGS_NPY, IMAGE_IDS_NPY, FAILURES)
FAILURE_COLUMNS = ["image_id", "path", "error"]
Progress = Callable[[int, int], None]


@dataclass
class EmbeddingCache:
    """The embeddings of one request (``embeddings.npy`` / ``image_ids.npy``)."""

    root: Path
    image_ids: np.ndarray
    embeddings: np.ndarray
    manifest: dict

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{image_id: embedding}`` (rows are views into ``embeddings``)."""
        return dict(zip(self.image_ids.tolist(), self.embeddings))

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])


@dataclass
class EmbedResult:
    """What a :func:`compute_embeddings` run produced."""

    cache: EmbeddingCache
    failures: pd.DataFrame
    n_computed: int
    n_reused: int
    seconds: float


# ---------------------------------------------------------------------------- helpers


def _sha256_lines(values: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for value in values:
        digest.update(value.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def normalise_items(items: Sequence[tuple[object, str | Path]]) -> tuple[list[str], list[str]]:
    """(ids as str, paths as str); ids must be unique (they label the request's rows)."""
    ids = [str(image_id) for image_id, _ in items]
    paths = [str(path) for _, path in items]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dupes = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
        raise CacheError(
            f"Image ids must be unique within one embedding run; {len(dupes)} repeat "
            f"(first: {', '.join(dupes[:5])}). Fix: deduplicate the items."
        )
    return ids, paths


def check_cache_folder(root: str | Path) -> None:
    """A clear error when ``root`` is a file or cannot be written, unless it holds a
    complete cache (that one is read-only reusable). Call it before loading a model."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CacheError(f"--out {str(root)!r} is an existing file, not a folder. Fix: pass "
                         f"a folder path (it is created if missing).")
    if not can_write(root) and not (root / MANIFEST).is_file():
        raise CacheError(f"--out {str(root)!r} cannot be written (permission denied or a "
                         f"read-only file system). Fix: pass a writable folder.")


# ---------------------------------------------------------------------------- the store


class _IdentityChanged(Exception):
    """The backbone a spec builds now is not the one the store remembered for it."""


def _spec_key(store: EmbeddingStore, spec: dict, device: str, precision: str) -> str:
    from taxoclass.features.backbones import resolve_backbone_name

    ckpt = spec.get("checkpoint")
    record = {**spec, "name": resolve_backbone_name(spec["name"]), "device": device,
              "precision": precision,
              "checkpoint_sha256": store.content_keys([ckpt])[0] if ckpt else None}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def put_vectors(folder: str | Path, paths: Sequence[str], x: np.ndarray,
                spec: dict[str, Any], identity: dict[str, Any], *, device: str = "cpu",
                precision: str = "auto") -> None:
    """Store vectors computed elsewhere as the embeddings of ``paths`` (files whose content
    names them) under a backbone ``spec`` (:func:`~taxoclass.features.backbones.backbone_spec`),
    so that ``embed``/``train`` with the same backbone settings find them and embed nothing.
    ``identity``: what made the vectors (recorded in the store; its ``name`` and the other
    :data:`~taxoclass.features.store.IDENTITY_KEYS` tell makers apart); ``num_features``
    is added. For simulated or externally computed embeddings, in a store of their own: a
    store whose spec already names another maker is refused (``ValueError``)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(paths):
        raise ValueError(f"put_vectors: expected one row per path ({len(paths)}), found an "
                         f"array of shape {x.shape}.")
    store = EmbeddingStore(Path(folder) / STORE_DIR)
    with store.session() as st:
        key = _spec_key(st, spec, device, precision)
        description = {**identity, "num_features": int(x.shape[1])}
        known = st.spec_identity(key)
        if known is not None and known != identity_hash(description):
            raise ValueError(f"put_vectors: the store in {folder} already holds vectors of "
                             f"this backbone spec made by {st.description(known)}; expected "
                             "a store of its own for vectors computed elsewhere. Fix: pass "
                             "another folder.")
        ident = st.remember(description, key)
        st.put(ident, [str(k) for k in st.content_keys(list(paths))], x)


def embed_with_spec(paths: Sequence[str], folder: str | Path, spec: dict[str, Any], *,
                    ids: Sequence[str] | None = None, device: str = "cpu",
                    precision: str = "auto", batch_size: int | None = None,
                    num_workers: int = 0, progress: Progress | None = None) -> StoreResult:
    """Vectors of ``paths`` from the store in ``folder`` for a backbone spec; the model is
    loaded only when some image must be embedded.

    With ``ids`` (the rows' labels), the request files (``embeddings.npy`` ...) are written
    too when ``folder`` holds none yet or holds this same request; another request's
    files (say, of ``taxoclass embed``) are left as they are.
    """
    store = EmbeddingStore(Path(folder) / STORE_DIR)
    with store.session() as st:
        res = _spec_vectors(st, paths, spec, device=device, precision=precision,
                            batch_size=batch_size, num_workers=num_workers, progress=progress)
        if ids is not None and st.writable and res.complete:
            _publish_own_request(Path(folder), st, [str(i) for i in ids],
                                 [str(p) for p in paths], res, batch_size=batch_size)
        return res


def _spec_vectors(st: EmbeddingStore, paths: Sequence[str], spec: dict[str, Any], *,
                  device: str, precision: str, **kwargs: Any) -> StoreResult:
    from taxoclass.features.backbones import backbone_from_spec

    loaded: list[Backbone] = []

    def get_backbone() -> Backbone:
        if not loaded:
            loaded.append(backbone_from_spec(spec, device=device, precision=precision))
        return loaded[0]

    key = _spec_key(st, spec, device, precision)
    ident = st.spec_identity(key)
    if ident is not None:
        desc = st.description(ident)

        def checked() -> Backbone:
            if identity_hash(get_backbone().describe()) != ident:
                raise _IdentityChanged
            return loaded[0]

        try:
            res = embed_into_store(st, paths, ident=ident, dim=int(desc["num_features"]),
                                   get_backbone=checked, **kwargs)
            res.description = desc
            return res
        except _IdentityChanged:
            log.warning("backbone %s now builds another model than when its vectors in %s "
                        "were made; its images are embedded again", spec.get("name"), st.root)
    desc = get_backbone().describe()
    ident = st.remember(desc, key)
    res = embed_into_store(st, paths, ident=ident, dim=int(desc["num_features"]),
                           get_backbone=get_backbone, **kwargs)
    res.description = desc
    return res


def _publish_own_request(root: Path, st: EmbeddingStore, ids: list[str], paths: list[str],
                         res: StoreResult, *, batch_size: int | None) -> None:
    old = _read_manifest(root)
    plan = (old or {}).get("plan") or {}
    if old is not None and (plan.get("image_ids_sha256"), plan.get("paths_sha256")) != (
            _sha256_lines(ids), _sha256_lines(paths)):
        return
    failures = pd.DataFrame(
        [{"image_id": ids[i], "path": paths[i], "error": res.errors.get(i, "not embedded")}
         for i in np.flatnonzero(~res.found)], columns=FAILURE_COLUMNS)
    manifest = _manifest(ids, paths, res, res.description, batch_size=batch_size,
                         chunk_size=512, extra=None)
    _publish(root, st, manifest, ids, res, failures)


# ---------------------------------------------------------------------------- requests


def compute_embeddings(
    items: Sequence[tuple[object, str | Path]],
    backbone: Backbone,
    out_dir: str | Path,
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    chunk_size: int = 512,
    progress: Progress | None = None,
    overwrite: bool = False,
    max_chunks: int | None = None,
    extra_manifest: dict | None = None,
) -> EmbedResult:
    """Embed ``(image_id, path)`` items into the cache folder ``out_dir``.

    Vectors of files already embedded there with this backbone (same bytes) are reused,
    the rest computed. Missing or undecodable images are recorded in ``failures.csv`` and
    tried again on the next run. ``overwrite`` deletes the folder's stored vectors first.
    ``max_chunks`` stops after that many new chunks (the request stays incomplete).
    """
    started = time.perf_counter()
    batch_size = auto_batch_size(backbone.device) if batch_size is None else batch_size
    if batch_size < 1 or chunk_size < 1:
        raise CacheError(
            f"batch_size and chunk_size must be >= 1 (found {batch_size}, {chunk_size})."
        )
    root = Path(out_dir)
    check_cache_folder(root)
    ids, paths = normalise_items(items)
    store = EmbeddingStore(root / STORE_DIR)
    with store.session(overwrite=overwrite) as st:
        if st.writable:  # temporary files of a killed run's request (it held the lock)
            for name in (MANIFEST, *REQUEST_FILES):
                for tmp in root.glob(f".{name}.*.tmp"):
                    tmp.unlink(missing_ok=True)
        if overwrite:
            for name in (MANIFEST, *REQUEST_FILES):
                (root / name).unlink(missing_ok=True)
            shutil.rmtree(root / "chunks", ignore_errors=True)  # format 1's vectors
        desc = backbone.describe()
        ident = st.remember(desc)
        res = embed_into_store(st, paths, ident=ident, dim=int(backbone.num_features),
                               get_backbone=lambda: backbone, batch_size=batch_size,
                               num_workers=num_workers, chunk_size=chunk_size,
                               progress=progress, max_chunks=max_chunks)
        failures = pd.DataFrame(
            [{"image_id": ids[i], "path": paths[i], "error": res.errors.get(i, "not embedded")}
             for i in np.flatnonzero(~res.found)], columns=FAILURE_COLUMNS)
        manifest = _manifest(ids, paths, res, desc, batch_size=batch_size,
                             chunk_size=chunk_size, extra=extra_manifest)
        cache = _publish(root, st, manifest, ids, res, failures)
    return EmbedResult(cache=cache, failures=failures if res.complete else failures[:0],
                       n_computed=res.n_computed, n_reused=res.n_reused,
                       seconds=time.perf_counter() - started)


def _manifest(ids: list[str], paths: list[str], res: StoreResult, desc: dict, *,
              batch_size: int | None, chunk_size: int, extra: dict | None) -> dict[str, Any]:
    n_found = int(res.found.sum())
    row_keys = [k if f else "-" for k, f in zip(res.keys, res.found)]
    errors = [res.errors.get(i, "") for i in range(len(ids))]
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "backbone": desc,
        "identity": res.identity,
        "dim": int(res.embeddings.shape[1]),
        "plan": {"n_images": len(ids), "chunk_size": chunk_size, "batch_size": batch_size,
                 "n_chunks": -(-len(ids) // chunk_size),
                 "image_ids_sha256": _sha256_lines(ids), "paths_sha256": _sha256_lines(paths)},
        "complete": res.complete,
        "counts": {"n_images": len(ids), "n_embedded": n_found,
                   "n_failed": len(ids) - n_found, "n_computed": res.n_computed,
                   "n_reused": res.n_reused},
        "result_sha256": _sha256_lines([res.identity, *ids, *map(str, row_keys), *errors]),
        "extra": extra or {},
    }


def _read_manifest(root: Path) -> dict | None:
    """The request manifest, or None when absent or unreadable (it is rewritten)."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); it is written again", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _damage(root: Path, manifest: dict) -> str | None:
    """What is wrong with the request files a manifest lists (None: intact)."""
    for name, rec in (manifest.get("files") or {}).items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != rec.get("size") or sha256_file(path) != rec.get("sha256"):
            return f"{name} is damaged (its size or sha256 differs from {MANIFEST})"
    return None if manifest.get("files") else "its manifest lists no files"


def _publish(root: Path, store: EmbeddingStore, manifest: dict, ids: list[str],
             res: StoreResult, failures: pd.DataFrame) -> EmbeddingCache:
    """Write the request's files as a unit (manifest last); nothing when they are the
    same as on disk already."""
    emb = np.ascontiguousarray(res.embeddings[res.found])
    image_ids = np.array([i for i, f in zip(ids, res.found) if f], dtype=str)
    old = _read_manifest(root)
    if not res.complete:
        if store.writable:
            atomic_write_json(root / MANIFEST, manifest)
        return EmbeddingCache(root=root, image_ids=np.array([], dtype=str),
                              embeddings=np.zeros((0, manifest["dim"]), dtype=np.float32),
                              manifest=manifest)
    if (old is not None and old.get("complete")
            and old.get("result_sha256") == manifest["result_sha256"]
            and _damage(root, old) is None):
        return EmbeddingCache(root=root, image_ids=image_ids, embeddings=emb, manifest=old)
    if not store.writable:
        raise CacheError(f"Embedding cache {str(root)!r} is read-only, and this request's "
                         f"embeddings differ from the ones it holds. Fix: make the folder "
                         f"writable, or pass another --out folder.")
    if old is not None:  # readers see an incomplete request until the new files are in
        atomic_write_json(root / MANIFEST, {**old, "complete": False})
    atomic_write(root / EMBEDDINGS_NPY, lambda fh: np.save(fh, emb, allow_pickle=False),
                 mode="wb")
    atomic_write(root / IMAGE_IDS_NPY, lambda fh: np.save(fh, image_ids, allow_pickle=False),
                 mode="wb")
    atomic_write_csv(root / FAILURES, failures)
    manifest["files"] = {name: _file_record(root / name) for name in REQUEST_FILES}
    atomic_write_json(root / MANIFEST, manifest)
    return EmbeddingCache(root=root, image_ids=image_ids, embeddings=emb, manifest=manifest)


def load_embeddings(cache_dir: str | Path) -> EmbeddingCache:
    """The embeddings of the last complete request in ``cache_dir``; :class:`CacheError`
    when it is missing, unfinished or damaged (each with the command that repairs it)."""
    root = Path(cache_dir)
    rerun = f"rerun the same `taxoclass embed ... --out {root}` command"
    path = root / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"No embedding cache at {str(root)!r} ({MANIFEST} not found). Fix: compute it "
            f"with `taxoclass embed ... --out {root}`."
        )
    manifest = _read_manifest(root)
    if manifest is None:
        raise CacheError(f"Embedding cache {str(root)!r}: {MANIFEST} is unreadable. Fix: "
                         f"{rerun} (it rewrites it from the stored vectors).")
    counts = manifest.get("counts", {})
    if not manifest.get("complete"):
        raise CacheError(
            f"Embedding cache {str(root)!r} is incomplete ({counts.get('n_embedded', '?')} of "
            f"{counts.get('n_images', '?')} images done). Fix: {rerun} to resume it."
        )
    damage = _damage(root, manifest) if manifest.get("format_version", 1) >= 2 else None
    if damage:
        raise CacheError(f"Embedding cache {str(root)!r}: {damage}. Fix: {rerun} (it writes "
                         f"it again from the stored vectors).")
    try:
        embeddings = np.load(root / EMBEDDINGS_NPY, allow_pickle=False)
        image_ids = np.load(root / IMAGE_IDS_NPY, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CacheError(f"Embedding cache {str(root)!r}: {EMBEDDINGS_NPY} / {IMAGE_IDS_NPY} "
                         f"cannot be read ({exc}). Fix: {rerun}.") from None
    if embeddings.ndim != 2 or embeddings.shape[0] != image_ids.shape[0]:
        raise CacheError(
            f"Embedding cache {str(root)!r} is inconsistent: {embeddings.shape[0]} embeddings "
            f"but {image_ids.shape[0]} ids. Fix: {rerun}."
        )
    return EmbeddingCache(root=root, image_ids=image_ids, embeddings=embeddings, manifest=manifest)
