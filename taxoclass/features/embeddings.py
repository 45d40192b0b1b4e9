"""Resumable, chunked embedding cache on disk.

Layout of a cache directory::

    manifest.json            format, backbone provenance, the id plan split into chunks,
                             which chunks are done, complete true/false, counts
    chunks/chunk-00000.npz   image_ids, embeddings [k, d] float32, failed_ids, failed_errors
    failures.csv             image_id, path, error (missing or undecodable images)
    embeddings.npy           consolidated float32 [n, d]   (only once complete)
    image_ids.npy            consolidated ids (unicode)     (only once complete)

Every file is written to a temp file in the same directory and moved into place with
``os.replace``, so an interruption never leaves a half-written file behind. Chunk and
batch boundaries are fixed by the plan, so a resumed run gives bit-identical results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from taxoclass.errors import CacheError
from taxoclass.features.backbones import Backbone
from taxoclass.features.batching import auto_batch_size, embed_batches
from taxoclass.io.files import atomic_write, atomic_write_csv, atomic_write_json

__all__ = [
    "CACHE_FORMAT_VERSION",
    "EmbedResult",
    "EmbeddingCache",
    "compute_embeddings",
    "load_embeddings",
]

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAILURES = "failures.csv"
EMBEDDINGS_NPY = "embeddings.npy"
IMAGE_IDS_NPY = "image_ids.npy"
CHUNK_DIR = "chunks"
FAILURE_COLUMNS = ["image_id", "path", "error"]
# Backbone provenance keys that must match for a cache to be reused.
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
# What an identity key means when an older manifest lacks it.
IDENTITY_DEFAULTS = {"data_overrides": {}}


@dataclass
class EmbeddingCache:
    """A complete embedding cache loaded from disk."""

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


# ---------------------------------------------------------------------------- files


def _write_failures(path: Path, failures: pd.DataFrame) -> None:
    atomic_write_csv(path, failures)


def _chunk_name(index: int) -> str:
    return f"{CHUNK_DIR}/chunk-{index:05d}.npz"


# ---------------------------------------------------------------------------- manifest


def _sha256_lines(values: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for value in values:
        digest.update(value.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _differences(expected: dict, found: dict) -> list[str]:
    diffs = []
    if found.get("format_version") != expected["format_version"]:
        diffs.append(
            f"format_version: expected {expected['format_version']}, "
            f"found {found.get('format_version')}"
        )
    exp_bb, found_bb = expected["backbone"], found.get("backbone", {})
    for key in IDENTITY_KEYS:
        default = IDENTITY_DEFAULTS.get(key)
        exp_value, found_value = exp_bb.get(key, default), found_bb.get(key, default)
        if exp_value != found_value:
            diffs.append(
                f"backbone {key}: expected {_short(exp_value)}, found {_short(found_value)}"
            )
    plan, found_plan = expected["plan"], found.get("plan", {})
    for key in ("n_images", "chunk_size", "batch_size", "image_ids_sha256"):
        if plan[key] != found_plan.get(key):
            diffs.append(f"plan {key}: expected {plan[key]}, found {found_plan.get(key)}")
    return diffs


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(
            f"Embedding cache {str(root)!r}: {MANIFEST} is unreadable ({exc}). Fix: rerun "
            f"with --overwrite to rebuild it, or --out NEW_DIR."
        ) from exc


def _chunk_done(root: Path, entry: dict) -> bool:
    return bool(entry.get("done")) and (root / entry["file"]).is_file()


# ---------------------------------------------------------------------------- compute


def normalise_items(items: Sequence[tuple[object, str | Path]]) -> tuple[list[str], list[str]]:
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


def _batches(chunks: list[dict], batch_size: int) -> Iterator[list[int]]:
    """Batches that never cross a chunk boundary (fixed by the plan, not by resumes)."""
    for chunk in chunks:
        for start in range(chunk["start"], chunk["stop"], batch_size):
            yield list(range(start, min(start + batch_size, chunk["stop"])))


def compute_embeddings(
    items: Sequence[tuple[object, str | Path]],
    backbone: Backbone,
    out_dir: str | Path,
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    chunk_size: int = 512,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    max_chunks: int | None = None,
    extra_manifest: dict | None = None,
) -> EmbedResult:
    """Embed ``(image_id, path)`` items into a resumable chunked cache at ``out_dir``.

    Missing or undecodable images are recorded in ``failures.csv`` and skipped. An
    existing cache for the same backbone, transform and items is resumed; one for
    anything else raises :class:`CacheError`. ``max_chunks`` stops after that many new
    chunks (the cache then stays ``complete: false``).
    """
    started = time.perf_counter()
    if batch_size is None:
        batch_size = auto_batch_size(backbone.device)
    if batch_size < 1 or chunk_size < 1:
        raise CacheError(
            f"batch_size and chunk_size must be >= 1 (found {batch_size}, {chunk_size})."
        )
    root = Path(out_dir)
    ids, paths = normalise_items(items)
    manifest = _plan(ids, paths, backbone, chunk_size=chunk_size, batch_size=batch_size,
                     extra=extra_manifest)
    chunks = manifest["chunks"]
    _reconcile(root, manifest, overwrite=overwrite)
    (root / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
    failures = _reused_failures(root, chunks, dict(zip(ids, paths)))
    n_reused = sum(e["stop"] - e["start"] for e in chunks if e["done"])
    pending = [e for e in chunks if not e["done"]]
    if max_chunks is not None:
        pending = pending[: max(0, max_chunks)]
    _save_manifest(root, manifest)
    if progress is not None:
        progress(n_reused, len(ids))
    n_computed = 0
    if pending:
        n_computed = _embed_pending(root, manifest, pending, ids, paths, backbone, failures,
                                    batch_size=batch_size, num_workers=num_workers,
                                    n_reused=n_reused, progress=progress)
    failures_df = _failures_frame(failures, ids)
    _write_failures(root / FAILURES, failures_df)
    _save_manifest(root, manifest)
    if manifest["complete"]:
        _consolidate(root, manifest)
        cache = load_embeddings(root)
    else:
        cache = EmbeddingCache(
            root=root,
            image_ids=np.array([], dtype=str),
            embeddings=np.zeros((0, manifest["dim"]), dtype=np.float32),
            manifest=manifest,
        )
    return EmbedResult(
        cache=cache,
        failures=failures_df,
        n_computed=n_computed,
        n_reused=n_reused,
        seconds=time.perf_counter() - started,
    )


def _plan(ids: list[str], paths: list[str], backbone: Backbone, *, chunk_size: int,
          batch_size: int, extra: dict | None) -> dict[str, Any]:
    """The manifest of a new cache: backbone identity, the id plan split into chunks."""
    n = len(ids)
    chunks = [
        {
            "index": k,
            "file": _chunk_name(k),
            "start": start,
            "stop": min(start + chunk_size, n),
            "image_ids": ids[start : start + chunk_size],
            "done": False,
            "n_embedded": 0,
            "n_failed": 0,
        }
        for k, start in enumerate(range(0, n, chunk_size))
    ]
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "backbone": backbone.describe(),
        "dim": int(backbone.num_features),
        "plan": {
            "n_images": n,
            "chunk_size": chunk_size,
            "batch_size": batch_size,
            "n_chunks": len(chunks),
            "image_ids_sha256": _sha256_lines(ids),
            "paths_sha256": _sha256_lines(paths),
        },
        "chunks": chunks,
        "complete": False,
        "counts": {"n_images": n, "n_embedded": 0, "n_failed": 0, "chunks_done": 0},
        "extra": extra or {},
    }


def _reconcile(root: Path, manifest: dict[str, Any], *, overwrite: bool) -> None:
    """Clear the folder (``overwrite``), refuse a foreign cache, or mark its done chunks."""
    existing = _read_manifest(root)
    if existing is not None and overwrite:
        for name in (MANIFEST, FAILURES, EMBEDDINGS_NPY, IMAGE_IDS_NPY):
            (root / name).unlink(missing_ok=True)
        shutil.rmtree(root / CHUNK_DIR, ignore_errors=True)
        existing = None
    elif existing is None and (root / CHUNK_DIR).is_dir() and any((root / CHUNK_DIR).iterdir()):
        raise CacheError(
            f"Directory {str(root)!r} holds chunk files but no {MANIFEST}; it is not a "
            f"usable embedding cache. Fix: --out NEW_DIR or --overwrite."
        )
    if existing is None:
        return
    diffs = _differences(manifest, existing)
    if diffs:
        raise CacheError(
            f"Embedding cache {str(root)!r} was made with other settings: "
            f"{'; '.join(diffs)}. Fix: --out NEW_DIR for a new cache, or --overwrite "
            f"to replace this one."
        )
    for entry, old in zip(manifest["chunks"], existing["chunks"]):
        if _chunk_done(root, old):
            entry.update(done=True, n_embedded=old["n_embedded"], n_failed=old["n_failed"])


def _reused_failures(root: Path, chunks: list[dict], path_of: dict[str, str]
                     ) -> list[dict[str, str]]:
    """The failures recorded in the chunks already done."""
    failures: list[dict[str, str]] = []
    for entry in chunks:
        if entry["done"]:
            with np.load(root / entry["file"], allow_pickle=False) as z:
                for fid, err in zip(z["failed_ids"].tolist(), z["failed_errors"].tolist()):
                    failures.append({"image_id": fid, "path": path_of[fid], "error": err})
    return failures


def _save_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Counts from the chunks done so far; ``complete`` once every chunk is."""
    chunks = manifest["chunks"]
    done = [e for e in chunks if e["done"]]
    manifest["complete"] = len(done) == len(chunks)
    manifest["counts"] = {
        "n_images": manifest["plan"]["n_images"],
        "n_embedded": sum(e["n_embedded"] for e in done),
        "n_failed": sum(e["n_failed"] for e in done),
        "chunks_done": len(done),
    }
    atomic_write_json(root / MANIFEST, manifest)


