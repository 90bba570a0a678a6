"""The method: search the states of an image, align them, aggregate them.

* :mod:`~undiscard.method.options`: validation of option values shared by every task.
* :mod:`~undiscard.method.search`: greedy search over states and its criteria.
* :mod:`~undiscard.method.align`: shifting final maps back to the default grid.
* :mod:`~undiscard.method.aggregate`: learning-free aggregation (mean, entropy weights).
* :mod:`~undiscard.method.learned`: the attention aggregator (learned criterion and combination).
* :mod:`~undiscard.method.config`: the JSON configuration ``undiscard fit`` writes and :func:`wrap` applies.
* :mod:`~undiscard.method.classify`: :func:`wrap` / :class:`Undiscard` for classifiers.
* :mod:`~undiscard.method.segment`: :func:`wrap_segmentation` for dense prediction.

Definitions: docs/method.md.
"""

from undiscard.method.classify import Undiscard, wrap
from undiscard.method.segment import SegmentationUndiscard, wrap_segmentation

__all__ = ["Undiscard", "wrap", "SegmentationUndiscard", "wrap_segmentation"]
