"""``taxoclass import``: what users have -> a validated Herbarium 2022-style file."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .app import main


@main.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Annotation file to write (.json).")
@click.option("--images-root", type=click.Path(path_type=Path), default=None,
              help="Folder the written file_name paths are relative to (every image must lie "
                   "under it) [default: the folder of --out]. Pass the same folder to "
                   "validate, embed, evaluate and as data.images_root to train.")
@click.option("--format", "source_format",
              type=click.Choice(["auto", "folders", "table", "dwc", "coco"]), default="auto",
              show_default=True, help="What SOURCE is; auto guesses (see above).")
@click.option("--ranks", default=None, metavar="R1,R2,...",
              help="Rank list, top-down (folder levels of a tree, rank columns of a table) "
                   "[default: folders family,genus,species; tables: their columns named as "
                   "ranks, kingdom ... species].")
@click.option("--taxonomy", type=click.Path(path_type=Path), default=None,
              help="CSV with one column per rank (species, genus, family, order, ...; "
                   "optionally a 'name' column) naming the taxa of species folders or COCO "
                   "category names.")
@click.option("--image-column", default=None,
              help="Image path column of a CSV [default: file_name, image, path, ...].")
@click.option("--group-column", "group_columns", multiple=True,
              help="Another CSV column to keep on the images as a group field (data.group_by); "
                   "track, site, specimen, plot, ... are kept anyway. Repeatable.")
@click.option("--multimedia", type=click.Path(path_type=Path), default=None,
              help="Darwin Core multimedia table [default: multimedia.txt beside the "
                   "occurrence table].")
@click.option("--crops", type=click.Path(path_type=Path), default=None,
              help="COCO: folder for the box crops [default: <out stem>_crops beside --out].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def import_command(source: Path, out: Path, images_root: Path | None, source_format: str,
                   ranks: str | None, taxonomy: Path | None, image_column: str | None,
                   group_columns: tuple[str, ...], multimedia: Path | None,
                   crops: Path | None, overwrite: bool) -> None:
    """Write a Herbarium 2022-style annotation file from SOURCE, then validate it.

    \b
    SOURCE is one of (--format auto tells them apart):
      folders  a folder tree family/genus/species/*.jpg; species folders named by
               epithet (campestre) or binomial (Acer campestre, Acer_campestre). An
               image in a genus (family) folder gets a genus-only (family-only)
               label; folders below species become the image's 'group' field. With
               --taxonomy: one folder per taxon (species binomial, genus or family)
               under SOURCE, ranks from the table.
      table    a CSV/TSV with an image path column and one column per rank (order,
               family, genus, species, ...); an empty cell ends the label there
               (family-only rows are fine). Relative paths: from the table's folder.
      dwc      an iNaturalist / GBIF Darwin Core export (folder or occurrence file):
               occurrence.txt + multimedia.txt joined on gbifID/id; ranks kingdom ...
               species, labels stop at taxonRank; 'identifier' must be a local image
               path (download URLs first); eventID, locationID kept as groups.
      coco     COCO detection JSON with bboxes: each box is cut into a crop image
               (--crops); category names mapped to ranks by --taxonomy or by rank
               fields on the categories. Bad images or boxes are listed in
               failures.csv, the rest are cut.

    \b
    Then, e.g.:
      taxoclass import photos/ --out data/train.json
      taxoclass validate data/train.json --images-root data
      taxoclass embed --annotations data/train.json --images-root data ...
    """
    from ..pipelines.importing import import_annotations

    rank_list = [r.strip() for r in ranks.split(",") if r.strip()] if ranks else None
    result = import_annotations(source, out, images_root=images_root,
                                source_format=source_format, ranks=rank_list,
                                taxonomy=taxonomy, image_column=image_column,
                                group_columns=group_columns, multimedia=multimedia,
                                crops=crops, overwrite=overwrite)
    click.echo(result.report.format())
    if result.left_out:
        click.echo(f"left out {len(result.left_out)} image(s) missing on disk, e.g. "
                   f"{result.left_out[0]}")
    if result.failures:
        click.echo(f"{len(result.failures)} box(es) failed (listed in "
                   f"{result.crops / 'failures.csv'}), e.g. {result.failures[0]['source']}: "
                   f"{result.failures[0]['reason']}")
    if result.crops is not None:
        click.echo(f"crops: {result.crops}")
    click.echo(f"wrote {result.out} ({result.source_format}); images root: "
               f"{result.images_root} (pass --images-root {result.images_root} to validate, "
               "embed and evaluate; data.images_root in a training config)")
    sys.exit(0 if result.report.ok else 1)
