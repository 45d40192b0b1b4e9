"""Coherent decoding: properties on random taxonomies, exact values, real-size speed."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA as DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taxoclass.model.decoding import (
    METHODS,
    coherent_probabilities,
    decode,
    decode_leaf_probabilities,
    is_coherent,
)
from taxoclass.taxonomy.tree import Taxonomy

PLANTCLEF_CSV = DATA / "plantclef2024" / "plantclef2024_species_DERIVED_genus_family_from_inat.csv"
LEAF = DATA / "leaf" / "annotations.json"

SMALL = [
    {"family": "Fagaceae", "genus": "Quercus", "species": "robur"},
    {"family": "Fagaceae", "genus": "Quercus", "species": "ilex"},
    {"family": "Fagaceae", "genus": "Fagus", "species": "sylvatica"},
    {"family": "Sapindaceae", "genus": "Acer", "species": "rubrum"},
    {"family": "Hydrangeaceae", "genus": "Philadelphus", "species": ""},
]


def _path(tax: Taxonomy, family: str, genus: str, species: str = "") -> dict[str, int]:
    return tax.path_indices(tax.node_for({"family": family, "genus": genus, "species": species}))


def _random_logits(tax: Taxonomy, n: int, seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {r: scale * torch.randn(n, tax.n_classes(r), generator=g) for r in tax.ranks}


@st.composite
def taxonomies(draw) -> Taxonomy:
    """1-3 families, 1-3 genera each, 0-3 species per genus (0 = genus-only taxon).

    Genus names repeat across families on purpose: homonyms are distinct nodes.
    """
    records = []
    for f in range(draw(st.integers(1, 3))):
        for g in range(draw(st.integers(1, 3))):
            n_sp = draw(st.integers(0, 3))
            if n_sp == 0:
                records.append({"family": f"F{f}", "genus": f"G{g}", "species": ""})
            for s in range(n_sp):
                records.append({"family": f"F{f}", "genus": f"G{g}", "species": f"s{s}"})
    return Taxonomy.from_records(records)


def _check_decoded(d, tax: Taxonomy, n: int, k: int) -> None:
    assert is_coherent(d.path, tax).all()
    lowest = tax.ranks[-1]
    for r in tax.ranks:
        p = d.probs[r]
        assert p.shape == (n, tax.n_classes(r))
        assert np.isfinite(p).all() and (p >= 0).all()
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        # Each rank is the sum of the lowest rank up the tree.
        if r != lowest:
            up = np.zeros_like(p)
            for j, parent in enumerate(tax.parent_index(lowest, r)):
                up[:, parent] += d.probs[lowest][:, j]
            np.testing.assert_allclose(p, up, atol=1e-5)
            np.testing.assert_array_equal(d.path[r], tax.parent_index(lowest, r)[d.path[lowest]])
        np.testing.assert_allclose(d.path_prob[r], p[np.arange(n), d.path[r]], atol=1e-6)
        kk = min(k, tax.n_classes(r))
        assert d.topk_index[r].shape == (n, kk)
        np.testing.assert_allclose(d.topk_prob[r], np.take_along_axis(p, d.topk_index[r], 1),
                                   atol=1e-6)
        assert (np.diff(d.topk_prob[r], axis=1) <= 1e-7).all()
    # The best path's leaf is the most probable leaf (path, marginal: topdown and crm
    # choose by their own rules); probabilities shrink down the path.
    if d.method in ("path", "marginal"):
        np.testing.assert_allclose(d.path_prob[lowest], d.probs[lowest].max(1), atol=1e-6)
    for upper, lower in zip(tax.ranks[:-1], tax.ranks[1:]):
        assert (d.path_prob[upper] >= d.path_prob[lower] - 1e-6).all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tax=taxonomies(), seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6),
       scale=st.sampled_from([0.1, 1.0, 5.0, 60.0]), method=st.sampled_from(METHODS),
       k=st.integers(1, 6))
def test_decoding_is_coherent_on_random_logits(tax, seed, n, scale, method, k):
    d = decode(_random_logits(tax, n, seed, scale), tax, method=method, top_k=k)
    assert d.ranks == tax.ranks and len(d) == n
    _check_decoded(d, tax, n, k)


def test_path_method_matches_brute_force_enumeration():
    tax = Taxonomy.from_records(SMALL)
    logits = _random_logits(tax, 3, seed=7, scale=2.0)
    logp = {r: torch.log_softmax(logits[r], 1).numpy() for r in tax.ranks}
    leaves = tax.nodes("species")
    scores = np.stack([sum(logp[r][:, tax.path_indices(leaf)[r]] for r in tax.ranks)
                       for leaf in leaves], axis=1)
    expected = np.exp(scores - scores.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    probs = coherent_probabilities(logits, tax, "path")
    np.testing.assert_allclose(probs["species"].numpy(), expected, rtol=1e-5, atol=1e-7)
    quercus = tax.index(("Fagaceae", "Quercus"))
    in_quercus = [i for i, leaf in enumerate(leaves) if leaf[:2] == ("Fagaceae", "Quercus")]
    np.testing.assert_allclose(probs["genus"][:, quercus].numpy(),
                               expected[:, in_quercus].sum(1), rtol=1e-5)


def test_marginal_method_uses_only_the_lowest_rank():
    tax = Taxonomy.from_records(SMALL)
    logits = _random_logits(tax, 4, seed=3, scale=3.0)
    probs = coherent_probabilities(logits, tax, "marginal")
    torch.testing.assert_close(probs["species"], logits["species"].softmax(1))
    # Higher heads are ignored entirely (they may even be absent).
    only_species = coherent_probabilities({"species": logits["species"]}, tax, "marginal")
    torch.testing.assert_close(only_species["family"], probs["family"])


def test_path_method_lets_higher_ranks_overrule_the_species_head():
    tax = Taxonomy.from_records(SMALL)
    acer = _path(tax, "Sapindaceae", "Acer", "rubrum")
    fagus = _path(tax, "Fagaceae", "Fagus", "sylvatica")
    logits = {r: torch.zeros(1, tax.n_classes(r)) for r in tax.ranks}
    logits["species"][0, acer["species"]] = 2.0  # species head slightly prefers Acer
    logits["species"][0, fagus["species"]] = 1.5
    logits["genus"][0, fagus["genus"]] = 4.0  # genus and family heads are sure of Fagus
    logits["family"][0, fagus["family"]] = 4.0
    assert decode(logits, tax, method="marginal").path["species"][0] == acer["species"]
    d = decode(logits, tax, method="path")
    assert d.path["species"][0] == fagus["species"]
    assert d.path["genus"][0] == fagus["genus"]


def test_coherent_probabilities_are_differentiable_and_accept_numpy():
    tax = Taxonomy.from_records(SMALL)
    logits = {r: torch.randn(2, tax.n_classes(r), requires_grad=True) for r in tax.ranks}
    probs = coherent_probabilities(logits, tax)
    probs["genus"][:, 0].sum().backward()
    assert all(logits[r].grad is not None and torch.isfinite(logits[r].grad).all()
               for r in tax.ranks)
    d = decode({r: v.detach().numpy() for r, v in logits.items()}, tax)
    assert is_coherent(d.path, tax).all()


def test_decode_rejects_bad_input():
    tax = Taxonomy.from_records(SMALL)
    logits = _random_logits(tax, 2, seed=0, scale=1.0)
    with pytest.raises(ValueError, match="method"):
        decode(logits, tax, method="greedy")
    with pytest.raises(ValueError, match="lowest rank"):
        decode({"genus": logits["genus"]}, tax)
    with pytest.raises(ValueError, match=r"\[batch, "):
        decode({**logits, "genus": torch.randn(2, 99)}, tax)
    with pytest.raises(ValueError, match="batch size"):
        decode({**logits, "species": torch.randn(3, tax.n_classes("species"))}, tax)
    with pytest.raises(ValueError, match="lacks"):
        decode({**logits, "order": torch.randn(2, 1)}, tax)


def test_is_coherent_flags_incoherent_and_accepts_back_off():
    tax = Taxonomy.from_records(SMALL)
    robur = _path(tax, "Fagaceae", "Quercus", "robur")
    acer = _path(tax, "Sapindaceae", "Acer", "rubrum")
    path = {
        "family": np.array([robur["family"]] * 3 + [-1, robur["family"]]),
        "genus": np.array([robur["genus"], robur["genus"], -1, robur["genus"], acer["genus"]]),
        "species": np.array([robur["species"], acer["species"], -1, -1, -1]),
    }
    # full path ok / species under another genus / backs off to family / gap above a
    # reported rank / genus under another family.
    np.testing.assert_array_equal(is_coherent(path, tax), [True, False, True, False, False])
    path["species"][0] = 99
    assert not is_coherent(path, tax)[0]


def test_to_frame_names_probabilities_and_top5():
    tax = Taxonomy.from_records(SMALL)
    phil = _path(tax, "Hydrangeaceae", "Philadelphus")
    logits = _random_logits(tax, 2, seed=1, scale=0.5)
    logits["species"][1, phil["species"]] = 20.0
    d = decode(logits, tax, method="path")
    df = d.to_frame(tax, ids=["a", "b"])
    assert list(df.columns) == ["id", "family", "family_prob", "family_top5", "genus",
                                "genus_prob", "genus_top5", "species", "species_prob",
                                "species_top5", "method"]
    assert df.loc[1, "species"] == "Philadelphus sp." and df.loc[1, "genus"] == "Philadelphus"
    assert df.loc[1, "family"] == "Hydrangeaceae"
    top = [item.rsplit(":", 1) for item in df.loc[0, "species_top5"].split(";")]
    assert len(top) == min(5, tax.n_classes("species"))
    assert top[0][0] == df.loc[0, "species"]
    assert float(top[0][1]) == pytest.approx(df.loc[0, "species_prob"], abs=1e-4)
    assert (df["method"] == "path").all()
    assert (decode(logits, tax).to_frame(tax)["method"] == "marginal").all()  # the default
    with pytest.raises(ValueError, match="ids"):
        d.to_frame(tax, ids=["a"])


def test_decode_leaf_probabilities_sums_up_the_tree():
    tax = Taxonomy.from_records(SMALL)
    p = np.full((1, tax.n_classes("species")), 0.0, dtype=np.float32)
    quercus = [i for i, n in enumerate(tax.nodes("species")) if n[1] == "Quercus"]
    p[0, quercus] = 0.3  # two oaks: 0.6 for Quercus
    p[0, _path(tax, "Sapindaceae", "Acer", "rubrum")["species"]] = 0.4
    d = decode_leaf_probabilities(p, tax)
    quercus_g = tax.index(("Fagaceae", "Quercus"))
    # The reported path is the arg-max leaf (Acer rubrum, 0.4) and its ancestors, even
    # though Quercus is the more probable genus (0.3 + 0.3); the per-rank top-k says so.
    assert tax.node("species", int(d.path["species"][0]))[1] == "Acer"
    assert d.path_prob["genus"][0] == pytest.approx(0.4)
    assert d.topk_index["genus"][0, 0] == quercus_g
    assert d.topk_prob["genus"][0, 0] == pytest.approx(0.6)
    assert d.probs["family"][0, tax.index(("Fagaceae",))] == pytest.approx(0.6)
    assert is_coherent(d.path, tax).all()


# ---------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def plantclef_taxonomy() -> Taxonomy:
    if not PLANTCLEF_CSV.is_file():
        pytest.skip(f"PlantCLEF class table not found at {PLANTCLEF_CSV} (../shared/data absent)")
    rows = pd.read_csv(PLANTCLEF_CSV, sep=";", dtype=str, keep_default_na=False)
    return Taxonomy.from_records(rows.to_dict("records"))


def test_decoding_at_plantclef_size_is_coherent_and_fast(plantclef_taxonomy):
    tax = plantclef_taxonomy
    assert tax.sizes == {"family": 191, "genus": 1446, "species": 7806}
    for method in ("path", "marginal"):
        d = decode(_random_logits(tax, 64, seed=0, scale=3.0), tax, method=method)
        _check_decoded(d, tax, 64, 5)
    big = _random_logits(tax, 1024, seed=1, scale=3.0)
    decode(big, tax)  # warm-up
    start = time.perf_counter()
    d = decode(big, tax)
    elapsed = time.perf_counter() - start
    assert is_coherent(d.path, tax).all()
    # About 50 ms on 2 idle CPU cores; a wide margin for busy machines.
    assert elapsed < 3.0, f"decoding 1024 x 7806 took {elapsed:.2f} s"


def test_leaf_taxonomy_placeholder_is_decoded_at_genus():
    if not LEAF.is_file():
        pytest.skip(f"leaf annotations not found at {LEAF} (../shared/data absent)")
    from taxoclass.taxonomy.annotations import load_annotations

    ann = load_annotations(LEAF)
    tax = ann.taxonomy()
    rows = ann.labelled_images()
    phil = rows[rows["genus"] == "Philadelphus"].iloc[0]
    target = tax.path_indices(tax.node_for(phil))
    logits = _random_logits(tax, 32, seed=5, scale=2.0)
    logits["species"][0, target["species"]] += 25.0
    for method in ("path", "marginal"):
        d = decode(logits, tax, method=method)
        _check_decoded(d, tax, 32, 5)
        assert all(d.path[r][0] == target[r] for r in tax.ranks)
        leaf = tax.node("species", int(d.path["species"][0]))
        assert tax.is_placeholder(leaf) and tax.label(leaf) == "Philadelphus sp."
