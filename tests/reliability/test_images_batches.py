"""Images and batch jobs (catalogue rows 26-41, 91-106): one loader for every command,
per-image failures instead of aborted batches, bounded tilings, outputs written as a unit.

Decisions these tests pin (taxoclass.io.images, taxoclass.plots.tiling):
- images over PIL's ``Image.MAX_IMAGE_PIXELS`` (89.5 Mpx) are refused per image as possible
  decompression bombs, before a pixel is decoded (row 33's 100 Mpx PNG included);
- images under 8 px on a side (``MIN_SIDE``) are refused per image (1x1, 3x2, 20000x4);
- 16-bit and other high-bit-depth gray is scaled to 8 bits, never clipped;
- a photo is cut into at most 2500 tiles (``MAX_TILES``; more is refused at once) of at
  least 8 px (``MIN_TILE_PX``; else that photo is a failure row);
- ``flag-unknowns`` where no image can be read writes its files, then exits 2.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from .conftest import assert_clear_error, assert_ok, make_bad_images, photo, run

# ------------------------------------------------------------------ one embed run, rows 26-41


def _png16_rgb(path: Path, rgb8: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG of the 8-bit pixels ``rgb8`` (value v -> v * 257)."""
    h, w, _ = rgb8.shape
    data = (rgb8.astype(">u2") * 257).astype(">u2")
    raw = b"".join(b"\x00" + data[y].tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def embedded(fixture_set, tmp_path_factory) -> dict:
    """`taxoclass embed` once over every bad image (plus a few reference copies)."""
    root = tmp_path_factory.mktemp("bad-embed")
    files = make_bad_images(root / "bad")
    good = Image.open(files["good"]).convert("RGB")
    raw = bytearray(files["good"].read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 3] = b"\xff\xff\xff"  # an invalid Huffman code
    (root / "bad" / "broken.jpg").write_bytes(bytes(raw))
    files["broken"] = root / "bad" / "broken.jpg"
    files["rgb16"] = _png16_rgb(root / "bad" / "rgb16.png", np.asarray(good))
    good.save(root / "bad" / "good.png")
    files["good_png"] = root / "bad" / "good.png"
    photo((80, 60), seed=1).save(root / "bad" / "orig.png")  # the pixels make_bad_images saved
    files["orig"] = root / "bad" / "orig.png"
    photo((80, 60), seed=1).convert("L").convert("RGB").save(root / "bad" / "gray_rgb.png")
    files["gray_rgb"] = root / "bad" / "gray_rgb.png"
    ids = {name: k for k, name in enumerate(sorted(files), start=1)}
    ann = {"images": [{"image_id": ids[n], "file_name": str(p.relative_to(root))}
                      for n, p in sorted(files.items())],
           "annotations": [], "categories": []}
    (root / "ann.json").write_text(json.dumps(ann))
    f = fixture_set
    res = run("embed", "--annotations", root / "ann.json", "--images-root", root,
              "--backbone", f["arch"], "--checkpoint", f["ckpt"],
              "--model-kwargs", json.dumps(f["kwargs"]), "--batch-size", 8,
              "--out", root / "emb")
    output = assert_ok(res)
    emb = np.load(root / "emb" / "embeddings.npy")
    emb_ids = [str(i) for i in np.load(root / "emb" / "image_ids.npy", allow_pickle=False)]
    failures = pd.read_csv(root / "emb" / "failures.csv", dtype=str)
    by_id = dict(zip(failures["image_id"], failures["error"]))
    return {"files": files, "ids": ids, "output": output,
            "vectors": {str(i): v for i, v in zip(emb_ids, emb)},
            "errors": {n: by_id.get(str(ids[n])) for n in files}}


def _vector(embedded: dict, name: str) -> np.ndarray:
    vec = embedded["vectors"].get(str(embedded["ids"][name]))
    assert vec is not None, f"{name} was not embedded: {embedded['errors'][name]}"
    return vec


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _failed(embedded: dict, name: str, *fragments: str) -> str:
    err = embedded["errors"][name]
    assert err, f"{name} was not recorded as a failure"
    assert str(embedded["ids"][name]) not in embedded["vectors"]
    assert "Traceback" not in err
    for frag in fragments:
        assert frag.lower() in err.lower(), f"{frag!r} not in {err!r}"
    return err


@pytest.mark.catalogue(26)
def test_corrupt_jpeg_is_a_failure_row_and_the_rest_carry_on(embedded):
    _failed(embedded, "broken", "broken.jpg", "broken data stream", "Fix")
    # zeroed scan data is still valid Huffman data: decoded (grey blocks), never a crash
    assert embedded["errors"]["corrupt"] is None or "corrupt.jpg" in embedded["errors"]["corrupt"]
    _vector(embedded, "good")
    assert "failed" in embedded["output"]


@pytest.mark.catalogue(27)
def test_truncated_jpeg_is_a_failure_row(embedded):
    _failed(embedded, "truncated", "truncated.jpg", "truncated")


@pytest.mark.catalogue(28, 29)
def test_empty_and_text_files_named_jpg_are_failure_rows(embedded):
    _failed(embedded, "zero", "zero.jpg", "cannot identify image file")
    _failed(embedded, "text", "text.jpg", "cannot identify image file")


@pytest.mark.catalogue(30)
def test_symlink_to_a_text_file_is_a_failure_row(embedded):
    _failed(embedded, "symlink", "passwd.jpg", "cannot identify image file")


@pytest.mark.catalogue(31)
def test_directory_named_jpg_is_a_failure_row(embedded):
    _failed(embedded, "dir", "dir.jpg", "is a directory")


@pytest.mark.catalogue(32)
def test_decompression_bomb_is_a_failure_row(embedded):
    _failed(embedded, "bomb", "bomb.png", "too large", "decompression bomb", "downscale")


@pytest.mark.catalogue(33)
def test_100_megapixel_png_is_refused_before_decoding(tmp_path):
    from taxoclass.errors import ImageError
    from taxoclass.io.images import load_image

    huge = tmp_path / "huge.png"
    Image.new("1", (10000, 10000)).save(huge)  # 1-bit: cheap to write, 100 Mpx declared
    with warnings.catch_warnings():  # PIL warns above its limit before we refuse
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match=r"huge\.png.*10000x10000.*89,478,485.*downscale"):
            load_image(huge)


