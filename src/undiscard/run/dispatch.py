"""The one place a forward under states meets the torch calls it intercepts.

Both engines (:mod:`~undiscard.run.engine`, one row per state; :mod:`~undiscard.run.trie`, rows
shared between states with a common prefix) see every torch call of a forward through a
``TorchFunctionMode``. They share three steps, defined here once:

* :class:`CallMatcher`: bind a call (:data:`~undiscard.sites.calls.BINDERS`), and match the strided
  ones, in execution order, against the calls :func:`~undiscard.sites.discover.find_sites`
  recorded, which names the site each one belongs to;
* :func:`group_rows` / :func:`apply_grouped`: split a batch by the offset each row takes at a
  site, run the op at each offset once, and scatter the results back into row order;
* :func:`tensors_in`: the tensors inside nested call arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from undiscard.errors import SiteMismatchError
from undiscard.sites.calls import BINDERS, OpCall, is_site_call
from undiscard.sites.sitemap import Site, SiteMap

__all__ = ["Groups", "CallMatcher", "group_rows", "apply_grouped", "tensors_in"]

#: ``[(offset tuple, row indices)]``, or ``[(offset, None)]`` when every row takes the same offset.
Groups = list[tuple[tuple[int, ...], torch.Tensor | None]]


class CallMatcher:
    """Match the strided calls of one forward, in order, against the ones a :class:`SiteMap` recorded."""

    def __init__(self, sites: SiteMap) -> None:
        self.calls = sites.calls
        self.counter = 0
        self.spatial_rank = len(sites.input_shape) - 2

    def site_of(self, func, args: tuple, kwargs: dict) -> tuple[OpCall, int] | None:
        """``(bound call, site index)`` for a strided subsampling call; None for any other call.

        Raises :class:`SiteMismatchError` when the forward's strided calls stop matching the
        recorded ones (another model, or control flow that depends on the input)."""
        binder = BINDERS.get(func)
        if binder is None:
            return None
        call = binder(func, args, kwargs)
        if not is_site_call(call, self.spatial_rank):
            return None
        n = len(self.calls)
        i = self.counter % n if n else 0
        if not n or self.calls[i][:2] != (call.kind, call.stride):
            expected = self.calls[i][:2] if n else None
            raise SiteMismatchError(
                f"strided op #{self.counter} of this forward is a {call.kind} with stride {call.stride}, but the "
                f"sites were found with {expected}: this model is not the one the SiteMap was built from, or its "
                f"control flow depends on the input. Call find_sites(model, x) on this model and input size."
            )
        self.counter += 1
        return call, self.calls[i][2]


def group_rows(col: torch.Tensor, site: Site) -> Groups:
    """The rows of a batch grouped by their flat offset index ``col`` at ``site``.

    Shape: ``col`` is ``(N,)`` (or a scalar: one state for the whole batch).
    One group without indices when every row takes the same offset (no rows: offset 0).
    """
    values = torch.unique(col)
    if len(values) <= 1:
        return [(site.offset_of(int(values[0]) if len(values) else 0), None)]
    return [(site.offset_of(int(k)), (col == k).nonzero().flatten()) for k in values.tolist()]


def apply_grouped(x: torch.Tensor, groups: Groups, fn: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]
                  ) -> torch.Tensor:
    """``fn(rows, offset)`` once per group, scattered back into one batch in row order.

    Shape: ``x`` is ``(N, ...)``; the result is ``(N, ...)`` with ``fn``'s trailing shape.
    """
    if len(groups) == 1 and groups[0][1] is None:
        return fn(x, groups[0][0])
    y = None
    for offset, idx in groups:
        idx = idx.to(x.device)
        part = fn(x.index_select(0, idx), offset)
        if y is None:
            y = part.new_empty((x.shape[0], *part.shape[1:]))
        y.index_copy_(0, idx, part)
    return y


def tensors_in(obj: Any, out: list | None = None) -> list[torch.Tensor]:
    """The tensors inside ``obj`` (nested lists, tuples and dict values), depth first, appended to ``out``.

    Shape:
        - obj: a tensor of any shape, or any nesting of lists, tuples and dicts holding some.
        - output: the same tensor objects (not copies), whatever their shapes.

    Example:
        >>> [tuple(t.shape) for t in tensors_in([torch.zeros(1), {"a": (torch.ones(2, 3), 3)}])]
        [(1,), (2, 3)]
    """
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            tensors_in(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            tensors_in(o, out)
    return out
