"""The ``taxoclass`` command line: each command parses options, calls one library
function and writes its result. Heavy imports happen inside the commands so that
``taxoclass --help`` is instant.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import click

from ._version import __version__
from .errors import TaxoclassError


class _Group(click.Group):
    """Turn taxoclass errors into one clear message and exit code 2, not a traceback."""

    def main(self, args=None, prog_name=None, **kwargs):
        from .io import provenance

        argv = list(sys.argv[1:] if args is None else args)
        _configure_process()
        with provenance.recorded_command(["taxoclass", *argv]):
            return super().main(args=args, prog_name=prog_name, **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TaxoclassError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)


class _EchoHandler(logging.Handler):
    """Library log records as ``warning: ...`` lines on the (current) stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


def _configure_process() -> None:
    """What the command line, owning its process, sets up: library warnings on stderr
    (``warning: ...``), PySpark 4's pandas-3 FutureWarning silenced (harmless for
    mapInPandas, printed on every conversion) and the CPU allocator tuned for embedding
    loops (:func:`~taxoclass.features.allocator.tune_cpu_allocator`)."""
    from .engines import PANDAS_WARNING
    from .features.allocator import tune_cpu_allocator

    tune_cpu_allocator()

    logger = logging.getLogger("taxoclass")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler(level=logging.WARNING))
        logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=PANDAS_WARNING, category=FutureWarning)


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


def _device_option(command):
    return click.option(
        "--device", default="auto", show_default=True,
        help="cpu, cuda (bf16 autocast, fused attention) or auto: cuda when a GPU is "
             "present.")(command)


def _engine_options(command):
    """``--engine local|spark`` and ``--master URL`` for the commands both engines run."""
    command = click.option(
        "--master", default=None,
        help="Spark master URL with --engine spark [default: local[2]].")(command)
    return click.option("--engine", type=click.Choice(["local", "spark"]), default="local",
                        show_default=True,
                        help="local: this machine; spark: the same code in PySpark mapInPandas, "
                             "Parquet output, resumable (needs `pip install taxoclass[spark]` "
                             "and Java).")(command)



def _checkpoint_model_options(command):
    """The options that describe a PlantCLEF checkpoint ``--model`` (plot commands)."""
    for option in reversed([
        click.option("--class-mapping", type=click.Path(path_type=Path), default=None,
                     help="PlantCLEF class_mapping.txt (with a checkpoint --model)."),
        click.option("--species-table", type=click.Path(path_type=Path), default=None,
                     help="Species table with species_id, species, genus, family (with a "
                          "checkpoint --model)."),
        click.option("--backbone", default="vit_base_patch14_reg4_dinov2", show_default=True,
                     help="Architecture of a checkpoint --model."),
        click.option("--model-kwargs", default=None, metavar="JSON",
                     help="Extra timm.create_model arguments for a checkpoint --model."),
    ]):
        command = option(command)
    return command

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
    from .io.files import atomic_write_csv
    from .taxonomy.annotations import validate_annotations

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
    from .taxonomy.loading import load_taxonomy

    tax = load_taxonomy(source, ranks=[r.strip() for r in ranks.split(",") if r.strip()])
    for rank, n in tax.summary().items():
        click.echo(f"{rank:>12}: {n}")
    if csv_out is not None:
        from .io.files import atomic_write_csv

        atomic_write_csv(csv_out, tax.to_frame())
        click.echo(f"wrote {csv_out}")


def _pad_fill_option(value: str | None) -> str | int | None:
    """--pad-fill: a colour name or a grey level."""
    if value is None or not value.strip().isdigit():
        return value
    return int(value)


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
@click.option("--batch-size", type=int, default=None,
              help="Images per forward pass [default: 8 on a CPU, 64 on a GPU].")
@click.option("--num-workers", default=0, show_default=True,
              help="DataLoader workers decoding images in parallel.")
@click.option("--model-kwargs", default=None, metavar="JSON",
              help='Extra timm.create_model arguments, e.g. \'{"img_size": 224}\'; needed to '
                   "rebuild a checkpoint of a non-default shape.")
