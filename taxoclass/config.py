"""YAML configs with defaults and ``--set key.sub=value`` overrides.

A config file sets values over :data:`DEFAULTS`; unknown keys are an error (a typo
must not silently fall back to a default). Relative paths in a config file are
resolved against the file's folder, so a config works from any working directory.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "data": {
        "annotations": None,       # Herbarium 2022-style annotations JSON
        "images_root": None,       # folder the images' file_name paths are relative to
        "ranks": ["family", "genus", "species"],
        "val_fraction": 0.3,       # seeded split stratified by the lowest rank
        "split_seed": 0,
        "split_file": None,        # optional CSV image_id,split (train/val) given by the user
        "holdout_species": [],     # binomials left out of the model entirely (open-set tests)
    },
    "backbone": {
        "name": "vit_base_patch14_reg4_dinov2.lvd142m",
        "checkpoint": None,
        "class_mapping": None,
        "model_kwargs": {},
        "image_size": None,        # input side in pixels; None: the model's default
        "resize": None,            # crop (timm's centre crop) | letterbox | squash
        "pad_fill": None,          # letterbox border: mean | black | white | 0-255
        "data_overrides": {},      # raw timm data-config keys (advanced)
    },
    "embeddings": {
        "cache": None,             # default: <out>/../embeddings-<backbone>
        "batch_size": None,        # None: 8 on a CPU, 64 on a GPU
        "num_workers": 0,
    },
    "model": {
        "hidden": None,            # None: linear heads; an int: a shared MLP layer first
        "dropout": 0.0,
        "normalize": True,         # L2-normalise embeddings before the heads
    },
    "loss": {
        "rank_weights": None,      # e.g. {family: 1, genus: 1, species: 1}
        "dependency_weight": 1.0,
        "class_balanced": False,
        "class_balanced_beta": 0.999,
        "label_smoothing": 0.0,
    },
    "train": {
        "epochs": 200,
        "batch_size": 256,
        "lr": 0.003,
        "weight_decay": 0.0001,
        "patience": 20,            # early stopping on validation loss
        "seed": 0,
    },
    "decode": {"method": "path", "top_k": 5},
    "augment": {                   # tile-like views of TRAINING images (taxoclass.features.views)
        "views_per_image": 0,      # 0: off; e.g. 4 for a head that classifies plot tiles
        "size": 320, "scale": [0.45, 1.4], "rotate": True, "max_cut": 0.35,
        "background": "clutter",   # black | noise | clutter | a folder of background photos
        "object_threshold": 80, "mask": "threshold", "seed": 0,
        "dir": None,               # views + their embeddings; default <embeddings.cache>-views
    },
    "openset": {
        "enabled": True,           # fit an outlier detector + per-rank thresholds for back-off
        # Chosen on bench/openset.py (leaf data, 12 held-out species): the species rank is
        # named only when the image is within the known species' Mahalanobis range
        # (gate_quantile of correctly named validation images) AND its path logit passes the
        # threshold fitted to target_precision. Alternatives: detector knn/lof/ecod/copod/
        # iforest (pyod), combiner rank_mean/logistic, confidence path_prob.
        "detector": "mahalanobis", # class-conditional (species) relative Mahalanobis; or pyod
        "scope": "global",         # pyod detectors: per predicted genus ("group") or global
        "combiner": "gate",        # gate | rank_mean | logistic (see EvidenceCombiner)
        "confidence": "path_logit",  # path_logit (raw logit) | path_prob
        "gate_quantile": 0.975,    # distance cut: this quantile of right validation answers
        "target_precision": {"family": 0.95, "genus": 0.95, "species": 0.97},
        "min_support": 10,         # fewest validation answers a threshold may rest on
        "max_train": 50000,        # detector reference set size (seeded subsample above it)
        # What the combiner and thresholds are fitted on. holdout: the head trains on the
        # training split, calibration on the validation split (~30% of images, never
        # trained on). crossfit: `folds` heads, each trained on the other folds of
        # train+validation, give out-of-fold predictions for every image; calibration
        # rests on all of them and the final head trains on all images without a
        # validation split (patience then watches the training loss). On the leaf bench
        # (bench/results/openset_crossfit.md) crossfit names more known species at the
        # same precision but also more held-out species; not with `train --finetune`.
        "calibration": "holdout",  # holdout | crossfit
        "folds": 5,                # crossfit: number of species-stratified folds (seeded)
    },
    "finetune": {                  # `taxoclass train --finetune`: backbone + heads end to end
        "epochs": 10, "batch_size": 32, "accum_steps": 1, "lr": 1e-4,
        "layer_decay": 0.75,       # layer-wise lr decay: block k from the top gets lr * 0.75**k
        "weight_decay": 0.05, "warmup_epochs": 1.0, "min_lr_ratio": 0.01,
        "unfreeze_blocks": -1,     # -1 all, 0 heads only, N the last N blocks/stages
        "grad_clip": 1.0, "patience": 3, "augment": True, "num_workers": 4, "seed": 0,
        "max_steps": None, "checkpoint_steps": None, "resume": True,
        "keep_checkpoints": False, "compile": False,
        "tile_views": 0,           # also show each image N times per epoch as a fresh
        #                            tile-like view (the augment section's settings)
        "probe_head": False,       # start from heads trained on the frozen embeddings (LP-FT)
    },
    "out": None,
}


CALIBRATIONS: tuple[str, ...] = ("holdout", "crossfit")


def openset_calibration(ocfg: Mapping[str, Any] | None) -> tuple[str, int]:
    """``(calibration, folds)`` of an ``openset`` section, checked (:class:`ConfigError`)."""
    ocfg = ocfg or {}
    mode = ocfg.get("calibration", DEFAULTS["openset"]["calibration"])
    if mode not in CALIBRATIONS:
        raise ConfigError(f"openset.calibration: found {mode!r}; expected one of "
                          f"{', '.join(repr(c) for c in CALIBRATIONS)}.")
    folds = ocfg.get("folds", DEFAULTS["openset"]["folds"])
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"openset.folds: found {folds!r}; expected an integer of at least 2 "
                          f"(e.g. 5).")
    return str(mode), int(folds)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any], *,
               where: str = "config", strict: bool = True) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``; unknown keys raise :class:`ConfigError`."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if strict and key not in out:
            raise ConfigError(f"{where}: unknown key {key!r}. Expected one of "
                              f"{sorted(out)}; check the spelling.")
        if isinstance(out.get(key), dict) and isinstance(value, Mapping) and out[key]:
            out[key] = deep_merge(out[key], value, where=f"{where}.{key}", strict=strict)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=0.01"`` -> (["train", "lr"], 0.01); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=50.")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc}).") from exc
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                defaults: Mapping[str, Any] = DEFAULTS) -> dict[str, Any]:
    """Defaults, then the YAML file, then ``--set`` overrides; paths resolved to absolute."""
    cfg = copy.deepcopy(dict(defaults))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found. See configs/ for examples.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of sections at the top, found "
                              f"{type(data).__name__}.")
        data = dict(data)
        parent = data.pop("extends", None)
        if parent:  # another config file this one starts from (relative to this file)
            cfg = load_config(path.resolve().parent / parent, (), defaults)
        cfg = deep_merge(cfg, _resolve_paths(data, path.resolve().parent), where=str(path))
    for item in overrides:
        keys, value = parse_override(item)
        node = cfg
        for i, k in enumerate(keys[:-1]):
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[:i + 1])} is not a section.")
            node = node[k]
        if keys[-1] not in node:
            raise ConfigError(f"--set {item!r}: unknown key {'.'.join(keys)!r}. Expected one of "
                              f"{sorted(node)}.")
        node[keys[-1]] = value
    return _resolve_paths(cfg, Path.cwd())


PATH_KEYS = {("data", "annotations"), ("data", "images_root"), ("data", "split_file"),
             ("backbone", "checkpoint"), ("backbone", "class_mapping"),
             ("embeddings", "cache"), ("augment", "dir"), ("out",)}


def _resolve_paths(cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    cfg = copy.deepcopy(dict(cfg))
    for keys in PATH_KEYS:
        node = cfg
        for k in keys[:-1]:
            node = node.get(k) or {}
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            node[keys[-1]] = str((base / value).resolve())
    return cfg
