"""The ``taxoclass`` command group and what its commands share: option decorators, progress
bars, output helpers, and the set-up of the process the CLI owns (logging, warnings, the CPU
allocator). Heavy imports happen inside the commands so that ``taxoclass --help`` is instant.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings
from pathlib import Path

import click

from .._version import __version__
from ..errors import TaxoclassError


class _Group(click.Group):
    """Turn taxoclass errors into one clear message and exit code 2, not a traceback."""

    def main(self, args=None, prog_name=None, **kwargs):
        from ..io import provenance

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
        except OSError as exc:
            message = user_path_error(exc)
            if message is None:
                raise  # not about a file the user named: a bug, keep its traceback
            click.echo(f"Error: {message}", err=True)
            sys.exit(2)


#: errno values of file system errors a user causes with a path they give.
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                errno.EEXIST, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
                errno.ELOOP, errno.ENOTEMPTY, errno.EXDEV}
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def user_path_error(exc: OSError) -> str | None:
    """The one-line message for a file system error on a user's path (permission denied,
    not a directory, a directory where a file was expected, missing, disk full, ...), or
    ``None`` when the error is not one (no file name, or a file inside the installation:
    a bug or a broken install, which keeps its traceback)."""
    if exc.errno not in _USER_ERRNOS or not exc.filename:
        return None
    # a rename's target is the user's path (its source is a temporary sibling)
    name = os.fsdecode(exc.filename2 or exc.filename)
    path = Path(name).absolute()
    installed = (_PACKAGE_DIR, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve())
    if any(path == root or root in path.parents for root in installed):
        return None
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None and exc.errno in (errno.EEXIST, errno.ENOTDIR, errno.ENOENT):
        return (f"{name}: {blocker} is a file, not a folder [{type(exc).__name__}]. Fix: "
                f"choose a path whose folders are folders, or move {blocker} away.")
    text = exc.strerror or os.strerror(exc.errno)
    fixes = {errno.EACCES: "give yourself permission or choose another path",
             errno.EPERM: "give yourself permission or choose another path",
             errno.EROFS: "choose a writable location",
             errno.ENOSPC: "free disk space or choose another location",
             errno.EDQUOT: "free disk space or choose another location",
             errno.EISDIR: "the path is a folder; give a file path (or another name)",
             errno.ENOENT: "check the path"}
    return (f"{name}: {text} [{type(exc).__name__}]. Fix: "
            f"{fixes.get(exc.errno, 'check the path')}.")


class _EchoHandler(logging.Handler):
    """Library log records as ``warning: ...`` lines on the (current) stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


