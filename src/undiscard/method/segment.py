"""The method for dense prediction (docs/method.md, "Segmentation"): search, align at input resolution, aggregate.

:func:`wrap_segmentation` turns a segmentation network into a drop-in ``nn.Module`` that
returns ``(N, K, H, W)`` scores at INPUT resolution. For each image it searches
``budget`` offset states of the encoder's subsampling sites (greedy best-first, batched
over the images, the same search as classification), and for each state:

1. the model's dense logits are upsampled to the input size (bilinear,
   ``align_corners=False``, as torchvision and MMSegmentation do; a model that already
   returns input-size logits is not touched);
2. they are shifted by ``+Delta(s)`` pixels (the inverse of the roll that state ``s``
   sees, docs/method.md "Displacement"), an exact integer shift: ``out[i, j] = p[i - Delta_h, j - Delta_w]``.

**Border fill.** A state with ``Delta > 0`` has no prediction for the first ``Delta_h``
rows and ``Delta_w`` columns after the shift. Those pixels are *excluded* for that state
(a per-state validity mask, ``fill="mask"``, the default): they take no part in its
search score nor in the aggregate. The default state (``Delta = 0``) covers every pixel,
so every pixel is predicted by at least one state. ``fill="circular"`` wraps around
instead (exact for circular-padded networks, which is how the tests pin the shift down).

Aggregation over the valid states of each pixel: ``mean`` of probabilities, or
``entropy`` weights ``w_s = 1 - H(p_s)/log K`` per pixel, normalised over the valid
states (NaN-safe: non-finite logits get weight 0; a pixel whose weights are all 0 falls
back to equal weights). The search criterion ``entropy`` is the mean pixel entropy of
the state's aligned prediction over its valid pixels, lower first; ``random`` and
``displacement`` work as for classification.

**What comes back.** ``budget=1`` returns exactly the plain model's logits, upsampled to
the input size. ``budget > 1`` returns the log of the aggregated probabilities: valid
logits (their softmax is the aggregated prediction, their argmax the label map),
computed in log space (a logsumexp over the states), so finite wherever the model's
logits are: a class whose probability underflows to 0 in every state keeps its
log-probability rather than ``log 0 = -inf``.

**Networks that carry encoder features across sites** (U-Net, FPN, DeepLabV3+,
SegFormer's all-stage head): the shared-prefix engine detects the crossing and the
states run as one batched forward each (per-sample offsets in one op), with the same
results (tested). In such a network only the maps after a site move with its offset;
the skips from before it do not, so the decoder would fuse maps on different grids and
the output would follow no single ``Delta``. With ``align_skips=True`` (default) every
map is tagged with the searched sites behind it, and where a decoder op fuses maps of
the same size from different depths, the deeper ones are first shifted by the
difference of their displacements (in cells of that map; linear interpolation for a
fractional cell, edge values repeated at the border). The fused map, and the output,
then sit on the shallowest input's grid and are shifted by that grid's ``Delta`` (0 for
SegFormer, whose finest stage is before every searched site). ``align_skips=False``
fuses the maps as they come and shifts the output by the full ``Delta`` (the paper's
reading); on the shipped SegFormer that loses several mIoU points (docs/segmentation.md).

    >>> seg = wrap_segmentation(model, budget=4, aggregate="entropy")  # doctest: +SKIP
    >>> scores = seg(x)                                                 # doctest: +SKIP
    >>> labels = scores.argmax(1)                                       # doctest: +SKIP
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from undiscard.run.engine import use_states
from undiscard.method.align import shift_cells
from undiscard.method.base import StateWrapper
from undiscard.errors import InputError, StateError, UndiscardError
from undiscard.run.inputs import check_batch, check_dtype, check_eval_mode
from undiscard.method.options import check_choice
from undiscard.method.search import greedy_search, image_seeds
from undiscard.sites.sitemap import SiteMap
from undiscard.run.dispatch import CallMatcher, tensors_in
from undiscard.run.trie import SharedPrefixEvaluator

__all__ = [
    "SEG_AGGREGATES",
    "SEG_CRITERIA",
    "SEG_FILLS",
    "DenseSearched",
    "SegDetails",
    "SegmentationUndiscard",
    "aggregate_dense",
    "align_dense",
    "dense_forward",
    "dense_logits",
    "upsample_logits",
    "wrap_segmentation",
]

SEG_AGGREGATES = ("mean", "entropy")
SEG_CRITERIA = ("entropy", "random", "displacement")
SEG_FILLS = ("mask", "circular")


# --------------------------------------------------------------------- running the model

def _takes_pixel_values(model: nn.Module) -> bool:
    """A transformers vision model (``model(pixel_values=...)``)."""
    return getattr(model, "main_input_name", None) == "pixel_values" and hasattr(model, "config")


def _auto_output(ret: Any) -> torch.Tensor:
    if isinstance(ret, torch.Tensor):
        return ret  # segmentation_models_pytorch, plain modules
    if isinstance(ret, Mapping) and "out" in ret:
        return ret["out"]  # torchvision: {"out": ..., "aux": ...}
    logits = getattr(ret, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits  # transformers: SemanticSegmenterOutput
    if isinstance(ret, (tuple, list)) and ret and isinstance(ret[0], torch.Tensor):
        return ret[0]  # transformers with return_dict=False
    raise UndiscardError(
        f"cannot find the dense logits in the model's output of type {type(ret).__name__}: expected a tensor, a "
        "dict with 'out' (torchvision), an object with .logits (transformers) or a tuple starting with the logits. "
        "Pass output=callable(model_output) -> (N, K, h, w) logits."
    )


def dense_forward(model: nn.Module, output: Callable[[Any], torch.Tensor] | None = None, *,
                  same_batch: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (N, C, H, W) -> logits (N, K, h, w)`` at the model's own output resolution.

    Calls ``model(pixel_values=x)`` for a transformers model and ``model(x)`` otherwise;
    ``output`` picks the logits from what the model returns (default: detected, see
    :func:`wrap_segmentation`). ``same_batch=False`` for the shared-prefix engine, whose
    batch grows (and starts empty when every request resumes from cached activations)
    inside the forward: it checks the output's rows itself.

    Shape:
        - x: ``(N, C, H, W)``.
        - output: ``(N, K, h, w)`` logits at the model's own resolution (with
          ``same_batch=False`` their row count is not checked against ``N``).
    """
    pick = _auto_output if output is None else output
    kw = _takes_pixel_values(model)

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = pick(model(pixel_values=x) if kw else model(x))
        if not isinstance(y, torch.Tensor) or y.dim() != 4 or (same_batch and y.shape[0] != x.shape[0]):
            raise UndiscardError(
                f"dense logits must be (N, K, h, w) with N = {x.shape[0]}; the model's output gave "
                f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}. Pass output= to pick them."
            )
        return y

    return forward


