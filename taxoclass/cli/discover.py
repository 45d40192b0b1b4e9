"""``taxoclass discover``: cluster the images a model flags into candidate new taxa."""

from __future__ import annotations

from pathlib import Path

import click

from .app import device_option, main, progress_bar


@main.command("discover")
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="Model bundle folder written by `taxoclass train`.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path),
                metavar="FLAGS_OR_IMAGES...")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for clusters.csv, members.csv, discover.html, discover.json, "
                   "failures.csv and provenance.")
@click.option("--min-cluster-size", type=click.IntRange(min=2), default=None,
              help="Smallest cluster reported [default: max(3, round(log2 N)) for N images].")
@click.option("--min-samples", type=click.IntRange(min=1), default=None,
              help="HDBSCAN min_samples [default: 1].")
@click.option("--dims", type=click.IntRange(min=2), default=None,
              help="PCA dimensions of the clustering space [default: 16].")
@click.option("--cluster-selection", "selection", type=click.Choice(["leaf", "eom"]),
              default=None,
              help="HDBSCAN cluster selection: leaf (finest clusters) or eom (excess of mass) "
                   "[default: leaf].")
@click.option("--all", "include_all", is_flag=True,
              help="With images or folders: cluster every readable image, not only those the "
                   "model flags.")
@click.option("--min-probability", type=click.FloatRange(0, 1), default=None,
              help="Placement: mean coherent probability the taxon needs over the members "
                   "[default: 0.9].")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help="Placement: share of members whose decoded path must name the taxon "
                   "[default: 0.5].")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Embedding store to read and grow [default: the model's training store "
                   "when writable, else --out/embeddings].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass [default: 8 on a CPU, 64 on a GPU].")
@device_option
def discover(model: Path, inputs: tuple[Path, ...], out: Path, min_cluster_size: int | None,
             min_samples: int | None, dims: int | None, selection: str | None,
             include_all: bool,
             min_probability: float | None, min_agreement: float | None,
             cache: Path | None, batch_size: int | None,
             device: str) -> None:
    """Cluster the images the model flags as unknown into candidate new taxa.

    FLAGS_OR_IMAGES is a `taxoclass flag-unknowns` output folder (its flagged images are
    clustered) or image files and folders (the model flags them first; --all: every
    image). Each cluster gets its most likely place in the tree (the lowest rank above the
    model's lowest whose evidence passes), its size and the members nearest its centre;
    images in no cluster are listed as noise. An expert fills in the rank columns of
    members.csv, then `taxoclass import members.csv --out new.json --images-root DIR`
    reads them back as labels.
    """
    from ..pipelines.discover import DiscoverSettings, discover_taxa

    given = {"dims": dims, "min_probability": min_probability, "min_agreement": min_agreement,
             "selection": selection}
    settings = DiscoverSettings(min_cluster_size=min_cluster_size, min_samples=min_samples,
                                include="all" if include_all else "flagged",
                                **{k: v for k, v in given.items() if v is not None})
    with progress_bar("embedding", "img") as prog:
        result = discover_taxa(model, inputs, out=out, settings=settings, cache=cache,
                               batch_size=batch_size, device=device, progress=prog)
    s = result.summary
    click.echo(f"{s['n_images']} images: {s['n_clusters']} cluster(s), {s['n_noise']} noise, "
               f"{s['n_failed']} unreadable (smallest cluster "
               f"{s['settings']['min_cluster_size']})")
    for row in result.clusters.to_dict("records"):
        evidence = ("" if row["placement_prob"] is None or row["placement_prob"] != row[
            "placement_prob"] else f" (mean p {row['placement_prob']:.2f}, "
                                   f"{row['placement_agree']:.0%} agree)")
        click.echo(f"  cluster {row['cluster']:>3}: {row['size']:>4} images -> "
                   f"{row['placement_rank']} {row['placement']}{evidence}")
    emb = s["embeddings"]
    click.echo(f"embeddings: {emb['n_computed']} computed, {emb['n_reused']} reused "
               f"({emb['folder']})")
    click.echo(f"wrote {out / 'discover.html'}, {out / 'members.csv'} (fill in the rank "
               "columns, then `taxoclass import`)")
