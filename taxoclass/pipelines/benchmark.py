"""The evaluation protocol (issue 17): every method on the same repeated splits, with
intervals, paired tests against a control, and the axes where a hierarchy should help.

:func:`benchmark` runs it on :class:`BenchmarkData` (embeddings and labels;
:func:`benchmark_data` reads them from a train config: the annotations and the embedding
store the config names, nothing is embedded twice). The protocol:

- **Splits.** For each split seed a test share (``test_fraction``, default 0.3) drawn by
  :func:`~taxoclass.model.splits.validation_split`: stratified by each image's taxon path,
  whole groups on one side where the data has ``data.group_by``. Every method sees the
  identical split, training labels and features (:func:`split_for`).
- **Seeds.** ``seeds`` are the *selection* seeds (an int ``N`` means 1..N): every
  setting, the default included, may be chosen on them (:func:`select_on_selection_seeds`
  reads nothing else). ``final_seeds`` (default ``(0,)``) are kept back: they are scored
  (rows with ``split == "final"``) but never used to choose anything; a seed in both is an
  error.
- **Intervals and tests.** Over the selection seeds: mean and 95% Student-t interval; the
  difference to the control (default ``"species-only"``, the same recipe trained on the
  lowest rank only) with its paired t interval and paired t-test p-value over splits; for
  per-image right/wrong metrics also an exact McNemar test per split (the splits share
  images, so they are not pooled): the summary counts the splits where the method is
  significantly better / worse (p < 0.05). On a kept-back seed: Wilson interval and
  McNemar p against the control.
- **Metrics** (one row per seed x recipe x axis, :mod:`taxoclass.model.metrics`
  conventions): accuracy and macro-F1 per rank, hierarchical F1, mistake severity (mean
  tree distance of real mistakes) beside the top-1 error, abstention rate, expected
  calibration error of the lowest rank's path probability (10 equal-width bins),
  accuracy per frequency bin of the lowest rank by training images in that split (tail
  <= ``bins[0]``, medium <= ``bins[1]``, head above; default 5 and 20), and the heads'
  coherence where a method has heads.
- **Axes** (:data:`AXES`): ``full`` labels; ``partial-25/50/75`` (that share of the
  training images lose their lowest-rank label, keeping the rank above; seeded);
  ``family-only`` (a seeded quarter of the lowest-rank taxa are labelled only to family,
  the third rank from the bottom, in training: scored by family accuracy on their test
  images); ``long-tail`` (a seeded half of the taxa keep 2 training images: scored on
  their test images); ``unseen`` (a seeded fifth of the taxa whose parent keeps another
  are left out of training and of the model's taxonomy: genus and family placement of
  all their images; the known taxa's test images are scored as usual).

:func:`write_benchmark` writes ``results.csv``, ``summary.md``, ``reliability.png`` and
``reliability.csv`` as one folder (:func:`~taxoclass.io.files.output_folder`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError
from .benchmark_report import BenchmarkResult, write_benchmark

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
FitFn = Callable[..., Any]

__all__ = ["AXES", "BenchmarkData", "BenchmarkResult", "benchmark", "benchmark_data",
           "recipe_settings", "select_on_selection_seeds", "split_for"]

AXES: tuple[str, ...] = ("full", "partial-25", "partial-50", "partial-75", "family-only",
                         "long-tail", "unseen")
CONTROL = "species-only"
FAMILY_ONLY_FRACTION = 0.25
TAIL_FRACTION, TAIL_IMAGES = 0.5, 2
UNSEEN_FRACTION = 0.2


@dataclass
class BenchmarkData:
    """What the protocol needs: embeddings ``x`` [n, d], targets ``y`` (rank -> class
    index, -1 where the label stops), the taxonomy and, optionally, a group per row."""

    x: np.ndarray
    y: dict[str, np.ndarray]
    taxonomy: Any
    groups: np.ndarray | None = None
    name: str = "data"

    @property
    def strata(self) -> np.ndarray:
        """Each row's taxon path as text (the split's strata)."""
        ranks = self.taxonomy.ranks
        cols = np.stack([self.y[r] for r in ranks], axis=1)
        return np.array(["/".join(map(str, row)) for row in cols])


def benchmark_data(cfg: dict, *, progress: Progress | None = None) -> BenchmarkData:
    """Embeddings and labels of a train config's data (``data.annotations`` through the
    config's embedding store; images missing there are embedded once and stored, as
    ``taxoclass train`` does)."""
    from pathlib import Path

    from ..config import complete_config
    from ..model.splits import group_codes
    from ..taxonomy.annotations import load_annotations
    from ..taxonomy.labels import encode_labels
    from .data import config_embeddings, known_rows

    cfg = complete_config(cfg)
    data = cfg["data"]
    if not data.get("annotations"):
        raise ConfigError("data.annotations is not set: point it at the annotations JSON "
                          "(in the config or with --set data.annotations=PATH).")
    if not cfg.get("out") and not cfg["embeddings"].get("cache"):
        raise ConfigError("the benchmark needs the embedding store: set embeddings.cache "
                          "(or out) in the config.")
    root = Path(data.get("images_root") or Path(data["annotations"]).parent)
    ann = load_annotations(data["annotations"], allow_outside_root=data.get("allow_outside_root"))
    group_by = data.get("group_by")
    tax, rows = known_rows(ann, ann.labelled_images(root, group_by=group_by), data)
    y, _ = encode_labels(tax, rows)
    x, found, _ = config_embeddings(cfg, rows, progress=progress)
    groups = group_codes(rows["group"], group_by) if group_by else None
    keep = np.asarray(found, dtype=bool)
    return BenchmarkData(x=x[keep], y={r: v[keep] for r, v in y.items()}, taxonomy=tax,
                         groups=None if groups is None else groups[keep],
                         name=Path(data["annotations"]).name)


# ------------------------------------------------------------------------------ splits
def split_for(data: BenchmarkData, seed: int, axis: str = "full", *,
              test_fraction: float = 0.3) -> dict[str, Any]:
    """The split of one seed and axis that every method gets: ``train``/``test`` row
    indices, training targets ``y_train`` (changed by the axis), the taxonomy the methods
    train on, and the axis' rows of interest (``focus``: test rows indexing ``test``, or
    for ``unseen`` the rows of the unseen taxa)."""
    from ..model.splits import validation_split

    if axis not in AXES:
        raise ConfigError(f"benchmark: unknown axis {axis!r}; expected one of {AXES}.")
    is_test = validation_split(data.strata, test_fraction, int(seed), groups=data.groups)
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    rng = np.random.default_rng([int(seed), AXES.index(axis)])
    y_tr = {r: v[train].copy() for r, v in data.y.items()}
    tax = data.taxonomy
    out = {"train": train, "test": test, "y_train": y_tr, "taxonomy": tax, "focus": None,
           "y_test": {r: v[test] for r, v in data.y.items()}}
    if axis.startswith("partial-"):
        _hide_lowest(y_tr, tax, int(axis.split("-")[1]) / 100, rng)
    elif axis == "family-only":
        out["focus"] = _family_only(y_tr, out["y_test"], tax, rng)
    elif axis == "long-tail":
        keep, focus = _long_tail(y_tr, out["y_test"], tax, rng)
        out["train"], out["focus"] = train[keep], focus
        out["y_train"] = {r: v[keep] for r, v in y_tr.items()}
    elif axis == "unseen":
        out.update(_unseen(data, train, test, rng))
    return out


def _real(y_rank: np.ndarray, tax, rank: str | None = None) -> np.ndarray:
    """Rows whose target at ``rank`` (default the lowest) is a real taxon (not -1, not a
    placeholder): the rows :mod:`~taxoclass.model.metrics` scores there."""
    rank = rank or tax.ranks[-1]
    holders = np.array([tax.is_placeholder(n) for n in tax.nodes(rank)], dtype=bool)
    return (y_rank >= 0) & ~holders[np.maximum(y_rank, 0)]


def _hide_lowest(y: dict[str, np.ndarray], tax, share: float, rng) -> None:
    rows = np.flatnonzero(_real(y[tax.ranks[-1]], tax))
    hide = rng.choice(rows, size=int(round(share * len(rows))), replace=False)
    y[tax.ranks[-1]][hide] = -1


def _family_only(y_tr, y_te, tax, rng) -> np.ndarray:
    """A seeded share of the lowest-rank taxa keep only the kept rank in training."""
    low = tax.ranks[-1]
    keep_rank = max(0, len(tax.ranks) - 3)
    classes = np.unique(y_tr[low][_real(y_tr[low], tax)])
    chosen = rng.choice(classes, size=max(1, int(round(FAMILY_ONLY_FRACTION * len(classes)))),
                        replace=False)
    rows = np.isin(y_tr[low], chosen)
    for r in tax.ranks[keep_rank + 1:]:
        y_tr[r][rows] = -1
    return np.flatnonzero(np.isin(y_te[low], chosen))


def _long_tail(y_tr, y_te, tax, rng) -> tuple[np.ndarray, np.ndarray]:
    low = tax.ranks[-1]
    classes = np.unique(y_tr[low][_real(y_tr[low], tax)])
    tail = rng.choice(classes, size=max(1, int(round(TAIL_FRACTION * len(classes)))),
                      replace=False)
    keep = np.ones(len(y_tr[low]), dtype=bool)
    for c in np.sort(tail):
        rows = np.flatnonzero(y_tr[low] == c)
        drop = rng.permutation(rows)[TAIL_IMAGES:]
        keep[drop] = False
    return np.flatnonzero(keep), np.flatnonzero(np.isin(y_te[low], tail))


def _unseen(data: BenchmarkData, train, test, rng) -> dict[str, Any]:
    """Hold out a seeded share of the taxa whose parent keeps another known taxon."""
    from ..taxonomy.tree import Taxonomy

    tax, low = data.taxonomy, data.taxonomy.ranks[-1]
    real = [i for i, n in enumerate(tax.nodes(low)) if not tax.is_placeholder(n)]
    present = set(np.unique(data.y[low][train]).tolist())
    siblings: dict[tuple, list[int]] = {}
    for i in real:
        if i in present:
            siblings.setdefault(tax.node(low, i)[:-1], []).append(i)
    eligible = [i for kids in siblings.values() if len(kids) > 1 for i in kids]
    want = max(1, int(round(UNSEEN_FRACTION * len(eligible)))) if eligible else 0
    held: list[int] = []
    for i in rng.permutation(np.array(eligible, dtype=np.int64)).tolist():
        parent = siblings[tax.node(low, i)[:-1]]
        if len(held) < want and sum(k not in held for k in parent) > 1:
            held.append(i)
    if not held:
        raise ConfigError("benchmark axis 'unseen': no lowest-rank taxon has a sibling "
                          "with training images to keep its parent known.")
    graph = tax.graph.copy()
    graph.remove_nodes_from([tax.node(low, i) for i in held])
    known = Taxonomy(graph, tax.ranks, genus_distances=tax.genus_distances)

    def remap(y: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for r in tax.ranks:
            lookup = np.array([known._index.get(n, -1) for n in tax.nodes(r)] + [-1])
            out[r] = lookup[np.where(y[r] >= 0, y[r], -1)]
        return out

    is_held = np.isin(data.y[low], held)
    tr = train[~is_held[train]]
    te = test[~is_held[test]]
    unseen = np.flatnonzero(is_held)
    return {"train": tr, "test": te, "taxonomy": known, "focus": unseen,
            "y_train": remap({r: v[tr] for r, v in data.y.items()}),
            "y_test": remap({r: v[te] for r, v in data.y.items()}),
            "y_focus": remap({r: v[unseen] for r, v in data.y.items()}),
            "held_out": [tax.label(tax.node(low, i)) for i in held]}


# ------------------------------------------------------------------------------ scoring
def _frequency_bins(y_train_low, y_test_low, bins) -> np.ndarray:
    """Bin per test row by its taxon's training images: 0 tail, 1 medium, 2 head."""
    counts = np.bincount(y_train_low[y_train_low >= 0], minlength=int(y_test_low.max()) + 1)
    n = counts[np.maximum(y_test_low, 0)]
    return np.where(n <= bins[0], 0, np.where(n <= bins[1], 1, 2))


