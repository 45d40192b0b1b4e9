"""The words taxoclass writes into its outputs: one home for every fixed string.

Bottom layer (imports nothing from taxoclass). The enums are ``str``-valued, so a member
compares equal to its string, hashes like it, and ``str()``/``format()``/JSON/CSV write
the bare value: outputs stay byte-identical to the plain strings they replace.

- :data:`UNKNOWN`: the one "unknown" label (a taxon nobody can name, the answer when no
  rank passes back-off, the plot record of outlier tiles): ``taxon`` and ``taxon_rank``
  are both ``"unknown"`` and ``score`` is empty (NaN), never a number.
- :class:`Reason`: why a prediction sits where it does (the fixed words of a reason).
- :class:`Rule`: plot aggregation rules (a setting: the ``rule`` column, never a reason).

One vocabulary for the ``reason`` column of every output (predict, flag-unknowns, the
Python classifier, the Spark engine, plot records); the SpeciesNet ``prediction_source``
idea, with ranks as data:

=======================================  ==========================================
``<lowest rank>`` (``species``)          named at the model's lowest rank
``backoff_to_<rank>:low_confidence``     the lowest rank's evidence was below its
                                         threshold; the answer is at ``<rank>``
``backoff_to_<rank>:outlier``            the distance gate rejected the lowest rank
                                         (the image lies outside the known taxa)
``unknown:low_confidence``               no rank passed
``unknown:outlier``                      no rank passed; the gate rejected the lowest
``failed``                               the image could not be read (``error``)
=======================================  ==========================================

The ``outlier`` column is ``True`` exactly when the reason ends in ``:outlier``
(:func:`is_outlier_reason`): the gate acted in this decision. ``flagged``
(flag-unknowns) is ``True`` when the reason is not the lowest rank's name. A genus
answer is written ``"Quercus sp."`` in ``taxon`` (with ``taxon_rank`` ``genus``) in
every output; the per-rank path columns (``genus``) hold the bare name of the decoded
path (``"Quercus"``), a different quantity.
- :class:`Detector`, :class:`Scope`, :class:`Combiner`, :class:`Confidence`,
  :class:`Calibration`: the open-set choices (config ``openset`` section, bundle JSON).
- :class:`DecodeMethod`: how rank probabilities are made coherent (config ``decode``).

Ranks are data (the taxonomy's ranks, configurable), not an enum: reason strings that
embed a rank are built by :func:`backoff_reason`, :func:`unknown_reason` and
:func:`plot_reason` only, and read back by :func:`parse_backoff_reason` and
:func:`reason_why`.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

__all__ = [
    "BACKOFF_PREFIX",
    "CHECKLIST_SUFFIX",
    "REASON_HELP",
    "RULE_COLUMN",
    "TILE_SHARE_COLUMN",
    "UNKNOWN",
    "Calibration",
    "Combiner",
    "Confidence",
    "DecodeMethod",
    "Detector",
    "Reason",
    "Rule",
    "Scope",
    "accepted_reason",
    "backoff_reason",
    "is_outlier_reason",
    "parse_backoff_reason",
    "plot_reason",
    "plot_rule",
    "reason_why",
    "unknown_reason",
]

#: The one "unknown" label: a taxon label, a back-off reason and a plot record's taxon.
UNKNOWN: Final[str] = "unknown"
#: ``backoff_to_<rank>:<why>``
BACKOFF_PREFIX: Final[str] = "backoff_to_"
#: ``unknown:<why>``
UNKNOWN_PREFIX: Final[str] = f"{UNKNOWN}:"
#: appended to a plot record's ``rule`` when a checklist restricted the candidates.
CHECKLIST_SUFFIX: Final[str] = "+checklist"
#: Plot records: the aggregation setting that produced the record (``max``, ``max+checklist``).
RULE_COLUMN: Final[str] = "rule"
#: Plot records: the share of the plot's tiles that a record counts (the ``unknown`` row's
#: number; its ``score`` is empty).
TILE_SHARE_COLUMN: Final[str] = "tile_share"


class _StrEnum(str, Enum):
    """``enum.StrEnum`` for Python 3.10: ``str()`` and ``format()`` give the value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Reason(_StrEnum):
    """The fixed words of a prediction's reason (see the module docstring for the table).

    Per image (back-off): the lowest rank's name when accepted there (a rank: data, not a
    member, :func:`accepted_reason`), :func:`backoff_reason` (``backoff_to_genus:outlier``)
    when backed off, :func:`unknown_reason` (``unknown:outlier``) when no rank passed,
    :attr:`FAILED` when the image could not be read. Plot records use the same words
    (:func:`plot_reason`, :func:`unknown_reason`).
    """

    #: the distance gate rejected the lowest rank (the image lies outside the known taxa).
    OUTLIER = "outlier"
    #: the lowest rank's evidence was below its threshold, and the gate did not act.
    LOW_CONFIDENCE = "low_confidence"
    #: no rank passed (the prefix of :func:`unknown_reason`; also the taxon label).
    UNKNOWN = UNKNOWN
    #: the image could not be read: no decision was made.
    FAILED = "failed"


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
    TOPDOWN = "topdown"
    CRM = "crm"


