"""Loading a tile classifier: a trained model bundle, or a PlantCLEF 2024 checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def load_tile_classifier(model: str | Path, *, class_mapping: str | Path | None = None,
                         species_table: str | Path | None = None,
                         backbone: str = "vit_base_patch14_reg4_dinov2",
                         model_kwargs: dict | None = None, batch_size: int = 32,
                         device: str = "auto"):
    """A tile classifier from a model bundle folder, or from a PlantCLEF 2024 checkpoint file
    (``model_best.pth.tar`` + ``class_mapping.txt`` + species table: no training needed).
    """
    from .plantclef import PlantCLEFClassifier
    from .tiling import BundleTileClassifier

    model = Path(model)
    if model.is_dir():
        return BundleTileClassifier.load(model, batch_size=batch_size, device=device)
    if not model.is_file():
        raise ConfigError(f"--model {model}: no such bundle folder or checkpoint file.")
    if not class_mapping or not species_table:
        raise ConfigError(f"--model {model} is a checkpoint file: the zero-training PlantCLEF path "
                          "also needs --class-mapping (class_mapping.txt) and --species-table "
                          "(species_id;species;genus;family CSV).")
    return PlantCLEFClassifier.from_files(model, class_mapping, species_table, backbone=backbone,
                                          model_kwargs=model_kwargs, batch_size=batch_size,
                                          device=device)
