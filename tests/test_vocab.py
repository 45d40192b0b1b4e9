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
    parse_backoff_reason,
    plot_reason,
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


def test_plot_reason():
    assert plot_reason(Rule.MAX) == "max"
    assert plot_reason("noisy_or", "genus") == "noisy_or+rollup_to_genus"
    reason = plot_reason(Rule.LEARNED, "family", checklist=True)
    assert reason == "learned+rollup_to_family+checklist"
    with pytest.raises(ValueError):
        plot_reason("median")
