"""`taxoclass train --finetune` with torchrun: 2 CPU processes (gloo) vs 1, same global batch.

Real leaf images (the first ``--species`` species of ../shared/data/leaf, all 10 images of
each; the config's seeded 30 % validation split), the real EfficientNet-Lite0 backbone
(configs/leaf.yaml, here at ``--image-size`` px letterbox), the last block unfrozen,
``--epochs`` epochs, open-set fitting off (it is the same single-process code after
training). Both runs use one thread per process (OMP_NUM_THREADS=1), so 2 processes use
up to 2 cores and 1 process one.

Two settings: BatchNorm training as usual (on a CPU each process then normalises with its
own half batch: results differ from one process) and ``finetune.freeze_bn=true`` (the
same result as one process, up to float summation order).

Reports images/s (``provenance.json``: training images seen / fine-tuning seconds, all
processes together), the wall time of the whole command, the final validation metrics
(``metrics_val.json``) and the largest weight difference between the two runs.

    nice -n 10 timeout 1500 .venv/bin/python bench/distributed_finetune.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import taxoclass

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "leaf"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def subset(work: Path, n_species: int) -> Path:
    """Annotations of every image of the first ``n_species`` species (by category id)."""
    data = json.loads((SHARED / "annotations.json").read_text())
    cats = sorted((c for c in data["categories"] if c.get("species")),
                  key=lambda c: c["category_id"])[:n_species]
    keep = {c["category_id"] for c in cats}
    anns = [a for a in data["annotations"] if a["category_id"] in keep]
    ids = {a["image_id"] for a in anns}
    small = dict(data, categories=cats, annotations=anns,
                 images=[im for im in data["images"] if im["image_id"] in ids])
    path = work / "annotations.json"
    path.write_text(json.dumps(small))
    return path


def command(ann: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> list[str]:
    sets = [f"data.annotations={ann}", f"data.images_root={SHARED}", f"out={out}",
            f"backbone.image_size={args.image_size}", "openset.enabled=false",
            f"embeddings.cache={out.parent / 'emb'}", f"finetune.epochs={args.epochs}",
            f"finetune.batch_size={args.batch_size}", "finetune.unfreeze_blocks=1",
            "finetune.lr=0.003", "finetune.warmup_epochs=0.5", "finetune.num_workers=0",
            "finetune.patience=0", *extra]
    return ["train", "--config", str(REPO / "configs" / "leaf.yaml"), "--finetune",
            "--device", "cpu", *[a for s in sets for a in ("--set", s)]]


def run(args_cli: list[str], processes: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = ([sys.executable, "-m", "taxoclass.cli"] if processes == 1 else
                [str(TORCHRUN), "--standalone", "--nproc_per_node", str(processes),
                 "-m", "taxoclass.cli"])
    t = time.perf_counter()
    res = subprocess.run([*launcher, *args_cli], cwd=REPO, env=env, capture_output=True,
                         text=True)
    if res.returncode:
        sys.exit(f"failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return time.perf_counter() - t


def weights(bundle: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    w = {f"backbone.{k}": v.float() for k, v in torch.load(
        bundle / "backbone.pth", map_location="cpu", weights_only=True).items()
        if v.is_floating_point()}
    for f in bundle.glob("*.safetensors"):
        w.update({f"head.{k}": v.float() for k, v in load_file(f).items()})
    return w


def compare(one: dict, two: dict, start: dict) -> dict[str, float]:
    """Largest |one - two| over the trained weights (those that moved from ``start``, and
    the heads) and over BatchNorm running statistics; share of trained elements > 1e-4."""
    trained = [k for k in one if "running_" not in k
               and (k not in start or not torch.equal(start[k], one[k]))]
    d = torch.cat([(one[k] - two[k]).abs().flatten() for k in trained])
    stats = [float((one[k] - two[k]).abs().max()) for k in one if "running_" in k]
    return {"weights": float(d.max()), "share": float((d > 1e-4).float().mean()),
            "bn_stats": max(stats, default=0.0)}


def summary(out: Path, wall: float) -> dict:
    prov = json.loads((out / "provenance.json").read_text())["finetune"]
    metrics = json.loads((out / "metrics_val.json").read_text())
    return {"wall_s": wall, "finetune_s": prov["seconds"], "img_s": prov["images_per_second"],
            "n_train": prov["n_train"], "n_val": prov["n_val"],
            "acc": {r: m["accuracy"] for r, m in metrics["ranks"].items()},
            "val_loss": float(pd.read_csv(out / "history.csv")["val_loss"].iloc[-1])}


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--species", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-distributed-finetune")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                    "distributed_finetune.md")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"no leaf data at {SHARED}")
    args.work.mkdir(parents=True, exist_ok=True)
    ann = subset(args.work, args.species)
    start = {f"backbone.{k}": v.float() for k, v in
             taxoclass.create_backbone("efficientnet-lite0").model.state_dict().items()}
    started, load_before = sh("date -u"), sh("uptime")
    rows = []
    for name, extra in (("BatchNorm trains", []), ("freeze_bn", ["finetune.freeze_bn=true"])):
        res = {}
        for procs in (1, 2):
            out = args.work / f"{'bn' if not extra else 'frozen'}-{procs}p"
            res[procs] = summary(out, run(command(ann, out, args, extra), procs))
            res[procs]["weights"] = weights(out)
        diff = compare(res[1].pop("weights"), res[2].pop("weights"), start)
        rows.append((name, res, diff))
        print(name, res, diff, flush=True)
    write(args, rows, started, load_before, sh("uptime"))


def write(args, rows, started: str, load_before: str, load_after: str) -> None:
    ranks = list(rows[0][1][1]["acc"])
    lines = [
        "# Distributed fine-tuning: torchrun 2 processes vs 1 (CPU, gloo)", "",
        f"- Date: {started}; machine: 2 shared CPU cores, no GPU; OMP_NUM_THREADS=1 per "
        f"process.", f"- Load before: `{load_before}`", f"- Load after: `{load_after}`",
        f"- Data: {rows[0][1][1]['n_train']} training + {rows[0][1][1]['n_val']} validation "
        f"real leaf images ({args.species} species, seeded split of configs/leaf.yaml); "
        f"EfficientNet-Lite0 (real weights), {args.image_size} px letterbox, last block + "
        f"heads trained, {args.epochs} epochs, global batch {args.batch_size} (2 processes: "
        f"{args.batch_size // 2} each), lr 3e-3, open-set fitting off.",
        "- Command: `nice -n 10 timeout 1500 .venv/bin/python bench/distributed_finetune.py`",
        "",
        "| setting | processes | images/s | fine-tuning s | command wall s | final val loss | "
        + " | ".join(f"val {r} acc" for r in ranks) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(ranks)]
    for name, res, _ in rows:
        for procs, r in res.items():
            accs = " | ".join(f"{r['acc'][k]:.3f}" for k in ranks)
            lines.append(f"| {name} | {procs} | {r['img_s']:.2f} | {r['finetune_s']:.1f} | "
                         f"{r['wall_s']:.1f} | {r['val_loss']:.5f} | {accs} |")
    lines += ["", "1 vs 2 processes, same setting: largest |difference| of a trained weight "
              "(backbone weights that moved from the pretrained ones, and the heads), share "
              "of trained weight elements differing by more than 1e-4, largest |difference| "
              "of a BatchNorm running statistic:", "",
              "| setting | max abs diff, trained weights | share > 1e-4 | max abs diff, BN "
              "running stats |", "|---|---|---|---|"]
    lines += [f"| {name} | {d['weights']:.2e} | {d['share']:.4f} | {d['bn_stats']:.2e} |"
              for name, _, d in rows]
    lines += ["", "images/s: training images seen by all processes / seconds of the whole "
              "fine-tuning call (training, per-epoch validation, checkpoints). The command's "
              "wall time adds start-up, process-group set-up and (process 0) the validation "
              "metrics of the written bundle.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
