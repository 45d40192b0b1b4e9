"""Shared tools of the reliability suite (one test per row of the fault catalogue).

Every test here is tagged ``@pytest.mark.catalogue(ROW, ...)`` with the row numbers of
``../shared/reliability-catalogue.tsv`` it covers (rows 1-116; our own extra cases are
numbered from 117, listed in ``EXTRA_CASES`` of test_catalogue.py). The coverage test
fails when a row has no test.

Tools:
- ``run(*args)``: taxoclass in-process, returns a :class:`Run` (exit code, output) and
  never fails by itself; ``assert_clear_error(run, *fragments)`` checks a user error:
  exit code 2, one ``Error:`` line naming the fragments, no traceback.
- ``run_killed(args, match=..., nth=...)``: taxoclass in a child process that is killed
  (``os._exit(137)``, like SIGKILL: no cleanup runs) at the ``nth`` rename whose target
  name contains ``match`` (``os.replace`` / ``os.rename``: the dangerous points of every
  atomic write and folder swap).
- ``tiny_backbone``: the CLI options of the shipped tiny DINOv2 checkpoint.
- ``make_bad_images(folder)``: the catalogue's broken and unusual image files.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    code: int
    output: str
    exception: BaseException | None = None

    @property
    def traceback(self) -> bool:
        """True when the run ended in an exception other than a clean exit."""
        return "Traceback (most recent call last)" in self.output or (
            self.exception is not None and not isinstance(self.exception, SystemExit))


def run(*args) -> Run:
    """``taxoclass ARGS`` in-process (click's runner, stderr mixed into the output)."""
    from click.testing import CliRunner

    from taxoclass.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    return Run(res.exit_code, res.output, res.exception)


def assert_ok(res: Run) -> str:
    assert res.code == 0 and not res.traceback, f"exit {res.code}:\n{res.output}\n{res.exception!r}"
    return res.output


def assert_clear_error(res: Run, *fragments: str, code: int = 2) -> str:
    """A user error: exit ``code``, an ``Error:`` message holding each fragment, no traceback."""
    assert not res.traceback, f"traceback, not a clear error:\n{res.output}\n{res.exception!r}"
    assert res.code == code, f"exit {res.code}, expected {code}:\n{res.output}"
    assert "Error" in res.output, res.output
    low = res.output.lower()
    for frag in fragments:
        assert frag.lower() in low, f"{frag!r} not in the message:\n{res.output}"
    return res.output


_KILL_SCRIPT = r"""
import atexit, os, sys
match, nth = sys.argv[1], int(sys.argv[2])
seen = [0]
atexit.register(lambda: sys.stderr.write(f"\nrenames-seen: {seen[0]}\n"))
def _wrap(real):
    def fn(src, dst, *a, **k):
        if match in os.fspath(dst) or (match.startswith("src:") and match[4:] in os.fspath(src)):
            seen[0] += 1
            if seen[0] == nth:
                os._exit(137)
        return real(src, dst, *a, **k)
    return fn
os.replace = _wrap(os.replace)
os.rename = _wrap(os.rename)
from taxoclass.cli import main
main(sys.argv[3:], prog_name="taxoclass")
"""


def run_killed(args, *, match: str = "", nth: int = 1, cwd: Path | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run taxoclass ARGS in a child process killed at the ``nth`` rename to a path containing
    ``match`` (``"src:TEXT"`` matches the source path instead). Exit code 137 means the kill
    happened; any other code means the run finished before reaching that rename (its stderr
    ends with ``renames-seen: N``, the number of matching renames, see :func:`renames_seen`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", _KILL_SCRIPT, match, str(nth),
                           *[str(a) for a in args]], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def renames_seen(res: subprocess.CompletedProcess) -> int:
    """How many renames matched in a run of :func:`run_killed` that was not killed."""
    tail = res.stderr.rsplit("renames-seen:", 1)
    assert len(tail) == 2, res.stderr[-2000:]
    return int(tail[1].split()[0])


@pytest.fixture
def tiny_backbone(fixture_set) -> list[str]:
    """``--backbone ... --checkpoint ... --model-kwargs ...`` of the shipped tiny DINOv2."""
    f = fixture_set
    return ["--backbone", f["arch"], "--checkpoint", str(f["ckpt"]),
            "--model-kwargs", json.dumps(f["kwargs"])]


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    buf = Path(path)
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    buf.write_bytes(bytes(data))
    return buf


def photo(size=(64, 48), seed: int = 0) -> Image.Image:
    """A small textured RGB picture."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def make_bad_images(folder: Path, *, large: bool = False) -> dict[str, Path]:
    """The catalogue's bad and unusual images in ``folder``: name -> path.

    ``large`` adds the 10000x10000 PNG (100 Mpx; a few seconds to write and read).
    """
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    good = photo((80, 60), seed=1)
    good.save(folder / "good.jpg", quality=90)
    out["good"] = folder / "good.jpg"
    raw = (folder / "good.jpg").read_bytes()
    garbled = bytearray(raw)
    mid = len(garbled) // 2
    garbled[mid:mid + 200] = bytes(200)
    (folder / "corrupt.jpg").write_bytes(bytes(garbled))
    out["corrupt"] = folder / "corrupt.jpg"
    (folder / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    out["truncated"] = folder / "truncated.jpg"
    (folder / "zero.jpg").write_bytes(b"")
    out["zero"] = folder / "zero.jpg"
    (folder / "text.jpg").write_text("this is not an image\n")
    out["text"] = folder / "text.jpg"
    link = folder / "passwd.jpg"
    if not link.exists():
        link.symlink_to("/etc/passwd")
    out["symlink"] = link
    (folder / "dir.jpg").mkdir(exist_ok=True)
    out["dir"] = folder / "dir.jpg"
    out["bomb"] = _png_declaring(folder / "bomb.png", 30000, 30000)
    arr = np.asarray(good.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(arr).save(folder / "gray16.png")  # mode I;16
    out["gray16"] = folder / "gray16.png"
    good.convert("L").save(folder / "gray8.png")
    out["gray8"] = folder / "gray8.png"
    good.convert("CMYK").save(folder / "cmyk.jpg")
    out["cmyk"] = folder / "cmyk.jpg"
    frames = [good, photo((80, 60), seed=2)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    out["gif"] = folder / "anim.gif"
    photo((1, 1)).save(folder / "one.png")
    out["1x1"] = folder / "one.png"
    photo((3, 2)).save(folder / "tiny.png")
    out["3x2"] = folder / "tiny.png"
    Image.new("RGB", (20000, 4), (90, 140, 60)).save(folder / "strip.png")
    out["20000x4"] = folder / "strip.png"
    good.convert("RGBA").save(folder / "rgba.png")
    out["rgba"] = folder / "rgba.png"
    good.convert("P").save(folder / "palette.png")
    out["palette"] = folder / "palette.png"
    good.save(folder / "image.webp")
    out["webp"] = folder / "image.webp"
    good.save(folder / "image.tif")
    out["tiff"] = folder / "image.tif"
    good.save(folder / "png_named.jpg", format="PNG")
    out["png_as_jpg"] = folder / "png_named.jpg"
    if large:
        Image.new("L", (10000, 10000), 128).save(folder / "huge.png")
        out["100mpx"] = folder / "huge.png"
    return out


@pytest.fixture
def bad_images(tmp_path) -> dict[str, Path]:
    return make_bad_images(tmp_path / "bad")
