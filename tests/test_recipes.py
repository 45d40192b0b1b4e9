"""The recipe table (issue 17 after the default switch): each recipe means what its summary
says whatever the config holds, head recipes are marked by a public attribute, the
benchmark trains a head once for recipes that differ only in decoding, and hiclass's
probabilities are formed along the path (batch-independent, hand-checked)."""

from __future__ import annotations

import numpy as np
import pytest

from taxoclass.config import DEFAULTS
from taxoclass.model.baselines import HiclassBaseline, hiclass_leaf_probabilities
from taxoclass.model.recipes import (
    RECIPES,
    available,
    fit_recipe,
    head_recipes,
    recipe_config,
)
from taxoclass.pipelines.benchmark import BenchmarkData, benchmark
from taxoclass.taxonomy.tree import Taxonomy

PER_RANK = ("per-rank", "crm", "path", "marginal", "topdown")


def _data(seed: int = 0, per_species: int = 10) -> BenchmarkData:
    """2 families x 2 genera x 3 species, Gaussian embeddings around nested means (the
    means fixed, the images drawn with ``seed``)."""
    rng, noise = np.random.default_rng(0), np.random.default_rng(100 + seed)
    recs, x, rows = [], [], []
    for f in range(2):
        fm = rng.normal(0, 3, 12)
        for g in range(2):
            gm = fm + rng.normal(0, 1.5, 12)
            for s in range(3):
                rec = {"family": f"F{f}", "genus": f"G{f}{g}", "species": f"s{f}{g}{s}"}
                recs.append(rec)
                x.append(gm + rng.normal(0, 2.0, 12) + noise.normal(0, 0.7, (per_species, 12)))
                rows += [rec] * per_species
    tax = Taxonomy.from_records(recs)
    y = {r: np.array([tax.path_indices(tax.node_for(rec))[r] for rec in rows])
         for r in tax.ranks}
    return BenchmarkData(x=np.concatenate(x).astype(np.float32), y=y, taxonomy=tax)


# ------------------------------------------------------------------------------ the table
def test_every_recipe_but_taxoclass_fixes_its_loss_and_decoding():
    other = {"loss": {"kind": "soft_labels"}, "decode": {"method": "crm"}}
    for name in head_recipes():
        plain, moved = recipe_config(name), recipe_config(name, other)
        if name == "taxoclass":  # the config as given: the shipped defaults, or the settings
            assert (plain["loss"]["kind"], plain["decode"]["method"]) == (
                DEFAULTS["loss"]["kind"], DEFAULTS["decode"]["method"]) == ("hxe", "marginal")
            assert (moved["loss"]["kind"], moved["decode"]["method"]) == ("soft_labels", "crm")
            continue
        assert (plain["loss"]["kind"], plain["decode"]["method"]) == (
            moved["loss"]["kind"], moved["decode"]["method"]), name
    kinds = {n: (recipe_config(n)["loss"]["kind"], recipe_config(n)["decode"]["method"])
             for n in head_recipes()}
    assert kinds["per-rank"] == ("dependency", "path")  # the previous default
    assert {kinds[n][0] for n in PER_RANK} == {"dependency"}
    assert [kinds[n][1] for n in PER_RANK] == ["path", "crm", "path", "marginal", "topdown"]
    assert kinds["bjerge"] == ("bjerge", "path") and kinds["hxe"] == ("hxe", "marginal")
    assert kinds["species-only"] == ("flat", "marginal")


def test_head_recipes_are_marked_publicly():
    assert set(head_recipes()) | {"logreg", "hiclass", "knn"} == set(available())
    assert {RECIPES[n].kind for n in ("logreg", "hiclass", "knn")} == {"baseline"}
    assert {RECIPES[n].kind for n in head_recipes()} == {"head"}
    assert "per-rank" in head_recipes() and "dependency" in RECIPES["per-rank"].summary


def test_benchmark_shares_one_trained_head_between_decodings():
    data = _data()
    settings = {"train.epochs": 40, "train.batch_size": 32, "train.lr": 0.05}
    res = benchmark(data, ["taxoclass", "hxe", "per-rank", "path", "marginal"], seeds=2,
                    final_seeds=(), settings=settings)
    df = res.results.set_index(["seed", "recipe"])
    cols = ["acc_species", "acc_genus", "ece_species", "mistake_distance"]
    for seed in (1, 2):
        # same head, same decoding: identical figures
        assert df.loc[(seed, "per-rank"), cols].equals(df.loc[(seed, "path"), cols])
        assert df.loc[(seed, "taxoclass"), cols].equals(df.loc[(seed, "hxe"), cols])
        # the per-rank heads decoded two ways: same head, different probabilities
        assert df.loc[(seed, "per-rank"), "ece_species"] != df.loc[(seed, "marginal"),
                                                                  "ece_species"]
    assert df["acc_species"].min() > 0.5  # 12 species: chance is 0.083


# ------------------------------------------------------------------------------ hiclass
@pytest.fixture(scope="module")
def hiclass_fit():
    data = _data(seed=1)
    model = fit_recipe("hiclass", data.x, data.y, data.taxonomy, settings={"hiclass.C": 10.0})
    return data, model


def test_hiclass_probabilities_are_the_product_along_the_path(hiclass_fit):
    data, model = hiclass_fit
    assert isinstance(model, HiclassBaseline)
    tax, h = data.taxonomy, model.model_
    xn = data.x / np.linalg.norm(data.x, axis=1, keepdims=True)
    p = hiclass_leaf_probabilities(h, xn, tax)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    # by hand for image 0 and every species: P(family) P(genus | family) P(species | genus)
    graph, sep = h.hierarchy_, h.separator_

    def cond(parent, child, row):
        clf = graph.nodes[parent]["classifier"]
        return clf.predict_proba(xn[row:row + 1])[0][list(clf.classes_).index(child)]

    for k in range(tax.n_classes("species")):
        path = [str(v) for v in tax.path_indices(tax.node("species", k)).values()]
        nodes = [sep.join(path[:i + 1]) for i in range(3)]
        hand = cond(h.root_, nodes[0], 0) * cond(nodes[0], nodes[1], 0) * cond(
            nodes[1], nodes[2], 0)
        assert p[0, k] == pytest.approx(hand, rel=1e-4, abs=1e-6)


def test_hiclass_probabilities_do_not_depend_on_the_batch_and_are_calibrated(hiclass_fit):
    data, model = hiclass_fit
    test = _data(seed=2, per_species=4)
    x = test.x
    whole = model.predict(x)
    alone = model.predict(x[:1])  # hiclass 5.0.8's predict_proba differs here (hiclass#159)
    np.testing.assert_allclose(whole.probs["species"][:1], alone.probs["species"], atol=1e-6)
    ok = whole.path["species"] == test.y["species"]
    conf = whole.path_prob["species"]
    # probabilities that follow the accuracy (on the leaf data hiclass 5.0.8 gave ~0.01-0.05)
    assert ok.mean() > 0.6 and conf.mean() > 0.4
    assert abs(conf.mean() - ok.mean()) < 0.3
