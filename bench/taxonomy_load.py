"""How fast the real NAFlora-mini (Herbarium 2022) metadata loads, validates and becomes a taxonomy.

    .venv/bin/python bench/taxonomy_load.py

Prints a markdown table (best of 5 runs for each step).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from pathlib import Path

from taxoclass.taxonomy.annotations import load_annotations, read_json, validate_annotations
from taxoclass.taxonomy.loading import load_taxonomy
from taxoclass.taxonomy.tree import Taxonomy

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def best_of(fn, n: int = 5) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    meta = DATA / "naflora-mini" / "metadata.json"
    pc = DATA / "plantclef2024" / "plantclef2024_species_DERIVED_genus_family_from_inat.csv"
    data = read_json(meta)
    rows = [
        ("read JSON (9,315 records)", *best_of(lambda: read_json(meta))),
        ("taxonomy from 1,863 categories", *best_of(
            lambda: Taxonomy.from_records(data["categories"]))),
        ("schema + semantic validation", *best_of(lambda: validate_annotations(data))),
        ("load_annotations (read + validate + frames)", *best_of(lambda: load_annotations(meta))),
        ("PlantCLEF 7,806-species table -> taxonomy", *best_of(lambda: load_taxonomy(pc))),
    ]
    tax = Taxonomy.from_records(data["categories"])
    print(f"Taxonomy load — {dt.date.today()} — {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}\n")
    print("| step | seconds (best of 5) | result |\n|---|---:|---|")
    for name, secs, out in rows:
        shown = out.summary() if isinstance(out, Taxonomy) else type(out).__name__
        print(f"| {name} | {secs:.3f} | {shown} |")
    print(f"\nNAFlora-mini taxonomy: {tax.summary()}")


if __name__ == "__main__":
    main()