def _configure_process() -> None:
    """What the command line, owning its process, sets up: library warnings on stderr
    (``warning: ...``), PySpark 4's pandas-3 FutureWarning silenced (harmless for
    mapInPandas, printed on every conversion) and the CPU allocator tuned for embedding
    loops (:func:`~taxoclass.features.allocator.tune_cpu_allocator`)."""
    from ..engines import PANDAS_WARNING
    from ..features.allocator import tune_cpu_allocator

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
    Typical run on a labelled image folder (Herbarium 2022-style annotations; `taxoclass
    import` writes them from a folder tree, a CSV, a Darwin Core export or COCO boxes):
      taxoclass import photos/ --out annotations.json
      taxoclass validate annotations.json --images-root DIR
      taxoclass embed --annotations annotations.json --images-root DIR \\
                      --backbone efficientnet-lite0 --out runs/emb
      taxoclass train --config configs/leaf.yaml
      taxoclass evaluate --model runs/leaf --annotations test.json --images-root DIR
      taxoclass predict --model runs/leaf IMAGE...
    """


def allow_outside_root_option(command):
    """``--allow-outside-root``: let annotation file_names be absolute or climb out ('../')."""
    return click.option(
        "--allow-outside-root", is_flag=True,
        help="Accept file_name paths outside --images-root (absolute, or climbing out with "
             "'../'); refused by default, as a path that leaves the root is usually a "
             "mistake or a hostile file. Training configs: data.allow_outside_root.")(command)


def device_option(command):
    return click.option(
        "--device", default="auto", show_default=True,
        help="cpu, cuda (bf16 autocast, fused attention) or auto: cuda when a GPU is "
             "present.")(command)


def embedding_store_options(command):
    """``--overwrite`` and ``--cache DIR``: where predict and flag-unknowns keep vectors."""
    command = click.option(
        "--cache", type=click.Path(path_type=Path), default=None,
        help="Embedding store to read and grow (only images it lacks are embedded) "
             "[default: the model's training store when writable, else "
             "--out/embeddings, else a temporary folder].")(command)
    return click.option(
        "--overwrite", is_flag=True,
        help="Delete the vectors stored in --out/embeddings and start over (a --cache "
             "or the model's training store is never deleted).")(command)


def engine_options(command):
    """``--engine local|spark`` and ``--master URL`` for the commands both engines run."""
    command = click.option(
        "--master", default=None,
        help="Spark master URL with --engine spark [default: local[2]].")(command)
    return click.option("--engine", type=click.Choice(["local", "spark"]), default="local",
                        show_default=True,
                        help="local: this machine; spark: the same code in PySpark mapInPandas, "
                             "Parquet output, resumable (needs `pip install taxoclass[spark]` "
                             "and Java).")(command)


def checkpoint_model_options(command):
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


def pad_fill_option(value: str | None) -> str | int | None:
    """--pad-fill: a colour name or a grey level."""
    if value is None or not value.strip().isdigit():
        return value
    return int(value)


def print_metrics(path_or_dict, title: str) -> None:
    import json

    m = json.loads(Path(path_or_dict).read_text()) if isinstance(path_or_dict, Path) \
        else path_or_dict
    click.echo(title)
    click.echo(f"{'rank':>10} {'n scored':>8} {'acc':>7} {'top5':>7} {'macroF1':>8}")
    for rank, r in m.get("ranks", {}).items():
        n = r.get("n_scored", r.get("n", 0))
        click.echo(f"{rank:>10} {n:>8} {fmt3(r.get('accuracy')):>7} "
                   f"{fmt3(r.get('top5_accuracy')):>7} {fmt3(r.get('macro_f1')):>8}")
    h = m.get("hierarchical", {})
    if h:
        click.echo(f"hierarchical P/R/F1: {h.get('precision', 0):.3f} / "
                   f"{h.get('recall', 0):.3f} / {h.get('f1', 0):.3f}")
    sev = m.get("mistake_severity", {})
    if sev:
        click.echo("mistake severity: " + ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in sev.items()))
    if "coherence_rate" in m:
        click.echo(f"heads' own arg-max coherent (before decoding): {m['coherence_rate']:.3f}")


def fmt3(value) -> str:
    """A figure with 3 decimals; ``-`` where there is none (a rank without labelled images)."""
    return "-" if value is None or value != value else f"{value:.3f}"


def show_predictions(frame) -> None:
    """The prediction table on the terminal, with the model's lowest rank and its probability
    (the last ``<rank>`` / ``<rank>_prob`` pair of the frame: species, or e.g. family).

    An unknown or failed row shows no score (an empty cell), only its reason."""
    ranks = [c[: -len("_prob")] for c in frame.columns
             if c.endswith("_prob") and c[: -len("_prob")] in frame.columns]
    lowest = [ranks[-1], f"{ranks[-1]}_prob"] if ranks else []
    cols = [c for c in ("image", "flagged", "taxon_rank", "taxon", "confidence", "score",
                        "reason", *lowest, "error") if c in frame.columns]
    shown = frame[cols].copy()
    shown["image"] = shown["image"].map(lambda p: Path(str(p)).name)
    with wide_pandas():
        click.echo(shown.to_string(index=False, max_rows=60, na_rep=""))


class wide_pandas:
    def __enter__(self):
        import pandas as pd

        self._ctx = pd.option_context("display.width", 200, "display.max_colwidth", 40,
                                      "display.float_format", "{:.3f}".format)
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


# --------------------------------------------------------------------------- plots
def parse_thresholds(items: tuple[str, ...]) -> dict[str, float] | None:
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


def json_option(name: str, value: str | None) -> dict | None:
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


class progress_bar:
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
