"""Shared test fixtures. Add fixtures; do not remove others'."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# TAXOCLASS_SHARED_DATA=/nonexistent simulates a checkout without ../shared/data.
SHARED_DATA = Path(os.environ.get("TAXOCLASS_SHARED_DATA")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data")

# A DINOv2-shaped ViT (patch 14, 4 registers) small enough for CPU tests.
TINY_DINO_KWARGS = dict(img_size=56, depth=2, embed_dim=64, num_heads=2)


@pytest.fixture
def one_thread():
    """One torch thread for the test: deterministic, fast and polite on a shared machine."""
    from taxoclass.model.threads import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole module (``pytestmark = usefixtures(...)``): tiny
    tensors, where a thread hand-off costs more than the work."""
    from taxoclass.model.threads import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder ``../shared/data``; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_leaf_image_paths(shared_data: Path) -> list[Path]:
    """A handful of real leaf JPEGs (greyscale scans), sorted by name."""
    paths = sorted((shared_data / "leaf" / "images").glob("*.jpg"))
    if len(paths) < 8:
        pytest.skip(f"fewer than 8 leaf images under {shared_data / 'leaf' / 'images'}")
    return paths[:8]


@pytest.fixture(scope="session")
def leaf_image_paths() -> list[Path]:
    """Eight image files: real leaf JPEGs where ../shared/data exists, else the shipped
    fixture images (so tests that only need *some* photos run on any checkout)."""
    real = sorted((SHARED_DATA / "leaf" / "images").glob("*.jpg"))
    if len(real) >= 8:
        return real[:8]
    return sorted((Path(__file__).resolve().parent / "fixtures" / "images" / "train")
                  .glob("*.jpg"))[:8]


@pytest.fixture
def tiny_dino_kwargs() -> dict:
    """timm model kwargs for a tiny DINOv2-shaped ViT."""
    return dict(TINY_DINO_KWARGS)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def leaf_embedding_cache(shared_data: Path, request, tmp_path_factory) -> Path:
    """EfficientNet-Lite0 embeddings of the 990 labelled leaf images (real weights).

    Reuses ``runs/leaf-lite0-embeddings`` (the README quickstart's cache) when it is
    complete, else computes the cache once per machine into pytest's cache folder
    (about a minute on 2 cores), so the quality-floor tests run on a fresh clone too.
    """
    from taxoclass.errors import CacheError
    from taxoclass.features.embeddings import load_embeddings
    from taxoclass.pipelines.embed import embed_annotations

    for candidate in (REPO / "runs" / "leaf-lite0-embeddings",):
        try:
            if len(load_embeddings(candidate)) >= 990:
                return candidate
        except CacheError:
            pass
    cache = getattr(request.config, "cache", None)
    out = (cache.mkdir("leaf-lite0-embeddings") if cache is not None
           else tmp_path_factory.mktemp("leaf-lite0-embeddings"))
    embed_annotations(shared_data / "leaf" / "annotations.json",
                      images_root=shared_data / "leaf", backbone="efficientnet-lite0", out=out)
    return out


TINY_VIT = "vit_base_patch14_reg4_dinov2"