def _embed_pending(root: Path, manifest: dict[str, Any], pending: list[dict], ids: list[str],
                   paths: list[str], backbone: Backbone, failures: list[dict[str, str]], *,
                   batch_size: int, num_workers: int, n_reused: int,
                   progress: Callable[[int, int], None] | None) -> int:
    """Embed the pending chunks, writing each to disk as it completes; returns the number
    of images attempted (``failures`` grows in place)."""
    n = len(ids)
    chunk_iter = iter(pending)
    current = next(chunk_iter)
    rows: list[np.ndarray] = []
    row_ids: list[str] = []
    failed: list[tuple[str, str]] = []
    done_images, n_computed = n_reused, 0
    for ok_idx, feats, bad in embed_batches(
        paths, backbone, list(_batches(pending, batch_size)), num_workers=num_workers
    ):
        if feats is not None:
            rows.append(feats)
            row_ids.extend(ids[i] for i in ok_idx)
        for i, err in bad:
            failed.append((ids[i], err))
            failures.append({"image_id": ids[i], "path": paths[i], "error": err})
        batch_stop = max(ok_idx + [i for i, _ in bad]) + 1
        done_images += len(ok_idx) + len(bad)
        n_computed += len(ok_idx) + len(bad)
        if batch_stop == current["stop"]:
            # Only the current chunk's rows are held; they go to disk here.
            _finish_chunk(root, current, rows, row_ids, failed, manifest["dim"])
            _write_failures(root / FAILURES, _failures_frame(failures, ids))
            _save_manifest(root, manifest)
            rows, row_ids, failed = [], [], []
            current = next(chunk_iter, None)
        if progress is not None:
            progress(done_images, n)
    return n_computed


