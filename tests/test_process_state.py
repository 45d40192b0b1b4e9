"""The library leaves process-wide state alone unless asked: the allocator is tuned only on
request (the CLI asks), and provenance's command line is passed in, not kept globally."""

from __future__ import annotations

import json
import sys

import pytest

from taxoclass.features import allocator, backbones
from taxoclass.io import provenance

TINY = dict(img_size=28, patch_size=14, depth=1, embed_dim=32, num_heads=2)


def test_create_backbone_tunes_the_allocator_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(backbones, "tune_cpu_allocator", lambda: calls.append(1) or True)
    backbones.create_backbone("vit_base_patch14_reg4_dinov2", pretrained=False,
                              model_kwargs=TINY)
    assert calls == []
    backbones.create_backbone("vit_base_patch14_reg4_dinov2", pretrained=False,
                              model_kwargs=TINY, tune_allocator=True)
    assert calls == [1]


def test_allocator_tuning_respects_the_switch_and_runs_once(monkeypatch):
    monkeypatch.setattr(allocator, "_tuned", [])
    monkeypatch.setenv(allocator.MALLOC_TUNING_ENV, "0")
    assert allocator.tune_cpu_allocator() is False
    monkeypatch.delenv(allocator.MALLOC_TUNING_ENV)
    assert allocator.tune_cpu_allocator() is False  # decided once per process


def test_provenance_command_is_passed_or_scoped(tmp_path, monkeypatch):
    assert not hasattr(provenance, "set_command_line")
    monkeypatch.setattr(sys, "argv", ["/usr/bin/prog", "run", "a b"])
    assert provenance.command_line() == "prog run 'a b'"
    path = provenance.write_provenance(tmp_path / "a", command=["taxoclass", "embed", "x y"])
    assert json.loads(path.read_text())["command"] == "taxoclass embed 'x y'"
    with provenance.recorded_command(["taxoclass", "train", "--config", "c.yaml"]):
        path = provenance.write_provenance(tmp_path / "b")
        assert provenance.command_line() == "taxoclass train --config c.yaml"
    assert json.loads(path.read_text())["command"] == "taxoclass train --config c.yaml"
    # the recorded command does not outlive its block
    path = provenance.write_provenance(tmp_path / "c")
    assert json.loads(path.read_text())["command"] == "prog run 'a b'"
    with pytest.raises(RuntimeError), provenance.recorded_command(["taxoclass", "x"]):
        raise RuntimeError
    assert provenance.command_line() == "prog run 'a b'"


def test_cli_records_its_command_only_while_it_runs(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from taxoclass.cli import main

    monkeypatch.setattr(sys, "argv", ["pytest"])
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0
    assert provenance.command_line() == "pytest"


def test_output_files_follow_the_umask_without_setting_it(tmp_path, monkeypatch):
    """Files and staged folders get the umask's mode; the umask is read, never set (setting
    it to read it back would race with other threads)."""
    import os
    import stat

    from taxoclass.io.files import atomic_write_text, output_folder, process_umask

    mask = os.umask(0o027)
    try:
        def no_umask(_mask):
            raise AssertionError("os.umask called")
        monkeypatch.setattr(os, "umask", no_umask)
        assert process_umask() == 0o027
        with output_folder(tmp_path / "out") as stage:
            atomic_write_text(stage / "a.txt", "x")
    finally:
        monkeypatch.undo()
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out" / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
