"""Which torch calls are subsampling ops, and how to read their arguments.

Every strided op reaches ``__torch_function__`` as one of the callables listed here
(``nn.Conv2d`` calls ``torch.conv2d``, ``nn.MaxPool2d`` calls ``F.max_pool2d``,
torchvision's inception calls ``F.max_pool2d`` directly, timm's same-padding and
blur-pool layers pad explicitly and then call the same functions). So intercepting
these callables finds subsampling in any model, whether it goes through a module or
a functional call.

An :class:`OpCall` is one call with its arguments normalised to per-axis tuples, plus
the means to run it again at another offset (:mod:`undiscard.sites.ops`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from undiscard.sites import ops
from undiscard.errors import UndiscardError

__all__ = ["OpCall", "BINDERS", "RESHAPES", "is_site_call"]


def _tuple(v: Any, nd: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(a) for a in v)
    return v * nd if len(v) == 1 else v


@dataclass(frozen=True)
class OpCall:
    """One call of a (possibly) strided op, arguments normalised.

    ``kind`` is ``conv``, ``max_pool``, ``avg_pool``, ``pixel_unshuffle`` or ``slice``
    (strided indexing, ``x[..., ::2, ::2]``); ``stride``/``kernel``/``padding``/``dilation``
    are per spatial axis. ``dims`` are the input's spatial axes and ``out_dims`` the
    output's (both the trailing ones, except for a slice of a channels-last tensor).
    """

    kind: str
    func: Callable
    x: torch.Tensor
    stride: tuple[int, ...]
    kernel: tuple[int, ...]
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    extra: tuple = ()  # conv: (weight, bias, groups); max: (ceil, return_indices); avg: (ceil, cip, div); slice: (index,)
    dims: tuple[int, ...] | None = None  # None: the trailing len(stride) axes
    out_dims: tuple[int, ...] | None = None

    @property
    def strided(self) -> bool:
        return any(r > 1 for r in self.stride)

    @property
    def spatial_dims(self) -> int:
        return len(self.stride)

    @property
    def in_axes(self) -> tuple[int, ...]:
        """The input's spatial axes (non-negative)."""
        return self.dims if self.dims is not None else tuple(range(self.x.dim() - len(self.stride), self.x.dim()))

    def out_axes(self, y: torch.Tensor) -> tuple[int, ...]:
        """The spatial axes of this call's output ``y``."""
        return self.out_dims if self.out_dims is not None else tuple(range(y.dim() - len(self.stride), y.dim()))

    def with_input(self, x: torch.Tensor) -> OpCall:
        return replace(self, x=x)

    def at_offset(self, offset: tuple[int, ...]) -> torch.Tensor:
        """Run this call with its sampling grid moved by ``offset``."""
        if self.kind == "conv":
            weight, bias, groups = self.extra
            return ops.conv_at_offset(self.x, weight, bias, self.stride, self.padding, self.dilation, groups, offset)
        if self.kind == "max_pool":
            ceil_mode, return_indices = self.extra
            if return_indices and any(offset):
                raise UndiscardError(
                    "a max-pool that returns indices (used by max-unpooling decoders) cannot be run at a "
                    "non-zero offset; make that site non-searchable (SiteMap.with_searchable)"
                )
            return ops.max_pool_at_offset(self.x, self.kernel, self.stride, self.padding, self.dilation, ceil_mode, offset)
        if self.kind == "avg_pool":
            ceil_mode, cip, div = self.extra
            return ops.avg_pool_at_offset(self.x, self.kernel, self.stride, self.padding, ceil_mode, cip, div, offset)
        if self.kind == "pixel_unshuffle":
            return ops.pixel_unshuffle_at_offset(self.x, self.stride[0], offset)
        if self.kind == "slice":
            return ops.slice_at_offset(self.x, self.extra[0], self.in_axes, offset)
        raise AssertionError(self.kind)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _bind_conv(nd: int):
    def bind(func, args, kwargs) -> OpCall:
        x, weight = _arg(args, kwargs, 0, "input", None), _arg(args, kwargs, 1, "weight", None)
        bias = _arg(args, kwargs, 2, "bias", None)
        stride = _tuple(_arg(args, kwargs, 3, "stride", 1), nd)
        padding = _arg(args, kwargs, 4, "padding", 0)
        if isinstance(padding, str):  # 'valid' == 0; 'same' is only legal at stride 1 (never a site)
            padding = 0
        dilation = _tuple(_arg(args, kwargs, 5, "dilation", 1), nd)
        groups = _arg(args, kwargs, 6, "groups", 1)
        kernel = tuple(weight.shape[2:])
        return OpCall("conv", func, x, stride, kernel, _tuple(padding, nd), dilation, (weight, bias, groups))

    return bind


def _pool_geometry(args: tuple, kwargs: dict, nd: int):
    """input, kernel, stride (None or () means = kernel, as in PyTorch), padding."""
    x = _arg(args, kwargs, 0, "input", None)
    kernel = _tuple(_arg(args, kwargs, 1, "kernel_size", None), nd)
    stride = _arg(args, kwargs, 2, "stride", None)
    stride = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _tuple(stride, nd)
    return x, kernel, stride, _tuple(_arg(args, kwargs, 3, "padding", 0), nd)


def _bind_max_pool(nd: int, with_indices: bool):
    def bind(func, args, kwargs) -> OpCall:
        x, kernel, stride, padding = _pool_geometry(args, kwargs, nd)
        dilation = _tuple(_arg(args, kwargs, 4, "dilation", 1), nd)
        ceil_mode = bool(_arg(args, kwargs, 5, "ceil_mode", False))
        ret = with_indices or bool(_arg(args, kwargs, 6, "return_indices", False))
        return OpCall("max_pool", func, x, stride, kernel, padding, dilation, (ceil_mode, ret))

    return bind


