"""The embedding store and evaluate (catalogue rows 42-49, 57-60, 76, 95, 107-114 and the
"existing cache" part of rows 12, 17, 21).

Decisions these tests pin (taxoclass.features.store / embeddings, pipelines.evaluate):
- a vector is found by the sha256 of the image's bytes and the backbone identity, never by
  image id or path: changed files are embedded again, identical bytes share a vector;
- failed images are never stored: they are tried again on every run;
- other backbones / preprocessing settings live side by side in one store;
- a damaged manifest, vector file or embeddings.npy is recomputed or rewritten (a warning),
  a complete read-only cache is reused without a write;
- evaluate embeds the files it is given; ``--split auto`` leaves out the training images,
  recognised by content.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from .conftest import REPO, assert_clear_error, assert_ok, run, run_killed

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- helpers
def _embed_args(f: dict, backbone: list[str], out: Path, *extra) -> list:
    return ["embed", "--annotations", f["train"], "--images-root", f["dir"], *backbone,
            "--batch-size", 4, "--out", out, *extra]


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def _npy(out: Path) -> tuple[bytes, bytes]:
    return (out / "embeddings.npy").read_bytes(), (out / "image_ids.npy").read_bytes()


def _chattr(path: Path, flag: str) -> bool:
    res = subprocess.run(["chattr", "-R", flag, str(path)], capture_output=True)
    return res.returncode == 0


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a backbone is built (checks that come before the model loads)."""
    import taxoclass.features.backbones as backbones

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(backbones, "create_backbone", refuse)


@pytest.fixture(scope="module")
def trained(fixture_set, tmp_path_factory) -> dict:
    """A model of this module's own (embed + train in-process): evaluate and predict
    write into its training store, which the session's fixture_model must not see."""
    from tests.conftest import invoke_cli

    f, tmp = fixture_set, tmp_path_factory.mktemp("trained")
    invoke_cli(*_embed_args(f, ["--backbone", f["arch"], "--checkpoint", str(f["ckpt"]),
                                "--model-kwargs", json.dumps(f["kwargs"])], tmp / "emb"))
    invoke_cli("train", "--config", f["config"], "--set", f"out={tmp / 'model'}",
               "--set", f"embeddings.cache={tmp / 'emb'}")
    return {"model": tmp / "model", "emb": tmp / "emb"}


@pytest.fixture(scope="module")
def reference(fixture_set, tmp_path_factory) -> Path:
    """An uninterrupted `embed` of the 60 fixture images (in-process, one thread)."""
    import torch

    from tests.conftest import invoke_cli

    f = fixture_set
    out = tmp_path_factory.mktemp("ref") / "emb"
    backbone = ["--backbone", f["arch"], "--checkpoint", str(f["ckpt"]),
                "--model-kwargs", json.dumps(f["kwargs"])]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        invoke_cli(*_embed_args(f, backbone, out))
    finally:
        torch.set_num_threads(before)
    return out


# ---------------------------------------------------------------------------- kills, signals
@pytest.mark.catalogue(42)
def test_kill_mid_run_then_rerun_is_byte_identical(fixture_set, tiny_backbone, reference,
                                                   tmp_path):
    out = tmp_path / "emb"
    killed = run_killed(_embed_args(fixture_set, tiny_backbone, out), match="vectors")
    assert killed.returncode == 137, killed.stderr
    assert not (out / "embeddings.npy").exists()
    assert not list((out / "store").glob("*/vectors/*.npz"))
    again = assert_ok(run(*_embed_args(fixture_set, tiny_backbone, out)))
    assert "60 computed" in again and not _tmp_files(out)  # the orphan is removed
    assert _npy(out) == _npy(reference)


class _Killed(BaseException):
    """Stands for SIGKILL in-process: raised at a rename, caught by nothing of ours."""


def _chunked(out: Path, f: dict, backbone, *, kill_at: int | None = None, monkeypatch=None):
    from taxoclass.features.embeddings import compute_embeddings
    from taxoclass.taxonomy.annotations import load_annotations

    if kill_at is not None:
        real, seen = os.replace, [0]

        def replace(src, dst, *a, **k):
            if "/vectors/" in os.fspath(dst):
                seen[0] += 1
                if seen[0] == kill_at:
                    raise _Killed
            return real(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)
    items = load_annotations(f["train"], check=False).image_items(f["dir"])
    try:
        return compute_embeddings(items, backbone, out, batch_size=4, chunk_size=16)
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()


