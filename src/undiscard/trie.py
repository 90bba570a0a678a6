"""Many states per image in one pass that computes each distinct prefix once (SPEC §4).

States that agree on their offsets at the first ``l`` searchable sites share everything
the network computes before site ``l + 1``. :func:`run_trie` runs the batch once and, at
each searchable site, expands every row into the children of its prefix (the batch grows
as it goes deeper): the cost is the sum over segments of segment cost x distinct
prefixes reaching it.

Networks that carry a tensor across a site (a U-Net skip into a decoder) cannot share
prefixes this way. Every activation is tagged with its trie level; an op that combines
two levels raises internally and :func:`run_trie` falls back to one batched forward of
all the states (per-sample offsets in one op), with the same results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from undiscard.engine import run_states
from undiscard.errors import SiteMismatchError, StateError
from undiscard.oprefs import BINDERS
from undiscard.ops import shift_at_offset
from undiscard.sites import SiteMap

__all__ = ["TrieResult", "build_trie", "run_requests", "run_trie"]

_TAG = "_undiscard_trie_level"


class _CrossSite(Exception):
    """A tensor from before a searchable site met one from after it."""


@dataclass
class _Trie:
    parents: list[torch.Tensor]  # per searchable site: (R_j,) row of the parent prefix
    offsets: list[torch.Tensor]  # per searchable site: (R_j,) flat offset of the row
    inverse: torch.Tensor  # (N * B,) final row of each (image, state)


@dataclass
class TrieResult:
    """``outputs`` ``(N, B, ...)``; ``shared``: False when the model needed the fallback;
    ``rows``: rows computed at each searchable site (distinct prefixes)."""

    outputs: Any
    shared: bool
    rows: list[int]


def build_trie(states: torch.Tensor, images: torch.Tensor | None = None) -> _Trie:
    """The prefix trie of ``states`` (flat offsets), images kept apart.

    ``states`` ``(N, B, L)``, or ``(M, L)`` requests with ``images`` ``(M,)`` naming the
    image (row of the input batch) of each; the level before the first site has one row
    per input image.
    """
    if images is None:
        n, b, L = states.shape
        images = torch.arange(n).repeat_interleave(b)
        states = states.reshape(n * b, L)
    L = states.shape[1]
    keys = torch.cat([images[:, None].long(), states], -1)
    prev = keys[:, 0].clone()
    parents, offsets = [], []
    for j in range(L):
        uniq, inv = torch.unique(keys[:, : j + 2], dim=0, return_inverse=True)
        parent = torch.empty(uniq.shape[0], dtype=torch.long)
        parent[inv] = prev
        parents.append(parent)
        offsets.append(uniq[:, -1].clone())
        prev = inv
    return _Trie(parents, offsets, prev)


def _tensors(obj: Any, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)


def _tag(obj: Any, level: int) -> None:
    if isinstance(obj, torch.Tensor):
        try:
            setattr(obj, _TAG, level)
        except (AttributeError, RuntimeError):
            pass
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tag(o, level)


def _level_of(args: Any, kwargs: Any) -> int | None:
    ts: list[torch.Tensor] = []
    _tensors(args, ts)
    _tensors(kwargs, ts)
    levels = {getattr(t, _TAG) for t in ts if hasattr(t, _TAG)}
    if len(levels) > 1:
        raise _CrossSite(sorted(levels))
    return levels.pop() if levels else None


def _expand(x: torch.Tensor, trie: _Trie, j: int, sites: SiteMap, site_index: int, fn) -> torch.Tensor:
    """Rows of level ``j - 1`` -> rows of level ``j``, each under its own offset at the site."""
    if getattr(x, _TAG, None) != j - 1:
        raise _CrossSite((getattr(x, _TAG, None), j - 1))
    xe = x.index_select(0, trie.parents[j].to(x.device))
    offs = trie.offsets[j]
    site = sites.sites[site_index]
    values = torch.unique(offs)
    if len(values) == 1:
        y = fn(xe, site.offset_of(int(values[0])))
    else:
        y = None
        for k in values.tolist():
            idx = (offs == k).nonzero().flatten().to(x.device)
            part = fn(xe.index_select(0, idx), site.offset_of(k))
            if y is None:
                y = part.new_empty((xe.shape[0], *part.shape[1:]))
            y.index_copy_(0, idx, part)
    setattr(y, _TAG, j)
    return y


class _TrieMode(TorchFunctionMode):
    def __init__(self, sites: SiteMap, trie: _Trie) -> None:
        super().__init__()
        self.sites, self.trie = sites, trie
        self.calls = sites.calls
        self.level = {si: j for j, si in enumerate(sites.searchable)}
        self.counter = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        level = _level_of(args, kwargs)
        binder = BINDERS.get(func)
        call = binder(func, args, kwargs) if binder is not None else None
        if call is not None and call.strided:
            n = len(self.calls)
            i = self.counter % n if n else 0
            if not n or self.calls[i][:2] != (call.kind, call.stride):
                raise SiteMismatchError(
                    f"strided op #{self.counter} of this forward is a {call.kind} with stride {call.stride}, but the "
                    f"sites were found with {self.calls[i][:2] if n else None}: call find_sites on this model and size"
                )
            self.counter += 1
            site_index = self.calls[i][2]
            j = self.level.get(site_index)
            if j is not None:
                return _expand(call.x, self.trie, j, self.sites, site_index,
                               lambda xs, off: call.with_input(xs).at_offset(off))
        out = func(*args, **kwargs)
        if level is not None:
            _tag(out, level)
        return out


def run_trie(
    model: nn.Module,
    x: torch.Tensor,
    states: torch.Tensor,
    sites: SiteMap,
    *,
    max_batch: int | None = None,
) -> TrieResult:
    """``model`` on image ``n`` under each state ``states[n, b]``: ``(N, B, ...)`` outputs.

    Args:
        x: ``(N, C, H, W)``.
        states: ``(N, B, L)`` flat offset indices over ``sites.searchable``.
        max_batch: bound on the rows of any forward: images are taken in chunks whose
            distinct full states number at most ``max_batch`` (an image with more states
            than that goes alone). Results do not depend on it.
    """
    if not isinstance(states, torch.Tensor) or states.dim() != 3 or states.shape[0] != x.shape[0]:
        raise StateError(f"states must be an (N, B, L) tensor with N = {x.shape[0]}; got {getattr(states, 'shape', states)}")
    n, b, L = states.shape
    flat = sites.encode(states.reshape(n * b, L))
    res = run_requests(model, x, torch.arange(n).repeat_interleave(b), flat, sites, max_batch=max_batch)
    return TrieResult(res.outputs.reshape(n, b, *res.outputs.shape[1:]), res.shared, res.rows)


def run_requests(
    model: nn.Module,
    x: torch.Tensor,
    images: torch.Tensor,
    states: torch.Tensor,
    sites: SiteMap,
    *,
    max_batch: int | None = None,
) -> TrieResult:
    """Outputs ``(M, ...)`` of image ``images[m]`` under state ``states[m]`` (any number per image)."""
    states = sites.encode(states)
    if states.dim() != 2 or images.shape != (states.shape[0],):
        raise StateError(f"need states (M, L) and images (M,); got {tuple(states.shape)} and {tuple(images.shape)}")
    if max_batch is not None and max_batch < 1:
        raise StateError(f"max_batch must be positive; got {max_batch}")
    m = states.shape[0]
    if max_batch is None:
        return _run_chunk(model, x, images, states, sites)
    # chunks of whole images, at most max_batch distinct (image, state) rows each
    uniq, inv = torch.unique(torch.cat([images[:, None].long(), states], 1), dim=0, return_inverse=True)
    per_image = torch.bincount(uniq[:, 0], minlength=x.shape[0])
    chunks, cur, size = [], [], 0
    for i in torch.unique(images).tolist():
        k = int(per_image[i])
        if cur and size + k > max_batch:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += k
    if cur:
        chunks.append(cur)
    out, shared, rows = None, True, [0] * states.shape[1]
    for chunk in chunks:
        sel = torch.isin(images, torch.tensor(chunk)).nonzero().flatten()
        remap = torch.full((x.shape[0],), -1, dtype=torch.long)
        remap[torch.tensor(chunk)] = torch.arange(len(chunk))
        r = _run_chunk(model, x[torch.tensor(chunk)], remap[images[sel]], states[sel], sites)
        if out is None:
            out = r.outputs.new_empty((m, *r.outputs.shape[1:]))
        out[sel] = r.outputs
        shared = shared and r.shared
        rows = [a + c for a, c in zip(rows, r.rows)]
    return TrieResult(out, shared, rows)


def _run_chunk(model: nn.Module, x: torch.Tensor, images: torch.Tensor, states: torch.Tensor, sites: SiteMap) -> TrieResult:
    m, L = states.shape
    if L == 0:
        out = model(x)
        return TrieResult(out.index_select(0, images), True, [])
    trie = build_trie(states, images)
    level = {si: k for k, si in enumerate(sites.searchable)}
    handles = []
    for name, site_index, dims in sites.module_sites:
        j = level.get(site_index)
        if j is None:
            continue

        def hook(module, args, j=j, site_index=site_index, dims=dims):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            y = _expand(args[0], trie, j, sites, site_index, lambda xs, off: shift_at_offset(xs, dims, off))
            return (y, *args[1:])

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    x0 = x.view(x.shape)
    setattr(x0, _TAG, -1)
    try:
        with _TrieMode(sites, trie):
            out = model(x0)
        if not isinstance(out, torch.Tensor) or getattr(out, _TAG, None) != L - 1:
            raise _CrossSite("output")
        return TrieResult(out.index_select(0, trie.inverse.to(out.device)), True, [len(p) for p in trie.parents])
    except _CrossSite:
        pass
    finally:
        for h in handles:
            h.remove()
    out = run_states(model, x[images], states, sites)
    return TrieResult(out, False, [m] * L)
