"""Training throughput of the multi-rank head at PlantCLEF 2024 scale (7,806 species).

Real taxonomy (``plantclef2024_species_DERIVED_genus_family_from_inat.csv``: 191
families, 1,446 genera, 7,806 species), synthetic class-clustered 768-d embeddings
(this measures speed, not accuracy). Reports, for ``train_head`` as shipped:

- training throughput (embeddings/s per epoch: forward + loss + backward + optimizer
  step; no validation), best and mean epoch;
- a per-step breakdown (forward, loss, backward, optimizer) with the same batch;
- peak memory (``ru_maxrss``), this machine's dense float32 matmul FLOP/s, the head's
  FLOPs per sample and the achieved fraction of the matmul rate.

    .venv/bin/python bench/plantclef_scale_training.py            # ~3-5 min on 2 CPU cores
    .venv/bin/python bench/plantclef_scale_training.py --n 20000 --epochs 2   # quicker

Writes ``bench/results/plantclef_scale_training.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CSV = (ROOT.parent / "shared" / "data" / "plantclef2024"
       / "plantclef2024_species_DERIVED_genus_family_from_inat.csv")


def rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_flops(size: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` dense float32 ``torch.mm`` rate in FLOP/s (2 n^3 per product)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def head_matmul_flops(batch: int, d: int, c: int, repeats: int = 5) -> float:
    """Rate of the head's own forward matmul shape ``[batch, d] x [d, c]``."""
    x, w = torch.randn(batch, d), torch.randn(c, d)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * batch * d * c / best


def synthetic(taxonomy, n: int, d: int, seed: int = 0):
    """Class-clustered embeddings: species centre + noise; targets at every rank."""
    rng = np.random.default_rng(seed)
    n_sp = taxonomy.n_classes("species")
    centres = rng.standard_normal((n_sp, d), dtype=np.float32)
    species = rng.integers(0, n_sp, size=n)
    x = centres[species] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    y = {"species": species.astype(np.int64)}
    for r in taxonomy.ranks[:-1]:
        y[r] = taxonomy.parent_index("species", r)[species]
    return x, y


