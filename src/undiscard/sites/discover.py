"""Finding the subsampling sites of any model.

A *site* (docs/method.md, "Sites, offsets, states") is one logical subsampling step: all strided ops that map the same
input grid to the same output grid and whose outputs meet (a ResNet block's strided
3x3 conv and its strided 1x1 shortcut; all stride-2 branches of an Inception reduction
block). :func:`find_sites` runs the model once on an example input under a
``TorchFunctionMode`` that sees every torch call, functional ones included, and tracks
which strided ops each tensor descends from. Two strided ops with the same grids that
reach one op through different inputs (the ``add`` of a residual block, the ``cat`` of
an Inception block) are merged into one site. No per-architecture registry.

Space-to-depth / patch merging (Swin's ``PatchMerging``, TResNet's ``SpaceToDepth``)
is done with reshapes, not strided ops. It is found at the module level: the innermost
module that contains no strided op, splits an axis with a rank-increasing reshape, and
maps an ``(N, C, H, W)`` or ``(N, H, W, C)`` grid to one ``R`` times smaller with more
channels. Its offset moves the grouping grid (the input is shifted by ``-s``).

A site is on the *main path* when the grid it produces is the grid the network goes on
with (a later site takes that grid as input, or it is the last site). A side site, such
as PVT's spatial-reduction conv on the keys/values, produces a grid nobody downstream
subsamples again; it adds variety but moves no later grid, so its displacement is 0.

Limits (written down, not hidden): models run under ``torch.compile``/TorchScript are
opaque to the interception (find sites on the eager model); adaptive pooling and
interpolation are not subsampling sites; strided slicing (``x[..., ::2, ::2]``) is not
intercepted (docs/limits.md).
"""

from __future__ import annotations

import contextvars
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from undiscard.errors import InputError, MissedSubsamplingWarning, NoSubsamplingSiteError
from undiscard.sites.calls import BINDERS, RESHAPES, is_site_call

from undiscard.sites.sitemap import Site, SiteMap, SiteOp, resolve_searchable

__all__ = ["find_sites"]


_INPUT = -1  # ancestry marker: derived from the model input

_DISCOVERING: contextvars.ContextVar[object | None] = contextvars.ContextVar("undiscard_discovering", default=None)


