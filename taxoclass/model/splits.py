"""Seeded splits of images: validation and test shares, crossfit folds, by image or by group.

Every split of labelled images lives here: the validation split of training and the test
share of an open-set hold-out (:func:`validation_split`), and the crossfit folds
(:func:`crossfit_folds`). Without groups the splits are stratified by each image's taxon
path, exactly as before groups existed (:func:`stratified_split`). With groups
(``data.group_by``: frames of one video track, images of one specimen, plot or site) no
group has images on both sides of a split; the stratification by taxon is kept as far as
the groups allow (scikit-learn's ``StratifiedGroupKFold``, seeded). Images without a group
value are each their own group (:func:`group_codes` warns with their number).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["crossfit_folds", "group_codes", "stratified_split", "validation_split"]

log = logging.getLogger(__name__)

#: Most folds a grouped validation split is cut into (the share is m of q folds), and how
#: far m/q may be from the asked share when fewer folds are taken (0.3 -> 1 of 3 folds).
_MAX_FOLDS = 10
_PLAN_SLACK = 0.04


def group_codes(values: Sequence[Any], field: str = "group") -> np.ndarray:
    """An integer group per row from the rows' group values (``field`` names them in the
    warning). Equal values (compared as text) share a code; a missing value (None, NaN,
    empty text) is its own group, and their number is logged as one warning.
    """
    import pandas as pd

    s = pd.Series(list(values), dtype=object)
    text = s.astype(str).str.strip()
    missing = (s.isna() | (text == "")).to_numpy()
    codes = np.empty(len(s), dtype=np.int64)
    present, _ = pd.factorize(text[~missing])
    codes[~missing] = present
    n_missing = int(missing.sum())
    codes[missing] = (present.max() + 1 if len(present) else 0) + np.arange(n_missing)
    if n_missing:
        log.warning("data.group_by %r: %d of %d image(s) have no %r value; each of them is "
                    "its own group.", field, n_missing, len(s), field)
    return codes


def stratified_split(strata: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows, stratified by ``strata`` (e.g. the species).

    Every stratum with at least two rows puts ``round(val_fraction * n)`` rows (at least
    one, at most n-1) in validation; singletons stay in training.
    """
    _check_fraction(val_fraction)
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(strata), dtype=bool)
    for value in sorted(set(strata.tolist())):
        idx = np.flatnonzero(strata == value)
        if len(idx) < 2:
            continue
        k = int(min(max(round(val_fraction * len(idx)), 1), len(idx) - 1))
        is_val[rng.choice(idx, size=k, replace=False)] = True
    return is_val


def validation_split(strata: np.ndarray, val_fraction: float, seed: int,
                     groups: Sequence[Any] | None = None) -> np.ndarray:
    """Boolean mask of validation (or test) rows: about ``val_fraction`` of the rows.

    Without ``groups``: :func:`stratified_split`. With ``groups`` (a value per row, e.g.
    :func:`group_codes`): whole groups go to one side. A taxon whose rows all lie in one
    group keeps that group in training (as a single image does without groups); the other
    groups are dealt into q folds (``StratifiedGroupKFold``, seeded; m of q folds, m/q
    closest to ``val_fraction``) and m folds validate. A taxon left with no training row
    gets its smallest validation group back, so every taxon with two groups or more
    trains and validates where the groups allow.
    """
    if groups is None:
        return stratified_split(strata, val_fraction, seed)
    _check_fraction(val_fraction)
    strata, codes = _as_arrays(strata, groups)
    is_val = np.zeros(len(strata), dtype=bool)
    # Groups holding a taxon found in no other group stay in training.
    pairs = np.unique(np.stack([_codes(strata), codes]), axis=1)
    taxa, n_groups = np.unique(pairs[0], return_counts=True)
    lone = set(taxa[n_groups == 1].tolist())
    forced = {int(g) for t, g in pairs.T if int(t) in lone}
    free = np.flatnonzero(~np.isin(codes, list(forced)))
    n_free = len(np.unique(codes[free]))
    if n_free < 2:
        log.warning("grouped split: %d group(s) hold a taxon found in another group too; "
                    "at least 2 are needed, so every image stays in training (no "
                    "validation or test images).", n_free)
        return is_val
    q, m = _fold_plan(val_fraction, n_free)
    fold = _group_folds(strata[free], codes[free], q, seed)
    is_val[free[fold < m]] = True
    return _give_back(strata, codes, is_val)