@pytest.mark.catalogue(34)
def test_cmyk_jpeg_is_embedded(embedded):
    assert embedded["errors"]["cmyk"] is None
    assert np.isfinite(_vector(embedded, "cmyk")).all()


@pytest.mark.catalogue(35)
def test_16bit_gray_is_scaled_not_clipped(embedded):
    from taxoclass.io.images import load_image

    assert embedded["errors"]["gray16"] is None
    assert _cosine(_vector(embedded, "gray16"), _vector(embedded, "gray8")) > 0.9999
    pixels16 = np.asarray(load_image(embedded["files"]["gray16"]))
    np.testing.assert_array_equal(pixels16, np.asarray(load_image(embedded["files"]["gray8"])))
    assert 0 < pixels16.mean() < 250  # was 99.9 % white before


def test_other_high_bit_depth_gray_is_scaled():
    from taxoclass.io.images import to_rgb

    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    expect = np.rint(ramp * 255).astype(np.uint8)
    for img in (Image.fromarray(ramp, mode="F"),
                Image.fromarray((ramp * 65535).round().astype(np.int32), mode="I"),
                Image.fromarray((ramp * 65535).round().astype(np.uint16))):
        out = to_rgb(img)
        assert out.mode == "L"
        assert np.abs(np.asarray(out).astype(int) - expect).max() <= 1, img.mode


@pytest.mark.catalogue(36)
def test_16bit_rgb_png_is_embedded_like_the_8bit_photo(embedded):
    assert embedded["errors"]["rgb16"] is None
    assert _cosine(_vector(embedded, "rgb16"), _vector(embedded, "good_png")) > 0.9999


