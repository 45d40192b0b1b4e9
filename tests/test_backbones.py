"""Backbones: checkpoint layouts, weight resolution errors, real offline weights."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import timm.data
import torch

from taxoclass.errors import BackboneError
from taxoclass.features.backbones import (
    BACKBONE_ALIASES,
    DEFAULT_BACKBONE,
    create_backbone,
    load_class_mapping,
)
from taxoclass.features.weights import file_sha256

DINO = "vit_base_patch14_reg4_dinov2"
PLANTCLEF_HEAD = 7806


def _tiny_model(kwargs: dict, num_classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(DINO, pretrained=False, num_classes=num_classes, **kwargs).eval()


def _x(size: int = 56, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_timm_state_dict_reloads_to_identical_outputs(tmp_path, tiny_dino_kwargs):
    model = _tiny_model(tiny_dino_kwargs, num_classes=5)
    ckpt = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), ckpt)

    bb = create_backbone(DINO, checkpoint=ckpt, model_kwargs=tiny_dino_kwargs)

    x = _x()
    with torch.no_grad():
        want_logits = model(x)
        want_emb = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.equal(bb.logits(x), want_logits)
    assert torch.equal(bb.embed(x), want_emb)
    assert bb.embed(x).shape == (2, 64) and bb.num_features == 64
    assert bb.checkpoint == str(ckpt.resolve())
    assert bb.checkpoint_sha256 == file_sha256(ckpt)
    assert bb.class_ids is None
    assert not bb.model.training


def test_plantclef_layout_with_real_class_mapping(tmp_path, tiny_dino_kwargs, shared_data):
    model = _tiny_model(tiny_dino_kwargs, num_classes=PLANTCLEF_HEAD)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": state, "epoch": 92, "arch": DINO}, ckpt)
    mapping = shared_data / "plantclef2024" / "class_mapping.txt"

    bb = create_backbone(
        DINO, checkpoint=ckpt, class_mapping=mapping, model_kwargs=tiny_dino_kwargs
    )

    assert bb.model.head.weight.shape == (PLANTCLEF_HEAD, 64)  # inferred from the checkpoint
    assert len(bb.class_ids) == PLANTCLEF_HEAD
    assert bb.class_ids[0] == "1355868"
    assert bb.class_ids == load_class_mapping(mapping)
    x = _x()
    with torch.no_grad():
        assert torch.equal(bb.logits(x), model(x))
    assert bb.describe()["num_classes"] == PLANTCLEF_HEAD


def test_class_mapping_of_wrong_length_names_both_sizes(tmp_path, tiny_dino_kwargs):
    model = _tiny_model(tiny_dino_kwargs, num_classes=PLANTCLEF_HEAD)
    ckpt = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    mapping = tmp_path / "class_mapping.txt"
    mapping.write_text("\n".join(str(1000 + i) for i in range(10)) + "\n")

    with pytest.raises(BackboneError) as err:
        create_backbone(DINO, checkpoint=ckpt, class_mapping=mapping, model_kwargs=tiny_dino_kwargs)
    msg = str(err.value)
    assert "10" in msg and "7806" in msg and str(mapping) in msg


def test_checkpoint_with_wrong_shapes_names_mismatched_key(tmp_path, tiny_dino_kwargs):
    ckpt = tmp_path / "tiny.pth"
    torch.save(_tiny_model(tiny_dino_kwargs, num_classes=0).state_dict(), ckpt)
    other = dict(tiny_dino_kwargs, embed_dim=32)

    with pytest.raises(BackboneError) as err:
        create_backbone(DINO, checkpoint=ckpt, model_kwargs=other)
    msg = str(err.value)
    assert "pos_embed: expected (1, 16, 32), found (1, 16, 64)" in msg
    assert "--backbone" in msg and str(ckpt) in msg


def test_checkpoint_with_missing_keys_is_refused(tmp_path, tiny_dino_kwargs):
    state = _tiny_model(tiny_dino_kwargs, num_classes=0).state_dict()
    del state["norm.weight"]
    ckpt = tmp_path / "partial.pth"
    torch.save(state, ckpt)
    with pytest.raises(BackboneError, match=r"1 missing keys \(norm.weight\)"):
        create_backbone(DINO, checkpoint=ckpt, model_kwargs=tiny_dino_kwargs)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "evil.pth"
    ckpt.write_bytes(pickle.dumps({"state_dict": _RunsCode()}, protocol=2))
    with pytest.raises(BackboneError, match="weights_only=True"):
        create_backbone(DINO, checkpoint=ckpt)
    assert "this must never run" not in capsys.readouterr().out


def test_missing_checkpoint_names_path_and_option(tmp_path):
    missing = tmp_path / "nope" / "model_best.pth.tar"
    with pytest.raises(BackboneError) as err:
        create_backbone(DINO, checkpoint=missing)
    assert str(missing) in str(err.value) and "--checkpoint" in str(err.value)


def test_unknown_backbone_names_close_matches_and_fix():
    with pytest.raises(BackboneError) as err:
        create_backbone("vit_base_patch14_reg4_dinov3", pretrained=False)
    msg = str(err.value)
    assert "'vit_base_patch14_reg4_dinov3'" in msg
    assert "vit_base_patch14_reg4_dinov2" in msg  # a close match
    assert "--backbone" in msg


def test_unreachable_hub_raises_with_offline_fixes(monkeypatch):
    import huggingface_hub.constants

    # Fail fast instead of retrying DNS for a minute; the machine has no network anyway.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneError) as err:
        create_backbone("dinov2")  # pretrained=True: never a silent random init
    msg = str(err.value)
    assert DEFAULT_BACKBONE in msg
    assert "--checkpoint PATH" in msg and "--backbone efficientnet-lite0" in msg


def test_random_init_only_when_asked_and_transform_from_timm(tiny_dino_kwargs):
    bb = create_backbone("dinov2", pretrained=False, model_kwargs=tiny_dino_kwargs)
    assert bb.name == BACKBONE_ALIASES["dinov2"] and bb.checkpoint is None
    assert bb.weights_source == "random-init" and bb.weights_fingerprint
    # timm's DINOv2 config, resized to the size this model was built for
    assert bb.data_config["input_size"] == (3, 56, 56)
    assert bb.data_config["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    emb = bb.embed(_x())
    assert emb.shape == (2, 64) and torch.isfinite(emb).all()
    with pytest.raises(BackboneError, match="no classifier head"):
        bb.logits(_x())
    desc = bb.describe()
    assert desc["name"] == DEFAULT_BACKBONE and desc["data_config"]["input_size"] == [3, 56, 56]
    other = create_backbone("dinov2", pretrained=False, model_kwargs=tiny_dino_kwargs)
    assert other.weights_fingerprint != bb.weights_fingerprint  # another random draw


def test_efficientnet_lite0_real_weights_classify_chelsea_as_egyptian_cat():
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    bb = create_backbone("efficientnet-lite0")
    assert bb.name == "tf_efficientnet_lite0" and bb.checkpoint_sha256
    assert bb.data_config["mean"] == (0.5, 0.5, 0.5) == bb.data_config["std"]
    chelsea = Image.fromarray(skimage_data.chelsea())

    # The whole photo (crop_pct=1, still timm's transform from the data config): class 285.
    full_view = timm.data.create_transform(**dict(bb.data_config, crop_pct=1.0), is_training=False)
    probs = bb.logits(full_view(chelsea)[None]).softmax(-1)[0]
    assert int(probs.argmax()) == 285  # Egyptian cat
    # timm's default centre crop (0.875) cuts the cat: it stays a cat, 285 in the top 2.
    default = bb.logits(bb.transform(chelsea)[None]).softmax(-1)[0]
    assert 285 in default.topk(2).indices.tolist()
    assert set(default.topk(3).indices.tolist()) <= {281, 282, 283, 284, 285}  # cat classes
    assert bb.embed(bb.transform(chelsea)[None]).shape == (1, 1280) == (1, bb.num_features)


def test_load_class_mapping_missing_file(tmp_path: Path):
    with pytest.raises(BackboneError, match="--class-mapping"):
        load_class_mapping(tmp_path / "class_mapping.txt")


def test_device_choice_and_autocast_recorded(tiny_dino_kwargs):
    """auto picks the CPU here (fp32, no autocast); asking for CUDA without one is a clear error."""
    bb = create_backbone("vit_base_patch14_reg4_dinov2", pretrained=False, device="auto",
                         model_kwargs=tiny_dino_kwargs)
    assert bb.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert bb.autocast is None and bb.describe()["autocast"] is None
        out = bb.embed(torch.randn(2, 3, 56, 56))
        assert out.dtype == torch.float32 and out.shape == (2, 64)
        with pytest.raises(BackboneError, match="--device cpu"):
            create_backbone("vit_base_patch14_reg4_dinov2", pretrained=False, device="cuda",
                            model_kwargs=tiny_dino_kwargs)


def test_refused_weights_file_is_not_reported_as_an_unreachable_hub(tmp_path, tiny_dino_kwargs):
    evil = tmp_path / "overlay.pth"
    evil.write_bytes(pickle.dumps({"state_dict": _RunsCode()}, protocol=2))
    kwargs = {**tiny_dino_kwargs, "pretrained_cfg_overlay": {"file": str(evil)}}
    with pytest.raises(BackboneError) as err:
        create_backbone(DINO, model_kwargs=kwargs)
    msg = str(err.value)
    assert "refused" in msg and "overlay.pth" in msg and "could run code" in msg
    assert "could not be reached" not in msg and "weights_only=False" not in msg


def test_cached_hub_weights_load_without_network(tmp_path, tiny_dino_kwargs, monkeypatch):
    import socket

    import huggingface_hub
    from safetensors.torch import save_file

    import taxoclass.features.weights as weights

    reference = _tiny_model(tiny_dino_kwargs, 0, seed=3)
    cached = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(cached))

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    def never(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", never)
    monkeypatch.setattr(weights, "_hf_cached_file", lambda *a: str(cached))
    bb = create_backbone(DINO, model_kwargs=tiny_dino_kwargs)  # pretrained=True
    x = _x()
    with torch.no_grad():
        assert torch.allclose(bb.embed(x), reference.forward_head(
            reference.forward_features(x), pre_logits=True), atol=1e-5)


def test_offline_switch_fails_at_once_naming_it(monkeypatch):
    import taxoclass.features.weights as weights

    monkeypatch.setenv("TAXOCLASS_OFFLINE", "1")
    monkeypatch.setattr(weights, "_hf_cached_file", lambda *a: None)
    with pytest.raises(BackboneError, match="TAXOCLASS_OFFLINE is set") as err:
        create_backbone("dinov2")
    assert "--backbone efficientnet-lite0" in str(err.value)


@pytest.mark.parametrize("kwargs", [{"img_size": -5}, {"embed_dim": 65}, {"img_size": "abc"}])
def test_model_kwargs_that_cannot_build_are_clear_errors(kwargs):
    with pytest.raises(BackboneError, match="cannot be built with model kwargs"):
        create_backbone(DINO, pretrained=False, model_kwargs=kwargs)
