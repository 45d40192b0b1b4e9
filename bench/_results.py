"""What every bench script does with its results: markdown tables, print, write."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd


def markdown_table(frame: pd.DataFrame) -> str:
    """A markdown table: floats with 3 decimals, None/NaN as empty cells."""

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def publish(text: str, *paths: str | Path | None) -> None:
    """Print ``text`` and write it (UTF-8) to every given path, creating folders."""
    print(text)
    for path in paths:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
