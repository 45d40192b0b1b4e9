"""Local pipeline throughput: is the embedding pipeline as fast as the model allows?

On the 990 labelled leaf images with EfficientNet-Lite0 (real weights, CPU), side by side
in one run:

* the local pipeline (:func:`taxoclass.features.embeddings.compute_embeddings`, workers 0 and 2),
* (a) the bare model forward on pre-decoded tensors, same batch size
  (goal: pipeline >= 80 % of it),
* (b) a naive loop opening and embedding one image at a time (goal: pipeline >= 3x),
* peak RSS of an embedding run over 1,000 vs 10,000 images (the 990 paths repeated with
  distinct ids), each in its own subprocess (goal: within 20 %),
* head inference on cached embeddings at PlantCLEF scale (7,806 species, random 768-d
  embeddings, a ``MultiRankHead``, ``ModelBundle.predict_embeddings``): predictions/s.

    .venv/bin/python bench/pipeline_throughput.py [--limit 64] [--rss-sizes 1000,10000]
        [--out bench/results/pipeline.md]

Prints markdown (date, machine, command); ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _results import publish

from taxoclass.features.backbones import create_backbone
from taxoclass.features.embeddings import compute_embeddings
from taxoclass.io.images import load_image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LEAF = SHARED / "leaf"
PLANTCLEF_TABLE = (SHARED / "plantclef2024"
                   / "plantclef2024_species_DERIVED_genus_family_from_inat.csv")


def leaf_items(data: Path, limit: int | None = None) -> list[tuple[str, Path]]:
    images = json.loads((data / "annotations.json").read_text(encoding="utf-8"))["images"]
    return [(str(im["image_id"]), data / im["file_name"]) for im in images][:limit]


def run_pipeline(items, backbone, batch_size: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="taxoclass-bench-") as tmp:
        res = compute_embeddings(items, backbone, Path(tmp) / "cache", batch_size=batch_size,
                                 num_workers=workers)
    return {"seconds": res.seconds, "images_per_s": len(items) / res.seconds,
            "n_failed": len(res.failures)}


def run_bare(items, backbone, batch_size: int, pool: int) -> dict:
    """Forward passes only, on tensors decoded beforehand (a pool reused cyclically)."""
    n = len(items)
    tensors = torch.stack([backbone.transform(load_image(p)) for _, p in items[:pool]])
    backbone.embed(tensors[: min(8, len(tensors))])  # warm-up
    done, start = 0, time.perf_counter()
    with torch.inference_mode():
        while done < n:
            k = min(batch_size, n - done)
            idx = torch.arange(done, done + k) % len(tensors)
            backbone.embed(tensors[idx])
            done += k
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": n / seconds}


def plain_copy(backbone):
    """The same weights as timm builds them (contiguous float32): what a first script has."""
    import copy
    import dataclasses

    model = copy.deepcopy(backbone.model).to(memory_format=torch.contiguous_format)
    return dataclasses.replace(backbone, model=model, channels_last=False, autocast=None)


def run_naive(items, backbone) -> dict:
    """Open, transform and embed one image at a time (what a first script does)."""
    start = time.perf_counter()
    for _, path in items:
        backbone.embed(backbone.transform(load_image(path)).unsqueeze(0))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": len(items) / seconds}


def naive_child(data: Path, limit: int | None) -> None:
    """(b) in a fresh process, as a first script runs: plain timm model, default malloc."""
    backbone = plain_copy(create_backbone("efficientnet-lite0"))
    items = leaf_items(data, limit)
    run_naive(items[:8], backbone)  # warm-up, as every variant gets
    print(json.dumps(run_naive(items, backbone)))


def run_naive_fresh(data: Path, limit: int | None) -> dict:
    env = {**os.environ, "TAXOCLASS_MALLOC_TUNING": "0"}
    cmd = [sys.executable, __file__, "--naive-child", "--data", str(data)]
    if limit:
        cmd += ["--naive-limit", str(limit)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_rss_mib() -> float:
    """This process's own peak RSS. ``VmHWM`` resets at exec; ``ru_maxrss`` keeps the peak
    of the parent that forked us, so it is only the fallback off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(n: int, data: Path, batch_size: int, workers: int) -> None:
    """Subprocess body: embed ``n`` images (paths repeated, ids distinct), print peak RSS."""
    base = leaf_items(data)
    items = [(f"{k}-{i}", p) for k in range(n) for i, p in [base[k % len(base)]]]
    backbone = create_backbone("efficientnet-lite0", tune_allocator=True)  # as the CLI
    before = _peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="taxoclass-rss-") as tmp:
        res = compute_embeddings(items, backbone, Path(tmp) / "cache", batch_size=batch_size,
                                 num_workers=workers)
    peak = _peak_rss_mib()
    print(json.dumps({"n": n, "peak_rss_mib": peak, "after_model_mib": before,
                      "seconds": res.seconds, "n_embedded": len(res.cache)}))


