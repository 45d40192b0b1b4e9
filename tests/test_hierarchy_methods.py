"""Issue 17 methods: loss kinds (flat, soft labels, HXE, Bjerge), decoding (topdown, crm),
the recipe table and config validation. Values are checked on hand-made tiny cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taxoclass.config import Config, LossConfig, load_config
from taxoclass.errors import ConfigError
from taxoclass.model.baselines import choose_C
from taxoclass.model.decoding import decode, decode_leaf_probabilities, is_coherent, topdown
from taxoclass.model.losses import (
    BjergeDependencyLoss,
    ClassDependencyLoss,
    LeafLoss,
    criterion_from_config,
)
from taxoclass.model.recipes import available, fit_recipe, recipe_config
from taxoclass.model.training import train_head
from taxoclass.taxonomy.tree import Taxonomy

# F1: G1 {a, b}, G2 {c};  F2: G3 {d, e}
RECORDS = [
    {"family": "F1", "genus": "G1", "species": "a"},
    {"family": "F1", "genus": "G1", "species": "b"},
    {"family": "F1", "genus": "G2", "species": "c"},
    {"family": "F2", "genus": "G3", "species": "d"},
    {"family": "F2", "genus": "G3", "species": "e"},
]
Z = torch.tensor([[2.0, 1.0, 0.0, 0.5, -1.0]])  # species logits of one image


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return Taxonomy.from_records(RECORDS)


def _idx(tax, genus: str, species: str | None = None) -> dict[str, int]:
    fam = "F1" if genus in ("G1", "G2") else "F2"
    rec = {"family": fam, "genus": genus, "species": species or ""}
    path = tax.path_indices(tax.node_for(rec))
    return {r: path.get(r, -1) for r in tax.ranks}


def _targets(tax, *labels: dict[str, int]) -> dict[str, torch.Tensor]:
    return {r: torch.tensor([lab[r] for lab in labels]) for r in tax.ranks}


def _logits(tax, z_species: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {r: torch.randn(len(z_species), tax.n_classes(r), generator=g) for r in tax.ranks}
    out["species"] = z_species.clone()
    return out


# ------------------------------------------------------------------ losses: exact values
def test_species_index_order_is_as_the_tests_assume(tax):
    assert [_idx(tax, g, s)["species"] for g, s in
            [("G1", "a"), ("G1", "b"), ("G2", "c"), ("G3", "d"), ("G3", "e")]] == [0, 1, 2, 3, 4]
    assert [_idx(tax, g)["genus"] for g in ("G1", "G2", "G3")] == [0, 1, 2]


def test_flat_loss_is_cross_entropy_on_the_lowest_rank_only(tax):
    loss = LeafLoss(tax, "flat", label_smoothing=0.1)
    t = _targets(tax, _idx(tax, "G1", "a"), _idx(tax, "G3"))  # second: genus-only
    z = torch.cat([Z, Z.flip(1)])
    value = loss(_logits(tax, z), t)
    assert float(value) == pytest.approx(float(F.cross_entropy(Z, torch.tensor([0]),
                                                              label_smoothing=0.1)), rel=1e-6)
    assert loss.trained_ranks == ("species",)


def test_soft_labels_value_by_hand(tax):
    beta = 4.0
    logp = Z.log_softmax(1)[0].numpy()
    # LCA depth of every leaf with leaf a: a 3, b 2, c 1, d 0, e 0; two families: h_max 3
    def expected(depth):
        w = np.exp(-beta * (3 - np.asarray(depth)) / 3)
        return float(-(w / w.sum() * logp).sum())

    loss = LeafLoss(tax, "soft_labels", beta=beta)
    got = loss(_logits(tax, Z), _targets(tax, _idx(tax, "G1", "a")))
    assert float(got) == pytest.approx(expected([3, 2, 1, 0, 0]), rel=1e-5)
    # genus-only label G1: spread equally over a and b (depth 2), then c (1), d, e (0)
    got = loss(_logits(tax, Z), _targets(tax, _idx(tax, "G1")))
    assert float(got) == pytest.approx(expected([2, 2, 1, 0, 0]), rel=1e-5)
    # very hard labels are the plain cross-entropy
    hard = LeafLoss(tax, "soft_labels", beta=500.0)(_logits(tax, Z), _targets(tax, _idx(tax, "G1",
                                                                                       "a")))
    assert float(hard) == pytest.approx(float(F.cross_entropy(Z, torch.tensor([0]))), rel=1e-4)


def test_hxe_value_by_hand(tax):
    alpha = 0.5
    p = Z.softmax(1)[0].numpy().astype(np.float64)
    p_g1, p_f1 = p[0] + p[1], p[0] + p[1] + p[2]
    leaf = -(math.log(p[0] / p_g1) + math.exp(-alpha) * math.log(p_g1 / p_f1)
             + math.exp(-2 * alpha) * math.log(p_f1))
    loss = LeafLoss(tax, "hxe", alpha=alpha)
    got = loss(_logits(tax, Z), _targets(tax, _idx(tax, "G1", "a")))
    assert float(got) == pytest.approx(leaf, rel=1e-5)
    # genus-only label: the leaf term is dropped, the rest kept
    genus = -(math.exp(-alpha) * math.log(p_g1 / p_f1) + math.exp(-2 * alpha) * math.log(p_f1))
    got = loss(_logits(tax, Z), _targets(tax, _idx(tax, "G1")))
    assert float(got) == pytest.approx(genus, rel=1e-5)
    # alpha 0 telescopes to the cross-entropy of the leaf
    ce = LeafLoss(tax, "hxe", alpha=0.0)(_logits(tax, Z), _targets(tax, _idx(tax, "G1", "a")))
    assert float(ce) == pytest.approx(float(F.cross_entropy(Z, torch.tensor([0]))), rel=1e-5)


def _bjerge_case(tax):
    """Family head says F1 (right), genus head G3 (wrong, not under F1), species head a
    (right, not under G3)."""
    big = 6.0
    logits = {"family": torch.tensor([[big, 0.0]]), "genus": torch.tensor([[0.0, 0.0, big]]),
              "species": torch.tensor([[big, 0.0, 0.0, 0.0, 0.0]])}
    return {r: v.clone().requires_grad_(True) for r, v in logits.items()}


def test_bjerge_dependency_value_by_hand_and_no_gradient(tax):
    t = _targets(tax, _idx(tax, "G1", "a"))
    logits = _bjerge_case(tax)
    loss = BjergeDependencyLoss(tax, penalty=3.0, dependency_weight=1.0)
    value = loss(logits, t)
    # (family, genus): incoherent, parent right, child wrong -> 3**0 * 3**1 - 1 = 2
    # (genus, species): incoherent, parent wrong, child right -> 3**1 * 3**0 - 1 = 2
    assert loss.last_parts["dependency"] == pytest.approx(2.0)
    ce = sum(float(F.cross_entropy(logits[r].detach(), t[r])) for r in tax.ranks)
    assert float(value.detach()) == pytest.approx(ce + 2.0, rel=1e-6)
    value.backward()
    plain = _bjerge_case(tax)
    BjergeDependencyLoss(tax, dependency_weight=0.0)(plain, t).backward()
    for r in tax.ranks:  # arg-max based: the term adds no gradient
        torch.testing.assert_close(logits[r].grad, plain[r].grad)
    # a coherent, right prediction costs nothing
    good = {"family": torch.tensor([[6.0, 0.0]]), "genus": torch.tensor([[6.0, 0.0, 0.0]]),
            "species": torch.tensor([[6.0, 0, 0, 0, 0]])}
    loss(good, t)
    assert loss.last_parts["dependency"] == 0.0


@pytest.mark.parametrize("kind", ["dependency", "bjerge", "flat", "soft_labels", "hxe"])
def test_every_loss_has_finite_gradients_and_masks_partial_labels(tax, kind):
    crit = criterion_from_config(tax, {}, {"kind": kind, "label_smoothing": 0.05})
    g = torch.Generator().manual_seed(1)
    logits = {r: (60 * torch.randn(4, tax.n_classes(r), generator=g)).requires_grad_(True)
              for r in tax.ranks}
    labels = [_idx(tax, "G1", "a"), _idx(tax, "G3"), _idx(tax, "G2", "c"),
              {r: -1 for r in tax.ranks}]  # full, genus-only, full, unlabelled
    value = crit(logits, _targets(tax, *labels))
    value.backward()
    assert torch.isfinite(value)
    for r in crit.trained_ranks:
        assert torch.isfinite(logits[r].grad).all()
        assert not logits[r].grad[3].any(), f"{kind}: the unlabelled row got a gradient at {r}"
    if kind in ("flat",):
        assert not logits["species"].grad[1].any()  # genus-only row: no species label
    if kind in ("soft_labels", "hxe"):
        assert logits["species"].grad[1].abs().sum() > 0  # genus-only row still teaches
    # dropping the unlabelled row changes nothing
    again = crit({r: v.detach()[:3] for r, v in logits.items()}, _targets(tax, *labels[:3]))
    assert float(again) == pytest.approx(float(value.detach()), rel=1e-5, abs=1e-6)


def test_all_unlabelled_batch_is_zero_not_nan(tax):
    for kind in ("flat", "soft_labels", "hxe", "bjerge"):
        crit = criterion_from_config(tax, {}, {"kind": kind})
        logits = {r: torch.randn(2, tax.n_classes(r), requires_grad=True) for r in tax.ranks}
        value = crit(logits, _targets(tax, *[{r: -1 for r in tax.ranks}] * 2))
        value.backward()
        assert float(value.detach()) == 0.0


def test_lowest_rank_losses_train_only_the_lowest_head(tax):
    x = torch.randn(20, 6).numpy()
    y = {r: np.array([_idx(tax, "G1", "a")[r], _idx(tax, "G3", "d")[r]] * 10) for r in tax.ranks}
    res = train_head(x, y, None, None, tax, loss={"kind": "hxe"},
                     train={"epochs": 3, "patience": 0})
    for r in ("family", "genus"):
        assert not res.head.heads[r].weight.any() and not res.head.heads[r].bias.any()
    assert res.head.heads["species"].weight.any()
    # a bundle decodes every head: the zero heads change nothing and report no arg-max
    with torch.no_grad():
        logits = res.head(torch.nn.functional.normalize(torch.as_tensor(x), dim=1))
    path, marginal = decode(logits, tax, method="path"), decode(logits, tax, method="marginal")
    np.testing.assert_allclose(path.probs["species"], marginal.probs["species"], atol=1e-6)
    assert set(path.head_argmax) == {"species"}


# ------------------------------------------------------------------ decoding
def _leaf_probs(values: list[float]) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


def _expected_distance(tax, p: np.ndarray) -> np.ndarray:
    leaves = tax.nodes("species")
    d = np.array([[tax.distance(a, b) for b in leaves] for a in leaves], dtype=float)
    return p @ d  # expected distance of reporting each leaf


def test_crm_picks_the_leaf_of_least_expected_tree_distance(tax):
    # a alone is the most probable leaf, but F2/G3 holds 0.6 of the mass
    p = [0.4, 0.0, 0.0, 0.3, 0.3]
    d = decode_leaf_probabilities(_leaf_probs(p), tax, choice="crm")
    brute = _expected_distance(tax, np.array(p))
    assert int(d.path["species"][0]) == int(np.argmin(brute)) == 3  # d, not arg-max a
    assert decode_leaf_probabilities(_leaf_probs(p), tax).path["species"][0] == 0
    assert (d.path["genus"][0], d.path["family"][0]) == (2, 1)
    # a confident leaf stays the answer
    q = [0.9, 0.05, 0.0, 0.05, 0.0]
    assert decode_leaf_probabilities(_leaf_probs(q), tax, choice="crm").path["species"][0] == 0
    # on random probabilities crm always attains the brute-force minimum
    rng = np.random.default_rng(0)
    for _ in range(50):
        r = rng.dirichlet(np.full(5, 0.5))
        got = decode_leaf_probabilities(_leaf_probs(list(r)), tax, choice="crm").path["species"][0]
        brute = _expected_distance(tax, r)
        assert brute[got] == pytest.approx(brute.min())


def test_crm_decoding_from_logits_uses_the_path_probabilities(tax):
    # neutral upper heads: the path probabilities are the species head's, arg-max a
    logits = {"family": torch.zeros(1, 2), "genus": torch.zeros(1, 3),
              "species": torch.log(torch.tensor([[0.4, 0.01, 0.01, 0.3, 0.3]]))}
    path, crm = decode(logits, tax, method="path"), decode(logits, tax, method="crm")
    np.testing.assert_allclose(crm.probs["species"], path.probs["species"])
    brute = _expected_distance(tax, path.probs["species"][0].astype(float))
    assert brute[crm.path["species"][0]] == pytest.approx(brute.min(), rel=1e-6)
    assert (path.path["species"][0], crm.path["species"][0]) == (0, 3)


def test_topdown_stays_in_the_tree_and_follows_the_top_head(tax):
    # family head sure of F1; species head prefers d (in F2): topdown keeps to F1's children
    logits = {"family": torch.tensor([[5.0, 0.0]]), "genus": torch.tensor([[0.0, 1.0, 3.0]]),
              "species": torch.tensor([[0.0, 0.5, 1.0, 4.0, 0.0]])}
    d = decode(logits, tax, method="topdown")
    assert (d.path["family"][0], d.path["genus"][0], d.path["species"][0]) == (0, 1, 2)
    assert decode(logits, tax, method="marginal").path["species"][0] == 3
    np.testing.assert_array_equal(d.head_argmax["genus"], [2])  # the heads' own answers
    g = torch.Generator().manual_seed(3)
    many = {r: 3 * torch.randn(200, tax.n_classes(r), generator=g) for r in tax.ranks}
    d = decode(many, tax, method="topdown")
    assert is_coherent(d.path, tax).all()
    np.testing.assert_array_equal(d.path["species"], topdown(many, tax).numpy())
    np.testing.assert_array_equal(d.path["family"], many["family"].argmax(1).numpy())
    for r in tax.ranks:
        np.testing.assert_allclose(d.probs[r].sum(1), 1.0, atol=1e-5)
    assert not is_coherent(d.head_argmax, tax).all()  # random heads disagree


# ------------------------------------------------------------------ recipes
def _synthetic(n_per: int, seed: int) -> tuple[Taxonomy, np.ndarray, dict[str, np.ndarray]]:
    """3 families x 2 genera x 3 species; embedding = family + genus + species + noise."""
    records = [{"family": f"F{f}", "genus": f"G{f}{g}", "species": f"s{s}"}
               for f in range(3) for g in range(2) for s in range(3)]
    tax = Taxonomy.from_records(records)
    rng = np.random.default_rng(0)
    dim = 24
    centres = {r: rng.normal(size=(tax.n_classes(r), dim)) for r in tax.ranks}
    leaves = np.repeat(np.arange(tax.n_classes("species")), n_per)
    up = {r: tax.parent_index("species", r) if r != "species" else np.arange(len(leaves))
          for r in tax.ranks}
    y = {r: up[r][leaves] if r != "species" else leaves for r in tax.ranks}
    noise = np.random.default_rng(seed).normal(scale=1.2, size=(len(leaves), dim))
    x = sum(centres[r][y[r]] for r in tax.ranks) + noise
    return tax, x.astype(np.float32), y


FAST = {"train.epochs": 40, "train.patience": 0, "train.lr": 0.03, "train.batch_size": 64,
        "logreg.folds": 2, "hiclass.C": 10.0}


def test_every_recipe_fits_and_predicts_well_above_chance():
    tax, x, y = _synthetic(12, seed=1)
    _, x_te, y_te = _synthetic(6, seed=2)
    y = {r: v.copy() for r, v in y.items()}
    y["species"][::4] = -1  # partial labels: a quarter of the images genus-only
    chance = 1 / tax.n_classes("species")
    for name in available():
        d = fit_recipe(name, x, y, tax, seed=0, settings=FAST).predict(x_te)
        acc = {r: float((d.path[r] == y_te[r]).mean()) for r in tax.ranks}
        assert acc["species"] > 6 * chance and acc["family"] > 0.8, (name, acc)
        assert is_coherent(d.path, tax).all(), name
        for r in tax.ranks:
            np.testing.assert_allclose(d.probs[r].sum(1), 1.0, atol=1e-4)
        heads = set(d.head_argmax)
        expected = {"logreg": set(), "hiclass": set(), "knn": set()}.get(
            name, {"species"} if recipe_config(name)["loss"]["kind"] in ("flat", "soft_labels",
                                                                         "hxe")
            else set(tax.ranks))
        assert heads == expected, name


def test_recipe_settings_layering_and_errors():
    cfg = recipe_config("species-only", {"loss": {"kind": "dependency", "label_smoothing": 0.1},
                                         "train.epochs": 7, "data": {"ranks": "auto"}}, seed=4)
    assert cfg["loss"]["kind"] == "flat"  # the recipe's defining key wins
    assert cfg["loss"]["label_smoothing"] == 0.1 and cfg["train"]["epochs"] == 7
    assert cfg["train"]["seed"] == 4
    assert cfg["loss"]["dependency_weight"] == LossConfig().dependency_weight  # config default
    tax, x, y = _synthetic(3, seed=0)
    with pytest.raises(ConfigError, match="Unknown recipe 'nope'"):
        fit_recipe("nope", x, y, tax)
    with pytest.raises(ConfigError, match=r"loss.kind: expected one of 'dependency', 'bjerge', "
                                          r"'flat', 'soft_labels', 'hxe', found 'focal'"):
        recipe_config("taxoclass", {"loss.kind": "focal"})
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        recipe_config("taxoclass", {"train": {"lr": 0.1}, "loss.lr": 1})
    with pytest.raises(ConfigError, match="recipe 'logreg' has no option 'gamma'"):
        fit_recipe("logreg", x, y, tax, settings={"logreg.gamma": 1})
    with pytest.raises(ConfigError, match="unknown key 'foo.bar'"):
        fit_recipe("knn", x, y, tax, settings={"foo.bar": 1})


def test_config_validates_loss_and_decoding_choices():
    with pytest.raises(ConfigError, match="decode.method: 'topdown' needs a head per rank, but "
                                          "loss.kind 'hxe' trains the lowest rank only"):
        Config.from_dict({"loss": {"kind": "hxe"}, "decode": {"method": "topdown"}})
    with pytest.raises(ConfigError, match="loss.class_balanced: not defined for loss.kind "
                                          "'soft_labels'"):
        LossConfig.from_dict({"kind": "soft_labels", "class_balanced": True})
    with pytest.raises(ConfigError, match=r"loss.hxe_alpha: expected a number >= 0, found -1"):
        LossConfig.from_dict({"hxe_alpha": -1})
    with pytest.raises(ConfigError, match=r"decode.method: expected one of 'path', 'marginal', "
                                          r"'topdown', 'crm', found 'greedy'"):
        load_config(None, ["decode.method=greedy"])
    tax = Taxonomy.from_records(RECORDS)
    default = criterion_from_config(tax, {}, {})  # the default loss: hxe (issue 17)
    assert isinstance(default, LeafLoss) and default.kind == "hxe"
    assert isinstance(criterion_from_config(tax, {}, {"kind": "dependency"}),
                      ClassDependencyLoss)
    y = {r: np.zeros(4, dtype=int) for r in tax.ranks}
    with pytest.raises(ConfigError, match="loss: trains no head"):
        train_head(np.ones((4, 3)), y, None, None, tax, train={"epochs": 1},
                   loss={"kind": "dependency", "rank_weights": {r: 0 for r in tax.ranks},
                         "dependency_weight": 0})


def test_choose_C_extends_the_grid_past_an_edge():
    rng = np.random.default_rng(0)
    # imbalanced: a tiny C predicts the majority class (0.75), a larger one does better
    x = np.concatenate([rng.normal(0, 1, (45, 5)), rng.normal(2.0, 1, (15, 5))])
    y = np.repeat([0, 1], [45, 15])
    best, scores = choose_C(x, y, grid=(0.01, 0.1), folds=3)
    assert sorted(scores) == pytest.approx([0.01, 0.1, 1.0])  # best at the top edge: grew
    assert best == pytest.approx(0.1) and scores[best] > 0.9 and scores[0.01] == 0.75
    best, scores = choose_C(x, y, grid=(10.0, 100.0), folds=3)
    assert min(scores) == pytest.approx(1.0)  # best at the bottom edge: grew downwards
    best, scores = choose_C(x, y, grid=(1e-5, 1e-4), folds=3)
    assert sorted(scores) == [1e-5, 1e-4]  # a flat plateau at the bottom: no growth
