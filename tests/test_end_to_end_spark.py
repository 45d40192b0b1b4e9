"""The Spark engine through the CLI on the tiny shipped fixtures (no ../shared).

`embed --engine spark` and `plot-report --engine spark` (local[1]) must give what the
local engine gives. Skipped only when PySpark or Java is missing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings(
    "ignore:PySpark does not yet fully support pandas:FutureWarning")]

MASTER = "local[1]"


@pytest.fixture(scope="module", autouse=True)
def spark_session():
    """Skip without PySpark/Java; stop the session the CLI started once the module is done."""
    pytest.importorskip("pyspark", reason="PySpark is not installed (taxoclass[spark])")
    java_home = os.environ.get("JAVA_HOME")
    if not (Path(java_home, "bin", "java").exists() if java_home else shutil.which("java")):
        pytest.skip("Java is not found (no JAVA_HOME, no java on PATH)")
    from pyspark.sql import SparkSession

    existing = SparkSession.getActiveSession()
    yield
    started = SparkSession.getActiveSession()
    if existing is None and started is not None:
        started.stop()


def test_spark_embed_matches_the_local_cache(fixture_set, fixture_model, cli, tmp_path):
    f = fixture_set
    out = cli("embed", "--annotations", f["train"], "--images-root", f["dir"],
              "--backbone", f["arch"], "--checkpoint", f["ckpt"],
              "--model-kwargs", json.dumps(f["kwargs"]), "--batch-size", 16,
              "--engine", "spark", "--master", MASTER, "--out", tmp_path)
    assert "60 embeddings of dim 64" in out
    rows = pd.read_parquet(tmp_path / "embeddings.parquet")
    assert len(rows) == 60 and rows["image_id"].is_unique
    spark = {str(i): np.asarray(e, dtype=np.float32)
             for i, e in zip(rows["image_id"], rows["embedding"])}
    local_ids = np.load(fixture_model["emb"] / "image_ids.npy", allow_pickle=False)
    local = np.load(fixture_model["emb"] / "embeddings.npy")
    assert sorted(spark) == sorted(str(i) for i in local_ids)
    diff = max(np.abs(spark[str(i)] - x).max() for i, x in zip(local_ids, local))
    assert diff <= 1e-5
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert "--engine" in prov["command"] and prov["backbone"]["checkpoint_sha256"]


def test_spark_plot_report_matches_local(fixture_set, fixture_model, cli, tmp_path):
    args = ("plot-report", "--model", fixture_model["model"], fixture_set["plots"],
            "--grid", 4, "--device", "cpu")
    cli(*args, "--out", tmp_path / "local")
    cli(*args, "--engine", "spark", "--master", MASTER, "--out", tmp_path / "spark")
    local = pd.read_csv(tmp_path / "local" / "plot_records.csv")
    spark = pd.read_csv(tmp_path / "spark" / "plot_records.csv")
    assert len(local) >= 3 and list(spark.columns) == list(local.columns)
    keys = ["plot_id", "taxon_rank", "taxon"]
    assert spark[keys].values.tolist() == local[keys].values.tolist()
    # NaN: the unknown record has no score (PlotRecord), on both engines alike
    assert np.allclose(spark["score"], local["score"], atol=1e-5, equal_nan=True)
    assert spark["score"].isna().tolist() == local["score"].isna().tolist()
    # the bundle's confidence calibration applies to Spark's records too (it did not)
    assert np.allclose(spark["confidence"], local["confidence"], atol=1e-5, equal_nan=True)
    assert (tmp_path / "spark" / "plot_tiles.parquet").exists()  # Spark writes a folder
    # a user-trained model has no PlantCLEF ids: the names file, never the run file
    for name in ("report.html", "plantclef_submission_names.csv", "occurrences_dwc.csv",
                 "occurrences_dwca.zip"):
        assert (tmp_path / "spark" / name).is_file(), name
    assert not (tmp_path / "spark" / "plantclef_submission.csv").exists()
    assert ((tmp_path / "spark" / "plantclef_submission_names.csv").read_text()
            == (tmp_path / "local" / "plantclef_submission_names.csv").read_text())
