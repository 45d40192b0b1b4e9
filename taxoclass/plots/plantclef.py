"""Zero-training path: the official PlantCLEF 2024 checkpoint as a rank-aware tile classifier.

The organisers ship a DINOv2 ViT-B/14 (4 registers) fine-tuned on 7,806 species
(``model_best.pth.tar``) and ``class_mapping.txt`` (the species id of each head unit).
With a species table (species_id, species, genus, family) this module builds the
taxonomy of those species, maps each head unit to its species node, and sums the
species softmax up the tree, so genus and family probabilities come for free and are
coherent by construction.

:func:`write_submission` writes the PlantCLEF run file of a plot report. It holds species
ids, never names: a model with ids (this checkpoint, via :meth:`PlantCLEFClassifier.taxon_ids`)
writes ``plantclef_submission.csv``; a model without ids (a user-trained bundle) writes the
same rows with species *names* as ``plantclef_submission_names.csv`` and says so in a
warning, so a names file is never mistaken for (or uploaded as) a run file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import AnnotationError, ConfigError
from ..taxonomy.annotations import read_species_table
from ..taxonomy.tree import DEFAULT_RANKS, Node, Taxonomy

log = logging.getLogger(__name__)

__all__ = ["NAMES_FILE", "PLANTCLEF_BACKBONE", "PlantCLEFClassifier", "PlantCLEFTaxonomy",
           "SUBMISSION_FILE", "has_species_rank", "plantclef_submission_frame",
           "plantclef_taxonomy", "write_submission"]

SUBMISSION_FILE = "plantclef_submission.csv"
#: The submission rows with species names, for a model that has no PlantCLEF species ids.
NAMES_FILE = "plantclef_submission_names.csv"

PLANTCLEF_BACKBONE = "vit_base_patch14_reg4_dinov2"


@dataclass
class PlantCLEFTaxonomy:
    """The taxonomy of a head's species and the map from head units to leaves.

    ``unit_to_leaf[u]`` is the species-rank class index of head unit ``u``;
    ``species_ids[node]`` the PlantCLEF species id(s) of a species node.
    """

    taxonomy: Taxonomy
    unit_to_leaf: np.ndarray
    species_ids: dict[Node, str]

    def leaf_probabilities(self, unit_probs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Head-unit probabilities ``[n, n_units]`` → species probabilities ``[n, n_leaves]``."""
        p = torch.as_tensor(unit_probs).float()
        if p.ndim != 2 or p.shape[1] != len(self.unit_to_leaf):
            raise ValueError(f"Expected unit probabilities of shape [n, {len(self.unit_to_leaf)}],"
                             f" got {tuple(p.shape)}.")
        n_leaf = self.taxonomy.n_classes(self.taxonomy.ranks[-1])
        idx = torch.as_tensor(self.unit_to_leaf, dtype=torch.long)
        return p.new_zeros((p.shape[0], n_leaf)).index_add_(1, idx, p)


