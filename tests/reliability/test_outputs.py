"""Outputs written as a unit: staged folders swapped in by renames, kills at every rename,
file modes, and model bundles whose parts must belong together."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from taxoclass.errors import ConfigError
from taxoclass.io.files import (
    atomic_write_text,
    check_output_folder,
    output_folder,
    process_umask,
    recover_output_folder,
)

from .conftest import REPO, assert_clear_error, assert_ok, run, run_killed


# ---------------------------------------------------------------------------- helpers
def _tree(root: Path) -> dict[str, str]:
    """Relative path -> text of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _make_old(out: Path) -> dict[str, str]:
    (out / "embeddings").mkdir(parents=True)
    (out / "embeddings" / "vectors.txt").write_text("persistent")
    (out / "a.txt").write_text("old a")
    (out / "stale.txt").write_text("old only")
    return _tree(out)


_WRITER = textwrap.dedent(r"""
    import os, sys
    from pathlib import Path
    out, nth, exchange = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    seen = [0]
    def _wrap(real):
        def fn(src, dst, *a, **k):
            seen[0] += 1
            if seen[0] == nth:
                os._exit(137)
            return real(src, dst, *a, **k)
        return fn
    os.replace = _wrap(os.replace)
    os.rename = _wrap(os.rename)
    import shutil
    shutil.rmtree = lambda *a, **k: os._exit(137)  # a kill after the swap, before cleaning
    import taxoclass.io.files as files
    from taxoclass.io.files import atomic_write_text, output_folder
    if not exchange:  # the two-rename fallback of systems without RENAME_EXCHANGE
        files._exchange = lambda a, b: False
    with output_folder(out, keep=("embeddings", "*.parquet")) as stage:
        atomic_write_text(stage / "a.txt", "new a")
        atomic_write_text(stage / "b.txt", "new b")
""")


def _write_killed(out: Path, nth: int, exchange: bool = True) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", _WRITER, str(out), str(nth),
                           str(int(exchange))], env=env,
                          capture_output=True, text=True, timeout=60).returncode


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ---------------------------------------------------------------------------- output_folder
def test_output_folder_replaces_as_a_unit_and_keeps_persistent_entries(tmp_path):
    out = tmp_path / "run"
    old = _make_old(out)
    (out / "part.parquet").mkdir()
    (out / "part.parquet" / "x").write_text("resume")
    with output_folder(out, keep=("embeddings", "*.parquet")) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".run.")
        atomic_write_text(stage / "a.txt", "new a")
        assert _tree(out) == {**old, "part.parquet/x": "resume"}  # untouched until the end
    assert _tree(out) == {"a.txt": "new a", "embeddings/vectors.txt": "persistent",
                          "part.parquet/x": "resume"}  # stale.txt belonged to the old output
    assert _leftovers(tmp_path, "run") == []


def test_output_folder_exception_leaves_out_untouched(tmp_path):
    out = tmp_path / "run"
    old = _make_old(out)
    with pytest.raises(RuntimeError), output_folder(out, keep=("embeddings",)) as stage:
        atomic_write_text(stage / "a.txt", "new a")
        raise RuntimeError("job failed")
    assert _tree(out) == old
    assert _leftovers(tmp_path, "run") == []


