"""The vocabulary: str-valued enums write their bare value; reason strings round-trip."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from taxoclass.vocab import (
    UNKNOWN,
    Reason,
    Rule,
    backoff_reason,
    is_outlier_reason,
    parse_backoff_reason,
    plot_reason,
    plot_rule,
    reason_why,
    unknown_reason,
)


def test_members_write_their_bare_value():
    assert UNKNOWN == "unknown" and Reason.UNKNOWN == UNKNOWN
    assert str(Rule.NOISY_OR) == "noisy_or" and f"{Reason.OUTLIER}" == "outlier"
    assert json.dumps({"rule": Rule.MAX}) == '{"rule": "max"}'
    buf = io.StringIO()
    pd.DataFrame({"r": [Rule.MEAN, Reason.LOW_CONFIDENCE]}).to_csv(buf, index=False)
    assert buf.getvalue() == "r\nmean\nlow_confidence\n"
    assert {"max": 1}[Rule.MAX] == 1  # hashes like its string
    assert [r.value for r in Rule] == ["argmax_union", "max", "noisy_or", "mean", "learned"]


def test_backoff_reason_round_trip():
    assert backoff_reason("genus", Reason.OUTLIER) == "backoff_to_genus:outlier"
    assert backoff_reason("family", "low_confidence") == "backoff_to_family:low_confidence"
    assert parse_backoff_reason("backoff_to_order:outlier") == ("order", Reason.OUTLIER)
    assert parse_backoff_reason("species") is None
    assert parse_backoff_reason(UNKNOWN) is None
    with pytest.raises(ValueError, match="why must be"):
        backoff_reason("genus", Reason.UNKNOWN)
    with pytest.raises(ValueError):
        backoff_reason("genus", "bogus")


def test_plot_reason_uses_the_image_words_and_the_rule_is_its_own_column():
    assert plot_reason("species", "species") == "species"
    assert plot_reason("genus", "species") == "backoff_to_genus:low_confidence"
    assert plot_rule(Rule.MAX) == "max"
    assert plot_rule(Rule.LEARNED, checklist=True) == "learned+checklist"
    with pytest.raises(ValueError):
        plot_rule("median")


def test_unknown_and_failed_reasons_and_the_outlier_reading():
    assert unknown_reason(Reason.OUTLIER) == "unknown:outlier"
    assert unknown_reason("low_confidence") == "unknown:low_confidence"
    assert Reason.FAILED == "failed"
    with pytest.raises(ValueError, match="why must be"):
        unknown_reason(Reason.FAILED)
    assert reason_why("unknown:outlier") is Reason.OUTLIER
    assert reason_why("backoff_to_genus:low_confidence") is Reason.LOW_CONFIDENCE
    for other in ("species", "failed", None, float("nan"), "max+rollup_to_genus", "x:outlier"):
        assert reason_why(other) is None and not is_outlier_reason(other)
    assert is_outlier_reason("backoff_to_family:outlier")
    assert not is_outlier_reason("backoff_to_family:low_confidence")
