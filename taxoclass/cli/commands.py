"""The ``taxoclass`` commands on images and models: validate, taxonomy, embed, train,
predict, flag-unknowns, evaluate, explain.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..vocab import Calibration
from .app import (
    allow_outside_root_option,
    device_option,
    embedding_store_options,
    engine_options,
    fmt3,
    json_option,
    main,
    pad_fill_option,
    print_metrics,
    progress_bar,
    show_predictions,
)


# --------------------------------------------------------------------------- validate
@main.command()
@click.argument("annotations", type=click.Path(path_type=Path))
@click.option("--images-root", type=click.Path(path_type=Path), default=None,
              help="Folder the images' file_name paths are relative to; checks every file "
                   "exists. Omit to check the JSON only.")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Also write every problem to this CSV (severity, path, record, expected, "
                   "found, fix).")
@allow_outside_root_option
def validate(annotations: Path, images_root: Path | None, report: Path | None,
             allow_outside_root: bool) -> None:
    """Check an annotation file: schema, ids, genus/family consistency, image files.

    Lists every problem with its JSON path, the record, what was expected and found,
    and how to fix it; exits 1 when there is any error. A clean file prints counts
    per rank.
    """
    from ..io.files import atomic_write_csv
    from ..taxonomy.annotations import validate_annotations

    result = validate_annotations(annotations, images_root=images_root,
                                  allow_outside_root=allow_outside_root)
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
    from ..taxonomy.loading import load_taxonomy

    tax = load_taxonomy(source, ranks=[r.strip() for r in ranks.split(",") if r.strip()])
    for rank, n in tax.summary().items():
        click.echo(f"{rank:>12}: {n}")
    if csv_out is not None:
        from ..io.files import atomic_write_csv

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
                   "ImageNet weights that install offline). Hub weights are downloaded once "
                   "(TAXOCLASS_OFFLINE=1: never; only the local cache is used).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Local weights: a timm state dict or a PlantCLEF model_best.pth.tar.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Cache folder; an interrupted run resumes here.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass [default: 8 on a CPU, 64 on a GPU].")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader workers decoding images in parallel.")
@click.option("--model-kwargs", default=None, metavar="JSON",
              help='Extra timm.create_model arguments, e.g. \'{"img_size": 224}\'; needed to '
                   "rebuild a checkpoint of a non-default shape.")
@click.option("--image-size", type=click.IntRange(16, 4096), default=None,
              help="Input side in pixels [default: the model's own, e.g. 224].")
@click.option("--resize", type=click.Choice(["crop", "letterbox", "squash"]), default=None,
              help="crop: timm's centre crop (the ends of long images are lost); letterbox: "
                   "whole image, padded to a square; squash: whole image, stretched "
                   "[default: the model's own, a centre crop].")
@click.option("--pad-fill", default=None, metavar="mean|black|white|0-255",
              help="Letterbox border colour [default: mean].")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True,
              help="auto: bf16 autocast on a GPU, float32 on a CPU. bf16 on a CPU is 1.4-1.7x "
                   "faster where it has AVX-512 BF16 (features then carry bf16 rounding).")
@click.option("--overwrite", is_flag=True,
              help="Delete the vectors stored in --out and start over (never needed for new "
                   "images or settings: they are stored beside the old ones).")
@allow_outside_root_option
@engine_options
@device_option
def embed(annotations: Path, images_root: Path | None, backbone: str, checkpoint: Path | None,
          out: Path, batch_size: int, num_workers: int, model_kwargs: str | None,
          image_size: int | None, resize: str | None, pad_fill: str | None, precision: str,
          overwrite: bool, allow_outside_root: bool, engine: str, master: str | None,
          device: str) -> None:
    """Compute one embedding per image into a resumable on-disk cache.

    Writes chunks atomically with a manifest (backbone, checkpoint hash, transform,
    image ids), records missing or corrupt images in failures.csv while the rest
    carries on, and writes provenance.json beside the cache.
    """
    from ..pipelines.embed import embed_annotations
    from ..taxonomy.annotations import outside_root_allowed

    with outside_root_allowed(allow_outside_root), progress_bar("embedding", "img") as progress:
        result = embed_annotations(annotations, images_root=images_root, backbone=backbone,
                                   checkpoint=checkpoint, out=out, batch_size=batch_size,
                                   num_workers=num_workers, overwrite=overwrite,
                                   model_kwargs=json_option("--model-kwargs", model_kwargs),
                                   progress=progress, engine=engine, master=master,
                                   device=device, image_size=image_size, resize=resize,
                                   pad_fill=pad_fill_option(pad_fill), precision=precision)
    n = len(result.cache.image_ids)
    click.echo(f"{n} embeddings of dim {result.cache.embeddings.shape[1]} in {out} "
               f"({result.n_computed} computed, {result.n_reused} reused, "
               f"{result.seconds:.1f} s)")
    if len(result.failures):
        click.echo(f"{len(result.failures)} image(s) failed; see {out / 'failures.csv'}",
                   err=True)


# --------------------------------------------------------------------------- train
@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="YAML config (see configs/leaf.yaml). Relative paths in it are relative to "
                   "the config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.epochs=50 --set out=runs/x. "
                   "Repeatable.")
@click.option("--finetune", is_flag=True,
              help="Train the backbone and heads together on the images (end-to-end, "
                   "resumable; bf16 on CUDA) instead of heads on cached embeddings.")
@click.option("--unfreeze-blocks", type=click.IntRange(min=-1), default=None,
              help="With --finetune: train only the last N blocks (0 = heads only, -1 = all).")
@click.option("--device", default=None, help="With --finetune: cpu or cuda [default: cuda if "
              "available].")
def train(config_path: Path | None, overrides: tuple[str, ...], finetune: bool,
          unfreeze_blocks: int | None, device: str | None) -> None:
    """Train a classifier over the taxonomy's ranks (family/genus/species by default).

    The default loss is hierarchical cross-entropy on the species head (``loss.kind: hxe``,
    marginal decoding; chosen by `taxoclass benchmark`, BENCHMARKS.md); one head per rank
    with the class-dependency loss: --set loss.kind=dependency --set decode.method=path.
    Reads the annotations and the embedding cache (computing it when missing), makes a
    seeded validation split stratified by species, trains (early stopping if set),
    chooses the open-set recipe on the training data (openset.recipe: auto) and
    writes a model bundle: head weights (safetensors), taxonomy, labels, resolved
    config, training curve, split, validation metrics and provenance. With
    ``openset.calibration: crossfit`` the head trains on every image and the metrics
    (and the back-off thresholds) come from out-of-fold predictions.
    """
    from ..config import load_config
    from ..taxonomy.annotations import outside_root_allowed

    cfg = load_config(config_path, overrides)
    with outside_root_allowed(bool(cfg["data"].get("allow_outside_root"))):
        _train(cfg, finetune, unfreeze_blocks, device)


def _train(cfg: dict, finetune: bool, unfreeze_blocks: int | None, device: str | None) -> None:
    from ..config import openset_calibration
    from ..pipelines.train import train_from_config

    if finetune:
        from ..pipelines.finetune import finetune_from_config

        if unfreeze_blocks is not None:
            cfg["finetune"]["unfreeze_blocks"] = unfreeze_blocks
        with progress_bar("embedding", "img") as emb, progress_bar("fine-tuning", "step") as prog:
            out = finetune_from_config(cfg, progress=prog, device=device, embed_progress=emb)
        if out is None:  # another process of a torchrun job: process 0 writes and reports
            return
        print_metrics(out / "metrics_val.json", f"validation metrics ({out})")
        click.echo(f"model bundle written to {out}")
        return
    with progress_bar("embedding", "img") as emb, progress_bar("training", "epoch") as prog:
        out = train_from_config(cfg, progress=prog, embed_progress=emb)
    kind = ("out-of-fold" if openset_calibration(cfg.get("openset"))[0] == Calibration.CROSSFIT
            else "validation")
    print_metrics(out / "metrics_val.json", f"{kind} metrics ({out})")
    _print_openset_selection(out / "metrics_val.json")
    click.echo(f"model bundle written to {out}")


def _print_openset_selection(path: Path) -> None:
    """The open-set recipe used and the precision and AUROC to expect (docs/openset.md)."""
    import json

    sel = json.loads(path.read_text()).get("openset_selection")
    if not sel:
        return
    c = sel["chosen"]
    if sel.get("fallback"):
        click.echo(f"open-set recipe: fixed {sel['chosen_key']} (not chosen on the data: "
                   f"{sel['fallback']})")
        return
    click.echo(f"open-set recipe ({sel['used']}, {sel['rounds']} leave-taxa-out rounds, "
               f"{len(sel['candidates'])} candidate(s)): detector {c['detector']}, combiner "
               f"{c['combiner']}, confidence {c['confidence']}, gate_quantile "
               f"{c['gate_quantile']:g}")
    e = sel["expected"]

    def fig(key: str) -> str:
        lo, hi = e.get(f"{key}_ci95") or (None, None)
        ci = f" [{fmt3(lo)}, {fmt3(hi)}]" if lo is not None and hi is not None else ""
        return f"{fmt3(e.get(key))}{ci}"

    click.echo(f"expected (mean over rounds, 95% interval): unknown-detection AUROC "
               f"{fig('auroc')}; species-answer precision over known images "
               f"{fig('precision_species_known')}, over all images at "
               f"{sel['unknown_share']:.0%} unknown {fig('precision_species_all')} (target "
               f"{sel['target_precision_species']:g}); known images named to species "
               f"{fig('coverage_known_species')}")
    nested = sel.get("expected_nested")
    if nested:
        e = nested
        click.echo(f"the choice itself (chosen on the other rounds, scored on each): AUROC "
                   f"{fig('auroc')}; precision over all images {fig('precision_species_all')}; "
                   f"known named to species {fig('coverage_known_species')}")


# --------------------------------------------------------------------------- predict
@main.command()
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="Model bundle folder written by `taxoclass train`.")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for predictions.csv / predictions.json, provenance and the "
                   "(resumable) embedding cache.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Species candidates listed per image.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass [default: 8 on a CPU, 64 on a GPU].")
@embedding_store_options
@engine_options
@device_option
def predict(model: Path, images: tuple[Path, ...], out: Path | None, top_k: int,
            batch_size: int, overwrite: bool, cache: Path | None, engine: str,
            master: str | None, device: str) -> None:
    """Predict every rank of the model (coherent path + top-k) for IMAGES (files or folders)."""
    from ..pipelines.predict import predict_images

    if engine != "local" and out is None:
        raise click.UsageError("--engine spark writes Parquet: pass --out DIR.")
    with progress_bar("predicting", "img") as prog:
        frame = predict_images(model, images, out=out, top_k=top_k, batch_size=batch_size,
                               overwrite=overwrite, progress=prog, device=device,
                               engine=engine, master=master, cache=cache)
    show_predictions(frame)
    _echo_embeddings(frame.attrs.get("embeddings"))
    if out:
        click.echo(f"wrote {out / 'predictions.csv'} and {out / 'predictions.json'}")


def _echo_embeddings(emb: dict | None) -> None:
    """``embeddings: N computed, M reused (FOLDER)`` after predict and flag-unknowns."""
    if emb:
        click.echo(f"embeddings: {emb['n_computed']} computed, {emb['n_reused']} reused "
                   f"({emb['folder'] or 'a temporary folder'})")


@main.command("flag-unknowns")
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="Model bundle folder written by `taxoclass train` (with its outlier "
                   "detector and calibrated thresholds).")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for flags.csv, flags_summary.json, predictions and provenance. "
                   "(flags.csv: one row per image, flagged rows first.)")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass [default: 8 on a CPU, 64 on a GPU].")
@embedding_store_options
@device_option
def flag_unknowns_cmd(model: Path, images: tuple[Path, ...], out: Path, batch_size: int,
                      overwrite: bool, cache: Path | None, device: str) -> None:
    """Screen field-survey IMAGES (files or folders) for species the model does not know.

    Each image is named at the lowest rank whose evidence passes its calibrated threshold:
    a known species by name, an unknown oak as "Quercus sp." (reason
    backoff_to_genus:outlier or :low_confidence), or "unknown" (reason unknown:outlier or
    unknown:low_confidence); an unreadable file: reason failed.
    """
    from ..pipelines.predict import flag_unknowns

    with progress_bar("screening", "img") as prog:
        frame, summary = flag_unknowns(model, images, out=out, batch_size=batch_size,
                                       overwrite=overwrite, progress=prog, device=device,
                                       cache=cache)
    show_predictions(frame)
    _echo_embeddings(summary.get("embeddings"))
    click.echo(f"{summary['n_flagged']} of {summary['n_images']} images flagged; resolved at: "
               + ", ".join(f"{k} {v}" for k, v in summary["resolved_at"].items()))
    click.echo(f"wrote {out / 'flags.csv'}")


# --------------------------------------------------------------------------- evaluate
@main.command()
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="Model bundle folder written by `taxoclass train`.")
@click.option("--annotations", type=click.Path(path_type=Path), required=True)
@click.option("--images-root", type=click.Path(path_type=Path), default=None,
              help="Folder the file_name paths are relative to [default: the JSON's folder].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder: metrics.json, predictions.csv (per image: path, truth, "
                   "prediction, confidence, reason, correct), confusion.csv, reliability.csv/"
                   ".png and provenance.json (open-set: the openset_* files).")
@click.option("--split", type=click.Choice(["auto", "all", "val", "train"]), default="auto",
              show_default=True,
              help="auto: every image except those the model trained on (recognised by file "
                   "content, whatever the annotation file or ids); val / train: that split "
                   "of the training data; all: every labelled image.")
@click.option("--holdout-species", multiple=True, metavar="BINOMIAL",
              help="Open-set evaluation: retrain the bundle's recipe without this species "
                   "(repeatable), then score unknown detection and back-off.")
@click.option("--holdout-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None,
              help="Open-set evaluation with a seeded share of the species held out (only "
                   "species whose genus keeps a known species).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the hold-out choice/split.")
@allow_outside_root_option
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Embedding store to read and grow (only images it lacks are embedded) "
                   "[default: the model's training store when writable, else embeddings/ beside "
                   "the --out files, "
                   "else a temporary folder].")
def evaluate(model: Path, annotations: Path, images_root: Path | None, out: Path | None,
             split: str, holdout_species: tuple[str, ...], holdout_fraction: float | None,
             seed: int, allow_outside_root: bool, cache: Path | None) -> None:
    """Per-rank accuracy / macro-F1 / top-5, hierarchical P/R/F1, mistake severity,
    coherence rate and the most confused taxon pairs.

    With --holdout-species or --holdout-fraction: open-set evaluation instead (AUROC and
    FPR@95%TPR per detection method, what back-off reports for held-out and known
    species, risk-coverage per rank).
    """
    from ..taxonomy.annotations import outside_root_allowed

    with outside_root_allowed(allow_outside_root):
        if holdout_species or holdout_fraction is not None:
            _evaluate_holdout(model, annotations, images_root, out, holdout_species,
                              holdout_fraction, seed)
        else:
            _evaluate(model, annotations, images_root, out, split, cache)


def _evaluation_folder(out: Path | None) -> Path | None:
    """evaluate's --out folder. The older form ``--out DIR/metrics.json`` still means DIR
    (with a warning); another ``*.json`` name that is not a folder is refused."""
    if out is None or out.is_dir() or out.suffix.lower() != ".json":
        return out
    if out.name in ("metrics.json", "openset_metrics.json"):
        click.echo(f"warning: evaluate --out is a folder; writing into {out.parent} (pass "
                   f"--out {out.parent})", err=True)
        return out.parent
    if out.exists():
        return out  # an existing file: evaluate refuses it with the fix
    raise click.UsageError(f"--out {out}: evaluate writes a folder (metrics.json, "
                           f"predictions.csv, ...), not one JSON file. Pass --out "
                           f"{out.with_suffix('')}.")


def _evaluate(model: Path, annotations: Path, images_root: Path | None, out: Path | None,
              split: str, cache: Path | None = None) -> None:
    from ..pipelines.evaluate import evaluate_model

    out = _evaluation_folder(out)
    with progress_bar("embedding", "img") as prog:
        metrics = evaluate_model(model, annotations, images_root=images_root, out=out,
                                 split=split, cache=cache, progress=prog)
    print_metrics(metrics, f"{metrics['n_images']} images ({metrics['split']} split)")
    cal = metrics.get("calibration")
    if cal:
        click.echo("calibration error (ECE) of confidence: " + ", ".join(
            f"{r} {e:.3f}" for r, e in cal["ece"].items() if e is not None)
            + ("" if cal["calibrated"] else " (uncalibrated model)"))
    click.echo("most confused pairs:")
    for row in metrics["confusion"][:10]:
        click.echo(f"  {row['count']:>3} x  {row['true']}  ->  {row['predicted']}")
    if out is not None:
        click.echo(f"wrote {out}")


def _evaluate_holdout(model, annotations, images_root, out, species, fraction, seed) -> None:
    from ..pipelines.evaluate import evaluate_holdout

    out_dir = _evaluation_folder(out)
    with progress_bar("embedding", "img") as prog:
        r = evaluate_holdout(model, annotations, images_root=images_root,
                             holdout_species=list(species) or None, holdout_fraction=fraction,
                             seed=seed, out=out_dir, progress=prog)
    click.echo(f"held out {len(r['held_out_species'])} species: "
               + ", ".join(r["held_out_species"]))
    click.echo(f"test: {r['n_test_known']} known + {r['n_test_held_out']} held-out images; "
               "known accuracy " + ", ".join(f"{k} {fmt3(v)}"
                                             for k, v in r["known_test_accuracy"].items()))
    click.echo("unknown detection (higher score = unknown):")
    for row in r["detection"]:
        click.echo(f"  {row['method']:<45} AUROC {row['auroc']:.3f}  "
                   f"FPR@95%TPR {row['fpr_at_95tpr']:.3f}")
    click.echo("back-off outcomes:")
    for k, v in r["outcomes"].items():
        click.echo(f"  {k:<28} {v:.3f}" if isinstance(v, float) else f"  {k:<28} {v}")
    if out_dir is not None:
        click.echo(f"wrote {out_dir / 'openset_metrics.json'}")


@main.command()
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Model bundle folder (its backbone is explained).")
@click.option("--backbone", default=None, help="Or a timm backbone name (with --checkpoint).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None)
@click.option("--model-kwargs", default=None, metavar="JSON")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Overlay PNG.")
@click.option("--head", type=click.IntRange(min=0), default=None,
              help="One attention head (default: the mean over heads).")
def explain(model: Path | None, backbone: str | None, checkpoint: Path | None,
            model_kwargs: str | None, image: Path, out: Path, head: int | None) -> None:
    """Overlay the last block's class-token attention (DINOv2 / ViT) on IMAGE."""
    from ..bundle import ModelBundle
    from ..features.attention import explain as explain_image
    from ..features.backbones import create_backbone

    if model is not None:
        bb = ModelBundle.load(model).create_backbone()
    elif backbone is not None:
        bb = create_backbone(backbone, checkpoint=checkpoint,
                             model_kwargs=json_option("--model-kwargs", model_kwargs))
    else:
        raise click.UsageError("pass --model BUNDLE or --backbone NAME [--checkpoint P].")
    explain_image(bb, image, out, head=head)
    click.echo(f"wrote {out}")
