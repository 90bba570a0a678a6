"""Many states per image in one pass that computes each distinct prefix once (docs/method.md, "The shared-prefix engine").

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

import warnings
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from undiscard.run.engine import use_states
from undiscard.run.levels import LEVEL_TAG
from undiscard.errors import OptionError, StateError
from undiscard.run.dispatch import CallMatcher, apply_grouped, group_rows, tensors_in
from undiscard.sites.ops import shift_at_offset
from undiscard.sites.sitemap import SiteMap

__all__ = ["SharedPrefixEvaluator", "TrieResult", "build_trie", "run_requests", "run_trie"]

_TAG = LEVEL_TAG


class _CrossSite(Exception):
    """A tensor from before a searchable site met one from after it."""


@dataclass
class _Trie:
    parents: list[torch.Tensor]  # per searchable site: (R_j,) row of the parent prefix
    offsets: list[torch.Tensor]  # per searchable site: (R_j,) flat offset of the row
    inverse: torch.Tensor  # (N * B,) final row of each (image, state)
    keys: list[torch.Tensor]  # per searchable site: (R_j, j + 2) image and offsets of each row
    # per searchable site j: (I_j, j + 1) prefixes whose input of site j comes from the cache,
    # appended after the computed rows of level j - 1 (empty without resumed requests)
    injected: list[torch.Tensor] | None = None
    roots: torch.Tensor | None = None  # images computed from the input (None: every image of the batch)


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

    Shape:
        - states: ``(N, B, L)`` (then ``M = N * B``, request ``n * B + b`` of image ``n``), or
          ``(M, L)`` with ``images``.
        - images: ``(M,)`` integer rows of the input batch, or ``None``.
        - output: per searchable site ``j``, ``parents[j]`` and ``offsets[j]`` ``(R_j,)`` and
          ``keys[j]`` ``(R_j, j + 2)`` (image, offsets) for its ``R_j`` distinct prefixes;
          ``inverse`` ``(M,)``, the last level's row of each request.

    Example:
        >>> t = build_trie(torch.tensor([[[0, 0], [0, 1], [1, 0]]]))  # one image, three states
        >>> [len(p) for p in t.parents], t.parents[1].tolist(), t.inverse.tolist()
        ([2, 3], [0, 0, 1], [0, 1, 2])
    """
    if images is None:
        n, b, L = states.shape
        images = torch.arange(n).repeat_interleave(b)
        states = states.reshape(n * b, L)
    L = states.shape[1]
    keys = torch.cat([images[:, None].long(), states], -1)
    prev = keys[:, 0].clone()
    parents, offsets, levels = [], [], []
    for j in range(L):
        uniq, inv = torch.unique(keys[:, : j + 2], dim=0, return_inverse=True)
        parent = torch.empty(uniq.shape[0], dtype=torch.long)
        parent[inv] = prev
        parents.append(parent)
        offsets.append(uniq[:, -1].clone())
        levels.append(uniq)
        prev = inv
    return _Trie(parents, offsets, prev, levels)