@dataclass
class _Rec:
    """A strided op (or space-to-depth module) seen during discovery."""

    id: int
    order: int
    op: SiteOp
    in_anc: frozenset
    module_path: str | None = None  # space-to-depth modules: path for get_submodule ("" = root)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class _Frame:
    name: str
    in_shape: tuple[int, ...] | None
    recs_before: int
    reshapes_before: int
    in_anc: frozenset


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, tuple[weakref.ref, frozenset]] = {}
        self.recs: list[_Rec] = []
        self.uf = _UnionFind()
        self.stack: list[_Frame] = []
        self.reshape_splits = 0
        self.events = 0
        self.n_calls = 0
        self.unbatched: tuple[str, tuple[int, ...]] | None = None
        self.leaf_kind: dict[str, str] = {}  # module name -> op kind, for conv/pool modules
        self.spatial_rank = 2  # spatial axes of the model input (set by find_sites)
        # coverage: grids made by the input, a site or a resampling op; grid reductions that are none of these
        self.known_grids: set[tuple[int, ...]] = set()
        self.reductions: list[tuple[int, str, str, tuple[int, ...], tuple[int, ...]]] = []

    # ancestry ---------------------------------------------------------------
    def anc(self, t: torch.Tensor) -> frozenset:
        e = self.tags.get(id(t))
        return e[1] if e is not None and e[0]() is t else frozenset()

    def tag(self, t: torch.Tensor, anc: frozenset) -> None:
        if anc:
            self.tags[id(t)] = (weakref.ref(t), anc)

    @property
    def where(self) -> str:
        return self.stack[-1].name if self.stack else ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if not ins:
            return out
        tags = [self.anc(t) for t in ins]
        anc = frozenset().union(*tags)
        self.events += 1
        binder = BINDERS.get(func)
        if binder is not None and _INPUT in anc:
            call = binder(func, args, kwargs)
            if is_site_call(call, self.spatial_rank):
                nd = call.spatial_dims
                if call.kind != "slice" and call.x.dim() != nd + 2 and self.unbatched is None:
                    self.unbatched = (self.where, tuple(call.x.shape))
                y = out[0] if isinstance(out, tuple) else out
                fname = getattr(func, "__name__", "op")
                owner = self.where
                # a conv/pool module's own call is named after the module; a functional call
                # in a composite module's forward gets ':function' appended
                is_module_op = self.leaf_kind.get(owner) == call.kind
                name = (owner or "(model)") if is_module_op else f"{owner}:{fname}" if owner else fname
                op = SiteOp(
                    name=name,
                    kind=call.kind,
                    call_index=self.n_calls,
                    stride=call.stride,
                    kernel=call.kernel,
                    in_grid=tuple(call.x.shape[d] for d in call.in_axes),
                    out_grid=tuple(y.shape[d] for d in call.out_axes(y)),
                    spatial_dims=call.in_axes,
                )
                self.n_calls += 1
                rec = _Rec(len(self.recs), self.events, op, anc)
                self.recs.append(rec)
                self.known_grids.add(op.out_grid)
                anc = anc | {rec.id}
        elif func in RESHAPES and isinstance(out, torch.Tensor) and out.dim() > ins[0].dim():
            self.reshape_splits += 1
        if _INPUT in anc and isinstance(out, torch.Tensor) and out.dim() >= self.spatial_rank + 2:
            self._follow_grid(func, ins, tags, out, binder is not None and len(self.recs) and self.recs[-1].order == self.events)
        data_tags = [a for a in tags if _INPUT in a]  # weights and constants take no part
        if len(data_tags) >= 2:
            self._merge(data_tags)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.tag(t, anc)
        return out

    def _follow_grid(self, func, ins: list[torch.Tensor], tags: list[frozenset], out: torch.Tensor, is_site: bool) -> None:
        """Coverage (docs/method.md, "Coverage"): a call that maps a known grid (the input's,
        a site's output, a resampled one) to one smaller by a factor >= 1.5 on every axis,
        at the same tensor axes, and is not a site, is a subsampling step undiscard misses."""
        nd = self.spatial_rank
        fname = getattr(func, "__name__", "op")
        if is_site:
            return
        if any(w in fname for w in ("adaptive", "interpolate", "upsample")):  # resampling: not a site, a new grid
            self.known_grids.add(tuple(out.shape[-nd:]))  # resampling ops are channels-first
            return
        for x, tag in zip(ins, tags):
            if _INPUT not in tag or x.dim() != out.dim():
                continue
            for a in range(1, out.dim() - nd + 1):
                gx, gy = tuple(x.shape[a:a + nd]), tuple(out.shape[a:a + nd])
                if gx not in self.known_grids or all(g == 1 for g in gy):
                    continue
                if all(m >= 1 and (n == 1 or n >= 1.5 * m) for n, m in zip(gx, gy)) and any(n > 1 for n in gx):
                    self.reductions.append((self.events, self.where, fname, gx, gy))
                    self.known_grids.add(gy)
                    return

    def _merge(self, tags: list[frozenset]) -> None:
        """Strided ops that reach this call through different inputs, with equal grids, are one site."""
        union = frozenset().union(*tags)
        common = frozenset.intersection(*tags)
        groups: dict[tuple, list[int]] = {}
        for rid in union - common:
            if rid == _INPUT:
                continue
            op = self.recs[rid].op
            # keyed on the output grid: an op's input grid includes explicit padding
            # (circular / same-pad convs), which its partner (a 1x1 shortcut) lacks
            groups.setdefault((op.stride, op.out_grid), []).append(rid)
        for ids in groups.values():
            for other in ids[1:]:
                self.uf.union(ids[0], other)

    # modules ----------------------------------------------------------------
    def pre_hook(self, name: str):
        def hook(module, args):
            if _DISCOVERING.get() is not self:
                return None
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self.stack.append(
                _Frame(name, tuple(x.shape) if x is not None else None, len(self.recs), self.reshape_splits,
                       self.anc(x) if x is not None else frozenset())
            )
            return None

        return hook

    def post_hook(self, name: str):
        def hook(module, args, output):
            if _DISCOVERING.get() is not self or not self.stack or self.stack[-1].name != name:
                return None
            frame = self.stack.pop()
            if not isinstance(output, torch.Tensor) or frame.in_shape is None or _INPUT not in frame.in_anc:
                return None
            if len(self.recs) != frame.recs_before or self.reshape_splits == frame.reshapes_before:
                return None  # holds a strided op / a site already, or never split an axis
            found = _space_to_depth(frame.in_shape, tuple(output.shape))
            if found is None:
                return None
            dims, stride = found
            op = SiteOp(
                name=name or "(model)",
                kind="space_to_depth",
                call_index=None,
                stride=stride,
                kernel=stride,
                in_grid=tuple(frame.in_shape[d] for d in dims),
                out_grid=tuple(output.shape[d] for d in dims),
                spatial_dims=dims,
            )
            rec = _Rec(len(self.recs), self.events, op, frame.in_anc, module_path=name)
            self.recs.append(rec)
            self.known_grids.add(op.out_grid)
            self.tag(output, self.anc(output) | frame.in_anc | {rec.id})
            return None

        return hook


