"""Small annotation files with labels at any rank, for tests of issue 15 (any user's data).

Every builder writes Herbarium 2022-style JSON into a folder you give it and returns an
:class:`AnyRankSet`; images are never copied: ``file_name``s are relative to the images
root (``tests/fixtures`` or ``../shared/data/leaf``), which the set names.

Builders
--------
:func:`fixture_four_rank_set` (always available)
    The shipped fixture images (``tests/fixtures/images/{train,test}``), ranks
    ``order, family, genus, species`` (order from :data:`ORDERS`), a ``track`` field on
    every image (tracks of 3 images of one taxon). Train labels (60 images): per species
    7 at species rank, except 3 *Aesculus pavia* images labelled genus-only ``Aesculus``,
    3 *Quercus petraea* images family-only ``Fagaceae`` and 3 *Quercus robur* images
    order-only ``Fagales`` (so the family Fagaceae and the genus Aesculus have named
    children too: those labels train only the ranks they name). Test file (24 images):
    species labels, one image family-only ``Fagaceae``. ``empty_taxa=True`` adds the
    checklist categories :data:`CHECKLIST_EXTRA` (no image: *Quercus frainetto* and
    *Nothofagus antarctica*, a family and genus without any image; neither is in the
    leaf data either).
:func:`leaf_four_rank_set` (skips without ``../shared/data``: pass ``shared_data``)
    The real leaf data (990 images, 99 taxa, order already on its categories), same
    ranks and ``track`` (pairs of images of one taxon). Per taxon 8 images train and 2
    test (one whole track). Train partial labels: the first track of every 5th taxon
    (by category id) in a genus with several species is genus-only, the second track of
    every 7th taxon (category id % 7 == 3) family-only, the third track of taxa with
    category id % 11 == 4 order-only, and every image of the families in
    ``family_only_families`` (default ``Ginkgoaceae``) family-only: a family with no
    genus at all, which the taxonomy fills with placeholders. *Philadelphus sp.* stays
    genus-only as in the source.
:func:`three_rank_set` ``(folder, source="fixture" | "leaf")``
    ``order, family, species`` (no genus rank): the species field holds the binomial
    (``"Acer campestre"``) and categories have no ``genus`` field; genus-only labels of
    the four-rank set become family-only.
:func:`five_rank_set` ``(folder, source="fixture" | "leaf")``
    ``class, order, family, genus, species`` (class from :data:`CLASSES`).
:func:`write_config` ``(dataset, out, **data_overrides)``
    A training YAML for a set: the tiny fixture backbone, ``data.ranks`` of the set, and
    the given ``data`` keys (``group_by="track"``, ``ranks="auto"``, ...).

Each :class:`AnyRankSet` has ``train``, ``test`` (annotation files), ``images_root``,
``ranks``, ``group_field`` (``"track"``) and ``label_ranks`` (how many train images are
labelled at each rank, e.g. ``{"species": 51, "genus": 3, "family": 3, "order": 3}``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CANONICAL = ("kingdom", "phylum", "class", "order", "family", "subfamily", "tribe", "genus",
             "species")

#: Order of each family of the fixture and leaf data (iNaturalist taxonomy).
ORDERS: dict[str, str] = {
    "Aquifoliaceae": "Aquifoliales", "Cornaceae": "Cornales", "Hydrangeaceae": "Cornales",
    "Viburnaceae": "Dipsacales", "Ericaceae": "Ericales", "Fabaceae": "Fabales",
    "Betulaceae": "Fagales", "Fagaceae": "Fagales", "Juglandaceae": "Fagales",
    "Ginkgoaceae": "Ginkgoales", "Lamiaceae": "Lamiales", "Oleaceae": "Lamiales",
    "Magnoliaceae": "Magnoliales", "Salicaceae": "Malpighiales", "Malvaceae": "Malvales",
    "Myrtaceae": "Myrtales", "Poaceae": "Poales", "Cannabaceae": "Rosales",
    "Moraceae": "Rosales", "Rosaceae": "Rosales", "Ulmaceae": "Rosales",
    "Anacardiaceae": "Sapindales", "Sapindaceae": "Sapindales",
    "Altingiaceae": "Saxifragales", "Nothofagaceae": "Fagales",
}
#: Class of each order (Ginkgo and grasses apart from the dicots).
CLASSES: dict[str, str] = {o: "Magnoliopsida" for o in ORDERS.values()}
CLASSES.update({"Ginkgoales": "Ginkgoopsida", "Poales": "Liliopsida"})

#: Checklist categories without any image (``empty_taxa=True``).
CHECKLIST_EXTRA: tuple[dict[str, str], ...] = (
    {"family": "Fagaceae", "genus": "Quercus", "species": "frainetto"},
    {"family": "Nothofagaceae", "genus": "Nothofagus", "species": "antarctica"},
)
FOUR_RANKS = ["order", "family", "genus", "species"]


@dataclass
class AnyRankSet:
    """Paths and facts of one written data set."""

    folder: Path
    train: Path
    test: Path
    images_root: Path
    ranks: list[str]
    group_field: str = "track"
    label_ranks: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------- rows
def _taxon(cat: dict) -> dict[str, str]:
    """order/family/genus/species (epithet) of a source category."""
    fam = cat["family"]
    return {"order": cat.get("order") or ORDERS[fam], "family": fam, "genus": cat["genus"],
            "species": cat["species"]}


def _cut(taxon: dict[str, str], rank: str) -> dict[str, str]:
    """``taxon`` labelled only down to ``rank`` (lower ranks empty)."""
    keep = FOUR_RANKS[: FOUR_RANKS.index(rank) + 1]
    return {r: (v if r in keep else "") for r, v in taxon.items()}


def _fixture_rows() -> list[dict]:
    """Rows (image_id, file_name, track, split, labels) of the fixture images."""
    src = {s: json.loads((FIXTURES / f).read_text())
           for s, f in (("train", "annotations.json"), ("test", "test.json"))}
    partial = {"Aesculus pavia": "genus", "Quercus petraea": "family", "Quercus robur": "order"}
    rows = []
    for split, data in src.items():
        cats = {c["category_id"]: c for c in data["categories"]}
        files = {im["image_id"]: im["file_name"] for im in data["images"]}
        seen: Counter = Counter()
        for a in sorted(data["annotations"], key=lambda a: a["image_id"]):
            cat = cats[a["category_id"]]
            taxon, j = _taxon(cat), seen[a["category_id"]]
            seen[a["category_id"]] += 1
            name = cat["scientificName"]
            if split == "train" and name in partial and j < 3:
                taxon = _cut(taxon, partial[name])
            if split == "test" and name == "Quercus petraea" and j == 0:
                taxon = _cut(taxon, "family")
            size = 3 if split == "train" else 2
            rows.append({"image_id": a["image_id"], "file_name": files[a["image_id"]],
                         "track": f"{split}-{a['category_id']}-{j // size}", "split": split,
                         "labels": taxon})
    return rows


def _leaf_rows(leaf: Path, family_only_families: Sequence[str]) -> list[dict]:
    """Rows of the leaf data: 8 train and 2 test images per taxon, partial labels."""
    data = json.loads((leaf / "annotations.json").read_text())
    cats = {c["category_id"]: c for c in data["categories"]}
    files = {im["image_id"]: im["file_name"] for im in data["images"]}
    n_species = Counter(c["genus"] for c in cats.values())
    rows = []
    seen: Counter = Counter()
    for a in sorted(data["annotations"], key=lambda a: a["image_id"]):
        cid = a["category_id"]
        cat, j = cats[cid], seen[cid]
        seen[cid] += 1
        taxon = _taxon(cat)
        split = "test" if j >= 8 else "train"
        if cat["family"] in family_only_families:
            taxon = _cut(taxon, "family")
        elif split == "train" and cat["species"]:
            if j in (0, 1) and cid % 5 == 0 and n_species[cat["genus"]] > 1:
                taxon = _cut(taxon, "genus")
            elif j in (2, 3) and cid % 7 == 3:
                taxon = _cut(taxon, "family")
            elif j in (4, 5) and cid % 11 == 4:
                taxon = _cut(taxon, "order")
        rows.append({"image_id": a["image_id"], "file_name": files[a["image_id"]],
                     "track": f"{cid}-{j // 2}", "split": split, "labels": taxon})
    return rows


# ---------------------------------------------------------------------- writing
def _category(labels: dict[str, str], ranks: Sequence[str]) -> dict[str, str]:
    """The category record of ``labels`` for ``ranks`` (species as epithet with a genus
    rank, as the binomial without one)."""
    out = {r: labels.get(r, "") for r in ranks if r != "species"}
    if "species" in ranks:
        sp = labels.get("species", "")
        out["species"] = sp if "genus" in ranks or not sp else f"{labels['genus']} {sp}"
    named = [labels[r] for r in FOUR_RANKS if labels.get(r)]
    if labels.get("species"):
        out["scientificName"] = f"{labels['genus']} {labels['species']}"
    else:
        out["scientificName"] = named[-1]
    return out


def _with_ranks(labels: dict[str, str], ranks: Sequence[str]) -> dict[str, str]:
    """Add class/kingdom above order; drop a genus-only label when there is no genus rank."""
    out = dict(labels)
    out["class"] = CLASSES[out["order"]]
    out["kingdom"] = "Plantae"
    if "genus" not in ranks and out["genus"] and not out["species"]:
        out["genus"] = ""
    return out


def _write_file(path: Path, rows: list[dict], ranks: Sequence[str],
                extra: Sequence[dict[str, str]] = ()) -> None:
    """One annotation file: images (with ``track``), annotations, categories."""
    cat_ids: dict[tuple, int] = {}
    categories = []

    def category_id(labels: dict[str, str]) -> int:
        cat = _category(labels, ranks)
        key = tuple(cat.get(r, "") for r in ranks)
        if key not in cat_ids:
            cat_ids[key] = len(cat_ids)
            categories.append({"category_id": cat_ids[key], **cat})
        return cat_ids[key]

    annotations = [{"image_id": r["image_id"],
                    "category_id": category_id(_with_ranks(r["labels"], ranks))}
                   for r in rows]
    for labels in extra:
        category_id(_with_ranks({"order": ORDERS[labels["family"]], **labels}, ranks))
    data = {"images": [{"image_id": r["image_id"], "file_name": r["file_name"],
                        "track": r["track"]} for r in rows],
            "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data, indent=1) + "\n")


def _label_rank(labels: dict[str, str], ranks: Sequence[str]) -> str:
    return [r for r in ranks if _with_ranks(labels, ranks).get(r)][-1]


def _write_set(folder: Path, rows: list[dict], ranks: Sequence[str], images_root: Path,
               extra: Sequence[dict[str, str]] = ()) -> AnyRankSet:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    _write_file(folder / "train.json", train, ranks, extra)
    _write_file(folder / "test.json", test, ranks)
    counts = Counter(_label_rank(r["labels"], ranks) for r in train)
    return AnyRankSet(folder=folder, train=folder / "train.json", test=folder / "test.json",
                      images_root=images_root, ranks=list(ranks),
                      label_ranks={r: counts[r] for r in reversed(ranks) if counts[r]})


def _rows(source: str, leaf: Path | None) -> tuple[list[dict], Path]:
    if source == "fixture":
        return _fixture_rows(), FIXTURES
    if source == "leaf":
        leaf = Path(leaf) if leaf else _shared_leaf()
        return _leaf_rows(leaf, ("Ginkgoaceae",)), leaf
    raise ValueError(f"source: 'fixture' or 'leaf', not {source!r}")


def _shared_leaf() -> Path:
    from conftest import SHARED_DATA  # tests/ is on sys.path under pytest

    return SHARED_DATA / "leaf"


# ---------------------------------------------------------------------- public
def fixture_four_rank_set(folder: str | Path, *, empty_taxa: bool = False) -> AnyRankSet:
    """order/family/genus/species from the fixture images, with partial labels and tracks."""
    return _write_set(Path(folder), _fixture_rows(), FOUR_RANKS, FIXTURES,
                      CHECKLIST_EXTRA if empty_taxa else ())


def leaf_four_rank_set(folder: str | Path, leaf: str | Path | None = None, *,
                       family_only_families: Sequence[str] = ("Ginkgoaceae",),
                       empty_taxa: bool = False) -> AnyRankSet:
    """order/family/genus/species from the real leaf data (``leaf``: its folder)."""
    leaf = Path(leaf) if leaf else _shared_leaf()
    return _write_set(Path(folder), _leaf_rows(leaf, family_only_families), FOUR_RANKS, leaf,
                      CHECKLIST_EXTRA if empty_taxa else ())


def three_rank_set(folder: str | Path, source: str = "fixture",
                   leaf: str | Path | None = None) -> AnyRankSet:
    """order/family/species (no genus rank; species named by their binomial)."""
    rows, root = _rows(source, leaf)
    return _write_set(Path(folder), rows, ["order", "family", "species"], root)


def five_rank_set(folder: str | Path, source: str = "fixture",
                  leaf: str | Path | None = None) -> AnyRankSet:
    """class/order/family/genus/species."""
    rows, root = _rows(source, leaf)
    return _write_set(Path(folder), rows, ["class", "order", "family", "genus", "species"],
                      root)


def write_config(dataset: AnyRankSet, out: str | Path, *, epochs: int = 40,
                 **data_overrides: object) -> Path:
    """A training YAML for ``dataset`` beside its files (tiny fixture backbone); the
    bundle goes to ``out``. ``data_overrides`` set ``data`` keys (``group_by="track"``)."""
    base = yaml.safe_load((FIXTURES / "train.yaml").read_text())
    backbone = dict(base["backbone"], checkpoint=str(FIXTURES / base["backbone"]["checkpoint"]))
    cfg = {"data": {"annotations": str(dataset.train), "images_root": str(dataset.images_root),
                    "ranks": list(dataset.ranks), "val_fraction": 0.3, **data_overrides},
           "backbone": backbone, "embeddings": {"batch_size": 16},
           "train": {"epochs": epochs, "batch_size": 32, "lr": 0.02, "patience": None},
           "out": str(out)}
    path = dataset.folder / "train.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
