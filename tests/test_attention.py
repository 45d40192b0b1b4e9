"""DINOv2 class-token attention maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from taxoclass.errors import BackboneError, ConfigError
from taxoclass.features.attention import attention_map, explain
from taxoclass.features.backbones import create_backbone
from taxoclass.io.images import load_image

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dino():
    torch.manual_seed(0)
    return create_backbone("vit_base_patch14_reg4_dinov2", pretrained=False,
                           model_kwargs=dict(img_size=56, depth=2, embed_dim=64, num_heads=2))


def _unfused_attention(bb, img) -> torch.Tensor:
    """The attention matrix timm computes itself when fused attention is off."""
    attn = bb.model.blocks[-1].attn
    got = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: got.setdefault("a", o))
    old = attn.fused_attn
    attn.fused_attn = False
    try:
        with torch.inference_mode():
            bb.model.forward_features(bb.transform(img).unsqueeze(0))
    finally:
        attn.fused_attn = old
        handle.remove()
    return got["a"][0]  # [heads, N, N]


def test_attention_map_shape_and_values(dino, leaf_image_paths):
    img = load_image(leaf_image_paths[0])
    amap = attention_map(dino, img)
    assert amap.shape == (4, 4)  # 56 px / patch 14
    assert (amap >= 0).all() and 0.0 < amap.sum() <= 1.0 + 1e-6
    ref = _unfused_attention(dino, img)
    prefix = dino.model.num_prefix_tokens
    assert prefix == 5
    np.testing.assert_allclose(amap.ravel(), ref[:, 0, prefix:].mean(0).numpy(), rtol=1e-4,
                               atol=1e-6)
    one = attention_map(dino, img, head=1)
    np.testing.assert_allclose(one.ravel(), ref[1, 0, prefix:].numpy(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="head"):
        attention_map(dino, img, head=2)


def test_explain_writes_overlay_png(dino, leaf_image_paths, tmp_path):
    out = explain(dino, leaf_image_paths[1], tmp_path / "att.png", head=0)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == load_image(leaf_image_paths[1]).size


def test_cnn_gives_a_clear_error(leaf_image_paths):
    cnn = create_backbone("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(BackboneError, match="DINOv2"):
        attention_map(cnn, load_image(leaf_image_paths[0]))
