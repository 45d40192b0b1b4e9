"""GPU throughput of DINOv2 ViT-B/14 (4 registers) at 518 px: images/s and % of peak.

Meant for an NVIDIA GPU (H100 / H200). It times the two things taxoclass does with the
backbone on a GPU:

* ``inference``: pooled embeddings under ``torch.inference_mode`` (embedding caches,
  plot tiles);
* ``train``: one fine-tuning step of :class:`taxoclass.model.finetune.FinetuneModel` with the
  :class:`~taxoclass.model.losses.ClassDependencyLoss` on a PlantCLEF-sized taxonomy
  (7,806 species) and fused AdamW, all blocks trainable.

Both run with bf16 autocast, fused scaled-dot-product attention (timm's ViT calls
``F.scaled_dot_product_attention``; the enabled SDPA backends are printed), TF32
matmuls, channels_last where it helps (``--channels-last auto``: CNNs yes, ViTs no)
and optionally ``torch.compile`` (``--compile``). Random weights (``pretrained=False``)
and random inputs: speed does not depend on the values, and no data loading is timed.

FLOPs per image are counted analytically (``--flops analytic``, default)::

    patch embed  2 * P * (3 * p * p) * D                 (P patches of p x p pixels)
    per block    2 * (4 N D^2 + 2 N^2 D + 8 N D^2)         (N tokens = P + 1 + registers)
                 qkv + output projections, Q K^T and A V, MLP with hidden 4 D

or with ``torch.utils.flop_counter.FlopCounterMode`` (``--flops counter``); both are
printed. FlopCounterMode has formulas for the CUDA SDPA kernels (flash, efficient,
cudnn), so on a GPU the two should agree; on a CPU it has none for the fused CPU
attention kernel and misses the 4 N^2 D attention FLOPs per block (at 518 px: 234.6
GFLOP/image against the analytic 304.2). A training step counts as 3x the forward
FLOPs. Achieved TFLOP/s is divided by ``--peak`` (default 790 bf16 dense TFLOP/s, the
figure this project uses for H100/H200; the datasheet dense bf16 peak of an SXM
H100/H200 is 989, of a PCIe H100 756).

Without CUDA it says so and runs a tiny CPU smoke test (a 2-block ViT at 56 px, fp32)
so the script itself can be checked anywhere; its numbers mean nothing. Exit status 0.

    .venv/bin/python bench/gpu_throughput.py [--batch-size 64] [--steps 20] [--compile]
        [--mode both|inference|train] [--peak 790] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

MODEL = "vit_base_patch14_reg4_dinov2"
TINY_KWARGS = dict(img_size=56, depth=2, embed_dim=64, num_heads=2)
N_SPECIES, PER_GENUS, PER_FAMILY = 7806, 8, 80


def analytic_vit_flops(*, img_size: int, patch: int, dim: int, depth: int,
                       prefix_tokens: int, mlp_ratio: float = 4.0) -> dict[str, float]:
    """Forward FLOPs per image of a plain ViT (2 FLOPs per multiply-add)."""
    patches = (img_size // patch) ** 2
    n = patches + prefix_tokens
    embed = 2 * patches * (3 * patch * patch) * dim
    proj = 4 * n * dim * dim            # q, k, v and output projections
    attn = 2 * n * n * dim              # Q K^T and A V
    mlp = 2 * mlp_ratio * n * dim * dim  # two linears with hidden mlp_ratio * D
    block = 2 * (proj + attn + mlp)
    return {"tokens": n, "patch_embed": embed, "per_block": block,
            "total": embed + depth * block}


def vit_shape(model: torch.nn.Module) -> dict[str, int]:
    pe = model.patch_embed
    return {"img_size": int(pe.img_size[0]), "patch": int(pe.patch_size[0]),
            "dim": int(model.embed_dim), "depth": len(model.blocks),
            "prefix_tokens": int(getattr(model, "num_prefix_tokens", 1))}


def counted_flops(model: torch.nn.Module, x: torch.Tensor, autocast) -> float:
    """Forward FLOPs per image from FlopCounterMode (one image)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), autocast(), counter:
        model(x[:1])
    return float(counter.get_total_flops())


def synthetic_taxonomy(n_species: int):
    from taxoclass.taxonomy.tree import Taxonomy

    recs = [{"family": f"F{i // PER_FAMILY}", "genus": f"G{i // PER_GENUS}",
             "species": f"s{i}"} for i in range(n_species)]
    return Taxonomy.from_records(recs)


def sdpa_backends() -> str:
    if not torch.cuda.is_available():
        return "cpu (math / flash-cpu)"
    b = torch.backends.cuda
    on = [name for name, enabled in (("flash", b.flash_sdp_enabled()),
                                     ("mem_efficient", b.mem_efficient_sdp_enabled()),
                                     ("cudnn", getattr(b, "cudnn_sdp_enabled", lambda: False)()),
                                     ("math", b.math_sdp_enabled())) if enabled]
    return ", ".join(on)