def _bind_avg_pool(nd: int):
    def bind(func, args, kwargs) -> OpCall:
        x, kernel, stride, padding = _pool_geometry(args, kwargs, nd)
        ceil_mode = bool(_arg(args, kwargs, 4, "ceil_mode", False))
        cip = bool(_arg(args, kwargs, 5, "count_include_pad", True))
        div = _arg(args, kwargs, 6, "divisor_override", None) if nd > 1 else None
        return OpCall("avg_pool", func, x, stride, kernel, padding, (1,) * nd, (ceil_mode, cip, div))

    return bind


def _bind_pixel_unshuffle(func, args, kwargs) -> OpCall:
    x = _arg(args, kwargs, 0, "input", None)
    r = int(_arg(args, kwargs, 1, "downscale_factor", 1))
    return OpCall("pixel_unshuffle", func, x, (r, r), (r, r), (0, 0), (1, 1))


_NOT_STRIDED = OpCall("slice", None, None, (1,), (1,))  # type: ignore[arg-type]


def _bind_getitem(func, args, kwargs) -> OpCall:
    """``x[index]`` with a step > 1 on some axis other than the batch axis: strided slicing.

    Only basic indexing is read (slices, ints, ``...``, ``None``); the batch axis must be
    kept whole (``:`` or inside ``...``) so a batch can be split by state. Anything else
    (advanced indexing, a step on the batch axis) is not a subsampling op.
    """
    x = args[0] if args else None
    index = args[1] if len(args) > 1 else None
    if not isinstance(x, torch.Tensor):
        return _NOT_STRIDED
    items = index if isinstance(index, tuple) else (index,)
    if not any(isinstance(it, slice) and it.step not in (None, 1) for it in items):
        return _NOT_STRIDED  # the common case, decided without walking the index
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    if any(not (it is None or it is Ellipsis or isinstance(it, (slice, int))) or isinstance(it, bool) for it in items) \
            or sum(it is Ellipsis for it in items) > 1 or consumed > x.dim():
        return _NOT_STRIDED
    dims, out_dims, steps = [], [], []
    d = o = 0  # input axis, output axis
    for it in items:
        if it is Ellipsis:
            skip = x.dim() - consumed
            d, o = d + skip, o + skip
        elif it is None:
            o += 1
        elif isinstance(it, int):
            if d == 0:
                return _NOT_STRIDED  # drops the batch axis
            d += 1
        else:
            step = 1 if it.step is None else int(it.step)
            if step > 1:
                if d == 0:
                    return _NOT_STRIDED  # a step on the batch axis
                dims.append(d)
                out_dims.append(o)
                steps.append(step)
            elif d == 0 and (it.start not in (None, 0) or it.stop is not None):
                return _NOT_STRIDED  # cuts the batch
            d, o = d + 1, o + 1
    if not dims:
        return _NOT_STRIDED
    stride = tuple(steps)
    return OpCall("slice", func, x, stride, stride, (0,) * len(stride), (1,) * len(stride), (index,),
                  tuple(dims), tuple(out_dims))


#: callable -> binder(func, args, kwargs) -> OpCall
BINDERS: dict[Callable, Callable[[Callable, tuple, dict], OpCall]] = {
    torch.conv1d: _bind_conv(1),
    torch.conv2d: _bind_conv(2),
    torch.conv3d: _bind_conv(3),
    F.max_pool1d: _bind_max_pool(1, False),
    F.max_pool2d: _bind_max_pool(2, False),
    F.max_pool3d: _bind_max_pool(3, False),
    F.max_pool1d_with_indices: _bind_max_pool(1, True),
    F.max_pool2d_with_indices: _bind_max_pool(2, True),
    F.max_pool3d_with_indices: _bind_max_pool(3, True),
    torch.max_pool1d: _bind_max_pool(1, False),
    torch.max_pool2d: _bind_max_pool(2, False),
    torch.max_pool3d: _bind_max_pool(3, False),
    torch.avg_pool1d: _bind_avg_pool(1),
    torch._C._nn.avg_pool2d: _bind_avg_pool(2),
    torch._C._nn.avg_pool3d: _bind_avg_pool(3),
    torch.pixel_unshuffle: _bind_pixel_unshuffle,
    torch.Tensor.__getitem__: _bind_getitem,
}


def is_site_call(call: OpCall, spatial_rank: int) -> bool:
    """Whether a bound call subsamples: strided; for a slice, stepping as many axes as the
    model input has spatial axes (a step on one axis of a 2-D model's tensor is channel or
    token bookkeeping, such as rotary embeddings' ``x[..., ::2]``); for a pool, not global."""
    if not call.strided:
        return False
    if call.kind == "slice":
        return len(call.stride) == spatial_rank
    if call.kind in ("max_pool", "avg_pool"):
        return not is_global_pool(call)
    return True


def is_global_pool(call: OpCall) -> bool:
    """A pooling window that covers the whole (padded) map on every axis: a global pool,
    which leaves one value per channel and no grid to move (not a subsampling site)."""
    sizes = call.x.shape[call.x.dim() - len(call.kernel):]
    return all(k >= n + 2 * p for k, n, p in zip(call.kernel, sizes, call.padding or (0,) * len(sizes)))

#: tensor reshapes that can split a spatial axis into (grid, patch) — a space-to-depth sign
RESHAPES = frozenset({
    torch.Tensor.reshape, torch.Tensor.view, torch.reshape, torch.Tensor.unflatten, torch.unflatten,
})