@click.option("--image-size", type=click.IntRange(min=16), default=None,
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
@click.option("--overwrite", is_flag=True, help="Discard an existing cache in --out.")
@_engine_options
@_device_option
def embed(annotations: Path, images_root: Path | None, backbone: str, checkpoint: Path | None,
          out: Path, batch_size: int, num_workers: int, model_kwargs: str | None,
          image_size: int | None, resize: str | None, pad_fill: str | None, precision: str,
          overwrite: bool, engine: str, master: str | None, device: str) -> None:
    """Compute one embedding per image into a resumable on-disk cache.

    Writes chunks atomically with a manifest (backbone, checkpoint hash, transform,
    image ids), records missing or corrupt images in failures.csv while the rest
    carries on, and writes provenance.json beside the cache.
    """
    from .pipelines.embed import embed_annotations

    with _progress("embedding", "img") as progress:
        result = embed_annotations(annotations, images_root=images_root, backbone=backbone,
                                   checkpoint=checkpoint, out=out, batch_size=batch_size,
                                   num_workers=num_workers, overwrite=overwrite,
                                   model_kwargs=_json_option("--model-kwargs", model_kwargs),
                                   progress=progress, engine=engine, master=master,
                                   device=device, image_size=image_size, resize=resize,
                                   pad_fill=_pad_fill_option(pad_fill), precision=precision)
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
@click.option("--unfreeze-blocks", type=int, default=None,
              help="With --finetune: train only the last N blocks (0 = heads only, -1 = all).")
@click.option("--device", default=None, help="With --finetune: cpu or cuda [default: cuda if "
              "available].")
def train(config_path: Path | None, overrides: tuple[str, ...], finetune: bool,
          unfreeze_blocks: int | None, device: str | None) -> None:
    """Train family/genus/species heads jointly with the class-dependency loss.

    Reads the annotations and the embedding cache (computing it when missing), makes a
    seeded validation split stratified by species, trains with early stopping, and
    writes a model bundle: head weights (safetensors), taxonomy, labels, resolved
    config, training curve, split, validation metrics and provenance. With
    ``openset.calibration: crossfit`` the head trains on every image and the metrics
    (and the back-off thresholds) come from out-of-fold predictions.
    """
    from .config import load_config, openset_calibration
    from .pipelines.train import train_from_config

    cfg = load_config(config_path, overrides)
    if finetune:
        from .pipelines.finetune import finetune_from_config

        if unfreeze_blocks is not None:
            cfg["finetune"]["unfreeze_blocks"] = unfreeze_blocks
        with _progress("embedding", "img") as emb, _progress("fine-tuning", "step") as prog:
            out = finetune_from_config(cfg, progress=prog, device=device, embed_progress=emb)
        _print_metrics(out / "metrics_val.json", f"validation metrics ({out})")
        click.echo(f"model bundle written to {out}")
        return
    with _progress("embedding", "img") as emb, _progress("training", "epoch") as prog:
        out = train_from_config(cfg, progress=prog, embed_progress=emb)
    kind = ("out-of-fold" if openset_calibration(cfg.get("openset"))[0] == "crossfit"
            else "validation")
    _print_metrics(out / "metrics_val.json", f"{kind} metrics ({out})")
    click.echo(f"model bundle written to {out}")


def _print_metrics(path_or_dict, title: str) -> None:
    import json

    m = json.loads(Path(path_or_dict).read_text()) if isinstance(path_or_dict, Path) \
        else path_or_dict
    click.echo(title)
    click.echo(f"{'rank':>10} {'n':>6} {'acc':>7} {'top5':>7} {'macroF1':>8}")
    for rank, r in m.get("ranks", {}).items():
        top5 = r.get("top5_accuracy")
        click.echo(f"{rank:>10} {r.get('n', 0):>6} {r['accuracy']:>7.3f} "
                   f"{(top5 if top5 is not None else float('nan')):>7.3f} "
                   f"{r['macro_f1']:>8.3f}")
    h = m.get("hierarchical", {})
    if h:
        click.echo(f"hierarchical P/R/F1: {h.get('precision', 0):.3f} / "
                   f"{h.get('recall', 0):.3f} / {h.get('f1', 0):.3f}")
    sev = m.get("mistake_severity", {})
    if sev:
        click.echo("mistake severity: " + ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in sev.items()))
    if "coherence_rate" in m:
        click.echo(f"coherent predictions: {m['coherence_rate']:.3f}")


# --------------------------------------------------------------------------- predict
@main.command()
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="Model bundle folder written by `taxoclass train`.")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for predictions.csv / predictions.json, provenance and the "
                   "(resumable) embedding cache.")
@click.option("--top-k", default=5, show_default=True)
@click.option("--batch-size", type=int, default=None,
              help="Images per forward pass [default: 8 on a CPU, 64 on a GPU].")
