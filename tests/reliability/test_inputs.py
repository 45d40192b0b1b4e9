"""Bad inputs (catalogue rows 1-25, 50-56, 61-72, 96, 115, 116): annotation files, training
data, configs, options and backbones. Each is refused with one clear message (exit 2 for a
command, exit 1 with the full report for ``validate``) or handled correctly.

Decisions these tests pin:
- ``file_name``s outside the images root (``../``, absolute) are errors everywhere annotations
  load (validate, embed, train, evaluate) unless allowed: ``--allow-outside-root`` (validate,
  embed, evaluate) or ``data.allow_outside_root: true`` (train);
- one file under two image ids is an error when the labels differ, a warning when they agree;
  ids equal as text (``201`` and ``"201"``) are an error;
- ``embed`` checks the image list (ids, file names, paths) and only warns about label
  problems, since it also embeds unlabelled files;
- a genus name under two families is two taxa (a warning in validate; train works);
- training data: 0 labelled images or a single species is an error; a species with one image
  and a category without images are warnings naming them (the category stays an output class);
- the default DINOv2 backbone without network fails within seconds (a 2 s probe of the hub,
  or ``TAXOCLASS_OFFLINE=1``), naming ``--checkpoint`` and ``--backbone efficientnet-lite0``.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from .conftest import assert_clear_error, assert_ok, run


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def base(fixture_set) -> dict:
    """The fixture annotations (60 images, 6 species, 3 genera, 2 families)."""
    return json.loads(Path(fixture_set["train"]).read_text())


def _write(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _small(base: dict, n: int = 8) -> dict:
    """The first ``n`` images of the fixture file with their annotations."""
    d = copy.deepcopy(base)
    d["images"] = d["images"][:n]
    ids = {im["image_id"] for im in d["images"]}
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in ids]
    return d


def assert_report(res, code: int, *fragments: str) -> str:
    """``validate``'s verdict: exit ``code``, the report holds each fragment, no traceback."""
    assert not res.traceback, f"traceback:\n{res.output}\n{res.exception!r}"
    assert res.code == code, f"exit {res.code}, expected {code}:\n{res.output}"
    for frag in fragments:
        assert frag.lower() in res.output.lower(), f"{frag!r} not in:\n{res.output}"
    return res.output


def _embed(ann: Path, root: Path, out: Path, backbone: list[str], *extra: str):
    return run("embed", "--annotations", ann, "--images-root", root, "--out", out,
               "--batch-size", 8, *backbone, *extra)


@pytest.fixture
def train_args(fixture_set, fixture_model, tmp_path) -> list[str]:
    """``train`` on the fixture config, a copy of the session's embedding cache, 3 epochs."""
    emb = tmp_path / "train-cache"
    shutil.copytree(fixture_model["emb"], emb)
    return ["train", "--config", fixture_set["config"], "--set", f"embeddings.cache={emb}",
            "--set", "train.epochs=3", "--set", f"data.images_root={fixture_set['dir']}"]


def _train(train_args: list[str], ann: Path, out: Path, *extra: str):
    return run(*train_args, "--set", f"data.annotations={ann}", "--set", f"out={out}", *extra)


# ------------------------------------------------------------------ unreadable files, 1-5, 22-25
@pytest.mark.catalogue(1, 2, 3, 4, 22, 23, 25)
@pytest.mark.parametrize("case, raw, fragments", [
    ("truncated", None, ("truncated.json", "broken JSON at line", "json.tool")),
    ("notjson", b"this is not json\n", ("broken JSON at line 1, column 1",)),
    ("toplist", b"[1, 2, 3]", ("expected a JSON object", "found a list")),
    ("topstring", b'"images"', ("expected a JSON object", "found a str")),
    ("bom", b"\xef\xbb\xbf{\"images\": []}", ("BOM",)),
    ("latin1", '{"images": [], "note": "d\u00e9j\u00e0"}'.encode("latin-1"),
     ("not UTF-8", "saved as UTF-8")),
    ("deep", b"[" * 100_000 + b"]" * 100_000, ("nested deeper", "regenerate")),
])
def test_unreadable_annotation_files_are_one_clear_error(base, tmp_path, case, raw, fragments):
    path = tmp_path / f"{case}.json"
    path.write_bytes(raw if raw is not None else json.dumps(base).encode()[:900])
    assert_clear_error(run("validate", path), path.name, *fragments)