def build_resumed_trie(states: torch.Tensor, images: torch.Tensor, starts: torch.Tensor) -> _Trie:
    """The trie of requests that enter at different sites, for ONE pass.

    Request ``m`` (image ``images[m]``, flat offsets ``states[m]``) has the input of site
    ``starts[m]`` cached for its prefix (``-1``: nothing cached, it starts from the image).
    Level ``j`` holds the distinct prefixes ``(image, s_0..s_j)`` of the requests with
    ``start <= j``; their parents are the computed rows of level ``j - 1`` followed by the
    prefixes ``(image, s_0..s_{j-1})`` of the requests entering at ``j`` (from the cache).
    A request entering at ``j`` shares no prefix of length ``j + 1`` with one that
    entered before (its length-``j`` prefix is cached, theirs is not), so every row is
    still computed once.
    """
    L = states.shape[1]
    keys = torch.cat([images[:, None].long(), states.long()], -1)
    roots = torch.unique(keys[starts < 0, 0])
    comp = roots[:, None]  # computed rows before site 0: one per image starting from its input
    parents, offsets, levels, injected = [], [], [], []
    for j in range(L):
        inj = torch.unique(keys[starts == j, : j + 1], dim=0) if bool((starts == j).any()) \
            else keys.new_empty((0, j + 1))
        inputs = torch.cat([comp, inj])
        where = {tuple(r): i for i, r in enumerate(inputs.tolist())}
        sel = starts <= j
        uniq = torch.unique(keys[sel, : j + 2], dim=0) if bool(sel.any()) else keys.new_empty((0, j + 2))
        parents.append(torch.tensor([where[tuple(r)] for r in uniq[:, : j + 1].tolist()], dtype=torch.long))
        offsets.append(uniq[:, -1].clone())
        levels.append(uniq)
        injected.append(inj)
        comp = uniq
    final = {tuple(r): i for i, r in enumerate(comp.tolist())}
    inverse = torch.tensor([final[tuple(r)] for r in keys.tolist()], dtype=torch.long)
    return _Trie(parents, offsets, inverse, levels, injected, roots)


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
    ts = tensors_in(kwargs, tensors_in(args))
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
    # one offset for every row (or no rows: the op still runs, on an empty batch), else one call per offset
    y = apply_grouped(xe, group_rows(offs, sites.sites[site_index]), fn)
    if x.dim() == 4 and y.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)  # keep a channels_last model in channels_last
    setattr(y, _TAG, j)
    return y


class _Pass:
    """One forward of the trie, optionally resumed at searchable site ``start`` from
    activations cached by earlier passes, and recording the inputs of every site it
    computes (the cache is keyed by ``(image, offsets at the sites before)``)."""

    def __init__(self, sites: SiteMap, trie: _Trie, gimages: torch.Tensor, cache: list[dict] | None):
        self.sites, self.trie, self.gimages, self.cache = sites, trie, gimages, cache
        self.level = {si: j for j, si in enumerate(sites.searchable)}
        self.ncall: dict[int, int] = {}

    def _global(self, k: torch.Tensor) -> list[tuple[int, ...]]:
        """Cache keys (image index in the whole batch, offsets) of local prefix rows ``k``."""
        g = self.gimages[k[:, 0]]
        return [(int(a), *b) for a, b in zip(g.tolist(), k[:, 1:].tolist())]

    def _keys(self, j: int) -> list[tuple[int, ...]]:
        """Cache keys of the computed rows of level ``j - 1`` (the inputs of site ``j``)."""
        if j == 0:
            roots = torch.arange(len(self.gimages)) if self.trie.roots is None else self.trie.roots
            return self._global(roots[:, None])
        return self._global(self.trie.keys[j - 1])

    def site(self, x: torch.Tensor, site_index: int, fn) -> torch.Tensor:
        j = self.level[site_index]
        c = self.ncall.get(j, 0)
        self.ncall[j] = c + 1
        if getattr(x, _TAG, None) != j - 1:
            raise _CrossSite((getattr(x, _TAG, None), j - 1))
        if self.cache is not None and x.shape[0]:
            # no detach: under autograd the cached rows keep their graph, so gradients reach the prefix
            rows = x.clone(memory_format=torch.preserve_format).unbind(0)
            for key, row in zip(self._keys(j), rows):
                if c == 0:
                    self.cache[j][key] = [row]
                else:
                    self.cache[j][key].append(row)
        inj = self.trie.injected[j] if self.trie.injected is not None else None
        if inj is not None and inj.shape[0]:
            rows = [self.cache[j][key][c] for key in self._global(inj)]
            cached = torch.stack(rows)
            x = torch.cat([x, cached]) if x.shape[0] else cached
            if x.dim() == 4 and rows[0].dim() == 3 and rows[0].is_contiguous(memory_format=torch.channels_last) \
                    and not rows[0].is_contiguous():
                x = x.contiguous(memory_format=torch.channels_last)
            setattr(x, _TAG, j - 1)
        return _expand(x, self.trie, j, self.sites, site_index, fn)