@click.option("--overwrite", is_flag=True,
              help="Discard an embedding cache in --out left by a run on other images.")
@_engine_options
@_device_option
def predict(model: Path, images: tuple[Path, ...], out: Path | None, top_k: int,
            batch_size: int, overwrite: bool, engine: str, master: str | None,
            device: str) -> None:
    """Predict family, genus and species (coherent path + top-k) for IMAGES (files or folders)."""
    from .pipelines.predict import predict_images

    if engine != "local" and out is None:
        raise click.UsageError("--engine spark writes Parquet: pass --out DIR.")
    with _progress("predicting", "img") as prog:
        frame = predict_images(model, images, out=out, top_k=top_k, batch_size=batch_size,
                               overwrite=overwrite, progress=prog, device=device,
                               engine=engine, master=master)
    _show_predictions(frame)
    if out:
        click.echo(f"wrote {out / 'predictions.csv'} and {out / 'predictions.json'}")


def _show_predictions(frame) -> None:
    cols = [c for c in ("image", "flagged", "taxon_rank", "taxon", "score", "reason",
                        "species", "species_prob", "error") if c in frame.columns]
    shown = frame[cols].copy()
    shown["image"] = shown["image"].map(lambda p: Path(str(p)).name)
    with _wide_pandas():
        click.echo(shown.to_string(index=False, max_rows=60, na_rep=""))


@main.command("flag-unknowns")
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="Model bundle folder written by `taxoclass train` (with its outlier "
                   "detector and calibrated thresholds).")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for flags.csv, flags_summary.json, predictions and provenance. "
                   "(flags.csv: one row per image, flagged rows first.)")
@click.option("--batch-size", type=int, default=None,
              help="Images per forward pass [default: 8 on a CPU, 64 on a GPU].")
@click.option("--overwrite", is_flag=True,
              help="Discard an embedding cache in --out left by a run on other images.")
@_device_option
def flag_unknowns_cmd(model: Path, images: tuple[Path, ...], out: Path, batch_size: int,
                      overwrite: bool, device: str) -> None:
    """Screen field-survey IMAGES (files or folders) for species the model does not know.

    Each image is named at the lowest rank whose evidence passes its calibrated threshold:
    a known species by name, an unknown oak as "Quercus sp." (reason
    backoff_to_genus:outlier or :low_confidence), or "unknown".
    """
    from .pipelines.predict import flag_unknowns

    with _progress("screening", "img") as prog:
        frame, summary = flag_unknowns(model, images, out=out, batch_size=batch_size,
                                       overwrite=overwrite, progress=prog, device=device)
    _show_predictions(frame)
    click.echo(f"{summary['n_flagged']} of {summary['n_images']} images flagged; resolved at: "
               + ", ".join(f"{k} {v}" for k, v in summary["resolved_at"].items()))
    click.echo(f"wrote {out / 'flags.csv'}")


class _wide_pandas:
    def __enter__(self):
        import pandas as pd

        self._ctx = pd.option_context("display.width", 200, "display.max_colwidth", 40,
                                      "display.float_format", "{:.3f}".format)
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


# --------------------------------------------------------------------------- evaluate
@main.command()
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="Model bundle folder written by `taxoclass train`.")
@click.option("--annotations", type=click.Path(path_type=Path), required=True)
@click.option("--images-root", type=click.Path(path_type=Path), default=None,
              help="Folder the file_name paths are relative to [default: the JSON's folder].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write metrics.json (a file) — its folder also gets confusion.csv, "
                   "predictions.csv and provenance.json.")
@click.option("--split", type=click.Choice(["auto", "all", "val", "train"]), default="auto",
              show_default=True,
              help="auto: only the validation images when ANNOTATIONS is the training file.")
@click.option("--holdout-species", multiple=True, metavar="BINOMIAL",
              help="Open-set evaluation: retrain the bundle's recipe without this species "
                   "(repeatable), then score unknown detection and back-off.")
@click.option("--holdout-fraction", type=float, default=None,
              help="Open-set evaluation with a seeded share of the species held out (only "
                   "species whose genus keeps a known species).")