def test_output_folder_new_folder_and_modes(tmp_path):
    out = tmp_path / "deep" / "run"
    with output_folder(out) as stage:
        atomic_write_text(stage / "a.txt", "x")
    umask = process_umask()
    assert umask == _real_umask()
    assert stat.S_IMODE((out / "a.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def _real_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_write_mode_follows_umask(tmp_path):
    """Issue 14: files were created 0600 despite a 022 umask (mkstemp's mode)."""
    code = ("import os, stat, sys; os.umask(0o027); from taxoclass.io.files import "
            "atomic_write_text as w; p = w(sys.argv[1], 'x'); "
            "print(oct(stat.S_IMODE(os.stat(p).st_mode)))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.txt")],
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, check=True)
    assert res.stdout.strip() == oct(0o640)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_kill_at_every_rename_leaves_old_or_new_then_recovers(tmp_path, exchange):
    """A kill at each rename (atomic writes in the stage and the folder swap) leaves the old
    or the new complete folder once the next call has recovered; the keep entry survives."""
    new = {"a.txt": "new a", "b.txt": "new b", "embeddings/vectors.txt": "persistent"}
    outcomes = []
    for nth in range(1, 20):
        out = tmp_path / f"k{nth}" / "run"
        old = _make_old(out)
        code = _write_killed(out, nth, exchange)
        assert code == 137
        recover_output_folder(out, keep=("embeddings",))
        state = _tree(out)
        assert state in (old, new), (nth, state)
        assert _leftovers(out.parent, "run") == [], nth
        outcomes.append("old" if state == old else "new")
        if state == new:
            break
    else:
        pytest.fail("the writer never finished")
    # 2 atomic writes, embeddings->stage, [out->old, stage->out]; then the kill in rmtree(old)
    assert outcomes == ["old"] * (3 if exchange else 5) + ["new"], outcomes


def test_killed_first_write_is_recovered_by_next_output_folder(tmp_path):
    out = tmp_path / "run"
    old = _make_old(out)
    assert _write_killed(out, 5, exchange=False) == 137  # out -> .run.old-T, stage not in
    assert not out.exists()
    with output_folder(out, keep=("embeddings",)) as stage:
        assert _tree(out) == old  # restored before the job runs
        atomic_write_text(stage / "a.txt", "again")
    assert _tree(out) == {"a.txt": "again", "embeddings/vectors.txt": "persistent"}
    assert _leftovers(tmp_path, "run") == []


def test_live_stage_is_not_taken_for_an_orphan(tmp_path):
    out = tmp_path / "run"
    with output_folder(out) as stage:
        recover_output_folder(out)  # e.g. a second run starting meanwhile
        assert stage.is_dir()
        atomic_write_text(stage / "a.txt", "x")
    assert _tree(out) == {"a.txt": "x"}


def test_two_writers_of_one_folder_leave_the_last_whole(tmp_path, monkeypatch):
    """Two runs writing one ``out`` at once: each commit is whole, the last one wins, no
    leftovers; also where the folder appears between the check and the rename."""
    import taxoclass.io.files as files

    out = tmp_path / "run"
    with output_folder(out) as first:
        atomic_write_text(first / "a.txt", "first")
        with output_folder(out) as second:
            atomic_write_text(second / "b.txt", "second")
        assert _tree(out) == {"b.txt": "second"}
    assert _tree(out) == {"a.txt": "first"}
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    shutil.rmtree(out)
    real_rename, raced = os.rename, []

    def racing_rename(src, dst):  # another run's folder lands at ``out`` just before ours
        if Path(dst) == out and not out.exists() and len(raced) < 2:
            raced.append(dst)
            out.mkdir()
            (out / "c.txt").write_text("other run")
        return real_rename(src, dst)
    monkeypatch.setattr(os, "rename", racing_rename)
    with output_folder(out) as stage:
        atomic_write_text(stage / "a.txt", "mine")
    assert _tree(out) == {"a.txt": "mine"} and len(raced) == 2
    assert _leftovers(tmp_path, "run") == []


def test_failed_job_leaves_no_stage_even_with_its_own_keep_entry(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), output_folder(out, keep=("embeddings",)) as stage:
        (stage / "embeddings").mkdir()
        raise RuntimeError("job failed")
    assert _tree(out) == {"a.txt": "old"}
    assert _leftovers(tmp_path, "run") == []


def test_tmp_orphans_in_out_are_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".metrics.json.abc123.tmp").write_text("half")
    (out / "metrics.json").write_text("{}")
    recover_output_folder(out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]


