"""Sites, site maps and states: what an offset at each subsampling site means.

A :class:`Site` is one logical subsampling step of a model; a :class:`SiteMap` holds a model's sites in
execution order, which of them are searchable, and the encoding of states (one offset per searchable
site, as tuples or flat indices) and their displacement. :func:`undiscard.sites.discover.find_sites`
builds one (docs/method.md, "Sites, offsets, states").
"""


from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from undiscard.errors import StateError

__all__ = ["SiteOp", "Site", "SiteMap", "resolve_searchable"]


@dataclass(frozen=True)
class SiteOp:
    """One op of a site.

    Attributes:
        name: module path of the op (``layer2.0.downsample.0``); a functional call made in a
            module's ``forward`` is named ``<module>:<function>``.
        kind: ``conv``, ``max_pool``, ``avg_pool``, ``pixel_unshuffle`` or ``space_to_depth``.
        call_index: position among the model's strided-op calls in one forward
            (``None`` for a space-to-depth module, which is addressed by ``name``).
        stride, kernel: per spatial axis.
        in_grid, out_grid: spatial size of the op's input and output on the example input.
        spatial_dims: tensor axes that carry space in the op's input (``(2, 3)`` for NCHW).
    """

    name: str
    kind: str
    call_index: int | None
    stride: tuple[int, ...]
    kernel: tuple[int, ...]
    in_grid: tuple[int, ...]
    out_grid: tuple[int, ...]
    spatial_dims: tuple[int, ...]


@dataclass(frozen=True)
class Site:
    """One logical subsampling step; every op in it takes the same offset.

    Attributes:
        index: position in forward order.
        ops: the ops that share the offset.
        stride: ``(Rh, Rw)`` (one entry per spatial axis).
        cum_stride: ``P_l``, product of the strides of all main-path sites before this one.
        in_grid, out_grid: spatial size on the example input.
        main: on the main path (moves the grid that later layers see); see module doc.
    """

    index: int
    ops: tuple[SiteOp, ...]
    stride: tuple[int, ...]
    cum_stride: tuple[int, ...]
    in_grid: tuple[int, ...]
    out_grid: tuple[int, ...]
    main: bool

    @property
    def name(self) -> str:
        return self.ops[0].name if len(self.ops) == 1 else " + ".join(o.name for o in self.ops)

    @property
    def kind(self) -> str:
        return "+".join(dict.fromkeys(o.kind for o in self.ops))

    @property
    def num_offsets(self) -> int:
        return math.prod(self.stride)

    @property
    def offsets(self) -> list[tuple[int, ...]]:
        """All offsets in flat-index order (row-major: index ``k = sh * Rw + sw``)."""
        return list(itertools.product(*(range(r) for r in self.stride)))

    def offset_of(self, k: int) -> tuple[int, ...]:
        out = []
        for r in reversed(self.stride):
            out.append(k % r)
            k //= r
        return tuple(reversed(out))

    def index_of(self, offset: Sequence[int]) -> int:
        k = 0
        for s, r in zip(offset, self.stride):
            k = k * r + int(s)
        return k

    def as_dict(self, searchable: bool) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "kind": self.kind,
            "stride": list(self.stride),
            "cum_stride": list(self.cum_stride),
            "in_grid": list(self.in_grid),
            "out_grid": list(self.out_grid),
            "num_offsets": self.num_offsets,
            "searchable": searchable,
            "main": self.main,
            "ops": [
                {"name": o.name, "kind": o.kind, "stride": list(o.stride), "kernel": list(o.kernel)} for o in self.ops
            ],
        }


def _offset_int(v: Any, site: Site) -> int:
    """An offset (index or tuple entry) as an ``int``; floats, bools and strings are refused."""
    if isinstance(v, bool) or isinstance(v, float) or (isinstance(v, torch.Tensor) and not (
            v.dim() == 0 and not v.is_floating_point() and v.dtype != torch.bool)):
        raise StateError(
            f"offsets are integers, but site {site.index} ({site.name}) got {v!r} ({type(v).__name__}): pass flat "
            f"offset indices 0..{site.num_offsets - 1} or integer tuples with 0 <= s[a] < {site.stride}"
        )
    try:
        return operator.index(v)
    except TypeError:
        raise StateError(
            f"offsets are integers, but site {site.index} ({site.name}) got {v!r} ({type(v).__name__})"
        ) from None