def _space_to_depth(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Spatial axes and stride if ``in -> out`` looks like space-to-depth, else None.

    Rank >= 4, same batch, channels grow, and every spatial axis shrinks to
    ``ceil(n / R)`` for some integer ``R`` (at least one ``R > 1``); NCHW or NHWC.
    """
    if len(in_shape) != len(out_shape) or len(in_shape) < 4 or in_shape[0] != out_shape[0]:
        return None
    rank = len(in_shape)
    for ch, dims in ((1, tuple(range(2, rank))), (rank - 1, tuple(range(1, rank - 1)))):
        if out_shape[ch] <= in_shape[ch]:
            continue
        stride = []
        for d in dims:
            n, m = in_shape[d], out_shape[d]
            if m < 1 or m > n:
                break
            r = round(n / m)
            if r < 1 or -(-n // r) != m:
                break
            stride.append(r)
        else:
            if any(r > 1 for r in stride):
                return dims, tuple(stride)
    return None


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def find_sites(
    model: nn.Module,
    example_input: torch.Tensor | tuple,
    *,
    searchable: str | Iterable[int] = "inner",
) -> SiteMap:
    """Find every subsampling site of ``model``, in forward order.

    Runs one forward pass on ``example_input`` (batch 1 is enough; no gradients; the
    model is left exactly as it was, train/eval flags included).

    Args:
        model: any ``nn.Module`` whose input is ``(N, C, *spatial)``.
        example_input: a batched tensor (or a tuple of positional arguments).
        searchable: ``"inner"`` (default: main-path sites but the first and last, docs/method.md),
            ``"main"`` (every main-path site), ``"all"`` (side sites too), or site indices.

    Returns:
        A :class:`SiteMap`.

    Raises:
        InputError: the input is unbatched, of the wrong rank, or too small for the network.
        NoSubsamplingSiteError: the model subsamples nowhere.

    Shape:
        - example_input: ``(N, C, *spatial)`` (at least one spatial axis; ``N = 1`` is enough),
          or a tuple of positional arguments whose first is such a tensor.
        - The :class:`SiteMap` describes the model at this input size (``input_shape``, each
          site's ``in_grid`` / ``out_grid``); its states are ``(L,)`` or ``(N, L)`` with
          ``L = len(searchable)``.

    Example:
        A strided conv, a max-pool and a strided conv: three sites, of which the inner one
        is searched by default.

        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        ...                       nn.Conv2d(4, 8, 3, stride=2, padding=1))
        >>> sites = find_sites(model, torch.zeros(1, 1, 16, 16))
        >>> len(sites), [s.kind for s in sites], [s.name for s in sites], sites.searchable
        (3, ['conv', 'max_pool', 'conv'], ['0', '2', '3'], (1,))
        >>> sites[1].in_grid, sites[1].out_grid, sites[1].cum_stride
        ((8, 8), (4, 4), (2, 2))
        >>> sites.space_size, sites.stride_total
        (4, (8, 8))

        >>> import torchvision                                                            # doctest: +SKIP
        >>> sites = find_sites(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))  # doctest: +SKIP
        >>> len(sites), sites[1].stride                                                   # doctest: +SKIP
        (5, (2, 2))
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    x0 = args[0]
    if not isinstance(x0, torch.Tensor):
        raise InputError(f"example_input must be a tensor (N, C, H, W); got {type(x0).__name__}")
    if x0.dim() < 3:
        raise InputError(
            f"example_input must be batched, (N, C, *spatial) with at least one spatial axis; got shape "
            f"{tuple(x0.shape)}. Add a batch axis with x.unsqueeze(0)."
        )
    rec = _Recorder()
    rec.spatial_rank = x0.dim() - 2
    rec.known_grids.add(tuple(x0.shape[2:]))
    modes = {m: m.training for m in model.modules()}
    handles = []
    for name, m in model.named_modules():
        kind = _leaf_kind(m)
        if kind:
            rec.leaf_kind[name] = kind
        handles.append(m.register_forward_pre_hook(rec.pre_hook(name)))
        handles.append(m.register_forward_hook(rec.post_hook(name), always_call=True))
    token = _DISCOVERING.set(rec)
    try:
        model.eval()
        with torch.no_grad(), rec:
            rec.tag(x0, frozenset({_INPUT}))
            try:
                model(*args)
            except Exception as e:  # noqa: BLE001 - re-raised with context below
                if rec.unbatched is not None:
                    raise _unbatched_error(rec.unbatched, x0) from e
                raise InputError(
                    f"{_model_name(model)} failed on an input of shape {tuple(x0.shape)}: {type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}. Check the rank (N, C, H, W), the "
                    f"channel count, and that H and W are large enough for every subsampling step "
                    f"(try a larger --input-size)."
                ) from e
    finally:
        _DISCOVERING.reset(token)
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if rec.unbatched is not None:
        raise _unbatched_error(rec.unbatched, x0)
    if not rec.recs:
        raise NoSubsamplingSiteError(
            f"{_model_name(model)} has no subsampling site on an input of shape {tuple(x0.shape)}: no strided "
            f"conv/pool, patch embedding or patch merging touches the input. undiscard needs at least one "
            f"(a model that never subsamples discards nothing)."
        )
    sites = _build(rec, x0, searchable, _model_name(model))
    if sites.missed:
        warnings.warn(
            f"{_model_name(model)}: {len(sites.missed)} subsampling step(s) are not sites, so their offsets are "
            f"never searched and the displacement of later sites ignores them: {'; '.join(sites.missed)}. "
            f"`undiscard check` fails on this model (docs/limits.md).", MissedSubsamplingWarning, stacklevel=2)
    return sites


