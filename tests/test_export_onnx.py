"""`taxoclass export --format onnx`: one ONNX graph + model.json + a runner that needs only
onnxruntime, numpy and Pillow, and answers as `taxoclass predict` does.

Tolerances (stated in docs/edge.md and BENCHMARKS.md): onnxruntime vs PyTorch, max abs
difference below 1e-4 on logits and probabilities and below 1e-3 on the outlier z-score;
preprocessing identical (difference 0); taxon, rank and reason identical per image.
The fixture model's backbone is a tiny random DINOv2-shaped ViT (the DINOv2 path); the
real-data test uses the offline EfficientNet-Lite0 at 384 px letterbox on leaf images.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]
TOL_LOGITS = 1e-4
TOL_OUTLIER = 1e-3
DECISION = ["taxon_rank", "taxon", "reason"]

#: Imports of torch/taxoclass (and their heavy friends) raise inside the runner's process.
BLOCKER = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'taxoclass', 'timm', 'torchvision', 'pandas'):
            raise ImportError('blocked in this test: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
mods = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'taxoclass'))
assert not mods, mods
"""


def doc_command() -> list[str]:
    """The runner command docs/edge.md shows, as an argument list."""
    text = (ROOT / "docs" / "edge.md").read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("python taxoclass_onnx_predict"))
    return line.split()


def run_doc_command(folder: Path, photos: Path, *, isolated: bool = False) -> list[dict]:
    """docs/edge.md's command in ``folder`` with ``photos/`` replaced by ``photos``; with
    ``isolated`` under ``python -I`` with imports of torch and taxoclass blocked."""
    args = [str(photos) if a == "photos/" else a for a in doc_command()]
    assert args[0] == "python" and "photos/" in doc_command()
    cmd = ([sys.executable, "-I", "-c", BLOCKER, *args[1:]] if isolated
           else [sys.executable, *args[1:]])
    out = folder / "predictions.csv"
    out.unlink(missing_ok=True)
    res = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def torch_vs_onnx(bundle, edge, paths) -> dict[str, float]:
    """Max abs difference per output: the exported graph in PyTorch (taxoclass's own
    preprocessing) vs onnxruntime (the runner's preprocessing, which must be identical)."""
    import torch

    from taxoclass.io.images import load_transformed
    from taxoclass.pipelines.export import EdgeGraph

    backbone = bundle.create_backbone()
    x_torch = torch.stack([load_transformed(p, backbone.transform) for p in paths])
    x_edge = np.stack([edge.load(p) for p in paths])
    graph = EdgeGraph(backbone.model, bundle).eval()
    with torch.inference_mode():
        expected = dict(zip(graph.output_names, (t.numpy() for t in graph(x_torch))))
    got = edge.run(x_edge)
    diffs = {k: float(np.abs(expected[k].astype(np.float64) - got[k]).max()) for k in got}
    diffs["preprocessing"] = float(np.abs(x_torch.numpy() - x_edge).max())
    return diffs


def assert_close(diffs: dict[str, float]) -> None:
    assert diffs.pop("preprocessing") == 0.0
    for name, d in diffs.items():
        assert d < (TOL_OUTLIER if name == "outlier_score" else TOL_LOGITS), (name, d)


def assert_same_answers(rows: list[dict], frame) -> None:
    """Runner rows (dicts or CSV rows) answer as taxoclass's rows: same image order, same
    taxon/rank/reason; confidence within 1e-4; score within one ECDF step. Rows are
    matched by image (predict lists failed files first)."""
    theirs = {Path(str(p)).name: t for p, (_, t) in zip(frame["image"], frame.iterrows())}
    assert sorted(Path(str(r["image"])).name for r in rows) == sorted(theirs)
    for r in rows:
        t = theirs[Path(str(r["image"])).name]
        for c in DECISION:
            assert _text(r.get(c)) == _text(t[c]), (r["image"], c, r.get(c), t[c])
        if t["reason"] == "failed":
            continue
        conf = float(r["confidence"]) if str(r["confidence"]) != "" else np.nan
        assert np.isnan(conf) == np.isnan(t["confidence"])
        if not np.isnan(conf):
            assert abs(conf - t["confidence"]) < 1e-4
        if not np.isnan(t["score"]):
            assert abs(float(r["score"]) - t["score"]) <= 1 / 200