@pytest.fixture
def api_backbone(fixture_set):
    from taxoclass.features.backbones import create_backbone

    f = fixture_set
    return create_backbone(f["arch"], checkpoint=f["ckpt"], pretrained=False,
                           model_kwargs=f["kwargs"])


@pytest.mark.catalogue(43)
def test_kill_after_first_chunk_resumes_the_rest_byte_identical(fixture_set, api_backbone,
                                                                tmp_path, monkeypatch):
    full = _chunked(tmp_path / "full", fixture_set, api_backbone)
    part = tmp_path / "part"
    with pytest.raises(_Killed):  # while chunk 2 of 4 is stored
        _chunked(part, fixture_set, api_backbone, kill_at=2, monkeypatch=monkeypatch)
    assert len(list((part / "store").glob("*/vectors/*.npz"))) == 1
    resumed = _chunked(part, fixture_set, api_backbone)
    assert (resumed.n_computed, resumed.n_reused) == (44, 16)
    assert _npy(part) == _npy(tmp_path / "full") and not _tmp_files(part)
    assert resumed.cache.embeddings.tobytes() == full.cache.embeddings.tobytes()


_SIGINT_SCRIPT = textwrap.dedent(r"""
    import os, signal, sys
    # a job started in the background inherits SIGINT ignored; a terminal's Ctrl-C is not
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real = os.replace
    def replace(src, dst, *a, **k):
        if "/vectors/" in os.fspath(dst):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while a chunk is being stored
        return real(src, dst, *a, **k)
    os.replace = replace
    from taxoclass.cli import main
    main(sys.argv[1:], prog_name="taxoclass")
""")


@pytest.mark.catalogue(44)
def test_ctrl_c_aborts_cleanly_and_the_rerun_finishes(fixture_set, tiny_backbone, tmp_path):
    out = tmp_path / "emb"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", _SIGINT_SCRIPT,
                          *map(str, _embed_args(fixture_set, tiny_backbone, out))],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Aborted!" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not _tmp_files(out)
    assert not (out / "embeddings.npy").exists()
    assert_ok(run(*_embed_args(fixture_set, tiny_backbone, out)))
    assert len(np.load(out / "image_ids.npy")) == 60


