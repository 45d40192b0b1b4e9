"""taxoclass: name organisms in images at the taxonomic rank the evidence supports.

Heavy modules (torch, timm, pandas) are imported lazily, so ``taxoclass --help`` is fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import AnnotationError as AnnotationError
from .errors import BackboneError as BackboneError
from .errors import BundleError as BundleError
from .errors import CacheError as CacheError
from .errors import ConfigError as ConfigError
from .errors import ImageError as ImageError
from .errors import TaxoclassError as TaxoclassError
from .errors import TaxonomyError as TaxonomyError

from ._version import __version__ as __version__

_LAZY = {
    "Taxonomy": "taxonomy.tree",
    "load_annotations": "taxonomy.annotations",
    "validate_annotations": "taxonomy.annotations",
    "read_species_table": "taxonomy.annotations",
    "read_class_mapping": "taxonomy.annotations",
    "create_backbone": "features.backbones",
    "compute_embeddings": "features.embeddings",
    "load_embeddings": "features.embeddings",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'taxoclass' has no attribute {name!r}")
