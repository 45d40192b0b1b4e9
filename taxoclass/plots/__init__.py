"""Plot photos: tiling (the one tile loop, :func:`~taxoclass.plots.tiling.classify_photo`),
selection (the one selection rule), rules (``aggregate_plot``), search, learned, calibration,
settings, evaluation (plot metrics), report, plantclef."""