def _score(decoded, split: dict, data: BenchmarkData, bins) -> tuple[dict, dict]:
    """(row of metrics, per-image right/wrong of the McNemar columns) of one method."""
    from ..model.confidence import expected_calibration_error
    from ..model.metrics import evaluate_predictions

    tax, y = split["taxonomy"], split["y_test"]
    low = tax.ranks[-1]
    n_test = len(y[low])
    path = {r: v[:n_test] for r, v in decoded.path.items()}
    heads = {r: v[:n_test] for r, v in (getattr(decoded, "head_argmax", None) or {}).items()}
    m = evaluate_predictions(path, y, tax, head_argmax=heads or None)
    row: dict[str, Any] = {"n_test": n_test}
    right: dict[str, np.ndarray] = {}
    for r in tax.ranks:
        row[f"acc_{r}"] = m["ranks"][r]["accuracy"]
        right[f"acc_{r}"] = (path[r] == y[r])[_real(y[r], tax, r)]
    row[f"f1_{low}"] = m["ranks"][low]["macro_f1"]
    row[f"abstain_{low}"] = m["ranks"][low]["abstention_rate"]
    row["hf1"] = m["hierarchical"]["f1"]
    row["mistake_distance"] = m["mistake_severity"]["mean_distance"]
    row["mistake_rate"] = m["mistake_severity"]["rate"]
    row["coherence"] = m.get("coherence_rate")
    real = _real(y[low], tax)
    ok = path[low] == y[low]
    row[f"ece_{low}"] = expected_calibration_error(decoded.path_prob[low][:n_test][real],
                                                   ok[real])
    fb = _frequency_bins(split["y_train"][low], y[low], bins)
    for k, name in enumerate(("tail", "medium", "head")):
        sel = real & (fb == k)
        row[f"acc_{name}"] = float(ok[sel].mean()) if sel.any() else None
    _focus(row, right, decoded, split, n_test)
    return row, right