@click.option("--seed", default=0, show_default=True, help="Seed of the hold-out choice/split.")
def evaluate(model: Path, annotations: Path, images_root: Path | None, out: Path | None,
             split: str, holdout_species: tuple[str, ...], holdout_fraction: float | None,
             seed: int) -> None:
    """Per-rank accuracy / macro-F1 / top-5, hierarchical P/R/F1, mistake severity,
    coherence rate and the most confused taxon pairs.

    With --holdout-species or --holdout-fraction: open-set evaluation instead (AUROC and
    FPR@95%TPR per detection method, what back-off reports for held-out and known
    species, risk-coverage per rank).
    """
    if holdout_species or holdout_fraction is not None:
        _evaluate_holdout(model, annotations, images_root, out, holdout_species,
                          holdout_fraction, seed)
        return
    from .pipelines.evaluate import evaluate_model

    out_dir = None
    if out is not None:
        out_dir = out.parent if out.suffix == ".json" else out
    with _progress("embedding", "img") as prog:
        metrics = evaluate_model(model, annotations, images_root=images_root, out=out_dir,
                                 split=split, progress=prog)
    if out is not None and out.suffix == ".json" and out.name != "metrics.json":
        from .io.files import atomic_write_json

        atomic_write_json(out, {k: v for k, v in metrics.items() if k != "confusion"})
    _print_metrics(metrics, f"{metrics['n_images']} images ({metrics['split']} split)")
    click.echo("most confused pairs:")
    for row in metrics["confusion"][:10]:
        click.echo(f"  {row['count']:>3} x  {row['true']}  ->  {row['predicted']}")
    if out is not None:
        click.echo(f"wrote {out}")