@dataclass(frozen=True)
class SiteMap:
    """The sites of a model, which of them are searched, and how to address them at run time.

    A *state* (docs/method.md) gives one offset per searchable site. It is written either as a
    sequence of per-site offset tuples (``[(0, 1), (1, 1)]``) or as flat offset indices
    (``[1, 3]``, index ``k = sh * Rw + sw``); a batch of states is a ``(N, L)`` LongTensor
    of flat indices with ``L = len(searchable)``. Non-searchable sites stay at offset 0.
    """

    sites: tuple[Site, ...]
    searchable: tuple[int, ...]
    input_shape: tuple[int, ...]
    #: (kind, stride, site index) of every strided-op call, in call order
    calls: tuple[tuple[str, tuple[int, ...], int], ...]
    #: (module path, site index, spatial axes) of each space-to-depth module ("" = the model)
    module_sites: tuple[tuple[str, int, tuple[int, ...]], ...] = ()
    model_name: str = ""
    #: subsampling steps that no site accounts for (docs/method.md, "Coverage"); empty when covered
    missed: tuple[str, ...] = ()

    # -- views -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def __getitem__(self, i: int) -> Site:
        return self.sites[i]

    @property
    def searchable_sites(self) -> tuple[Site, ...]:
        return tuple(self.sites[i] for i in self.searchable)

    @property
    def space_size(self) -> int:
        """Number of states: product of ``Rh * Rw`` over searchable sites."""
        return math.prod(s.num_offsets for s in self.searchable_sites)

    @property
    def stride_total(self) -> tuple[int, ...]:
        """Product of the strides of all main-path sites (the final map's cell size in pixels)."""
        main = [s for s in self.sites if s.main]
        return tuple(math.prod(a) for a in zip(*(s.stride for s in main)))

    def with_searchable(self, which: str | Iterable[int]) -> SiteMap:
        """A copy with another set of searchable sites: ``"inner"``, ``"all"`` or indices."""
        return replace(self, searchable=resolve_searchable(which, self.sites))

    def as_dicts(self) -> list[dict[str, Any]]:
        return [s.as_dict(s.index in self.searchable) for s in self.sites]

    # -- states --------------------------------------------------------------
    def zero_state(self, batch: int | None = None) -> torch.Tensor:
        """The default state, ``(L,)`` or ``(batch, L)``."""
        shape = (len(self.searchable),) if batch is None else (batch, len(self.searchable))
        return torch.zeros(shape, dtype=torch.long)

    def encode(self, state: Any) -> torch.Tensor:
        """Normalise one state or a batch of states to flat offset indices, checking range.

        Accepts a ``(L,)``/``(N, L)`` integer tensor of flat indices, or Python sequences:
        one state is ``L`` items, each a flat index or an offset tuple; a batch is a list
        of states. (With ``L == 2`` 2-d sites, ``[(0, 1), (1, 1)]`` reads as ONE state of
        offset tuples; pass a tensor for a batch of flat indices.)

        Returns:
            LongTensor ``(L,)`` or ``(N, L)``.

        Raises:
            StateError: wrong length, or an offset out of range for its site.
        """
        L = len(self.searchable)
        if isinstance(state, torch.Tensor):
            if state.is_floating_point() or state.is_complex() or state.dtype == torch.bool:
                raise StateError(f"a state holds integer offset indices; got a {state.dtype} tensor")
            t = state.long().cpu()
        else:
            seq = list(state)
            if self._is_one_state(seq):
                t = torch.tensor(self._flat(seq), dtype=torch.long).reshape(len(seq))
            else:
                rows = [self._flat(list(s)) for s in seq]
                t = torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1)
        if t.dim() not in (1, 2) or t.shape[-1] != L:
            names = ", ".join(f"{i}:{self.sites[i].name}" for i in self.searchable)
            raise StateError(
                f"a state needs one offset per searchable site ({L}: {names or 'none'}); got shape "
                f"{tuple(t.shape)}. Pass a (L,) or (N, L) tensor of flat offset indices, or change the "
                f"searchable sites with SiteMap.with_searchable(...)"
            )
        for j, site in enumerate(self.searchable_sites):
            col = t[..., j]
            bad = (col < 0) | (col >= site.num_offsets)
            if bool(bad.any()):
                raise StateError(
                    f"offset index {int(col[bad][0])} at searchable site {j} (site {site.index}, {site.name}) is "
                    f"out of range: the site has stride {site.stride}, so offsets are 0..{site.num_offsets - 1} "
                    f"(as tuples: 0 <= s[a] < stride[a])"
                )
        return t

    def _is_one_state(self, seq: list) -> bool:
        if all(not isinstance(v, (tuple, list)) for v in seq):  # scalars (ints; anything else is refused)
            return True
        return len(seq) == len(self.searchable) and all(
            isinstance(v, tuple) and all(not isinstance(a, (tuple, list)) for a in v) for v in seq
        )

    def _flat(self, st: list) -> list[int]:
        if len(st) != len(self.searchable):
            raise StateError(
                f"a state needs one offset per searchable site ({len(self.searchable)}, sites "
                f"{list(self.searchable)}); got {len(st)}: {st!r}"
            )
        out = []
        for v, site in zip(st, self.searchable_sites):
            if isinstance(v, (tuple, list)):
                v = tuple(_offset_int(a, site) for a in v)
                if len(v) != len(site.stride) or any(not 0 <= a < r for a, r in zip(v, site.stride)):
                    raise StateError(
                        f"offset {tuple(v)} at site {site.index} ({site.name}) is out of range: stride "
                        f"{site.stride}, so each s[a] must satisfy 0 <= s[a] < stride[a]"
                    )
                out.append(site.index_of(v))
            else:
                out.append(_offset_int(v, site))
        return out

    def offsets(self, states: torch.Tensor) -> list[list[tuple[int, ...]]]:
        """Flat indices ``(N, L)`` -> per-sample lists of offset tuples."""
        states = self.encode(states)
        if states.dim() == 1:
            states = states[None]
        return [[self.searchable_sites[j].offset_of(int(k)) for j, k in enumerate(row)] for row in states]

    def displacement(self, states: Any) -> torch.Tensor:
        """``Delta(s)`` in input pixels per spatial axis (docs/method.md, "Displacement"): ``sum_l s_l * P_l``.

        ``P_l`` is the product of the strides of ALL main-path sites before site ``l``
        (searchable or not). Side sites move no later grid and contribute 0.

        Returns:
            LongTensor ``(N, D)`` (or ``(D,)`` for a single state).
        """
        st = self.encode(states)
        single = st.dim() == 1
        st = st[None] if single else st
        dims = {len(s.stride) for s in self.sites if s.main}
        if len(dims) != 1:
            raise StateError(f"displacement needs main-path sites of one spatial rank; got ranks {sorted(dims)}")
        (d,) = dims
        delta = torch.zeros(st.shape[0], d, dtype=torch.long)
        for j, site in enumerate(self.searchable_sites):
            if not site.main:
                continue
            r = torch.tensor(site.stride, dtype=torch.long)
            k = st[:, j]
            # row-major decode of the flat index into an offset tuple
            divisors = torch.tensor([math.prod(site.stride[a + 1:]) for a in range(d)], dtype=torch.long)
            off = (k[:, None] // divisors) % r
            delta += off * torch.tensor(site.cum_stride, dtype=torch.long)
        return delta[0] if single else delta


def resolve_searchable(which: str | Iterable[int], sites: Sequence[Site]) -> tuple[int, ...]:
    n = len(sites)
    if isinstance(which, str):
        if which == "all":
            return tuple(range(n))
        if which in ("inner", "main"):
            # the default: every main-path site but the first and the last (the paper's best
            # accuracy and latency); with <= 2 of them that leaves nothing, so all are searched.
            # Side sites (PVT's key/value reduction) are opt-in: one per block, they would
            # multiply the space without moving the grid.
            main = [s.index for s in sites if s.main]
            return tuple(main[1:-1]) if which == "inner" and len(main) > 2 else tuple(main)
        raise StateError(f"searchable must be 'inner', 'main', 'all' or a list of site indices; got {which!r}")
    idx = tuple(sorted({int(i) for i in which}))
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise StateError(f"site indices {bad} out of range: the model has {n} sites (0..{n - 1})")
    return idx


