"""The Spark engine (local[2]) gives what the local engine gives, on the shipped images.

A tiny DINOv2-shaped ViT whose checkpoint the test saves itself, 20 fixture JPEGs and
one corrupt file. One SparkSession serves the whole module.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from taxoclass.bundle import ModelBundle
from taxoclass.engines import LocalEngine, SparkEngine, backbone_from_spec, get_engine
from taxoclass.errors import CacheError, ConfigError
from taxoclass.features.embeddings import compute_embeddings
from taxoclass.model.heads import MultiRankHead
from taxoclass.taxonomy.tree import Taxonomy

pytestmark = pytest.mark.filterwarnings(
    "ignore:PySpark does not yet fully support pandas:FutureWarning")

ARCH = "vit_base_patch14_reg4_dinov2"
TAX = Taxonomy.from_records([
    {"family": "Sapindaceae", "genus": "Acer", "species": "campestre"},
    {"family": "Sapindaceae", "genus": "Acer", "species": "platanoides"},
    {"family": "Fagaceae", "genus": "Quercus", "species": "robur"},
    {"family": "Betulaceae", "genus": "Alnus", "species": "glutinosa"},
])


@pytest.fixture(scope="module")
def spark():
    from taxoclass.engines.spark import get_spark, spark_available

    reason = spark_available()
    if reason:
        pytest.skip(f"Spark engine unavailable: {reason}")
    session = get_spark("local[2]", app_name="taxoclass-tests",
                        conf={"spark.sql.shuffle.partitions": "2"}, python=sys.executable)
    yield session
    session.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_dino_kwargs_module):
    """20 shipped fixture images + a corrupt one, a tiny checkpoint and a bundle using it."""
    from conftest import FIXTURES

    tmp = tmp_path_factory.mktemp("spark")
    paths = sorted((FIXTURES / "images" / "train").glob("*.jpg"))[:20]
    if len(paths) < 20:
        pytest.skip("fewer than 20 fixture images (rebuild: tests/fixtures/make_fixtures.py)")
    corrupt = tmp / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 8)
    kwargs = tiny_dino_kwargs_module
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **kwargs)
    ckpt = tmp / "tiny_dinov2.pth"
    torch.save(model.state_dict(), ckpt)
    spec = {"name": ARCH, "checkpoint": str(ckpt), "model_kwargs": kwargs}
    head = MultiRankHead.for_taxonomy(TAX, 64)
    bundle = ModelBundle(head=head.eval(), taxonomy=TAX, backbone=dict(spec))
    bundle_dir = bundle.save(tmp / "bundle")
    items = [(p.stem, p) for p in paths[:10]] + [("bad", corrupt)] + [
        (p.stem, p) for p in paths[10:]]
    return {"tmp": tmp, "paths": paths, "corrupt": corrupt, "spec": spec, "items": items,
            "bundle": bundle_dir}


@pytest.fixture(scope="module")
def tiny_dino_kwargs_module() -> dict:
    return dict(img_size=56, depth=2, embed_dim=64, num_heads=2)


def test_embed_matches_local_resumes_and_records_corrupt(spark, data):
    from taxoclass.engines.spark import spark_embed

    items, out = data["items"], data["tmp"] / "emb"
    first = spark_embed(items[:6], data["spec"], out, spark=spark, batch_size=4)
    assert first.n_computed == 6 and first.n_reused == 0
    assert first.cache.embeddings.shape == (6, 64)

    res = spark_embed(items, data["spec"], out, spark=spark, batch_size=4)
    assert res.n_reused == 6 and res.n_computed == len(items) - 6  # done images skipped
    rows = pd.read_parquet(res.parquet)
    assert len(rows) == len(items) and rows["image_id"].is_unique  # nothing embedded twice
    assert rows["embedding"].dropna().map(len).eq(64).all()

    local = compute_embeddings(items, backbone_from_spec(data["spec"]), data["tmp"] / "local",
                               batch_size=4)
    assert res.cache.image_ids.tolist() == local.cache.image_ids.tolist()
    assert "bad" not in res.cache.image_ids.tolist()
    assert np.abs(res.cache.embeddings - local.cache.embeddings).max() <= 1e-5
    assert res.failures["image_id"].tolist() == ["bad"] == local.failures["image_id"].tolist()
    assert "cannot be decoded" in res.failures["error"][0]
    assert res.failures["error"][0] == local.failures["error"][0]
    assert (out / "failures.csv").is_file() and (out / "provenance.json").is_file()

    # a finished run is reused, except the failure, which is tried again (issue 14);
    # another backbone is refused
    again = spark_embed(items, data["spec"], out, spark=spark)
    assert again.n_computed == 1 and again.n_reused == len(items) - 1
    assert again.failures["image_id"].tolist() == ["bad"]
    assert again.cache.embeddings.tobytes() == res.cache.embeddings.tobytes()
    other = dict(data["spec"], checkpoint=None, pretrained=False)
    with pytest.raises(CacheError, match="other settings"):
        spark_embed(items, other, out, spark=spark)


def test_predict_matches_predict_images(spark, data):
    """predict_images runs both engines through get_engine: same rows, same columns."""
    from taxoclass.pipelines.predict import predict_images

    images = [*data["paths"][:12], data["corrupt"]]
    local = predict_images(data["bundle"], images, out=data["tmp"] / "pred_local", batch_size=5)
    out = data["tmp"] / "pred_spark"
    first = predict_images(data["bundle"], images[:5], out=out, batch_size=5, engine="spark")
    assert len(first) == 5
    res = predict_images(data["bundle"], images, out=out, batch_size=5, engine="spark")
    assert list(res.columns) == list(local.columns)
    assert res["image"].tolist() == local["image"].tolist()
    for col in ("taxon_rank", "taxon", "reason", "family", "genus", "species"):
        assert res[col].astype(str).tolist() == local[col].astype(str).tolist(), col
    ok = local["error"].isna()
    assert np.allclose(res.loc[ok, "score"].astype(float), local.loc[ok, "score"], atol=1e-5)
    assert res["error"].notna().tolist() == (~ok).tolist() == [False] * 12 + [True]
    csv = pd.read_csv(out / "predictions.csv")
    assert len(csv) == 13 and (out / "predictions.parquet").is_dir()
    assert pd.read_parquet(out / "predictions.parquet")["image"].is_unique
    prov = json.loads((out / "provenance.json").read_text())["config"]
    assert prov["engine"] == "spark" and prov["n_computed"] == 8  # 5 reused from the first run
    assert prov["images"] == [str(p) for p in images]


def test_plot_report_matches_local(spark, data):
    from taxoclass.pipelines.plots import plot_report_job

    photos = [data["paths"][0], data["corrupt"], data["paths"][1], data["paths"][2]]
    settings = dict(grids=(2, 3), overlap=0.2, rule="max",
                    thresholds={"species": 0.3, "genus": 0.4, "family": 0.5})
    local = plot_report_job(data["bundle"], photos, data["tmp"] / "rep_local", batch_size=8,
                            **settings)
    res = plot_report_job(data["bundle"], photos, data["tmp"] / "rep_spark", batch_size=8,
                          engine="spark", **settings)
    assert list(res.records) == list(local.records)
    a = pd.read_csv(res.files["csv"])
    b = pd.read_csv(local.files["csv"])
    pd.testing.assert_frame_equal(a, b, atol=1e-5)
    assert [f["photo"] for f in res.failures] == [str(data["corrupt"])]
    assert res.files["html"].is_file() and (data["tmp"] / "rep_spark" / "plot_tiles.parquet"
                                            ).is_dir()


def test_get_engine_names_and_options(spark):
    assert isinstance(get_engine("local", num_workers=2), LocalEngine)
    engine = get_engine("spark", master="local[2]", partitions=3)
    assert isinstance(engine, SparkEngine) and engine.partitions == 3
    assert engine.session() is spark  # the active session is reused
    with pytest.raises(ConfigError, match="expected one of local, spark"):
        get_engine("dask")
    with pytest.raises(ConfigError, match="master"):
        get_engine("local", master="local[2]")


def test_plot_report_with_settings_file_matches_local(spark, data):
    """A plot_settings.json sets the executors' grids and overlap and the driver's rule."""
    from taxoclass.pipelines.plots import plot_report_job
    from taxoclass.plots.calibration import calibrate_plots
    from taxoclass.plots.tiling import BundleTileClassifier

    photos = data["paths"][3:7]
    clf = BundleTileClassifier.load(data["bundle"], batch_size=8)
    names = [clf.taxonomy.label(n) for n in clf.taxonomy.nodes("species")]
    truth = {p.stem: names[i % 2:i % 2 + 2] for i, p in enumerate(photos)}
    cal = calibrate_plots(clf, photos, truth, grids=(2, 3), overlap=0.1)
    path = cal.settings.save(data["tmp"] / "cal")
    local = plot_report_job(data["bundle"], photos, data["tmp"] / "rep_set_local",
                            batch_size=8, settings=path, rule="learned")
    res = plot_report_job(data["bundle"], photos, data["tmp"] / "rep_set_spark", batch_size=8,
                          settings=path, rule="learned", engine="spark")
    pd.testing.assert_frame_equal(pd.read_csv(res.files["csv"]),
                                  pd.read_csv(local.files["csv"]), atol=1e-5)
    doc = json.loads(res.files["json"].read_text())
    assert doc["settings"]["grids"] == ["2x2", "3x3"] and doc["settings"]["overlap"] == 0.1
    assert doc["settings"]["rule"] == "learned" and doc["settings"]["settings_file"] == str(path)
    assert doc["plots"][0]["n_tiles"] == 4 + 9


def test_engines_do_not_import_pipelines_and_spark_leaves_process_state(spark):
    """Engines sit below the jobs; creating a session neither sets PYSPARK_PYTHON for good
    nor installs warning filters."""
    import importlib
    import os
    import sys
    import warnings

    from taxoclass.engines import Engine, LocalEngine, SparkEngine
    from taxoclass.engines.spark import get_spark

    assert isinstance(LocalEngine(), Engine) and isinstance(SparkEngine(), Engine)
    before_env = os.environ.get("PYSPARK_PYTHON")
    before_filters = list(warnings.filters)
    assert get_spark("local[2]", python=sys.executable) is spark
    assert os.environ.get("PYSPARK_PYTHON") == before_env
    assert list(warnings.filters) == before_filters
    for mod in ("base", "spark", "spark_predict", "spark_plots"):
        lines = open(importlib.import_module(f"taxoclass.engines.{mod}").__file__).read()
        lines = lines.splitlines() + open(sys.modules["taxoclass.engines"].__file__).readlines()
        imports = [ln for ln in lines if ln.strip().startswith(("from ", "import "))]
        assert not [ln for ln in imports if "pipelines" in ln], mod
