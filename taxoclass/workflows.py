"""End-to-end jobs, one function per CLI command, usable from Python as well.

Each job checks its inputs and output paths before loading a model, writes its
outputs atomically and leaves ``provenance.json`` beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import AnnotationError
from .provenance import write_provenance
from .taxonomy import DEFAULT_RANKS, Taxonomy

Progress = Callable[[int, int], None]


def load_taxonomy(source: str | Path, ranks: Sequence[str] = DEFAULT_RANKS) -> Taxonomy:
    """Taxonomy from an annotations JSON (validated) or a species table (CSV / ``;``)."""
    from .annotations import load_annotations, read_species_table

    source = Path(source)
    if not source.exists():
        raise AnnotationError(f"{source}: not found. Expected an annotations JSON or a species "
                              "table (CSV).")
    if source.suffix.lower() == ".json":
        return load_annotations(source).taxonomy(ranks)
    table = read_species_table(source)
    return Taxonomy.from_records(table.to_dict("records"), ranks, source=str(source))


def embed_annotations(annotations: str | Path, *, out: str | Path,
                      images_root: str | Path | None = None,
                      backbone: str = "vit_base_patch14_reg4_dinov2.lvd142m",
                      checkpoint: str | Path | None = None, batch_size: int = 64,
                      num_workers: int = 0, overwrite: bool = False,
                      model_kwargs: dict | None = None, progress: Progress | None = None):
    """Embed every image listed in ``annotations`` into the cache folder ``out``.

    Returns the :class:`~taxoclass.embeddings.EmbedResult`.
    """
    from .annotations import load_annotations
    from .backbones import create_backbone
    from .embeddings import compute_embeddings

    ann = load_annotations(annotations, check=False)
    root = Path(images_root) if images_root else Path(annotations).parent
    if not root.is_dir():
        raise AnnotationError(f"--images-root {root}: no such directory. Pass the folder the "
                              "images' file_name paths are relative to.")
    items = ann.image_items(root)
    if not items:
        raise AnnotationError(f"{annotations}: lists no images; nothing to embed.")
    model = create_backbone(backbone, checkpoint=checkpoint, model_kwargs=model_kwargs)
    result = compute_embeddings(items, model, out, batch_size=batch_size,
                                num_workers=num_workers, overwrite=overwrite, progress=progress)
    write_provenance(out, backbone=model.describe(), config={
        "annotations": str(Path(annotations).resolve()), "images_root": str(root.resolve()),
        "backbone": backbone, "checkpoint": str(checkpoint) if checkpoint else None,
        "batch_size": batch_size, "num_workers": num_workers})
    return result
