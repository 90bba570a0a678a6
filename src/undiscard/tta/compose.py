"""Image-space test-time augmentation on top of recovered activations (docs/tta.md).

Each image view ``t.augment(x)`` is classified by the feature-space method with budget
``B_feat`` (``B_feat = 1``: the plain model, exactly), the views' logits are stacked
``(N, A, K)`` and an image-space aggregator (:mod:`undiscard.tta.merge`: mean, max, GPS,
AugTTA, ClassTTA) turns them into one prediction. ``B_total = B_img * B_feat`` forwards'
worth of states per image, where ``B_img`` is the number of distinct views the image
aggregator uses (a GPS policy that picks a view twice computes it once).

    >>> tta = undiscard.tta.compose(backbone, transforms, aggregator, feature_budget=5)  # doctest: +SKIP
    >>> log_probs = tta(x)                                                            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from undiscard.errors import InputError, UndiscardError
from undiscard.method.classify import Undiscard

__all__ = ["ImageTTA", "compose", "view_logits"]


class ImageTTA(nn.Module):
    """A classifier that aggregates image views, each processed with ``feature_budget`` states.

    Args:
        model: the classifier (eval mode).
        transforms: the :class:`undiscard.tta.transforms.ImageTransform` list the aggregator was built
            with, in its order (checked by name).
        image_aggregator: an :class:`undiscard.tta.merge.ImageAggregator`; ``None``: the mean of
            probabilities over ``transforms``.
        feature_budget: ``B_feat``, states per view (1 = the plain model on every view).
        **wrap_kwargs: passed to :class:`undiscard.method.classify.Undiscard` (``criterion``,
            ``aggregate``, ``aggregator`` (the feature-space one), ``searchable``, ...).

    ``forward(x)`` returns log-probabilities ``(N, K)``.
    """

    def __init__(self, model: nn.Module, transforms: Sequence[Any], image_aggregator: Any = None,
                 feature_budget: int = 1, **wrap_kwargs: Any) -> None:
        super().__init__()
        from undiscard.tta.merge import ImageAggregator, mean_aggregator

        transforms = list(transforms)
        if not transforms:
            raise InputError("image TTA needs at least one transform (identity first)")
        names = [t.name for t in transforms]
        aggregator = image_aggregator
        if aggregator is None:
            aggregator = mean_aggregator(names)
        if not isinstance(aggregator, ImageAggregator):
            raise InputError(f"aggregator must be an undiscard.tta.merge.ImageAggregator; got {type(aggregator).__name__}")
        if list(aggregator.names) != names:
            raise UndiscardError(
                f"the image aggregator was built for the augmentations {list(aggregator.names)}, "
                f"but these transforms are {names}: pass the transforms it was fitted with, in that order "
                "(undiscard.tta.transforms.transforms_by_names(aggregator.names, ...))"
            )
        self.transforms = transforms
        self.image_aggregator = aggregator
        self.feature = Undiscard(model, feature_budget, **wrap_kwargs)

    @property
    def feature_budget(self) -> int:
        return self.feature.budget

    @property
    def used(self) -> list[int]:
        """Indices of the transforms that are actually computed."""
        return list(self.image_aggregator.used())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise InputError(f"expected an image batch (N, C, H, W); got {getattr(x, 'shape', type(x))}")
        views: list[torch.Tensor | None] = [None] * len(self.transforms)
        for i in self.used:
            views[i] = self.feature(self.transforms[i].augment(x))
        ref = next(v for v in views if v is not None)
        stacked = torch.stack([v if v is not None else torch.zeros_like(ref) for v in views], 1)
        return self.image_aggregator(stacked)


def compose(model: nn.Module, transforms: Sequence[Any], image_aggregator: Any = None, feature_budget: int = 1,
            **wrap_kwargs: Any) -> ImageTTA:
    """Image-space TTA (``transforms`` + ``image_aggregator``) stacked on ``feature_budget``
    recovered states per view; see :class:`ImageTTA`."""
    return ImageTTA(model, transforms, image_aggregator, feature_budget, **wrap_kwargs)


@torch.no_grad()
def view_logits(u: Undiscard, transform: Any, x: Any, budgets: Sequence[int], batch_size: int = 128,
                progress=None) -> dict[int, torch.Tensor]:
    """Logits ``(N, K)`` of every image of ``x`` under one view, at each feature budget.

    One search per batch at the largest budget; a smaller budget's result is read off the
    same search (its states are the first ones), as ``undiscard eval`` does. Budget 1 is
    the plain model's output on the view.

    Args:
        u: the feature-space wrapper (:class:`~undiscard.method.classify.Undiscard`).
        transform: the view (an :class:`~undiscard.tta.transforms.ImageTransform`).
        budgets: feature budgets (sorted and deduplicated here).
        batch_size: images per search.
        progress: called with the number of images of each finished batch.

    Shape:
        - x: ``(N, C, H, W)`` (a tensor or anything sliceable into such batches).
        - output: ``{budget: (N, K)}`` logits.
    """
    budgets = sorted(set(budgets))
    out: dict[int, list[torch.Tensor]] = {b: [] for b in budgets}
    n = x.shape[0]
    for s in range(0, n, batch_size):
        xb = transform.augment(x[s : s + batch_size])
        if budgets[0] == 1:  # the plain model itself (bit-exact), not the search's default row
            out[1].append(u.model(xb))
        if budgets[-1] > 1:
            found = u.search(xb, budgets[-1])
            for b in budgets:
                if b > 1:
                    out[b].append(u.combine(found, b)[0])
        if progress is not None:
            progress(xb.shape[0])
    return {b: torch.cat(v) for b, v in out.items()}
