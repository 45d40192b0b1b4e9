"""``taxoclass benchmark``: the evaluation protocol of issue 17 on the user's own data."""

from __future__ import annotations

from pathlib import Path

import click

from .app import main, progress_bar


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise click.BadParameter("expected comma-separated names, found none")
    return names


@main.command("benchmark")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="Training config (data.annotations and the embedding store it names).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set data.group_by=plot. Repeatable.")
@click.option("--seeds", type=click.IntRange(min=2), default=10, show_default=True,
              help="Selection splits: seeds 1..N (defaults may be chosen on them).")
@click.option("--final-seeds", default="0", show_default=True, metavar="LIST",
              help="Kept-back split seeds, never used for a choice (comma-separated; "
                   "'none' for none).")
@click.option("--recipes", default=None, metavar="LIST",
              help="Comma-separated recipes (taxoclass.model.recipes.available()) "
                   "[default: all]; the control species-only is always added.")
@click.option("--axes", default="full", show_default=True, metavar="LIST",
              help="Comma-separated axes: full, partial-25, partial-50, partial-75, "
                   "family-only, long-tail, unseen.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.3, show_default=True, help="Test share of each split.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for results.csv, summary.md, reliability.png (written as a unit).")
def benchmark_cmd(config_path: Path, overrides: tuple[str, ...], seeds: int, final_seeds: str,
                  recipes: str | None, axes: str, test_fraction: float, out: Path) -> None:
    """Compare recipes on repeated seeded splits of your own data.

    Every recipe is trained on the same splits, labels and cached embeddings; the summary
    gives means with 95% t intervals over the splits, paired t-tests and per-split McNemar
    tests against the same-recipe species-only control, per-frequency-bin accuracy,
    calibration error (with a reliability diagram), mistake severity, and the figures of
    the kept-back seed(s) that no choice was made on.
    """
    from ..config import load_config
    from ..pipelines.benchmark import AXES, benchmark, benchmark_data, recipe_settings
    from ..taxonomy.annotations import outside_root_allowed

    axis_list = _names(axes)
    bad = [a for a in axis_list if a not in AXES]
    if bad:
        raise click.BadParameter(f"unknown axis {bad}; expected some of {', '.join(AXES)}",
                                 param_hint="--axes")
    final = [] if final_seeds.strip().lower() == "none" else _seed_list(final_seeds)
    names = _names(recipes)
    if names is not None:
        from ..model.recipes import available

        unknown = [n for n in names if n not in available()]
        if unknown:  # before any embedding work
            raise click.BadParameter(f"unknown recipe(s) {unknown}; expected some of "
                                     f"{', '.join(available())}", param_hint="--recipes")
    cfg = load_config(config_path, overrides)
    with outside_root_allowed(bool(cfg["data"].get("allow_outside_root"))):
        with progress_bar("embedding", "img") as emb:
            data = benchmark_data(cfg, progress=emb)
    with progress_bar("benchmark", "fit") as prog:
        benchmark(data, names, seeds=seeds, final_seeds=final, axes=axis_list,
                  test_fraction=test_fraction, settings=recipe_settings(cfg), out=out,
                  progress=prog)
    click.echo((out / "summary.md").read_text())
    click.echo(f"benchmark written to {out}")


def _seed_list(text: str) -> list[int]:
    try:
        return [int(v) for v in _names(text) or []]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, found {text!r}",
                                 param_hint="--final-seeds") from None
