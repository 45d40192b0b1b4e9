"""Typed config sections, the YAML defaults derived from them, and ``--set`` overrides.

One source of defaults: each config section is a dataclass here (:class:`DataConfig`,
:class:`TrainConfig`, :class:`OpensetConfig`, :class:`FinetuneSettings`, ...), and
:data:`DEFAULTS` (the YAML-shaped dict a config file is laid over) is derived from them.
Library functions that take a section's settings take the dataclass, or read their
defaults from it, so a Python caller passing a partial section gets the same model as a
CLI user (tests/test_config.py checks every such signature).

A config file sets values over :data:`DEFAULTS`; unknown keys are an error (a typo must
not silently fall back to a default), and every value is type- and range-checked when the
config loads (``ConfigError: train.epochs: expected an integer >= 1, found 'five'``).
Relative paths in a config file are resolved against the file's folder, so a config works
from any working directory.

Long because every config section lives here (one home for the defaults, each field with
its comment); the generic type and range checks are the first ~120 lines.
"""

from __future__ import annotations

import copy
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

import yaml

from .errors import ConfigError
from .vocab import Calibration, Combiner, Confidence, DecodeMethod, Detector, Scope

__all__ = [
    "CALIBRATIONS",
    "DEFAULTS",
    "LEAF_ONLY_LOSSES",
    "LOSS_KINDS",
    "AugmentConfig",
    "BackboneConfig",
    "Config",
    "DataConfig",
    "DecodeConfig",
    "EmbeddingsConfig",
    "FinetuneSettings",
    "LossConfig",
    "ModelConfig",
    "OpensetConfig",
    "Section",
    "TrainConfig",
    "complete_config",
    "deep_merge",
    "load_config",
    "openset_calibration",
    "parse_override",
]

S = TypeVar("S", bound="Section")


def _opt(default: Any = None, *, factory: Any = None, ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None,
         choices: Sequence[str] | None = None) -> Any:
    """A dataclass field with range (``ge``/``gt``/``le``/``lt``) or ``choices`` checks."""
    meta = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt,
                              "choices": tuple(str(c) for c in choices) if choices else None
                              }.items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------ type and range checks
def _describe(tp: Any) -> str:
    """``int`` -> "an integer", ``list[str]`` -> "a list of strings", ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        n = f"{len(args)} " if origin is tuple and args and args[-1] is not Ellipsis else ""
        return f"a list of {n}{_describe(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    if origin is dict:
        return f"a mapping of names to {_describe(args[1]).split(' ', 1)[-1]}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Any: "any value"}.get(tp, getattr(tp, "__name__", str(tp)))


def _conforms(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return _number(value) is not None
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            return False
        return all(_conforms(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, Mapping) and all(
            isinstance(k, str) and _conforms(v, args[1]) for k, v in value.items())
    return isinstance(value, tp)


def _number(value: Any) -> float | None:
    """A real number, or ``None``. YAML 1.1 reads ``1e-4`` as a string: accepted."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            return None
        return x if math.isfinite(x) else None
    return None


def _range_text(meta: Mapping[str, Any]) -> str:
    parts = [f"{op} {meta[k]:g}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="),
                                              ("lt", "<")) if k in meta]
    return " and ".join(parts)