@pytest.mark.catalogue(5, 24)
def test_schema_problems_are_listed_with_path_and_fix(base, tmp_path):
    no_images = {k: v for k, v in base.items() if k != "images"}
    out = assert_report(run("validate", _write(tmp_path, "noimg.json", no_images)), 1,
                        "ERROR $: expected a 'images' field", "Fix:", "FAILED")
    assert "Traceback" not in out
    nan = json.dumps(_small(base)).replace('"license": 0', '"license": NaN', 1)
    assert_report(run("validate", _write(tmp_path, "nan.json", nan)), 1,
                  "$.images[0].license", "found nan", "FAILED")


@pytest.mark.catalogue(6)
def test_missing_categories_names_each_annotation(base, tmp_path):
    d = {k: v for k, v in _small(base).items() if k != "categories"}
    out = assert_report(run("validate", _write(tmp_path, "nocat.json", d)), 1,
                        "ERROR $.categories", "a 'categories' list", "no categories", "FAILED")
    assert out.count("ERROR") == 1  # one problem, not one per annotation


@pytest.mark.catalogue(7)
def test_image_list_without_annotations_is_valid_with_a_warning(base, tmp_path):
    d = {k: v for k, v in _small(base).items() if k != "annotations"}
    out = assert_report(run("validate", _write(tmp_path, "noann.json", d)), 0,
                        "WARNING $.annotations", "0 annotations: nothing to train on",
                        "OK", "8 images, 0 annotations")
    assert "ERROR" not in out


# ------------------------------------------------------------------ embed validates, 8, 9, 18-20
@pytest.mark.catalogue(8, 9, 18, 20)
@pytest.mark.parametrize("case, fragments", [
    ("no_file_name", ("$.images[2]", "'file_name' field")),
    ("dup_image_ids", ("$.images[3].image_id", "unique image_id")),
    ("image_twice_exact", ("unique image_id",)),
    ("images_dict", ("$.images", "type array")),
])
def test_embed_checks_the_image_list_before_any_work(base, fixture_set, tiny_backbone, tmp_path,
                                                      case, fragments):
    d = _small(base)
    if case == "no_file_name":
        del d["images"][2]["file_name"]
    elif case == "dup_image_ids":
        d["images"][3]["image_id"] = d["images"][1]["image_id"]
    elif case == "image_twice_exact":
        d["images"].append(dict(d["images"][0]))
        d["annotations"].append(dict(d["annotations"][0], category_id=3))
    else:
        d["images"] = {str(im["image_id"]): im for im in d["images"]}
    ann = _write(tmp_path, f"{case}.json", d)
    assert_report(run("validate", ann), 1, *fragments, "Fix:", "FAILED")
    if case == "image_twice_exact":
        assert_report(run("validate", ann), 1, "one annotation per image")
    out = tmp_path / "emb"
    started = time.monotonic()
    assert_clear_error(_embed(ann, fixture_set["dir"], out, tiny_backbone), ann.name, *fragments)
    assert time.monotonic() - started < 10 and not out.exists()  # refused before any work


@pytest.mark.catalogue(19)
def test_wrong_label_types_fail_validate_and_only_warn_in_embed(base, fixture_set, tiny_backbone,
                                                                tmp_path):
    d = _small(base)
    d["annotations"][0]["category_id"] = None
    d["images"][1]["image_id"] = "one"
    d["annotations"][1]["image_id"] = "one"
    ann = _write(tmp_path, "wrong_types.json", d)
    assert_report(run("validate", ann), 1, "$.annotations[0].category_id",
                  "expected type ['integer', 'string'], found None")
    # embed needs no labels: it embeds all 8 images and says the labels will be refused
    out = assert_ok(_embed(ann, fixture_set["dir"], tmp_path / "emb", tiny_backbone))
    assert "8 embeddings" in out and "warning:" in out and "taxoclass validate" in out