def backoff_reason(rank: str, why: Reason | str) -> str:
    """``backoff_to_<rank>:<why>``: backed off to ``rank`` because of ``why``.

    ``why`` is :attr:`Reason.OUTLIER` or :attr:`Reason.LOW_CONFIDENCE` (or their strings).
    """
    why = _why(why, "backoff_reason")
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


def _why(why: Reason | str, caller: str) -> Reason:
    why = Reason(why)
    if why not in (Reason.OUTLIER, Reason.LOW_CONFIDENCE):
        raise ValueError(f"{caller}: why must be 'outlier' or 'low_confidence', "
                         f"found {why.value!r}.")
    return why


def accepted_reason(lowest: str) -> str:
    """The reason of an answer named at the lowest rank: the rank's name (``species``)."""
    return str(lowest)


def unknown_reason(why: Reason | str) -> str:
    """``unknown:<why>``: no rank passed; ``why`` says why the lowest rank was rejected."""
    return f"{UNKNOWN_PREFIX}{_why(why, 'unknown_reason').value}"


def reason_why(reason: object) -> Reason | None:
    """:attr:`Reason.OUTLIER` / :attr:`Reason.LOW_CONFIDENCE` of a back-off or unknown
    reason; ``None`` for an answer at the lowest rank, ``failed`` or a missing reason."""
    if not isinstance(reason, str) or ":" not in reason:
        return None
    head, _, why = reason.rpartition(":")
    if not (head == UNKNOWN or head.startswith(BACKOFF_PREFIX)):
        return None
    try:
        return _why(why, "reason_why")
    except ValueError:
        return None


def is_outlier_reason(reason: object) -> bool:
    """True when the decision behind ``reason`` was the distance gate's (``...:outlier``):
    the value of every output's ``outlier`` column."""
    return reason_why(reason) is Reason.OUTLIER


def plot_reason(rank: str, lowest: str) -> str:
    """The reason of a plot record found at ``rank``: the lowest rank's name there, else
    ``backoff_to_<rank>:low_confidence`` (the evidence for a lower taxon did not pass its
    threshold; outlier tiles are counted in the ``unknown`` record, not here)."""
    return accepted_reason(lowest) if rank == lowest else backoff_reason(rank,
                                                                         Reason.LOW_CONFIDENCE)


def plot_rule(rule: Rule | str, *, checklist: bool = False) -> str:
    """The ``rule`` column of a plot record: ``<rule>[+checklist]``."""
    return f"{Rule(rule).value}{CHECKLIST_SUFFIX if checklist else ''}"


#: One line per reason word, for report legends and the column reference.
REASON_HELP: Final[dict[str, str]] = {
    "<lowest rank>": "named at the model's lowest rank (e.g. species)",
    f"{BACKOFF_PREFIX}<rank>:{Reason.LOW_CONFIDENCE.value}":
        "the lowest rank was not sure enough; the answer is the taxon at <rank>",
    f"{BACKOFF_PREFIX}<rank>:{Reason.OUTLIER.value}":
        "the photo lies outside the known taxa (distance gate); the answer is at <rank>",
    f"{UNKNOWN_PREFIX}{Reason.LOW_CONFIDENCE.value}": "no rank was sure enough",
    f"{UNKNOWN_PREFIX}{Reason.OUTLIER.value}":
        "outside the known taxa and no higher rank was sure enough",
    Reason.FAILED.value: "the image could not be read (see the error column)",
}
