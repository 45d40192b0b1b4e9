"""`taxoclass import`: each source format round-trips a small real-shaped input (built in
tmp_path from the shipped fixture images) to an annotation file that `taxoclass validate`
accepts, with the right counts, labels, groups and crops; then import -> embed -> train ->
evaluate on a second imported file -> flag-unknowns from the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from taxoclass.cli import main
from taxoclass.errors import AnnotationError
from taxoclass.pipelines.importing import import_annotations

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TRAIN_IMAGES = sorted((FIXTURES / "images" / "train").glob("*.jpg"),
                      key=lambda p: int(p.stem))


def _run(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def _labels(data: dict) -> dict[str, tuple[str, ...]]:
    """file_name -> (family, genus, species) of every annotated image."""
    cats = {c["category_id"]: c for c in data["categories"]}
    files = {im["image_id"]: im["file_name"] for im in data["images"]}
    return {files[a["image_id"]]: tuple(cats[a["category_id"]][r] for r in
                                        ("family", "genus", "species"))
            for a in data["annotations"]}


def _validates(out: Path, root: Path) -> str:
    code, text = _run("validate", out, "--images-root", root)
    assert code == 0, text
    return text


def _fixture_tree(dest: Path, annotations: Path, image_dir: str, *, binomial: bool,
                  coarse: bool = False) -> int:
    """A family/genus/species/*.jpg copy of a fixture annotation file's images. With
    ``coarse`` every 6th image sits in its family folder (a family-only label), the next
    in its genus folder (genus-only), and the rest in one track folder per 4 images."""
    data = json.loads(annotations.read_text())
    cats = {c["category_id"]: c for c in data["categories"]}
    files = {im["image_id"]: im["file_name"] for im in data["images"]}
    for i, a in enumerate(data["annotations"]):
        c = cats[a["category_id"]]
        species = f"{c['genus']}_{c['species']}" if binomial else c["species"]
        folder = dest / c["family"] / c["genus"] / species
        if coarse:
            folder = [dest / c["family"], dest / c["family"] / c["genus"],
                      folder / f"track{i // 4}"][min(i % 6, 2)]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / files[a["image_id"]], folder / Path(files[a["image_id"]]).name)
    assert all(f.startswith(image_dir) for f in files.values())
    return len(data["annotations"])


# ---------------------------------------------------------------------- folder tree
def test_folder_tree_with_family_only_genus_only_and_track_folders(tmp_path):
    photos = tmp_path / "photos"
    places = {"Sapindaceae/Acer/campestre": TRAIN_IMAGES[0:2],
              "Sapindaceae/Acer/Acer_platanoides/track7": TRAIN_IMAGES[2:4],
              "Sapindaceae/Acer": TRAIN_IMAGES[4:5],  # genus-only
              "Fagaceae": TRAIN_IMAGES[5:6]}  # family-only
    for folder, images in places.items():
        (photos / folder).mkdir(parents=True, exist_ok=True)
        for im in images:
            shutil.copy(im, photos / folder / im.name)
    result = import_annotations(photos, tmp_path / "train.json")
    assert result.report.ok, result.report.format()
    data = json.loads((tmp_path / "train.json").read_text())
    labels = _labels(data)
    assert len(data["images"]) == 6 and len(data["categories"]) == 4
    assert labels["photos/Fagaceae/6.jpg"] == ("Fagaceae", "", "")
    assert labels["photos/Sapindaceae/Acer/5.jpg"] == ("Sapindaceae", "Acer", "")
    assert labels["photos/Sapindaceae/Acer/campestre/1.jpg"] == ("Sapindaceae", "Acer",
                                                                 "campestre")
    # a binomial species folder gives the epithet; the folder below it is the group
    track = [im for im in data["images"] if "track7" in im["file_name"]]
    assert len(track) == 2 and all(im["group"] == "track7" for im in track)
    assert labels[track[0]["file_name"]] == ("Sapindaceae", "Acer", "platanoides")
    ranks = {c["scientificName"]: c["taxonRank"] for c in data["categories"]}
    assert ranks == {"Fagaceae": "family", "Acer": "genus", "Acer campestre": "species",
                     "Acer platanoides": "species"}
    assert "6 images" in _validates(tmp_path / "train.json", tmp_path)


def test_species_folders_with_a_taxonomy_table_add_the_order(tmp_path):
    photos = tmp_path / "photos"
    for name, images in (("Acer campestre", TRAIN_IMAGES[:2]), ("Quercus", TRAIN_IMAGES[2:3])):
        (photos / name).mkdir(parents=True)
        for im in images:
            shutil.copy(im, photos / name / im.name)
    table = tmp_path / "taxa.csv"
    table.write_text("order,family,genus,species\nSapindales,Sapindaceae,Acer,Acer campestre\n"
                     "Fagales,Fagaceae,Quercus,Quercus robur\n")
    import_annotations(photos, tmp_path / "a.json", taxonomy=table)
    data = json.loads((tmp_path / "a.json").read_text())
    cats = sorted((c["order"], c["family"], c["genus"], c["species"]) for c in data["categories"])
    assert cats == [("Fagales", "Fagaceae", "Quercus", ""),
                    ("Sapindales", "Sapindaceae", "Acer", "campestre")]
    _validates(tmp_path / "a.json", tmp_path)
    (photos / "Tilia").mkdir()
    shutil.copy(TRAIN_IMAGES[4], photos / "Tilia" / "x.jpg")
    with pytest.raises(AnnotationError, match=r"not in the taxonomy table .*'Tilia' \(1 images\)"):
        import_annotations(photos, tmp_path / "b.json", taxonomy=table)


# ---------------------------------------------------------------------- CSV
def test_csv_with_rank_columns_a_family_only_row_and_a_track_column(tmp_path):
    (tmp_path / "img").mkdir()
    for im in TRAIN_IMAGES[:4]:
        shutil.copy(im, tmp_path / "img" / im.name)
    table = tmp_path / "labels.csv"
    table.write_text("image,order,family,genus,species,track\n"
                     "img/1.jpg,Sapindales,Sapindaceae,Acer,campestre,t1\n"
                     "img/2.jpg,Sapindales,Sapindaceae,Acer,Acer campestre,t1\n"
                     "img/3.jpg,Sapindales,Sapindaceae,,,t2\n"
                     "img/4.jpg,Fagales,Fagaceae,Quercus,,t3\n")
    result = import_annotations(table, tmp_path / "out" / "train.json", images_root=tmp_path)
    assert result.report.ok, result.report.format()
    data = json.loads((tmp_path / "out" / "train.json").read_text())
    labels = _labels(data)
    assert labels == {"img/1.jpg": ("Sapindaceae", "Acer", "campestre"),
                      "img/2.jpg": ("Sapindaceae", "Acer", "campestre"),
                      "img/3.jpg": ("Sapindaceae", "", ""),
                      "img/4.jpg": ("Fagaceae", "Quercus", "")}
    assert [im["track"] for im in data["images"]] == ["t1", "t1", "t2", "t3"]
    assert {c["order"] for c in data["categories"]} == {"Sapindales", "Fagales"}
    assert len(data["categories"]) == 3
    _validates(tmp_path / "out" / "train.json", tmp_path)
    # a gap (genus without a family) names the line
    table.write_text("image,family,genus,species\nimg/1.jpg,,Acer,campestre\n")
    with pytest.raises(AnnotationError,
                       match="labels.csv line 2: no family above species 'campestre'"):
        import_annotations(table, tmp_path / "gap.json")


def test_images_outside_the_root_and_an_existing_out_are_refused(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text(f"file_name,family\n{TRAIN_IMAGES[0]},Sapindaceae\n")
    with pytest.raises(AnnotationError, match="outside the images root.*--images-root"):
        import_annotations(table, tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{}")
    code, text = _run("import", table, "--out", tmp_path / "b.json")
    assert code == 2 and "--overwrite" in text


# ---------------------------------------------------------------------- Darwin Core
def _dwc(folder: Path, identifiers: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "occurrence.txt").write_text(
        "gbifID\toccurrenceID\tscientificName\ttaxonRank\tkingdom\torder\tfamily\tgenus\t"
        "specificEpithet\teventID\tlocationID\n"
        "101\tobs-1\tAcer campestre L.\tSPECIES\tPlantae\tSapindales\tSapindaceae\tAcer\t"
        "campestre\tev1\tplotA\n"
        "102\tobs-2\tFagaceae\tFAMILY\tPlantae\tFagales\tFagaceae\tQuercus\t\tev2\tplotB\n")
    rows = [("101", identifiers[0]), ("101", identifiers[1]), ("102", identifiers[2])]
    (folder / "multimedia.txt").write_text(
        "gbifID\ttype\tformat\tidentifier\n"
        + "".join(f"{k}\tStillImage\timage/jpeg\t{i}\n" for k, i in rows)
        + "102\tSound\taudio/mpeg\tcall.mp3\n")


def test_darwin_core_export_labels_stop_at_taxon_rank(tmp_path):
    export = tmp_path / "dwca"
    (export / "media").mkdir(parents=True)
    for im in TRAIN_IMAGES[:3]:
        shutil.copy(im, export / "media" / im.name)
    _dwc(export, ["media/1.jpg", "media/2.jpg", "media/3.jpg"])
    out = tmp_path / "train.json"
    code, text = _run("import", export, "--out", out)
    assert code == 0, text
    data = json.loads(out.read_text())
    labels = _labels(data)
    assert labels["dwca/media/1.jpg"] == ("Sapindaceae", "Acer", "campestre")
    # a family-rank record: family-only label, although its genus column is filled
    assert labels["dwca/media/3.jpg"] == ("Fagaceae", "", "")
    cats = {c["scientificName"]: c for c in data["categories"]}
    assert cats["Fagaceae"]["taxonRank"] == "family" and cats["Fagaceae"]["order"] == "Fagales"
    assert cats["Acer campestre"]["kingdom"] == "Plantae"
    first = data["images"][0]
    assert (first["occurrence"], first["eventID"], first["locationID"]) == ("101", "ev1",
                                                                            "plotA")
    assert len(data["images"]) == 3  # the sound record is left out
    _validates(out, tmp_path)


def test_darwin_core_with_a_rank_list_that_skips_genus(tmp_path):
    export = tmp_path / "dwca"
    (export / "media").mkdir(parents=True)
    for im in TRAIN_IMAGES[:3]:
        shutil.copy(im, export / "media" / im.name)
    _dwc(export, ["media/1.jpg", "media/2.jpg", "media/3.jpg"])
    import_annotations(export / "occurrence.txt", tmp_path / "a.json",
                       ranks=["order", "family", "species"])
    data = json.loads((tmp_path / "a.json").read_text())
    cats = sorted((c["order"], c["family"], c["genus"], c["species"], c["taxonRank"])
                  for c in data["categories"])
    # without a genus rank the species keeps its binomial
    assert cats == [("Fagales", "Fagaceae", "", "", "family"),
                    ("Sapindales", "Sapindaceae", "", "Acer campestre", "species")]


def test_darwin_core_with_urls_is_a_clear_error(tmp_path):
    _dwc(tmp_path / "dwca", [f"https://inaturalist-open-data.s3.amazonaws.com/{i}.jpg"
                             for i in range(3)])
    code, text = _run("import", tmp_path / "dwca", "--out", tmp_path / "a.json")
    assert code == 2
    assert "3 of 4 images are URLs" in text and "download the images first" in text
    assert not (tmp_path / "a.json").exists()


# ---------------------------------------------------------------------- COCO boxes
def test_coco_boxes_become_crops_and_a_bad_box_is_a_reported_failure(tmp_path):
    (tmp_path / "frames").mkdir()
    shutil.copy(TRAIN_IMAGES[0], tmp_path / "frames" / "f1.jpg")
    (tmp_path / "frames" / "broken.jpg").write_bytes(b"not a jpeg")
    coco = {"images": [{"id": 1, "file_name": "frames/f1.jpg", "width": 48, "height": 48,
                        "seq_id": "s1"},
                       {"id": 2, "file_name": "frames/broken.jpg"}],
            "categories": [{"id": 1, "name": "Acer campestre"}, {"id": 2, "name": "Quercus"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 20, 16]},
                            {"id": 11, "image_id": 1, "category_id": 2,
                             "bbox": [20, 18, 24, 26]},
                            {"id": 12, "image_id": 1, "category_id": 1,
                             "bbox": [60, 60, 10, 10]},  # outside the 48x48 image
                            {"id": 13, "image_id": 2, "category_id": 1,
                             "bbox": [0, 0, 10, 10]}]}
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    table = tmp_path / "taxa.csv"
    table.write_text("family,genus,species\nSapindaceae,Acer,campestre\n"
                     "Fagaceae,Quercus,robur\n")
    out = tmp_path / "crops.json"
    code, text = _run("import", tmp_path / "boxes.json", "--taxonomy", table, "--out", out)
    assert code == 0, text
    assert "2 box(es) failed" in text
    data = json.loads(out.read_text())
    labels = _labels(data)
    assert len(data["images"]) == 2
    by_box = {tuple(im["bbox"]): im for im in data["images"]}
    first, second = by_box[(2, 3, 20, 16)], by_box[(20, 18, 24, 26)]
    assert labels[first["file_name"]] == ("Sapindaceae", "Acer", "campestre")
    assert labels[second["file_name"]] == ("Fagaceae", "Quercus", "")
    assert first["seq_id"] == "s1" and first["source_image"] == "frames/f1.jpg"
    for im in (first, second):
        assert im["file_name"].startswith("crops_crops/")
        with Image.open(tmp_path / im["file_name"]) as crop:
            assert crop.size == tuple(im["bbox"][2:])
    failures = (tmp_path / "crops_crops" / "failures.csv").read_text()
    assert "annotation 12" in failures and "outside the image (48x48 px)" in failures
    assert "annotation 13" in failures and "cannot be decoded" in failures
    _validates(out, tmp_path)
    # a second import does not replace the crops without --overwrite
    code, text = _run("import", tmp_path / "boxes.json", "--taxonomy", table, "--out",
                      tmp_path / "crops2.json", "--crops", tmp_path / "crops_crops")
    assert code == 2 and "crops folder" in text and "--overwrite" in text


def test_coco_categories_without_ranks_name_the_fix(tmp_path):
    coco = {"images": [], "categories": [{"id": 1, "name": "red fox"}], "annotations": []}
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    with pytest.raises(AnnotationError, match="'red fox'.*--taxonomy"):
        import_annotations(tmp_path / "boxes.json", tmp_path / "a.json")


def test_import_help_explains_each_format():
    code, text = _run("import", "--help")
    assert code == 0
    for word in ("folders", "family/genus/species", "table", "dwc", "occurrence.txt",
                 "taxonRank", "coco", "bbox", "crop", "--taxonomy", "--images-root"):
        assert word in text, word


def test_real_leaf_labels_round_trip_through_a_csv(shared_data, tmp_path):
    """The 990 leaf images' labels, written as a CSV of absolute paths, import back to the
    same family/genus/species of every image (the genus-only taxon included)."""
    leaf = shared_data / "leaf"
    original = json.loads((leaf / "annotations.json").read_text())
    truth = _labels(original)
    rows = ["file_name,family,genus,species"] + [
        f"{leaf / name},{fam},{gen},{sp}" for name, (fam, gen, sp) in truth.items()]
    (tmp_path / "leaf.csv").write_text("\n".join(rows) + "\n")
    result = import_annotations(tmp_path / "leaf.csv", tmp_path / "leaf.json",
                                images_root=leaf)
    assert result.report.ok and not result.left_out
    imported = json.loads((tmp_path / "leaf.json").read_text())
    assert _labels(imported) == truth and len(truth) == 990
    assert len(imported["categories"]) == len(original["categories"])


# ---------------------------------------------------------------------- end to end
@pytest.mark.usefixtures("one_thread")
def test_import_then_train_on_one_file_and_evaluate_on_another(tmp_path, fixture_set):
    data = tmp_path / "data"
    n_train = _fixture_tree(data / "train", fixture_set["train"], "images/train", binomial=False,
                            coarse=True)
    n_test = _fixture_tree(data / "test", fixture_set["test"], "images/test", binomial=True)
    for part, n in (("train", n_train), ("test", n_test)):
        code, text = _run("import", data / part, "--out", data / f"{part}.json")
        assert code == 0, text
        assert f"OK {data / part}.json: {n} images, {n} annotations" in text
    train = json.loads((data / "train.json").read_text())
    stops = [c["taxonRank"] for c in train["categories"]]
    assert sorted(set(stops)) == ["family", "genus", "species"]  # 2 + 3 + 6 categories
    assert sum(1 for im in train["images"] if "group" in im) == 40  # 4 of 6 in tracks
    f = fixture_set
    code, text = _run("embed", "--annotations", data / "train.json", "--images-root", data,
                      "--backbone", f["arch"], "--checkpoint", f["ckpt"], "--model-kwargs",
                      json.dumps(f["kwargs"]), "--batch-size", 16, "--out", tmp_path / "emb")
    assert code == 0, text
    config = yaml.safe_load(f["config"].read_text())
    config["data"].update(annotations=str(data / "train.json"), images_root=str(data))
    config["backbone"]["checkpoint"] = str(f["ckpt"])
    config["embeddings"]["cache"] = str(tmp_path / "emb")
    config["out"] = str(tmp_path / "model")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    code, text = _run("train", "--config", tmp_path / "train.yaml")
    assert code == 0, text
    code, text = _run("evaluate", "--model", tmp_path / "model", "--annotations",
                      data / "test.json", "--images-root", data, "--out",
                      tmp_path / "eval" / "metrics.json")
    assert code == 0, text
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == n_test > 0
    assert metrics["ranks"]["genus"]["accuracy"] >= 0.6  # chance: 1/3
    code, text = _run("flag-unknowns", "--model", tmp_path / "model", f["unknown"],
                      "--out", tmp_path / "flags")
    assert code == 0, text
    summary = json.loads((tmp_path / "flags" / "flags_summary.json").read_text())
    assert summary["n_images"] == len(list(f["unknown"].glob("*.jpg"))) > 0