TINY_VIT_KWARGS = {"img_size": 56, "depth": 2, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(scope="session")
def write_leaf_subset(shared_data):
    """Factory: a small real-leaf annotation file and a tiny random DINOv2 checkpoint.

    ``write_leaf_subset(folder, ann_name, genera, per_category, placeholder=False)`` keeps
    the first 8 categories of ``genera`` (the last swapped for a genus-only one when
    ``placeholder`` and none is among them) and the first ``per_category`` images of each,
    writes ``folder/ann_name`` and ``folder/tiny_dinov2.pth`` (seed 0, TINY_VIT_KWARGS),
    and returns {"data": the annotation dict written, "ann": its path, "ckpt": the
    checkpoint path, "kwargs": the model kwargs}.
    """
    import json

    import timm
    import torch

    data = json.loads((shared_data / "leaf" / "annotations.json").read_text())

    def write(folder: Path, ann_name: str, genera: tuple[str, ...], per_category: int,
              placeholder: bool = False):
        cats = [c for c in data["categories"] if c["genus"] in genera][:8]
        if placeholder and not any(c["species"] == "" for c in cats):
            cats[-1] = next(c for c in data["categories"] if c["species"] == "")
        keep = {c["category_id"] for c in cats}
        anns, per = [], {}
        for a in data["annotations"]:
            if a["category_id"] in keep and per.get(a["category_id"], 0) < per_category:
                per[a["category_id"]] = per.get(a["category_id"], 0) + 1
                anns.append(a)
        ids = {a["image_id"] for a in anns}
        small = dict(data, annotations=anns, categories=cats,
                     images=[im for im in data["images"] if im["image_id"] in ids])
        ann_path = folder / ann_name
        ann_path.write_text(json.dumps(small))
        torch.manual_seed(0)
        model = timm.create_model(TINY_VIT, pretrained=False, num_classes=0, **TINY_VIT_KWARGS)
        ckpt = folder / "tiny_dinov2.pth"
        torch.save(model.state_dict(), ckpt)
        return {"data": small, "ann": ann_path, "ckpt": ckpt, "kwargs": dict(TINY_VIT_KWARGS)}

    return write


@pytest.fixture(scope="session")
def small_leaf(shared_data, tmp_path_factory, write_leaf_subset):
    """Annotations for 5 images of each of 8 species (one of them genus-only) + a checkpoint."""
    tmp = tmp_path_factory.mktemp("wf")
    sub = write_leaf_subset(tmp, "annotations.json",
                            ("Acer", "Quercus", "Philadelphus", "Alnus"), 5, placeholder=True)
    return {"dir": tmp, "ann": sub["ann"], "root": shared_data / "leaf", "ckpt": sub["ckpt"],
            "kwargs": sub["kwargs"], "n": len(sub["data"]["images"]),
            "categories": sub["data"]["categories"], "arch": TINY_VIT}


@pytest.fixture(scope="session")
def make_tile_classifier():
    """Factory: a tiny DINOv2-shaped backbone (random weights) and a rank head trained a
    few steps on random embeddings, wrapped as a BundleTileClassifier."""
    def build(tax, *, n: int, steps: int, batch_size: int, random_labels: bool):
        import torch

        from taxoclass.bundle import ModelBundle
        from taxoclass.features.backbones import create_backbone
        from taxoclass.model.heads import MultiRankHead
        from taxoclass.plots.tiling import BundleTileClassifier

        torch.manual_seed(0)
        kwargs = dict(img_size=56, depth=2, embed_dim=64, num_heads=2)
        backbone = create_backbone(TINY_VIT, pretrained=False, model_kwargs=kwargs)
        head = MultiRankHead.for_taxonomy(tax, 64)
        x = torch.nn.functional.normalize(torch.randn(n, 64), dim=1)
        n_species = tax.n_classes("species")
        leaf = (torch.randint(0, n_species, (n,)) if random_labels
                else torch.arange(n) % n_species)
        targets = {r: torch.as_tensor(tax.parent_index("species", r))[leaf]
                   for r in ("family", "genus")}
        targets["species"] = leaf
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(steps):
            out = head(x)
            loss = sum(torch.nn.functional.cross_entropy(out[r], targets[r])
                       for r in tax.ranks)
            opt.zero_grad()
            loss.backward()
            opt.step()
        bundle = ModelBundle(head=head.eval(), taxonomy=tax,
                             backbone={"name": backbone.name, "pretrained": False,
                                       "model_kwargs": kwargs})
        return BundleTileClassifier(bundle, backbone, batch_size=batch_size)
    return build


# ------------------------------------------------- tiny shipped fixtures (no ../shared needed)
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_model_kwargs() -> dict:
    """timm kwargs of the shipped tiny checkpoint (tests/fixtures/train.yaml's model_kwargs)."""
    import yaml

    return dict(yaml.safe_load((FIXTURES / "train.yaml").read_text())["backbone"]["model_kwargs"])


@pytest.fixture(scope="session")
def fixture_set() -> dict:
    """Paths of the tiny generated fixture set in tests/fixtures (see make_fixtures.py)."""
    return {"dir": FIXTURES, "train": FIXTURES / "annotations.json",
            "test": FIXTURES / "test.json", "images": FIXTURES / "images",
            "unknown": FIXTURES / "images" / "unknown", "plots": FIXTURES / "plots",
            "truth": FIXTURES / "plots_truth.csv", "ckpt": FIXTURES / "tiny_dinov2.pth",
            "config": FIXTURES / "train.yaml", "arch": TINY_VIT,
            "kwargs": fixture_model_kwargs()}


def invoke_cli(*args) -> str:
    """Run ``taxoclass ARGS`` in-process; fail with the output when it does not exit 0."""
    from click.testing import CliRunner

    from taxoclass.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exit_code != 0:
        pytest.fail(f"taxoclass {args[0]} exited {res.exit_code}:\n{res.output}"
                    + (f"\n{res.exception!r}" if res.exception else ""))
    return res.output


@pytest.fixture(scope="session")
def cli():
    """``cli("predict", "--model", ...)``: run taxoclass in-process, return its output; a
    non-zero exit fails the test with the output."""
    return invoke_cli


@pytest.fixture(scope="session")
def fixture_model(fixture_set, tmp_path_factory) -> dict:
    """`taxoclass embed` then `taxoclass train` on the fixture set, once per session.

    Returns {"dir", "emb" (cache folder), "model" (bundle folder), "embed_output",
    "train_output"}; tests read the written files, they must not change them.
    """
    import json

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp("fixture-model")
        f = fixture_set
        emb, model = tmp / "emb", tmp / "model"
        embed_out = invoke_cli("embed", "--annotations", f["train"], "--images-root", f["dir"],
                            "--backbone", f["arch"], "--checkpoint", f["ckpt"],
                            "--model-kwargs", json.dumps(f["kwargs"]), "--batch-size", 16,
                            "--out", emb)
        train_out = invoke_cli("train", "--config", f["config"], "--set", f"out={model}",
                            "--set", f"embeddings.cache={emb}")
    finally:
        torch.set_num_threads(before)
    return {"dir": tmp, "emb": emb, "model": model, "embed_output": embed_out,
            "train_output": train_out}