def _focus(row, right, decoded, split, n_test) -> None:
    """The axis' own columns: family-only and long-tail test rows, unseen placement."""
    focus, tax = split["focus"], split["taxonomy"]
    if focus is None:
        return
    ranks = tax.ranks
    if "y_focus" in split:  # unseen: the rows after the test rows
        yf = split["y_focus"]
        for r, col in ((ranks[-2], "unseen_parent"), (ranks[max(0, len(ranks) - 3)],
                                                       "unseen_grandparent")):
            ok = decoded.path[r][n_test:] == yf[r]
            row[col], right[col] = float(ok.mean()), ok
        return
    y = split["y_test"]
    if split.get("axis") == "family-only":
        r = ranks[max(0, len(ranks) - 3)]
        ok = (decoded.path[r][:n_test] == y[r])[focus]
        row["focus_acc"], right["focus_acc"] = float(ok.mean()) if len(ok) else None, ok
    else:
        ok = (decoded.path[ranks[-1]][:n_test] == y[ranks[-1]])[focus]
        row["focus_acc"], right["focus_acc"] = float(ok.mean()) if len(ok) else None, ok


# ------------------------------------------------------------------------------ running
def _resolve(recipes, control: str) -> dict[str, FitFn]:
    """Name -> fit function ``fit(name, x, y, taxonomy, seed=..., settings=...) ->
    predictor``."""
    if recipes is None or isinstance(recipes, (str, Sequence)) and not isinstance(recipes, Mapping):
        from ..model import recipes as registry

        names = list(registry.available()) if recipes is None else (
            [recipes] if isinstance(recipes, str) else list(recipes))
        unknown = sorted(set(names) - set(registry.available()))
        if unknown:
            raise ConfigError(f"benchmark: unknown recipe(s) {unknown}; available: "
                              f"{', '.join(registry.available())}.")
        if control not in names:
            names.insert(0, control)  # the control is always in the table
        fit = _SharedHeads(registry)
        return {n: fit for n in names}
    fns = dict(recipes)
    if control not in fns:
        raise ConfigError(f"benchmark: the control {control!r} is not among the recipes "
                          f"{sorted(fns)}.")
    return fns


