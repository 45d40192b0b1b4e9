"""Tile-like views: geometry, backgrounds, settings, and the resumable view folder."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from taxoclass.errors import CacheError, ConfigError, ImageError
from taxoclass.features.views import (
    ViewSettings,
    clutter_background,
    paste_object,
    stable_int,
    tile_view,
    write_views,
)

W, H = 200, 120  # source ellipse image: the ellipse fills it


def ellipse_image(fill: int = 0) -> Image.Image:
    img = Image.new("RGB", (W, H), (fill, fill, fill))
    ImageDraw.Draw(img).ellipse((0, 0, W - 1, H - 1), fill="white")
    return img


def square_image() -> Image.Image:
    img = Image.new("RGB", (120, 120))
    ImageDraw.Draw(img).rectangle((20, 20, 99, 99), fill="white")  # 80 x 80 object
    return img


def disc_image() -> Image.Image:
    img = Image.new("RGB", (100, 100))
    ImageDraw.Draw(img).ellipse((0, 0, 99, 99), fill="white")
    return img


def object_pixels(view: Image.Image) -> np.ndarray:
    return np.asarray(view.convert("L")) > 128


def settings(**kw) -> ViewSettings:
    base = dict(size=100, background="black", rotate=False, scale=(1.0, 1.0), max_cut=0.0)
    return ViewSettings(**{**base, **kw})


@pytest.fixture
def sources(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    items = []
    for i, (w, h) in enumerate([(200, 120), (90, 160), (150, 150)]):
        img = Image.new("RGB", (w, h))
        ImageDraw.Draw(img).ellipse((5, 5, w - 6, h - 6), fill=(200, 230 - 40 * i, 90))
        path = folder / f"leaf {i}.png"  # a space: the file name must be made safe
        img.save(path)
        items.append((f"img/{i}", path))
    return items


# ---------------------------------------------------------------------------- one view


def test_view_is_rgb_square_of_the_requested_size():
    for s in (ViewSettings(size=96), settings(size=64, mask="none", rotate=True)):
        view = tile_view(ellipse_image(), np.random.default_rng(1), s)
        assert view.mode == "RGB" and view.size == (s.size, s.size)


def test_object_is_scaled_by_its_longest_side():
    # the source has black margins: the object (not the image) is scaled to the view side
    src = Image.new("RGB", (400, 300))
    src.paste(ellipse_image(), (150, 90))
    view = tile_view(src, np.random.default_rng(0), settings(size=100))
    expected = math.pi * 50 * 50 * H / W  # ellipse with longest side 100 px
    assert object_pixels(view).sum() == pytest.approx(expected, rel=0.03)
    for scale in (0.5, 1.3):
        view = tile_view(src, np.random.default_rng(3), settings(scale=(scale, scale),
                                                                 max_cut=0.99))
        assert object_pixels(view).sum() <= expected * scale**2 * 1.03
    small = tile_view(src, np.random.default_rng(3), settings(scale=(0.5, 0.5)))
    assert object_pixels(small).sum() == pytest.approx(expected * 0.25, rel=0.05)


def test_paste_object_adds_a_scaled_object_to_an_existing_view():
    s = settings(scale=(0.5, 0.5))
    view = tile_view(square_image(), np.random.default_rng(0), s)
    before = object_pixels(view).sum()
    assert before == pytest.approx(80 * 80 * (50 / 80) ** 2, rel=0.05)
    rng = np.random.default_rng(4)
    assert paste_object(view, disc_image(), rng, s, max_cut=0.0)
    added = object_pixels(view).sum() - before
    assert 0 < added <= math.pi * 25 * 25 * 1.05  # at most the whole 50 px disc, new pixels
    # the same draws as tile_view's: same generator state, same placement
    again = tile_view(square_image(), np.random.default_rng(0), s)
    paste_object(again, disc_image(), np.random.default_rng(4), s, max_cut=0.0)
    assert np.array_equal(np.asarray(again), np.asarray(view))
    sparse = Image.new("RGB", (91, 91))  # white dots 10 px apart: grey when shrunk
    for x in range(0, 91, 10):
        for y in range(0, 91, 10):
            sparse.putpixel((x, y), (255, 255, 255))
    blank = Image.new("RGB", (100, 100))
    assert not paste_object(blank, sparse, np.random.default_rng(0), settings(scale=(0.05, 0.05)))
    assert not np.asarray(blank).any()  # the object vanished: nothing pasted


def test_black_background_is_zero_outside_the_object_and_clutter_is_not_uniform():
    grey = np.asarray(tile_view(ellipse_image(), np.random.default_rng(0),
                                settings(scale=(0.6, 0.6))).convert("L"))
    # threshold mask: only pixels brighter than object_threshold are pasted
    assert np.all((grey == 0) | (grey > 80))
    assert (grey == 0).mean() > 0.5
    for kind in ("clutter", "noise"):
        view = tile_view(ellipse_image(), np.random.default_rng(0),
                         settings(background=kind, scale=(0.3, 0.3)))
        rgb = np.asarray(view).astype(float)
        soil = rgb[np.asarray(view.convert("L")) < 200]
        assert len(soil) > 0.7 * 100 * 100
        assert soil.mean() > 15 and soil.std() > 5, kind
    plain = np.asarray(clutter_background(128, np.random.default_rng(0), clutter=False))
    busy = np.asarray(clutter_background(128, np.random.default_rng(0), clutter=True))
    assert plain.shape == busy.shape == (128, 128, 3)
    assert busy.astype(float).std() > plain.astype(float).std()


def test_mask_none_pastes_the_whole_rectangle():
    src = ellipse_image(fill=50)  # grey surround, below object_threshold
    grey_none = np.asarray(tile_view(src, np.random.default_rng(0),
                                     settings(mask="none")).convert("L"))
    grey_thr = np.asarray(tile_view(src, np.random.default_rng(0),
                                    settings(mask="threshold")).convert("L"))
    surround = (np.abs(grey_none.astype(int) - 50) <= 2).sum()
    # the rectangle's corners outside the ellipse (less a band blended with the ellipse edge)
    assert 0.7 < surround / (100 * 60 - math.pi * 50 * 30) < 1.02
    assert (np.abs(grey_thr.astype(int) - 50) <= 2).sum() == 0


def test_rotation_changes_the_view_and_keeps_the_area():
    areas, views = [], []
    for seed in range(12):
        view = tile_view(ellipse_image(), np.random.default_rng(seed),
                         settings(rotate=True, scale=(0.7, 0.7)))
        areas.append(object_pixels(view).sum())
        views.append(np.asarray(view))
    expected = math.pi * 35 * 35 * H / W
    assert np.allclose(areas, expected, rtol=0.05)
    assert len({v.tobytes() for v in views}) == len(views)


def test_max_cut_bounds_the_share_outside_the_view():
    c = 0.35
    expected = 80 * 80  # the square, longest side 0.8 * 100, not rotated
    fractions = [
        object_pixels(tile_view(square_image(), np.random.default_rng(seed),
                                settings(scale=(0.8, 0.8), max_cut=c))).sum() / expected
        for seed in range(200)
    ]
    assert min(fractions) >= (1 - c) ** 2 - 0.02
    assert min(fractions) < 0.6  # objects are really cut by the border
    assert max(fractions) == pytest.approx(1.0, abs=0.01)
    # rotated ellipses: at most max_cut of the width and of the height outside
    ell = math.pi * 40 * 40 * H / W
    for seed in range(100):
        view = tile_view(ellipse_image(), np.random.default_rng(seed),
                         settings(scale=(0.8, 0.8), max_cut=c, rotate=True))
        assert object_pixels(view).sum() / ell >= (1 - c) ** 2 - 0.03


def test_max_cut_zero_keeps_the_object_wholly_inside():
    ell = math.pi * 50 * 50 * H / W
    for seed in range(60):
        view = tile_view(ellipse_image(), np.random.default_rng(seed),
                         settings(rotate=True, scale=(1.0, 1.0), max_cut=0.0))
        assert object_pixels(view).sum() == pytest.approx(ell, rel=0.04)
        # a disc scaled 1.4 does not fit: it is shrunk to the view side, not cut
        disc = object_pixels(tile_view(disc_image(), np.random.default_rng(seed),
                                       settings(rotate=True, scale=(1.4, 1.4), max_cut=0.0)))
        assert disc.sum() == pytest.approx(math.pi * 50 * 50, rel=0.04)
    # with max_cut > 0 an object too big for the view is cut, not shrunk
    big = [object_pixels(tile_view(disc_image(), np.random.default_rng(seed),
                                   settings(scale=(1.4, 1.4), max_cut=0.35))).sum()
           for seed in range(10)]
    assert max(big) > math.pi * 50 * 50 * 1.05


# ---------------------------------------------------------------------------- settings


def test_from_mapping_reads_lists_and_round_trips():
    s = ViewSettings.from_mapping({"scale": [0.5, 1], "size": 64, "max_cut": 0})
    assert s.scale == (0.5, 1.0) and s.size == 64 and s.max_cut == 0.0
    assert ViewSettings.from_mapping(s.to_dict()) == s
    assert json.loads(json.dumps(s.to_dict())) == s.to_dict()
    assert ViewSettings.from_mapping(None) == ViewSettings()


@pytest.mark.parametrize(("mapping", "key"), [
    ({"sizee": 100}, "sizee"),
    ({"scale": (0, 1)}, "scale"),
    ({"scale": (1.2, 0.5)}, "scale"),
    ({"scale": 1.0}, "scale"),
    ({"background": "nonexistent-folder"}, "background"),
    ({"max_cut": 1.0}, "max_cut"),
    ({"views_per_image": -1}, "views_per_image"),
    ({"views_per_image": 2.5}, "views_per_image"),
    ({"rotate": "yes"}, "rotate"),
    ({"mask": "alpha"}, "mask"),
    ({"object_threshold": 300}, "object_threshold"),
    ({"seed": -3}, "seed"),
])
def test_from_mapping_rejects_bad_settings(mapping, key):
    with pytest.raises(ConfigError, match=key):
        ViewSettings.from_mapping(mapping)


def test_background_folder_of_photos(tmp_path):
    folder = tmp_path / "soil"
    folder.mkdir()
    Image.new("RGB", (64, 48), (200, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (40, 70), (0, 200, 0)).save(folder / "b.PNG")
    (folder / "notes.txt").write_text("not a photo")
    s = ViewSettings.from_mapping({"background": str(folder), "size": 48, "scale": [0.3, 0.3],
                                   "rotate": False})
    corners = set()
    for seed in range(16):
        view = np.asarray(tile_view(ellipse_image(), np.random.default_rng(seed), s))
        for px in (view[0, 0], view[0, -1], view[-1, 0], view[-1, -1]):
            assert tuple(int(v) for v in px) in {(200, 0, 0), (0, 200, 0)}
            corners.add(tuple(int(v) for v in px))
    assert corners == {(200, 0, 0), (0, 200, 0)}  # both photos are used


def test_empty_background_folder_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty-backgrounds"
    empty.mkdir()
    with pytest.raises(ConfigError, match="empty-backgrounds"):
        ViewSettings.from_mapping({"background": str(empty)})
    with pytest.raises(ConfigError, match="empty-backgrounds"):
        ViewSettings(background=str(empty))


def test_stable_int_does_not_depend_on_python_hash():
    digest = hashlib.sha256(b"leaf-1").digest()
    assert stable_int("leaf-1") == int.from_bytes(digest[:8], "big") >> 1
    assert stable_int("leaf-1") != stable_int("leaf-2")


# ---------------------------------------------------------------------------- view folder


def _bytes(frame: pd.DataFrame) -> dict[str, bytes]:
    return {row.view_id: open(row.path, "rb").read() for row in frame.itertuples()}


def test_write_views_is_deterministic_and_resumable(tmp_path, sources):
    s = ViewSettings(views_per_image=3, size=64, seed=7)
    a = write_views(sources, tmp_path / "a", s)
    b = write_views(list(reversed(sources)), tmp_path / "b", s)
    assert list(a.columns) == ["view_id", "source_id", "path", "k"]
    assert len(a) == 9 and a["k"].tolist() == [0, 1, 2] * 3
    assert a["view_id"].iloc[0] == "img/0#v0" and a["source_id"].iloc[0] == "img/0"
    for path in a["path"]:
        assert path.startswith(str(tmp_path / "a" / "views")) and path.endswith(".jpg")
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (64, 64)
    assert _bytes(a) == _bytes(b)  # item order does not matter
    assert len(set(_bytes(a).values())) == 9  # every view differs
    assert json.loads((tmp_path / "a" / "views.json").read_text())["seed"] == 7
    assert list((tmp_path / "a" / "views").iterdir()) and not list(
        (tmp_path / "a" / "views").glob(".*"))  # no temp files left

    stamps = {p: (tmp_path / "a" / "views" / p).stat().st_mtime_ns
              for p in (p.name for p in (tmp_path / "a" / "views").iterdir())}
    again = write_views(sources, tmp_path / "a", s)
    pd.testing.assert_frame_equal(again, a)
    assert {p: (tmp_path / "a" / "views" / p).stat().st_mtime_ns for p in stamps} == stamps

    # a missing view is redone, identical; the others are not touched
    lost = a["path"].iloc[4]
    original = open(lost, "rb").read()
    (tmp_path / "a" / "views" / lost.rsplit("/", 1)[1]).unlink()
    write_views(sources, tmp_path / "a", s)
    assert open(lost, "rb").read() == original

    # another seed gives other views
    c = write_views(sources, tmp_path / "c", ViewSettings(views_per_image=3, size=64, seed=8))
    assert set(_bytes(c).values()).isdisjoint(_bytes(a).values())


def test_more_views_per_image_reuses_the_folder(tmp_path, sources):
    two = write_views(sources, tmp_path / "v", ViewSettings(views_per_image=2, size=48))
    three = write_views(sources, tmp_path / "v", ViewSettings(views_per_image=3, size=48))
    assert len(three) == 9
    kept = three[three["k"] < 2].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, two)


def test_other_settings_in_an_existing_folder_raise(tmp_path, sources):
    write_views(sources[:1], tmp_path / "v", ViewSettings(views_per_image=1, size=48))
    with pytest.raises(CacheError) as info:
        write_views(sources[:1], tmp_path / "v",
                    ViewSettings(views_per_image=1, size=48, scale=(0.5, 1.0)))
    message = str(info.value)
    assert "scale" in message and str(tmp_path / "v") in message
    assert "[0.5, 1.0]" in message and "[0.45, 1.4]" in message
    assert "size" not in message.split("settings:")[1].split(".")[0]


def test_unreadable_sources_are_reported(tmp_path, sources):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"not an image")
    items = [sources[0], ("broken", bad), ("missing", tmp_path / "nope.jpg"), sources[1]]
    out = write_views(items, tmp_path / "v", ViewSettings(views_per_image=2, size=48))
    assert sorted(set(out["source_id"])) == ["img/0", "img/1"] and len(out) == 4
    failures = pd.read_csv(tmp_path / "v" / "failures.csv")
    assert failures["image_id"].tolist() == ["broken", "missing"]
    assert failures["path"].tolist() == [str(bad), str(tmp_path / "nope.jpg")]
    assert failures["error"].str.contains("x.jpg").iloc[0]

    with pytest.raises(ImageError, match="None of the 2"):
        write_views([("broken", bad), ("missing", tmp_path / "nope.jpg")], tmp_path / "w",
                    ViewSettings(views_per_image=2, size=48))
    assert len(pd.read_csv(tmp_path / "w" / "failures.csv")) == 2


def test_zero_views_and_duplicate_ids(tmp_path, sources):
    none = write_views(sources, tmp_path / "v", ViewSettings(views_per_image=0))
    assert len(none) == 0 and list(none.columns) == ["view_id", "source_id", "path", "k"]
    assert not (tmp_path / "v").exists()
    with pytest.raises(CacheError, match="img/0"):
        write_views([sources[0], sources[0]], tmp_path / "d",
                    ViewSettings(size=48, views_per_image=1))


def test_progress_bar_and_folder_backgrounds(tmp_path, sources, capsys):
    folder = tmp_path / "soil"
    folder.mkdir()
    Image.new("RGB", (30, 30), (0, 0, 180)).save(folder / "blue.jpg")
    s = ViewSettings(views_per_image=1, size=40, background=str(folder), scale=(0.3, 0.3))
    out = write_views(sources, tmp_path / "v", s, progress=True)
    assert len(out) == 3
    with Image.open(out["path"].iloc[0]) as img:
        r, g, b = img.convert("RGB").getpixel((0, 0))
    assert b > 150 and r < 40 and g < 40
    assert "views" in capsys.readouterr().err
