"""The JSON Schemas shipped with the package (copies of the repository's ``data_schemas/``)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=8)
def load_schema(name: str) -> dict:
    """The JSON Schema ``name`` from ``taxoclass/schemas/`` (or the repo's ``data_schemas/``)."""
    for folder in (PACKAGE_ROOT / "schemas", PACKAGE_ROOT.parent / "data_schemas"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    raise FileNotFoundError(f"Schema {name} not found next to the taxoclass package.")