def _text(value) -> str:
    """A cell as text; empty for NaN / None (a CSV's empty cell)."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


# ---------------------------------------------------------------------- fixture model
@pytest.fixture(scope="module")
def exported(fixture_model, tmp_path_factory):
    from taxoclass import export_onnx

    out = tmp_path_factory.mktemp("edge") / "edge" / "model.onnx"
    res = export_onnx(fixture_model["model"], out)
    return {"res": res, "dir": out.parent, "model": fixture_model["model"]}


@pytest.fixture(scope="module")
def photos(fixture_set, tmp_path_factory) -> Path:
    """Fixture images (known test images, unknown species) and one unreadable file."""
    folder = tmp_path_factory.mktemp("photos")
    for p in sorted((fixture_set["images"] / "test").glob("*.jpg"))[:6]:
        shutil.copy(p, folder / p.name)
    for p in sorted(fixture_set["unknown"].glob("*.jpg")):
        shutil.copy(p, folder / f"u_{p.name}")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


def test_export_writes_graph_json_and_runner(exported, fixture_model):
    res = exported["res"]
    assert {p.name for p in exported["dir"].iterdir()} == {
        "model.onnx", "model.json", "taxoclass_onnx_predict.py"}
    meta = json.loads(res.meta.read_text())
    ranks = meta["taxonomy"]["ranks"]
    assert res.outputs == ([f"logits_{r}" for r in ranks] + [f"probs_{r}" for r in ranks]
                           + ["outlier_score"])
    pre = meta["preprocessing"]
    assert pre["image_size"] == [56, 56] and pre["input"]["layout"] == "NCHW"
    assert [s["op"] for s in pre["steps"]][-2:] == ["to_tensor", "normalize"]
    bundle = json.loads((fixture_model["model"] / "openset.json").read_text())
    assert meta["openset"]["thresholds"] == bundle["thresholds"]["thresholds"]
    assert set(meta["confidence"]) == set(ranks)
    assert meta["version"] and len(meta["model_id"]) == 16
    # checked on a random batch at export time, all outputs within tolerance
    assert set(res.max_abs_diff) == set(res.outputs)
    assert all(v < (TOL_OUTLIER if k == "outlier_score" else TOL_LOGITS)
               for k, v in res.max_abs_diff.items()), res.max_abs_diff


def test_dynamic_batch_and_pytorch_agreement(exported, photos):
    from taxoclass.bundle import ModelBundle
    from taxoclass.pipelines.edge_runner import EdgeModel

    edge = EdgeModel(exported["res"].onnx, threads=1)
    paths = sorted(p for p in photos.glob("*.jpg") if p.name != "broken.jpg")
    assert_close(torch_vs_onnx(ModelBundle.load(exported["model"]), edge, paths))
    one = edge.run(np.stack([edge.load(paths[0])]))
    many = edge.run(np.stack([edge.load(p) for p in paths]))
    assert len(many["probs_species"]) == len(paths)  # any batch size, one graph
    assert np.abs(one["logits_species"][0] - many["logits_species"][0]).max() < TOL_LOGITS


def test_runner_as_documented_answers_like_predict_without_torch(exported, photos, cli,
                                                                 tmp_path):
    import pandas as pd

    cli("predict", "--model", exported["model"], photos, "--out", tmp_path / "pred")
    frame = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    failures = pd.read_csv(tmp_path / "pred" / "failures.csv")
    rows = run_doc_command(exported["dir"], photos)
    assert list(rows[0]) == list(frame.columns)  # predict's columns, in order (with error)
    assert_same_answers(rows, frame)
    bad = [r for r in rows if r["reason"] == "failed"]
    assert [Path(r["image"]).name for r in bad] == ["broken.jpg"] and bad[0]["error"]
    assert list(failures["image"].map(lambda p: Path(p).name)) == ["broken.jpg"]
    assert "species" in {r["reason"] for r in rows}
    # the same command under `python -I` with torch and taxoclass imports blocked
    assert run_doc_command(exported["dir"], photos, isolated=True) == rows


def test_runner_backs_off_with_the_exported_thresholds(exported, photos, tmp_path):
    """Thresholds edited in model.json are the ones the runner uses: a species threshold
    above every evidence backs every image off, exactly as taxoclass does with it."""
    from taxoclass import TaxonClassifier
    from taxoclass.bundle import ModelBundle
    from taxoclass.pipelines.edge_runner import EdgeModel

    folder = tmp_path / "edge"
    shutil.copytree(exported["dir"], folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["openset"]["thresholds"]["species"] = 2.0
    (folder / "model.json").write_text(json.dumps(meta))
    paths = sorted(p for p in photos.glob("*.jpg") if p.name != "broken.jpg")
    rows = EdgeModel(folder / "model.onnx").predict(paths)
    bundle = ModelBundle.load(exported["model"])
    bundle.scorer.thresholds.thresholds["species"] = 2.0
    frame = TaxonClassifier(bundle, device="cpu").predict(paths)
    assert_same_answers(rows, frame)
    assert all(re.match(r"(backoff_to_\w+|unknown):(low_confidence|outlier)$", r["reason"])
               for r in rows)
    assert any(r["reason"].startswith("backoff_to_genus") for r in rows)


def test_bundle_without_openset_answers_at_the_lowest_rank(fixture_model, photos, tmp_path):
    """No open-set scorer: no outlier output, every answer the best path's lowest rank
    (taxoclass's behaviour), confidence still calibrated."""
    from taxoclass import TaxonClassifier, export_onnx
    from taxoclass.bundle import ModelBundle
    from taxoclass.pipelines.edge_runner import EdgeModel

    bundle = ModelBundle.load(fixture_model["model"])
    bundle.scorer = None
    res = export_onnx(bundle, tmp_path / "plain.onnx", check=False)
    assert "outlier_score" not in res.outputs
    assert json.loads(res.meta.read_text())["openset"] is None
    paths = sorted(p for p in photos.glob("*.jpg") if p.name != "broken.jpg")
    rows = EdgeModel(res.onnx).predict(paths)
    assert_same_answers(rows, TaxonClassifier(bundle, device="cpu").predict(paths))
    assert {r["reason"] for r in rows} == {"species"} and "outlier_score" not in rows[0]


def test_export_errors(exported, fixture_model, cli, tmp_path):
    from click.testing import CliRunner

    from taxoclass.bundle import ModelBundle
    from taxoclass.cli import main
    from taxoclass.errors import BundleError, ConfigError
    from taxoclass.openset.detectors import OutlierDetector
    from taxoclass.pipelines.edge_runner import EdgeModel, ExportedModelError
    from taxoclass.pipelines.export import export_model, export_onnx

    with pytest.raises(ConfigError, match="format 'tflite' is not supported"):
        export_model(fixture_model["model"], tmp_path / "m.onnx", format="tflite")
    res = CliRunner().invoke(main, ["export", "--model", str(fixture_model["model"]),
                                    "--format", "tflite", "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2 and "Invalid value for '--format': 'tflite'" in res.output
    with pytest.raises(ConfigError, match="ending in .onnx"):
        export_onnx(fixture_model["model"], tmp_path / "m.txt")
    bundle = ModelBundle.load(fixture_model["model"])
    bundle.scorer.detector = OutlierDetector("knn").fit(np.random.default_rng(0).normal(
        size=(20, 64)))
    with pytest.raises(BundleError, match="cannot be exported.*'knn'.*mahalanobis"):
        export_onnx(bundle, tmp_path / "knn.onnx")
    assert not (tmp_path / "knn.onnx").exists()
    # a model.onnx from another export (or damaged) is refused by the runner
    folder = tmp_path / "mixed"
    shutil.copytree(exported["dir"], folder)
    with open(folder / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ExportedModelError, match="does not belong to model.json"):
        EdgeModel(folder / "model.onnx")


# ---------------------------------------------------------------------- real leaf images
@pytest.mark.slow
def test_real_leaf_lite0_export_matches_pytorch_and_predict(shared_data, cli, tmp_path):
    """A small EfficientNet-Lite0 (384 px letterbox) model on 8 leaf species, exported;
    onnxruntime vs PyTorch and runner vs taxoclass on unseen images of the 8 species, of
    12 other oak and maple species and of 4 other genera (back-off expected there)."""
    import pandas as pd

    from taxoclass import TaxonClassifier
    from taxoclass.bundle import ModelBundle
    from taxoclass.pipelines.edge_runner import EdgeModel

    data = json.loads((shared_data / "leaf" / "annotations.json").read_text())
    by_cat: dict[int, list[int]] = {}
    for a in data["annotations"]:
        by_cat.setdefault(a["category_id"], []).append(a["image_id"])
    cats = {g: [c for c in data["categories"] if c["genus"] == g] for g in ("Quercus", "Acer")}
    known = cats["Quercus"][:4] + cats["Acer"][:4]
    unseen = cats["Quercus"][4:10] + cats["Acer"][4:10]
    others = [c for c in data["categories"]
              if c["genus"] in ("Alnus", "Cornus", "Populus", "Betula")][:4]
    train_ids = {i for c in known for i in by_cat[c["category_id"]][:7]}
    test_ids = ([by_cat[c["category_id"]][7] for c in known]
                + [by_cat[c["category_id"]][0] for c in unseen + others])
    keep = {c["category_id"] for c in known}
    small = dict(data, categories=known,
                 annotations=[a for a in data["annotations"] if a["image_id"] in train_ids],
                 images=[im for im in data["images"] if im["image_id"] in train_ids])
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(small))
    assert len(small["images"]) == 56 and all(a["category_id"] in keep
                                              for a in small["annotations"])
    root = shared_data / "leaf"
    cli("embed", "--annotations", ann, "--images-root", root, "--backbone", "efficientnet-lite0",
        "--image-size", 384, "--resize", "letterbox", "--out", tmp_path / "emb")
    cli("train", "--config", ROOT / "configs" / "leaf.yaml", "--set", f"data.annotations={ann}",
        "--set", f"data.images_root={root}", "--set", f"embeddings.cache={tmp_path / 'emb'}",
        "--set", "train.epochs=150", "--set", f"out={tmp_path / 'model'}")
    cli("export", "--model", tmp_path / "model", "--format", "onnx",
        "--out", tmp_path / "edge" / "model.onnx")

    files = {im["image_id"]: root / im["file_name"] for im in data["images"]}
    paths = [files[i] for i in test_ids]
    edge = EdgeModel(tmp_path / "edge" / "model.onnx")
    bundle = ModelBundle.load(tmp_path / "model")
    diffs = torch_vs_onnx(bundle, edge, paths)
    assert_close(diffs)
    frame = TaxonClassifier(bundle, device="cpu").predict(paths)
    rows = edge.predict(paths)
    assert_same_answers(rows, frame)
    reasons = pd.Series([r["reason"] for r in rows])
    assert (reasons.iloc[:8] == "species").sum() >= 6  # unseen images of known species
    assert (reasons != "species").sum() >= 3, reasons.tolist()  # back-off happened