def _missed(rec: _Recorder, sites: list[Site], groups: list[list[_Rec]], grid: tuple[int, ...]) -> tuple[str, ...]:
    """The subsampling steps no site accounts for (docs/method.md, "Coverage"), as sentences."""
    s2d = [r.module_path for r in rec.recs if r.module_path is not None]

    def inside(where: str) -> bool:
        return any(p == "" or where == p or where.startswith(p + ".") for p in s2d)

    found = [(ev, f"'{where or '(model)'}' ({fname}) maps the grid {_fmt(gx)} to {_fmt(gy)}")
             for ev, where, fname, gx, gy in rec.reductions if not inside(where)]
    # the main path's grids must chain: a site's input grid is its predecessor's output grid,
    # give or take padding and valid convs (a factor < 1.5)
    prev, prev_ev, prev_name = grid, 0, "the input"
    for site, g in zip(sites, groups):
        if not site.main or len(site.in_grid) != len(prev):
            continue
        ev = min(r.order for r in g)
        if all(n == 1 or n >= 1.5 * m for n, m in zip(prev, site.in_grid)) and any(n > 1 for n in prev) \
                and not any(prev_ev < e < ev for e, _ in found):
            found.append((ev, f"between {prev_name} and site {site.index} ({site.name}) the grid shrinks from "
                              f"{_fmt(prev)} to {_fmt(site.in_grid)} with no site in between"))
        prev, prev_ev, prev_name = site.out_grid, ev, f"site {site.index} ({site.name})"
    return tuple(dict.fromkeys(m for _, m in sorted(found)))  # one line per step (Swin's four slices are one)


