"""Spark engine (``local[2]``) vs the local engine on the same 990 leaf images.

EfficientNet-Lite0 (real weights), same batch size; reports seconds for each engine,
Spark's overhead (session start and job included, then a second run with the session
warm), and the largest absolute difference between the two engines' embeddings.

    .venv/bin/python bench/spark_vs_local.py [--limit 64] [--master local[2]]
        [--out bench/results/spark_vs_local.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _results import publish

from taxoclass.engines import backbone_from_spec
from taxoclass.features.embeddings import compute_embeddings

LEAF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "leaf"
SPEC = {"name": "efficientnet-lite0"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=LEAF)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="local engine DataLoader workers")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--partitions", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from taxoclass.engines.spark import get_spark, spark_available, spark_embed

    reason = spark_available()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    images = json.loads((args.data / "annotations.json").read_text(encoding="utf-8"))["images"]
    items = [(str(im["image_id"]), args.data / im["file_name"]) for im in images][: args.limit]

    with tempfile.TemporaryDirectory(prefix="taxoclass-spark-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        backbone = backbone_from_spec(SPEC)
        local = compute_embeddings(items, backbone, tmp / "local", batch_size=args.batch_size,
                                   num_workers=args.workers)
        local_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        spark = get_spark(args.master, app_name="taxoclass-bench", python=sys.executable)
        session_s = time.perf_counter() - t0
        cold = spark_embed(items, SPEC, tmp / "spark1", spark=spark, batch_size=args.batch_size,
                           partitions=args.partitions)
        cold_s = time.perf_counter() - t0
        warm = spark_embed(items, SPEC, tmp / "spark2", spark=spark, batch_size=args.batch_size,
                           partitions=args.partitions)
        warm_s = warm.seconds
        tasks = spark.sparkContext.defaultParallelism
        spark.stop()

    same_ids = cold.cache.image_ids.tolist() == local.cache.image_ids.tolist()
    diff = float(np.abs(cold.cache.embeddings - local.cache.embeddings).max()) if same_ids \
        else float("nan")
    diff_warm = float(np.abs(warm.cache.embeddings - local.cache.embeddings).max()) \
        if same_ids else float("nan")
    n = len(items)
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
    lines = [
        "# Spark engine vs local engine",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
        f"Python {platform.python_version()}, pyspark {spark.version}, master {args.master} "
        f"(default parallelism {tasks})",
        f"- command: `{cmd}`",
        f"- {n} leaf images, efficientnet-lite0, batch {args.batch_size}; local engine with "
        f"{args.workers} workers and {torch.get_num_threads()} torch threads; Spark tasks "
        "use spark.task.cpus torch threads each",
        "",
        "| engine | seconds | images/s | vs local |",
        "|---|---:|---:|---:|",
        f"| local (model load + compute_embeddings) | {local_s:.1f} | {n / local_s:.1f} | 1.00 |",
        f"| spark, cold (session {session_s:.1f} s + driver model + job) | {cold_s:.1f} | "
        f"{n / cold_s:.1f} | {cold_s / local_s:.2f} |",
        f"| spark, warm session | {warm_s:.1f} | {n / warm_s:.1f} | {warm_s / local_s:.2f} |",
        "",
        f"- Spark overhead: {cold_s - local_s:+.1f} s cold, {warm_s - local_s:+.1f} s warm",
        f"- same images embedded, same order: {same_ids}; failures local "
        f"{len(local.failures)}, spark {len(cold.failures)}",
        f"- max |spark - local| over all embeddings: {diff:.2e} (warm run {diff_warm:.2e})",
        "",
    ]
    text = "\n".join(lines)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
