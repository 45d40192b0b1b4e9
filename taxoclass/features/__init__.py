"""Backbones, preprocessing, the embedding cache, training views and attention maps."""