class _TrieMode(TorchFunctionMode):
    def __init__(self, sites: SiteMap, pass_: _Pass) -> None:
        super().__init__()
        self.sites, self.pass_ = sites, pass_
        self.matcher = CallMatcher(sites)
        self.level = pass_.level

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        level = _level_of(args, kwargs)
        match = self.matcher.site_of(func, args, kwargs)
        if match is not None:
            call, site_index = match
            if site_index in self.level:
                return self.pass_.site(call.x, site_index, lambda xs, off: call.with_input(xs).at_offset(off))
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
    forward: Callable | None = None,
) -> TrieResult:
    """``model`` on image ``n`` under each state ``states[n, b]``: ``(N, B, ...)`` outputs.

    Args:
        x: ``(N, C, H, W)``.
        states: ``(N, B, L)`` flat offset indices over ``sites.searchable``.
        max_batch: bound on the rows of any forward: images are taken in chunks whose
            distinct full states number at most ``max_batch`` (an image with more states
            than that goes alone). Results do not depend on it.
        forward: what to run instead of ``model`` (e.g. ``model.forward_features``).

    Shape:
        - x: ``(N, C, *spatial)`` (what ``forward`` takes, the batch on axis 0).
        - states: ``(N, B, L)`` flat offset indices, ``L = len(sites.searchable)``.
        - outputs: ``(N, B, *out)``, ``out`` the trailing shape of ``forward(x)`` (one tensor);
          ``rows``: ``L`` counts.

    Example:
        >>> from undiscard import find_sites, run_states
        >>> model = nn.Sequential(*[nn.Conv2d(1, 2, 3, stride=2, padding=1)] +
        ...                       [nn.Conv2d(2, 2, 3, stride=2, padding=1) for _ in range(2)]).eval()
        >>> x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> sites = find_sites(model, x[:1])
        >>> sites.searchable, sites.searchable_sites[0].num_offsets  # one searched site, 4 offsets
        ((1,), 4)
        >>> states = torch.tensor([[[0], [1], [3]], [[2], [0], [1]]])  # (N, B, L) = (2, 3, 1)
        >>> res = run_trie(model, x, states, sites)
        >>> res.outputs.shape, res.shared, res.rows
        (torch.Size([2, 3, 2, 2, 2]), True, [6])
        >>> torch.allclose(res.outputs[1, 0], run_states(model, x[1:], [2], sites)[0], atol=1e-6)
        True
    """
    if not isinstance(states, torch.Tensor) or states.dim() != 3 or states.shape[0] != x.shape[0]:
        raise StateError(f"states must be an (N, B, L) tensor with N = {x.shape[0]}; got {getattr(states, 'shape', states)}")
    n, b, L = states.shape
    flat = sites.encode(states.reshape(n * b, L))
    res = run_requests(model, x, torch.arange(n).repeat_interleave(b), flat, sites, max_batch=max_batch, forward=forward)
    return TrieResult(res.outputs.reshape(n, b, *res.outputs.shape[1:]), res.shared, res.rows)


def run_requests(
    model: nn.Module,
    x: torch.Tensor,
    images: torch.Tensor,
    states: torch.Tensor,
    sites: SiteMap,
    *,
    max_batch: int | None = None,
    forward: Callable | None = None,
) -> TrieResult:
    """Outputs ``(M, ...)`` of image ``images[m]`` under state ``states[m]`` (any number per image).

    Shape:
        - x: ``(N, C, *spatial)`` (what ``forward`` takes, the batch on axis 0).
        - images: ``(M,)`` integer rows of ``x``.
        - states: ``(M, L)`` flat offset indices (or what :meth:`SiteMap.encode` takes).
        - outputs: ``(M, *out)``, ``out`` the trailing shape of ``forward(x)``.
    """
    states = sites.encode(states)
    if states.dim() != 2 or images.shape != (states.shape[0],):
        raise StateError(f"need states (M, L) and images (M,); got {tuple(states.shape)} and {tuple(images.shape)}")
    ev = SharedPrefixEvaluator(model, x, sites, forward=forward, max_batch=max_batch, cache=False)
    out = ev(images, states)
    return TrieResult(out, bool(ev.shared) or len(sites.searchable) == 0, ev.rows)