# ------------------------------------------------------------------ taxa, 10, 11, 14
@pytest.mark.catalogue(10)
def test_family_only_category_is_accepted_and_a_gap_is_a_clear_error(base, tmp_path,
                                                                     train_args):
    """Issue 15: a category may stop at any rank. Family-only Fagaceae (beside the named
    Quercus robur) validates and trains on family only; a genus without its family (a rank
    missing above a filled one) is still refused, by validate and by train."""
    from taxoclass.taxonomy.tree import Taxonomy

    d = copy.deepcopy(base)
    d["categories"][5].update(genus="", species="")
    for a in d["annotations"]:  # a family-only label has no genus_id
        if a["category_id"] == 5:
            a.pop("genus_id")
    ann = _write(tmp_path, "family_only.json", d)
    assert_report(run("validate", ann), 0, "OK", "1 family-level categories")
    assert_ok(_train(train_args, ann, tmp_path / "model"))
    tax = Taxonomy.load(tmp_path / "model" / "taxonomy.json")
    assert tax.summary() == {"family": 2, "genus": 3, "species": 5}
    assert ("Fagaceae",) in tax.nodes("family") and ("Fagaceae", "Quercus", "Quercus petraea") \
        not in tax.nodes("species")
    gap = copy.deepcopy(base)
    gap["categories"][5].update(family="")
    bad = _write(tmp_path, "gap.json", gap)
    assert_report(run("validate", bad), 1, "$.categories[5].family",
                  "a non-empty family (above the species 'petraea')",
                  "every rank above its lowest one must be filled")
    assert_clear_error(_train(train_args, bad, tmp_path / "bad-model"), "gap.json",
                       "non-empty family", "every rank above its lowest one must be filled")
    assert not (tmp_path / "bad-model").exists()


@pytest.mark.catalogue(11)
def test_homonym_genus_is_two_taxa_everywhere(base, tmp_path, train_args):
    from taxoclass.taxonomy.annotations import load_annotations
    from taxoclass.taxonomy.labels import encode_labels

    d = copy.deepcopy(base)
    d["categories"][1]["family"] = "Betulaceae"  # Acer platanoides: Acer under a 2nd family
    ann = _write(tmp_path, "homonym_genus.json", d)
    out = assert_report(run("validate", ann), 0, "WARNING", "genus 'Acer'", "homonyms",
                        "4 genus taxa")
    assert "ERROR" not in out
    loaded = load_annotations(ann)
    tax = loaded.taxonomy()
    acers = tax.find("Acer", "genus")
    assert sorted(n[0] for n in acers) == ["Betulaceae", "Sapindaceae"]
    y, nodes = encode_labels(tax, loaded.labelled_images())
    cat = loaded.labelled_images()["category_id"].to_numpy()
    assert {nodes[i][0] for i in range(len(nodes)) if cat[i] == 1} == {"Betulaceae"}
    assert {nodes[i][0] for i in range(len(nodes)) if cat[i] == 0} == {"Sapindaceae"}
    g0 = set(y["genus"][cat == 0].tolist())
    g1 = set(y["genus"][cat == 1].tolist())
    assert len(g0) == len(g1) == 1 and g0 != g1  # two genus classes named Acer
    model = tmp_path / "model"
    assert_ok(_train(train_args, ann, model))
    saved = json.loads((model / "taxonomy.json").read_text())
    assert ["Betulaceae", "Acer"] in saved["nodes"] and ["Sapindaceae", "Acer"] in saved["nodes"]


@pytest.mark.catalogue(14)
def test_unicode_and_spaces_in_paths_and_names(base, fixture_set, tiny_backbone, tmp_path):
    d = _small(base, 60)
    keep = [a for a in d["annotations"] if a["category_id"] in (0, 2)][:12]
    ids = {a["image_id"] for a in keep}
    folder = tmp_path / "ünï cødé"
    folder.mkdir()
    images = []
    for k, im in enumerate(i for i in d["images"] if i["image_id"] in ids):
        name = f"ünï cødé/léaf {k} ✓.jpg"
        shutil.copy(fixture_set["dir"] / im["file_name"], tmp_path / name)
        images.append(dict(im, file_name=name))
    d.update(images=images, annotations=keep)
    d["categories"][0].update(genus="Acér", species="capillipes ß")
    for a in keep:
        a.pop("genus_id", None)
    ann = _write(tmp_path, "unicode.json", d)
    assert_report(run("validate", ann, "--images-root", tmp_path), 0, "OK")
    emb = tmp_path / "emb"
    assert_ok(_embed(ann, tmp_path, emb, tiny_backbone))
    model = tmp_path / "model"
    assert_ok(run("train", "--config", fixture_set["config"], "--set", f"data.annotations={ann}",
                  "--set", f"data.images_root={tmp_path}", "--set", f"embeddings.cache={emb}",
                  "--set", "train.epochs=3", "--set", f"out={model}"))
    labels = (model / "labels.json").read_text(encoding="utf-8")
    assert "Acér capillipes ß" in labels or "Ac\\u00e9r" in labels


