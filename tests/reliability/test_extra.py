"""Cases added with issue 14 (rows 117-128 of cases.py): the issue's own examples and the
kill points of the unit commits, across commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from .conftest import REPO, assert_ok, photo, renames_seen, run, run_killed

TEST_IMAGES = Path(__file__).resolve().parents[1] / "fixtures" / "images" / "test"


def _species(out: Path) -> dict[str, str]:
    frame = pd.read_csv(out / "predictions.csv")
    return {Path(p).name: s for p, s in zip(frame["image"], frame["species"])}


def _two_species_images(folder: Path) -> tuple[Path, Path]:
    """a.jpg (an Acer campestre) and b.jpg (a Quercus) copied from the fixture test set."""
    folder.mkdir(parents=True, exist_ok=True)
    ann = json.loads((TEST_IMAGES.parents[1] / "test.json").read_text())
    by_cat = {a["image_id"]: a["category_id"] for a in ann["annotations"]}
    names = {c["category_id"]: c["scientificName"] for c in ann["categories"]}
    files = {i["image_id"]: i["file_name"] for i in ann["images"]}
    acer = next(i for i, c in by_cat.items() if names[c].startswith("Acer campestre"))
    quercus = next(i for i, c in by_cat.items() if names[c].startswith("Quercus"))
    a, b = folder / "a.jpg", folder / "b.jpg"
    shutil.copyfile(TEST_IMAGES.parents[1] / files[acer], a)
    shutil.copyfile(TEST_IMAGES.parents[1] / files[quercus], b)
    return a, b


@pytest.mark.catalogue(117)
def test_swapped_file_contents_give_swapped_answers(fixture_model, tmp_path):
    a, b = _two_species_images(tmp_path / "img")
    out = tmp_path / "pred"
    assert_ok(run("predict", "--model", fixture_model["model"], a.parent, "--out", out))
    first = _species(out)
    assert first["a.jpg"] != first["b.jpg"]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    assert_ok(run("predict", "--model", fixture_model["model"], a.parent, "--out", out))
    second = _species(out)
    assert second == {"a.jpg": first["b.jpg"], "b.jpg": first["a.jpg"]}


@pytest.mark.catalogue(118)
def test_touched_file_is_reused_not_reembedded(fixture_set, tiny_backbone, tmp_path):
    ann = {"images": [{"image_id": 1, "file_name": "a.jpg"}, {"image_id": 2, "file_name": "b.jpg"}],
           "annotations": [], "categories": []}
    a, _ = _two_species_images(tmp_path)
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    args = ["embed", "--annotations", tmp_path / "ann.json", "--images-root", tmp_path,
            *tiny_backbone, "--out", tmp_path / "emb"]
    assert_ok(run(*args))
    before = np.load(tmp_path / "emb" / "embeddings.npy")
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    out = assert_ok(run(*args))
    assert "0 computed" in out, out
    np.testing.assert_array_equal(np.load(tmp_path / "emb" / "embeddings.npy"), before)


@pytest.mark.catalogue(119)
def test_output_files_follow_the_umask(fixture_model, tmp_path):
    a, _ = _two_species_images(tmp_path / "img")
    old = os.umask(0o022)
    try:
        assert_ok(run("predict", "--model", fixture_model["model"], a, "--out", tmp_path / "p"))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "p").iterdir() if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o755


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "embeddings" not in p.parts and p.suffix != ".parquet"}


def _kill_at_renames(args: list, out: Path, old: dict[str, bytes], new: dict[str, bytes],
                     keep: Path) -> int:
    """Kill ``args`` at the first, a middle and the last rename touching ``out``'s name
    (counted in an uninterrupted run; the last one moves the kept embedding store into the
    stage, just before the folders are exchanged), each from a copy of the old folder; after each
    kill ``out`` holds the old set or the new set of files, never a mix."""
    def fresh() -> None:
        shutil.rmtree(out, ignore_errors=True)
        for orphan in out.parent.glob(f".{out.name}*"):
            shutil.rmtree(orphan, ignore_errors=True) if orphan.is_dir() else orphan.unlink()
        shutil.copytree(keep, out)

    fresh()
    full = run_killed(args, match=out.name, nth=10**9)
    assert full.returncode == 0, full.stderr[-2000:]
    n = renames_seen(full)
    assert n >= 1
    kills = 0
    for nth in sorted({1, (n + 1) // 2, n}):
        fresh()
        res = run_killed(args, match=out.name, nth=nth)
        assert res.returncode == 137, res.stderr[-2000:]
        kills += 1
        now = _snapshot(out) if out.is_dir() else None
        if now is None:  # mid-swap: the old version must be recoverable from a sibling
            assert any(out.parent.glob(f".{out.name}*")), f"kill {nth}: {out} lost"
            continue
        assert _same_text(now, old) or _same_text(now, new), \
            f"kill at rename {nth} of {n}: a mix of old and new files: {sorted(now)}"
    return kills


def _same_text(a: dict[str, bytes], b: dict[str, bytes]) -> bool:
    """Equal apart from provenance.json and the JSON outputs' header (they record the time
    and the command line, whose --out differs between the runs compared)."""
    def strip(files: dict[str, bytes]) -> dict[str, object]:
        return {k: (_without_header(v) if k.endswith(".json") else
                    _without_store_counts(v) if k == "config.yaml" else v)
                for k, v in files.items() if k != "provenance.json"}
    return strip(a) == strip(b)


def _without_store_counts(raw: bytes) -> object:
    """config.yaml without how many vectors the shared store computed or reused (that
    depends on which run embedded the image first, not on the output)."""
    import yaml

    cfg = yaml.safe_load(raw)
    for key in ("n_computed", "n_reused"):
        (cfg.get("embeddings") or {}).pop(key, None)
    return cfg


def _without_header(raw: bytes) -> object:
    doc = json.loads(raw)
    return {k: v for k, v in doc.items() if k != "header"} if isinstance(doc, dict) else doc


@pytest.mark.catalogue(120)
def test_predict_killed_at_each_rename_keeps_a_whole_output(fixture_model, tmp_path):
    a, b = _two_species_images(tmp_path / "img")
    out, keep = tmp_path / "pred", tmp_path / "pred_old"
    assert_ok(run("predict", "--model", fixture_model["model"], a, "--out", keep))
    new_dir = tmp_path / "pred_new"
    assert_ok(run("predict", "--model", fixture_model["model"], b, "--out", new_dir))
    old, new = _snapshot(keep), _snapshot(new_dir)
    args = ["predict", "--model", fixture_model["model"], b, "--out", out]
    assert _kill_at_renames(args, out, old, new, keep) >= 1
    assert_ok(run(*args))
    assert _same_text(_snapshot(out), new)
    assert not [p for p in out.parent.glob(f".{out.name}*")], "orphans left by the kills"


@pytest.mark.catalogue(121)
def test_plot_report_killed_at_each_rename_keeps_a_whole_output(fixture_model, fixture_set,
                                                               tmp_path):
    plots = sorted(Path(fixture_set["plots"]).glob("*.jpg"))
    out, keep, new_dir = tmp_path / "rep", tmp_path / "rep_old", tmp_path / "rep_new"
    base = ["plot-report", "--model", fixture_model["model"], "--grid", "2"]
    assert_ok(run(*base, plots[0], "--out", keep))
    assert_ok(run(*base, plots[1], "--out", new_dir))
    old, new = _snapshot(keep), _snapshot(new_dir)
    args = [*base, plots[1], "--out", out]
    assert _kill_at_renames(args, out, old, new, keep) >= 1
    assert_ok(run(*args))
    assert not [p for p in out.parent.glob(f".{out.name}*")], "orphans left by the kills"


@pytest.mark.catalogue(122, 127)
def test_killed_and_concurrent_train_leave_one_loadable_bundle(fixture_model, fixture_set,
                                                               tmp_path):
    out = tmp_path / "model"
    train = ["train", "--config", fixture_set["config"], "--set", f"out={out}",
             "--set", f"embeddings.cache={fixture_model['emb']}", "--set", "train.epochs=3"]
    res = run_killed(train, match="bundle.json", nth=1)
    assert res.returncode == 137, res.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "taxoclass.cli", *map(str, train)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert any(p.returncode == 0 for p in procs), outputs
    for text in outputs:
        assert "Traceback" not in text, text
    leftovers = [p.name for p in [*out.parent.iterdir(), *out.iterdir()]
                 if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    a, _ = _two_species_images(tmp_path / "img")
    assert_ok(run("predict", "--model", out, a))


@pytest.mark.catalogue(123)
def test_exif_orientation_is_applied(tmp_path):
    from taxoclass.io.images import load_image

    img = photo((40, 20), seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "tagged.png", exif=exif)
    loaded = load_image(tmp_path / "tagged.png")
    assert loaded.size == (20, 40)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(img.transpose(Image.ROTATE_270)))


@pytest.mark.catalogue(124)
def test_skipped_files_in_a_folder_are_named(fixture_model, tmp_path):
    a, _ = _two_species_images(tmp_path / "img")
    frames = [photo((40, 30), seed=4).convert("P"), photo((40, 30), seed=5).convert("P")]
    frames[0].save(tmp_path / "img" / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "img" / "readme.txt").write_text("field notes")
    out = assert_ok(run("predict", "--model", fixture_model["model"], a.parent))
    assert "anim.gif" in out, out  # a row of its own, or named as skipped
    assert "readme.txt" in out, out  # not an image: named as skipped, never silently


@pytest.mark.catalogue(125)
def test_calibrate_plots_with_a_bad_photo_finishes(fixture_model, fixture_set, tmp_path):
    plots = tmp_path / "plots"
    shutil.copytree(fixture_set["plots"], plots)
    (plots / "plot_4.jpg").write_text("not a photo")
    truth = pd.read_csv(fixture_set["truth"])
    truth = pd.concat([truth, pd.DataFrame({"plot_id": ["plot_4"], "species": ["Acer campestre"]})])
    truth.to_csv(tmp_path / "truth.csv", index=False)
    out = tmp_path / "cal"
    res = run("calibrate-plots", "--model", fixture_model["model"], plots, "--truth",
              tmp_path / "truth.csv", "--out", out, "--grid", "2")
    assert_ok(res)
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures.iloc[:, 0].astype(str).str.contains("plot_4")) == [True]
    assert (out / "plot_settings.json").is_file()


@pytest.mark.catalogue(126)
def test_evaluate_counts_and_names_missing_images(fixture_model, fixture_set, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(Path(fixture_set["dir"]) / "images" / "test", root / "images" / "test")
    gone = sorted((root / "images" / "test").glob("*.jpg"))[:2]
    for p in gone:
        p.unlink()
    res = assert_ok(run("evaluate", "--model", fixture_model["model"], "--annotations",
                        fixture_set["test"], "--images-root", root, "--out", tmp_path / "ev"))
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    n_all = len(json.loads(Path(fixture_set["test"]).read_text())["images"])
    assert metrics["n_images"] == n_all - 2
    assert "2" in res and (gone[0].name in res or "failures.csv" in res), res


@pytest.mark.catalogue(128)
def test_embed_killed_at_the_consolidated_rename_resumes_identically(fixture_set, tiny_backbone,
                                                                    tmp_path):
    args = ["embed", "--annotations", fixture_set["test"], "--images-root", fixture_set["dir"],
            *tiny_backbone, "--batch-size", 8]
    assert_ok(run(*args, "--out", tmp_path / "ref"))
    res = run_killed([*args, "--out", tmp_path / "emb"], match="embeddings.npy", nth=1)
    assert res.returncode == 137, res.stderr[-2000:]
    assert_ok(run(*args, "--out", tmp_path / "emb"))
    for name in ("embeddings.npy", "image_ids.npy"):
        assert (tmp_path / "emb" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