def _run_chunk(
    model: nn.Module,
    x: torch.Tensor,
    images: torch.Tensor,
    states: torch.Tensor,
    sites: SiteMap,
    *,
    forward: Callable | None = None,
    starts: torch.Tensor | None = None,
    cache: list[dict] | None = None,
    gimages: torch.Tensor | None = None,
    captured: Any = None,
) -> TrieResult | None:
    """One trie pass over requests of the images of ``x``; None when a tensor crosses a site.

    ``starts`` (per request): the site whose cached input the request resumes from
    (``-1`` or None: from the image); see :func:`build_resumed_trie`. ``captured``: a
    :class:`~undiscard.run.segments.Captured` graph to run instead of intercepting every call.
    """
    forward = model if forward is None else forward
    m, L = states.shape
    if L == 0:
        out = forward(x)
        return TrieResult(out.index_select(0, images), True, [])
    resumed = starts is not None and bool((starts >= 0).any())
    trie = build_resumed_trie(states, images, starts) if resumed else build_trie(states, images)
    pass_ = _Pass(sites, trie, torch.arange(x.shape[0]) if gimages is None else gimages, cache)
    x0 = x.index_select(0, trie.roots) if resumed else x.view(x.shape)  # only the images starting from the input
    if captured is not None:  # levels were checked once, on the graph: no tags, no interception
        out = captured.run(x0, pass_)
        if not isinstance(out, torch.Tensor) or out.shape[0] != len(trie.keys[-1]):
            raise StateError("the captured graph's output does not have one row per state")  # internal
        return TrieResult(out.index_select(0, trie.inverse.to(out.device)), True, [len(p) for p in trie.parents])
    handles = []
    for name, site_index, dims in sites.module_sites:
        if site_index not in pass_.level:
            continue

        def hook(module, args, site_index=site_index, dims=dims):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            y = pass_.site(args[0], site_index, lambda xs, off: shift_at_offset(xs, dims, off))
            return (y, *args[1:])

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    setattr(x0, _TAG, -1)
    expands = len(trie.keys[-1]) > x0.shape[0]
    try:
        with _TrieMode(sites, pass_):
            try:
                out = forward(x0)
            except _CrossSite:
                raise
            except Exception:  # noqa: BLE001 - see below
                # an op that fails only once the rows have expanded at a site read a size before
                # that site (a batch size kept and used after it: torchvision's ViT reshapes with
                # it), which the level tags cannot see: the same fallback as a crossing tensor. A
                # genuine error recurs in the per-state forwards and is raised there.
                if resumed or not expands:
                    raise
                raise _CrossSite("an op failed on the expanded batch") from None
        if not isinstance(out, torch.Tensor) or getattr(out, _TAG, None) != L - 1 or out.shape[0] != len(trie.keys[-1]):
            raise _CrossSite("output")  # also: a batch size read before a site and reused after it
        return TrieResult(out.index_select(0, trie.inverse.to(out.device)), True, [len(p) for p in trie.parents])
    except _CrossSite:
        return None
    finally:
        for h in handles:
            h.remove()


def _per_state(model, forward, x, images, states, sites) -> torch.Tensor:
    with use_states(model, sites, states):
        return forward(x[images])