def _fmt(g: tuple[int, ...]) -> str:
    return "x".join(map(str, g))


def _unbatched_error(unbatched: tuple[str, tuple[int, ...]], x0: torch.Tensor) -> InputError:
    where, shape = unbatched
    return InputError(
        f"the model input must be batched, (N, C, H, W); got {tuple(x0.shape)}, and the strided op in "
        f"'{where}' received an unbatched {shape}. Add a batch axis with x.unsqueeze(0)."
    )


def _leaf_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return "max_pool"
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return "avg_pool"
    if isinstance(m, nn.PixelUnshuffle):
        return "pixel_unshuffle"
    return None


def _build(rec: _Recorder, x0: torch.Tensor, searchable, model_name: str) -> SiteMap:
    groups: dict[int, list[_Rec]] = {}
    for r in rec.recs:
        groups.setdefault(rec.uf.find(r.id), []).append(r)
    ordered = sorted(groups.values(), key=lambda g: min(r.order for r in g))
    site_of: dict[int, int] = {}
    for i, g in enumerate(ordered):
        for r in g:
            site_of[r.id] = i
    # which sites feed each site's input
    feeds: list[set[int]] = []
    for g in ordered:
        srcs = set()
        for r in g:
            srcs |= {site_of[a] for a in r.in_anc if a != _INPUT}
        feeds.append(srcs)
    n = len(ordered)
    sites: list[Site] = []
    for i, g in enumerate(ordered):
        g = sorted(g, key=lambda r: r.order)
        op0 = g[0].op
        # main path: the next site fed by this one subsamples the grid it made. That grid may be trimmed
        # by valid convs or grown by explicit padding, but stays below ``out * R`` on every
        # strided axis; a side site's output (PVT's reduced keys/values, ``out * R`` ~ the
        # grid the network goes on with) is never subsampled again.
        def continues(j: int) -> bool:
            later = ordered[j][0].op.in_grid
            return all(
                b < a * r for a, b, r in zip(op0.out_grid, later, op0.stride) if r > 1
            )

        fed = [j for j in range(i + 1, n) if i in feeds[j]]
        main = i == n - 1 or (bool(fed) and continues(fed[0]))
        sites.append(Site(i, tuple(r.op for r in g), op0.stride, (), op0.in_grid, op0.out_grid, main))
    # cumulative strides over main-path sites before each site
    out: list[Site] = []
    cum: dict[int, tuple[int, ...]] = {}
    for s in sites:
        d = len(s.stride)
        p = cum.get(d, (1,) * d)
        out.append(replace(s, cum_stride=p))
        if s.main:
            cum[d] = tuple(a * b for a, b in zip(p, s.stride))
    calls = sorted(
        ((r.op.call_index, r.op.kind, r.op.stride, site_of[r.id]) for r in rec.recs if r.op.call_index is not None)
    )
    module_sites = tuple(
        (r.module_path, site_of[r.id], r.op.spatial_dims) for r in rec.recs if r.module_path is not None
    )
    return SiteMap(
        missed=_missed(rec, out, ordered, tuple(x0.shape[2:])),
        sites=tuple(out),
        searchable=resolve_searchable(searchable, out),
        input_shape=tuple(x0.shape),
        calls=tuple((k, st, si) for _, k, st, si in calls),
        module_sites=module_sites,
        model_name=model_name,
    )
