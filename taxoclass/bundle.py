"""Model bundle: a folder holding everything needed to predict, and nothing executable.

Layout::

    bundle.json          format version, head config, rank order, backbone recipe, decode
    heads.safetensors    head weights (safetensors: loading cannot execute code)
    taxonomy.json        the tree (Taxonomy.to_dict)
    labels.json          class names per rank, in head order
    config.yaml          the resolved training config
    history.csv          training curve
    split.csv            image_id, split (train/val) used for training
    provenance.json      version, command line, environment, backbone
    openset.json         (optional) outlier detector, evidence combiner, per-rank thresholds
    openset.npz          (optional) the detector's training embeddings (refit on load)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import BundleError
from .io.files import atomic_write_json
from .model.heads import MultiRankHead
from .taxonomy.tree import Taxonomy

FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "heads.safetensors"
TAXONOMY_FILE = "taxonomy.json"
LABELS_FILE = "labels.json"
OPENSET_FILE = "openset.json"
OPENSET_ARRAYS = "openset.npz"


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
        ``score``, ``reason``, ``outlier`` and the full coherent path with probabilities.
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
        return frame, decoded

    def scorer_input(self, embeddings: np.ndarray) -> np.ndarray:
        """The detector sees the same (normalised) embeddings as the head."""
        return scorer_input(embeddings, self.normalize)

    def create_backbone(self, device: str = "cpu"):
        """Rebuild the backbone the head was trained on (same weights and preprocessing)."""
        from .features.backbones import SPEC_KEYS, backbone_from_spec

        spec = {k: v for k, v in self.backbone.items() if k in SPEC_KEYS and v is not None}
        checkpoint = spec.get("checkpoint")
        if checkpoint and self.path is not None and not Path(checkpoint).is_absolute():
            spec["checkpoint"] = str(self.path / checkpoint)  # e.g. a fine-tuned backbone.pth
        return backbone_from_spec(spec, device=device)

    # ------------------------------------------------------------------ storage
    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()},
                  str(tmp))
        tmp.replace(out / WEIGHTS_FILE)
        atomic_write_json(out / TAXONOMY_FILE, self.taxonomy.to_dict())
        atomic_write_json(out / LABELS_FILE, {r: self.taxonomy.names(r)
                                              for r in self.taxonomy.ranks})
        if self.scorer is not None:
            params, arrays = self.scorer.to_state()
            atomic_write_json(out / OPENSET_FILE, params)
            tmp = out / (OPENSET_ARRAYS + ".tmp.npz")
            np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
            tmp.replace(out / OPENSET_ARRAYS)
        # bundle.json last: its presence marks a complete bundle.
        atomic_write_json(out / BUNDLE_FILE, {
            "format_version": FORMAT_VERSION, "head": self.head.config(),
            "ranks": list(self.taxonomy.ranks), "backbone": self.backbone,
            "normalize": self.normalize, "decode_method": self.decode_method,
            "extra": self.extra})
        return out

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        path = Path(path)
        meta_file = path / BUNDLE_FILE
        if not meta_file.is_file():
            raise BundleError(f"{path}: not a taxoclass model bundle (no {BUNDLE_FILE}). Pass the "
                              "folder written by `taxoclass train` (its --out / config 'out').")
        meta = json.loads(meta_file.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{meta_file}: bundle format {meta.get('format_version')}, this "
                              f"taxoclass reads format {FORMAT_VERSION}. Retrain or upgrade.")
        for name in (WEIGHTS_FILE, TAXONOMY_FILE):
            if not (path / name).is_file():
                raise BundleError(f"{path}: missing {name}; the bundle is incomplete. Retrain.")
        taxonomy = Taxonomy.load(path / TAXONOMY_FILE)
        head = MultiRankHead.from_config(meta["head"])
        state = load_file(str(path / WEIGHTS_FILE))
        try:
            head.load_state_dict(state)
        except RuntimeError as exc:
            raise BundleError(f"{path / WEIGHTS_FILE}: weights do not fit the head described "
                              f"in {BUNDLE_FILE}: {exc}") from exc
        head.eval()
        scorer = None
        if (path / OPENSET_FILE).is_file():
            from .openset.scorer import OpenSetScorer

            if not (path / OPENSET_ARRAYS).is_file():
                raise BundleError(f"{path}: {OPENSET_FILE} without {OPENSET_ARRAYS}; the bundle "
                                  "is incomplete. Retrain.")
            with np.load(path / OPENSET_ARRAYS, allow_pickle=False) as arrays:
                scorer = OpenSetScorer.from_state(json.loads((path / OPENSET_FILE).read_text()),
                                                  {k: arrays[k] for k in arrays.files})
        return cls(head=head, taxonomy=taxonomy, backbone=meta["backbone"],
                   normalize=meta.get("normalize", True),
                   decode_method=meta.get("decode_method", "path"), extra=meta.get("extra", {}),
                   scorer=scorer, path=path)

    def update_extra(self, out_dir: str | Path, values: Mapping[str, Any]) -> None:
        """Add fields to ``extra`` and rewrite ``bundle.json`` (e.g. fitted thresholds)."""
        self.extra.update(values)
        meta_file = Path(out_dir) / BUNDLE_FILE
        meta = json.loads(meta_file.read_text())
        meta["extra"] = self.extra
        atomic_write_json(meta_file, meta)
