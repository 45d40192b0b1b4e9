"""Export a model bundle for the edge: one ONNX graph plus a small JSON, run with
onnxruntime, numpy and Pillow alone (no torch, no taxoclass).

``taxoclass export --model M --format onnx --out model.onnx`` writes, in ``model.onnx``'s
folder:

- ``model.onnx``: input ``image`` (preprocessed, NCHW float32, dynamic batch axis) ->
  ``logits_<rank>`` (the heads' raw outputs; for a head the loss left untrained, the
  lowest head's log-sum-exp under each class), ``probs_<rank>`` (the coherent per-rank
  probabilities: the bundle's decoding runs in the graph) and, for a bundle with an
  open-set scorer, ``outlier_score`` (the Mahalanobis detector's z-score, in float64 as in
  taxoclass). One graph: backbone, L2 normalisation, heads, decoding, detector.
- ``model.json``: the taxonomy (ranks, names, the lowest rank's ancestor indices, what each
  class is reported as), the preprocessing (every step of the backbone's timm transform,
  plus image size, resize mode, mean/std and pad fill), the evidence combiner and the
  per-rank thresholds of the back-off, the confidence calibration, the reason words, the
  model id and the sha256 of ``model.onnx`` and of the runner; written last, so that it
  binds the files it names (the runner refuses a ``model.onnx`` whose hash differs).
- ``taxoclass_onnx_predict.py``: the runner (:mod:`taxoclass.pipelines.edge_runner`,
  copied), which reads images, preprocesses them as taxoclass does, runs the graph, picks
  the best path, backs off with the exported thresholds and writes the columns of
  ``taxoclass predict``.

Each file is written atomically (:func:`~taxoclass.io.files.atomic_write`). Exporter:
``torch.onnx.export(..., dynamo=True)`` (torch.export based; the TorchScript exporter is
deprecated), which needs ``onnxscript`` (``pip install taxoclass[export]``).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._version import __version__
from ..errors import BundleError, ConfigError
from ..io.files import atomic_write, atomic_write_json, atomic_write_text
from ..io.provenance import model_id_for
from ..openset.evidence import GATED
from ..openset.scorer import typical_outlier_score
from ..vocab import UNKNOWN, Reason, accepted_reason, backoff_reason, unknown_reason

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import ModelBundle

__all__ = ["FORMATS", "RUNNER_FILE", "ExportResult", "export_onnx", "export_model"]

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("onnx",)
RUNNER_FILE = "taxoclass_onnx_predict.py"
META_FORMAT = "taxoclass-onnx"
META_VERSION = 1
OPSET = 18


@dataclass
class ExportResult:
    """The files one export wrote."""

    onnx: Path
    meta: Path
    runner: Path
    outputs: list[str]
    #: output name -> max abs difference onnxruntime vs PyTorch on a random batch
    #: (``None`` when not checked: ``check=False`` or onnxruntime missing)
    max_abs_diff: dict[str, float] | None = None


def export_model(model: str | Path | ModelBundle, out: str | Path, *,
                 format: str = "onnx", **kwargs: Any) -> ExportResult:
    """Export ``model`` in ``format`` (:data:`FORMATS`); see :func:`export_onnx`."""
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} is not supported; expected one of "
                          f"{', '.join(FORMATS)}.")
    return export_onnx(model, out, **kwargs)


def export_onnx(model: str | Path | ModelBundle, out: str | Path, *,
                batch_size: int = 2, check: bool = True) -> ExportResult:
    """Write ``out`` (``model.onnx``, or a folder that gets one), ``<stem>.json`` and the
    runner ``taxoclass_onnx_predict.py`` beside it (module doc). ``model``: a bundle
    folder or a loaded :class:`~taxoclass.bundle.ModelBundle`; ``batch_size``: the
    example batch the graph is traced with (the batch axis stays dynamic).

    Raises :class:`~taxoclass.errors.BundleError` for a model that cannot be exported (an
    open-set detector other than Mahalanobis, a preprocessing step the runner lacks).
    """
    import torch

    from ..bundle import ModelBundle

    bundle = model if isinstance(model, ModelBundle) else ModelBundle.load(model)
    onnx_path = _onnx_path(Path(out))
    backbone = bundle.create_backbone(device="cpu")
    preprocessing = preprocessing_of(backbone.transform, backbone.data_config)
    graph = EdgeGraph(backbone.model, bundle).eval()
    size = preprocessing["image_size"]
    example = torch.zeros(max(int(batch_size), 2), 3, int(size[0]), int(size[1]))
    proto = _export(graph, example)
    atomic_write(onnx_path, lambda fh: fh.write(proto), mode="wb")
    runner_text = Path(__file__).with_name("edge_runner.py").read_text(encoding="utf-8")
    runner = atomic_write_text(onnx_path.with_name(RUNNER_FILE), runner_text)
    meta = metadata(bundle, preprocessing, graph.output_names, backbone.describe())
    meta["files"] = {"onnx": onnx_path.name, "onnx_sha256": _sha256(proto),
                     "runner": RUNNER_FILE,
                     "runner_sha256": _sha256(runner_text.encode("utf-8"))}
    meta_path = atomic_write_json(onnx_path.with_suffix(".json"), meta)
    return ExportResult(onnx=onnx_path, meta=meta_path, runner=runner,
                        outputs=list(graph.output_names),
                        max_abs_diff=compare_with_torch(graph, onnx_path, size) if check
                        else None)


def compare_with_torch(graph: Any, onnx_path: Path, size: list[int], n: int = 3,
                       seed: int = 0) -> dict[str, float] | None:
    """Max abs difference per output between onnxruntime and PyTorch on ``n`` seeded random
    images (``None`` without onnxruntime)."""
    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed: the exported graph was not checked "
                    "(pip install 'taxoclass[export]').")
        return None
    x = torch.randn(n, 3, int(size[0]), int(size[1]),
                    generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        expected = [t.numpy() for t in graph(x)]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})
    return {name: float(np.max(np.abs(a.astype(np.float64) - b)))
            for name, a, b in zip(graph.output_names, expected, got)}


def _onnx_path(out: Path) -> Path:
    if out.suffix.lower() == ".onnx":
        return out
    if out.suffix:
        raise ConfigError(f"--out {out}: expected a file name ending in .onnx (or a folder), "
                          f"found suffix {out.suffix!r}. Fix: --out {out.with_suffix('.onnx')}.")
    return out / "model.onnx"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _export(graph: Any, example: Any) -> bytes:
    """The ONNX bytes of ``graph`` (torch.onnx's dynamo exporter, dynamic batch axis)."""
    import torch

    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise ConfigError("exporting to ONNX needs the packages onnx and onnxscript. Fix: "
                          "pip install 'taxoclass[export]'.") from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                graph, (example,), dynamo=True, input_names=["image"],
                output_names=list(graph.output_names), dynamic_shapes=({0: batch},),
                opset_version=OPSET, verbose=False, optimize=True)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds
            raise BundleError(f"this model cannot be exported to ONNX: torch.onnx failed "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). "
                              f"Fix: export a bundle whose backbone torch.export can trace "
                              f"(timm CNNs and ViTs can).") from None
    return program.model_proto.SerializeToString()