class _SharedHeads:
    """``recipes.fit_recipe`` that trains a head once per training set and head config:
    head recipes (``Recipe.kind == "head"``) that differ only in decoding (per-rank, crm,
    path, marginal, topdown; taxoclass and hxe with the default config) decode the same
    trained heads (training is seeded, so this is what separate fits give)."""

    def __init__(self, registry) -> None:
        self.registry, self.data_key, self.heads = registry, None, {}

    def __call__(self, name, x, y, taxonomy, *, seed=0, settings=None):
        import dataclasses
        import hashlib
        import json

        cfg = self.registry.recipe_config(name, settings, seed)
        digest = hashlib.sha1(np.ascontiguousarray(x).tobytes())
        for r in taxonomy.ranks:
            digest.update(np.ascontiguousarray(y[r]).tobytes())
        data_key = (digest.hexdigest(), tuple(taxonomy.sizes.items()), int(seed))
        if data_key != self.data_key:
            self.data_key, self.heads = data_key, {}
        head_key = (self.registry.RECIPES[name].kind == "head",
                    json.dumps({k: cfg[k] for k in ("model", "loss", "train")},
                               sort_keys=True, default=str))
        cached = self.heads.get(head_key) if head_key[0] else None
        if cached is not None:
            return dataclasses.replace(cached, method=str(cfg["decode"]["method"]),
                                       top_k=int(cfg["decode"]["top_k"]))
        model = self.registry.fit_recipe(name, x, y, taxonomy, seed=seed, settings=settings)
        if head_key[0] and dataclasses.is_dataclass(model) and hasattr(model, "method"):
            self.heads[head_key] = model
        return model


