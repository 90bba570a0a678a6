"""Image-space test-time augmentation, alone or stacked on ours.

* :mod:`~undiscard.tta.transforms`: image transforms with their inverses (flips, crops, shifts, scales,
  RandAugment ops) and named policies.
* :mod:`~undiscard.tta.merge`: image aggregators (mean, max, GPS, AugTTA, ClassTTA) and a logits cache.
* :mod:`~undiscard.tta.compose`: :class:`ImageTTA`, image views over a feature-space :class:`~undiscard.Undiscard`.
"""

from undiscard.tta.compose import ImageTTA, compose

__all__ = ["ImageTTA", "compose"]
