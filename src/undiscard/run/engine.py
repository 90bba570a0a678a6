"""Running a model under offset states, a different state per sample.

The state is passed in, never stored on the model: :func:`use_states` is a context
manager that pushes a thread-local ``TorchFunctionMode`` (and, for space-to-depth
sites, forward pre-hooks that are inert outside this context and this thread) and
always restores the model on exit. Two models, or two threads, can run states at once.

Per-sample states cost no per-sample Python loop: at each site the batch is split by
*distinct offset* (at most ``Rh * Rw`` groups), each group runs the op once, and the
results are scattered back. A site where every sample has offset 0 calls the original
op untouched, so the all-zero state reproduces the model bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from undiscard.errors import SiteMismatchError, StateError
from undiscard.run.inputs import check_batch, check_dtype, check_eval_mode
from undiscard.run.dispatch import CallMatcher, Groups, apply_grouped, group_rows
from undiscard.sites.ops import shift_at_offset
from undiscard.sites.sitemap import SiteMap

__all__ = ["use_states", "run_states"]


_ACTIVE: contextvars.ContextVar[object | None] = contextvars.ContextVar("undiscard_active", default=None)


def _groups(sites: SiteMap, states: torch.Tensor) -> tuple[dict[int, Groups], int | None]:
    """Per site index: its sample groups by distinct offset (only sites where some sample moves)."""
    batch = None if states.dim() == 1 else states.shape[0]
    out: dict[int, Groups] = {}
    for j, i in enumerate(sites.searchable):
        groups = group_rows(states[..., j], sites.sites[i])
        if len(groups) > 1 or any(groups[0][0]):
            out[i] = groups
    return out, batch


def _apply(x: torch.Tensor, groups: Groups, batch: int | None, fn: Callable, where: str) -> Any:
    """``fn(x_group, offset)`` per group, scattered back into one batch."""
    if not (len(groups) == 1 and groups[0][1] is None) and x.shape[0] != batch:
        raise SiteMismatchError(
            f"per-sample states need the batch on axis 0 at every site, but the input of '{where}' has "
            f"{x.shape[0]} rows for a batch of {batch}; run one state per call for this model"
        )
    return apply_grouped(x, groups, fn)


class _StateMode(TorchFunctionMode):
    def __init__(self, sites: SiteMap, groups: dict[int, Groups], batch: int | None) -> None:
        super().__init__()
        self.sites, self.groups, self.batch = sites, groups, batch
        self.matcher = CallMatcher(sites)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        match = self.matcher.site_of(func, args, kwargs)
        if match is None:
            return func(*args, **kwargs)
        call, site_index = match
        groups = self.groups.get(site_index)
        if groups is None:
            return func(*args, **kwargs)
        name = self.sites.sites[site_index].name
        return _apply(call.x, groups, self.batch, lambda xs, off: call.with_input(xs).at_offset(off), name)


@contextlib.contextmanager
def use_states(model: nn.Module, sites: SiteMap, states: Any) -> Iterator[None]:
    """Within this block, ``model(x)`` runs under ``states``.

    Args:
        model: the model ``sites`` was found on (or one with the same architecture).
        sites: from :func:`undiscard.find_sites`.
        states: one state for the whole batch (``(L,)``) or one per sample (``(N, L)``),
            as flat offset indices or offset tuples (see :meth:`SiteMap.encode`).

    The model is not modified; hooks and the interception mode are removed on exit,
    even on error. Every forward inside the block must see the same batch size ``N``.

    Example:
        >>> sites = find_sites(model, x[:1])                            # doctest: +SKIP
        >>> with use_states(model, sites, torch.tensor([[0, 1], [3, 2]])):  # doctest: +SKIP
        ...     y = model(x)  # sample 0 under state (0, 1), sample 1 under (3, 2)
    """
    st = sites.encode(states)
    groups, batch = _groups(sites, st)
    token = object()
    handles = []
    for name, site_index, dims in sites.module_sites:
        g = groups.get(site_index)
        if g is None:
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise SiteMismatchError(
                f"the SiteMap names a space-to-depth module '{name}' that this model does not have; "
                f"call find_sites on this model"
            ) from e
        handles.append(module.register_forward_pre_hook(_shift_hook(token, g, batch, dims, name)))
    mode = _StateMode(sites, groups, batch)
    reset = _ACTIVE.set(token)
    try:
        with mode:
            yield
        if sites.calls and mode.matcher.counter % len(sites.calls):
            raise SiteMismatchError(
                f"the forward made {mode.matcher.counter} strided-op calls; the sites were found with "
                f"{len(sites.calls)} per forward. Call find_sites(model, x) on this model and input size."
            )
    finally:
        _ACTIVE.reset(reset)
        for h in handles:
            h.remove()


def _shift_hook(token: object, groups: Groups, batch: int | None, dims: tuple[int, ...], name: str):
    def hook(module, args):
        if _ACTIVE.get() is not token or not args or not isinstance(args[0], torch.Tensor):
            return None
        x = _apply(args[0], groups, batch, lambda xs, off: shift_at_offset(xs, dims, off), name)
        return (x, *args[1:])

    return hook


def run_states(model: nn.Module, x: Any, states: Any, sites: SiteMap, *, allow_train: bool = False,
               **kwargs: Any) -> Any:
    """``model(x, **kwargs)`` under ``states`` (one for all, or one per sample).

    Differentiable: gradients flow to ``x`` and to the parameters through every state
    (the offset ops are the model's own ops on shifted inputs), so it can train a
    network under offsets.

    Args:
        x: ``(N, C, *spatial)`` with as many spatial axes as the sites have (or, for a
            model that takes something else, whatever it takes; the batch is axis 0).
        states: ``(L,)`` or ``(N, L)`` flat offset indices, or offset tuples.
        sites: from :func:`undiscard.find_sites`.
        allow_train: run a model in train mode (BatchNorm on the batch's statistics,
            its running buffers updated): for training under offsets. Without it a
            model in train mode is refused.

    Returns:
        What ``model`` returns.

    Raises:
        ModelModeError: the model is in train mode and ``allow_train`` is False.
        InputError: an unbatched tensor, or a dtype the model cannot take.
        StateError: states of the wrong shape, not integers, or out of range.

    Shape:
        - x: ``(N, C, *spatial)``, as many spatial axes as the sites have (or whatever the
          model takes, the batch on axis 0).
        - states: ``(L,)`` (one state for the batch) or ``(N, L)`` (one per image),
          ``L = len(sites.searchable)``.
        - output: what ``model(x)`` returns, of its shapes.

    Example:
        >>> from undiscard import find_sites
        >>> model = nn.Sequential(*[nn.Conv2d(1, 2, 3, stride=2, padding=1)] +
        ...                       [nn.Conv2d(2, 2, 3, stride=2, padding=1) for _ in range(2)]).eval()
        >>> x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> sites = find_sites(model, x[:1])
        >>> sites.searchable, sites.searchable_sites[0].num_offsets  # one searched site, 4 offsets
        ((1,), 4)
        >>> torch.equal(run_states(model, x, [0], sites), model(x))  # the default state: the model itself
        True
        >>> y = run_states(model, x, torch.tensor([[0], [3]]), sites)  # image 1 at offset 3 = (1, 1)
        >>> y.shape
        torch.Size([2, 2, 2, 2])
        >>> torch.allclose(y[1:], run_states(model, x[1:], [3], sites), atol=1e-6)
        True
    """
    if not allow_train:
        check_eval_mode(model, what="run_states", opt_in="allow_train=True")
    st = sites.encode(states)
    if isinstance(x, torch.Tensor):
        check_batch(x, len(sites.stride_total))
        check_dtype(model, x)
        if st.dim() == 2 and st.shape[0] != x.shape[0]:
            raise StateError(
                f"per-sample states need one state per image: got {st.shape[0]} states for a batch of "
                f"{x.shape[0]}. Pass (N, L) states with N = {x.shape[0]}, or one (L,) state for the whole batch."
            )
        if x.shape[0] == 0:  # nothing to shift: the plain model on the empty batch
            return model(x, **kwargs)
    with use_states(model, sites, st):
        return model(x, **kwargs)