# ---------------------------------------------------------------------- the graph
def _torch_modules():
    """nn.Module classes built on first use (torch is imported lazily)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from ..model.decoding import coherent_probabilities

    class Mahalanobis(nn.Module):
        """The relative Mahalanobis detector's z-score, in float64 as in taxoclass."""

        def __init__(self, arrays: dict[str, np.ndarray], params: dict[str, float]) -> None:
            super().__init__()
            for name, value in arrays.items():
                self.register_buffer(name, torch.as_tensor(np.asarray(value, np.float64)))
            self.conditional = "means_w" in arrays
            self.normalize = bool(params["normalize"])
            self.mean, self.std = float(params["mean"]), float(params["std"])

        def forward(self, x):
            x = x.double()
            if self.normalize:
                x = x / torch.clamp(torch.linalg.vector_norm(x, dim=1, keepdim=True), min=1e-12)
            r = (x - self.center) @ self.components.T
            zb = r @ self.bg_whitener
            raw = (zb * zb).sum(1)
            if self.conditional:
                z = r @ self.whitener
                d = ((z * z).sum(1)[:, None] - 2.0 * (z @ self.means_w.T)
                     + self.means_sq[None, :])
                raw = torch.clamp(d.min(1).values, min=0.0) - raw
            return (raw - self.mean) / self.std

    class Graph(nn.Module):
        def __init__(self, backbone: nn.Module, bundle: ModelBundle) -> None:
            super().__init__()
            self.backbone, self.head = backbone, bundle.head
            self.taxonomy, self.method = bundle.taxonomy, bundle.decode_method
            self.normalize = bool(bundle.normalize)
            self.ranks = tuple(bundle.taxonomy.ranks)
            det = detector_state(bundle)
            self.detector = Mahalanobis(*det) if det is not None else None
            # Ranks whose head a leaf-only loss left untrained (all zero): their exported
            # logits are the lowest head's log-sum-exp under each class, as decoding's
            # path_logit (model.decoding.marginal_logits), by a matmul ONNX exports plainly.
            lowest = self.ranks[-1]
            self.member = {}
            for r in self.ranks[:-1]:
                layer = bundle.head.heads[r]
                if not (bool(layer.weight.any()) or bool(layer.bias.any())):
                    idx = torch.as_tensor(bundle.taxonomy.parent_index(lowest, r))
                    m = torch.zeros(len(idx), bundle.taxonomy.n_classes(r))
                    m[torch.arange(len(idx)), idx] = 1.0
                    self.register_buffer(f"member_{r}", m)
                    self.member[r] = f"member_{r}"
            self.output_names = ([f"logits_{r}" for r in self.ranks]
                                 + [f"probs_{r}" for r in self.ranks]
                                 + (["outlier_score"] if det is not None else []))

        def forward(self, image):
            return self.tail(self.embed(image))

        def embed(self, image):
            """The backbone's pooled embeddings (what taxoclass's embedding store holds)."""
            feats = self.backbone.forward_features(image)
            return self.backbone.forward_head(feats, pre_logits=True).float()

        def tail(self, emb):
            """Heads, decoding and outlier score of embeddings: the graph's outputs."""
            x = F.normalize(emb, dim=1) if self.normalize else emb
            logits = self.head(x)
            probs = coherent_probabilities(logits, self.taxonomy, self.method)
            leaf = logits[self.ranks[-1]]
            top = leaf.max(dim=1, keepdim=True).values
            for r, name in self.member.items():
                logits[r] = torch.log(torch.exp(leaf - top) @ getattr(self, name)) + top
            out = [logits[r] for r in self.ranks] + [probs[r] for r in self.ranks]
            if self.detector is not None:
                out.append(self.detector(x))
            return tuple(out)

    return Graph