class SharedPrefixEvaluator:
    """Evaluates ``(image, state)`` requests on one batch over many calls (one call per
    search step), computing each distinct prefix once ACROSS calls: the inputs of every
    searchable site are kept per ``(image, offsets before it)``, and a request whose
    longest cached prefix ends at site ``j`` runs only from site ``j`` on (the ops
    before it see an empty batch). A model that carries a tensor across a site falls
    back to one batched per-sample-state forward per request, with the same results.

    Memory: the cache holds, per image, one input of each site call per distinct prefix
    reaching it (sum over sites of activation size x distinct prefixes); chunks of at
    most ``max_batch`` rows bound the working set of each pass on top of that.

    Args:
        model: the network (its modules carry the site hooks).
        x: ``(N, ...)`` the batch.
        forward: what to run (default ``model``; e.g. ``model.forward_features``).
        cache: False recomputes every request from the input (one trie pass per call).
        capture: run a graph captured once (:mod:`~undiscard.run.segments`) instead of
            intercepting every call; where the capture is refused, one warning and the
            interception engine. ``compile``: ``torch.compile`` that graph (True: inductor,
            or a backend name).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, sites: SiteMap, *, forward: Callable | None = None,
                 max_batch: int | None = None, cache: bool = True, capture: bool = False,
                 compile: bool | str | None = None) -> None:
        if max_batch is not None and max_batch < 1:
            raise OptionError(f"max_batch must be a positive integer; got {max_batch!r}")
        self.model, self.x, self.sites, self.forward = model, x, sites, forward
        self.max_batch = max_batch
        self.L = len(sites.searchable)
        self.cache: list[dict] | None = [dict() for _ in range(self.L)] if cache else None
        self.shared: bool | None = None  # unknown until the first pass
        self.resume = True  # False once a resumed pass failed (an op that rejects an empty batch)
        self.rows = [0] * self.L  # rows computed per site, over all calls
        self.captured = None
        if capture and self.L:
            from undiscard.run.segments import captured_for

            self.captured = captured_for(model, forward, sites, x, compile, reference=_run_chunk)

    def _start(self, image: int, state: tuple[int, ...]) -> int:
        if self.cache is None or not self.resume:
            return -1
        for j in range(self.L - 1, -1, -1):
            if (image, *state[:j]) in self.cache[j]:
                return j
        return -1

    def __call__(self, images: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        states = self.sites.encode(states)
        if self.shared is False or self.L == 0:
            return self._fallback(images, states)
        starts = torch.tensor([self._start(int(i), tuple(s)) for i, s in zip(images.tolist(), states.tolist())],
                              dtype=torch.long)
        # ONE pass for all requests: each enters at the site it resumes from, so the segments
        # after it run on every request's rows at once
        try:
            out = self._pass(images, states, starts)
        except Exception as exc:
            if not bool((starts >= 0).any()):
                raise
            # an op before a resume point rejected a smaller (or empty) batch: recompute prefixes
            warnings.warn(f"the model failed on a pass resumed from cached activations ({type(exc).__name__}: "
                          f"{exc}); recomputing every prefix from the input from now on (same results, slower)",
                          RuntimeWarning, stacklevel=2)
            self.resume = False
            out = self._pass(images, states, torch.full_like(starts, -1))
        if out is None:  # the model crosses sites: no sharing from now on
            self.shared, self.cache = False, None
            return self._fallback(images, states)
        self.shared = True
        return out

    def _fallback(self, images: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        step = self.max_batch or states.shape[0]
        fwd = self.model if self.forward is None else self.forward
        outs = [_per_state(self.model, fwd, self.x, images[s : s + step], states[s : s + step], self.sites)
                for s in range(0, states.shape[0], step)]
        self.rows = [r + states.shape[0] for r in self.rows]
        return torch.cat(outs)

    def _pass(self, images: torch.Tensor, states: torch.Tensor, starts: torch.Tensor) -> torch.Tensor | None:
        out = None
        for chunk in _chunks(images, states, self.x.shape[0], self.max_batch):
            sel = torch.isin(images, chunk).nonzero().flatten()
            remap = torch.full((self.x.shape[0],), -1, dtype=torch.long)
            remap[chunk] = torch.arange(len(chunk))
            r = _run_chunk(self.model, self.x[chunk], remap[images[sel]], states[sel], self.sites,
                           forward=self.forward, starts=starts[sel], cache=self.cache, gimages=chunk,
                           captured=self.captured)
            if r is None:
                return None
            for k, v in enumerate(r.rows):
                self.rows[k] += v
            if out is None:
                out = r.outputs.new_empty((states.shape[0], *r.outputs.shape[1:]))
            out[sel] = r.outputs
        return out


def _chunks(images: torch.Tensor, states: torch.Tensor, n: int, max_batch: int | None) -> list[torch.Tensor]:
    """Whole images, at most ``max_batch`` distinct (image, state) rows per chunk."""
    present = torch.unique(images)
    if max_batch is None:
        return [present]
    uniq = torch.unique(torch.cat([images[:, None].long(), states], 1), dim=0)
    per_image = torch.bincount(uniq[:, 0], minlength=n)
    chunks, cur, size = [], [], 0
    for i in present.tolist():
        k = int(per_image[i])
        if cur and size + k > max_batch:
            chunks.append(torch.tensor(cur))
            cur, size = [], 0
        cur.append(i)
        size += k
    if cur:
        chunks.append(torch.tensor(cur))
    return chunks
