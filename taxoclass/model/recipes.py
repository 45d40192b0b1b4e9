"""Every method of the evaluation protocol (issue 17) as a named recipe: fit on embeddings
and targets, predict a :class:`~taxoclass.model.decoding.Decoded`.

    predictor = fit_recipe("taxoclass", x_train, y_train, taxonomy, seed=0,
                           settings=load_config("configs/leaf.yaml"))
    decoded = predictor.predict(x_test)   # path, probs, path_prob, head_argmax, ...

``y``: rank -> class index array, ``-1`` where the label stops above that rank.
``settings``: config keys, either nested sections (a whole loaded config works; only
``model``, ``loss``, ``train`` and ``decode`` are read) or dotted keys as ``--set``
takes them (``{"loss.dependency_weight": 2}``); plus recipe options for the baselines
(``logreg.C``, ``logreg.folds``, ``hiclass.C``, ``knn.mode``, ``knn.temperature``).
Missing keys take the defaults of :mod:`taxoclass.config`, the one source of defaults, so
``fit_recipe("taxoclass", ..., settings=cfg)`` trains what ``taxoclass train`` trains with
``cfg``. A head recipe fixes the keys that define it (``species-only`` fixes
``loss.kind: flat`` and ``decode.method: marginal``); those win over ``settings``, and
``seed`` sets ``train.seed``.

Head recipes (``Recipe.kind == "head"``: :func:`~taxoclass.model.training.train_head`
on all rows given, then a decoding): ``taxoclass`` (the config as given; with the
defaults of :mod:`taxoclass.config`, hierarchical cross-entropy + marginal decoding),
``species-only`` (the control: same recipe, loss on the lowest rank only, decoded up the
tree by summing), ``soft-labels`` and ``hxe`` (Bertinetto et al. 2020), ``per-rank`` (the
previous default: a head per rank, cross-entropy at each plus the class-dependency term,
path decoding), ``bjerge`` (Bjerge et al. 2023's dependency loss, path decoding), ``crm``
(Karthik et al. 2021 on the per-rank heads), ``species-only+crm`` (CRM on the control, as
Karthik et al. apply it), ``path``/``marginal``/``topdown`` (the per-rank heads, that
decoding). Every recipe but ``taxoclass`` fixes ``loss.kind`` and ``decode.method``, so
it means what its summary says whatever the config holds. Baselines (``kind ==
"baseline"``): ``logreg`` (flat logistic regression, C by inner CV on the training data),
``hiclass`` (LocalClassifierPerParentNode + logistic regression), ``knn`` (cosine 1-NN).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..config import (
    DEFAULTS,
    LEAF_ONLY_LOSSES,
    DecodeConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    deep_merge,
)
from ..errors import ConfigError
from .baselines import (
    HiclassBaseline,
    NearestNeighbour,
    check_embeddings,
    check_targets,
    choose_C,
    l2_normalise,
    row_space,
)
from .decoding import Decoded, decode, decode_leaf_probabilities
from .training import normalize, train_head

if TYPE_CHECKING:
    from ..taxonomy.tree import Taxonomy

__all__ = ["RECIPES", "Predictor", "Recipe", "available", "fit_recipe", "head_recipes",
           "recipe_config"]

_HEAD_SECTIONS = ("model", "loss", "train", "decode")


class Predictor(Protocol):
    def predict(self, x: np.ndarray) -> Decoded: ...


@dataclass(frozen=True)
class Recipe:
    """A named method: ``fit(x, y, taxonomy, seed, config, options) -> Predictor``.
    ``kind``: ``"head"`` (a trained :class:`HeadPredictor`: the head depends only on the
    ``model``/``loss``/``train`` sections, ``decode`` only chooses how it is read) or
    ``"baseline"``; ``fixed``: the dotted config keys that define it (they win over
    ``settings``); ``options``: the recipe options it accepts (``settings`` keys
    ``<name>.<option>``)."""

    name: str
    summary: str
    fit: Callable[..., Predictor]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "baseline"


# ------------------------------------------------------------------ settings
def _split_settings(settings: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """(nested config overrides of the head sections, dotted recipe options)."""
    nested: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in (settings or {}).items():
        key = str(key)
        head, _, rest = key.partition(".")
        if not rest:
            if key in _HEAD_SECTIONS:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"settings[{key!r}]: expected a mapping of keys to "
                                      f"values, found {value!r}.")
                nested[key] = deep_merge(nested.get(key, {}), value, strict=False)
            elif key not in DEFAULTS:
                raise ConfigError(f"settings: unknown key {key!r}; expected config sections "
                                  f"({', '.join(sorted(DEFAULTS))}) or dotted keys such as "
                                  f"'loss.dependency_weight'.")
            continue  # other config sections (data, backbone, ...) do not concern a recipe
        if head in _HEAD_SECTIONS:
            node = nested.setdefault(head, {})
            parts = rest.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        elif head in DEFAULTS:
            continue
        else:
            options[key] = value
    return nested, options


def recipe_config(name: str, settings: Mapping[str, Any] | None = None,
                  seed: int = 0) -> dict[str, dict[str, Any]]:
    """The checked ``model``/``loss``/``train``/``decode`` sections recipe ``name`` trains
    with: config defaults < ``settings`` < the recipe's fixed keys < ``train.seed = seed``.
    Raises :class:`ConfigError` on unknown keys or bad values."""
    recipe = _recipe(name)
    nested, _ = _split_settings(settings)
    fixed, _ = _split_settings(recipe.fixed)
    cfg = {s: copy.deepcopy(DEFAULTS[s]) for s in _HEAD_SECTIONS}
    for layer in (nested, fixed, {"train": {"seed": int(seed)}}):
        for s, values in layer.items():
            cfg[s] = deep_merge(cfg[s], values, where=s)
    classes = {"model": ModelConfig, "loss": LossConfig, "train": TrainConfig,
               "decode": DecodeConfig}
    out = {s: classes[s].from_dict(cfg[s]).to_dict() for s in _HEAD_SECTIONS}
    if out["decode"]["method"] == "topdown" and out["loss"]["kind"] in LEAF_ONLY_LOSSES:
        raise ConfigError(f"recipe {name!r}: decode.method 'topdown' needs a head per rank, "
                          f"but loss.kind {out['loss']['kind']!r} trains the lowest only.")
    return out


def _options(recipe: Recipe, options: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(recipe.options)
    for key, value in options.items():
        head, _, opt = key.partition(".")
        if head not in RECIPE_OPTION_OWNERS:
            known = sorted(f"{n}.{o}" for n, r in RECIPES.items() for o in r.options)
            raise ConfigError(f"settings: unknown key {key!r}; expected config keys "
                              f"(section.key) or recipe options {known}.")
        if head != recipe.name:
            continue  # another recipe's option (one settings mapping serves every recipe)
        if opt not in recipe.options:
            raise ConfigError(f"settings: recipe {recipe.name!r} has no option {opt!r}; "
                              f"expected one of {sorted(recipe.options)}.")
        out[opt] = value
    return out


# ------------------------------------------------------------------ head recipes
@dataclass
class HeadPredictor:
    """A trained :class:`~taxoclass.model.heads.MultiRankHead` and how to decode it. Only
    the heads the loss trained are decoded (and reported in ``head_argmax``)."""

    head: torch.nn.Module
    taxonomy: Any
    ranks: tuple[str, ...]
    method: str
    top_k: int
    normalize: bool

    def logits(self, x: np.ndarray) -> dict[str, torch.Tensor]:
        xt = normalize(x) if self.normalize else torch.as_tensor(x, dtype=torch.float32)
        self.head.eval()
        with torch.inference_mode():
            out = self.head(xt)
        return {r: out[r] for r in self.ranks}

    def predict(self, x: np.ndarray) -> Decoded:
        x = check_embeddings(x, who="HeadPredictor")
        return decode(self.logits(x), self.taxonomy, method=self.method, top_k=self.top_k)


def _fit_head(x: np.ndarray, y: Mapping[str, np.ndarray], taxonomy: Taxonomy, seed: int,
              cfg: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any]) -> HeadPredictor:
    res = train_head(x, y, None, None, taxonomy, model=cfg["model"], loss=cfg["loss"],
                     train=cfg["train"], normalize_inputs=bool(cfg["model"]["normalize"]))
    # heads the loss does not train are frozen at zero (training.freeze_untrained_heads)
    ranks = tuple(r for r in taxonomy.ranks if res.head.heads[r].weight.requires_grad)
    return HeadPredictor(res.head, taxonomy, ranks, str(cfg["decode"]["method"]),
                         int(cfg["decode"]["top_k"]), bool(cfg["model"]["normalize"]))


# ------------------------------------------------------------------ baselines
@dataclass
class LogRegPredictor:
    """Flat logistic regression on the lowest rank over L2-normalised features, fitted
    in the span of the training rows (same model, fewer columns; :func:`row_space`)."""

    model: Any
    basis: np.ndarray
    taxonomy: Any
    top_k: int
    C: float
    cv_scores: dict[float, float]

    def predict(self, x: np.ndarray) -> Decoded:
        x = check_embeddings(x, self.basis.shape[0], "logreg")
        p = self.model.predict_proba(l2_normalise(x) @ self.basis)
        lowest = self.taxonomy.ranks[-1]
        full = np.zeros((len(x), self.taxonomy.n_classes(lowest)), np.float32)
        full[:, self.model.classes_] = p
        return decode_leaf_probabilities(full, self.taxonomy, top_k=self.top_k,
                                         method="logreg+marginal")


def _lowest_labelled(x: np.ndarray, y: Mapping[str, np.ndarray], taxonomy, who: str):
    x = check_embeddings(x, who=who)
    t = check_targets(y, taxonomy, len(x), who)
    m = t[taxonomy.ranks[-1]] >= 0
    if len(np.unique(t[taxonomy.ranks[-1]][m])) < 2:
        raise ValueError(f"{who}: needs images of at least two classes labelled at the lowest "
                         f"rank {taxonomy.ranks[-1]!r}.")
    return x[m], t[taxonomy.ranks[-1]][m]


def _fit_logreg(x, y, taxonomy, seed, cfg, options) -> LogRegPredictor:
    from sklearn.linear_model import LogisticRegression

    xs, ys = _lowest_labelled(x, y, taxonomy, "logreg")
    xn = l2_normalise(xs)
    basis = row_space(xn)
    z = xn @ basis
    if options["C"] is None:
        C, scores = choose_C(z, ys, folds=int(options["folds"]), seed=seed)
    else:
        C, scores = float(options["C"]), {}
    model = LogisticRegression(C=C, max_iter=3000).fit(z, ys)
    return LogRegPredictor(model, basis, taxonomy, int(cfg["decode"]["top_k"]), C, scores)


def _fit_hiclass(x, y, taxonomy, seed, cfg, options) -> HiclassBaseline:
    C = options["C"]
    if C is None:  # the flat probe's inner-CV choice (one grid, on the training data)
        xs, ys = _lowest_labelled(x, y, taxonomy, "hiclass")
        xn = l2_normalise(xs)
        z = xn @ row_space(xn)
        C, _ = choose_C(z, ys, folds=int(options["folds"]), seed=seed)
    return HiclassBaseline(taxonomy, C=float(C), top_k=int(cfg["decode"]["top_k"])).fit(x, y)


def _fit_knn(x, y, taxonomy, seed, cfg, options) -> NearestNeighbour:
    return NearestNeighbour(taxonomy, mode=str(options["mode"]),
                            temperature=float(options["temperature"]),
                            top_k=int(cfg["decode"]["top_k"])).fit(x, y)


# ------------------------------------------------------------------ the table
def _head(name: str, summary: str, **fixed: Any) -> Recipe:
    return Recipe(name, summary, _fit_head, {k.replace("__", "."): v for k, v in fixed.items()},
                  kind="head")


def _per_rank(name: str, summary: str, method: str) -> Recipe:
    """A head per rank (cross-entropy at each + the class-dependency term), ``method``."""
    return _head(name, summary, loss__kind="dependency", decode__method=method)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    _head("taxoclass", "the config as given (defaults: hierarchical cross-entropy, marginal "
          "decoding)"),
    _head("species-only", "the control: same recipe, cross-entropy on the lowest rank only, "
          "probabilities summed up the tree", loss__kind="flat", decode__method="marginal"),
    _head("species-only+crm", "the control decoded by conditional risk (Karthik et al. 2021)",
          loss__kind="flat", decode__method="crm"),
    _head("soft-labels", "soft hierarchical labels on the lowest rank (Bertinetto et al. 2020)",
          loss__kind="soft_labels", decode__method="marginal"),
    _head("hxe", "hierarchical cross-entropy on the lowest rank (Bertinetto et al. 2020)",
          loss__kind="hxe", decode__method="marginal"),
    _per_rank("per-rank", "the previous default: a head per rank, cross-entropy at each + "
              "class-dependency term, path decoding", "path"),
    _head("bjerge", "per-rank CE + Bjerge et al. 2023's dependency loss, path decoding",
          loss__kind="bjerge", decode__method="path"),
    _per_rank("crm", "per-rank heads, conditional-risk decoding (Karthik et al. 2021)", "crm"),
    _per_rank("path", "per-rank heads, path decoding", "path"),
    _per_rank("marginal", "per-rank heads, lowest head summed up the tree", "marginal"),
    _per_rank("topdown", "per-rank heads, greedy top-down decoding", "topdown"),
    Recipe("logreg", "flat logistic regression, C by inner stratified CV on the training data",
           _fit_logreg, options={"C": None, "folds": 3}),
    Recipe("hiclass", "hiclass LocalClassifierPerParentNode + logistic regression",
           _fit_hiclass, options={"C": None, "folds": 3}),
    Recipe("knn", "cosine nearest neighbour (species mode)", _fit_knn,
           options={"mode": "species", "temperature": 0.05}),
)}
RECIPE_OPTION_OWNERS = frozenset(n for n, r in RECIPES.items() if r.options)


def available() -> tuple[str, ...]:
    """Names of every recipe, in table order."""
    return tuple(RECIPES)


def head_recipes() -> tuple[str, ...]:
    """Names of the recipes whose predictor is a trained head plus a decoding method."""
    return tuple(n for n, r in RECIPES.items() if r.kind == "head")


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"Unknown recipe {name!r}; expected one of {', '.join(RECIPES)}.")
    return RECIPES[name]


def fit_recipe(name: str, x: np.ndarray, y: Mapping[str, np.ndarray], taxonomy: Taxonomy, *,
               seed: int = 0, settings: Mapping[str, Any] | None = None) -> Predictor:
    """Fit recipe ``name`` on embeddings ``x`` and targets ``y`` (every row given trains;
    settings are never chosen here on held-out data)."""
    recipe = _recipe(name)
    cfg = recipe_config(name, settings, seed)
    _, options = _split_settings(settings)
    return recipe.fit(np.asarray(x, dtype=np.float32), y, taxonomy, int(seed), cfg,
                      _options(recipe, options))
