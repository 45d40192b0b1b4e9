"""taxoclass: name organisms in images at the taxonomic rank the evidence supports.

The public API (``__all__``) is what the ``taxoclass`` command line calls::

    import taxoclass

    bundle = taxoclass.train(taxoclass.load_config("configs/leaf.yaml"))
    frame = taxoclass.TaxonClassifier.load(bundle).predict(["photo.jpg"])

Everything but the error types and ``__version__`` is imported on first use, so
``import taxoclass`` (and ``taxoclass --help``) loads neither torch nor pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__ as __version__
from .errors import AnnotationError as AnnotationError
from .errors import BackboneError as BackboneError
from .errors import BundleError as BundleError
from .errors import CacheError as CacheError
from .errors import ConfigError as ConfigError
from .errors import ImageError as ImageError
from .errors import TaxoclassError as TaxoclassError
from .errors import TaxonomyError as TaxonomyError

# public name -> (module, attribute): imported on first access
_LAZY: dict[str, tuple[str, str]] = {
    "TaxonClassifier": ("pipelines.classifier", "TaxonClassifier"),
    "embed": ("pipelines.embed", "embed_annotations"),
    "train": ("pipelines.train", "train_from_config"),
    "predict": ("pipelines.predict", "predict_images"),
    "flag_unknowns": ("pipelines.predict", "flag_unknowns"),
    "discover": ("pipelines.discover", "discover_taxa"),
    "evaluate": ("pipelines.evaluate", "evaluate_model"),
    "import_annotations": ("pipelines.importing", "import_annotations"),
    "plot_report": ("pipelines.plots", "plot_report_job"),
    "calibrate_plots": ("pipelines.plots", "calibrate_plots_job"),
    "benchmark": ("pipelines.benchmark", "benchmark"),
    "export_onnx": ("pipelines.export", "export_onnx"),
    "Taxonomy": ("taxonomy.tree", "Taxonomy"),
    "load_taxonomy": ("taxonomy.loading", "load_taxonomy"),
    "load_annotations": ("taxonomy.annotations", "load_annotations"),
    "validate_annotations": ("taxonomy.annotations", "validate_annotations"),
    "create_backbone": ("features.backbones", "create_backbone"),
    "load_config": ("config", "load_config"),
}

__all__ = [
    "AnnotationError",
    "BackboneError",
    "BundleError",
    "CacheError",
    "ConfigError",
    "ImageError",
    "TaxoclassError",
    "TaxonomyError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'taxoclass' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
