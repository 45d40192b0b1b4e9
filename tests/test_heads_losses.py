"""MultiRankHead, HierarchicalClassifier, ClassDependencyLoss and class-balanced weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from taxoclass.errors import ConfigError
from taxoclass.model.heads import HierarchicalClassifier, MultiRankHead
from taxoclass.model.losses import ClassDependencyLoss, class_balanced_weights
from taxoclass.taxonomy.tree import Taxonomy

RECORDS = [
    {"family": "Fagaceae", "genus": "Quercus", "species": "robur"},
    {"family": "Fagaceae", "genus": "Quercus", "species": "ilex"},
    {"family": "Fagaceae", "genus": "Fagus", "species": "sylvatica"},
    {"family": "Sapindaceae", "genus": "Acer", "species": "campestre"},
    {"family": "Sapindaceae", "genus": "Acer", "species": "rubrum"},
    {"family": "Hydrangeaceae", "genus": "Philadelphus", "species": ""},
]


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny tensors


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return Taxonomy.from_records(RECORDS)


def _onehot_logits(tax: Taxonomy, path: dict[str, list[int]], conf: float = 4.0):
    return {r: conf * torch.nn.functional.one_hot(torch.tensor(path[r]), tax.n_classes(r)).float()
            for r in tax.ranks}


# ---------------------------------------------------------------------------- heads
@pytest.mark.parametrize("hidden", [None, 16])
def test_head_shapes_order_and_config_round_trip(tax, hidden):
    torch.manual_seed(0)
    head = MultiRankHead(12, tax.sizes, hidden=hidden, dropout=0.1).eval()
    x = torch.randn(5, 12)
    out = head(x)
    assert list(out) == list(tax.ranks)
    for r in tax.ranks:
        assert out[r].shape == (5, tax.n_classes(r))
        assert torch.isfinite(out[r]).all()
    cfg = json.loads(json.dumps(head.config()))
    clone = MultiRankHead.from_config(cfg).eval()
    clone.load_state_dict(head.state_dict())
    for r, z in clone(x).items():
        torch.testing.assert_close(z, out[r])


def test_head_rejects_bad_input(tax):
    with pytest.raises(ConfigError):
        MultiRankHead(0, tax.sizes)
    with pytest.raises(ConfigError):
        MultiRankHead(8, {"species": 0})
    with pytest.raises(ConfigError, match="n_classes"):
        MultiRankHead.from_config({"in_features": 8})
    with pytest.raises(ValueError, match=r"\[batch, 8\]"):
        MultiRankHead(8, tax.sizes)(torch.randn(2, 7))


def test_hierarchical_classifier_on_tiny_timm_backbone(tax):
    torch.manual_seed(0)
    model = HierarchicalClassifier.create("test_efficientnet", tax.sizes, pretrained=False).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        emb = model.forward_features(images)
        out = model(images)
    assert emb.shape == (2, model.backbone.num_features)
    assert list(out) == list(tax.ranks)
    for r in tax.ranks:
        assert out[r].shape == (2, tax.n_classes(r))
        assert torch.isfinite(out[r]).all()
        # A head trained on cached embeddings gives the same logits as the full model.
        torch.testing.assert_close(model.forward_head(emb)[r], out[r])
    model.freeze_backbone()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    with pytest.raises(ConfigError, match="in_features"):
        HierarchicalClassifier(model.backbone, MultiRankHead(7, tax.sizes))


# ---------------------------------------------------------------------------- loss
def test_coherent_predictions_cost_less_than_incoherent(tax):
    loss = ClassDependencyLoss(tax)
    q_robur = tax.path_indices(("Fagaceae", "Quercus", "Quercus robur"))
    acer = tax.path_indices(("Sapindaceae", "Acer", "Acer rubrum"))
    coherent = {r: [q_robur[r]] for r in tax.ranks}
    # Same per-rank confidence, but the species sits under another genus and family.
    incoherent = {"family": [q_robur["family"]], "genus": [q_robur["genus"]],
                  "species": [acer["species"]]}
    targets_none: dict = {}  # no targets at all: only the dependency term, on every sample
    lc = loss(_onehot_logits(tax, coherent), targets_none)
    li = loss(_onehot_logits(tax, incoherent), targets_none)
    assert float(lc) < float(li)
    assert loss.last_parts["dependency"] == pytest.approx(float(li))
    assert "ce/species" not in loss.last_parts  # no labelled sample: no CE part at all
    # With labels too: CE is identical at family/genus, so the ordering must hold.
    targets = {r: torch.tensor([q_robur[r]]) for r in tax.ranks}
    assert float(loss(_onehot_logits(tax, coherent), targets)) < float(
        loss(_onehot_logits(tax, incoherent), targets))


def test_dependency_term_matches_formula(tax):
    torch.manual_seed(1)
    logits = {r: torch.randn(4, tax.n_classes(r)) for r in tax.ranks}
    loss = ClassDependencyLoss(tax, dependency_weight=2.0)
    total = loss(logits, {})  # no targets: the dependency term over every sample
    expected = 0.0
    for parent, child in [("family", "genus"), ("genus", "species")]:
        pc, pp = logits[child].softmax(1), logits[parent].softmax(1)
        up = torch.as_tensor(tax.parent_index(child, parent))
        expected += (1 - (pc * pp[:, up]).sum(1)).mean() / 2
    assert float(total) == pytest.approx(2.0 * float(expected), rel=1e-5)
    assert 0.0 <= loss.last_parts["dependency"] <= 1.0


def test_masked_rank_gets_no_gradient_without_dependency_term(tax):
    torch.manual_seed(0)
    head = MultiRankHead(8, tax.sizes)
    x = torch.randn(6, 8)
    targets = {"family": torch.tensor([0, 1, 2, 0, 1, 2]),
               "genus": torch.tensor([0, 1, 2, 3, 0, 1]),
               "species": torch.full((6,), -1)}
    loss = ClassDependencyLoss(tax, dependency_weight=0.0)
    value = loss(head(x), targets)
    value.backward()
    assert torch.isfinite(value)
    sp = head.heads["species"].weight.grad
    assert sp is not None and torch.count_nonzero(sp) == 0
    assert torch.count_nonzero(head.heads["genus"].weight.grad) > 0
    assert set(loss.last_parts) == {"ce/family", "ce/genus", "total"}


def test_dependency_term_sends_no_gradient_to_masked_ranks(tax):
    # Issue 15: a masked rank contributes nothing, the class-dependency term included:
    # genus-only images do not train the species head.
    torch.manual_seed(0)
    head = MultiRankHead(8, tax.sizes)
    targets = {"family": torch.tensor([0, 1]), "genus": torch.tensor([0, 1]),
               "species": torch.tensor([-1, -1])}
    ClassDependencyLoss(tax, dependency_weight=1.0)(head(torch.randn(2, 8)), targets).backward()
    assert torch.count_nonzero(head.heads["species"].weight.grad) == 0
    assert torch.count_nonzero(head.heads["genus"].weight.grad) > 0


def test_masked_samples_get_no_cross_entropy_gradient(tax):
    torch.manual_seed(0)
    logits = {r: torch.randn(4, tax.n_classes(r), requires_grad=True) for r in tax.ranks}
    targets = {"family": torch.tensor([0, 1, -1, 2]), "genus": torch.tensor([0, 2, -1, 3]),
               "species": torch.tensor([0, -1, -1, 4])}
    ClassDependencyLoss(tax, dependency_weight=0.0, label_smoothing=0.1)(logits, targets).backward()
    g = logits["species"].grad
    assert torch.count_nonzero(g[[1, 2]]) == 0
    assert torch.count_nonzero(g[[0, 3]]) > 0
    assert torch.count_nonzero(logits["family"].grad[2]) == 0


def test_all_ranks_unlabelled_gives_zero_not_nan(tax):
    logits = {r: torch.randn(3, tax.n_classes(r), requires_grad=True) for r in tax.ranks}
    targets = {r: torch.full((3,), -1) for r in tax.ranks}
    value = ClassDependencyLoss(tax, dependency_weight=0.0)(logits, targets)
    assert float(value.detach()) == 0.0
    value.backward()  # attached to the graph, gradients are exactly zero
    assert all(torch.count_nonzero(logits[r].grad) == 0 for r in tax.ranks)


def test_class_and_rank_weights(tax):
    torch.manual_seed(0)
    logits = {r: torch.randn(4, tax.n_classes(r)) for r in tax.ranks}
    targets = {r: torch.tensor([0, 0, 1, 1]) for r in tax.ranks}
    base = ClassDependencyLoss(tax, dependency_weight=0.0)
    base(logits, targets)
    parts = dict(base.last_parts)
    heavy = ClassDependencyLoss(tax, dependency_weight=0.0, rank_weights={"species": 3.0})
    value = heavy(logits, targets)
    assert float(value) == pytest.approx(parts["ce/family"] + parts["ce/genus"]
                                         + 3 * parts["ce/species"], rel=1e-5)
    cw = torch.ones(tax.n_classes("species"))
    cw[1] = 5.0
    weighted = ClassDependencyLoss(tax, dependency_weight=0.0, class_weights={"species": cw})
    weighted(logits, targets)
    expected = torch.nn.functional.cross_entropy(logits["species"], targets["species"], weight=cw)
    assert weighted.last_parts["ce/species"] == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ConfigError, match="one per species class"):
        ClassDependencyLoss(tax, class_weights={"species": torch.ones(2)})
    with pytest.raises(ConfigError, match="unknown rank"):
        ClassDependencyLoss(tax, rank_weights={"order": 1.0})


def test_loss_trains_a_head_to_coherent_predictions(tax):
    torch.manual_seed(0)
    leaves = tax.nodes("species")
    centres = torch.randn(len(leaves), 16) * 3
    y = torch.arange(len(leaves)).repeat(20)
    x = centres[y] + torch.randn(len(y), 16)
    targets = {r: torch.as_tensor(tax.parent_index("species", r))[y] if r != "species" else y
               for r in tax.ranks}
    head = MultiRankHead(16, tax.sizes)
    loss = ClassDependencyLoss(tax, dependency_weight=0.5)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        opt.zero_grad()
        value = loss(head(x), targets)
        value.backward()
        opt.step()
        first = first if first is not None else float(value.detach())
    assert float(value.detach()) < 0.3 * first
    assert loss.last_parts["dependency"] < 0.1


# ---------------------------------------------------------------------------- weights
def test_class_balanced_weights():
    counts = np.array([1000, 100, 10, 1, 0])
    w = class_balanced_weights(counts, beta=0.999)
    assert w.dtype == torch.float32 and w.shape == (5,)
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-6)
    assert torch.all(w[:-1][:-1] < w[:-1][1:])  # rarer classes weigh more
    assert float(w[4]) == pytest.approx(float(w[3]))  # empty classes like singletons
    # Effective number (1 - beta**n) / (1 - beta), by hand for n = 1000 vs 1:
    ratio = (1 - 0.999**1000) / (1 - 0.999)
    assert float(w[3] / w[0]) == pytest.approx(ratio, rel=1e-5)
    assert torch.allclose(class_balanced_weights(counts, beta=0.0), torch.ones(5))
    with pytest.raises(ValueError):
        class_balanced_weights(np.array([1, -1]))


def test_group_matcher_gives_timm_layers_per_stage_with_final_norms_on_top():
    """HierarchicalClassifier.group_matcher: timm's coarse groups of the backbone (one
    layer per CNN stage), the final conv/norm and the rank heads in the top layer."""
    from taxoclass.model.optim import layer_ids, set_trainable

    clf = HierarchicalClassifier.create("tf_efficientnet_lite0", {"genus": 3, "species": 5})
    ids = layer_ids(clf)
    assert ids["backbone.conv_stem.weight"] == 0 and ids["backbone.bn1.bias"] == 0
    assert [ids[f"backbone.blocks.{i}.0.bn1.weight"] for i in range(7)] == list(range(1, 8))
    assert ids["backbone.blocks.6.0.conv_pwl.weight"] == 7
    top = {ids[n] for n in ("backbone.conv_head.weight", "backbone.bn2.weight",
                            "head.heads.genus.weight", "head.heads.species.bias")}
    assert top == {8} and max(ids.values()) == 8
    frozen = set_trainable(clf, 2)  # the last two stages, the final conv/norm, the heads
    assert frozen == ["backbone.conv_stem", "backbone.bn1", *(f"backbone.blocks.{i}"
                                                              for i in range(5))]
    trained = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert "backbone.blocks.5.0.conv_pw.weight" in trained and "backbone.bn2.bias" in trained
    assert "backbone.blocks.4.0.conv_pw.weight" not in trained