def _check_value(where: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` unless ``value`` has type ``tp`` and meets ``meta``."""
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args
    inner = [a for a in args if a is not type(None)] if optional else [tp]
    expected = " or ".join(_describe(a) for a in inner)
    if "choices" in meta:
        expected = "one of " + ", ".join(repr(c) for c in meta["choices"])
    rng = _range_text(meta)
    if rng:
        expected = f"{expected} {rng}"
    if optional:
        expected = f"{expected} or null"
    if not _conforms(value, tp):
        raise ConfigError(f"{where}: expected {expected}, found {value!r}.")
    if "choices" in meta and isinstance(value, str) and value not in meta["choices"]:
        raise ConfigError(f"{where}: expected {expected}, found {value!r}.")
    x = _number(value) if rng else None
    if x is None:  # no range, or None where allowed
        return
    ok = (x >= meta.get("ge", -math.inf) and x > meta.get("gt", -math.inf)
          and x <= meta.get("le", math.inf) and x < meta.get("lt", math.inf))
    if not ok:
        raise ConfigError(f"{where}: expected {expected}, found {value!r}.")


# ------------------------------------------------------------------ sections
class Section:
    """Base of a config section: dict in (checked), dict out (YAML-shaped)."""

    section: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[S], m: Mapping[str, Any] | None = None, *,
                  where: str | None = None) -> S:
        """The section from a (partial) mapping: missing keys take the defaults; unknown
        keys and badly typed or out-of-range values raise :class:`ConfigError`."""
        where = where or cls.section
        if m is None:
            m = {}
        if not isinstance(m, Mapping):
            raise ConfigError(f"{where}: expected a mapping of keys to values, found "
                              f"{type(m).__name__} ({m!r}).")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(str(k) for k in m if k not in names)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}. Expected some of "
                              f"{sorted(names)}; check the spelling.")
        obj = cls(**dict(m))
        obj.check(where=where)
        hints = typing.get_type_hints(cls)
        for k, v in m.items():  # YAML lists of tuple fields become tuples
            if typing.get_origin(hints[k]) is tuple and isinstance(v, list):
                setattr(obj, k, tuple(v))
        return obj

    def check(self, *, where: str | None = None) -> None:
        """Type- and range-check every field (:class:`ConfigError` naming the first bad one)."""
        where = where or self.section
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            _check_value(f"{where}.{f.name}", getattr(self, f.name), hints[f.name], f.metadata)

    def to_dict(self) -> dict[str, Any]:
        """The YAML-shaped section (tuples as lists, copies of mutable values)."""
        return {f.name: _yaml_shaped(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


def _yaml_shaped(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_yaml_shaped(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _yaml_shaped(v) for k, v in value.items()}
    return value


@dataclass
class DataConfig(Section):
    """``data``: the annotations, the ranks and the train/validation split."""

    section: ClassVar[str] = "data"

    annotations: str | None = None    # Herbarium 2022-style annotations JSON
    images_root: str | None = None    # folder the images' file_name paths are relative to
    # top-down rank list, or "auto": the ranks the categories fill, in the canonical order
    # kingdom, phylum, class, order, family, subfamily, tribe, genus, species. Not the
    # default: files that carry an extra 'order' (the leaf data) would gain an order head.
    ranks: list[str] | str = _opt(factory=lambda: ["family", "genus", "species"])
    val_fraction: float = _opt(0.3, gt=0, lt=1)  # seeded split stratified by the lowest rank
    split_seed: int = 0
    split_file: str | None = None     # optional CSV image_id,split (train/val) given by the user
    holdout_species: list[str] = _opt(factory=list)  # binomials left out (open-set tests)
    allow_outside_root: bool = False  # true: file_names may be absolute or climb out ('../')
    keep_empty_taxa: bool = False     # true: categories without images stay output classes
    group_by: str | None = None       # image/annotation field whose groups stay together

    def check(self, *, where: str | None = None) -> None:
        super().check(where=where)
        where = where or self.section
        ranks = self.ranks
        if isinstance(ranks, str) and ranks != "auto":
            raise ConfigError(f"{where}.ranks: expected a list of ranks, top-down (e.g. "
                              f"[order, family, genus, species]), or 'auto', found {ranks!r}.")
        if not isinstance(ranks, str) and (not ranks or len(set(ranks)) != len(ranks)):
            raise ConfigError(f"{where}.ranks: expected distinct ranks, at least one, found "
                              f"{ranks!r}.")


@dataclass
class BackboneConfig(Section):
    """``backbone``: the timm model that makes the embeddings and its preprocessing."""

    section: ClassVar[str] = "backbone"

    name: str = "vit_base_patch14_reg4_dinov2.lvd142m"
    checkpoint: str | None = None
    class_mapping: str | None = None
    model_kwargs: dict[str, Any] = _opt(factory=dict)
    image_size: int | None = _opt(None, ge=16, le=4096)  # input side, pixels; None: the model's
    resize: str | None = _opt(None, choices=("crop", "letterbox", "squash"))  # None: crop
    pad_fill: str | int | None = None  # letterbox border: mean | black | white | 0-255
    data_overrides: dict[str, Any] = _opt(factory=dict)  # raw timm data-config keys


@dataclass
class EmbeddingsConfig(Section):
    """``embeddings``: the embedding cache."""

    section: ClassVar[str] = "embeddings"

    cache: str | None = None          # default: <out>/../embeddings-<backbone>
    batch_size: int | None = _opt(None, ge=1)  # None: 8 on a CPU, 64 on a GPU
    num_workers: int = _opt(0, ge=0)


@dataclass
class ModelConfig(Section):
    """``model``: the rank heads on the embeddings."""

    section: ClassVar[str] = "model"

    hidden: int | None = _opt(None, ge=1)  # None: linear heads; an int: a shared MLP layer
    dropout: float = _opt(0.0, ge=0, lt=1)
    normalize: bool = True            # L2-normalise embeddings before the heads


#: ``loss.kind`` values; the last three train the lowest rank's head only.
LOSS_KINDS: tuple[str, ...] = ("dependency", "bjerge", "flat", "soft_labels", "hxe")
LEAF_ONLY_LOSSES: tuple[str, ...] = ("flat", "soft_labels", "hxe")


@dataclass
class LossConfig(Section):
    """``loss``: the training loss (``kind``) and its settings."""

    section: ClassVar[str] = "loss"

    # dependency: per-rank CE + our smooth class-dependency term (dependency_weight);
    # bjerge: per-rank CE + Bjerge et al. 2023's dependency loss (bjerge_penalty);
    # flat: CE on the lowest rank only; soft_labels / hxe: Bertinetto et al. 2020 on the
    # lowest rank's softmax (soft_labels_beta / hxe_alpha). model/losses.py cites each.
    # Default hxe: chosen by `taxoclass benchmark` on the leaf data's selection seeds
    # (BENCHMARKS.md, "Does the hierarchy pay?"); per-rank heads: kind dependency.
    kind: str = _opt("hxe", choices=LOSS_KINDS)
    rank_weights: dict[str, float] | None = None  # e.g. {family: 1, genus: 1, species: 1}
    dependency_weight: float = _opt(1.0, ge=0)
    class_balanced: bool = False
    class_balanced_beta: float = _opt(0.999, ge=0, lt=1)
    label_smoothing: float = _opt(0.0, ge=0, lt=1)
    bjerge_penalty: float = _opt(3.0, ge=1)     # p of p**(D*l_parent) * p**(D*l_child) - 1
    soft_labels_beta: float = _opt(10.0, ge=0)  # target exp(-beta * LCA height / tree height)
    hxe_alpha: float = _opt(0.1, ge=0)          # edge weight exp(-alpha * height of its child)

    def check(self, *, where: str | None = None) -> None:
        super().check(where=where)
        where = where or self.section
        if self.class_balanced and self.kind in ("soft_labels", "hxe"):
            raise ConfigError(f"{where}.class_balanced: not defined for {where}.kind "
                              f"{self.kind!r} (its targets are distributions); set "
                              f"class_balanced: false or use kind dependency, bjerge or flat.")
        for rank, w in (self.rank_weights or {}).items():
            _check_value(f"{where}.rank_weights.{rank}", w, float, {"ge": 0})


@dataclass
class TrainConfig(Section):
    """``train``: head training on cached embeddings."""

    section: ClassVar[str] = "train"

    epochs: int = _opt(200, ge=1)
    batch_size: int | None = _opt(256, ge=0)  # 0 or null: full batch
    lr: float = _opt(0.003, gt=0)
    weight_decay: float = _opt(0.0001, ge=0)
    patience: int | None = _opt(20, ge=0)    # early stopping on validation loss; 0/null: off
    # torch intra-op threads while heads train (restored after); null: 1 for heads under
    # 8 M weights (model.threads.head_threads; bench/head_threads.py), torch's default above
    threads: int | None = _opt(None, ge=1)
    seed: int = 0


@dataclass
class DecodeConfig(Section):
    """``decode``: coherent probabilities along the taxonomy."""

    section: ClassVar[str] = "decode"

    # marginal: the lowest head summed up the tree (the default loss, hxe, trains only the
    # lowest head); path: every head votes (for loss.kind dependency / bjerge).
    method: str = _opt(DecodeMethod.MARGINAL.value, choices=[m.value for m in DecodeMethod])
    top_k: int = _opt(5, ge=1)


@dataclass
class AugmentConfig(Section):
    """``augment``: tile-like views of TRAINING images (:mod:`taxoclass.features.views`,
    whose ``ViewSettings`` takes its defaults from here and checks the values in depth)."""

    section: ClassVar[str] = "augment"

    views_per_image: int = _opt(0, ge=0)  # 0: off; e.g. 4 for a head that classifies tiles
    size: int = _opt(320, ge=8)       # square output view, pixels
    scale: tuple[float, float] = (0.45, 1.4)  # object's longest side / view side
    rotate: bool = True               # uniform 0-360 degrees
    max_cut: float = _opt(0.35, ge=0, lt=1)  # share of the object allowed outside per axis
    background: str = "clutter"       # black | noise | clutter | a folder of background photos
    object_threshold: int = _opt(80, ge=0, le=254)  # grey level above which a pixel is object
    mask: str = "threshold"           # threshold: object pixels only; none: whole image
    seed: int = _opt(0, ge=0)
    dir: str | None = None            # views + their embeddings; default <embeddings.cache>-views

    def view_settings(self) -> dict[str, Any]:
        """The keys ``ViewSettings`` takes (all but ``dir``)."""
        d = self.to_dict()
        d.pop("dir")
        return d


@dataclass
class OpensetConfig(Section):
    """``openset``: outlier detector, evidence combiner and per-rank thresholds.

    ``recipe: auto`` (default) chooses detector, combiner, confidence and gate quantile
    among the ``candidate_*`` lists by leave-taxa-out rounds on the training data, and
    fits the thresholds with the hidden taxa as simulated unknowns at ``unknown_share``
    (:mod:`taxoclass.openset.selection`, docs/openset.md). ``recipe: fixed`` (and the
    fallback on data too small to hide taxa) uses ``detector`` etc. as set; their defaults
    were chosen on bench/openset.py (leaf data, 12 held-out species): the species rank is
    named only when the image is within the known species' Mahalanobis range
    (``gate_quantile`` of correctly named validation images) AND its path logit passes the
    threshold fitted to ``target_precision``.

    ``calibration``: what the combiner and thresholds are fitted on. holdout: the head
    trains on the training split, calibration on the validation split (~30% of images,
    never trained on). crossfit: ``folds`` heads, each trained on the other folds of
    train+validation, give out-of-fold predictions for every image; calibration rests on
    all of them and the final head trains on all images without a validation split
    (patience then watches the training loss). On the leaf bench
    (bench/results/openset_crossfit.md) crossfit names more known species at the same
    precision but also more held-out species; not with ``train --finetune``.
    """

    section: ClassVar[str] = "openset"

    enabled: bool = True              # fit an outlier detector + per-rank thresholds
    detector: str = _opt(Detector.MAHALANOBIS.value, choices=[d.value for d in Detector])
    scope: str = _opt(Scope.GLOBAL.value, choices=[s.value for s in Scope])  # pyod detectors
    combiner: str = _opt(Combiner.GATE.value, choices=[c.value for c in Combiner])
    confidence: str = _opt(Confidence.PATH_LOGIT.value,
                           choices=[c.value for c in Confidence])
    gate_quantile: float = _opt(0.975, gt=0, le=1)  # distance cut: quantile of right answers
    target_precision: float | dict[str, float] = _opt(  # "default": any rank not named
        factory=lambda: {"family": 0.95, "genus": 0.95, "species": 0.97, "default": 0.95})
    min_support: int = _opt(10, ge=1)  # fewest validation answers a threshold may rest on
    max_train: int = _opt(50000, ge=2)  # detector reference set size (seeded subsample above)
    calibration: str = _opt(Calibration.HOLDOUT.value, choices=[c.value for c in Calibration])
    folds: int = _opt(5, ge=2)        # crossfit: number of species-stratified folds (seeded)
    # --- recipe chosen on the training data (issue 18; docs/openset.md) ---
    recipe: str = _opt("auto", choices=["auto", "fixed"])  # auto: detector, combiner,
    #                                   confidence, gate_quantile chosen by leave-taxa-out
    #                                   rounds on the training data; fixed: as set above
    unknown_share: float = _opt(0.2, ge=0, lt=1)  # expected share of unknown images in use:
    #                                   thresholds target precision over ALL images at it
    rounds: int = _opt(3, ge=0)       # leave-taxa-out rounds (one head + detectors each);
    #                                   0: no simulated unknowns (precision over known only)
    holdout_fraction: float = _opt(0.15, gt=0, lt=1)  # per round: share of the lowest-rank
    #                                   taxa (whose parent keeps another) hidden
    holdout_taxa: int = _opt(2, ge=0)  # per round: whole taxa hidden at each higher rank
    min_species: int = _opt(10, ge=3)  # fewer lowest-rank taxa: no rounds, fixed recipe
    candidate_detectors: list[str] = _opt(factory=lambda: ["mahalanobis", "knn", "lof"])
    candidate_combiners: list[str] = _opt(factory=lambda: ["gate", "rank_mean", "logistic"])
    candidate_confidences: list[str] = _opt(factory=lambda: ["path_logit", "path_prob"])
    candidate_gate_quantiles: list[float] = _opt(  # gate combiner only
        factory=lambda: [0.9, 0.95, 0.975, 0.99])
    precision_slack: float = _opt(0.01, ge=0, lt=1)  # auto: a candidate "meets" the species
    #                                   target when its CV precision over all images is
    #                                   >= target - slack (then: most known named)

    def detector_args(self) -> dict[str, Any]:
        """Keyword arguments of ``openset.scorer.fit_detector``."""
        return {"method": self.detector, "scope": self.scope}

    def evidence_args(self) -> dict[str, Any]:
        """Keyword arguments of ``openset.scorer.fit_evidence``."""
        return {"combiner": self.combiner, "confidence": self.confidence,
                "gate_quantile": float(self.gate_quantile),
                "target_precision": copy.deepcopy(self.target_precision),
                "min_support": int(self.min_support)}

    def check(self, *, where: str | None = None) -> None:
        super().check(where=where)
        where = where or self.section
        tp = self.target_precision
        for rank, t in (tp.items() if isinstance(tp, Mapping) else [(None, tp)]):
            key = f"{where}.target_precision" + (f".{rank}" if rank else "")
            _check_value(key, t, float, {"gt": 0, "le": 1})
        for key, allowed in (("candidate_detectors", Detector),
                             ("candidate_combiners", Combiner),
                             ("candidate_confidences", Confidence)):
            values = list(getattr(self, key))
            bad = [v for v in values if v not in {a.value for a in allowed}]
            if bad or not values:
                raise ConfigError(f"{where}.{key}: expected a non-empty list of "
                                  f"{[a.value for a in allowed]}, found {values!r}.")
        for q in self.candidate_gate_quantiles:
            _check_value(f"{where}.candidate_gate_quantiles", q, float, {"gt": 0, "le": 1})


@dataclass
class FinetuneSettings(Section):
    """``finetune``: `taxoclass train --finetune`, backbone + heads end to end."""

    section: ClassVar[str] = "finetune"

    epochs: int = _opt(10, ge=1)
    batch_size: int = _opt(32, ge=1)  # images per forward pass (micro-batch)
    accum_steps: int = _opt(1, ge=1)  # micro-batches per optimizer step
    lr: float = _opt(1e-4, gt=0)      # heads and final norms; lower groups get lr * decay**depth
    layer_decay: float = _opt(0.75, gt=0, le=1)  # block k from the top: lr * 0.75**k; 1: flat
    weight_decay: float = _opt(0.05, ge=0)  # not on biases, norms, tokens, position embeddings
    warmup_epochs: float = _opt(1.0, ge=0)  # linear warmup, then cosine decay per step
    min_lr_ratio: float = _opt(0.01, ge=0, le=1)  # cosine floor, fraction of each peak lr
    unfreeze_blocks: int = _opt(-1, ge=-1)  # -1 all, 0 heads only, N last N blocks + heads
    grad_clip: float | None = _opt(1.0, ge=0)  # max global gradient norm; None or 0: none
    patience: int = _opt(3, ge=0)     # epochs without a better validation loss; 0: no stop
    augment: bool = True              # False: train with the eval transform
    num_workers: int = _opt(4, ge=0)
    seed: int = 0
    max_steps: int | None = _opt(None, ge=1)  # pause (with a checkpoint) after N steps
    checkpoint_steps: int | None = _opt(None, ge=1)  # also checkpoint every N steps
    resume: bool = True               # continue from <out>/finetune_state/last.pt if present
    keep_checkpoints: bool = False    # keep <out>/finetune_state after a finished run
    compile: bool = False             # torch.compile the model (CUDA only)
    freeze_bn: bool = False           # BatchNorm keeps its running statistics (eval mode;
    #                                   scale and shift still train): equal results for any
    #                                   process count on a CPU (SyncBatchNorm is CUDA-only)
    tile_views: int = _opt(0, ge=0)   # per epoch, each image also seen N times as a fresh
    #                                   tile-like view (the augment section's settings)
    probe_head: bool = False          # `train --finetune`: start from heads trained on the
    #                                   frozen backbone's cached embeddings (LP-FT);
    #                                   finetune() itself takes such heads as ``head_init``

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> FinetuneSettings:
        """:meth:`from_dict` (the name finetune.py has always used)."""
        return cls.from_dict(cfg)

    def validate(self) -> None:
        """:meth:`check` (the name finetune.py has always used)."""
        self.check()


@dataclass
class Config(Section):
    """A whole config: one typed section per YAML section, plus ``out``."""

    section: ClassVar[str] = "config"

    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    openset: OpensetConfig = field(default_factory=OpensetConfig)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    out: str | None = None

    @classmethod
    def from_dict(cls, m: Mapping[str, Any] | None = None, *,
                  where: str | None = None) -> Config:
        """Every section from a (partial) config mapping, checked."""
        m = dict(m or {})
        kinds = {f.name: f.default_factory for f in fields(cls)  # type: ignore[misc]
                 if f.name != "out"}
        unknown = sorted(str(k) for k in m if k not in kinds and k != "out")
        if unknown:
            raise ConfigError(f"{where or 'config'}: unknown section(s) {unknown}. Expected "
                              f"some of {sorted([*kinds, 'out'])}.")
        out = m.get("out")
        _check_value("out", out, str | None, {})
        cfg = cls(out=out, **{k: kind.from_dict(m.get(k))  # type: ignore[attr-defined]
                              for k, kind in kinds.items()})
        if cfg.decode.method == "topdown" and cfg.loss.kind in LEAF_ONLY_LOSSES:
            raise ConfigError(f"decode.method: 'topdown' needs a head per rank, but loss.kind "
                              f"{cfg.loss.kind!r} trains the lowest rank only; use decode.method "
                              f"marginal or crm, or loss.kind dependency or bjerge.")
        tp = cfg.openset.target_precision
        ranks = [] if isinstance(cfg.data.ranks, str) else cfg.data.ranks  # auto: when loaded
        missing = [r for r in ranks if cfg.openset.enabled and isinstance(tp, Mapping)
                   and r not in tp and "default" not in tp]
        if missing:
            raise ConfigError(f"openset.target_precision: no value for rank(s) {missing} of "
                              f"data.ranks {cfg.data.ranks}; give one per rank, e.g. "
                              f"{ {r: 0.95 for r in cfg.data.ranks} }, a 'default' for the ranks "
                              f"not named, or one number.")
        return cfg


#: The YAML-shaped defaults a config file is laid over: derived from :class:`Config`.
DEFAULTS: dict[str, Any] = Config().to_dict()

CALIBRATIONS: tuple[str, ...] = tuple(c.value for c in Calibration)


def complete_config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """A (partial) config as the whole YAML-shaped dict, checked: missing keys take the
    section defaults, so every job reads one set of defaults (no ``.get(key, default)``)."""
    return Config.from_dict(cfg).to_dict()


def openset_calibration(ocfg: Mapping[str, Any] | None) -> tuple[str, int]:
    """``(calibration, folds)`` of an ``openset`` section, checked (:class:`ConfigError`)."""
    o = OpensetConfig.from_dict(ocfg)
    return str(o.calibration), int(o.folds)


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
    """Defaults, then the YAML file, then ``--set`` overrides; paths resolved to absolute.

    With the standard ``defaults``, every value is then checked (:meth:`Config.from_dict`).
    """
    cfg = _load_layers(path, overrides, defaults)
    if defaults is DEFAULTS:
        Config.from_dict(cfg)
    return cfg


def _load_layers(path: str | Path | None, overrides: Sequence[str],
                 defaults: Mapping[str, Any], _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    cfg = copy.deepcopy(dict(defaults))
    if path is not None:
        path = Path(path)
        data = _read_yaml(path)
        parent = data.pop("extends", None)
        if parent is not None and not isinstance(parent, str):
            raise ConfigError(f"{path}: extends: expected the path of another config file, "
                              f"found {parent!r}.")
        if parent:  # another config file this one starts from (relative to this file)
            chain = (*_chain, path.resolve())
            target = (path.resolve().parent / parent).resolve()
            if target in chain:
                raise ConfigError(f"{path}: extends {parent!r} goes round in a circle ("
                                  + " -> ".join(str(p) for p in (*chain, target))
                                  + "). Fix: remove one of the extends.")
            cfg = _load_layers(target, (), defaults, chain)
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


def _read_yaml(path: Path) -> dict[str, Any]:
    """A config file's top-level mapping (:class:`ConfigError` for anything else)."""
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file. See configs/ for examples.")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found. See configs/ for examples.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason}); save the config as "
                          "UTF-8.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, found "
                          f"{type(data).__name__}.")
    return dict(data)


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
