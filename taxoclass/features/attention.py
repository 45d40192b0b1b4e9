"""Where the backbone looks: the class token's attention in the last ViT block.

timm's ``Attention`` uses fused scaled-dot-product attention, so the attention matrix
is never materialised. We hook the last block's attention module to capture its input
(the normalised tokens) and recompute ``softmax(q·kᵀ · scale)`` from its own ``qkv``
projection (and ``q_norm``/``k_norm``), then keep the class-token row over the patch
tokens only (DINOv2 with registers has ``num_prefix_tokens = 5``: class + 4 registers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import BackboneError, ConfigError
from ..io.images import load_image

__all__ = ["attention_map", "explain"]


def _last_attention(model: torch.nn.Module, name: str) -> torch.nn.Module:
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not all(hasattr(attn, a) for a in ("qkv", "num_heads")) or not hasattr(
            model, "patch_embed"):
        raise BackboneError(
            f"Backbone {name!r} has no transformer self-attention to explain (no ViT blocks "
            f"with a qkv attention). Attention maps need a ViT backbone such as DINOv2 "
            f"(vit_base_patch14_reg4_dinov2, the default, or a PlantCLEF checkpoint) or any "
            f"timm vit_* model; CNNs such as tf_efficientnet_lite0 have no class-token "
            f"attention.")
    return attn


def _grid_size(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    pe = model.patch_embed
    patch = pe.patch_size if isinstance(pe.patch_size, tuple) else (pe.patch_size,) * 2
    return x.shape[-2] // patch[0], x.shape[-1] // patch[1]


def attention_map(backbone: Any, image: Image.Image | torch.Tensor, *,
                  head: int | None = None) -> np.ndarray:
    """Class-token attention of the last block over the patch grid, ``[rows, cols]``.

    ``image``: a PIL image (the backbone's transform is applied) or a transformed
    tensor ``[3, H, W]``. ``head``: one attention head, or ``None`` for the mean over
    heads. The map is the class token's softmax row restricted to patch tokens (register
    tokens and the class token are dropped), so it sums to at most 1.
    """
    model = backbone.model
    attn = _last_attention(model, getattr(backbone, "name", type(model).__name__))
    n_heads = int(attn.num_heads)
    if head is not None and not 0 <= int(head) < n_heads:
        raise ConfigError(f"Attention head {head} does not exist; {backbone.name!r} has "
                          f"{n_heads} heads (0..{n_heads - 1}), or pass head=None for the mean.")
    x = backbone.transform(image.convert("RGB")) if isinstance(image, Image.Image) else image
    x = x.unsqueeze(0) if x.ndim == 3 else x
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, args):
        captured["x"] = args[0].detach()

    handle = attn.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            x = x.to(backbone.device)
            model.forward_features(x)
    finally:
        handle.remove()
    tokens = captured["x"]  # [1, N, C], input of the attention module (after norm1)
    with torch.inference_mode():
        b, n, _ = tokens.shape
        head_dim = attn.qkv.out_features // (3 * n_heads)
        qkv = attn.qkv(tokens).reshape(b, n, 3, n_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, _v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        scale = float(getattr(attn, "scale", head_dim ** -0.5))
        weights = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [1, H, N, N]
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    cls_row = weights[0, :, 0, prefix:]  # [H, n_patches]
    rows, cols = _grid_size(model, x)
    if cls_row.shape[-1] != rows * cols:
        raise BackboneError(f"Backbone {backbone.name!r}: {cls_row.shape[-1]} patch tokens do not "
                            f"form the {rows}x{cols} patch grid of a {tuple(x.shape[-2:])} input.")
    amap = cls_row.mean(dim=0) if head is None else cls_row[int(head)]
    return amap.reshape(rows, cols).float().cpu().numpy()


def explain(backbone: Any, image_path: str | Path, out_png: str | Path, *,
            head: int | None = None, alpha: float = 0.5, cmap: str = "inferno") -> Path:
    """Save the image with its attention map overlaid (resized, colormapped) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps

    from ..io.files import atomic_write

    image = load_image(image_path)
    amap = attention_map(backbone, image, head=head)
    lo, hi = float(amap.min()), float(amap.max())
    norm = (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)
    heat = Image.fromarray((norm * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    rgba = colormaps[cmap](np.asarray(heat) / 255.0)
    overlay = Image.fromarray((rgba[..., :3] * 255).astype(np.uint8))
    blended = Image.blend(image, overlay, float(alpha))
    out = Path(out_png)
    return atomic_write(out, lambda fh: blended.save(fh, format="PNG"), mode="wb")
