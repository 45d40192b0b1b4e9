"""The words taxoclass writes into its outputs: one home for every fixed string.

Bottom layer (imports nothing from taxoclass). The enums are ``str``-valued, so a member
compares equal to its string, hashes like it, and ``str()``/``format()``/JSON/CSV write
the bare value: outputs stay byte-identical to the plain strings they replace.

- :data:`UNKNOWN`: the one "unknown" label (a taxon nobody can name, the answer when no
  rank passes back-off, the plot record of outlier tiles).
- :class:`Reason`: why a prediction sits where it does (the fixed words of a reason).
- :class:`Rule`: plot aggregation rules.
- :class:`Detector`, :class:`Scope`, :class:`Combiner`, :class:`Confidence`,
  :class:`Calibration`: the open-set choices (config ``openset`` section, bundle JSON).
- :class:`DecodeMethod`: how rank probabilities are made coherent (config ``decode``).

Ranks are data (the taxonomy's ranks, configurable), not an enum: reason strings that
embed a rank are built by :func:`backoff_reason` and :func:`plot_reason` only, and read
back by :func:`parse_backoff_reason`.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

__all__ = [
    "BACKOFF_PREFIX",
    "CHECKLIST_SUFFIX",
    "ROLLUP_PREFIX",
    "UNKNOWN",
    "Calibration",
    "Combiner",
    "Confidence",
    "DecodeMethod",
    "Detector",
    "Reason",
    "Rule",
    "Scope",
    "backoff_reason",
    "parse_backoff_reason",
    "plot_reason",
]

#: The one "unknown" label: a taxon label, a back-off reason and a plot record's taxon.
UNKNOWN: Final[str] = "unknown"
#: ``backoff_to_<rank>:<why>``
BACKOFF_PREFIX: Final[str] = "backoff_to_"
#: ``<rule>+rollup_to_<rank>``
ROLLUP_PREFIX: Final[str] = "+rollup_to_"
#: appended to a plot reason when a checklist restricted the candidates.
CHECKLIST_SUFFIX: Final[str] = "+checklist"


class _StrEnum(str, Enum):
    """``enum.StrEnum`` for Python 3.10: ``str()`` and ``format()`` give the value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Reason(_StrEnum):
    """The fixed words of a prediction's reason.

    Per image (back-off): the lowest rank's name when accepted there (a rank: data, not a
    member), :func:`backoff_reason` (``backoff_to_genus:outlier``) when backed off, else
    :attr:`UNKNOWN`. Per plot: :func:`plot_reason` for a reported taxon, :attr:`OUTLIER` for
    the record counting outlier tiles.
    """

    #: the outlier detector flagged the image (or tile) at the lowest rank.
    OUTLIER = "outlier"
    #: the lowest rank's evidence was below its threshold, and no outlier flag.
    LOW_CONFIDENCE = "low_confidence"
    #: no rank passed.
    UNKNOWN = UNKNOWN


class Rule(_StrEnum):
    """Plot aggregation rules: how tile probabilities become one score per taxon."""

    #: every tile votes for its argmax (thresholded at the lowest rank); max above it.
    ARGMAX_UNION = "argmax_union"
    #: the best tile's probability.
    MAX = "max"
    #: ``1 - prod(1 - p)`` over tiles.
    NOISY_OR = "noisy_or"
    #: the (weighted) mean probability over tiles.
    MEAN = "mean"
    #: scores computed elsewhere (a learned plot scorer) and passed in.
    LEARNED = "learned"


class Detector(_StrEnum):
    """Outlier detectors (:class:`~taxoclass.openset.detectors.OutlierDetector`)."""

    KNN = "knn"
    LOF = "lof"
    ECOD = "ecod"
    COPOD = "copod"
    IFOREST = "iforest"
    #: class-conditional relative Mahalanobis distance (not pyod).
    MAHALANOBIS = "mahalanobis"


class Scope(_StrEnum):
    """Where a pyod detector is fitted: on all training rows, or per predicted group."""

    GLOBAL = "global"
    GROUP = "group"


class Combiner(_StrEnum):
    """How confidence and outlier score become evidence (``EvidenceCombiner``)."""

    LOGISTIC = "logistic"
    RANK_MEAN = "rank_mean"
    GATE = "gate"


class Confidence(_StrEnum):
    """What the combiner reads as the head's confidence in the path's taxon."""

    PATH_PROB = "path_prob"
    PATH_LOGIT = "path_logit"


class Calibration(_StrEnum):
    """What the open-set combiner and thresholds are fitted on."""

    HOLDOUT = "holdout"
    CROSSFIT = "crossfit"


class DecodeMethod(_StrEnum):
    """How per-rank probabilities are made coherent along the taxonomy."""

    PATH = "path"
    MARGINAL = "marginal"


def backoff_reason(rank: str, why: Reason | str) -> str:
    """``backoff_to_<rank>:<why>``: backed off to ``rank`` because of ``why``.

    ``why`` is :attr:`Reason.OUTLIER` or :attr:`Reason.LOW_CONFIDENCE` (or their strings).
    """
    why = Reason(why)
    if why not in (Reason.OUTLIER, Reason.LOW_CONFIDENCE):
        raise ValueError(f"backoff_reason: why must be 'outlier' or 'low_confidence', "
                         f"found {why.value!r}.")
    if not rank or ":" in rank:
        raise ValueError(f"backoff_reason: expected a rank name without ':', found {rank!r}.")
    return f"{BACKOFF_PREFIX}{rank}:{why.value}"


def parse_backoff_reason(reason: str) -> tuple[str, Reason] | None:
    """``(rank, why)`` of a :func:`backoff_reason` string; ``None`` for any other reason."""
    if not reason.startswith(BACKOFF_PREFIX) or ":" not in reason:
        return None
    rank, _, why = reason[len(BACKOFF_PREFIX):].partition(":")
    try:
        return rank, Reason(why)
    except ValueError:
        return None


def plot_reason(rule: Rule | str, rollup_rank: str | None = None, *,
                checklist: bool = False) -> str:
    """``<rule>[+rollup_to_<rank>][+checklist]``: the reason of a reported plot taxon.

    ``rollup_rank``: the rank the find was rolled up to (``None`` at the lowest rank).
    """
    roll = "" if rollup_rank is None else f"{ROLLUP_PREFIX}{rollup_rank}"
    return f"{Rule(rule).value}{roll}{CHECKLIST_SUFFIX if checklist else ''}"