def plantclef_taxonomy(class_ids: Sequence[str], species_table: str | Path | Any,
                       ranks: Sequence[str] = DEFAULT_RANKS) -> PlantCLEFTaxonomy:
    """Taxonomy of the species named by ``class_ids`` and the unit → leaf permutation.

    ``species_table``: a path read with :func:`~taxoclass.taxonomy.annotations.read_species_table`
    or a DataFrame with ``species_id``, ``species``, ``genus``, ``family``. Every class
    id must be in the table; otherwise :class:`AnnotationError` says how many are
    missing and gives examples. Species without a family get their genus's family from
    other rows, else ``"incertae sedis"``.
    """
    source = str(species_table) if isinstance(species_table, (str, Path)) else "species table"
    table = (read_species_table(species_table) if isinstance(species_table, (str, Path))
             else species_table)
    if "species_id" not in table.columns:
        raise AnnotationError(f"{source}: expected a 'species_id' column to match the class "
                              f"mapping, found columns {list(table.columns)}.")
    table = table.astype({"species_id": str})
    table = table.assign(species_id=table["species_id"].str.strip())
    dup = table["species_id"][table["species_id"].duplicated()].unique()
    if len(dup):
        raise AnnotationError(f"{source}: species ids repeat ({len(dup)}, e.g. {dup[0]!r}); each "
                              "id must name one species.")
    by_id = table.set_index("species_id")
    ids = [str(c).strip() for c in class_ids]
    missing = [c for c in ids if c not in by_id.index]
    if missing:
        raise AnnotationError(
            f"{len(missing)} of the {len(ids)} species ids in the class mapping are missing "
            f"from {source} (e.g. {missing[0]!r}"
            + (f", {missing[1]!r}" if len(missing) > 1 else "") + "). Fix: pass the species "
            "table that belongs to this checkpoint (PlantCLEF species metadata with "
            "species_id;species;genus;family).")
    rows = by_id.loc[ids].reset_index()
    records = rows.to_dict("records")
    taxonomy = Taxonomy.from_records(records, ranks, source=source)
    # Higher ranks may have been filled in (a species without a family), so leaves are
    # found by their last two names (genus, species) rather than the record as written.
    lowest = taxonomy.ranks[-1]
    leaf_of = {node[-2:]: i for i, node in enumerate(taxonomy.nodes(lowest))}
    g_col = ranks[-2] if len(ranks) > 1 else None
    unit_to_leaf = np.empty(len(records), dtype=np.int64)
    for u, r in enumerate(records):
        name = _leaf_name(r, ranks)
        key = (str(r.get(g_col, "")).strip(), name) if g_col else (name,)
        if key not in leaf_of:
            raise AnnotationError(f"{source}: species id {r['species_id']!r} ({name!r}) did not "
                                  "map to a species of the taxonomy; check its genus/species.")
        unit_to_leaf[u] = leaf_of[key]
    species_ids: dict[Node, list[str]] = {}
    for r, leaf in zip(records, unit_to_leaf):
        species_ids.setdefault(taxonomy.node(ranks[-1], int(leaf)), []).append(r["species_id"])
    return PlantCLEFTaxonomy(taxonomy, unit_to_leaf,
                             {k: ",".join(v) for k, v in species_ids.items()})


def _leaf_name(record: dict, ranks: Sequence[str]) -> str:
    from ..taxonomy.tree import species_name

    value = str(record.get(ranks[-1], "") or "").strip()
    if ranks[-1] == "species" and "genus" in ranks:
        return species_name(str(record.get("genus", "") or ""), value)
    return value


