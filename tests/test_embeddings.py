"""Embedding cache: resume bit for bit, failures recorded and retried, vectors found by
content (never by id), other backbones side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from taxoclass.errors import CacheError, ImageError
from taxoclass.features.backbones import create_backbone
from taxoclass.features.embeddings import compute_embeddings, load_embeddings
from taxoclass.io.images import load_image


@pytest.fixture
def tiny_backbone(tiny_dino_kwargs):
    torch.manual_seed(0)
    return create_backbone(
        "vit_base_patch14_reg4_dinov2", pretrained=False, model_kwargs=tiny_dino_kwargs
    )


@pytest.fixture
def items(leaf_image_paths) -> list[tuple[object, Path]]:
    # int ids on purpose: the cache normalises them to str
    return [(int(p.stem), p) for p in leaf_image_paths[:7]]


def _read_manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_interrupted_then_resumed_equals_uninterrupted_bit_for_bit(tmp_path, tiny_backbone, items):
    kwargs = dict(batch_size=2, chunk_size=3)  # 7 images -> chunks of 3, 3, 1
    full = compute_embeddings(items, tiny_backbone, tmp_path / "full", **kwargs)
    assert full.n_computed == 7 and full.n_reused == 0
    assert full.cache.embeddings.shape == (7, 64) and full.cache.embeddings.dtype == np.float32
    assert full.cache.image_ids.tolist() == [str(i) for i, _ in items]

    part_dir = tmp_path / "part"
    part = compute_embeddings(items, tiny_backbone, part_dir, max_chunks=1, **kwargs)
    assert part.n_computed == 3
    manifest = _read_manifest(part_dir)
    assert manifest["complete"] is False
    assert manifest["counts"]["n_computed"] == 3
    assert len(list((part_dir / "store").glob("*/vectors/*.npz"))) == 1  # one chunk stored
    with pytest.raises(CacheError, match=r"incomplete \(\d+ of 7 images done\).*resume"):
        load_embeddings(part_dir)

    seen: list[tuple[int, int]] = []
    resumed = compute_embeddings(
        items, tiny_backbone, part_dir, progress=lambda d, t: seen.append((d, t)), **kwargs
    )
    assert resumed.n_reused == 3 and resumed.n_computed == 4
    assert seen[0] == (3, 7) and seen[-1] == (7, 7)
    loaded = load_embeddings(part_dir)
    assert loaded.manifest["complete"] is True
    assert loaded.image_ids.tolist() == full.cache.image_ids.tolist()
    assert loaded.embeddings.tobytes() == full.cache.embeddings.tobytes()  # bit for bit

    # a finished cache is reused entirely, nothing recomputed
    again = compute_embeddings(items, tiny_backbone, part_dir, **kwargs)
    assert again.n_reused == 7 and again.n_computed == 0
    vec = again.cache.as_dict()[str(items[4][0])]
    assert np.array_equal(vec, full.cache.embeddings[4])


def test_embeddings_match_direct_backbone_call_and_workers(tmp_path, tiny_backbone, items):
    res = compute_embeddings(items[:4], tiny_backbone, tmp_path / "w2", batch_size=4, num_workers=2)
    x = torch.stack([tiny_backbone.transform(load_image(p)) for _, p in items[:4]])
    direct = tiny_backbone.embed(x).numpy()
    assert np.array_equal(res.cache.embeddings, direct)
    assert np.isfinite(res.cache.embeddings).all()


def test_corrupt_and_missing_images_are_recorded_and_skipped(tmp_path, tiny_backbone, items):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg \x00\xff" * 20)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(items[0][1]).read_bytes()[:600])
    missing = tmp_path / "missing.jpg"
    bad = [("bad-corrupt", corrupt), ("bad-missing", missing), ("bad-truncated", truncated)]
    mixed = [items[0], bad[0], items[1], bad[1], items[2], bad[2]]
    out = tmp_path / "cache"

    res = compute_embeddings(mixed, tiny_backbone, out, batch_size=2, chunk_size=4)

    assert res.cache.image_ids.tolist() == [str(i) for i, _ in items[:3]]
    assert res.cache.embeddings.shape == (3, 64)
    failures = pd.read_csv(out / "failures.csv", dtype=str)
    assert failures["image_id"].tolist() == ["bad-corrupt", "bad-missing", "bad-truncated"]
    assert failures["path"].tolist() == [str(corrupt), str(missing), str(truncated)]
    assert "cannot be decoded" in failures["error"][0] and str(corrupt) in failures["error"][0]
    assert "does not exist" in failures["error"][1]
    assert "cannot be decoded" in failures["error"][2]
    assert res.failures["image_id"].tolist() == failures["image_id"].tolist()
    manifest = _read_manifest(out)
    assert manifest["complete"] is True
    assert manifest["counts"]["n_embedded"] == 3 and manifest["counts"]["n_failed"] == 3

    # failures are not cached: tried again on the next run, listed until they succeed
    again = compute_embeddings(mixed, tiny_backbone, out, batch_size=2, chunk_size=4)
    assert again.n_reused == 3 and again.n_computed == 3
    assert again.failures["image_id"].tolist() == ["bad-corrupt", "bad-missing", "bad-truncated"]
    shutil.copy(items[3][1], missing)  # the missing file appears: it is embedded now
    fixed = compute_embeddings(mixed, tiny_backbone, out, batch_size=2, chunk_size=4)
    assert fixed.cache.image_ids.tolist() == [str(items[0][0]), str(items[1][0]),
                                              "bad-missing", str(items[2][0])]  # request order
    assert pd.read_csv(out / "failures.csv", dtype=str)["image_id"].tolist() == [
        "bad-corrupt", "bad-truncated"]


def test_other_backbones_and_image_sets_live_side_by_side(tmp_path, tiny_backbone, items):
    out = tmp_path / "cache"
    first = compute_embeddings(items[:3], tiny_backbone, out, chunk_size=2)
    other = create_backbone(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        model_kwargs=dict(img_size=56, depth=1, embed_dim=32, num_heads=2),
    )
    res = compute_embeddings(items[:3], other, out, chunk_size=2)
    assert res.n_computed == 3 and res.cache.embeddings.shape == (3, 32)
    assert load_embeddings(out).manifest["backbone"]["name"] == "vit_small_patch14_reg4_dinov2"
    assert len([p for p in (out / "store").iterdir() if p.is_dir()]) == 2

    # another image set (other ids too): the shared images are reused by content
    renamed = [(f"x{i}", p) for i, p in items[1:4]]
    res = compute_embeddings(renamed, tiny_backbone, out, chunk_size=2)
    assert res.n_reused == 2 and res.n_computed == 1
    assert np.array_equal(res.cache.embeddings[:2], first.cache.embeddings[1:3])

    res = compute_embeddings(items[:3], tiny_backbone, out, chunk_size=2, overwrite=True)
    assert res.n_computed == 3 and res.n_reused == 0
    assert len([p for p in (out / "store").iterdir() if p.is_dir()]) == 1


def test_vectors_follow_the_file_content_not_the_id(tmp_path, tiny_backbone, items):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    shutil.copy(items[0][1], a)
    shutil.copy(items[1][1], b)
    out = tmp_path / "cache"
    before = compute_embeddings([("a", a), ("b", b)], tiny_backbone, out).cache.embeddings
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)  # swap the two files' contents in place
    b.write_bytes(a_bytes)
    after = compute_embeddings([("a", a), ("b", b)], tiny_backbone, out)
    assert after.n_reused == 2 and after.n_computed == 0  # same bytes: stored vectors
    assert np.array_equal(after.cache.embeddings, before[::-1])


def test_load_embeddings_missing_dir_names_command(tmp_path):
    with pytest.raises(CacheError, match="taxoclass embed"):
        load_embeddings(tmp_path / "nothing")


def test_load_image_errors_name_path_and_fix(tmp_path, leaf_image_paths):
    img = load_image(leaf_image_paths[0])
    assert img.mode == "RGB" and min(img.size) > 0
    with pytest.raises(ImageError, match="does not exist.*Fix"):
        load_image(tmp_path / "absent.jpg")
    truncated = tmp_path / "t.jpg"
    shutil.copy(leaf_image_paths[0], truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(ImageError, match=r"t\.jpg.*cannot be decoded"):
        load_image(truncated)


def test_put_vectors_are_found_by_content_and_nothing_is_embedded(tmp_path):
    from taxoclass.features.backbones import backbone_spec
    from taxoclass.features.embeddings import embed_with_spec, put_vectors

    paths = []
    for i in range(3):  # placeholder files: their bytes name the vectors, nothing decodes them
        p = tmp_path / f"img{i}.bin"
        p.write_bytes(f"image {i}".encode())
        paths.append(str(p))
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    spec = backbone_spec({"name": "efficientnet-lite0"})
    put_vectors(tmp_path / "cache", paths, x, spec, {"name": "simulated-a"})
    res = embed_with_spec(paths[::-1], tmp_path / "cache", spec)  # any order, by content
    assert res.n_computed == 0 and res.n_reused == 3 and res.found.all()
    assert np.array_equal(res.embeddings, x[::-1])
    with pytest.raises(ValueError, match=r"one row per path \(2\)"):
        put_vectors(tmp_path / "cache", paths[:2], x, spec, {})
    put_vectors(tmp_path / "cache", paths, x, spec, {"name": "simulated-a"})  # same maker: ok
    with pytest.raises(ValueError, match="already holds vectors of this backbone spec made "
                                         "by .*simulated-a.*Fix: pass another folder"):
        put_vectors(tmp_path / "cache", paths, x, spec, {"name": "simulated-b"})