def _failures_frame(failures: list[dict[str, str]], ids: list[str]) -> pd.DataFrame:
    order = {image_id: k for k, image_id in enumerate(ids)}
    rows = sorted(failures, key=lambda r: order[r["image_id"]])
    return pd.DataFrame(rows, columns=FAILURE_COLUMNS)


def _finish_chunk(
    root: Path,
    entry: dict,
    rows: list[np.ndarray],
    row_ids: list[str],
    failed: list[tuple[str, str]],
    dim: int,
) -> None:
    emb = np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32)
    if emb.shape[1] != dim:
        raise CacheError(
            f"Backbone returned {emb.shape[1]}-dim features but its num_features says {dim}; "
            f"cache {str(root)!r} cannot hold them. Fix: check the backbone's forward_head."
        )
    arrays = {
        "image_ids": np.array(row_ids, dtype=str),
        "embeddings": emb.astype(np.float32, copy=False),
        "failed_ids": np.array([i for i, _ in failed], dtype=str),
        "failed_errors": np.array([e for _, e in failed], dtype=str),
    }
    atomic_write(root / entry["file"], lambda fh: np.savez(fh, **arrays), mode="wb")
    entry.update(done=True, n_embedded=len(row_ids), n_failed=len(failed))


def _consolidate(root: Path, manifest: dict) -> None:
    """Write ``embeddings.npy`` / ``image_ids.npy`` chunk by chunk (no full copy in RAM)."""
    n_rows, dim = manifest["counts"]["n_embedded"], manifest["dim"]
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{EMBEDDINGS_NPY}.", suffix=".tmp")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_rows, dim))
        all_ids: list[str] = []
        offset = 0
        for entry in manifest["chunks"]:
            with np.load(root / entry["file"], allow_pickle=False) as z:
                emb = z["embeddings"]
                out[offset : offset + emb.shape[0]] = emb
                offset += emb.shape[0]
                all_ids.extend(z["image_ids"].tolist())
        out.flush()
        del out
        os.replace(tmp, root / EMBEDDINGS_NPY)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    id_array = np.array(all_ids, dtype=str)
    atomic_write(root / IMAGE_IDS_NPY, lambda fh: np.save(fh, id_array, allow_pickle=False),
                 mode="wb")