# ------------------------------------------------------------------ paths outside the root, 12, 13
@pytest.mark.catalogue(12)
def test_path_traversal_is_refused_everywhere(base, fixture_set, tiny_backbone, tmp_path,
                                              train_args):
    d = _small(base)
    d["images"][0]["file_name"] = "../../../../../../etc/passwd"
    ann = _write(tmp_path, "traversal.json", d)
    assert_report(run("validate", ann), 1, "$.images[0].file_name", "etc/passwd",
                  "leaves the images root", "--allow-outside-root", "FAILED")
    assert_clear_error(_embed(ann, fixture_set["dir"], tmp_path / "cache", tiny_backbone),
                       "traversal.json", "leaves the images root")
    assert not (tmp_path / "cache").exists()
    assert_clear_error(_train(train_args, ann, tmp_path / "model"), "leaves the images root")
    assert not (tmp_path / "model").exists()
    # the fix: a path inside the root validates
    d["images"][0]["file_name"] = "images/train/1.jpg"
    assert_report(run("validate", _write(tmp_path, "fixed.json", d), "--images-root",
                      fixture_set["dir"]), 0, "OK")
    # allowed on purpose: validate passes
    assert_report(run("validate", ann, "--allow-outside-root"), 0, "OK")


@pytest.mark.catalogue(13)
def test_absolute_paths_are_refused_unless_allowed(base, fixture_set, tiny_backbone, tmp_path,
                                                   train_args):
    outside = tmp_path / "elsewhere" / "leaf.jpg"
    outside.parent.mkdir()
    shutil.copy(fixture_set["dir"] / "images" / "train" / "1.jpg", outside)
    d = _small(base)
    d["images"][0]["file_name"] = "/etc/hostname"
    d["images"][1]["file_name"] = str(outside)
    ann = _write(tmp_path, "absolute.json", d)
    assert_report(run("validate", ann), 1, "$.images[0].file_name", "'/etc/hostname'",
                  "$.images[1].file_name", "an absolute path", "FAILED")
    emb = tmp_path / "cache"
    assert_clear_error(_embed(ann, fixture_set["dir"], emb, tiny_backbone), "absolute.json",
                       "an absolute path", "--allow-outside-root")
    assert not emb.exists()
    # the fix the message names: allowed, the outside image is embedded (the text file fails)
    d["images"] = d["images"][1:]
    ann2 = _write(tmp_path, "absolute_ok.json", d)
    out = assert_ok(_embed(ann2, fixture_set["dir"], emb, tiny_backbone,
                           "--allow-outside-root"))
    assert "7 embeddings" in out
    # train: refused, then allowed by the config key the message names
    full = copy.deepcopy(base)
    full["images"][0]["file_name"] = str(outside)
    ann3 = _write(tmp_path, "absolute_train.json", full)
    assert_clear_error(_train(train_args, ann3, tmp_path / "model"), "an absolute path",
                       "data.allow_outside_root")
    assert_ok(_train(train_args, ann3, tmp_path / "model", "--set",
                     "data.allow_outside_root=true"))
    assert "1,train" in (tmp_path / "model" / "split.csv").read_text().replace('"', "") or \
        "1,val" in (tmp_path / "model" / "split.csv").read_text().replace('"', "")


# ------------------------------------------------------------------ empty sets, 15, 16
@pytest.mark.catalogue(15)
def test_zero_annotations_warns_in_validate_and_is_an_error_in_train(base, tmp_path, train_args):
    d = dict(copy.deepcopy(base), annotations=[])
    ann = _write(tmp_path, "zero_annotations.json", d)
    assert_report(run("validate", ann), 0, "WARNING $.annotations",
                  "0 annotations: nothing to train on", "OK")
    assert_clear_error(_train(train_args, ann, tmp_path / "model"), "zero_annotations.json",
                       "0 annotations: nothing to train on", "Fix:")
    assert not (tmp_path / "model").exists()