@pytest.mark.catalogue(37)
def test_grayscale_png_is_embedded_as_three_equal_channels(embedded):
    assert embedded["errors"]["gray8"] is None
    np.testing.assert_allclose(_vector(embedded, "gray8"), _vector(embedded, "gray_rgb"),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.catalogue(38)
def test_gif_is_embedded_first_frame(embedded):
    assert embedded["errors"]["gif"] is None
    assert np.isfinite(_vector(embedded, "gif")).all()


@pytest.mark.catalogue(39)
def test_1x1_image_is_a_failure_row_not_a_taxon(embedded):
    _failed(embedded, "1x1", "one.png", "1x1 px", "at least 8 px")


@pytest.mark.catalogue(40)
def test_degenerate_sizes_are_failure_rows(embedded):
    _failed(embedded, "3x2", "tiny.png", "3x2 px", "at least 8 px")
    _failed(embedded, "20000x4", "strip.png", "20000x4 px", "at least 8 px")


@pytest.mark.catalogue(41)
def test_rgba_palette_webp_tiff_and_misnamed_png_are_embedded(embedded):
    ref = _vector(embedded, "orig")
    for name in ("rgba", "tiff", "png_as_jpg"):  # lossless copies: the same pixels
        assert embedded["errors"][name] is None, name
        assert _cosine(_vector(embedded, name), ref) > 0.9999, name
    for name in ("webp", "palette"):  # lossy / 256 colours
        assert embedded["errors"][name] is None, name
        assert _cosine(_vector(embedded, name), ref) > 0.8, name


def test_exif_orientation_of_a_jpeg_is_applied(tmp_path):
    from taxoclass.io.images import load_image

    img = photo((40, 20), seed=3)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    img.save(tmp_path / "tagged.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "tagged.jpg")
    assert loaded.size == (20, 40)
    plain = Image.open(tmp_path / "tagged.jpg").convert("RGB").transpose(Image.ROTATE_90)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(plain))


def test_plain_rgb_and_gray_images_load_unchanged(tmp_path):
    from taxoclass.io.images import load_image

    img = photo((40, 30), seed=7)
    img.save(tmp_path / "rgb.png")
    img.convert("L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "rgb.png")), np.asarray(img))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "gray.png")),
                                  np.asarray(img.convert("L").convert("RGB")))


# ------------------------------------------------------------------ predict, rows 91-98


def _mixed_folder(folder: Path, fixture_set) -> Path:
    """Two plant images, broken files, a GIF and a readme.txt."""
    files = make_bad_images(folder)
    keep = {"good", "truncated", "text", "zero", "gif"}
    for name, path in files.items():
        if name not in keep:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    test_images = sorted((Path(fixture_set["images"]) / "test").glob("*.jpg"))
    shutil.copyfile(test_images[0], folder / "leaf.jpg")
    (folder / "readme.txt").write_text("field notes")
    return folder


@pytest.mark.catalogue(91, 92)
def test_predict_empty_or_missing_folder_is_a_clear_error(fixture_model, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clear_error(run("predict", "--model", fixture_model["model"], tmp_path / "empty"),
                       "No images found", "empty")
    assert_clear_error(run("predict", "--model", fixture_model["model"], tmp_path / "nope"),
                       "nope", "no such file or folder")


@pytest.mark.catalogue(93)
def test_predict_missing_jpg_next_to_a_good_one_is_an_error_row(fixture_model, fixture_set,
                                                                tmp_path):
    good = sorted((Path(fixture_set["images"]) / "test").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    res = assert_ok(run("predict", "--model", fixture_model["model"], good,
                        tmp_path / "gone.jpg", "--out", out))
    assert "1 of 2 images failed" in res and "failures.csv" in res, res
    frame = pd.read_csv(out / "predictions.csv")
    errors = dict(zip(frame["image"].map(lambda p: Path(p).name), frame["error"]))
    assert pd.isna(errors[good.name]) and "does not exist" in errors["gone.jpg"]
    failures = pd.read_csv(out / "failures.csv")
    assert failures["image"].map(lambda p: Path(p).name).tolist() == ["gone.jpg"]


@pytest.mark.catalogue(38, 94)
def test_predict_folder_with_non_images_reports_every_file(fixture_model, fixture_set, tmp_path):
    folder = _mixed_folder(tmp_path / "mixed", fixture_set)
    out = tmp_path / "pred"
    res = assert_ok(run("predict", "--model", fixture_model["model"], folder, "--out", out))
    assert "readme.txt" in res and "skipped 1 file" in res, res  # never silently
    assert "3 of 6 images failed" in res and "failures.csv" in res, res
    frame = pd.read_csv(out / "predictions.csv")
    errors = dict(zip(frame["image"].map(lambda p: Path(p).name), frame["error"]))
    assert set(errors) == {"anim.gif", "good.jpg", "leaf.jpg", "text.jpg", "truncated.jpg",
                           "zero.jpg"}  # every image has a row, the GIF too
    assert pd.isna(errors["anim.gif"]) and pd.isna(errors["leaf.jpg"])  # GIF: first frame
    for bad in ("text.jpg", "truncated.jpg", "zero.jpg"):
        assert isinstance(errors[bad], str) and errors[bad], bad
    failures = pd.read_csv(out / "failures.csv")
    assert sorted(failures["image"].map(lambda p: Path(p).name)) == [
        "text.jpg", "truncated.jpg", "zero.jpg"]


@pytest.mark.catalogue(97)
def test_predict_top_k_larger_than_the_classes_works(fixture_model, fixture_set):
    good = sorted((Path(fixture_set["images"]) / "test").glob("*.jpg"))[0]
    assert_ok(run("predict", "--model", fixture_model["model"], good, "--top-k", 1000))


@pytest.mark.catalogue(98)
def test_out_that_is_a_file_is_refused_before_the_model_loads(fixture_model, fixture_set,
                                                              tmp_path):
    good = sorted((Path(fixture_set["images"]) / "test").glob("*.jpg"))[0]
    outfile = tmp_path / "outfile"
    outfile.write_text("keep me")
    for args in (["predict", "--model", tmp_path / "no-model", good],
                 ["flag-unknowns", "--model", tmp_path / "no-model", good],
                 ["plot-report", "--model", tmp_path / "no-model", fixture_set["plots"]],
                 ["calibrate-plots", "--model", tmp_path / "no-model", "--truth",
                  fixture_set["truth"], fixture_set["plots"]]):
        # a model path that does not exist: the --out check must come first
        assert_clear_error(run(*args, "--out", outfile), "outfile", "not a folder")
    assert outfile.read_text() == "keep me"
    res = assert_ok(run("predict", "--model", fixture_model["model"], good,
                        "--out", tmp_path / "fixed"))
    assert (tmp_path / "fixed" / "predictions.csv").is_file(), res


# ------------------------------------------------------------------ flag-unknowns, rows 99-101


@pytest.mark.catalogue(99)
def test_flag_unknowns_empty_or_missing_folder_is_a_clear_error(fixture_model, tmp_path):
    (tmp_path / "empty").mkdir()
    for path, frag in ((tmp_path / "empty", "No images found"),
                       (tmp_path / "nope", "no such file or folder")):
        assert_clear_error(run("flag-unknowns", "--model", fixture_model["model"], path,
                               "--out", tmp_path / "flags"), frag)
    assert not (tmp_path / "flags").exists()


@pytest.mark.catalogue(100)
def test_flag_unknowns_mixed_folder_flags_failures_first(fixture_model, fixture_set, tmp_path):
    folder = _mixed_folder(tmp_path / "mixed", fixture_set)
    out = tmp_path / "flags"
    res = assert_ok(run("flag-unknowns", "--model", fixture_model["model"], folder,
                        "--out", out))
    assert "3 of 6 images failed" in res, res
    flags = pd.read_csv(out / "flags.csv")
    failed = flags["error"].notna()
    assert failed.sum() == 3 and flags.loc[failed, "flagged"].all()  # failed rows are flagged
    assert flags["flagged"].tolist() == sorted(flags["flagged"], reverse=True)  # flagged first
    summary = json.loads((out / "flags_summary.json").read_text())
    assert summary["n_images"] == 6 and summary["resolved_at"]["failed"] == 3
    assert len(pd.read_csv(out / "failures.csv")) == 3
    # the vectors go to the model's training store (issue 15: one store shared by commands)
    assert {"predictions.csv", "provenance.json"} <= {p.name for p in out.iterdir()}
    assert "embeddings: " in res and " reused (" in res, res


@pytest.mark.catalogue(101)
def test_flag_unknowns_with_no_readable_image_says_nothing_was_screened(fixture_model,
                                                                       fixture_set, tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "zero.jpg").write_bytes(b"")
    out = tmp_path / "flags"
    res = run("flag-unknowns", "--model", fixture_model["model"], tmp_path / "text.jpg",
              tmp_path / "zero.jpg", "--out", out)
    assert_clear_error(res, "None of the 2 image(s) could be read", "nothing was screened",
                       "text.jpg", "failures.csv", "Fix")
    assert len(pd.read_csv(out / "flags.csv")) == 2  # the rows say why, all the same
    assert len(pd.read_csv(out / "failures.csv")) == 2
    good = sorted((Path(fixture_set["images"]) / "test").glob("*.jpg"))[0]
    assert_ok(run("flag-unknowns", "--model", fixture_model["model"], good, "--out", out))
    assert len(pd.read_csv(out / "flags.csv")) == 1


# ------------------------------------------------------------------ plot-report, rows 102-106


@pytest.mark.catalogue(102, 106)
def test_plot_report_bad_options_and_paths_are_clear_errors(fixture_model, fixture_set,
                                                            tmp_path):
    model, plots = fixture_model["model"], fixture_set["plots"]
    (tmp_path / "empty").mkdir()
    cases = [((plots, "--grid", 0), ("grid", "at least one row")),
             ((tmp_path / "empty",), ("No images found",)),
             ((tmp_path / "nope",), ("nope", "no such file or folder")),
             ((plots, "--overlap", 1.5), ("overlap", "1.5"))]
    for args, fragments in cases:
        assert_clear_error(run("plot-report", "--model", model, *args, "--out", tmp_path / "r"),
                           *fragments)
    assert not (tmp_path / "r").exists()


@pytest.mark.catalogue(103)
def test_plot_report_huge_grid_is_refused_at_once(fixture_model, fixture_set, tmp_path):
    import time

    from taxoclass.plots.tiling import MAX_TILES

    start = time.monotonic()
    for grids in (("1000",), ("40", "39x40")):
        args = [a for g in grids for a in ("--grid", g)]
        assert_clear_error(run("plot-report", "--model", tmp_path / "no-model",
                               fixture_set["plots"], *args, "--out", tmp_path / "r"),
                           "tiles", f"{MAX_TILES:,}", "coarse")  # before the model loads
    assert time.monotonic() - start < 10
    assert not (tmp_path / "r").exists()
    res = assert_ok(run("plot-report", "--model", fixture_model["model"], fixture_set["plots"],
                        "--grid", 2, "--out", tmp_path / "r"))  # the fix: a coarser grid
    assert "report:" in res


def _plot_folder(folder: Path, fixture_set, *extra: tuple[str, Path | Image.Image]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in sorted(Path(fixture_set["plots"]).glob("*.jpg")):
        shutil.copyfile(p, folder / p.name)
    for name, src in extra:
        if isinstance(src, Image.Image):
            src.save(folder / name)
        else:
            shutil.copyfile(src, folder / name)
    return folder


@pytest.mark.catalogue(104)
def test_plot_report_tiny_photos_are_failure_rows_the_rest_reported(fixture_model, fixture_set,
                                                                    tmp_path):
    folder = _plot_folder(tmp_path / "plots", fixture_set, ("one.png", photo((1, 1))),
                          ("small.png", photo((24, 24), seed=2)))
    out = tmp_path / "r"
    res = assert_ok(run("plot-report", "--model", fixture_model["model"], folder, "--grid", 4,
                        "--out", out))
    assert "2 of 5 photos failed" in res and "failures.csv" in res, res
    failures = dict(pd.read_csv(out / "failures.csv").itertuples(index=False))
    assert set(map(lambda p: Path(p).name, failures)) == {"one.png", "small.png"}
    errors = {Path(p).name: e for p, e in failures.items()}
    assert "1x1 px" in errors["one.png"]
    assert "4x4 grid" in errors["small.png"] and "coarser grid" in errors["small.png"]
    report = json.loads((out / "plot_records.json").read_text())
    assert sorted(p["plot_id"] for p in report["plots"]) == ["plot_1", "plot_2", "plot_3"]
    html = (out / "report.html").read_text()
    assert "one.png" in html and "plot_3" in html


@pytest.mark.catalogue(32, 105)
def test_plot_report_bomb_last_keeps_the_finished_plots(fixture_model, fixture_set, tmp_path):
    bomb = make_bad_images(tmp_path / "bad")["bomb"]
    folder = _plot_folder(tmp_path / "plots", fixture_set, ("plot_4.jpg", photo((96, 96), 5)),
                          ("zz_bomb.png", bomb))
    out = tmp_path / "r"
    res = assert_ok(run("plot-report", "--model", fixture_model["model"], folder, "--grid", 3,
                        "--out", out))
    assert "1 of 5 photos failed" in res, res
    failures = pd.read_csv(out / "failures.csv")
    assert failures["photo"].map(lambda p: Path(p).name).tolist() == ["zz_bomb.png"]
    assert "decompression bomb" in failures["error"][0]
    report = json.loads((out / "plot_records.json").read_text())
    assert len(report["plots"]) == 4 and report["failures"][0]["photo"].endswith("zz_bomb.png")
    for name in ("plot_records.csv", "plantclef_submission_names.csv", "occurrences_dwc.csv",
                 "occurrences_dwca.zip", "provenance.json", "report.html"):
        assert (out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.")]


def test_calibrate_plots_tiny_photo_is_a_failure_row(fixture_model, fixture_set, tmp_path):
    folder = _plot_folder(tmp_path / "plots", fixture_set, ("plot_4.png", photo((1, 1))))
    truth = pd.read_csv(fixture_set["truth"])
    truth = pd.concat([truth, pd.DataFrame({"plot_id": ["plot_4"],
                                            "species": ["Acer campestre"]})])
    truth.to_csv(tmp_path / "truth.csv", index=False)
    out = tmp_path / "cal"
    res = assert_ok(run("calibrate-plots", "--model", fixture_model["model"], folder,
                        "--truth", tmp_path / "truth.csv", "--out", out, "--grid", 2))
    assert "1 of 4 photos failed" in res, res
    failures = pd.read_csv(out / "failures.csv")
    assert failures["photo"].map(lambda p: Path(p).name).tolist() == ["plot_4.png"]
    assert (out / "plot_settings.json").is_file()
