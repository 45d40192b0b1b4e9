"""``taxoclass export``: a trained model as files a field device runs without taxoclass."""

from __future__ import annotations

from pathlib import Path

import click

from .app import main


@main.command("export")
@click.option("--model", type=click.Path(path_type=Path), required=True,
              help="Model bundle folder (written by `taxoclass train`).")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx",
              show_default=True, help="Export format.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The .onnx file to write (model.json and taxoclass_onnx_predict.py go "
                   "beside it); a folder gets model.onnx.")
@click.option("--no-check", is_flag=True,
              help="Skip the comparison of onnxruntime with PyTorch on a random batch.")
def export_command(model: Path, fmt: str, out: Path, no_check: bool) -> None:
    """Export a model bundle: one ONNX graph (backbone, heads, coherent decoding, outlier
    score) plus model.json (taxonomy, preprocessing, back-off thresholds, confidence
    calibration) and a runner that needs only onnxruntime, numpy and Pillow.

    \b
    On the device (see docs/edge.md):
      pip install onnxruntime numpy pillow
      python taxoclass_onnx_predict.py --model model.onnx photos/ --out predictions.csv
    """
    from ..pipelines.export import export_onnx

    res = export_onnx(model, out, check=not no_check)  # fmt: onnx, the only choice
    click.echo(f"wrote {res.onnx}, {res.meta.name} and {res.runner.name} "
               f"(outputs: {', '.join(res.outputs)})")
    if res.max_abs_diff is not None:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in res.max_abs_diff.items())
        click.echo(f"onnxruntime vs PyTorch on a random batch: max abs difference "
                   f"{max(res.max_abs_diff.values()):.2e} ({diffs})")
    click.echo(f"run it: python {res.runner.name} --model {res.onnx.name} IMAGES... "
               f"--out predictions.csv")