@pytest.mark.catalogue(16)
def test_zero_images(base, fixture_set, tiny_backbone, tmp_path):
    d = dict(copy.deepcopy(base), images=[], annotations=[])
    ann = _write(tmp_path, "zero_images.json", d)
    assert_report(run("validate", ann), 0, "WARNING $.images", "0 images", "OK")
    assert_clear_error(_embed(ann, fixture_set["dir"], tmp_path / "emb", tiny_backbone),
                       "lists no images")


# ------------------------------------------------------------------ one file, two ids, 17, 21
@pytest.mark.catalogue(17)
def test_one_file_under_two_ids(base, tmp_path, train_args):
    d = copy.deepcopy(base)
    twin = max(im["image_id"] for im in d["images"]) + 1
    d["images"].append({"image_id": twin, "file_name": d["images"][0]["file_name"]})
    d["annotations"].append({"image_id": twin, "category_id": 5})
    ann = _write(tmp_path, "image_twice.json", d)
    assert_report(run("validate", ann), 1, f"$.images[{len(d['images']) - 1}].file_name",
                  "images/train/1.jpg", f"listed under image ids [1, {twin}]",
                  "different categories", "FAILED")
    assert_clear_error(_train(train_args, ann, tmp_path / "model"), "image_twice.json",
                       "different categories")
    # the same label twice: a warning, nothing refused
    d["annotations"][-1]["category_id"] = d["annotations"][0]["category_id"]
    assert_report(run("validate", _write(tmp_path, "same_label.json", d)), 0, "WARNING",
                  f"listed under image ids [1, {twin}]", "OK")


@pytest.mark.catalogue(21)
def test_ids_equal_as_text_are_refused(base, fixture_set, tiny_backbone, tmp_path, train_args):
    d = copy.deepcopy(base)
    d["images"].append({"image_id": "1", "file_name": "images/train/2.jpg"})
    d["annotations"].append({"image_id": "1", "category_id": 0})
    ann = _write(tmp_path, "int_str_collision.json", d)
    assert_report(run("validate", ann), 1, "$.images[60].image_id", "reads as '1'",
                  "every image_id as a number", "FAILED")
    assert_clear_error(_embed(ann, fixture_set["dir"], tmp_path / "emb", tiny_backbone),
                       "reads as '1'")
    assert_clear_error(_train(train_args, ann, tmp_path / "model"), "reads as '1'")


# ------------------------------------------------------------------ backbones, 50-56
@pytest.fixture
def small_ann(base, tmp_path) -> Path:
    return _write(tmp_path, "small.json", _small(base, 4))


@pytest.mark.catalogue(50)
def test_unknown_backbone_names_close_matches(small_ann, fixture_set, tmp_path):
    assert_clear_error(_embed(small_ann, fixture_set["dir"], tmp_path / "e",
                              ["--backbone", "efficientnet-lite1x"]),
                       "Unknown backbone 'efficientnet-lite1x'", "Close matches",
                       "efficientnet_lite1")


@pytest.mark.catalogue(51)
def test_garbage_checkpoint_keeps_the_real_reason(small_ann, fixture_set, tmp_path):
    ckpt = tmp_path / "garbage.pth"
    ckpt.write_bytes(bytes(range(256)) * 64)
    res = _embed(small_ann, fixture_set["dir"], tmp_path / "e",
                 ["--backbone", "efficientnet-lite0", "--checkpoint", ckpt])
    out = assert_clear_error(res, "garbage.pth", "not a PyTorch file", "state dict",
                             "weights_only=True")
    assert "weights_only` set to `False`" not in out and "will likely succeed" not in out
    assert "weights_only=False" not in out


