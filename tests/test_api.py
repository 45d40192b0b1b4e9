"""The public Python API: ``taxoclass.__all__``, lazy imports, ``TaxonClassifier`` against
the CLI, and the README's "Python API" example, run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import taxoclass

ROOT = Path(__file__).resolve().parents[1]


def test_import_taxoclass_loads_neither_torch_nor_pandas():
    code = ("import sys, taxoclass; "
            "print(sorted(m for m in ('torch', 'timm', 'pandas', 'pyspark') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_all_public_names_resolve():
    assert 10 <= len(taxoclass.__all__) <= 27  # small: the CLI's verbs and their types
    assert len(set(taxoclass.__all__)) == len(taxoclass.__all__)
    for name in taxoclass.__all__:
        assert getattr(taxoclass, name) is not None, name
    assert set(taxoclass.__all__) <= set(dir(taxoclass))
    for name in ("AnnotationError", "ConfigError", "BundleError", "ImageError"):
        assert issubclass(getattr(taxoclass, name), taxoclass.TaxoclassError)
    assert taxoclass.TaxonClassifier.__module__ == "taxoclass.pipelines.classifier"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        taxoclass.nope  # noqa: B018


def test_cli_calls_the_public_functions():
    """The CLI's jobs are the API's functions, not copies."""
    import taxoclass.cli  # noqa: F401
    from taxoclass.pipelines.plots import calibrate_plots_job, plot_report_job
    from taxoclass.pipelines.predict import predict_images
    from taxoclass.pipelines.train import train_from_config

    assert taxoclass.train is train_from_config and taxoclass.predict is predict_images
    assert taxoclass.plot_report is plot_report_job
    assert taxoclass.calibrate_plots is calibrate_plots_job
    source = "".join(p.read_text() for p in (ROOT / "taxoclass" / "cli").glob("*.py"))
    for module, name in [("pipelines.train", "train_from_config"),
                         ("pipelines.predict", "predict_images"),
                         ("pipelines.plots", "plot_report_job"),
                         ("pipelines.embed", "embed_annotations"),
                         ("pipelines.evaluate", "evaluate_model")]:
        assert f"from ..{module} import {name}" in source, name


def test_classifier_predicts_what_the_cli_predicts(fixture_model, fixture_set, cli, tmp_path):
    from PIL import Image

    images = sorted((fixture_set["images"] / "test").glob("*.jpg"))[:3]
    missing = tmp_path / "missing.jpg"
    out = tmp_path / "pred"
    cli("predict", "--model", fixture_model["model"], *images, "--out", out)
    expected = pd.read_csv(out / "predictions.csv")

    clf = taxoclass.TaxonClassifier.load(fixture_model["model"], device="cpu")
    with Image.open(images[1]) as im:
        in_memory = im.copy()
    got = clf.predict([images[0], in_memory, missing, images[2]])
    assert got["image"].tolist() == [str(images[0]), "<image 1>", str(missing), str(images[2])]
    assert got["error"].notna().tolist() == [False, False, True, False]
    assert "does not exist" in got.loc[2, "error"]
    ok = got.drop(index=2).reset_index(drop=True)
    for col in ("taxon_rank", "taxon", "reason", "family", "genus", "species"):
        assert ok[col].astype(str).tolist() == expected[col].astype(str).tolist(), col
    assert np.allclose(ok["score"].astype(float), expected["score"], atol=1e-5)
    assert [c for c in expected.columns if c != "error"] == [
        c for c in got.columns if c != "error"]
    folder = clf.predict([images[0].parent])  # a folder stands for its images
    assert folder["image"].tolist() == [str(p) for p in sorted(images[0].parent.rglob("*.jpg"))]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(tmp_path):
    code = _readme_example()
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 6
    code = code.replace("tests/fixtures", str(ROOT / "tests" / "fixtures"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "runs" / "api-demo" / "bundle.json").is_file()
    assert re.search(r"(species|genus|family)\s+\S+", res.stdout), res.stdout


def test_partial_python_config_trains_the_cli_model(fixture_set, fixture_model, tmp_path,
                                                     one_thread):
    """One source of defaults: a Python caller who gives only the keys that differ from
    the defaults gets the model `taxoclass train --config` wrote (same metrics, same
    thresholds), because every job completes its config from the typed sections."""
    import json

    import yaml

    import taxoclass

    f = fixture_set
    raw = yaml.safe_load(f["config"].read_text())
    partial = {  # no model / loss / decode / openset / augment / finetune sections at all
        "data": {"annotations": str(f["train"]), "images_root": str(f["dir"]),
                 "val_fraction": raw["data"]["val_fraction"]},
        "backbone": {**raw["backbone"], "checkpoint": str(f["ckpt"])},
        "embeddings": {"cache": str(fixture_model["emb"]), "batch_size": 16},
        "train": raw["train"],
        "out": str(tmp_path / "model"),
    }
    out = taxoclass.train(partial)
    mine = json.loads((out / "metrics_val.json").read_text())
    cli = json.loads((fixture_model["model"] / "metrics_val.json").read_text())
    assert mine["ranks"] == cli["ranks"]
    assert mine["openset_thresholds"] == cli["openset_thresholds"]
