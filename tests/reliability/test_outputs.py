"""Outputs written as a unit: staged folders swapped in by renames, kills at every rename,
file modes, and model bundles whose parts must belong together."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from taxoclass.errors import ConfigError
from taxoclass.io.files import (
    atomic_write_text,
    check_output_folder,
    output_folder,
    process_umask,
    recover_output_folder,
)

from .conftest import REPO


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
    out, nth = Path(sys.argv[1]), int(sys.argv[2])
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
    from taxoclass.io.files import atomic_write_text, output_folder
    with output_folder(out, keep=("embeddings", "*.parquet")) as stage:
        atomic_write_text(stage / "a.txt", "new a")
        atomic_write_text(stage / "b.txt", "new b")
""")


def _write_killed(out: Path, nth: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", _WRITER, str(out), str(nth)], env=env,
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


def test_kill_at_every_rename_leaves_old_or_new_then_recovers(tmp_path):
    """A kill at each rename (atomic writes in the stage and the folder swap) leaves the old
    or the new complete folder once the next call has recovered; the keep entry survives."""
    new = {"a.txt": "new a", "b.txt": "new b", "embeddings/vectors.txt": "persistent"}
    outcomes = []
    for nth in range(1, 20):
        out = tmp_path / f"k{nth}" / "run"
        old = _make_old(out)
        code = _write_killed(out, nth)
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
    # 2 atomic writes, out->old, embeddings->stage, stage->out; then the kill in rmtree(old)
    assert outcomes == ["old"] * 5 + ["new"], outcomes


def test_killed_first_write_is_recovered_by_next_output_folder(tmp_path):
    out = tmp_path / "run"
    old = _make_old(out)
    assert _write_killed(out, 4) == 137  # after out -> .run.old-T, embeddings moved
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
