"""Head training speed vs torch threads, on a quiet machine and beside a busy neighbour.

The configs/leaf.yaml head (linear heads on the cached 1280-d EfficientNet-Lite0 384 px
leaf embeddings, 693 training rows, batch 128, AdamW, class-dependency loss) is trained
with torch's default threads (all cores) and with the
count ``taxoclass.model.threads.head_threads`` chooses. Then the same with a busy
neighbour: a separate process running a numpy matmul loop on one thread (what another
helper's test or a second job does). Synthetic heads of growing size (random
embeddings, 768-d, more classes) show where more threads start to pay, which is the
rule ``train.threads: null`` follows. Each measurement trains for a fixed time and
counts epochs (a slow setting cannot hold the run up). Every ratio in the table
compares runs of this one invocation.

    nice -n 10 .venv/bin/python bench/head_threads.py   # no OMP_NUM_THREADS: it measures that
        [--seconds 6] [--repeats 2] [--out bench/results/head_threads.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _results import markdown_table, publish

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "leaf"
CONFIG = ROOT / "configs" / "leaf.yaml"
NEIGHBOUR = ("import numpy as np\n"
             "a = np.random.rand(600, 600)\n"
             "while True:\n"
             "    a = a @ a; a /= np.abs(a).max()\n")


def leaf_data():
    """The leaf head's training rows (its validation split left out) and settings."""
    from taxoclass.config import complete_config, load_config
    from taxoclass.pipelines.data import config_embeddings, validation_mask
    from taxoclass.taxonomy.annotations import load_annotations
    from taxoclass.taxonomy.labels import encode_labels

    cfg = complete_config(load_config(CONFIG))
    ann = load_annotations(DATA / "annotations.json")
    tax = ann.taxonomy()
    rows = ann.labelled_images(DATA)
    y, nodes = encode_labels(tax, rows)
    x, found, _ = config_embeddings(cfg, rows)
    is_val = validation_mask([str(i) for i in rows["image_id"]], nodes, cfg["data"])
    tr = found & ~is_val
    return cfg, tax, x[tr], {r: v[tr] for r, v in y.items()}


def synthetic(n_classes: int, dim: int = 768, n: int = 1024, seed: int = 0):
    """Random embeddings and a 3-rank taxonomy with ``n_classes`` species."""
    from taxoclass.taxonomy.tree import Taxonomy

    records = [{"family": f"F{i % 20}", "genus": f"G{i % 200}", "species": f"s{i}"}
               for i in range(n_classes)]
    tax = Taxonomy.from_records(records)
    rng = np.random.default_rng(seed)
    leaf = rng.integers(0, n_classes, n)
    y = {"species": leaf}
    for r in ("family", "genus"):
        y[r] = np.asarray(tax.parent_index("species", r))[leaf]
    return tax, rng.standard_normal((n, dim)).astype(np.float32), y


class _Enough(Exception):
    """Raised from the progress callback once a cell has used its time."""


def epochs_per_second(x, y, tax, cfg, threads: int | None, seconds: float) -> float:
    """Epochs per second of ``train_head`` on ``threads`` threads, timed between the end
    of the first epoch and the last one that ends within ``seconds`` (set-up excluded)."""
    from taxoclass.model.threads import torch_threads
    from taxoclass.model.training import train_head

    stamps: list[float] = []

    def tick(epoch: int, total: int) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) >= 3 and stamps[-1] - stamps[0] >= seconds:
            raise _Enough

    train = {**cfg["train"], "epochs": 100_000, "patience": None}
    with torch_threads(threads), contextlib.suppress(_Enough):
        train_head(x, y, None, None, tax, model=cfg["model"], loss=cfg["loss"], train=train,
                   normalize_inputs=True, progress=tick)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


@contextlib.contextmanager
def neighbour(busy: bool):
    """A separate process keeping one core busy with numpy matmuls (or nothing)."""
    if not busy:
        yield "none"
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=env)
    try:
        time.sleep(1.0)
        yield f"numpy 600x600 matmul loop, 1 thread, pid {proc.pid}"
    finally:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="training time per measurement (epochs counted within it)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default="100,1000,4000,8000",
                        help="species counts of the synthetic 768-d heads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/head_threads.md")
    args = parser.parse_args(argv)
    from taxoclass.model.threads import SMALL_HEAD_WEIGHTS, head_threads

    # torch's default without OMP_NUM_THREADS: one thread per core
    default = os.cpu_count() or 1
    cfg, tax, x, y = leaf_data()
    loads = [os.getloadavg()[0]]
    cases = [("leaf (configs/leaf.yaml)", tax, x, y)]
    for k in (int(s) for s in args.sizes.split(",") if s):
        stax, sx, sy = synthetic(k)
        cases.append((f"synthetic 768-d, {k} species", stax, sx, sy))
    rows = []
    for name, ctax, cx, cy in cases:
        n_out = sum(ctax.n_classes(r) for r in ctax.ranks)
        weights = cx.shape[1] * n_out
        chosen = head_threads(None, n_weights=weights)
        for busy in (False, True):
            with neighbour(busy) as who:
                runs: dict[int, list[float]] = {default: [], 1: []}
                for _ in range(args.repeats):  # alternating, so drifting load hits both
                    for t in runs:
                        runs[t].append(epochs_per_second(cx, cy, ctax, cfg, t, args.seconds))
                rate = {t: float(np.median(v)) for t, v in runs.items()}
                loads.append(os.getloadavg()[0])
            rows.append({"head": name, "weights": weights, "neighbour": who.split(",")[0],
                         f"epochs/s, {default} threads (default)": rate[default],
                         "epochs/s, 1 thread": rate[1],
                         "1 thread / default": rate[1] / rate[default],
                         "rule picks": chosen or default})
    frame = pd.DataFrame(rows)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Head training: epochs/s with torch's default threads vs one thread",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU, "
        f"torch {torch.__version__}; default intra-op threads {default}",
        f"- load: 1-min load average {min(loads):.2f}-{max(loads):.2f} during the run "
        f"(other jobs share this machine); at the end `{uptime}`",
        f"- command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        f"- leaf: {len(x)} training rows x {x.shape[1]}-d, configs/leaf.yaml head "
        f"(batch {cfg['train']['batch_size']}); synthetic: 1024 rows, same settings; each "
        f"measurement: epochs completed in {args.seconds:.0f} s of training (after the "
        f"first epoch), median of {args.repeats} alternating runs per cell; busy neighbour: "
        "a separate Python process running a 600x600 numpy matmul loop on one thread",
        f"- rule (`train.threads: null`): 1 thread for heads under {SMALL_HEAD_WEIGHTS:,} "
        "weights (input dim x outputs of all ranks), torch's default above",
        "",
        markdown_table(frame),
        "",
    ]
    publish("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
