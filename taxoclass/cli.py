"""The ``taxoclass`` command line: each command parses options, calls one library
function and writes its result. Heavy imports happen inside the commands so that
``taxoclass --help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import TaxoclassError


class _Group(click.Group):
    """Turn taxoclass errors into one clear message and exit code 2, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TaxoclassError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "max_content_width": 100})
@click.version_option(__version__, prog_name="taxoclass")
def main() -> None:
    """Name organisms in images at the taxonomic rank the evidence supports.

    \b
    Typical run on a labelled image folder (Herbarium 2022-style annotations):
      taxoclass validate annotations.json --images-root DIR
      taxoclass embed --annotations annotations.json --images-root DIR \\
                      --backbone efficientnet-lite0 --out runs/emb
      taxoclass train --config configs/leaf.yaml
      taxoclass evaluate --model runs/leaf --annotations annotations.json --images-root DIR
      taxoclass predict --model runs/leaf IMAGE...
    """


# --------------------------------------------------------------------------- validate
@main.command()
@click.argument("annotations", type=click.Path(path_type=Path))
@click.option("--images-root", type=click.Path(path_type=Path), default=None,
              help="Folder the images' file_name paths are relative to; checks every file "
                   "exists. Omit to check the JSON only.")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Also write every problem to this CSV (severity, path, record, expected, "
                   "found, fix).")
def validate(annotations: Path, images_root: Path | None, report: Path | None) -> None:
    """Check an annotation file: schema, ids, genus/family consistency, image files.

    Lists every problem with its JSON path, the record, what was expected and found,
    and how to fix it; exits 1 when there is any error. A clean file prints counts
    per rank.
    """
    from .annotations import validate_annotations
    from .fileio import atomic_write_csv

    result = validate_annotations(annotations, images_root=images_root)
    click.echo(result.format())
    if report is not None:
        atomic_write_csv(report, result.to_frame())
    sys.exit(0 if result.ok else 1)


# --------------------------------------------------------------------------- taxonomy
@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--ranks", default="family,genus,species", show_default=True,
              help="Comma-separated ranks, top-down; add 'order' when the data has it.")
@click.option("--csv", "csv_out", type=click.Path(path_type=Path), default=None,
              help="Write the tree as CSV: one row per taxon with rank, class index, parent "
                   "and full path.")
def taxonomy(source: Path, ranks: str, csv_out: Path | None) -> None:
    """Print the taxonomy of an annotation file or species table (counts per rank).

    SOURCE is a Herbarium 2022-style annotations JSON, or a species table (CSV or
    ';'-separated with species, genus, family columns, like PlantCLEF's).
    """
    from .workflows import load_taxonomy

    tax = load_taxonomy(source, ranks=[r.strip() for r in ranks.split(",") if r.strip()])
    for rank, n in tax.summary().items():
        click.echo(f"{rank:>12}: {n}")
    if csv_out is not None:
        from .fileio import atomic_write_csv

        atomic_write_csv(csv_out, tax.to_frame())
        click.echo(f"wrote {csv_out}")


# --------------------------------------------------------------------------- embed
@main.command()
@click.option("--annotations", type=click.Path(path_type=Path), required=True,
              help="Annotations JSON listing the images (labelled or not).")
@click.option("--images-root", type=click.Path(path_type=Path), default=None,
              help="Folder the file_name paths are relative to [default: the JSON's folder].")
@click.option("--backbone", default="vit_base_patch14_reg4_dinov2.lvd142m", show_default=True,
              help="Any timm model name, or an alias: 'dinov2', 'efficientnet-lite0' (real "
                   "ImageNet weights that install offline).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Local weights: a timm state dict or a PlantCLEF model_best.pth.tar.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Cache folder; an interrupted run resumes here.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--num-workers", default=0, show_default=True,
              help="DataLoader workers decoding images in parallel.")
@click.option("--overwrite", is_flag=True, help="Discard an existing cache in --out.")
def embed(annotations: Path, images_root: Path | None, backbone: str, checkpoint: Path | None,
          out: Path, batch_size: int, num_workers: int, overwrite: bool) -> None:
    """Compute one embedding per image into a resumable on-disk cache.

    Writes chunks atomically with a manifest (backbone, checkpoint hash, transform,
    image ids), records missing or corrupt images in failures.csv while the rest
    carries on, and writes provenance.json beside the cache.
    """
    from .workflows import embed_annotations

    with _progress("embedding", "img") as progress:
        result = embed_annotations(annotations, images_root=images_root, backbone=backbone,
                                   checkpoint=checkpoint, out=out, batch_size=batch_size,
                                   num_workers=num_workers, overwrite=overwrite,
                                   progress=progress)
    n = len(result.cache.image_ids)
    click.echo(f"{n} embeddings of dim {result.cache.embeddings.shape[1]} in {out} "
               f"({result.n_computed} computed, {result.n_reused} reused, "
               f"{result.seconds:.1f} s)")
    if len(result.failures):
        click.echo(f"{len(result.failures)} image(s) failed; see {out / 'failures.csv'}",
                   err=True)


class _progress:
    """A tqdm bar driven by the library's ``progress(done, total)`` callback."""

    def __init__(self, desc: str, unit: str) -> None:
        self.desc, self.unit, self.bar = desc, unit, None

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":  # pragma: no cover
    main()
