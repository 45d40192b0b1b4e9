"""Outlier detectors, evidence, thresholds, back-off, open-set evaluation, and the recipe
chosen on the training data (selection, candidates)."""
