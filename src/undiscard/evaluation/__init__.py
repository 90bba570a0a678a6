"""Measuring what the method gives a model, and what it costs.

* :mod:`~undiscard.evaluation.stats`: paired bootstrap, McNemar, NLL, ECE, temperature scaling.
* :mod:`~undiscard.evaluation.paired`: paired predictions, shift consistency.
* :mod:`~undiscard.evaluation.classify`: ``undiscard eval`` for classifiers (resumable, distributed).
* :mod:`~undiscard.evaluation.segment`: ``undiscard eval --task segmentation``.
* :mod:`~undiscard.evaluation.tta`: image TTA with and without ours (``undiscard tta-study``).
* :mod:`~undiscard.evaluation.policy`: dataset-level policies (``undiscard fit-policy``).
* :mod:`~undiscard.evaluation.fit`: choosing a configuration on validation (``undiscard fit``).
* :mod:`~undiscard.evaluation.checks`: ``undiscard check``, the exactness checks.
* :mod:`~undiscard.evaluation.bench`, :mod:`~undiscard.evaluation.seg_bench`: the benchmarks.
* :mod:`~undiscard.evaluation.study`: the zoo study behind docs/results.md.
"""
