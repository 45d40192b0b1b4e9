"""The jobs the CLI and the Python API run, one module per job family.

``embed`` (embed), ``train`` (train on cached embeddings), ``finetune`` (train
--finetune), ``predict`` (predict, flag-unknowns), ``evaluate`` (evaluate, open-set
evaluation), ``plots`` (plot-report, calibrate-plots, evaluate-plots), ``classifier``
(:class:`~taxoclass.pipelines.classifier.TaxonClassifier`); shared steps: ``data``
(training data from a config) and ``openset_fit`` (fitting a bundle's open-set scorer).
Jobs with a Spark path pick their engine with :func:`taxoclass.engines.engine_for_job`.
"""