def run_rss(sizes: list[int], data: Path, batch_size: int, workers: int) -> list[dict]:
    out = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--data", str(data),
               "--batch-size", str(batch_size), "--rss-workers", str(workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def run_head(n: int, dim: int, table: Path, batch_size: int) -> dict:
    from taxoclass.bundle import ModelBundle
    from taxoclass.model.heads import MultiRankHead
    from taxoclass.taxonomy.loading import load_taxonomy

    t0 = time.perf_counter()
    tax = load_taxonomy(table)
    load_s = time.perf_counter() - t0
    torch.manual_seed(0)
    bundle = ModelBundle(head=MultiRankHead.for_taxonomy(tax, dim).eval(), taxonomy=tax,
                         backbone={"name": "none"})
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    bundle.predict_embeddings(x[:256], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    decoded = bundle.predict_embeddings(x, batch_size=batch_size)
    seconds = time.perf_counter() - start
    assert len(decoded) == n
    return {"n": n, "seconds": seconds, "per_s": n / seconds, "taxonomy_load_s": load_s,
            "classes": {r: tax.n_classes(r) for r in tax.ranks}}


def _goal(ok: bool) -> str:
    return "met" if ok else "**not met**"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=LEAF, help="leaf data folder")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,2", help="DataLoader workers to compare")
    parser.add_argument("--bare-pool", type=int, default=256,
                        help="pre-decoded tensors kept for the bare forward")
    parser.add_argument("--naive-limit", type=int, default=None,
                        help="images for the naive loop (default: all)")
    parser.add_argument("--rss-sizes", default="1000,10000",
                        help="image counts for the peak-RSS subprocesses ('' skips)")
    parser.add_argument("--rss-workers", type=int, default=0)
    parser.add_argument("--head-n", type=int, default=20_000, help="embeddings for the head")
    parser.add_argument("--head-batch", type=int, default=4096)
    parser.add_argument("--species-table", type=Path, default=PLANTCLEF_TABLE)
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--naive-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of every measurement, interleaved; the best is kept "
                             "(a shared VM's speed drifts by 2x between minutes)")
    parser.add_argument("--bf16", action="store_true",
                        help="also run the pipeline with --precision bf16 (CPU autocast)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)

    if args.naive_child:
        naive_child(args.data, args.naive_limit)
        return 0
    if args.rss_child is not None:
        rss_child(args.rss_child, args.data, args.batch_size, args.rss_workers)
        return 0
    if not (args.data / "annotations.json").is_file():
        print(f"Data not found: {args.data / 'annotations.json'}", file=sys.stderr)
        return 2

    items = leaf_items(args.data, args.limit)
    sizes = [int(s) for s in args.rss_sizes.split(",") if s.strip()]
    # Subprocesses first, while this process is small.
    rss = run_rss(sizes, args.data, args.batch_size, args.rss_workers) if sizes else []
    backbone = create_backbone("efficientnet-lite0", tune_allocator=True)  # as the CLI
    with torch.inference_mode():  # warm-up: every variant below runs on a warm model
        backbone.embed(torch.stack([backbone.transform(load_image(p)) for _, p in items[:8]]))
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    b16 = None
    if args.bf16:
        b16 = create_backbone("efficientnet-lite0", precision="bf16", tune_allocator=True)
        b16.embed(torch.stack([b16.transform(load_image(p)) for _, p in items[:8]]))
    naive_items = items[: args.naive_limit]

    def faster(old, new):
        return new if old is None or new["images_per_s"] > old["images_per_s"] else old

    pipe, bare, naive, naive_plain, bf16, bare16 = {}, None, None, None, None, None
    for _ in range(max(1, args.repeats)):  # interleaved rounds: drift hits every variant
        for w in workers:
            pipe[w] = faster(pipe.get(w), run_pipeline(items, backbone, args.batch_size, w))
        bare = faster(bare, run_bare(items, backbone, args.batch_size, args.bare_pool))
        if b16 is not None:
            for w in workers:
                bf16 = faster(bf16, run_pipeline(items, b16, args.batch_size, w))
            bare16 = faster(bare16, run_bare(items, b16, args.batch_size, args.bare_pool))
        naive = faster(naive, run_naive(naive_items, backbone))
        naive_plain = faster(naive_plain, run_naive_fresh(args.data, args.naive_limit))
    head = run_head(args.head_n, 768, args.species_table, args.head_batch)

    best_w = max(pipe, key=lambda w: pipe[w]["images_per_s"])
    best = pipe[best_w]["images_per_s"]
    size = backbone.data_config["input_size"]
    lines = [
        "# Local pipeline throughput",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} CPUs ({platform.machine()}, "
        f"{platform.processor() or 'cpu'}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}",
        f"- command: `{' '.join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        f"- backbone: {backbone.name} ({backbone.weights_source}), {size[1]} px, "
        f"batch {args.batch_size}; {len(items)} leaf images; best of {args.repeats} "
        f"interleaved rounds",
        "",
        "| what | images/s | seconds | vs pipeline |",
        "|---|---:|---:|---:|",
    ]
    for w, r in pipe.items():
        lines.append(f"| pipeline, {w} workers | {r['images_per_s']:.1f} | {r['seconds']:.2f} "
                     f"| {r['images_per_s'] / best:.2f} |")
    lines.append(f"| (a) bare forward, pre-decoded | {bare['images_per_s']:.1f} | "
                 f"{bare['seconds']:.2f} | {bare['images_per_s'] / best:.2f} |")
    n_naive = len(items[: args.naive_limit])
    lines.append(f"| (b) naive one-at-a-time loop in a fresh process: plain timm model "
                 f"(contiguous fp32), default malloc ({n_naive} images) | "
                 f"{naive_plain['images_per_s']:.1f} | "
                 f"{naive_plain['seconds']:.2f} | {naive_plain['images_per_s'] / best:.2f} |")
    lines.append(f"| (b') naive one-at-a-time loop in this process: taxoclass's "
                 f"channels-last model, tuned malloc ({n_naive} images) | "
                 f"{naive['images_per_s']:.1f} | {naive['seconds']:.2f} | "
                 f"{naive['images_per_s'] / best:.2f} |")
    if bf16 is not None:
        lines.append(f"| pipeline, `--precision bf16` (CPU autocast) | "
                     f"{bf16['images_per_s']:.1f} | {bf16['seconds']:.2f} | "
                     f"{bf16['images_per_s'] / best:.2f} |")
        lines.append(f"| (a) bare forward, bf16, pre-decoded | {bare16['images_per_s']:.1f} | "
                     f"{bare16['seconds']:.2f} | {bare16['images_per_s'] / best:.2f} |")
    lines += [
        "",
        f"- pipeline (best: {best_w} workers) / bare forward = "
        f"{best / bare['images_per_s']:.0%} (goal >= 80 %: "
        f"{_goal(best >= 0.8 * bare['images_per_s'])})",
        f"- pipeline / naive loop (b) = {best / naive_plain['images_per_s']:.1f}x (goal >= 3x: "
        f"{_goal(best >= 3 * naive_plain['images_per_s'])}); / (b') = "
        f"{best / naive['images_per_s']:.1f}x",
    ]
    if bf16 is not None:
        r = bf16["images_per_s"]
        lines += [f"- bf16 pipeline / bf16 bare forward = {r / bare16['images_per_s']:.0%}; "
                  f"bf16 pipeline / naive loop (b) = {r / naive_plain['images_per_s']:.1f}x "
                  f"(goal >= 3x: {_goal(r >= 3 * naive_plain['images_per_s'])}); / (b') = "
                  f"{r / naive['images_per_s']:.1f}x"]
    if rss:
        lines += ["", f"Peak RSS of an embedding run ({args.rss_workers} workers, own "
                  "subprocess each):", "", "| images | peak RSS MiB | after model load MiB "
                  "| seconds |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['n']} | {r['peak_rss_mib']:.0f} | {r['after_model_mib']:.0f} | "
                  f"{r['seconds']:.1f} |" for r in rss]
        if len(rss) >= 2:
            ratio = rss[-1]["peak_rss_mib"] / rss[0]["peak_rss_mib"]
            lines.append(f"\n- {rss[-1]['n']} vs {rss[0]['n']} images: x{ratio:.2f} "
                         f"(goal within 20 %: {_goal(ratio <= 1.2)})")
    lines += ["", f"Head inference on cached embeddings ({head['n']} random 768-d, "
              f"MultiRankHead, `predict_embeddings`, batch {args.head_batch}; classes "
              f"{head['classes']}): **{head['per_s']:.0f} predictions/s** "
              f"({head['seconds']:.2f} s; taxonomy load {head['taxonomy_load_s']:.2f} s)", ""]
    text = "\n".join(lines)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