def _seeds(seeds, final_seeds) -> tuple[tuple[int, ...], tuple[int, ...]]:
    sel = tuple(range(1, int(seeds) + 1)) if isinstance(seeds, (int, np.integer)) else tuple(
        int(s) for s in seeds)
    fin = tuple(int(s) for s in final_seeds)
    if len(sel) < (2 if isinstance(seeds, (int, np.integer)) else 1):
        # an explicit list may hold one seed: a part of a run merged later
        raise ConfigError(f"benchmark: at least 2 selection seeds are needed for an interval, "
                          f"got {len(sel)}.")
    both = sorted(set(sel) & set(fin))
    if both:
        raise ConfigError(f"benchmark: seed(s) {both} are both selection and kept-back "
                          f"(final) seeds; a kept-back seed must never be used for choices.")
    return sel, fin


def benchmark(data: BenchmarkData | dict, recipes: Sequence[str] | Mapping[str, FitFn] | None
              = None, *, seeds: int | Sequence[int] = 10, final_seeds: Sequence[int] = (0,),
              axes: Sequence[str] = ("full",), control: str = CONTROL,
              test_fraction: float = 0.3, bins: tuple[int, int] = (5, 20),
              settings: Mapping | None = None, out: str | None = None,
              progress: Progress | None = None) -> BenchmarkResult:
    """Run the protocol (module doc). ``data``: :class:`BenchmarkData` or a train config
    (:func:`benchmark_data`). ``recipes``: names of :mod:`taxoclass.model.recipes`
    (default all; the control is added when missing) or a mapping name -> fit function
    with ``fit_recipe``'s signature. ``settings`` go to every recipe alike. ``out``: also
    write the folder (:func:`write_benchmark`)."""
    if isinstance(data, dict):
        settings = recipe_settings(data) if settings is None else settings
        data = benchmark_data(data)
    fns = _resolve(recipes, control)
    sel, fin = _seeds(seeds, final_seeds)
    bad = [a for a in axes if a not in AXES]
    if bad or not axes:
        raise ConfigError(f"benchmark: unknown axis {bad or '(none)'}; expected some of {AXES}.")
    from ..model.threads import torch_threads

    rows, right, reliab = [], {}, {n: ([], []) for n in fns}
    plan = [(s, a) for a in axes for s in (*sel, *fin)]
    done, total = 0, len(plan) * len(fns)
    for seed, axis in plan:
        split = split_for(data, seed, axis, test_fraction=test_fraction)
        split["axis"] = axis
        x_eval = data.x[split["test"]]
        if split.get("y_focus") is not None:
            x_eval = np.concatenate([x_eval, data.x[split["focus"]]])
        threads = _threads(settings, data.x.shape[1], split["taxonomy"])
        for name, fit in fns.items():
            t0 = time.perf_counter()
            with torch_threads(threads):
                model = fit(name, data.x[split["train"]], split["y_train"], split["taxonomy"],
                            seed=int(seed), settings=settings)
                decoded = model.predict(x_eval)
            fit_s = time.perf_counter() - t0
            row, r = _score(decoded, split, data, bins)
            rows.append({"seed": seed, "split": "selection" if seed in sel else "final",
                         "axis": axis, "recipe": name, "n_train": len(split["train"]),
                         **row, "fit_s": fit_s})
            right.update({(seed, axis, name, k): v for k, v in r.items()})
            if seed in sel and axis == axes[0]:
                low = split["taxonomy"].ranks[-1]
                real = _real(split["y_test"][low], split["taxonomy"])
                n = len(split["test"])
                reliab[name][0].append(decoded.path_prob[low][:n][real])
                reliab[name][1].append((decoded.path[low][:n] == split["y_test"][low])[real])
            done += 1
            if progress:
                progress(done, total)
    result = BenchmarkResult(
        results=pd.DataFrame(rows), control=control, seeds=sel, final_seeds=fin,
        axes=tuple(axes), recipes=tuple(fns), bins=tuple(bins), right=right,
        reliability={n: (np.concatenate(p), np.concatenate(o)) for n, (p, o) in reliab.items()
                     if p},
        info={"data": data.name, "n_images": int(len(data.x)), "sizes": data.taxonomy.sizes,
              "ranks": tuple(data.taxonomy.ranks),
              "grouped": data.groups is not None, "test_fraction": test_fraction,
              "settings": dict(settings or {})})
    if out is not None:
        write_benchmark(result, out)
    return result