def EdgeGraph(backbone: Any, bundle: ModelBundle) -> Any:  # noqa: N802 - a class factory
    """The exported graph as a torch module: ``image -> (logits_<rank>..., probs_<rank>...,
    [outlier_score])``; its ``output_names`` name the outputs."""
    return _torch_modules()(backbone, bundle)


def detector_state(bundle: ModelBundle) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
    """The arrays and constants of the bundle's Mahalanobis detector as the graph computes
    it (``None`` without a scorer); :class:`BundleError` for a detector it cannot hold."""
    scorer = bundle.scorer
    if scorer is None:
        return None
    det = scorer.detector
    if det.method != "mahalanobis":
        raise BundleError(f"this model cannot be exported to ONNX: its open-set detector is "
                          f"{det.method!r}, and only 'mahalanobis' (the default) runs in the "
                          f"graph. Fix: retrain with openset.detector: mahalanobis.")
    fitted = det.global_
    inner = fitted["detector"]
    arrays = {"center": inner.center_, "components": inner.components_,
              "bg_whitener": _whitener(inner.bg_precision_)}
    if inner.means_ is not None:
        w = _whitener(inner.precision_)
        mz = inner.means_ @ w
        arrays.update(whitener=w, means_w=mz, means_sq=np.einsum("kd,kd->k", mz, mz))
    return arrays, {"normalize": det.normalize, "mean": fitted["mean"], "std": fitted["std"]}


def _whitener(precision: np.ndarray) -> np.ndarray:
    """``W`` with ``W @ W.T == precision`` (as the detector's own scoring computes it)."""
    w, v = np.linalg.eigh(precision)
    return v * np.sqrt(np.clip(w, 0.0, None))


# ---------------------------------------------------------------------- the JSON
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def preprocessing_of(transform: Any, data_config: dict[str, Any]) -> dict[str, Any]:
    """The backbone's timm transform as steps the runner replays with Pillow and numpy,
    plus its summary (image size, resize mode, interpolation, mean/std, pad fill)."""
    from timm.data.transforms import CenterCropOrPad, MaybeToTensor, ResizeKeepRatio
    from torchvision import transforms as T

    steps: list[dict[str, Any]] = []
    pad_fill = None
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, ResizeKeepRatio) and not (step.random_scale_prob
                                                      or step.random_aspect_prob):
            steps.append({"op": "resize_keep_ratio", "size": list(step.size),
                          "longest": float(step.longest),
                          "interpolation": _interp(step.interpolation)})
        elif isinstance(step, T.Resize):
            size = step.size if isinstance(step.size, int) else list(step.size)
            steps.append({"op": "resize", "size": size, "max_size": step.max_size,
                          "interpolation": _interp(step.interpolation)})
        elif isinstance(step, CenterCropOrPad) and step.padding_mode == "constant":
            fill = step.fill if isinstance(step.fill, (tuple, list)) else [step.fill] * 3
            pad_fill = [int(v) for v in fill]
            steps.append({"op": "center_crop_or_pad", "size": list(step.size),
                          "fill": pad_fill})
        elif isinstance(step, T.CenterCrop):
            steps.append({"op": "center_crop_or_pad", "size": list(step.size),
                          "fill": [0, 0, 0]})
        elif isinstance(step, (MaybeToTensor, T.ToTensor)):
            steps.append({"op": "to_tensor"})
        elif isinstance(step, T.Normalize):
            steps.append({"op": "normalize", "mean": [float(v) for v in step.mean],
                          "std": [float(v) for v in step.std]})
        else:
            raise BundleError(f"this model cannot be exported: its preprocessing step "
                              f"{step!r} has no counterpart in the ONNX runner (it replays "
                              f"resize, letterbox, centre crop, to-tensor and normalise).")
    mode = {"border": "letterbox", "squash": "squash"}.get(data_config.get("crop_mode"), "crop")
    size = [int(v) for v in data_config["input_size"][1:]]
    return {"image_size": size, "resize": mode,
            "interpolation": str(data_config.get("interpolation")),
            "crop_pct": float(data_config.get("crop_pct") or 0.875),
            "mean": [float(v) for v in data_config["mean"]],
            "std": [float(v) for v in data_config["std"]],
            "pad_fill": pad_fill if mode == "letterbox" else None,
            "input": {"name": "image", "layout": "NCHW", "dtype": "float32", "channels": "RGB"},
            "steps": steps}