def upsample_logits(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, K, h, w) -> (N, K, H, W)``: bilinear, ``align_corners=False``; untouched at equal size.

    Shape:
        - y: ``(N, K, h, w)``.
        - size: ``(H, W)``.
        - output: ``(N, K, H, W)``; ``y`` itself when ``(h, w) == (H, W)``.

    Example:
        >>> upsample_logits(torch.zeros(2, 3, 4, 4), (8, 8)).shape
        torch.Size([2, 3, 8, 8])
        >>> y = torch.zeros(1, 3, 8, 8)
        >>> upsample_logits(y, (8, 8)) is y
        True
    """
    if tuple(y.shape[-2:]) == tuple(size):
        return y
    return F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)


def _check_input(x: Any) -> None:
    check_batch(x, 2)
    if not x.is_floating_point():
        raise InputError(f"expected a floating-point image tensor (normalised); got dtype {x.dtype}")


@torch.no_grad()
def dense_logits(model: nn.Module, x: torch.Tensor, output: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The plain model's logits at input resolution, ``(N, C, H, W) -> (N, K, H, W)``.

    Upsampled with :func:`upsample_logits` when the model returns them smaller
    (SegFormer: 1/4); exactly the model's own output when it is already input-sized.

    Shape:
        - x: ``(N, C, H, W)``, floating point.
        - output: ``(N, K, H, W)``.

    Example:
        >>> dense_logits(nn.Conv2d(1, 3, 3, stride=2, padding=1), torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """
    _check_input(x)
    return upsample_logits(dense_forward(model, output)(x), x.shape[-2:])


# --------------------------------------------------------------------- alignment and aggregation

def align_dense(y: torch.Tensor, delta_px: torch.Tensor, fill: str = "mask") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shift each map by ``+delta_px`` pixels: ``out[..., i, j] = y[..., i - dh, j - dw]``.

    Args:
        y: ``(M, K, H, W)`` input-resolution maps of states with displacements ``delta_px``.
        delta_px: ``(M, 2)`` integer pixels (:meth:`SiteMap.displacement`).
        fill: ``"mask"``: pixels with no source are set to 0 and reported invalid;
            ``"circular"``: wrap around (every pixel valid).

    Returns:
        ``(shifted (M, K, H, W), valid (M, 1, H, W) bool or None when every pixel is valid)``.

    Shape:
        - y: ``(M, K, H, W)`` (any axes between ``M`` and the last two).
        - delta_px: ``(M, 2)``.
        - output: ``(M, K, H, W)`` and ``(M, 1, H, W)`` bool (or ``None``: no displacement,
          or ``fill="circular"``).

    Example:
        >>> y = torch.arange(1.0, 5.0).reshape(1, 1, 1, 4)
        >>> out, valid = align_dense(y, torch.tensor([[0, 1]]))
        >>> out.tolist(), valid.tolist()
        ([[[[0.0, 1.0, 2.0, 3.0]]]], [[[[False, True, True, True]]]])
        >>> align_dense(y, torch.tensor([[0, 1]]), "circular")[0].tolist()
        [[[[4.0, 1.0, 2.0, 3.0]]]]
        >>> align_dense(y, torch.zeros(1, 2, dtype=torch.long))[1] is None
        True
    """
    if fill not in SEG_FILLS:
        check_choice("fill", fill, SEG_FILLS)
    if delta_px.shape != (y.shape[0], 2):
        raise InputError(f"delta_px must be (M, 2) for maps {tuple(y.shape)}; got {tuple(delta_px.shape)}")
    if not bool(delta_px.any()):
        return y, None
    h, w = y.shape[-2:]
    out = y.clone() if fill == "circular" else torch.zeros_like(y)
    valid = None if fill == "circular" else torch.zeros(y.shape[0], 1, h, w, dtype=torch.bool, device=y.device)
    # one slice copy (or roll) per distinct displacement: at most the number of states, no gather
    pairs, inverse = torch.unique(delta_px.long().cpu(), dim=0, return_inverse=True)
    for g, (dh, dw) in enumerate(pairs.tolist()):
        idx = (inverse == g).nonzero().flatten().to(y.device)
        part = y.index_select(0, idx)
        if fill == "circular":
            out.index_copy_(0, idx, torch.roll(part, (dh, dw), (-2, -1)))
            continue
        if abs(dh) >= h or abs(dw) >= w:
            continue  # nothing of this map lands inside
        src = part[..., max(0, -dh) : h - max(0, dh), max(0, -dw) : w - max(0, dw)]
        shifted = torch.zeros_like(part)
        shifted[..., max(0, dh) : h - max(0, -dh), max(0, dw) : w - max(0, -dw)] = src
        out.index_copy_(0, idx, shifted)
        v = torch.zeros(idx.numel(), 1, h, w, dtype=torch.bool, device=y.device)
        v[..., max(0, dh) : h - max(0, -dh), max(0, dw) : w - max(0, -dw)] = True
        valid.index_copy_(0, idx, v)
    return out, valid


def _log_probs(y: torch.Tensor, size: tuple[int, int], delta: torch.Tensor, fill: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Native logits ``(M, K, h, w)`` -> aligned log-probabilities and validity ``(M, 1, H, W)``."""
    y = upsample_logits(y, size)
    logp = torch.log_softmax(y.float() if y.dtype in (torch.float16, torch.bfloat16) else y, dim=1)
    logp, valid = align_dense(logp, delta, fill)
    if valid is None:
        valid = torch.ones(logp.shape[0], 1, *logp.shape[-2:], dtype=torch.bool, device=logp.device)
    return logp, valid