def crossfit_folds(strata: np.ndarray, n_folds: int, seed: int = 0,
                   groups: Sequence[Any] | None = None) -> np.ndarray:
    """Fold index (0 .. ``n_folds``-1) per row, stratified by ``strata`` and seeded.

    Without ``groups``: each stratum's rows, in a seeded random order, are dealt round the
    folds from a random starting fold, so every fold gets ``n // n_folds`` or one more of
    each stratum (a species with fewer rows than folds is missing from some folds). With
    ``groups``: whole groups are dealt (``StratifiedGroupKFold``, seeded), so no group is
    in two folds.
    """
    n_folds = int(n_folds)
    strata = np.asarray(strata)
    if n_folds < 2:
        raise ValueError(f"crossfit_folds: n_folds must be at least 2, got {n_folds}.")
    if len(strata) < n_folds:
        raise ValueError(f"crossfit_folds: {len(strata)} rows cannot fill {n_folds} folds; "
                         f"use fewer folds.")
    if groups is not None:
        strata, codes = _as_arrays(strata, groups)
        n_groups = len(np.unique(codes))
        if n_groups < n_folds:
            raise ConfigError(f"crossfit: {n_groups} group(s) (data.group_by) cannot fill "
                              f"{n_folds} folds that keep groups together. Fix: fewer folds "
                              f"(openset.folds: {max(n_groups, 2)}), or "
                              f"openset.calibration: holdout.")
        return _group_folds(strata, codes, n_folds, seed)
    rng = np.random.default_rng(seed)
    fold = np.full(len(strata), -1, dtype=np.int64)
    for value in np.unique(strata):
        rows = np.flatnonzero(strata == value)
        rng.shuffle(rows)
        fold[rows] = (np.arange(len(rows)) + rng.integers(n_folds)) % n_folds
    return fold


# ---------------------------------------------------------------------- helpers
def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be between 0 and 1, found {val_fraction}.")


def _codes(values: np.ndarray) -> np.ndarray:
    """Integer code per value (sorted order of the distinct values)."""
    return np.unique(np.asarray(values).astype(str), return_inverse=True)[1].ravel()


def _as_arrays(strata: Any, groups: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    strata = np.asarray(strata)
    groups = np.asarray(groups)
    if len(groups) != len(strata):
        raise ValueError(f"groups ({len(groups)} rows) and strata ({len(strata)}) must have "
                         f"the same rows.")
    codes = groups if groups.dtype.kind in "iu" else group_codes(groups)
    return strata, codes.astype(np.int64)


def _fold_plan(fraction: float, n_groups: int) -> tuple[int, int]:
    """(q folds, m validation folds): the fewest folds (at most ``_MAX_FOLDS`` and
    ``n_groups``) whose m/q is within ``_PLAN_SLACK`` of ``fraction``, else the closest.
    Few folds stratify best: a taxon with three groups has one in each of three folds."""
    plans = []
    for q in range(2, min(_MAX_FOLDS, n_groups) + 1):
        m = int(min(max(round(fraction * q), 1), q - 1))
        plans.append((abs(m / q - fraction), q, m))
    close = [p for p in plans if p[0] <= _PLAN_SLACK]
    _, q, m = close[0] if close else min(plans)
    return q, m


def _group_folds(strata: np.ndarray, codes: np.ndarray, q: int, seed: int) -> np.ndarray:
    """Fold per row from ``StratifiedGroupKFold`` (shuffled groups, seeded); unstratified
    when every taxon has fewer rows than folds (scikit-learn refuses to stratify then)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = _codes(strata)
    if np.bincount(y).max() < q:
        y = np.zeros(len(y), dtype=np.int64)
    fold = np.full(len(y), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=q, shuffle=True, random_state=int(seed))
    with warnings.catch_warnings():  # "least populated class has only n members"
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, codes)):
            fold[test] = k
    return fold


def _give_back(strata: np.ndarray, codes: np.ndarray, is_val: np.ndarray) -> np.ndarray:
    """Move validation groups to training until every taxon with validation rows trains:
    each time the smallest validation group (then the lowest code) of such a taxon."""
    while True:
        trained = set(strata[~is_val].tolist())
        starved = sorted(set(strata[is_val].tolist()) - trained)
        if not starved:
            return is_val
        rows = is_val & (strata == starved[0])
        sizes = {int(g): int((codes == g).sum()) for g in np.unique(codes[rows])}
        group = min(sizes, key=lambda g: (sizes[g], g))
        is_val[codes == group] = False