@pytest.mark.catalogue(52, 53)
def test_checkpoint_that_does_not_fit(small_ann, fixture_set, tiny_backbone, tmp_path):
    # another architecture: the tiny ViT's weights for EfficientNet-Lite0
    res = _embed(small_ann, fixture_set["dir"], tmp_path / "e",
                 ["--backbone", "efficientnet-lite0", "--checkpoint", fixture_set["ckpt"]])
    assert_clear_error(res, "do not fit backbone", "missing keys", "unexpected keys")
    # the right architecture with one wrong shape
    state = torch.load(fixture_set["ckpt"], weights_only=True)
    key = next(k for k, v in state.items() if v.dim() == 4)
    state[key] = torch.zeros(state[key].shape[0] // 2, *state[key].shape[1:])
    bad = tmp_path / "wrongshape.pth"
    torch.save(state, bad)
    opts = list(tiny_backbone)
    opts[opts.index("--checkpoint") + 1] = str(bad)
    assert_clear_error(_embed(small_ann, fixture_set["dir"], tmp_path / "e2", opts),
                       "1 shape mismatches", key)


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.catalogue(54, 55)
def test_unsafe_empty_listlike_and_missing_checkpoints(small_ann, fixture_set, tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _Marker(str(marker))}, evil)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], lst)
    for ckpt, fragments in ((evil, ("evil.pth", "could run code", "refused")),
                            (lst, ("list.pth", "holds no state dict", "found list")),
                            (tmp_path / "nonexist.pth", ("nonexist.pth", "does not exist"))):
        assert_clear_error(_embed(small_ann, fixture_set["dir"], tmp_path / "e",
                                  ["--backbone", "efficientnet-lite0", "--checkpoint", ckpt]),
                           *fragments)
    assert not marker.exists()


@pytest.mark.catalogue(56)
def test_default_backbone_without_network_fails_fast_with_the_fix(small_ann, fixture_set,
                                                                  tmp_path, monkeypatch):
    import socket

    import huggingface_hub

    import taxoclass.features.weights as weights

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    def never(*args, **kwargs):  # the probe must stop the run before any download
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", never)
    monkeypatch.setattr(weights, "_hf_cached_file", lambda *a: None)  # nothing cached here
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.monotonic()
    res = run("embed", "--annotations", small_ann, "--images-root", fixture_set["dir"],
              "--out", tmp_path / "e")
    assert time.monotonic() - started < 10
    assert_clear_error(res, "vit_base_patch14_reg4_dinov2.lvd142m", "cannot be reached",
                       "Network is unreachable", "--checkpoint PATH",
                       "--backbone efficientnet-lite0")
    # the switch: no probe at all
    monkeypatch.setenv("TAXOCLASS_OFFLINE", "1")
    assert_clear_error(run("embed", "--annotations", small_ann, "--images-root",
                           fixture_set["dir"], "--out", tmp_path / "e"),
                       "TAXOCLASS_OFFLINE is set", "--backbone efficientnet-lite0")
    # the fix the message names works offline
    out = assert_ok(run("embed", "--annotations", small_ann, "--images-root", fixture_set["dir"],
                        "--out", tmp_path / "e", "--backbone", "efficientnet-lite0",
                        "--image-size", 64))
    assert "4 embeddings" in out


# ------------------------------------------------------------------ options, 61, 96
@pytest.mark.catalogue(61)
@pytest.mark.parametrize("option, value", [("--batch-size", 0), ("--num-workers", -1)])
def test_embed_numeric_options_are_range_checked(small_ann, fixture_set, tiny_backbone, tmp_path,
                                                 option, value):
    res = run("embed", "--annotations", small_ann, "--images-root", fixture_set["dir"],
              "--out", tmp_path / "e", *tiny_backbone, option, value)
    assert_clear_error(res, f"Invalid value for '{option}'", f"{value} is not in the range")
    assert not (tmp_path / "e").exists()


@pytest.mark.catalogue(96)
@pytest.mark.parametrize("value", [0, -1])
def test_predict_top_k_is_refused_before_any_work(fixture_set, fixture_model, tmp_path, value):
    out = tmp_path / "pred"
    started = time.monotonic()
    res = run("predict", "--model", fixture_model["model"], fixture_set["images"] / "test",
              "--top-k", value, "--out", out)
    assert_clear_error(res, "Invalid value for '--top-k'", "x>=1")
    assert time.monotonic() - started < 5 and not out.exists()


# ------------------------------------------------------------------ config, 62-69
@pytest.mark.catalogue(62, 63, 64, 65, 66, 67, 68, 69)
@pytest.mark.parametrize("yaml_text, overrides, fragments", [
    ("train:\n  epocs: 5\n", (), ("unknown key 'epocs'", "epochs")),
    ("", ("train.epoch=5",), ("unknown key 'train.epoch'", "epochs")),
    ("train:\n  epochs: five\n", (), ("train.epochs", "expected an integer >= 1", "'five'")),
    ("", ("train.lr=fast",), ("train.lr", "expected a number > 0", "'fast'")),
    ("", ("train=5",), ("train", "expected a mapping", "found int")),
    ("", ("data.val_fraction=1.5",), ("data.val_fraction", "< 1", "1.5")),
    ("", ("train.epochs=0",), ("train.epochs", "expected an integer >= 1", "found 0")),
    ("", ("train.epochs=-3",), ("train.epochs", "expected an integer >= 1", "found -3")),
])
def test_bad_config_values_fail_at_once(fixture_set, tmp_path, yaml_text, overrides, fragments):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"extends: {fixture_set['config']}\nout: {tmp_path / 'model'}\n{yaml_text}")
    started = time.monotonic()
    res = run("train", "--config", cfg, *[a for o in overrides for a in ("--set", o)])
    assert_clear_error(res, *fragments)
    assert time.monotonic() - started < 5 and not (tmp_path / "model").exists()