class PlantCLEFClassifier:
    """The PlantCLEF checkpoint (backbone + 7,806-unit head) as a :class:`TileClassifier`.

    Species probabilities are the head's softmax; genus and family probabilities are
    their sums up the tree (``decode_leaf_probabilities``, method ``"marginal"``).
    """

    def __init__(self, backbone: Any, mapping: PlantCLEFTaxonomy, *, batch_size: int = 16,
                 top_k: int = 5) -> None:
        if backbone.num_classes != len(mapping.unit_to_leaf):
            raise AnnotationError(f"Backbone {backbone.name!r} has {backbone.num_classes} head "
                                  f"units but the class mapping has {len(mapping.unit_to_leaf)}.")
        self.backbone = backbone
        self.mapping = mapping
        self.batch_size = int(batch_size)
        self.top_k = int(top_k)

    @classmethod
    def from_files(cls, checkpoint: str | Path, class_mapping: str | Path,
                   species_table: str | Path, *, backbone: str = PLANTCLEF_BACKBONE,
                   model_kwargs: dict | None = None, device: str = "cpu",
                   batch_size: int = 16) -> PlantCLEFClassifier:
        """Load ``model_best.pth.tar`` + ``class_mapping.txt`` + a species table."""
        from ..features.backbones import create_backbone

        bb = create_backbone(backbone, checkpoint=checkpoint, class_mapping=class_mapping,
                             model_kwargs=model_kwargs, device=device)
        mapping = plantclef_taxonomy(bb.class_ids or [], species_table)
        clf = cls(bb, mapping, batch_size=batch_size)
        clf.species_table = str(species_table)
        return clf

    species_table: str | None = None

    @property
    def taxonomy(self) -> Taxonomy:
        return self.mapping.taxonomy

    @property
    def backbone_name(self) -> str:
        return self.backbone.name

    def taxon_ids(self) -> dict[Node, str]:
        """PlantCLEF species id(s) of each species node (for submission files)."""
        return dict(self.mapping.species_ids)

    def unit_probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Softmax over the head units, ``[n, n_units]``."""
        from .tiling import _batched

        def probs(x: torch.Tensor) -> torch.Tensor:
            return self.backbone.logits(x).float().softmax(dim=1)

        return _batched(list(images), self.backbone, self.batch_size, probs)

    def predict_tiles(self, images: Sequence[Image.Image]):
        from ..model.decoding import decode_leaf_probabilities

        if not len(images):
            units = np.zeros((0, len(self.mapping.unit_to_leaf)), np.float32)
        else:
            units = self.unit_probabilities(images)
        return decode_leaf_probabilities(self.mapping.leaf_probabilities(units), self.taxonomy,
                                         top_k=self.top_k, method="marginal")

    def describe(self) -> dict[str, Any]:
        return {"kind": "plantclef-checkpoint", "backbone": self.backbone.describe(),
                "species_table": self.species_table, "n_units": len(self.mapping.unit_to_leaf),
                "taxonomy": self.taxonomy.summary()}


# ---------------------------------------------------------------------- submission file
def has_species_rank(taxonomy: Taxonomy) -> bool:
    """Whether the rank list ends at species (what a PlantCLEF submission lists)."""
    return str(taxonomy.ranks[-1]).lower() == "species"


def plantclef_submission_frame(records: Mapping[str, Sequence[Any]], taxonomy: Taxonomy, *,
                               taxon_ids: Mapping[tuple[str, ...], str] | None = None,
                               year: int = 2024, names: bool = False):
    """PlantCLEF run: one row per plot, the species records only (the task scores species).

    Species ids come from ``taxon_ids`` (species node -> id(s), comma-separated); a species
    record without an id is a :class:`~taxoclass.errors.ConfigError`, never a name in the
    id list. ``names=True``: species names instead (for :data:`NAMES_FILE`). 2024: columns
    ``plot_id``/``species_ids`` (written ``;``-separated); 2025: ``quadrat_id``/``species_ids``.
    """
    import pandas as pd

    if year not in (2024, 2025):
        raise ConfigError(f"PlantCLEF submission year must be 2024 or 2025, got {year}.")
    if not has_species_rank(taxonomy):
        raise ConfigError(f"A PlantCLEF submission lists species ids, but the model's ranks "
                          f"{tuple(taxonomy.ranks)} end at {taxonomy.ranks[-1]!r}, not "
                          "species. Fix: use plot_records.csv or occurrences_dwca.zip.")
    lowest, ids = taxonomy.ranks[-1], dict(taxon_ids or {})
    key = "plot_id" if year == 2024 else "quadrat_id"
    rows = []
    for plot_id, recs in records.items():
        out: list[str] = []
        for r in recs:
            if r.taxon_rank != lowest:
                continue
            if names:
                out.append(r.taxon)
            elif tuple(r.node) in ids:
                out.extend(ids[tuple(r.node)].split(","))
            else:
                raise ConfigError(f"Plot {plot_id}: species {r.taxon!r} has no PlantCLEF species "
                                  "id in the model's class mapping; a submission lists ids, "
                                  "not names. Fix: use the checkpoint's class mapping and "
                                  "species table, or read the names file.")
        rows.append({key: plot_id, "species_ids": "[" + ", ".join(dict.fromkeys(out)) + "]"})
    return pd.DataFrame(rows, columns=[key, "species_ids"])


def write_submission(out_dir: str | Path, records: Mapping[str, Sequence[Any]],
                     taxonomy: Taxonomy, *, taxon_ids: Mapping[tuple[str, ...], str] | None,
                     year: int = 2024) -> Path | None:
    """Write the PlantCLEF file of a plot report into ``out_dir``; returns its path.

    None (nothing written) for a model whose ranks do not end at species. With species ids:
    :data:`SUBMISSION_FILE`; without (a user-trained model): :data:`NAMES_FILE`, and a
    warning saying why there is no submission file.
    """
    from ..io.files import atomic_write_text

    if not has_species_rank(taxonomy):
        return None
    names = not taxon_ids
    frame = plantclef_submission_frame(records, taxonomy, taxon_ids=taxon_ids, year=year,
                                       names=names)
    path = Path(out_dir) / (NAMES_FILE if names else SUBMISSION_FILE)
    if names:
        log.warning("the model has no PlantCLEF species ids (a user-trained model): no %s "
                    "written; %s lists species names in the submission layout instead (not "
                    "a valid PlantCLEF run file)", SUBMISSION_FILE, NAMES_FILE)
    atomic_write_text(path, frame.to_csv(index=False, sep=";" if year == 2024 else ","))
    return path
