"""Config loading and the thin CLI (validate, taxonomy, help)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from taxoclass.cli import main
from taxoclass.config import load_config
from taxoclass.errors import ConfigError


def test_config_overrides_and_path_resolution(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  annotations: ann.json\ntrain:\n  epochs: 5\n")
    cfg = load_config(cfg_file, ["train.lr=0.5", "model.hidden=128"])
    assert cfg["train"]["epochs"] == 5 and cfg["train"]["lr"] == 0.5
    assert cfg["model"]["hidden"] == 128
    assert cfg["data"]["annotations"] == str(tmp_path / "ann.json")


def test_config_unknown_key_is_an_error(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  epoks: 5\n")
    with pytest.raises(ConfigError, match="unknown key 'epoks'"):
        load_config(cfg_file)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_cli_validate_clean_and_broken(shared_data, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["validate", str(shared_data / "leaf" / "annotations.json"),
                               "--images-root", str(shared_data / "leaf")])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output and "98 species taxa" in res.output
    data = json.loads((shared_data / "leaf" / "annotations.json").read_text())
    data["annotations"][0]["category_id"] = 12345
    data["annotations"][1]["category_id"] = 54321
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    report = tmp_path / "problems.csv"
    res = runner.invoke(main, ["validate", str(bad), "--report", str(report)])
    assert res.exit_code == 1
    assert "found 12345" in res.output and "found 54321" in res.output
    assert "2 errors" in res.output
    assert len(report.read_text().strip().splitlines()) == 3


def test_cli_broken_json_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{")
    res = CliRunner().invoke(main, ["taxonomy", str(bad)])
    assert res.exit_code == 2
    assert "broken.json: broken JSON" in res.output and "Traceback" not in res.output


def test_cli_taxonomy_counts_and_csv(shared_data, tmp_path):
    out = tmp_path / "tree.csv"
    res = CliRunner().invoke(main, ["taxonomy", str(shared_data / "naflora-mini" / "metadata.json"),
                                    "--csv", str(out)])
    assert res.exit_code == 0, res.output
    assert "species: 1863" in res.output and "family: 162" in res.output
    assert len(out.read_text().splitlines()) == 1 + 1863 + 829 + 162


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, taxoclass.cli; "
            "assert 'torch' not in sys.modules and 'pandas' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_file_system_errors_on_user_paths_are_one_clear_line(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": []}))
    runner = CliRunner()
    res = runner.invoke(main, ["validate", str(ann), "--report", str(tmp_path)])
    assert res.exit_code == 2 and "Is a directory" in res.output, res.output
    assert "Traceback" not in res.output and str(tmp_path) in res.output
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = runner.invoke(main, ["validate", str(ann), "--report", str(blocker / "sub" / "r.csv")])
    assert res.exit_code == 2 and f"{blocker} is a file, not a folder" in res.output


def test_os_errors_that_are_not_about_a_user_path_keep_their_traceback():
    from pathlib import Path

    from taxoclass.cli.app import user_path_error

    inside = Path(__file__).resolve().parents[1] / "taxoclass" / "schemas" / "gone.json"
    assert user_path_error(FileNotFoundError(2, "No such file or directory", str(inside))) is None
    assert user_path_error(OSError(5, "Input/output error")) is None  # no file named
    assert user_path_error(PermissionError(13, "Permission denied", "/data/x.csv")) == (
        "/data/x.csv: Permission denied [PermissionError]. Fix: give yourself permission or "
        "choose another path.")


@pytest.mark.parametrize("args", [
    ["predict", "--model", "m", "x.jpg", "--top-k", "0"],
    ["embed", "--annotations", "a.json", "--out", "o", "--batch-size", "0"],
    ["embed", "--annotations", "a.json", "--out", "o", "--num-workers", "-1"],
    ["train", "--unfreeze-blocks", "-2"],
    ["evaluate", "--model", "m", "--annotations", "a.json", "--holdout-fraction", "1"],
    ["evaluate", "--model", "m", "--annotations", "a.json", "--seed", "-1"],
    ["explain", "--model", "m", "x.jpg", "--out", "o.png", "--head", "-1"],
])
def test_numeric_options_are_range_checked_before_any_work(args):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "Invalid value for" in res.output, res.output


def test_config_files_that_cannot_load_are_clear_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="goes round in a circle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "n.yaml").write_text("extends: 5\n")
    with pytest.raises(ConfigError, match="extends: expected the path"):
        load_config(tmp_path / "n.yaml")
    (tmp_path / "latin.yaml").write_bytes("out: d\xe9j\xe0\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "latin.yaml")
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        load_config(tmp_path)
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.1\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg["train"]["lr"] == 0.1 and cfg["train"]["epochs"] == 3