def _pixel_entropy(logp: torch.Tensor) -> torch.Tensor:
    """``(M, K, H, W)`` log-probabilities -> ``(M, H, W)`` entropy in nats (``0 log 0 = 0``)."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(1)


def mean_pixel_entropy(logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(M,)`` mean entropy over each map's valid pixels (the search criterion)."""
    h = _pixel_entropy(logp)
    v = valid[:, 0].to(h.dtype)
    h = torch.where(valid[:, 0], h, torch.zeros_like(h))
    return h.flatten(1).sum(1) / v.flatten(1).sum(1).clamp_min(1)


def _probs_and_entropy(y: torch.Tensor, size: tuple[int, int], *, logp_out: torch.Tensor | None = None,
                       p_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Native logits ``(M, K, h, w)`` -> probabilities ``(M, K, H, W)`` and per-pixel entropy ``(M, H, W)``
    at input resolution, NOT shifted.

    The shift only moves pixels, so each pixel's values are those :func:`_log_probs` +
    :func:`_pixel_entropy` give after it; computing them once per state before the shift
    serves both the search score and the aggregation. The entropy is formed in place on
    the log-probabilities (``0 log 0 = 0``: a zero probability gives ``-0.0`` or NaN there,
    both counted as 0, exactly as ``where(p > 0, p log p, 0)``). ``logp_out`` (scratch) and
    ``p_out``: flat buffers of at least ``M K H W`` elements to write into.
    """
    y = upsample_logits(y, size)
    y = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
    shape = y.shape
    logp = (torch.log_softmax(y, 1) if logp_out is None
            else torch.log_softmax(y, 1, out=logp_out[: y.numel()].view(shape)))
    p = logp.exp() if p_out is None else torch.exp(logp, out=p_out[: y.numel()].view(shape))
    h = logp.mul_(p).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(1).neg_()
    return p, h


class _Workspace:
    """Flat buffers reused from one search to the next: at these sizes, fresh memory costs
    as much in page faults as the arithmetic done on it."""

    def __init__(self, keep: int = 2) -> None:
        self.free: list[torch.Tensor] = []
        self.keep = keep

    def take(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        fits = [i for i, b in enumerate(self.free)
                if b.numel() >= numel and b.dtype == like.dtype and b.device == like.device]
        if fits:
            return self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        return torch.empty(numel, dtype=like.dtype, device=like.device)

    def give(self, buf: torch.Tensor) -> None:
        self.free.append(buf)
        self.free.sort(key=lambda b: b.numel(), reverse=True)
        del self.free[self.keep :]


def _mean_over_valid(h: torch.Tensor, delta: torch.Tensor, fill: str) -> torch.Tensor:
    """``(M,)`` mean of unshifted per-pixel entropies ``(M, H, W)`` over each state's valid pixels
    after its shift (= :func:`mean_pixel_entropy` of the aligned prediction)."""
    al, valid = align_dense(h[:, None], delta, fill)
    count = (torch.full((h.shape[0],), float(h[0].numel()), dtype=h.dtype, device=h.device) if valid is None
             else valid.flatten(1).to(h.dtype).sum(1))
    return al.flatten(1).sum(1) / count.clamp_min(1)


def _window(d: int, n: int) -> tuple[slice, slice] | None:
    """Destination and source slices of a shift by ``+d`` along an axis of length ``n`` (None: nothing lands)."""
    if abs(d) >= n:
        return None
    return slice(max(0, d), n - max(0, -d)), slice(max(0, -d), n - max(0, d))


def _aggregate_shifted(p_of: Callable[[int, int], torch.Tensor], h_of: Callable[[int, int], torch.Tensor],
                       delta: torch.Tensor, aggregate: str) -> torch.Tensor:
    """:func:`aggregate_dense` of ``align_dense(..., "mask")``-shifted states, without building them.

    ``p_of(i, b)`` / ``h_of(i, b)``: unshifted probabilities ``(K, H, W)`` (finite) and per-pixel
    entropy ``(H, W)`` of image ``i``'s state ``b``; ``delta`` ``(m, b, 2)``. Each state's shifted
    probabilities (times its weight) are added onto the window it covers, states in order:
    the same sums as ``(p * w).sum(1)`` over the zero-filled aligned maps (a state adds
    nothing where it is invalid), so the same result.
    """
    m, b = delta.shape[:2]
    p0 = p_of(0, 0)
    k, hh, ww = p0.shape
    wins = [[(_window(dh, hh), _window(dw, ww)) for dh, dw in row] for row in delta.tolist()]
    valid = torch.zeros(m, b, 1, hh, ww, dtype=torch.bool, device=p0.device)
    for i in range(m):
        for j in range(b):
            (wh, ww_) = wins[i][j]
            if wh is not None and ww_ is not None:
                valid[i, j, :, wh[0], ww_[0]] = True
    if aggregate == "entropy" and k > 1:
        hal = torch.zeros(m, b, 1, hh, ww, dtype=p0.dtype, device=p0.device)
        for i in range(m):
            for j in range(b):
                (wh, ww_) = wins[i][j]
                if wh is not None and ww_ is not None:
                    hal[i, j, 0, wh[0], ww_[0]] = h_of(i, j)[wh[1], ww_[1]]
        w = torch.where(valid, (1 - hal / math.log(k)).clamp_min(0), torch.zeros_like(hal))
        w = torch.where(w.sum(1, keepdim=True) > 0, w, valid.to(w.dtype))
    else:
        w = None
    acc = torch.zeros(m, k, hh, ww, dtype=p0.dtype, device=p0.device)
    for i in range(m):
        for j in range(b):
            (wh, ww_) = wins[i][j]
            if wh is None or ww_ is None:
                continue
            src = p_of(i, j)[:, wh[1], ww_[1]]
            dst = acc[i, :, wh[0], ww_[0]]
            dst += src if w is None else src * w[i, j, :, wh[0], ww_[0]]
    z = (valid.to(p0.dtype) if w is None else w).sum(1)
    if bool((z <= 0).any()):
        raise UndiscardError("a pixel has no valid state to aggregate (the default state must cover every pixel)")
    return acc.div_(z).log_()


def aggregate_dense(logp: torch.Tensor, valid: torch.Tensor, aggregate: str = "mean") -> torch.Tensor:
    """Aggregate ``B`` aligned states per pixel: ``(N, B, K, H, W)`` -> ``(N, K, H, W)`` log-probabilities.

    Args:
        logp: aligned log-probabilities of each state.
        valid: ``(N, B, 1, H, W)`` bool, False where a state has no prediction (border).
        aggregate: ``"mean"`` (of probabilities over the valid states) or ``"entropy"``
            (``w = 1 - H/log K`` per pixel, normalised over the valid states; NaN-safe).

    Every pixel needs at least one valid state (the default state always is).

    Shape:
        - logp: ``(N, B, K, H, W)``.
        - valid: ``(N, B, 1, H, W)`` bool.
        - output: ``(N, K, H, W)`` log-probabilities.

    Example:
        One pixel, two states: a sure one and a uniform one.

        >>> logp = torch.tensor([[[[[1.0]], [[0.0]]], [[[0.5]], [[0.5]]]]]).log()  # (1, 2, 2, 1, 1)
        >>> valid = torch.ones(1, 2, 1, 1, 1, dtype=torch.bool)
        >>> p = aggregate_dense(logp, valid).exp()
        >>> p.shape, torch.allclose(p.flatten(), torch.tensor([0.75, 0.25]))
        (torch.Size([1, 2, 1, 1]), True)
        >>> torch.allclose(aggregate_dense(logp, valid, "entropy").exp().flatten(), torch.tensor([1.0, 0.0]))
        True
    """
    if aggregate not in SEG_AGGREGATES:
        check_choice("aggregate", aggregate, SEG_AGGREGATES)
    k = logp.shape[2]
    # log-probabilities may be -inf (probability 0); NaN or +inf come from non-finite logits
    ok = valid & ~(torch.isnan(logp) | (logp == float("inf"))).any(2, keepdim=True)
    p = torch.where(ok, logp.exp(), torch.zeros_like(logp))
    if aggregate == "entropy" and k > 1:
        h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(2, keepdim=True)
        w = torch.where(ok, (1 - h / math.log(k)).clamp_min(0), torch.zeros_like(h))
        w = torch.where(w.sum(1, keepdim=True) > 0, w, ok.to(w.dtype))  # all uniform: equal weights over the valid
    else:
        w = ok.to(p.dtype)
    z = w.sum(1)
    if bool((z <= 0).any()):
        raise UndiscardError("a pixel has no valid state to aggregate (the default state must cover every pixel)")
    # log(sum_b w_b p_b / z) in log space: a class whose probability underflows in every
    # state keeps a finite log-probability instead of log(0) = -inf
    terms = torch.where(ok & (w > 0), logp + w.log(), torch.full_like(logp, float("-inf")))
    return torch.logsumexp(terms, 1) - z.log()


# --------------------------------------------------------------------- skips that cross sites

_LEVEL = "_undiscard_seg_level"


def level_displacements(sites: SiteMap, states: torch.Tensor) -> torch.Tensor:
    """``(L + 1, M, 2)``: displacement in pixels of the features after each searchable site.

    Row ``0`` is the input (0); row ``j + 1`` sums ``s_l * P_l`` over the searchable
    sites ``l <= j`` (side sites move nothing). Row ``L`` is :meth:`SiteMap.displacement`.
    """
    st = sites.encode(states)
    st = st[None] if st.dim() == 1 else st
    out = [torch.zeros(st.shape[0], 2, dtype=torch.long)]
    for j in range(st.shape[1]):
        part = st.clone()
        part[:, j + 1 :] = 0
        out.append(sites.displacement(part))
    return torch.stack(out)


class _SkipAlignMode(TorchFunctionMode):
    """Aligns encoder features that meet across searchable sites (U-Net / FPN / SegFormer skips).

    Every tensor is tagged with the number of searchable sites behind it (its *level*):
    its grid is displaced by ``level_displacements[level]`` pixels. When one op takes 4-d
    maps of different levels with the same spatial size (a ``cat`` or ``add`` in a
    decoder), the deeper ones are shifted by ``+(Delta_deep - Delta_shallow)`` pixels,
    converted to cells of that map (linear interpolation for a fractional cell, edge
    values repeated at the border), before the op runs: the decoder then fuses maps on
    one grid, the shallowest one's. The output's level says how far it is still
    displaced (0 for SegFormer's head, whose finest input is before every searched site).

    Runs inside :func:`undiscard.use_states` with one state per row (the batch axis).
    """

    def __init__(self, sites: SiteMap, states: torch.Tensor, input_hw: tuple[int, int]) -> None:
        super().__init__()
        self.sites, self.deltas, self.input_hw = sites, level_displacements(sites, states), input_hw
        self.level = {si: j + 1 for j, si in enumerate(sites.searchable)}
        self.matcher = CallMatcher(sites) if sites.calls else None
        self.merges = 0  # merges that needed a shift

    def tag(self, t: Any, level: int) -> None:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _LEVEL, level)
            except (AttributeError, RuntimeError):
                pass
        elif isinstance(t, (list, tuple)):
            for v in t:
                self.tag(v, level)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = [t for t in tensors_in((args, kwargs)) if hasattr(t, _LEVEL)]
        levels = {getattr(t, _LEVEL) for t in found}
        new_level = max(levels) if levels else None
        match = self.matcher.site_of(func, args, kwargs) if self.matcher is not None else None
        site_level = self.level.get(match[1]) if match is not None else None
        if len(levels) > 1:
            args, kwargs, new_level = self._align(found, args, kwargs)
        out = func(*args, **kwargs)
        if site_level is not None:
            new_level = site_level
        if new_level is not None:
            self.tag(out, new_level)
        return out

    def _align(self, found: list[torch.Tensor], args, kwargs):
        maps = [t for t in found if t.dim() == 4 and t.shape[0] == self.deltas.shape[1]]
        if len({getattr(t, _LEVEL) for t in maps}) < 2:
            return args, kwargs, max(getattr(t, _LEVEL) for t in found)
        ref = min(maps, key=lambda t: getattr(t, _LEVEL))
        low = getattr(ref, _LEVEL)
        swap: dict[int, torch.Tensor] = {}
        for t in maps:
            lvl = getattr(t, _LEVEL)
            if lvl == low or t.shape[-2:] != ref.shape[-2:]:
                continue
            rel = (self.deltas[lvl] - self.deltas[low]).double()
            if not bool(rel.any()):
                continue
            cells = rel * torch.tensor([t.shape[-2] / self.input_hw[0], t.shape[-1] / self.input_hw[1]], dtype=torch.float64)
            shifted = shift_cells(t, cells, "border")
            setattr(shifted, _LEVEL, low)
            swap[id(t)] = shifted
            self.merges += 1
        args, kwargs = tree_map(lambda v: swap.get(id(v), v) if isinstance(v, torch.Tensor) else v, (args, kwargs))
        same = all(t.shape[-2:] == ref.shape[-2:] for t in maps)
        return args, kwargs, low if same else max(getattr(t, _LEVEL) for t in found)


# --------------------------------------------------------------------- search output

class _LazyField:
    """A dataclass field that may be given as a :class:`_Deferred` and is built on first read.

    The search keeps each step's raw logits as the engine returned them; stacking them
    into ``(N, B, K, h, w)`` costs a copy of every state's logits, done only if someone
    reads ``logits``. Assigning the field after construction drops the search's cache.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}_value"

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            raise AttributeError  # no default value for the dataclass field
        v = obj.__dict__[self.slot]
        if isinstance(v, _Deferred):
            v = obj.__dict__[self.slot] = v.build()
        return v

    def __set__(self, obj: Any, value: Any) -> None:
        if self.slot in obj.__dict__:
            obj.__dict__["_store"] = None  # new logits: what the search derived from the old ones is stale
        obj.__dict__[self.slot] = value


class _Deferred:
    def __init__(self, build: Callable[[], Any]) -> None:
        self.build = build


class _StepStore:
    """Per search step: the engine's raw logits and, derived once per state, its unshifted
    probabilities and per-pixel entropy at input resolution (:func:`_probs_and_entropy`).

    ``evaluate`` hands the search row ids instead of logits (the search then stacks ids,
    not maps); :meth:`index` maps ``(image, b)`` to ``(step, row)``.
    """

    def __init__(self, size: tuple[int, int], states: int, cache_bytes: int, workspace: _Workspace | None = None) -> None:
        self.size, self.states, self.cache_bytes = size, states, cache_bytes
        self.workspace = workspace
        self.keep_probs = False  # decided at the first step, when the number of classes is known
        self.y: list[torch.Tensor] = []
        self.p: list[torch.Tensor | None] = []
        self.h: list[torch.Tensor | None] = []  # per-pixel entropy, for the search score
        self.ha: list[torch.Tensor | None] = []  # the same for the aggregation (see derive)
        self.start: list[int] = []
        self.rows = 0
        self.finite = True  # every kept probability finite (no NaN / inf logits)
        self.where: torch.Tensor | None = None  # (N, B, 2) step and row of each searched state
        self.pbuf: torch.Tensor | None = None  # the kept probabilities of every state, flat
        self.scratch: torch.Tensor | None = None  # log-probabilities of one step, flat

    def _buffer(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        if self.workspace is None:
            return torch.empty(numel, dtype=like.dtype, device=like.device)
        buf = self.workspace.take(numel, like)
        weakref.finalize(self, self.workspace.give, buf)  # back to the workspace when this search is dropped
        return buf

    def add(self, y: torch.Tensor) -> torch.Tensor:
        if not self.y:
            like = torch.empty(0, dtype=torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype,
                               device=y.device)
            row = y.shape[1] * self.size[0] * self.size[1]
            self.keep_probs = self.states * row * like.element_size() <= self.cache_bytes
            self.scratch = self._buffer(y.shape[0] * row, like)
            if self.keep_probs:
                self.pbuf = self._buffer(self.states * row, like)
        self.start.append(self.rows)
        self.y.append(y)
        self.p.append(None)
        self.h.append(None)
        self.ha.append(None)
        ids = torch.arange(self.rows, self.rows + y.shape[0])
        self.rows += y.shape[0]
        return ids

    def step_of(self, ids: torch.Tensor) -> int:
        t = len(self.start) - 1
        while t > 0 and self.start[t] > int(ids[0]):
            t -= 1
        return t

    def derive(self, t: int) -> torch.Tensor:
        """The per-pixel entropy of step ``t`` for the search score (computed once; the
        probabilities and entropy for the aggregation kept if asked)."""
        if self.h[t] is None:
            y = self.y[t]
            numel = y.shape[0] * y.shape[1] * self.size[0] * self.size[1]
            scratch = self.scratch if self.scratch is not None and self.scratch.numel() >= numel else None
            pout = None
            if self.keep_probs:
                row = numel // y.shape[0]
                pout = self.pbuf[self.start[t] * row : self.start[t] * row + numel]
            if self.keep_probs and not y.is_contiguous():
                # Logits in another memory layout (SegFormer's are channels-last) round differently
                # in the upsampling than their contiguous copy. The search has always scored the
                # layout the model returned and aggregated the contiguous stacked logits: both
                # kept, so that results do not move.
                _, self.h[t] = _probs_and_entropy(y, self.size, logp_out=scratch)
                p, self.ha[t] = _probs_and_entropy(y.contiguous(), self.size, logp_out=scratch, p_out=pout)
            else:
                p, self.h[t] = _probs_and_entropy(y, self.size, logp_out=scratch, p_out=pout)
                self.ha[t] = self.h[t]
            if self.keep_probs:
                self.finite = self.finite and bool(torch.isfinite(p.sum()))
                self.p[t] = p
        return self.h[t]

    def index(self, ids: torch.Tensor) -> None:
        starts = torch.tensor(self.start, dtype=torch.long)
        step = torch.searchsorted(starts, ids, right=True) - 1
        self.where = torch.stack([step, ids - starts[step]], -1)

    def stack(self, ids: torch.Tensor) -> torch.Tensor:
        """``(N, B, K, h, w)`` raw logits of the searched states (one copy)."""
        n, b = ids.shape
        y0 = self.y[0]
        out = y0.new_empty((n * b, *y0.shape[1:]))
        pos = torch.empty(self.rows, dtype=torch.long)
        pos[ids.flatten()] = torch.arange(n * b)
        for t, y in enumerate(self.y):
            out.index_copy_(0, pos[self.start[t] : self.start[t] + y.shape[0]].to(out.device), y)
        return out.view(n, b, *y0.shape[1:])

    def first(self, n: int) -> torch.Tensor | None:
        """The default states' logits ``(N, K, h, w)`` when the first step holds exactly them, in order."""
        w = self.where
        if w is not None and bool((w[:, 0, 0] == 0).all()) and torch.equal(w[:, 0, 1], torch.arange(n)) \
                and self.y[0].shape[0] == n:
            return self.y[0]
        return None


@dataclass
class DenseSearched:
    """What the search found for a batch, in evaluation order (``states[:, 0]`` is the default).

    Attributes:
        states: ``(N, B, L)`` flat offset indices.
        logits: ``(N, B, K, h, w)`` each state's raw logits at the model's output resolution
            (built on first read when the search made it).
        delta: ``(N, B, 2)`` displacement in input pixels.
        entropy: ``(N, B)`` mean pixel entropy of each state's aligned prediction (valid pixels).
        size: the input ``(H, W)``.
    """

    states: torch.Tensor
    logits: torch.Tensor = _LazyField()  # type: ignore[assignment]
    delta: torch.Tensor
    entropy: torch.Tensor
    size: tuple[int, int]
    _store: _StepStore | None = field(default=None, init=False, repr=False, compare=False)


@dataclass
class SegDetails:
    """Returned with the scores when ``return_details=True``.

    ``states`` ``(N, B, L)`` the evaluated states (default first), ``delta`` ``(N, B, 2)``
    their displacement in pixels, ``entropy`` ``(N, B)`` their mean pixel entropy,
    ``sites`` the :class:`SiteMap` searched, ``engine``: ``"trie"``, ``"rerun"``,
    ``"rerun (fallback)"`` when the model crosses sites, or ``"plain"`` when no search ran
    (``budget=1`` or an empty batch; ``entropy`` is then NaN).
    """

    states: torch.Tensor
    delta: torch.Tensor
    entropy: torch.Tensor
    sites: SiteMap
    engine: str


# --------------------------------------------------------------------- the module

class SegmentationUndiscard(StateWrapper):
    """A segmentation network that aggregates ``budget`` searched offset states (see :func:`wrap_segmentation`).

    ``cache_bytes``: a search keeps every state's input-resolution probabilities for
    :meth:`combine` when they take at most this much memory (else combine recomputes
    them from the logits; same results).
    """

    cache_bytes: int = 1 << 30
    criteria, aggregates, fills, task_note = SEG_CRITERIA, SEG_AGGREGATES, SEG_FILLS, " for segmentation"

    def __init__(
        self,
        model: nn.Module,
        budget: int = 4,
        criterion: str = "entropy",
        aggregate: str = "mean",
        *,
        searchable: Any = "inner",
        max_batch: int = 64,
        engine: str = "trie",
        seed: int = 0,
        width: int | None = 1,
        output: Callable[[Any], torch.Tensor] | None = None,
        fill: str = "mask",
        align_skips: bool = True,
        return_details: bool = False,
    ) -> None:
        super().__init__(model, budget, criterion, aggregate, searchable=searchable, max_batch=max_batch,
                         engine=engine, seed=seed, width=width, fill=fill, return_details=return_details)
        if output is not None and not callable(output):
            raise UndiscardError(f"output must be a callable (model output -> logits) or None; got {type(output).__name__}")
        self.output = output
        self.align_skips = bool(align_skips)
        self.last_out_level: int | None = None  # levels (searchable sites) the last search's outputs moved with
        self.forward_logits = dense_forward(model, output)
        self.last_engine = engine  # what the last search ran on ("rerun (fallback)" when the trie could not share)
        self._workspace = _Workspace()
        self._crosses: set[tuple] = set()  # input sizes at which the model was seen to cross a searched site

    def check_input(self, x: Any) -> None:
        _check_input(x)

    def check_sites(self, x: torch.Tensor, sites: SiteMap) -> None:
        if len(sites.stride_total) != 2:
            raise InputError(f"dense prediction needs 2-d sites; this model's have {len(sites.stride_total)} spatial axes")

    # -- evaluation of states ------------------------------------------------
    def _evaluator(self, x: torch.Tensor, sites: SiteMap) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``evaluate(images (M,), states (M, L)) -> (M, K, h, w)`` raw logits, and the output's level.

        ``evaluate.out_level()``: how many searchable sites the output's grid moved with
        (``L`` unless aligned skips fused it onto a shallower grid), for the final shift.
        """
        fwd = self.forward_logits
        L = len(sites.searchable)
        rows = [0] * L
        box: dict[str, Any] = {"ev": None, "engine": self.engine, "level": L}
        size_key = tuple(x.shape[1:])
        if self.engine in ("trie", "segments") and size_key in self._crosses:
            # an earlier search at this size found a tensor crossing a searched site: the trie
            # cannot share on this model, so do not spend a first pass finding that out again
            box["engine"] = "rerun (fallback)"
        elif self.engine in ("trie", "segments"):
            # a dense forward picks the logits out of the model's output: it is not captured (one
            # CaptureWarning with engine="segments"; the intercepting engine runs it)
            box["ev"] = SharedPrefixEvaluator(self.model, x, sites, forward=dense_forward(self.model, self.output,
                                                                                         same_batch=False),
                                              max_batch=self.max_batch, capture=self.engine == "segments")

        def rerun(img: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            outs = []
            for s in range(0, img.numel(), self.max_batch):
                st = states[s : s + self.max_batch]
                with use_states(self.model, sites, st):
                    if self.align_skips:
                        xin = x[img[s : s + self.max_batch]]
                        setattr(xin, _LEVEL, 0)  # the input: before every searchable site
                        with _SkipAlignMode(sites, st, tuple(x.shape[-2:])):
                            y = fwd(xin)
                        box["level"] = getattr(y, _LEVEL, L)
                    else:
                        y = fwd(x[img[s : s + self.max_batch]])
                outs.append(y)
            for j in range(L):
                rows[j] += img.numel()
            return torch.cat(outs) if len(outs) > 1 else outs[0]

        def evaluate(img: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            ev = box["ev"]
            if ev is not None and ev.shared is False:
                # the model carries tensors across sites: run the states ourselves (same forwards
                # as the engine's fallback, plus the alignment of the skips)
                box["ev"], box["engine"], box["prior"] = None, "rerun (fallback)", list(ev.rows)
                ev = None
            if ev is not None:
                try:
                    out = ev(img, states)
                    if ev.shared is False:  # found out on this call; these states are the first (all default)
                        box["engine"] = "rerun (fallback)"
                    return out
                except UndiscardError:
                    raise
                except Exception:
                    if ev.shared is not None:  # the trie worked on this model before: a real error
                        raise
                    # An op failed on the trie's grown batch before any level mixing could be seen
                    # (a batch size read before a site and reused after it). The per-state forward
                    # below gives the same results; if the model fails there too, that error is the
                    # real one and propagates.
                    box["ev"], box["engine"] = None, "rerun (fallback)"
            return rerun(img, states)

        def finish() -> None:
            ev = box["ev"]
            if box["engine"] == "rerun (fallback)":
                self._crosses.add(size_key)
            prior = box.get("prior") or (ev.rows if ev is not None else [0] * L)
            self.last_rows = [a + b for a, b in zip(prior, rows)]
            self.last_engine = box["engine"]

        evaluate.finish = finish  # type: ignore[attr-defined]
        evaluate.out_level = lambda: box["level"]  # type: ignore[attr-defined]
        return evaluate

    # -- search --------------------------------------------------------------
    @torch.no_grad()
    def search(self, x: torch.Tensor, budget: int | None = None, criterion: str | None = None) -> DenseSearched:
        """Search ``budget`` states per image of ``x``; return their raw logits and displacements.

        Each state's input-resolution probabilities and per-pixel entropy are computed once,
        before its shift (the shift only moves pixels): the search scores them, and
        :meth:`combine` aggregates the kept probabilities of the same search without
        recomputing them (kept up to ``cache_bytes``).
        """
        budget = self.budget if budget is None else budget
        criterion = self.criterion if criterion is None else criterion
        check_choice("criterion", criterion, SEG_CRITERIA, what=" for segmentation")
        sites = self.sites_for(x)
        size = tuple(x.shape[-2:])
        evaluate = self._evaluator(x, sites)
        store = _StepStore(size, x.shape[0] * budget, self.cache_bytes if self.fill == "mask" else -1, self._workspace)

        def delta_of(states: torch.Tensor) -> torch.Tensor:
            return level_displacements(sites, states)[evaluate.out_level()]  # type: ignore[attr-defined]

        def run(img: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            return store.add(evaluate(img, states))

        def score(ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            return -_mean_over_valid(store.derive(store.step_of(ids)), delta_of(states), self.fill)

        res = greedy_search(run, x.shape[0], sites, budget, criterion, score=score, width=self.width,
                            seeds=image_seeds(x, self.seed))
        evaluate.finish()  # type: ignore[attr-defined]
        n, b = res.states.shape[:2]
        self.last_out_level = evaluate.out_level()  # type: ignore[attr-defined]
        ids = res.outputs
        store.index(ids)
        delta = delta_of(res.states.reshape(n * b, -1)).reshape(n, b, 2)
        if criterion == "entropy":
            h = (-res.scores).to(torch.float32)
        else:
            h = torch.empty(n, b)
            flat = ids.flatten()
            for t in range(len(store.y)):
                sel = ((flat >= store.start[t]) & (flat < store.start[t] + store.y[t].shape[0])).nonzero().flatten()
                rows = flat[sel] - store.start[t]
                store.derive(t)
                ent = store.ha[t].index_select(0, rows.to(store.y[t].device))  # as from the stacked logits
                h.view(-1)[sel] = _mean_over_valid(ent, delta.flatten(0, 1)[sel], self.fill).float().cpu()
        found = DenseSearched(res.states, _Deferred(lambda: store.stack(ids)), delta, h, size)  # type: ignore[arg-type]
        found._store = store
        return found

    # -- aggregation ---------------------------------------------------------
    def combine(self, found: DenseSearched, budget: int | None = None, aggregate: str | None = None,
                chunk: int = 8) -> torch.Tensor:
        """Aggregate the first ``budget`` searched states: ``(N, K, H, W)``.

        ``budget=1`` gives the default state's logits upsampled (the plain model); more
        give the log of the aggregated probabilities. ``chunk`` images are aggregated at
        a time (bounds the memory of the intermediates).
        """
        aggregate = self.aggregate if aggregate is None else aggregate
        check_choice("aggregate", aggregate, SEG_AGGREGATES, what=" for segmentation")
        b = found.states.shape[1] if budget is None else budget
        if not 1 <= b <= found.states.shape[1]:
            raise StateError(f"budget {b} is outside 1..{found.states.shape[1]} (the states this search found)")
        store = found.__dict__.get("_store")
        n = found.states.shape[0]
        if b == 1:
            y0 = store.first(n) if store is not None else None
            # the default states' logits, contiguous as in the stacked (N, B, ...) logits
            return upsample_logits(found.logits[:, 0] if y0 is None else y0.contiguous(), found.size)
        outs = []
        if store is not None and store.keep_probs and self.fill == "mask":
            for t in range(len(store.y)):
                store.derive(t)
            if store.finite:
                where = store.where.tolist()
                for s in range(0, n, chunk):
                    part = where[s : s + chunk]
                    out = _aggregate_shifted(lambda i, j: store.p[part[i][j][0]][part[i][j][1]],
                                             lambda i, j: store.ha[part[i][j][0]][part[i][j][1]],
                                             found.delta[s : s + chunk, :b], aggregate)
                    if not bool(torch.isfinite(out).all()):  # a probability underflowed in every state:
                        out = self._combine_dense(found, s, chunk, b, aggregate)  # redo in log space
                    outs.append(out)
                return torch.cat(outs)
        for s in range(0, n, chunk):
            outs.append(self._combine_dense(found, s, chunk, b, aggregate))
        return torch.cat(outs)

    def _combine_dense(self, found, s: int, chunk: int, b: int, aggregate: str) -> torch.Tensor:
        """:meth:`combine` of images ``s .. s + chunk`` from the stacked logits, in log space."""
        y = found.logits[s : s + chunk, :b]
        m = y.shape[0]
        logp, valid = _log_probs(y.flatten(0, 1), found.size, found.delta[s : s + chunk, :b].flatten(0, 1), self.fill)
        return aggregate_dense(logp.reshape(m, b, *logp.shape[1:]), valid.reshape(m, b, *valid.shape[1:]), aggregate)

    def forward(self, x: torch.Tensor) -> Any:
        check_eval_mode(self.model, what="wrap_segmentation(model, ...)")
        _check_input(x)
        check_dtype(self.model, x)
        if self.budget == 1 or x.shape[0] == 0:
            with torch.no_grad():
                out = upsample_logits(self.forward_logits(x), x.shape[-2:])
            if not self.return_details:
                return out
            n = x.shape[0]
            sites = self.sites_for(x if n else x.new_zeros((1, *x.shape[1:])))
            return out, SegDetails(sites.zero_state(n).reshape(n, 1, len(sites.searchable)),
                                   torch.zeros(n, 1, 2, dtype=torch.long),
                                   torch.full((n, 1), float("nan")), sites, "plain")
        found = self.search(x)
        out = self.combine(found)
        if self.return_details:
            return out, SegDetails(found.states, found.delta, found.entropy, self.sites_for(x), self.last_engine)
        return out


def wrap_segmentation(
    model: nn.Module,
    budget: int = 4,
    criterion: str = "entropy",
    aggregate: str = "mean",
    *,
    searchable: Any = "inner",
    max_batch: int = 64,
    engine: str = "trie",
    seed: int = 0,
    width: int | None = 1,
    output: Callable[[Any], torch.Tensor] | None = None,
    fill: str = "mask",
    align_skips: bool = True,
    return_details: bool = False,
) -> SegmentationUndiscard:
    """Wrap a segmentation network so that it aggregates ``budget`` searched offset states per image.

    Args:
        model: in eval mode: torchvision (``deeplabv3_*``, ``fcn_*``, ``lraspp_*``: a dict
            with ``"out"``), transformers (``SegformerForSemanticSegmentation``: called
            with ``pixel_values=``, ``.logits`` at 1/4 resolution), segmentation_models_pytorch
            (a tensor), or any module returning ``(N, K, h, w)`` logits.
        budget: states evaluated per image, the default included (1 = the plain model).
        criterion: ``entropy`` (mean pixel entropy of the aligned prediction, lower first),
            ``random`` or ``displacement`` (smallest ``|Delta|`` first).
        aggregate: ``mean`` (of probabilities) or ``entropy`` (per-pixel weights).
        searchable: ``"inner"`` (default: every main site but the first and last),
            ``"main"``, ``"all"`` or site indices.
        max_batch: at most this many image-states per forward.
        engine: ``trie`` (shared prefixes; falls back by itself for cross-site skips) or
            ``rerun`` (one batched forward per state).
        seed: for ``random`` and the neighbour order.
        width: states evaluated per image per search step (1: the criterion picks each).
        output: ``callable(model_output) -> (N, K, h, w)`` logits, if not detected.
        fill: ``"mask"`` (border pixels a state does not cover are excluded for it) or
            ``"circular"``.
        align_skips: for a network whose decoder fuses encoder maps from both sides of a
            searched site, shift the deeper maps onto the shallower one's grid at the
            fusion (default True; False fuses them as they come and shifts the output by
            the full ``Delta``, the paper's way).
        return_details: return ``(scores, SegDetails)``.

    Returns:
        A :class:`SegmentationUndiscard`; ``seg(x)`` is ``(N, K, H, W)`` at the input size:
        the plain logits at ``budget=1``, aggregated log-probabilities above.

    Shape:
        - input of ``seg``: ``(N, C, H, W)``, floating point.
        - the model's logits: ``(N, K, h, w)``, any ``h, w`` (upsampled to ``(H, W)``).
        - output of ``seg``: ``(N, K, H, W)``; with ``return_details``, :class:`SegDetails`
          holds ``states`` ``(N, B, L)``, ``delta`` ``(N, B, 2)``, ``entropy`` ``(N, B)``.

    Example:
        >>> model = nn.Sequential(*[nn.Conv2d(1 if i == 0 else 4, 4, 3, stride=2, padding=1) for i in range(3)],
        ...                       nn.Conv2d(4, 3, 1)).eval()
        >>> x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> wrap_segmentation(model, budget=3)(x).shape
        torch.Size([2, 3, 16, 16])
        >>> torch.equal(wrap_segmentation(model, budget=1)(x), dense_logits(model, x))
        True
        >>> scores, details = wrap_segmentation(model, budget=3, return_details=True)(x)
        >>> details.states.shape, details.delta.shape, details.entropy.shape
        (torch.Size([2, 3, 1]), torch.Size([2, 3, 2]), torch.Size([2, 3]))
    """
    return SegmentationUndiscard(model, budget, criterion, aggregate, searchable=searchable, max_batch=max_batch,
                                 engine=engine, seed=seed, width=width, output=output, fill=fill,
                                 align_skips=align_skips, return_details=return_details)
