"""Model bundle: a folder holding everything needed to predict, and nothing executable.

Layout::

    bundle.json          format version, head config, rank order, backbone recipe, decode,
                         and the sha256 of each part below that predicting reads ("parts")
    heads.safetensors    head weights (safetensors: loading cannot execute code)
    taxonomy.json        the tree (Taxonomy.to_dict)
    labels.json          class names per rank, in head order
    config.yaml          the resolved training config
    history.csv          training curve
    split.csv            image_id, split (train/val) used for training
    provenance.json      version, command line, environment, backbone
    openset.json         (optional) outlier detector, evidence combiner, per-rank thresholds
    openset.npz          (optional) the detector's training embeddings (refit on load)
    confidence.json      (optional) per-rank calibration of ``confidence``
                         (:mod:`taxoclass.model.confidence`; fitted on held-out predictions)
    backbone.pth         (fine-tuned bundles) the backbone's state dict, checked when built

A bundle is written as one folder (staged, then swapped in: :func:`taxoclass.io.files.
output_folder`), so a killed writer leaves the previous bundle or the new one. Loading
refuses parts whose sha256 differs from bundle.json's (mixed or damaged bundles) with a
BundleError; a bundle written before the hashes (no "parts") loads with a warning.

Every prediction row carries ``confidence`` (:meth:`ModelBundle.predict_with_backoff`):
the calibrated probability that the reported taxon at its rank is right (NaN for
``unknown``). A bundle without ``confidence.json`` (trained before it, or without held-out
rows) loads with a warning and reports the uncalibrated path probability there. ``score``
stays the back-off evidence that the per-rank thresholds compare, not a probability.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import BundleError, ConfigError, TaxonomyError
from .io.files import atomic_write, atomic_write_json, output_folder, recover_output_folder
from .model.confidence import ConfidenceCalibration, confidence_of
from .model.heads import MultiRankHead
from .taxonomy.tree import Taxonomy

FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "heads.safetensors"
TAXONOMY_FILE = "taxonomy.json"
LABELS_FILE = "labels.json"
OPENSET_FILE = "openset.json"
OPENSET_ARRAYS = "openset.npz"
CONFIDENCE_FILE = "confidence.json"

log = logging.getLogger(__name__)


def scorer_input(embeddings: np.ndarray, normalize: bool) -> np.ndarray:
    """Embeddings as the outlier detector sees them: float32, L2-normalised rows when the
    head normalises its inputs (``normalize``), as the head sees them."""
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    return x.numpy()


@dataclass
class ModelBundle:
    """A trained head with its taxonomy and the recipe for its backbone."""

    head: MultiRankHead
    taxonomy: Taxonomy
    backbone: dict[str, Any]  # name, checkpoint, model_kwargs, (describe() fields)
    normalize: bool = True
    decode_method: str = "path"
    extra: dict[str, Any] = field(default_factory=dict)
    scorer: Any = None  # taxoclass.openset.scorer.OpenSetScorer: detector + thresholds for back-off
    path: Path | None = None  # the folder it was loaded from (relative checkpoints resolve here)
    parts: dict[str, str] | None = None  # file -> sha256 recorded in bundle.json (None: legacy)
    confidence: ConfidenceCalibration | None = None  # per-rank calibration of ``confidence``

    # ------------------------------------------------------------------ inference
    def logits(self, embeddings: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
        if self.normalize:
            x = torch.nn.functional.normalize(x, dim=1)
        self.head.eval()
        with torch.inference_mode():
            return self.head(x)

    def predict_embeddings(self, embeddings: np.ndarray | torch.Tensor, *, top_k: int = 5,
                           batch_size: int = 4096):
        """Coherent per-rank predictions (:class:`~taxoclass.model.decoding.Decoded`)."""
        from .model.decoding import concat_decoded, decode

        parts = [decode(self.logits(embeddings[i:i + batch_size]), self.taxonomy,
                        method=self.decode_method, top_k=top_k)
                 for i in range(0, max(len(embeddings), 1), batch_size)]
        return concat_decoded(parts)

    def predict_with_backoff(self, embeddings: np.ndarray, *, top_k: int = 5):
        """Coherent predictions plus back-off to the lowest reliable rank.

        Returns ``(frame, decoded)``: one row per embedding with ``taxon_rank``, ``taxon``,
        ``confidence`` (calibrated probability that the taxon at ``taxon_rank`` is right;
        NaN for unknown; the raw path probability without a fitted calibration),
        ``score`` (the evidence the back-off thresholds compare), ``reason``, ``outlier``
        and the full coherent path with (raw) probabilities.
        Without a fitted scorer every answer is the species of the best path
        (reason ``"species"``, score = its probability).
        """
        from .openset.backoff import back_off_batch

        x = np.asarray(embeddings, dtype=np.float32)
        decoded = self.predict_embeddings(x, top_k=top_k)
        if self.scorer is not None:
            frame = self.scorer.predict(self.scorer_input(x), decoded, self.taxonomy)
        else:
            zeros = {r: 0.0 for r in self.taxonomy.ranks}
            frame = back_off_batch(decoded, decoded.path_prob, zeros, None, self.taxonomy)
            frame["outlier"] = False
        frame["taxon_rank"] = frame["taxon_rank"].fillna("unknown")
        conf = confidence_of(frame, self.taxonomy.ranks, self.confidence)
        frame.insert(int(frame.columns.get_loc("taxon")) + 1, "confidence", conf)
        return frame, decoded

    def scorer_input(self, embeddings: np.ndarray) -> np.ndarray:
        """The detector sees the same (normalised) embeddings as the head."""
        return scorer_input(embeddings, self.normalize)

    def backbone_spec(self) -> dict[str, Any]:
        """The spec of the backbone the head was trained on, as :meth:`create_backbone`
        builds it and the embedding store keys it: a checkpoint inside the bundle (e.g. a
        fine-tuned ``backbone.pth``) made absolute after checking it against the record."""
        from .features.backbones import SPEC_KEYS

        spec = {k: v for k, v in self.backbone.items() if k in SPEC_KEYS and v is not None}
        checkpoint = spec.get("checkpoint")
        if checkpoint and self.path is not None and not Path(checkpoint).is_absolute():
            check_checkpoint(self.path, self.parts, str(checkpoint))
            spec["checkpoint"] = str(self.path / checkpoint)
        return spec

    def create_backbone(self, device: str = "cpu"):
        """Rebuild the backbone the head was trained on (same weights and preprocessing)."""
        from .features.backbones import backbone_from_spec

        return backbone_from_spec(self.backbone_spec(), device=device)

    # ------------------------------------------------------------------ storage
    def save(self, out_dir: str | Path) -> Path:
        """Write the bundle as a unit: into a staged sibling folder that replaces ``out_dir``
        (:func:`~taxoclass.io.files.output_folder`; the previous contents are replaced)."""
        out = Path(out_dir)
        with output_folder(out) as stage:
            self.write(stage)
        return out

    def write(self, folder: str | Path) -> Path:
        """Write the bundle's files into ``folder`` (e.g. a job's staged output folder);
        ``bundle.json``, written last, records the sha256 of each part."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        atomic_write(out / WEIGHTS_FILE, lambda fh: fh.write(save(state)), mode="wb")
        atomic_write_json(out / TAXONOMY_FILE, self.taxonomy.to_dict())
        atomic_write_json(out / LABELS_FILE, {r: self.taxonomy.names(r)
                                              for r in self.taxonomy.ranks})
        parts = [WEIGHTS_FILE, TAXONOMY_FILE, LABELS_FILE]
        for stale in (OPENSET_FILE, OPENSET_ARRAYS, CONFIDENCE_FILE):
            (out / stale).unlink(missing_ok=True)
        if self.confidence is not None:
            atomic_write_json(out / CONFIDENCE_FILE, self.confidence.to_dict())
            parts.append(CONFIDENCE_FILE)
        if self.scorer is not None:
            params, arrays = self.scorer.to_state()
            atomic_write_json(out / OPENSET_FILE, params)
            atomic_write(out / OPENSET_ARRAYS, lambda fh: np.savez(
                fh, **{k: np.asarray(v) for k, v in arrays.items()}), mode="wb")
            parts += [OPENSET_FILE, OPENSET_ARRAYS]
        checkpoint = self.backbone.get("checkpoint")
        if checkpoint and not Path(checkpoint).is_absolute() and (out / checkpoint).is_file():
            parts.append(str(checkpoint))  # e.g. a fine-tuned backbone.pth
        # bundle.json last: its presence marks a complete bundle, its hashes bind the parts.
        # The bundle keeps the hashes it recorded, as a loaded one does (its model id).
        self.parts = {name: sha256_of(out / name) for name in parts}
        atomic_write_json(out / BUNDLE_FILE, {
            "format_version": FORMAT_VERSION, "head": self.head.config(),
            "ranks": list(self.taxonomy.ranks), "backbone": self.backbone,
            "normalize": self.normalize, "decode_method": self.decode_method,
            "extra": self.extra, "parts": self.parts})
        return out

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        """Read a bundle; refuse (BundleError) a damaged one or one whose parts do not
        match the hashes recorded in ``bundle.json``. Nothing executable is loaded."""
        path = Path(path)
        meta = _read_meta(path)
        parts = meta.get("parts")
        _check_parts(path, parts)
        taxonomy = _load_taxonomy(path / TAXONOMY_FILE)
        head = _load_head(path, meta, taxonomy)
        has_openset = OPENSET_FILE in parts if parts is not None else (
            path / OPENSET_FILE).is_file()
        scorer = _load_scorer(path) if has_openset else None
        return cls(head=head, taxonomy=taxonomy, backbone=meta["backbone"],
                   normalize=meta.get("normalize", True),
                   decode_method=meta.get("decode_method", "path"), extra=meta.get("extra", {}),
                   scorer=scorer, path=path, parts=parts,
                   confidence=_load_confidence(path, parts))

    def update_extra(self, out_dir: str | Path, values: Mapping[str, Any]) -> None:
        """Add fields to ``extra`` and rewrite ``bundle.json`` (e.g. fitted thresholds); the
        part hashes are checked first and kept."""
        self.extra.update(values)
        path = Path(out_dir)
        meta = _read_meta(path)
        _check_parts(path, meta.get("parts"))
        meta["extra"] = self.extra
        atomic_write_json(path / BUNDLE_FILE, meta)