def time_loop(fn, *, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--img-size", type=int, default=518)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-batch-size", type=int, default=None,
                        help="batch for the training step (default: --batch-size)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--mode", choices=("both", "inference", "train"), default="both")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. max-autotune")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--flops", choices=("analytic", "counter"), default="analytic",
                        help="which FLOP count the utilisation figure uses")
    parser.add_argument("--peak", type=float, default=790.0,
                        help="the card's peak bf16 dense TFLOP/s")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    import timm

    from taxoclass.model.finetune import FinetuneModel
    from taxoclass.model.heads import MultiRankHead
    from taxoclass.model.losses import ClassDependencyLoss

    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda")
        card = torch.cuda.get_device_name(device)
        kwargs = {"img_size": args.img_size}
        batch, steps, warmup, n_species = args.batch_size, args.steps, args.warmup, N_SPECIES
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)

        def sync():
            torch.cuda.synchronize()
    else:
        print("NO CUDA DEVICE: this benchmark is meant for an NVIDIA GPU (H100/H200). "
              "Running a tiny CPU smoke test instead (2-block ViT, 56 px, fp32); its numbers "
              "say nothing about GPU throughput.")
        device = torch.device("cpu")
        card = f"CPU ({platform.processor() or platform.machine()}), no CUDA"
        kwargs = dict(TINY_KWARGS)
        batch, steps, warmup, n_species = 2, 2, 1, 160
        args.compile = False

        def autocast():
            return torch.autocast("cpu", enabled=False)

        def sync():
            pass

    torch.manual_seed(0)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0, **kwargs)
    channels_last = (args.channels_last == "on" or
                     (args.channels_last == "auto" and getattr(backbone, "patch_embed", None)
                      is None))
    shape = vit_shape(backbone)
    analytic = analytic_vit_flops(**shape)
    size = shape["img_size"]
    tax = synthetic_taxonomy(n_species)
    head = MultiRankHead.for_taxonomy(tax, backbone.num_features)
    model = FinetuneModel(backbone, head).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)

    def images(n: int) -> torch.Tensor:
        x = torch.randn(n, 3, size, size, device=device)
        return x.contiguous(memory_format=memory_format)

    model.eval()
    counter_flops = counted_flops(model, images(1), autocast)
    flops_img = analytic["total"] if args.flops == "analytic" else counter_flops
    runner = torch.compile(model, mode=args.compile_mode) if args.compile else model

    print(f"device: {card}")
    print(f"torch {torch.__version__}, timm {timm.__version__}, model {args.model} "
          f"{size}px, {shape['depth']} blocks, D={shape['dim']}, {analytic['tokens']} tokens, "
          f"fused attention (timm): {timm.layers.use_fused_attn()}, SDPA backends: "
          f"{sdpa_backends()}, channels_last: {channels_last}, compile: {args.compile}")
    print(f"forward GFLOP/image: analytic {analytic['total'] / 1e9:.2f}, "
          f"FlopCounterMode {counter_flops / 1e9:.2f} (using {args.flops})")

    results: dict = {"device": card, "cuda": cuda, "model": args.model, "img_size": size,
                     "compile": args.compile, "channels_last": channels_last,
                     "peak_tflops": args.peak, "gflop_per_image_analytic": analytic["total"] / 1e9,
                     "gflop_per_image_counter": counter_flops / 1e9, "runs": []}
    rows = []
    if args.mode in ("both", "inference"):
        x = images(batch)

        def infer():
            with torch.inference_mode(), autocast():
                runner(x)

        sec = time_loop(infer, steps=steps, warmup=warmup, sync=sync)
        rows.append(("inference", batch, batch * steps / sec, 1.0))
    if args.mode in ("both", "train"):
        tb = args.train_batch_size or batch
        criterion = ClassDependencyLoss(tax).to(device)
        y = {r: torch.randint(0, tax.n_classes(r), (tb,), device=device) for r in tax.ranks}
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        except (RuntimeError, TypeError, ValueError):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        x = images(tb)
        model.train()

        def train_step():
            with autocast():
                out = runner(x)
            loss = criterion({r: v.float() for r, v in out.items()}, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        sec = time_loop(train_step, steps=steps, warmup=warmup, sync=sync)
        rows.append(("train", tb, tb * steps / sec, 3.0))

    print()
    print("| mode | batch | images/s | TFLOP/s | % of peak |")
    print("|---|---:|---:|---:|---:|")
    for mode, b, ips, mult in rows:
        tflops = ips * flops_img * mult / 1e12
        frac = tflops / args.peak
        print(f"| {mode} | {b} | {ips:,.1f} | {tflops:,.1f} | {100 * frac:.1f}% |")
        results["runs"].append({"mode": mode, "batch": b, "images_per_second": ips,
                                "tflops": tflops, "fraction_of_peak": frac})
    if cuda:
        results["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"\npeak GPU memory: {results['max_memory_gib']:.1f} GiB")
    else:
        print("\n(CPU smoke test only: rerun on a CUDA machine for real numbers.)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
