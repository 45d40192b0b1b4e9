"""Rank heads, losses, path decoding, head training, fine-tuning and metrics."""