# ---------------------------------------------------------------------- reading, checked
_FIX = ("Fix: retrain (taxoclass train) into this folder, or restore the whole bundle "
        "folder from a copy.")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_meta(path: Path) -> dict[str, Any]:
    meta_file = path / BUNDLE_FILE
    orphans = sorted(path.parent.glob(f".{path.name}.old-*")) if path.name else []
    if not path.exists() and orphans:  # a run was killed between the renames of its swap
        try:
            recover_output_folder(path)
        except OSError as exc:
            log.warning("%s could not be restored from %s: %s", path, orphans[0], exc)
    if not meta_file.is_file():
        hint = ""
        if not path.exists() and orphans:
            hint = (f" A run was killed while replacing it; the previous bundle is in "
                    f"{orphans[0]}: rename that folder back to {path}.")
        raise BundleError(f"{path}: not a taxoclass model bundle (no {BUNDLE_FILE}). Pass the "
                          "folder written by `taxoclass train` (its --out / config 'out')."
                          + hint)
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{meta_file}: not valid JSON ({exc}); the bundle is damaged. "
                          f"{_FIX}") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_file}: expected a JSON object, found "
                          f"{type(meta).__name__}; the bundle is damaged. {_FIX}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{meta_file}: bundle format {meta.get('format_version')}, this "
                          f"taxoclass reads format {FORMAT_VERSION}. Retrain or upgrade.")
    missing = [k for k in ("head", "backbone") if not isinstance(meta.get(k), dict)]
    parts = meta.get("parts")
    if parts is not None and not (isinstance(parts, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in parts.items())):
        missing.append("parts")
    if missing:
        raise BundleError(f"{meta_file}: missing or malformed {', '.join(missing)}; the "
                          f"bundle is damaged. {_FIX}")
    return meta


