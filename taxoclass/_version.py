"""The package version: the bottom layer, so no sublayer imports the root package."""

__version__ = "0.1.0"
