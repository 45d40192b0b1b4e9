"""The embed job: every image an annotations file lists, into an embedding cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import AnnotationError, ConfigError
from ..io.provenance import write_provenance

Progress = Callable[[int, int], None]


def embed_annotations(annotations: str | Path, *, out: str | Path,
                      images_root: str | Path | None = None,
                      backbone: str = "vit_base_patch14_reg4_dinov2.lvd142m",
                      checkpoint: str | Path | None = None, batch_size: int | None = None,
                      num_workers: int = 0, overwrite: bool = False,
                      model_kwargs: dict | None = None, progress: Progress | None = None,
                      engine: str = "local", master: str | None = None,
                      device: str = "auto", image_size: int | None = None,
                      resize: str | None = None, pad_fill: str | int | None = None,
                      precision: str = "auto"):
    """Embed every image listed in ``annotations`` into the cache folder ``out``.

    Vectors already in ``out``'s store for the same file contents and backbone are
    reused (image ids are only labels); other backbones or settings are stored beside
    them; images that failed before are tried again. ``out`` holds this request's
    ``embeddings.npy`` / ``image_ids.npy`` / ``failures.csv`` afterwards.

    ``image_size`` / ``resize`` / ``pad_fill`` set the preprocessing
    (:func:`~taxoclass.features.backbones.preprocess_overrides`; default: the model's own).

    ``engine="spark"`` runs the same embedding code in PySpark (``master``, default
    ``local[2]``) and writes Parquet. Returns the
    :class:`~taxoclass.features.embeddings.EmbedResult`.
    """
    from ..engines import engine_for_job
    from ..features.backbones import backbone_spec
    from ..features.batching import auto_batch_size
    from ..features.embeddings import check_cache_folder
    from ..features.store import can_write
    from ..taxonomy.annotations import load_annotations

    if engine != "local" and precision != "auto":
        raise ConfigError(f"--precision {precision} is for the local engine; Spark executors "
                          f"embed in float32 on CPUs. Fix: drop --precision.")
    spec = backbone_spec({"name": backbone, "checkpoint": str(checkpoint) if checkpoint else None,
                          "model_kwargs": model_kwargs or {}, "image_size": image_size,
                          "resize": resize, "pad_fill": pad_fill})
    ann = load_annotations(annotations, check=False)
    root = Path(images_root) if images_root else Path(annotations).parent
    if not root.is_dir():
        raise AnnotationError(f"--images-root {root}: no such directory. Pass the folder the "
                              "images' file_name paths are relative to.")
    items = ann.image_items(root)
    if not items:
        raise AnnotationError(f"{annotations}: lists no images; nothing to embed.")
    check_cache_folder(out)  # before any model loads
    runner = engine_for_job(engine, master=master, num_workers=num_workers, device=device,
                            precision=precision)
    if engine != "local":
        batch_size = batch_size or auto_batch_size("cpu")  # executors embed on CPUs
    result = runner.embed(items, spec, out, batch_size=batch_size, overwrite=overwrite,
                          progress=progress)
    # the Spark engine records its run (master, partitions) itself; a complete read-only
    # cache is reused as it is
    if engine == "local" and can_write(Path(out)):
        write_provenance(out, backbone=result.cache.manifest["backbone"], config={
            "annotations": str(Path(annotations).resolve()), "images_root": str(root.resolve()),
            "backbone": backbone, "checkpoint": str(checkpoint) if checkpoint else None,
            "backbone_spec": spec,
            "batch_size": result.cache.manifest.get("plan", {}).get("batch_size", batch_size),
            "num_workers": num_workers})
    return result