def _evaluate_holdout(model, annotations, images_root, out, species, fraction, seed) -> None:
    from .pipelines.evaluate import evaluate_holdout

    out_dir = None if out is None else (out.parent if out.suffix == ".json" else out)
    with _progress("embedding", "img") as prog:
        r = evaluate_holdout(model, annotations, images_root=images_root,
                             holdout_species=list(species) or None, holdout_fraction=fraction,
                             seed=seed, out=out_dir, progress=prog)
    click.echo(f"held out {len(r['held_out_species'])} species: "
               + ", ".join(r["held_out_species"]))
    click.echo(f"test: {r['n_test_known']} known + {r['n_test_held_out']} held-out images; "
               "known accuracy " + ", ".join(f"{k} {v:.3f}"
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


# --------------------------------------------------------------------------- plots
def _thresholds(items: tuple[str, ...]) -> dict[str, float] | None:
    out = {}
    for item in items:
        rank, sep, value = item.partition("=")
        try:
            out[rank.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"expected RANK=NUMBER, found {item!r}",
                                     param_hint="--threshold") from None
        if not sep:
            raise click.BadParameter(f"expected RANK=NUMBER, found {item!r}",
                                     param_hint="--threshold")
    return out or None


@main.command("plot-report")
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="A model bundle folder, or a PlantCLEF 2024 checkpoint file "
                   "(model_best.pth.tar; then also --class-mapping and --species-table).")
@click.argument("plots", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Report folder.")
@click.option("--settings", "settings_file", type=click.Path(path_type=Path), default=None,
              help="plot_settings.json written by `taxoclass calibrate-plots`: grids, overlap, "
                   "rule, the rule's thresholds and tile settings (and the learned rule) come "
                   "from it. --grid, --overlap, --rule, --threshold, --top-k, "
                   "--min-tile-prob and --min-tiles given on the command line override it.")
@click.option("--grid", "grids", multiple=True,
              help="Tile grid, e.g. 4 or 2x3; repeat for several scales at once "
                   "[default: 3, or the --settings file's grids].")
@click.option("--overlap", type=float, default=None,
              help="Fraction of a tile shared with its neighbour [default: 0, or the "
                   "--settings file's].")
@click.option("--rule", type=click.Choice(["max", "noisy_or", "mean", "argmax_union",
                                           "learned"]),
              default=None,
              help="How tile probabilities become plot-level finds (argmax_union = the "
                   "PlantCLEF 2024 third-place baseline; learned = the logistic regression "
                   "fitted by calibrate-plots, only with --settings) [default: max, or the "
                   "--settings file's chosen rule].")
@click.option("--threshold", "thresholds", multiple=True, metavar="RANK=P",
              help="Per-rank threshold for the rule, e.g. --threshold species=0.4 (other "
                   "ranks keep the --settings file's calibrated value for the rule, else "
                   "the rule's default).")
@click.option("--top-k", "top_k", type=click.IntRange(min=0), default=None,
              help="Each tile keeps only its K most probable classes, so many small "
                   "probabilities cannot add up under noisy_or/mean; 0: every class "
                   "[default: every class, or the --settings file's value for the rule].")
@click.option("--min-tile-prob", type=click.FloatRange(0.0, 1.0), default=None,
              help="Tiles whose best species probability is below this give no evidence "
                   "[default: 0, or the --settings file's value for the rule].")
@click.option("--min-tiles", type=click.IntRange(min=1), default=None,
              help="Tiles that must support a find [default: 1, or the --settings file's "
                   "value for the rule].")
@click.option("--checklist", type=click.Path(path_type=Path), default=None,
              help="Text file of taxa expected in the region (one name per line, any rank).")
@_checkpoint_model_options
@click.option("--plantclef-year", type=click.Choice(["2024", "2025"]), default="2024",
              show_default=True, help="Submission file format.")
@click.option("--batch-size", default=32, show_default=True)
@_engine_options
@_device_option
def plot_report_cmd(model: Path, plots: tuple[Path, ...], out: Path, settings_file: Path | None,
                    grids: tuple[str, ...], overlap: float | None, rule: str | None,
                    thresholds: tuple[str, ...], top_k: int | None,
                    min_tile_prob: float | None, min_tiles: int | None,
                    checklist: Path | None, class_mapping: Path | None,
                    species_table: Path | None, backbone: str, model_kwargs: str | None,
                    plantclef_year: str, batch_size: int, engine: str,
                    master: str | None, device: str) -> None:
    """Rank-aware reports for plot (quadrat) photos: tiles → taxa at the rank the
    evidence supports. Writes plot_records.csv/.json, report.html (photos with tile grid
    and taxa), plantclef_submission.csv, occurrences_dwc.csv, failures.csv, provenance.
    """
    from .pipelines.plots import plot_report_job

    with _progress("plots", "plot") as prog:
        result = plot_report_job(
            model, plots, out, class_mapping=class_mapping, species_table=species_table,
            backbone=backbone, model_kwargs=_json_option("--model-kwargs", model_kwargs),
            checklist=checklist, batch_size=batch_size, progress=prog,
            grids=list(grids) or None, overlap=overlap, rule=rule,
            thresholds=_thresholds(thresholds), settings=settings_file, top_k=top_k,
            min_tile_prob=min_tile_prob, min_tiles=min_tiles,
            plantclef_year=int(plantclef_year), device=device, engine=engine, master=master)
    for plot_id, records in result.records.items():
        finds = ", ".join(f"{r.taxon} ({r.taxon_rank}, {r.score:.2f})" for r in records)
        click.echo(f"{plot_id}: {finds or 'nothing above threshold'}")
    if result.failures:
        click.echo(f"{len(result.failures)} photo(s) failed; see {out / 'failures.csv'}",
                   err=True)
    click.echo(f"report: {out / 'report.html'}")


@main.command("calibrate-plots")
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="A model bundle folder, or a PlantCLEF 2024 checkpoint file "
                   "(model_best.pth.tar; then also --class-mapping and --species-table).")
@click.option("--truth", type=click.Path(path_type=Path), required=True,
              help="CSV with plot_id (the photo's file stem) and species (one row per "
                   "species, or ';'-separated); every photo needs rows.")
@click.argument("plots", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for plot_settings.json, plot_calibration.csv, failures.csv.")
@click.option("--grid", "grids", multiple=True,
              help="Tile grid, e.g. 4 or 2x3; repeat for several scales at once "
                   "[default: 2 and 4].")
@click.option("--overlap", default=0.0, show_default=True,
              help="Fraction of a tile shared with its neighbour.")
@_checkpoint_model_options
@click.option("--batch-size", default=32, show_default=True)
@_device_option
def calibrate_plots_cmd(model: Path, truth: Path, plots: tuple[Path, ...], out: Path,
                        grids: tuple[str, ...], overlap: float, class_mapping: Path | None,
                        species_table: Path | None, backbone: str, model_kwargs: str | None,
                        batch_size: int, device: str) -> None:
    """Choose plot-report settings on plot photos (PLOTS: files or folders) whose species
    are known: thresholds per rank and tile settings (top-k, tile gate, supporting tiles)
    for each rule, scored on these plots, and a learned rule (logistic regression on tile
    statistics) scored out-of-fold; the rule with the best species macro F1 per plot is
    chosen.
    Use the result with `taxoclass plot-report --settings OUT/plot_settings.json`.
    """
    from .pipelines.plots import calibrate_plots_job

    with _progress("plots", "plot") as prog:
        result = calibrate_plots_job(
            model, plots, truth, out, grids=list(grids) or None, overlap=overlap,
            class_mapping=class_mapping, species_table=species_table, backbone=backbone,
            model_kwargs=_json_option("--model-kwargs", model_kwargs), batch_size=batch_size,
            progress=prog, device=device)
    settings = result.settings
    with _wide_pandas():
        click.echo(f"calibration on {settings.provenance['n_calibration_plots']} plots "
                   "(macro F1 per plot, measured as 'evaluation' says; thresholds per "
                   "rank; tile settings):")
        click.echo(settings.table().to_string(index=False))
    th = ", ".join(f"{k}={v:g}" for k, v in settings.thresholds.items())
    tiles = settings.tiles
    click.echo(f"chosen rule: {settings.rule} ({th}; top_k={tiles.top_k or 'all'}, "
               f"min_tile_prob={tiles.min_tile_prob:g}, min_tiles={tiles.min_tiles}); "
               f"grids {', '.join(settings.grids)}, overlap {settings.overlap:g}")
    if result.failures:
        click.echo(f"{len(result.failures)} photo(s) failed; see {out / 'failures.csv'}",
                   err=True)
    click.echo(f"wrote {result.files['settings']}")


@main.command()
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Model bundle folder (its backbone is explained).")
@click.option("--backbone", default=None, help="Or a timm backbone name (with --checkpoint).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None)
@click.option("--model-kwargs", default=None, metavar="JSON")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Overlay PNG.")
@click.option("--head", type=int, default=None,
              help="One attention head (default: the mean over heads).")
def explain(model: Path | None, backbone: str | None, checkpoint: Path | None,
            model_kwargs: str | None, image: Path, out: Path, head: int | None) -> None:
    """Overlay the last block's class-token attention (DINOv2 / ViT) on IMAGE."""
    from .bundle import ModelBundle
    from .features.attention import explain as explain_image
    from .features.backbones import create_backbone

    if model is not None:
        bb = ModelBundle.load(model).create_backbone()
    elif backbone is not None:
        bb = create_backbone(backbone, checkpoint=checkpoint,
                             model_kwargs=_json_option("--model-kwargs", model_kwargs))
    else:
        raise click.UsageError("pass --model BUNDLE or --backbone NAME [--checkpoint P].")
    explain_image(bb, image, out, head=head)
    click.echo(f"wrote {out}")


@main.command("evaluate-plots")
@click.option("--records", type=click.Path(path_type=Path), required=True,
              help="plot_records.csv written by plot-report.")
@click.option("--truth", type=click.Path(path_type=Path), required=True,
              help="CSV with plot_id and species (one row per species, or ';'-separated).")
@click.option("--taxonomy", "taxonomy_source", type=click.Path(path_type=Path), required=True,
              help="The model bundle folder, an annotations JSON or a species table.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for plot_metrics.json and plot_metrics_per_plot.csv.")
def evaluate_plots_cmd(records: Path, truth: Path, taxonomy_source: Path,
                       out: Path | None) -> None:
    """PlantCLEF macro F1 averaged per plot, macro F1 per species, micro F1, and the same
    with rank-aware credit (a correct genus-level record counts at genus rank).
    """
    from .pipelines.plots import evaluate_plots_job

    result = evaluate_plots_job(records, truth, taxonomy_source, out=out)
    click.echo(f"{'rank':>10} {'F1/plot':>8} {'F1/taxon':>9} {'micro F1':>9} {'plots':>6}")
    for rank, m in result.items():
        click.echo(f"{rank:>10} {m['macro_f1_per_plot']:>8.3f} {m['macro_f1_per_taxon']:>9.3f} "
                   f"{m['micro_f1']:>9.3f} {m['n_plots']:>6}")


def _json_option(name: str, value: str | None) -> dict | None:
    import json

    if not value:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"expected a JSON object, found {value!r} ({exc.msg})",
                                 param_hint=name) from exc
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"expected a JSON object, found {value!r}", param_hint=name)
    return parsed


class _progress:
    """A tqdm bar driven by the library's ``progress(done, total)`` callback."""

    def __init__(self, desc: str, unit: str) -> None:
        self.desc, self.unit, self.bar = desc, unit, None

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if self.bar is not None and (total != self.bar.total or done < self.bar.n):
            self.bar.close()  # a new pass (e.g. the images, then their views)
            self.bar = None
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":  # pragma: no cover
    main()
