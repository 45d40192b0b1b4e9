"""Plot photos: tiling, tile classifiers, aggregation rules, calibration, metrics, reports."""