def test_check_output_folder(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        check_output_folder(f)
    with pytest.raises(ConfigError, match="is a file"):
        check_output_folder(f / "sub" / "out")
    assert check_output_folder(tmp_path / "new" / "out") == tmp_path / "new" / "out"
    monkeypatch.setattr(os, "access", lambda p, m: Path(p) != tmp_path)
    with pytest.raises(ConfigError, match="not writable"):
        check_output_folder(tmp_path / "x")


# ---------------------------------------------------------------------------- train outputs
TEST_IMAGE = Path(__file__).resolve().parents[1] / "fixtures" / "images" / "test" / "1001.jpg"


def _train_args(fixture_set, fixture_model, out, *extra) -> list:
    return ["train", "--config", fixture_set["config"], "--set", f"out={out}",
            "--set", f"embeddings.cache={fixture_model['emb']}", *extra]


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _orphans(out: Path) -> list[str]:
    return sorted(p.name for p in [*out.parent.iterdir(), *out.iterdir()]
                  if p.name.startswith(f".{out.name}.") or p.name.endswith(".tmp"))


@pytest.mark.catalogue(68, 69, 75)
def test_bad_epochs_and_out_file_fail_before_training(fixture_set, fixture_model, tmp_path):
    for epochs in ("0", "-3"):
        res = run(*_train_args(fixture_set, fixture_model, tmp_path / "m",
                               "--set", f"train.epochs={epochs}"))
        assert_clear_error(res, "train.epochs", ">= 1", epochs)
    assert not (tmp_path / "m").exists()
    outfile = tmp_path / "outfile"
    outfile.write_text("my notes")
    res = run(*_train_args(fixture_set, fixture_model, outfile, "--set", "train.epochs=2"))
    assert_clear_error(res, str(outfile), "existing file", "choose another output path")
    assert outfile.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outfile"]
    # the fixes: epochs >= 1, another output path
    assert_ok(run(*_train_args(fixture_set, fixture_model, tmp_path / "m",
                               "--set", "train.epochs=1")))
    assert (tmp_path / "m" / "bundle.json").is_file()


_KILL_IN_EPOCHS = textwrap.dedent(r"""
    import os, sys
    import taxoclass.model.training as training
    real = training.train_head
    def train_head(*a, progress=None, **k):
        def hook(epoch, total):
            if epoch >= 2:
                os._exit(137)  # SIGKILL-like: no cleanup runs
        return real(*a, progress=hook, **k)
    training.train_head = train_head
    from taxoclass.cli import main
    main(sys.argv[1:], prog_name="taxoclass")
""")


@pytest.mark.catalogue(73)
def test_kill_during_epochs_keeps_old_bundle_and_rerun_is_identical(fixture_set, fixture_model,
                                                                   tmp_path):
    out = tmp_path / "model"
    shutil.copytree(fixture_model["model"], out)
    before = _bytes(out)
    args = _train_args(fixture_set, fixture_model, out, "--set", "train.epochs=4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", _KILL_IN_EPOCHS, *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 137, res.stderr[-2000:]
    assert _bytes(out) == before  # byte-identical old bundle
    assert _orphans(out) == []
    assert_ok(run(*args))
    ref = tmp_path / "ref"
    assert_ok(run(*_train_args(fixture_set, fixture_model, ref, "--set", "train.epochs=4")))
    new, want = _bytes(out), _bytes(ref)
    for name in ("heads.safetensors", "openset.npz", "taxonomy.json"):
        assert new[name] == want[name], name
    # metrics_val.json: identical apart from its header (time, and the command's --out)
    val_new, val_want = (json.loads(x["metrics_val.json"]) for x in (new, want))
    assert val_new.pop("header")["command"] != val_want.pop("header")["command"]
    assert val_new == val_want
    assert _orphans(out) == []


def _other_bundle(model: Path, dest: Path) -> Path:
    """A bundle with the same shapes but other species names and other head weights."""
    import torch

    from taxoclass.bundle import ModelBundle
    from taxoclass.taxonomy.tree import Taxonomy

    b = ModelBundle.load(model)
    d = b.taxonomy.to_dict()
    d["nodes"] = [n[:-1] + [n[-1] + " var. other"] if len(n) == 3 else n for n in d["nodes"]]
    b.taxonomy = Taxonomy.from_dict(d)
    with torch.no_grad():
        for p in b.head.parameters():
            p.mul_(-1.0)
    return b.save(dest)


def _fork_killed(fn, nth: int, exchange: bool) -> int:
    """Run ``fn()`` in a forked child killed (``os._exit(137)``) at its ``nth`` rename."""
    import taxoclass.io.files as files

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            seen = [0]

            def wrap(real):
                def fn_(*a, **k):
                    seen[0] += 1
                    if seen[0] == nth:
                        os._exit(137)
                    return real(*a, **k)
                return fn_
            os.replace, os.rename = wrap(os.replace), wrap(os.rename)
            if not exchange:
                files._exchange = lambda a, b: False
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _which(model: Path, a, b) -> str:
    """'a' or 'b': the bundle at ``model`` is wholly one of them (heads and taxonomy)."""
    import torch

    from taxoclass.bundle import ModelBundle

    got = ModelBundle.load(model)
    for name, ref in (("a", a), ("b", b)):
        if got.taxonomy.to_dict() == ref.taxonomy.to_dict():
            for k, v in got.head.state_dict().items():
                assert torch.equal(v, ref.head.state_dict()[k]), f"{name} taxonomy, other heads"
            frame, _ = got.predict_with_backoff(np.zeros((2, got.head.in_features), "float32"))
            assert set(frame["species"]) <= set(ref.taxonomy.names("species"))
            return name
    raise AssertionError("the bundle is neither the old nor the new one")


@pytest.mark.catalogue(74)
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_kill_at_every_rename_of_a_bundle_save_never_mixes(fixture_model, tmp_path, exchange):
    from taxoclass.bundle import ModelBundle

    a_dir = tmp_path / "a"
    shutil.copytree(fixture_model["model"], a_dir)
    b_dir = _other_bundle(a_dir, tmp_path / "b")
    a, b = ModelBundle.load(a_dir), ModelBundle.load(b_dir)
    seen = []
    for nth in range(1, 30):
        out = tmp_path / f"k{nth}" / "model"
        shutil.copytree(a_dir, out)
        code = _fork_killed(lambda: b.save(out), nth, exchange)  # noqa: B023
        if code == 0:
            break
        assert code == 137
        seen.append(_which(out, a, b))  # a missing folder is restored by the load
        recover_output_folder(out)
        assert _orphans(out) == [], nth
    assert code == 0 and _which(out, a, b) == "b"
    assert seen and set(seen) == {"a"}, seen  # every kill before the swap: the old bundle
    # a bundle mixed by hand (new heads, old taxonomy) is refused
    mixed = tmp_path / "mixed"
    shutil.copytree(a_dir, mixed)
    shutil.copyfile(b_dir / "heads.safetensors", mixed / "heads.safetensors")
    assert_clear_error(run("predict", "--model", mixed, TEST_IMAGE), "heads.safetensors",
                       "does not belong", "retrain")


@pytest.mark.catalogue(74)
def test_train_killed_while_saving_leaves_old_bundle_and_rerun_cleans(fixture_set,
                                                                     fixture_model, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(fixture_model["model"], out)
    before = _bytes(out)
    args = _train_args(fixture_set, fixture_model, out, "--set", "train.epochs=2")
    res = run_killed(args, match="bundle.json", nth=1)
    assert res.returncode == 137, res.stderr[-2000:]
    assert _bytes(out) == before
    assert_ok(run("predict", "--model", out, TEST_IMAGE))
    assert_ok(run(*args))
    assert _orphans(out) == []
    assert _bytes(out)["heads.safetensors"] != before["heads.safetensors"]


# ---------------------------------------------------------------------------- damaged bundles
class _Evil:
    """Unpickling it creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _json_edit(file: Path, edit) -> None:
    import json

    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def _evil_heads(m: Path, marker: Path) -> None:
    import torch

    torch.save({"species.weight": _Evil(marker)}, m / "heads.safetensors")


def _npz_object(m: Path, marker: Path) -> None:
    with np.load(m / "openset.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["train_X"] = np.array([_Evil(marker)], dtype=object)
    np.savez(m / "openset.npz", **arrays)


def _npz_pickle(m: Path, marker: Path) -> None:
    import pickle

    (m / "openset.npz").write_bytes(pickle.dumps(_Evil(marker)))


def _other_taxonomy(m: Path, marker: Path, *, extra_species: bool) -> None:
    def edit(d):
        if extra_species:
            d["nodes"].append(["Sapindaceae", "Acer", "Acer pseudoplatanus"])
        else:
            d["nodes"] = [n[:-1] + [n[-1] + " x"] if len(n) == 3 else n for n in d["nodes"]]
    _json_edit(m / "taxonomy.json", edit)
    _json_edit(m / "labels.json", lambda d: d["species"].append("Acer pseudoplatanus")
               if extra_species else d.update(species=[s + " x" for s in d["species"]]))


def _other_heads(m: Path, marker: Path) -> None:
    from safetensors.torch import save_file

    from taxoclass.model.heads import MultiRankHead

    head = MultiRankHead(32, {"family": 2, "genus": 3, "species": 6})
    save_file(dict(head.state_dict()), str(m / "heads.safetensors"))


def _truncate(m: Path, marker: Path) -> None:
    data = (m / "heads.safetensors").read_bytes()
    (m / "heads.safetensors").write_bytes(data[: len(data) // 2])


DAMAGES = {  # row: (damage, fragments of the message, also without part hashes)
    77: (_evil_heads, ["heads.safetensors"], True),
    78: (_npz_object, ["openset.npz"], True),
    79: (_npz_pickle, ["openset.npz"], True),
    83: (lambda m, _: (m / "bundle.json").write_text("{not json"), ["bundle.json", "json"],
         False),
    84: (lambda m, _: _json_edit(m / "openset.json", lambda d: d["detector"]["params"].update(
        evil=1)), ["openset.json"], True),
    85: (lambda m, _: _json_edit(m / "openset.json", lambda d: d["detector"].update(
        version=99)), ["openset.json"], True),
    86: (lambda m, x: _other_taxonomy(m, x, extra_species=True), ["taxonomy.json"], True),
    87: (lambda m, x: _other_taxonomy(m, x, extra_species=False), ["taxonomy.json"], False),
    88: (_truncate, ["heads.safetensors"], True),
    89: (_other_heads, ["heads.safetensors"], True),
    90: (lambda m, _: (m / "openset.npz").unlink(), ["openset.npz", "incomplete"], True),
}

def _case(row: int, mark, legacy: bool = True) -> list:
    """The row's damage with part hashes and (``legacy``) in a bundle written before them."""
    return [pytest.param(row, hashes, id=f"{row}-{'hashes' if hashes else 'legacy'}",
                         marks=mark) for hashes in ((True, False) if legacy else (True,))]


_CASES = [  # literal row numbers: test_catalogue reads them from the syntax tree
    *_case(77, pytest.mark.catalogue(77)), *_case(78, pytest.mark.catalogue(78)),
    *_case(79, pytest.mark.catalogue(79)), *_case(83, pytest.mark.catalogue(83), False),
    *_case(84, pytest.mark.catalogue(84)), *_case(85, pytest.mark.catalogue(85)),
    *_case(86, pytest.mark.catalogue(86)), *_case(87, pytest.mark.catalogue(87), False),
    *_case(88, pytest.mark.catalogue(88)), *_case(89, pytest.mark.catalogue(89)),
    *_case(90, pytest.mark.catalogue(90))]
assert sorted({p.values[0] for p in _CASES}) == sorted(DAMAGES)
assert all((row, False) in [p.values for p in _CASES] for row, d in DAMAGES.items() if d[2])


@pytest.mark.parametrize(("row", "hashes"), _CASES)
def test_damaged_bundle_is_a_clear_error(fixture_model, tmp_path, row, hashes):
    """Each damaged part is refused with a BundleError naming the file and the fix (with the
    part hashes of bundle.json, and for bundles written before them); no code runs."""
    damage, fragments, _ = DAMAGES[row]
    m, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(fixture_model["model"], m)
    if not hashes:  # a bundle written before part hashes
        _json_edit(m / "bundle.json", lambda d: d.pop("parts"))
    damage(m, marker)
    res = run("predict", "--model", m, TEST_IMAGE)
    assert_clear_error(res, *fragments, "retrain", "restore")
    if hashes and row not in (83, 90):
        assert "does not belong to this bundle" in res.output, res.output
    assert not marker.exists()
    # the fix the message names: restore the whole folder (or retrain)
    shutil.rmtree(m)
    shutil.copytree(fixture_model["model"], m)
    assert_ok(run("predict", "--model", m, TEST_IMAGE))


@pytest.mark.catalogue(90)
def test_taxonomy_not_a_tree_is_a_clear_error(fixture_model, tmp_path):
    m = tmp_path / "model"
    shutil.copytree(fixture_model["model"], m)
    (m / "taxonomy.json").write_text("[]")
    assert_clear_error(run("predict", "--model", m, TEST_IMAGE), "taxonomy.json", "retrain")
    _json_edit(m / "bundle.json", lambda d: d.pop("parts"))
    assert_clear_error(run("predict", "--model", m, TEST_IMAGE), "taxonomy.json", "malformed")


@pytest.mark.catalogue(82)
def test_unknown_bundle_format_is_refused(fixture_model, tmp_path):
    m = tmp_path / "model"
    shutil.copytree(fixture_model["model"], m)
    _json_edit(m / "bundle.json", lambda d: d.update(format_version=2))
    assert_clear_error(run("predict", "--model", m, TEST_IMAGE), "bundle.json",
                       "bundle format 2", "reads format 1")


@pytest.mark.catalogue(80, 81)
@pytest.mark.parametrize("where", ["checkpoint", "overlay"])
def test_backbone_pickle_named_by_bundle_json_never_runs(fixture_model, tmp_path, where):
    import torch

    m, marker, evil = tmp_path / "model", tmp_path / "pwned", tmp_path / "evil.pth"
    shutil.copytree(fixture_model["model"], m)
    torch.save({"pos_embed": _Evil(marker)}, evil)
    if where == "checkpoint":
        _json_edit(m / "bundle.json", lambda d: d["backbone"].update(checkpoint=str(evil)))
    else:
        _json_edit(m / "bundle.json", lambda d: d["backbone"].update(
            checkpoint=None, model_kwargs={**d["backbone"]["model_kwargs"],
                                           "pretrained_cfg_overlay": {"file": str(evil)}}))
    res = run("predict", "--model", m, TEST_IMAGE)
    assert_clear_error(res, "evil.pth", "refused", "no code")
    assert "could not be reached" not in res.output  # row 81: the hub was never the problem
    assert not marker.exists()


def test_old_bundle_without_hashes_loads_with_a_warning(fixture_model, tmp_path, caplog):
    from taxoclass.bundle import ModelBundle

    m = tmp_path / "model"
    shutil.copytree(fixture_model["model"], m)
    _json_edit(m / "bundle.json", lambda d: d.pop("parts"))
    assert ModelBundle.load(m).taxonomy.sizes["species"] == 6
    assert "without part hashes" in caplog.text


def test_update_extra_keeps_part_hashes(fixture_model, tmp_path):
    from taxoclass.bundle import ModelBundle

    m = tmp_path / "model"
    shutil.copytree(fixture_model["model"], m)
    b = ModelBundle.load(m)
    b.update_extra(m, {"thresholds": [0.5]})
    assert ModelBundle.load(m).extra["thresholds"] == [0.5]
    assert ModelBundle.load(m).parts == b.parts


def test_bundle_backbone_checkpoint_is_bound_by_its_hash(fixture_model, fixture_set, tmp_path):
    """A fine-tuned bundle's own backbone.pth is a part: changed, it is refused when built."""
    from taxoclass.bundle import ModelBundle

    b = ModelBundle.load(fixture_model["model"])
    b.backbone = {**b.backbone, "checkpoint": "backbone.pth"}
    m = tmp_path / "ft"
    with output_folder(m) as stage:
        shutil.copyfile(fixture_set["ckpt"], stage / "backbone.pth")
        b.write(stage)
    assert "backbone.pth" in ModelBundle.load(m).parts
    assert_ok(run("predict", "--model", m, TEST_IMAGE))
    with open(m / "backbone.pth", "ab") as fh:
        fh.write(b"\0")
    assert_clear_error(run("predict", "--model", m, TEST_IMAGE), "backbone.pth",
                       "does not belong", "retrain")