def _check_parts(path: Path, parts: Mapping[str, str] | None) -> None:
    """Each part recorded in bundle.json exists and has its recorded sha256."""
    required = [WEIGHTS_FILE, TAXONOMY_FILE]
    if parts is None:  # written before part hashes: nothing binds the parts
        log.warning("%s: written by an older taxoclass without part hashes; its files cannot "
                    "be checked to belong together. Retrain to add them.", path / BUNDLE_FILE)
        names = required
    else:
        names = [n for n in parts if not _is_checkpoint(n)] + [
            n for n in required if n not in parts]
    for name in names:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{path / BUNDLE_FILE}: part {name!r} lies outside the bundle "
                              f"folder. {_FIX}")
        if not (path / name).is_file():
            raise BundleError(f"{path}: missing {name}; the bundle is incomplete. {_FIX}")
        if parts is not None and (name not in parts or sha256_of(path / name) != parts[name]):
            raise BundleError(
                f"{path / name} does not belong to this bundle: its sha256 differs from the "
                f"one recorded in {BUNDLE_FILE} (the file was changed, damaged or mixed with "
                f"another bundle's). {_FIX}")


def _is_checkpoint(name: str) -> bool:
    return name not in (WEIGHTS_FILE, TAXONOMY_FILE, LABELS_FILE, OPENSET_FILE, OPENSET_ARRAYS,
                        CONFIDENCE_FILE)


