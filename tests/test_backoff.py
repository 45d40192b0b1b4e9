"""Back-off to the lowest reliable rank, with reasons."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taxoclass.model.decoding import decode_leaf_probabilities
from taxoclass.openset.backoff import back_off, back_off_batch
from taxoclass.taxonomy.tree import Taxonomy

RANKS = ("family", "genus", "species")


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return Taxonomy.from_records([
        {"family": "Fagaceae", "genus": "Quercus", "species": "robur"},
        {"family": "Fagaceae", "genus": "Quercus", "species": "ilex"},
        {"family": "Sapindaceae", "genus": "Acer", "species": "rubrum"},
        {"family": "Hydrangeaceae", "genus": "Philadelphus", "species": ""},
    ])


OAK = ("Fagaceae", "Quercus", "Quercus robur")
THR = {"family": 0.5, "genus": 0.5, "species": 0.5}


def test_accepts_species_when_its_evidence_passes(tax):
    r = back_off(path=OAK, scores={"family": 0.9, "genus": 0.9, "species": 0.9},
                 thresholds=THR, taxonomy=tax)
    assert (r.taxon_rank, r.taxon, r.label, r.reason) == ("species", OAK, "Quercus robur",
                                                          "species")
    assert r.score == 0.9


def test_backs_off_to_genus_when_species_evidence_is_low(tax):
    r = back_off(path=OAK, scores={"family": 0.9, "genus": 0.9, "species": 0.2},
                 thresholds=THR, taxonomy=tax)
    assert (r.taxon_rank, r.taxon, r.label) == ("genus", OAK[:2], "Quercus sp.")
    assert r.reason == "backoff_to_genus:low_confidence"
    r = back_off(path=OAK, scores={"family": 0.9, "genus": 0.9, "species": 0.2},
                 thresholds=THR, taxonomy=tax,
                 outlier_flags={"species": True, "genus": False, "family": False})
    assert r.reason == "backoff_to_genus:outlier"


def test_reasons_for_family_and_unknown(tax):
    low = {"family": 0.9, "genus": 0.1, "species": 0.1}
    r = back_off(path=OAK, scores=low, thresholds=THR, taxonomy=tax)
    assert (r.taxon_rank, r.label, r.reason) == ("family", "Fagaceae",
                                                  "backoff_to_family:low_confidence")
    # the reason is why the FIRST rejected rank (species) was rejected
    r = back_off(path=OAK, scores=low, thresholds=THR, taxonomy=tax,
                 outlier_flags={"species": True, "genus": False})
    assert r.reason == "backoff_to_family:outlier"
    r = back_off(path=OAK, scores=low, thresholds=THR, taxonomy=tax,
                 outlier_flags={"species": False, "genus": True})
    assert r.reason == "backoff_to_family:low_confidence"
    r = back_off(path=OAK, scores={"family": 0.1, "genus": 0.1, "species": 0.1},
                 thresholds=THR, taxonomy=tax)
    assert (r.taxon_rank, r.taxon, r.label, r.reason) == ("unknown", (), "unknown",
                                                          "unknown:low_confidence")
    assert math.isnan(r.score) and not r.outlier  # unknown: no score to report
    r = back_off(path=OAK, scores={"family": 0.1, "genus": 0.1, "species": 0.1},
                 thresholds=THR, taxonomy=tax, outlier_flags={"species": True})
    assert (r.reason, r.outlier) == ("unknown:outlier", True)


def test_never_returns_rank_below_a_failed_rank(tax):
    # species passes but genus fails: the walk goes up from species, so species is taken;
    # genus failing with species failing too must give family, never species.
    r = back_off(path=OAK, scores={"family": 0.9, "genus": 0.1, "species": 0.1},
                 thresholds=THR, taxonomy=tax)
    assert r.taxon_rank == "family"


def test_placeholder_species_reported_at_genus(tax):
    leaf = ("Hydrangeaceae", "Philadelphus", "Philadelphus sp.")
    assert tax.is_placeholder(leaf)
    r = back_off(path=leaf, scores={"family": 0.9, "genus": 0.9, "species": 0.9},
                 thresholds=THR, taxonomy=tax)
    assert (r.taxon_rank, r.taxon, r.label, r.reason) == (
        "genus", leaf[:2], "Philadelphus sp.", "species")


def test_path_as_indices_and_incoherent_path(tax):
    idx = tax.path_indices(OAK)
    r = back_off(path=idx, scores={"family": 0.9, "genus": 0.9, "species": 0.9},
                 thresholds=THR, taxonomy=tax)
    assert r.taxon == OAK
    acer = tax.path_indices(("Sapindaceae", "Acer", "Acer rubrum"))
    with pytest.raises(ValueError, match="incoherent"):
        back_off(path=[idx["family"], idx["genus"], acer["species"]],
                 scores={"family": 0.9, "genus": 0.9, "species": 0.9}, thresholds=THR,
                 taxonomy=tax)


score = st.floats(0.0, 1.0) | st.just(math.nan)
thr = st.floats(0.0, 1.0) | st.just(math.inf)


@settings(max_examples=200, deadline=None)
@given(st.tuples(score, score, score), st.tuples(thr, thr, thr),
       st.tuples(st.booleans(), st.booleans(), st.booleans()),
       st.sampled_from([0, 1, 2, 3]))
def test_property_lowest_passing_rank_and_never_below_a_failure(tax, s, t, f, leaf_i):
    leaf = tax.nodes("species")[leaf_i]
    scores, thresholds = dict(zip(RANKS, s)), dict(zip(RANKS, t))
    flags = dict(zip(RANKS, f))
    r = back_off(path=leaf, scores=scores, thresholds=thresholds, taxonomy=tax,
                 outlier_flags=flags)
    passes = {k: (not math.isnan(scores[k])) and scores[k] >= thresholds[k] for k in RANKS}
    # outlier: exactly when the gate acted on the (rejected) lowest rank
    assert r.outlier == (flags["species"] and not passes["species"] and r.reason != "species")
    assert r.outlier == r.reason.endswith(":outlier")
    if r.reason.startswith("unknown:"):
        assert r.taxon == () and r.taxon_rank == "unknown" and math.isnan(r.score)
        assert not any(passes.values()) or not passes["species"]
        return
    # the rank it was accepted at (a placeholder species is reported at genus)
    accepted = "species" if r.reason == "species" else r.reason.split(":")[0][11:]
    assert passes[accepted]
    depth = RANKS.index(accepted)
    assert all(not passes[k] for k in RANKS[depth + 1:])  # everything below failed
    assert leaf[: depth + 1][: len(r.taxon)] == r.taxon  # coherent with the path
    if accepted != "species":
        assert r.reason.endswith(":outlier" if flags["species"] else ":low_confidence")


def test_batch_matches_scalar(tax):
    rng = np.random.default_rng(0)
    n = 60
    decoded = decode_leaf_probabilities(rng.dirichlet(np.ones(4), n), tax)
    ev = {r: rng.uniform(size=n) for r in RANKS}
    flags = {"species": rng.uniform(size=n) < 0.5}
    frame = back_off_batch(decoded, ev, THR, flags, tax)
    assert list(frame.columns[:5]) == ["taxon_rank", "taxon", "score", "reason", "outlier"]
    for col in ("family", "family_prob", "genus", "genus_prob", "species", "species_prob"):
        assert col in frame
    for i in range(n):
        r = back_off(path={k: decoded.path[k][i] for k in RANKS},
                     scores={k: ev[k][i] for k in RANKS}, thresholds=THR, taxonomy=tax,
                     outlier_flags={"species": bool(flags["species"][i])})
        row = frame.iloc[i]
        assert (row.taxon, row.reason) == (r.label, r.reason)
        assert (row.taxon_rank, row.outlier) == (r.taxon_rank, r.outlier)
        assert row.score == pytest.approx(r.score, nan_ok=True)


def test_reasons_are_plain_strings_and_follow_the_taxonomy_ranks():
    """Reasons are written byte-identically (plain ``str``), and a rank name comes from
    the taxonomy, not from a built-in list: an order/family/genus taxonomy backs off to
    ``backoff_to_family`` and ``backoff_to_order``."""
    three = Taxonomy.from_records([
        {"order": "Fagales", "family": "Fagaceae", "genus": "Quercus"},
        {"order": "Sapindales", "family": "Sapindaceae", "genus": "Acer"},
    ], ("order", "family", "genus"))
    decoded = decode_leaf_probabilities(np.array([[0.9, 0.1]] * 3), three)
    ev = {"order": np.array([0.9, 0.9, 0.1]), "family": np.array([0.9, 0.1, 0.1]),
          "genus": np.array([0.9, 0.1, 0.1])}
    thr = {"order": 0.5, "family": 0.5, "genus": 0.5}
    frame = back_off_batch(decoded, ev, thr, {"genus": np.array([False, True, False])}, three)
    assert frame["reason"].tolist() == ["genus", "backoff_to_order:outlier",
                                        "unknown:low_confidence"]
    assert frame["outlier"].tolist() == [False, True, False]
    assert frame["taxon_rank"].tolist() == ["genus", "order", "unknown"]
    assert all(type(v) is str for v in frame["reason"])
    assert all(type(v) is str for v in frame["taxon"])
    r = back_off(path=("Fagales", "Fagaceae", "Quercus"), taxonomy=three, thresholds=thr,
                 scores={"order": 0.9, "family": 0.9, "genus": 0.1})
    assert r.reason == "backoff_to_family:low_confidence" and type(r.reason) is str