def _threads(settings: Mapping | None, dim: int, taxonomy) -> int | None:
    """Torch threads for one fit: ``train.threads`` of ``settings``, else the head-size
    rule of :func:`taxoclass.model.threads.head_threads` (1 thread for small heads)."""
    from ..model.threads import head_threads

    train = (settings or {}).get("train") or {}
    setting = train.get("threads") if isinstance(train, Mapping) else None
    setting = (settings or {}).get("train.threads", setting)
    n_out = sum(taxonomy.n_classes(r) for r in taxonomy.ranks)
    return head_threads(setting, n_weights=dim * n_out)


def recipe_settings(cfg: Mapping) -> dict[str, Any]:
    """The sections of a (loaded) config that every recipe trains with alike: ``model``,
    ``loss``, ``train``, ``decode`` (a recipe's own ``loss.kind`` / ``decode.method``
    win, :func:`taxoclass.model.recipes.recipe_config`)."""
    return {k: dict(cfg[k]) for k in ("model", "loss", "train", "decode") if k in cfg}


def select_on_selection_seeds(results: pd.DataFrame, candidates: Sequence[str], column: str,
                              *, axis: str = "full", higher_is_better: bool = True) -> str:
    """The candidate with the best mean ``column`` over the *selection* seeds of ``axis``;
    rows of kept-back (``split == "final"``) seeds are never read."""
    sel = results[(results["split"] == "selection") & (results["axis"] == axis)
                  & results["recipe"].isin(list(candidates))]
    if sel.empty:
        raise ValueError(f"select_on_selection_seeds: no selection rows of {list(candidates)} "
                         f"on axis {axis!r}.")
    means = sel.groupby("recipe")[column].mean()
    return str(means.idxmax() if higher_is_better else means.idxmin())