@pytest.mark.catalogue(45, 46)
def test_concurrent_runs_on_one_store(fixture_set, api_backbone, reference, tmp_path):
    """Two runs with the same settings and one with other preprocessing, at once (threads:
    each run opens the lock file itself, so flock serialises them as it does processes)."""
    import threading

    from taxoclass.features.backbones import create_backbone, preprocess_overrides
    from taxoclass.features.embeddings import compute_embeddings, load_embeddings
    from taxoclass.taxonomy.annotations import load_annotations

    f, out = fixture_set, tmp_path / "emb"
    letterbox = create_backbone(f["arch"], checkpoint=f["ckpt"], pretrained=False,
                                model_kwargs=f["kwargs"],
                                data_overrides=preprocess_overrides(resize="letterbox"))
    items = load_annotations(f["train"], check=False).image_items(f["dir"])
    results: dict[str, object] = {}

    def embed(name, backbone):
        try:
            results[name] = compute_embeddings(items, backbone, out, batch_size=4)
        except BaseException as exc:  # reported by the assertion below
            results[name] = exc

    threads = [threading.Thread(target=embed, args=(n, b)) for n, b in
               (("a", api_backbone), ("b", api_backbone), ("letterbox", letterbox))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    counts = {n: (r.n_computed, r.n_reused) for n, r in results.items()}  # fails on an error
    # one same-settings run waited for the other and reused its vectors: no double work
    assert sorted([counts["a"], counts["b"]]) == [(0, 60), (60, 0)]
    assert counts["letterbox"] == (60, 0)
    assert len([p for p in (out / "store").iterdir() if p.is_dir()]) == 2  # side by side
    assert len(list((out / "store").glob("*/vectors/*.npz"))) == 2
    cache = load_embeddings(out)  # the files of the run that finished last, consistent
    assert cache.manifest["complete"] and len(cache) == 60
    again = compute_embeddings(items, api_backbone, out, batch_size=4)
    assert (again.n_computed, again.n_reused) == (0, 60)
    assert _npy(out) == _npy(reference)


# ---------------------------------------------------------------------------- --out checks
@pytest.mark.catalogue(47)
def test_out_is_a_file_is_refused_before_the_model_loads(fixture_set, tiny_backbone, tmp_path,
                                                         no_model_load):
    out = tmp_path / "outfile"
    out.write_text("keep me")
    assert_clear_error(run(*_embed_args(fixture_set, tiny_backbone, out)), str(out),
                       "existing file", "folder")
    assert out.read_text() == "keep me"


@pytest.mark.catalogue(48)
def test_unwritable_out_is_refused_before_the_model_loads(fixture_set, tiny_backbone, tmp_path,
                                                          no_model_load):
    out = tmp_path / "ro_out"
    out.mkdir()
    if not _chattr(out, "+i"):
        pytest.skip("chattr +i is not available here")
    try:
        assert_clear_error(run(*_embed_args(fixture_set, tiny_backbone, out)), str(out),
                           "cannot be written", "writable folder")
    finally:
        _chattr(out, "-i")


@pytest.mark.catalogue(49)
def test_complete_cache_in_a_read_only_folder_is_reused_without_a_write(
        fixture_set, tiny_backbone, reference, tmp_path):
    out = shutil.copytree(reference, tmp_path / "ro_cache")
    assert_ok(run(*_embed_args(fixture_set, tiny_backbone, out)))  # indexes the copy's paths
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    if not _chattr(out, "+i"):
        pytest.skip("chattr +i is not available here")
    try:
        res = run(*_embed_args(fixture_set, tiny_backbone, out))
    finally:
        _chattr(out, "-i")
    assert "0 computed, 60 reused" in assert_ok(res)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert _npy(out) == _npy(reference)


# ---------------------------------------------------------------------------- stale / damaged
@pytest.mark.catalogue(57)
def test_other_pixels_under_the_same_ids_are_embedded_again(fixture_set, tiny_backbone,
                                                           reference, tmp_path):
    swap = tmp_path / "swap"
    shutil.copytree(fixture_set["images"], swap / "images")
    for p in (swap / "images" / "train").glob("*.jpg"):
        Image.open(p).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(p)
    out = shutil.copytree(reference, tmp_path / "stale")
    args = _embed_args(fixture_set, tiny_backbone, out)
    args[args.index("--images-root") + 1] = swap
    assert "60 computed, 0 reused" in assert_ok(run(*args))
    new = np.load(out / "embeddings.npy")
    old = np.load(reference / "embeddings.npy")
    assert new.shape == old.shape and not np.allclose(new, old)
    # back to the first root: its vectors are still stored
    assert "0 computed, 60 reused" in assert_ok(run(*_embed_args(fixture_set, tiny_backbone,
                                                                 out)))
    assert _npy(out) == _npy(reference)


@pytest.mark.catalogue(58)
def test_corrupt_manifest_is_rewritten_and_overwrite_starts_over(fixture_set, tiny_backbone,
                                                                 reference, tmp_path):
    out = shutil.copytree(reference, tmp_path / "corrupt_manifest")
    (out / "manifest.json").write_text('{"format_version": 2, "plan": ')
    output = assert_ok(run(*_embed_args(fixture_set, tiny_backbone, out)))
    assert "manifest.json is unreadable" in output
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    (out / "manifest.json").write_text("garbage")
    output = assert_ok(run(*_embed_args(fixture_set, tiny_backbone, out, "--overwrite")))
    assert "60 computed, 0 reused" in output
    assert _npy(out) == _npy(reference)


@pytest.mark.catalogue(59)
def test_truncated_vector_file_is_recomputed_with_a_warning(fixture_set, tiny_backbone,
                                                            reference, tmp_path):
    out = shutil.copytree(reference, tmp_path / "corrupt_chunk")
    (chunk,) = (out / "store").glob("*/vectors/*.npz")
    chunk.write_bytes(chunk.read_bytes()[:1000])
    output = assert_ok(run(*_embed_args(fixture_set, tiny_backbone, out)))
    assert "damaged" in output and "60 computed" in output
    assert _npy(out) == _npy(reference)


def _train_args(f: dict, out: Path, cache: Path, *extra) -> list:
    return ["train", "--config", f["config"], "--set", f"out={out}", "--set",
            f"embeddings.cache={cache}", "--set", "train.epochs=3", *extra]


@pytest.mark.catalogue(76)
def test_truncated_embeddings_npy(fixture_set, tiny_backbone, reference, tmp_path):
    from taxoclass.errors import CacheError
    from taxoclass.features.embeddings import load_embeddings

    cache = shutil.copytree(reference, tmp_path / "corrupt_npy")
    npy = cache / "embeddings.npy"
    npy.write_bytes(npy.read_bytes()[:5000])
    with pytest.raises(CacheError, match="embeddings.npy is damaged.*rerun the same"):
        load_embeddings(cache)
    assert_ok(run(*_train_args(fixture_set, tmp_path / "model", cache)))  # reads the store
    assert_ok(run(*_embed_args(fixture_set, tiny_backbone, cache)))  # the fix the error names
    assert _npy(cache) == _npy(reference)


@pytest.mark.catalogue(60)
def test_wrong_images_root_then_fixed(fixture_set, tiny_backbone, tmp_path):
    f, cache = fixture_set, tmp_path / "emb"
    nope = tmp_path / "nope"
    nope.mkdir()
    res = run(*_train_args(f, tmp_path / "model", cache, "--set", f"data.images_root={nope}"))
    assert_clear_error(res, "0 of 60 images found under", str(nope), "images_root")
    args = _embed_args(f, tiny_backbone, cache)
    args[args.index("--images-root") + 1] = nope
    assert "60 image(s) failed" in assert_ok(run(*args))
    assert "60 computed" in assert_ok(run(*_embed_args(f, tiny_backbone, cache)))  # retried
    assert len(pd.read_csv(cache / "failures.csv")) == 0
    assert_ok(run(*_train_args(f, tmp_path / "model", cache)))


@pytest.mark.catalogue(12, 17, 21)
def test_existing_cache_never_serves_a_vector_of_other_content(fixture_set, reference,
                                                               tmp_path):
    """train reads the store by path and content: an id that now names another file (or
    two ids of one file) gets the vector of the file it names."""
    from taxoclass.pipelines.data import cached_embeddings

    cache = shutil.copytree(reference, tmp_path / "emb")
    ref = dict(zip(np.load(reference / "image_ids.npy").tolist(),
                   np.load(reference / "embeddings.npy")))
    train = fixture_set["images"] / "train"
    cfg = {"name": fixture_set["arch"], "checkpoint": str(fixture_set["ckpt"]),
           "model_kwargs": fixture_set["kwargs"]}
    other = tmp_path / "1.jpg"
    shutil.copy(train / "2.jpg", other)  # id 1's file name, image 2's pixels
    ids, paths = ["1", "201", "3"], [str(other), str(train / "3.jpg"), str(train / "3.jpg")]
    x, found, _ = cached_embeddings(ids, paths, cache=cache, backbone_cfg=cfg)
    assert found.all()
    assert np.array_equal(x[0], ref["2"]) and not np.array_equal(x[0], ref["1"])
    assert np.array_equal(x[1], ref["3"]) and np.array_equal(x[2], ref["3"])
    passwd = cached_embeddings(["1", "2"], ["/etc/passwd", str(train / "2.jpg")], cache=cache,
                               backbone_cfg=cfg)
    assert passwd[1].tolist() == [False, True]  # never the old vector of image 1


@pytest.mark.catalogue(95)
def test_predict_into_the_same_out_after_files_were_replaced(fixture_set, trained, tmp_path):
    """Two photos of different species; their contents swapped in place between runs."""
    test = json.loads(fixture_set["test"].read_text())
    by_cat = {}
    for a in test["annotations"]:
        by_cat.setdefault(a["category_id"], a["image_id"])
    a_id, b_id = list(by_cat.values())[:2]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    a, b = imgs / "a.jpg", imgs / "b.jpg"
    shutil.copy(fixture_set["images"] / "test" / f"{a_id}.jpg", a)
    shutil.copy(fixture_set["images"] / "test" / f"{b_id}.jpg", b)
    out = tmp_path / "pred"

    def predict() -> dict[str, tuple]:
        assert_ok(run("predict", "--model", trained["model"], "--out", out, a, b))
        frame = pd.read_csv(out / "predictions.csv")
        return {Path(i).name: (s, p) for i, s, p in
                zip(frame["image"], frame["species"], frame["species_prob"])}

    first = predict()
    assert first["a.jpg"][0] != first["b.jpg"][0]
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    assert predict() == {"a.jpg": first["b.jpg"], "b.jpg": first["a.jpg"]}


# ---------------------------------------------------------------------------- evaluate
def _evaluate(trained: dict, annotations: Path, root: Path, *extra):
    return run("evaluate", "--model", trained["model"], "--annotations", annotations,
               "--images-root", root, *extra)


def _write_annotations(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.catalogue(108)
def test_copy_of_the_training_annotations_gives_the_validation_split(fixture_set, trained,
                                                                     tmp_path):
    f = fixture_set
    res = _evaluate(trained, f["train"], f["dir"], "--out", tmp_path / "orig")
    assert "18 images (val split)" in assert_ok(res)
    copy = shutil.copy(f["train"], tmp_path / "annotations_copy.json")
    out = assert_ok(_evaluate(trained, copy, f["dir"], "--out", tmp_path / "copy"))
    assert "18 images (val split)" in out and "42 training image(s) left out" in out
    m1 = json.loads((tmp_path / "orig" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "copy" / "metrics.json").read_text())
    assert m1["ranks"] == m2["ranks"] and m2["n_training_images_left_out"] == 42
    allm = assert_ok(_evaluate(trained, copy, f["dir"], "--split", "all"))
    assert "60 images (all split)" in allm


@pytest.mark.catalogue(107)
def test_unseen_species_and_training_images_are_counted_on_screen(fixture_set, trained,
                                                                  tmp_path):
    f = fixture_set
    data = json.loads(f["test"].read_text())
    new_cat = dict(data["categories"][0], category_id=999, species="neverseen")
    data["categories"].append(new_cat)
    for a in data["annotations"][:4]:
        a["category_id"] = 999
    ann = _write_annotations(tmp_path / "unseen.json", data)
    out = assert_ok(_evaluate(trained, ann, f["dir"], "--out", tmp_path / "ev"))
    assert "20 images" in out and "4 of taxa the model never saw" in out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_images"] == 20 and metrics["n_skipped_unknown_taxon"] == 4


@pytest.mark.catalogue(109, 110)
def test_new_images_with_colliding_or_new_ids_are_embedded_and_scored(fixture_set, trained,
                                                                      tmp_path):
    f = fixture_set
    res = _evaluate(trained, f["test"], f["dir"], "--out", tmp_path / "new")
    assert "24 images (all split)" in assert_ok(res)
    data = json.loads(f["test"].read_text())
    new_id = {im["image_id"]: k + 1 for k, im in enumerate(data["images"])}  # training ids
    for rec in data["images"] + data["annotations"]:
        rec["image_id"] = new_id[rec["image_id"]]
    ann = _write_annotations(tmp_path / "colliding.json", data)
    assert "24 images (all split)" in assert_ok(
        _evaluate(trained, ann, f["dir"], "--out", tmp_path / "coll"))
    m1 = json.loads((tmp_path / "new" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "coll" / "metrics.json").read_text())
    assert m1["ranks"] == m2["ranks"] and m1["ranks"]["species"]["accuracy"] >= 0.7


@pytest.mark.catalogue(111)
def test_empty_images_root_is_a_clear_error(fixture_set, trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _evaluate(trained, fixture_set["train"], empty)
    assert_clear_error(res, "0 of 60 images found under", str(empty), "--images-root")


@pytest.mark.catalogue(112)
def test_annotations_of_another_taxonomy(fixture_set, trained, tmp_path):
    data = json.loads(fixture_set["test"].read_text())
    for c in data["categories"]:
        c.update(family="Otheraceae", genus="Othergenus", species=f"other{c['category_id']}")
    for g in data.get("genera", []):
        g["genus"] = "Othergenus"
    ann = _write_annotations(tmp_path / "other.json", data)
    assert_clear_error(_evaluate(trained, ann, fixture_set["dir"]),
                       "no labelled image of the model's taxa")


@pytest.mark.catalogue(114)
def test_holdout_fraction_out_of_range(fixture_set, trained):
    assert_clear_error(_evaluate(trained, fixture_set["train"], fixture_set["dir"],
                                 "--holdout-fraction", 2), "holdout-fraction")


@pytest.mark.catalogue(113)
def test_kill_while_evaluation_outputs_are_replaced_leaves_old_or_new(fixture_set, trained,
                                                                      tmp_path):
    f, out = fixture_set, tmp_path / "eval"
    assert_ok(_evaluate(trained, f["train"], f["dir"], "--out", out))
    old = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    args = ["evaluate", "--model", trained["model"], "--annotations", f["test"],
            "--images-root", f["dir"], "--out", out]
    killed = run_killed(args, match="src:.eval.stage-")  # the swap: old folder moved aside
    assert killed.returncode == 137, killed.stderr
    from taxoclass.io.files import recover_output_folder

    recover_output_folder(out)  # what the next run does first
    now = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert now == old and not _tmp_files(tmp_path)
    assert "24 images" in assert_ok(run(*args))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 24 == len(pd.read_csv(out / "predictions.csv"))
    assert str(Path(f["test"]).resolve()) in (out / "config.yaml").read_text()
