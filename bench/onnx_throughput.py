"""ONNX export vs PyTorch on this machine: images/s on CPU and the largest differences.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python bench/onnx_throughput.py \\
        --model runs/leaf-model --threads 2

Exports ``--model`` (default: configs/leaf.yaml's bundle, EfficientNet-Lite0 at 384 px
letterbox) with :func:`taxoclass.export_onnx`, then walks the leaf images (990) in
batches of ``--batch-size`` (8, taxoclass's CPU default) and, per batch:

- preprocesses each image twice, with taxoclass's loader (``load_transformed``) and with
  the runner's Pillow/numpy code (the two inputs must be identical: max abs diff 0);
- runs the same graph in PyTorch (taxoclass's ``Backbone.embed``, then the exported
  module's heads, decoding and detector; ``torch.set_num_threads``) and in
  onnxruntime (``intra_op_num_threads``), both pinned to ``--threads`` threads, timed
  separately; the first batch is a warm-up and is not timed;
- records the max abs difference of every output (logits, coherent probabilities,
  outlier z-score) and whether the runner's decision (taxon, rank, reason) equals
  taxoclass's (``ModelBundle.predict_with_backoff`` on the PyTorch embeddings).

images/s "graph only" excludes preprocessing; "with preprocessing" adds each path's own
preprocessing time (decode + resize + normalise of the same images, one thread).
Writes bench/results/onnx_throughput.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from taxoclass import export_onnx
from taxoclass.bundle import ModelBundle
from taxoclass.io.images import load_transformed
from taxoclass.pipelines.edge_runner import EdgeModel
from taxoclass.pipelines.export import EdgeGraph

ROOT = Path(__file__).resolve().parents[1]


def leaf_images(root: Path, limit: int | None) -> list[Path]:
    data = json.loads((root / "annotations.json").read_text())
    paths = [root / im["file_name"] for im in data["images"]]
    return paths[:limit] if limit else paths


def measure(bundle: ModelBundle, edge: EdgeModel, paths: list[Path], batch: int,
            threads: int, on_update=None, every: int = 10) -> dict:
    """The figures over ``paths``; ``on_update(figures so far)`` every ``every`` batches
    (a run cut short by its timeout still leaves a report of the images it did)."""
    backbone = bundle.create_backbone()
    graph = EdgeGraph(backbone.model, bundle).eval()
    names = graph.output_names
    torch.set_num_threads(threads)
    t = {"pre_torch": 0.0, "pre_onnx": 0.0, "torch": 0.0, "onnx": 0.0}
    diffs = {k: 0.0 for k in [*names, "preprocessing"]}
    agree, n_timed, decisions = 0, 0, []
    for k, i in enumerate(range(0, len(paths), batch)):
        chunk = paths[i:i + batch]
        t0 = time.perf_counter()
        x_t = torch.stack([load_transformed(p, backbone.transform) for p in chunk])
        t1 = time.perf_counter()
        x_o = np.stack([edge.load(p) for p in chunk])
        t2 = time.perf_counter()
        with torch.inference_mode():  # PyTorch as taxoclass runs it (channels-last CNN)
            emb = backbone.embed(x_t)
            ref = dict(zip(names, (v.numpy() for v in graph.tail(emb))))
        t3 = time.perf_counter()
        got = edge.run(x_o)
        t4 = time.perf_counter()
        if k > 0:  # the first batch warms both runtimes up
            n_timed += len(chunk)
            for key, dt_ in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                t[key] += dt_
        diffs["preprocessing"] = max(diffs["preprocessing"],
                                     float(np.abs(x_t.numpy() - x_o).max()))
        for name in names:
            d = float(np.abs(ref[name].astype(np.float64) - got[name]).max())
            diffs[name] = max(diffs[name], d)
        frame, _ = bundle.predict_with_backoff(emb.numpy())
        rows = edge.decide(got)
        for (_, a), b in zip(frame.iterrows(), rows):
            same = all(str(a[c]) == str(b[c]) for c in ("taxon_rank", "taxon", "reason"))
            agree += same
            decisions.append(b["reason"])
        state = {"times": dict(t), "n_timed": n_timed, "diffs": dict(diffs), "agree": agree,
                 "n": len(decisions), "n_total": len(paths),
                 "backed_off": sum(r != bundle.taxonomy.ranks[-1] for r in decisions)}
        if on_update is not None and (k + 1) % every == 0:
            on_update(state)
    return state


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU used"


def report(res: dict, args, export_s: float, onnx_mb: float, load_before: str) -> str:
    import onnxruntime

    t, n = res["times"], res["n_timed"]
    ips = {k: n / v for k, v in t.items()}
    incl_torch = n / (t["pre_torch"] + t["torch"])
    incl_onnx = n / (t["pre_onnx"] + t["onnx"])
    d = res["diffs"]
    logits = max(v for k, v in d.items() if k.startswith("logits_"))
    probs = max(v for k, v in d.items() if k.startswith("probs_"))
    lines = [
        "# ONNX export vs PyTorch (CPU)", "",
        f"Command: `{' '.join(sys.argv)}`  ",
        f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {machine()}; "
        f"load (uptime) before: {load_before}; after: {uptime()}  ",
        f"Model: `{args.model}` (Lite0 384 px letterbox for configs/leaf.yaml); "
        f"{res['n']} of {res['n_total']} leaf images done, batch {args.batch_size}, "
        f"{args.threads} threads for both "
        f"(torch.set_num_threads / onnxruntime intra_op_num_threads); first batch not timed "
        f"({n} images timed).  ",
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; export took "
        f"{export_s:.0f} s (torch.onnx dynamo exporter), model.onnx {onnx_mb:.1f} MB.", "",
        "| | PyTorch | onnxruntime | ratio |", "|---|---:|---:|---:|",
        f"| images/s, graph only (preprocessing excluded) | {ips['torch']:.1f} | "
        f"{ips['onnx']:.1f} | {ips['onnx'] / ips['torch']:.2f}x |",
        f"| images/s, with preprocessing (taxoclass loader / runner's Pillow+numpy) | "
        f"{incl_torch:.1f} | {incl_onnx:.1f} | {incl_onnx / incl_torch:.2f}x |",
        f"| preprocessing alone, images/s | {ips['pre_torch']:.1f} | {ips['pre_onnx']:.1f} | |",
        "", "Max abs difference, onnxruntime vs PyTorch, over all images:", "",
        f"- preprocessing (runner vs taxoclass): {d['preprocessing']:.1e}",
        f"- logits (all ranks): {logits:.2e}; coherent probabilities: {probs:.2e}; "
        f"outlier z-score: {d.get('outlier_score', float('nan')):.2e}",
        f"- decisions (taxon, rank, reason) equal to taxoclass's: {res['agree']} of "
        f"{res['n']}; backed off (reason not the lowest rank): {res['backed_off']}", ""]
    return "\n".join(lines)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "leaf-model"))
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "leaf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="first N images only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx_throughput.md"))
    args = ap.parse_args()
    load_before = uptime()
    bundle = ModelBundle.load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = export_onnx(bundle, Path(tmp) / "model.onnx", check=False)
        export_s = time.perf_counter() - t0
        edge = EdgeModel(res.onnx, threads=args.threads)
        size_mb = res.onnx.stat().st_size / 1e6

        def write(figures: dict) -> str:
            text = report(figures, args, export_s, size_mb, load_before)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text, encoding="utf-8")
            return text

        result = measure(bundle, edge, leaf_images(Path(args.images), args.limit),
                         args.batch_size, args.threads, on_update=write)
        print(write(result))


if __name__ == "__main__":
    main()