def load_embeddings(cache_dir: str | Path) -> EmbeddingCache:
    """Load a complete cache; :class:`CacheError` if it is missing or unfinished."""
    root = Path(cache_dir)
    manifest = _read_manifest(root)
    if manifest is None:
        raise CacheError(
            f"No embedding cache at {str(root)!r} ({MANIFEST} not found). Fix: compute it "
            f"with `taxoclass embed ... --out {root}`."
        )
    if not manifest.get("complete"):
        counts = manifest.get("counts", {})
        raise CacheError(
            f"Embedding cache {str(root)!r} is incomplete ({counts.get('chunks_done', '?')} of "
            f"{manifest.get('plan', {}).get('n_chunks', '?')} chunks done). Fix: rerun the same "
            f"`taxoclass embed ... --out {root}` command to resume it."
        )
    emb_path, ids_path = root / EMBEDDINGS_NPY, root / IMAGE_IDS_NPY
    if not (emb_path.is_file() and ids_path.is_file()):
        _consolidate(root, manifest)
    embeddings = np.load(emb_path, allow_pickle=False)
    image_ids = np.load(ids_path, allow_pickle=False)
    if embeddings.shape[0] != image_ids.shape[0]:
        raise CacheError(
            f"Embedding cache {str(root)!r} is inconsistent: {embeddings.shape[0]} embeddings "
            f"but {image_ids.shape[0]} ids. Fix: rerun with --overwrite."
        )
    return EmbeddingCache(root=root, image_ids=image_ids, embeddings=embeddings, manifest=manifest)
