"""Outlier detectors, evidence, thresholds, back-off and open-set evaluation."""