def step_breakdown(taxonomy, x, y, *, batch_size: int, steps: int, train_cfg: dict) -> dict:
    """Mean seconds per step of forward, loss, backward and optimizer step."""
    from taxoclass.model.heads import MultiRankHead
    from taxoclass.model.losses import ClassDependencyLoss
    from taxoclass.model.training import make_optimizer, normalize

    head = MultiRankHead(x.shape[1], taxonomy.sizes)
    crit = ClassDependencyLoss(taxonomy, dependency_weight=1.0)
    opt = make_optimizer(head, train_cfg)
    xt = normalize(x)
    yt = {r: torch.as_tensor(v) for r, v in y.items()}
    gen = torch.Generator().manual_seed(0)
    parts = {"forward": 0.0, "loss": 0.0, "backward": 0.0, "optimizer": 0.0}
    for i in range(steps + 2):
        idx = torch.randint(0, len(xt), (batch_size,), generator=gen)
        xb, yb = xt[idx], {r: v[idx] for r, v in yt.items()}
        t0 = time.perf_counter()
        out = head(xb)
        t1 = time.perf_counter()
        loss = crit(out, yb)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if i >= 2:  # warm-up steps excluded
            for k, dt_ in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[k] += dt_
    return {k: v / steps for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="synthetic embeddings")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--steps", type=int, default=10, help="steps for the per-step breakdown")
    ap.add_argument("--out",
                    default=str(ROOT / "bench" / "results" / "plantclef_scale_training.md"))
    args = ap.parse_args(argv)

    from taxoclass.model.training import train_head
    from taxoclass.taxonomy.loading import load_taxonomy

    if not CSV.is_file():
        print(f"skip: {CSV} not found (see shared/data/README.md)")
        return 0
    tax = load_taxonomy(CSV)
    sizes = tax.sizes
    c_total = sum(sizes.values())
    d = args.dim
    x, y = synthetic(tax, args.n, d)
    rss_data = rss_mib()

    mm = {s: matmul_flops(s) for s in (2048, 4096)}
    peak = max(mm.values())
    # FLOPs per sample (multiply-add = 2 FLOPs). The input embeddings need no gradient,
    # so autograd computes only dW (and db) in backward: 1x forward, not the usual 2x.
    fwd = 2 * d * c_total
    bwd_actual = fwd
    bwd_convention = 2 * fwd
    # Loss: two softmaxes over all classes (CE and dependency), the parent gathers and
    # products of the dependency term; ~25 elementwise FLOPs per class, order of magnitude.
    loss_flops = 25 * c_total

    rows = []
    for bs in args.batch_size:
        train_cfg = {"epochs": args.epochs, "batch_size": bs, "lr": 1e-3,
                     "weight_decay": 1e-4, "patience": None, "seed": 0}
        res = train_head(x, y, None, None, tax, train=train_cfg)
        sec = res.history["seconds"].to_numpy()
        tput = args.n / sec
        breakdown = step_breakdown(tax, x, y, batch_size=bs, steps=args.steps,
                                   train_cfg=train_cfg)
        step = sum(breakdown.values())
        head_mm = head_matmul_flops(bs, d, c_total)
        achieved = (fwd + bwd_actual + loss_flops) * tput.max()
        rows.append({"batch": bs, "best": tput.max(), "mean": tput.mean(),
                     "achieved": achieved, "frac": achieved / peak,
                     "frac_conv": (fwd + bwd_convention) * tput.max() / peak,
                     "head_mm": head_mm, "breakdown": breakdown, "step": step,
                     "final_loss": float(res.history["train_loss"].iloc[-1])})
        print(f"batch {bs}: {tput.max():,.0f} emb/s best epoch, {tput.mean():,.0f} mean; "
              f"{achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of torch.mm peak; "
              + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in breakdown.items()), flush=True)
    rss = rss_mib()

    lines = [
        "# PlantCLEF-scale head training throughput",
        "",
        f"{dt.date.today().isoformat()} · {platform.node()} · "
        f"{platform.processor() or platform.machine()}"
        f" · {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()} · "
        f"torch {torch.__version__} · Python {platform.python_version()}",
        "",
        f"Taxonomy: real PlantCLEF 2024 class list ({sizes['family']:,} families, "
        f"{sizes['genus']:,} genera, {sizes['species']:,} species = {c_total:,} output units). "
        f"Embeddings: {args.n:,} synthetic class-clustered {d}-d vectors (speed only). "
        f"`train_head` with linear heads, class-dependency loss (weight 1), AdamW, "
        f"{args.epochs} epochs, no validation; throughput = n / epoch seconds "
        "(forward + loss + backward + optimizer step).",
        "",
        "Command: `.venv/bin/python bench/plantclef_scale_training.py "
        + " ".join(a for a in (argv if argv is not None else sys.argv[1:])) + "`",
        "",
        "| batch | emb/s (best epoch) | emb/s (mean) | achieved GFLOP/s | of torch.mm peak "
        "| (with 3x-forward convention) | head-shape matmul GFLOP/s "
        "| step ms: fwd / loss / bwd / opt |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        b = r["breakdown"]
        lines.append(
            f"| {r['batch']} | {r['best']:,.0f} | {r['mean']:,.0f} | {r['achieved'] / 1e9:.1f} "
            f"| {r['frac']:.0%} | {r['frac_conv']:.0%} | {r['head_mm'] / 1e9:.1f} | "
            f"{b['forward'] * 1e3:.1f} / {b['loss'] * 1e3:.1f} / {b['backward'] * 1e3:.1f} / "
            f"{b['optimizer'] * 1e3:.1f} |")
    lines += [
        "",
        "| quantity | value |",
        "| --- | --- |",
        *[f"| dense float32 torch.mm {s}x{s} (best of 5) | {v / 1e9:.1f} GFLOP/s |"
          for s, v in mm.items()],
        f"| head parameters | {(d + 1) * c_total:,} ({(d + 1) * c_total * 4 / 2**20:.1f} MiB) |",
        f"| forward FLOPs / sample (2·{d}·{c_total}) | {fwd / 1e6:.1f} M |",
        "| backward FLOPs / sample, actual (dW only: inputs need no grad) | "
        f"{bwd_actual / 1e6:.1f} M |",
        f"| backward FLOPs / sample, usual 2x-forward convention | {bwd_convention / 1e6:.1f} M |",
        f"| loss + dependency term FLOPs / sample (≈25 per class) | {loss_flops / 1e6:.2f} M |",
        f"| peak RSS after building the data ({args.n:,}x{d} float32 = "
        f"{args.n * d * 4 / 2**20:.0f} MiB) | {rss_data:,.0f} MiB |",
        f"| peak RSS at the end (ru_maxrss) | {rss:,.0f} MiB |",
        "",
        "Achieved GFLOP/s counts forward + actual backward + loss FLOPs. tracemalloc does not "
        "see torch's allocator and psutil is not installed, so ru_maxrss is the memory figure.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = out.with_suffix(".notes.md")
    if extra.is_file():  # hand-written analysis kept beside the generated table
        lines += [extra.read_text()]
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