def _interp(mode: Any) -> str:
    name = str(getattr(mode, "value", mode)).lower()
    if name not in _INTERPOLATIONS:
        raise BundleError(f"this model cannot be exported: interpolation {name!r} has no "
                          f"Pillow counterpart in the runner ({', '.join(_INTERPOLATIONS)}).")
    return name


def metadata(bundle: ModelBundle, preprocessing: dict[str, Any], outputs: list[str],
             backbone: dict[str, Any]) -> dict[str, Any]:
    """Everything the runner needs besides the graph (module doc)."""
    import torch

    tax = bundle.taxonomy
    ranks = list(tax.ranks)
    return {"format": META_FORMAT, "format_version": META_VERSION,
            "tool": "taxoclass", "version": __version__, "model_id": model_id_for(bundle),
            "exporter": {"name": "torch.onnx (dynamo)", "torch": torch.__version__,
                         "opset": OPSET},
            "backbone": {k: backbone.get(k) for k in ("name", "weights_source",
                                                      "checkpoint_sha256", "num_features")},
            "outputs": list(outputs), "decode_method": bundle.decode_method,
            "taxonomy": taxonomy_of(tax), "preprocessing": preprocessing,
            "openset": openset_of(bundle),
            "confidence": ({r: {"slope": a, "bias": b}
                            for r, (a, b) in bundle.confidence.params.items()}
                           if bundle.confidence is not None else None),
            "reasons": {"accepted": accepted_reason(ranks[-1]),
                        "backoff": {r: {w.value: backoff_reason(r, w) for w in _WHYS}
                                    for r in ranks[:-1]},
                        "unknown": {w.value: unknown_reason(w) for w in _WHYS},
                        "failed": Reason.FAILED.value, "unknown_label": UNKNOWN}}


_WHYS = (Reason.OUTLIER, Reason.LOW_CONFIDENCE)


def taxonomy_of(tax: Any) -> dict[str, Any]:
    """Ranks, names per rank, the lowest rank's ancestor index at every rank, and per class
    the label and rank it is reported as (placeholders climb to their named ancestor; a
    chain of placeholders up to the root reports nothing: rank ``null``)."""
    ranks = list(tax.ranks)
    lowest = ranks[-1]
    reported: dict[str, dict[str, list]] = {}
    for r in ranks:
        nodes = [tax.reported(nd) for nd in tax.nodes(r)]
        reported[r] = {"label": [tax.label(nd) if nd else UNKNOWN for nd in nodes],
                       "rank": [tax.rank_of(nd) if nd else None for nd in nodes]}
    return {"ranks": ranks, "names": {r: tax.names(r) for r in ranks},
            "parent": {r: tax.parent_index(r).tolist() for r in ranks[1:]},
            "leaf_ancestor": {r: (tax.parent_index(lowest, r).tolist() if r != lowest
                                  else list(range(tax.n_classes(lowest)))) for r in ranks},
            "reported": reported}


def openset_of(bundle: ModelBundle) -> dict[str, Any] | None:
    """The evidence combiner and per-rank thresholds (``None`` without a scorer: every
    answer is the best path's lowest rank, as in taxoclass)."""
    scorer = bundle.scorer
    if scorer is None:
        return None
    comb = scorer.combiner
    return {"combiner": {"method": comb.method, "confidence": comb.confidence,
                         "ranks": list(comb.ranks_), "outlier_ranks": list(comb.outlier_ranks_),
                         "use_outlier": bool(comb.use_outlier_), "params": comb.params_},
            "thresholds": {r: float(v) for r, v in scorer.thresholds.thresholds.items()},
            "gated_evidence": GATED,
            "typical_outlier_score": {r: typical_outlier_score(comb, r)
                                      for r in comb.outlier_ranks_}}