def check_checkpoint(path: Path, meta_parts: Mapping[str, str] | None, name: str) -> None:
    """A bundle's own backbone checkpoint (e.g. ``backbone.pth``) matches its hash."""
    if meta_parts is None or name not in meta_parts:
        return
    if not (path / name).is_file():
        raise BundleError(f"{path}: missing {name}; the bundle is incomplete. {_FIX}")
    if sha256_of(path / name) != meta_parts[name]:
        raise BundleError(f"{path / name} does not belong to this bundle: its sha256 differs "
                          f"from the one recorded in {BUNDLE_FILE}. {_FIX}")


def _load_taxonomy(file: Path) -> Taxonomy:
    try:
        return Taxonomy.load(file)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{file}: not valid JSON ({exc}); the bundle is damaged. "
                          f"{_FIX}") from None
    except TaxonomyError as exc:
        raise BundleError(f"{file}: {exc} {_FIX}") from None


def _load_head(path: Path, meta: Mapping[str, Any], taxonomy: Taxonomy) -> MultiRankHead:
    file = path / WEIGHTS_FILE
    try:
        head = MultiRankHead.from_config(meta["head"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise BundleError(f"{path / BUNDLE_FILE}: malformed head description ({exc}). "
                          f"{_FIX}") from None
    sizes = {r: int(n) for r, n in head.n_classes.items()}
    if sizes != taxonomy.sizes:
        raise BundleError(f"{path}: the head in {BUNDLE_FILE} predicts {sizes} classes per "
                          f"rank but {TAXONOMY_FILE} has {taxonomy.sizes}; the files come from "
                          f"different models. {_FIX}")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{file}: not a readable safetensors file ({exc}); the bundle is "
                          f"damaged or the file was replaced. {_FIX}") from None
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        detail = "; ".join(lines[:1]) + ("; ..." if len(lines) > 1 else "")
        raise BundleError(f"{file}: weights do not fit the head described in {BUNDLE_FILE} "
                          f"({detail}). {_FIX}") from None
    head.eval()
    return head


def _load_scorer(path: Path):
    """The open-set scorer from openset.json + openset.npz (arrays only, never pickles)."""
    from .openset.scorer import OpenSetScorer

    for name in (OPENSET_FILE, OPENSET_ARRAYS):
        if not (path / name).is_file():
            raise BundleError(f"{path}: {OPENSET_FILE} without {OPENSET_ARRAYS}; the bundle "
                              f"is incomplete. {_FIX}")
    try:
        params = json.loads((path / OPENSET_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{path / OPENSET_FILE}: not valid JSON ({exc}). {_FIX}") from None
    try:
        with np.load(path / OPENSET_ARRAYS, allow_pickle=False) as arrays:
            data = {k: arrays[k] for k in arrays.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        text = str(exc)
        if "pickle" in text.lower() or "object arrays" in text.lower():
            text = "it holds pickled Python objects, which could run code"
        raise BundleError(f"{path / OPENSET_ARRAYS}: not a plain NumPy archive ({text}); "
                          f"only plain arrays are loaded, so nothing in it ran. {_FIX}"
                          ) from None
    try:
        return OpenSetScorer.from_state(params, data)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise BundleError(f"{path / OPENSET_FILE}: the open-set scorer cannot be rebuilt "
                          f"({type(exc).__name__}: {exc}). {_FIX}") from None


def _load_confidence(path: Path, parts: Mapping[str, str] | None) -> ConfidenceCalibration | None:
    """The calibration of ``confidence`` (confidence.json, checked with the other parts);
    None with a warning when the bundle has none (its confidence is then uncalibrated)."""
    file = path / CONFIDENCE_FILE
    if (CONFIDENCE_FILE not in parts) if parts is not None else not file.is_file():
        log.warning("%s has no fitted confidence calibration (%s; trained by an older "
                    "taxoclass or without held-out images): its 'confidence' column is the "
                    "uncalibrated path probability. Retrain to calibrate it.", path,
                    CONFIDENCE_FILE)
        return None
    try:
        return ConfidenceCalibration.from_dict(json.loads(file.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError, KeyError,
            AttributeError) as exc:
        raise BundleError(f"{file}: not a confidence calibration ({exc}). {_FIX}") from None