# ------------------------------------------------------------------ training data, 70-72
@pytest.mark.catalogue(70)
def test_one_species_is_a_clear_error(base, tmp_path, train_args):
    d = copy.deepcopy(base)
    d["annotations"] = [a for a in d["annotations"] if a["category_id"] == 0]
    ids = {a["image_id"] for a in d["annotations"]}
    d["images"] = [im for im in d["images"] if im["image_id"] in ids]
    ann = _write(tmp_path, "one_species.json", d)
    assert_clear_error(_train(train_args, ann, tmp_path / "model"), "one_species.json",
                       "are one species ('Acer campestre')", "at least two species",
                       "Fix: add images of at least one more species")
    assert not (tmp_path / "model").exists()


@pytest.mark.catalogue(71, 72)
def test_one_image_species_and_imageless_category_are_named(base, tmp_path, train_args):
    d = copy.deepcopy(base)
    lone = [a for a in d["annotations"] if a["category_id"] == 5]
    keep_id = lone[0]["image_id"]
    d["annotations"] = [a for a in d["annotations"] if a["category_id"] != 5
                        or a["image_id"] == keep_id]
    ids = {a["image_id"] for a in d["annotations"]}
    d["images"] = [im for im in d["images"] if im["image_id"] in ids]
    d["categories"].append(dict(d["categories"][4], category_id=99, species="noimages",
                                scientificName="Quercus noimages"))
    lone_name = f"{d['categories'][5]['genus']} {d['categories'][5]['species']}"
    noimg_name = f"{d['categories'][4]['genus']} noimages"
    ann = _write(tmp_path, "sparse.json", d)
    model = tmp_path / "model"
    out = assert_ok(_train(train_args, ann, model))
    assert "warning:" in out and lone_name in out and "no validation image" in out
    # issue 15: the image-less category is left out of the model, named in one warning
    assert noimg_name in out and "1 categories have no labelled image and are left out" in out
    labels = (model / "labels.json").read_text()
    assert noimg_name not in labels and lone_name in labels
    split = (model / "split.csv").read_text()
    assert f"{keep_id},train" in split.replace('"', "")
    # ...unless data.keep_empty_taxa keeps it as a class (a checklist prior)
    kept = tmp_path / "kept"
    out = assert_ok(_train(train_args, ann, kept, "--set", "data.keep_empty_taxa=true"))
    assert "left out" not in out and noimg_name in (kept / "labels.json").read_text()


# ------------------------------------------------------------------ other, 115, 116
@pytest.mark.catalogue(115)
def test_explain_on_a_cnn_bundle(fixture_set, tmp_path):
    model = tmp_path / "cnn-model"
    assert_ok(run("train", "--config", fixture_set["config"], "--set", f"out={model}",
                  "--set", "backbone.name=efficientnet-lite0", "--set", "backbone.checkpoint=",
                  "--set", "backbone.model_kwargs={}", "--set", "backbone.image_size=64",
                  "--set", f"embeddings.cache={tmp_path / 'emb'}", "--set", "train.epochs=2",
                  "--set", "openset.enabled=false"))
    img = fixture_set["images"] / "train" / "1.jpg"
    assert_clear_error(run("explain", "--model", model, img, "--out", tmp_path / "x.png"),
                       "self-attention")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.catalogue(116)
def test_taxonomy_of_a_table_without_species_column(tmp_path):
    table = tmp_path / "table_nospecies.csv"
    table.write_text("genus,family\nAcer,Sapindaceae\nQuercus,Fagaceae\n")
    assert_clear_error(run("taxonomy", table), "table_nospecies.csv",
                       "expected a 'species' column", "['genus', 'family']", "Rename")
