"""Learning-free aggregation over the states of each image (docs/method.md, "Aggregation").

* ``mean``: the plain average;
* ``entropy``: ``w_s = (1 - H(p_s) / log K) / Z``, so confident states weigh more.
  NaN-safe: ``0 * log 0`` counts as 0, non-finite logits get weight 0, and an image
  whose weights are all 0 (every valid state uniform) falls back to equal weights over
  its valid states. The weights of every image sum to 1: an image with no valid state
  at all (every state non-finite or masked) gets equal weights over its unmasked states, so
  its aggregate is as non-finite as its inputs instead of a silent 0.
"""

from __future__ import annotations

import math

import torch

from undiscard.errors import InputError

__all__ = ["entropy", "entropy_weights", "weighted_mean"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Predictive entropy in nats over the last axis: ``(..., K) -> (...)`` (NaN-safe).

    ``0 * log 0`` counts as 0, so a class of probability 0 (a ``-inf`` logit) adds nothing.

    Shape:
        - logits: ``(..., K)``, any leading shape.
        - output: ``(...)``, the dtype of ``logits``, float32 for half-precision logits
          (computed in float64: under autocast the entropies that rank states keep their digits).

    Example:
        >>> h = entropy(torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -float("inf"), -float("inf"), -float("inf")]]))
        >>> h.shape, torch.allclose(h, torch.tensor([math.log(4), 0.0]))
        (torch.Size([2]), True)
    """
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    h = -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1)
    return h.to(_score_dtype(logits.dtype))


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or wider: scores of half-precision logits are not rounded back to half precision."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def entropy_weights(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Weights ``(N, B)`` for ``B`` states' logits ``(N, B, K)``, summing to 1 per image.

    Args:
        logits: ``(N, B, K)``.
        mask: optional ``(N, B)`` bool, False for padding states (weight 0).

    Shape:
        - logits: ``(N, B, K)``.
        - mask: ``(N, B)`` bool, or ``None``.
        - output: ``(N, B)``, every row summing to 1 (see the module docstring for
          non-finite and masked states); float32 for half-precision logits.

    Example:
        >>> w = entropy_weights(torch.tensor([[[4.0, 0.0], [0.0, 0.0], [float("nan"), 0.0]]]))
        >>> w.sum().item(), w[0, 1].item(), w[0, 2].item()
        (1.0, 0.0, 0.0)
        >>> entropy_weights(torch.full((1, 2, 3), float("nan"))).tolist()
        [[0.5, 0.5]]
    """
    if logits.dim() != 3:
        raise InputError(f"logits must be (N, B, K); got {tuple(logits.shape)}")
    k = logits.shape[-1]
    finite = torch.isfinite(logits).all(-1)
    safe = torch.where(finite[..., None], logits, torch.zeros_like(logits))
    w = (1 - entropy(safe).double() / math.log(k)).clamp_min(0) if k > 1 else torch.ones(finite.shape, dtype=torch.double)
    valid = finite if mask is None else finite & mask
    w = torch.where(valid, w, torch.zeros_like(w))
    z = w.sum(1, keepdim=True)
    # equal weights over the valid states; where none is valid, over the unmasked ones (all if none)
    fallback = torch.ones_like(valid) if mask is None else mask.to(torch.bool)
    fallback = torch.where(fallback.any(1, keepdim=True), fallback, torch.ones_like(valid))
    pool = torch.where(valid.any(1, keepdim=True), valid, fallback)
    uniform = pool.double() / pool.double().sum(1, keepdim=True).clamp_min(1)
    return torch.where(z > 0, w / z.clamp_min(1e-300), uniform).to(_score_dtype(logits.dtype))


def weighted_mean(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, B, *F) -> (N, *F)``: the mean over states, or the ``(N, B)``-weighted sum.

    A state of weight 0 adds exactly nothing, even where its values are not finite.

    Shape:
        - x: ``(N, B, *F)``, any trailing shape ``F``.
        - weights: ``(N, B)`` (e.g. from :func:`entropy_weights`), or ``None`` for the mean.
        - output: ``(N, *F)``.

    Example:
        >>> x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # N = 1, B = 2, F = (2,)
        >>> weighted_mean(x).tolist(), weighted_mean(x, torch.tensor([[0.25, 0.75]])).tolist()
        ([[2.0, 3.0]], [[2.5, 3.5]])
        >>> weighted_mean(torch.tensor([[[1.0], [float("nan")]]]), torch.tensor([[1.0, 0.0]])).tolist()
        [[1.0]]
    """
    if weights is None:
        return x.mean(1)
    w = weights.reshape(*weights.shape, *([1] * (x.dim() - 2))).to(x.dtype)
    return torch.where(w > 0, x * w, torch.zeros_like(x)).sum(1)  # a 0-weight state may be non-finite
