"""Shared test fixtures. Add fixtures; do not remove others'."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A DINOv2-shaped ViT (patch 14, 4 registers) small enough for CPU tests.
TINY_DINO_KWARGS = dict(img_size=56, depth=2, embed_dim=64, num_heads=2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder ``../shared/data``; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def leaf_image_paths(shared_data: Path) -> list[Path]:
    """A handful of real leaf JPEGs, sorted by name."""
    paths = sorted((shared_data / "leaf" / "images").glob("*.jpg"))
    if len(paths) < 8:
        pytest.skip(f"fewer than 8 leaf images under {shared_data / 'leaf' / 'images'}")
    return paths[:8]


@pytest.fixture
def tiny_dino_kwargs() -> dict:
    """timm model kwargs for a tiny DINOv2-shaped ViT."""
    return dict(TINY_DINO_KWARGS)
