"""One exception type per kind of bad input.

Every message names the file (or object), the record, what was expected, what was
found, and how to fix it. The CLI prints ``str(error)`` and exits non-zero.
"""

from __future__ import annotations


class TaxoclassError(Exception):
    """Base class for errors caused by user input (files, configs, options)."""


class AnnotationError(TaxoclassError):
    """An annotation file is unreadable, violates the schema, or is inconsistent."""


class TaxonomyError(TaxoclassError):
    """A taxonomy is inconsistent (a taxon under two parents, an unknown taxon...)."""


class ConfigError(TaxoclassError):
    """A configuration file or option is invalid."""


class BackboneError(TaxoclassError):
    """A backbone cannot be built or its weights cannot be found or do not fit."""


class ImageError(TaxoclassError):
    """An image is missing or cannot be decoded."""


class CacheError(TaxoclassError):
    """An embedding cache is missing, incomplete or belongs to another backbone."""


class BundleError(TaxoclassError):
    """A model bundle is missing files or was written by an incompatible version."""
