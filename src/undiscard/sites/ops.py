"""Subsampling ops evaluated at a non-zero offset.

Offset semantics (docs/method.md, "Offset semantics and end fill"): for an op with stride ``R`` and padding ``p`` on input ``x``,
``y_s[i] = z[i*R + s]`` where ``z`` is the same op at stride 1 on the same padded input.
The output keeps the shape of the default (``s = 0``) output. Where ``z`` has no
element (the last row/column of odd sizes) the op is evaluated over a *fill* that
continues the padding: zeros for convolutions, ``-inf`` for max-pooling, and positions
excluded from the divisor for average pooling.

Every function here takes the op's own arguments (already normalised to per-axis
tuples) plus ``offset`` (one int per spatial axis), and returns exactly the tensor of
the default op when ``offset`` is all zeros. Implementation: moving the sampling grid
by ``s`` is the same as cropping ``s`` from the leading padding and adding ``s`` of fill
to the trailing padding, then running the op with padding 0. That costs the same as the
default op (no stride-1 evaluation), and the tests check it against the stride-1-then-
slice reference.

One edge the definition leaves open: a window lying *entirely* in fill (possible only
when ``R > k - p``: the stride exceeds the kernel's reach). Such a window has no input
element. A convolution gives its bias there, as over zero padding; max- and
average-pooling give 0 (rather than ``-inf`` or ``0/0``). (A dilated max-pool whose
taps all skip the input is ``-inf`` as in PyTorch's own op at offset 0; left as is.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Offset = tuple[int, ...]

__all__ = [
    "conv_at_offset",
    "max_pool_at_offset",
    "avg_pool_at_offset",
    "shift_at_offset",
    "pixel_unshuffle_at_offset",
    "slice_at_offset",
]


def _pad_spec(pad_lo: Sequence[int], pad_hi: Sequence[int]) -> list[int]:
    """Per-axis (lo, hi) pads (first axis first) -> F.pad's last-axis-first list."""
    spec: list[int] = []
    for lo, hi in zip(reversed(pad_lo), reversed(pad_hi)):
        spec += [lo, hi]
    return spec


def _pad(x: torch.Tensor, lo: Sequence[int], hi: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """F.pad with per-axis leading ``lo`` (negative: crop) and trailing ``hi``.

    F.pad cannot crop more than the tensor holds; a crop deeper than the input (an offset
    past a tiny map, ``s - p > n``) pads first and then cuts, giving pure fill.
    """
    sizes = x.shape[x.dim() - len(lo):]
    if all(lv > -n for lv, n in zip(lo, sizes)):
        return F.pad(x, _pad_spec(lo, hi), value=value)
    start = [max(-lv, 0) for lv in lo]
    lengths = [lv + n + h for lv, n, h in zip(lo, sizes, hi)]
    lo2 = [max(lv, 0) for lv in lo]
    hi2 = [max(st + ln - n - l2, 0) for st, ln, n, l2 in zip(start, lengths, sizes, lo2)]
    y = F.pad(x, _pad_spec(lo2, hi2), value=value)
    for axis, (st, ln) in enumerate(zip(start, lengths)):
        y = y.narrow(y.dim() - len(lo) + axis, st, ln)
    return y


def _out_len(length: int, k: int, r: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's output length for a pooling/conv window (incl. the ceil_mode rule)."""
    span = length + 2 * p - d * (k - 1) - 1
    if ceil_mode:
        n = -(-span // r) + 1
        # PyTorch: the last window must start inside the input or the left padding.
        if (n - 1) * r >= length + p:
            n -= 1
    else:
        n = span // r + 1
    return n


def _shifted_pads(
    sizes: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    offset: Offset,
    out_sizes: Sequence[int],
) -> tuple[list[int], list[int]]:
    """Leading/trailing pads that move the window grid by ``offset`` and keep ``out_sizes``.

    The leading pad ``p - s`` is negative when ``s > p`` (F.pad then crops). The trailing
    pad is whatever makes ``out_sizes`` windows fit, never less than the original ``p``
    plus ``s``, so the total length matches the default op whenever no fill is needed.
    """
    lo, hi = [], []
    for n_in, k, r, p, d, s, n_out in zip(sizes, kernel, stride, padding, dilation, offset, out_sizes):
        need = (n_out - 1) * r + d * (k - 1) + 1  # padded length the windows must cover
        lead = p - s
        trail = max(need - (n_in + lead), 0)
        lo.append(lead)
        hi.append(trail)
    return lo, hi


def conv_at_offset(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    offset: Offset,
) -> torch.Tensor:
    """Strided convolution sampled at ``offset`` instead of 0.

    Args:
        x: ``(N, C, *spatial)`` input (1, 2 or 3 spatial axes).
        weight, bias, stride, padding, dilation, groups: as in ``F.conv{1,2,3}d``
            (``stride``/``padding``/``dilation`` as per-axis tuples, padding numeric).
        offset: one int per spatial axis, ``0 <= offset[a] < stride[a]``.

    Returns:
        ``(N, C_out, *out_spatial)``, the shape of the default output.

    Shape:
        - x: ``(N, C_in, *spatial)``, 1 to 3 spatial axes (the batch axis is required).
        - weight: ``(C_out, C_in / groups, *kernel)``; bias: ``(C_out,)`` or ``None``.
        - output: ``(N, C_out, *out_spatial)`` with
          ``out_spatial[a] = (spatial[a] + 2 padding[a] - dilation[a] (kernel[a] - 1) - 1) // stride[a] + 1``,
          the default op's size whatever the offset.

    Example:
        >>> x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
        >>> conv_at_offset(x, w, None, (2, 2), (1, 1), (1, 1), 1, (1, 0)).shape
        torch.Size([1, 4, 4, 4])

        Offset ``s`` samples the stride-1 output at ``i * R + s`` (a 1x1 kernel picks pixels):

        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> conv_at_offset(x, torch.ones(1, 1, 1, 1), None, (2, 2), (0, 0), (1, 1), 1, (1, 0)).tolist()
        [[[[4.0, 6.0], [12.0, 14.0]]]]
        >>> x, w = torch.arange(64.0).reshape(1, 1, 8, 8), torch.ones(1, 1, 3, 3)
        >>> y = conv_at_offset(x, w, None, (2, 2), (1, 1), (1, 1), 1, (1, 1))
        >>> torch.allclose(y, F.conv2d(x, w, padding=1)[..., 1::2, 1::2])
        True
    """
    nd = x.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    if not any(offset):
        return conv(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    sizes = x.shape[2:]
    kernel = weight.shape[2:]
    out = [_out_len(n, k, r, p, d, False) for n, k, r, p, d in zip(sizes, kernel, stride, padding, dilation)]
    lo, hi = _shifted_pads(sizes, kernel, stride, padding, dilation, offset, out)
    xp = _pad(x, lo, hi)
    y = conv(xp, weight, bias, tuple(stride), 0, tuple(dilation), groups)
    return y[(Ellipsis, *[slice(0, n) for n in out])]


def max_pool_at_offset(
    x: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    offset: Offset,
) -> torch.Tensor:
    """Strided max-pooling sampled at ``offset``; padding and fill are ``-inf``.

    Args:
        x: ``(N, C, *spatial)``. Other arguments as in ``F.max_pool{1,2,3}d`` (per-axis).

    Returns:
        ``(N, C, *out_spatial)``, the shape of the default output.

    Shape:
        - x: ``(N, C, *spatial)``, 1 to 3 spatial axes.
        - output: ``(N, C, *out_spatial)``, the size of the default op (``ceil_mode`` included).

    Example:
        The windows at offset ``(1, 1)`` start one row and one column in; the last ones
        reach into the ``-inf`` fill:

        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> max_pool_at_offset(x, (2, 2), (2, 2), (0, 0), (1, 1), False, (1, 1)).tolist()
        [[[[10.0, 11.0], [14.0, 15.0]]]]
    """
    nd = x.dim() - 2
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    if not any(offset):
        return pool(x, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), ceil_mode)
    sizes = x.shape[2:]
    out = [_out_len(n, k, r, p, d, ceil_mode) for n, k, r, p, d in zip(sizes, kernel, stride, padding, dilation)]
    lo, hi = _shifted_pads(sizes, kernel, stride, padding, dilation, offset, out)
    xp = _pad(x, lo, hi, float("-inf"))
    y = pool(xp, tuple(kernel), tuple(stride), 0, tuple(dilation), False)
    y = y[(Ellipsis, *[slice(0, n) for n in out])]
    return _zero_empty_windows(y, sizes, stride, lo, out)


def avg_pool_at_offset(
    x: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
    offset: Offset,
) -> torch.Tensor:
    """Strided average pooling sampled at ``offset``.

    The original padding counts in the divisor iff ``count_include_pad`` (as in PyTorch);
    the end fill that an offset adds never counts. ``divisor_override`` replaces the count.

    Args:
        x: ``(N, C, *spatial)``. Other arguments as in ``F.avg_pool{1,2,3}d`` (per-axis).

    Returns:
        ``(N, C, *out_spatial)``, the shape of the default output.

    Shape:
        - x: ``(N, C, *spatial)``, 1 to 3 spatial axes.
        - output: ``(N, C, *out_spatial)``, the size of the default op (``ceil_mode`` included).

    Example:
        The fill an offset adds is left out of the divisor (``[7, 11] -> 9``, ``[15] -> 15``):

        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> avg_pool_at_offset(x, (2, 2), (2, 2), (0, 0), False, True, None, (1, 1)).tolist()
        [[[[7.5, 9.0], [13.5, 15.0]]]]
    """
    nd = x.dim() - 2
    if not any(offset):
        if nd == 1:
            return F.avg_pool1d(x, tuple(kernel), tuple(stride), tuple(padding), ceil_mode, count_include_pad)
        pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
        return pool(x, tuple(kernel), tuple(stride), tuple(padding), ceil_mode, count_include_pad, divisor_override)
    if nd == 1:  # avg_pool1d has no divisor_override: compute it as a 2-D pool of height 1
        y = avg_pool_at_offset(
            x.unsqueeze(-2), (1, *kernel), (1, *stride), (0, *padding), ceil_mode, count_include_pad,
            divisor_override, (0, *offset),
        )
        return y.squeeze(-2)
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    sizes = x.shape[2:]
    ones = (1,) * nd
    out = [_out_len(n, k, r, p, 1, ceil_mode) for n, k, r, p in zip(sizes, kernel, stride, padding)]
    lo, hi = _shifted_pads(sizes, kernel, stride, padding, ones, offset, out)
    window_sum = pool(_pad(x, lo, hi), tuple(kernel), tuple(stride), 0, False, True, 1)
    window_sum = window_sum[(Ellipsis, *[slice(0, n) for n in out])]
    if divisor_override is not None:
        return window_sum / divisor_override
    # The divisor: 1 on the input, 1 on the original padding iff count_include_pad,
    # and (like PyTorch's ceil_mode) 0 beyond the original padding.
    mask = torch.ones((1, 1, *sizes), dtype=x.dtype, device=x.device)
    mask = F.pad(mask, _pad_spec(padding, padding), value=1.0 if count_include_pad else 0.0)
    mask = _pad(mask, [lv - p for lv, p in zip(lo, padding)], [h - p for h, p in zip(hi, padding)])
    count = pool(mask, tuple(kernel), tuple(stride), 0, False, True, 1)
    count = count[(Ellipsis, *[slice(0, n) for n in out])]
    return window_sum / count.clamp_min(1.0)


def _zero_empty_windows(y: torch.Tensor, sizes, stride, lead, out) -> torch.Tensor:
    """Max-pool outputs whose window holds no input element become 0, not ``-inf``.

    Window ``i`` starts at padded position ``i*r``; the input sits at ``[lead, lead + n)``.
    Only trailing windows can be empty (PyTorch requires ``p <= k/2``).
    """
    for axis, (n_in, r, lv, n_out) in enumerate(zip(sizes, stride, lead, out)):
        first_empty = next((i for i in range(n_out) if i * r - lv >= n_in), n_out)
        if first_empty < n_out:
            dim = y.dim() - len(sizes) + axis
            y = y.clone()
            y.narrow(dim, first_empty, n_out - first_empty).zero_()
    return y


def shift_at_offset(x: torch.Tensor, dims: Sequence[int], offset: Offset) -> torch.Tensor:
    """``x`` shifted by ``-offset`` along ``dims``, zero-filled at the trailing end.

    This is the offset of a space-to-depth / patch-merging op: the grouping grid moves
    by ``offset`` (``y[i] = x[i + s]``, 0 past the end), shape unchanged.

    Args:
        x: any tensor; ``dims`` are its spatial axes (e.g. ``(1, 2)`` for NHWC).
        offset: one int per entry of ``dims``.

    Shape:
        - x: any shape, any rank; ``dims`` index its spatial axes.
        - output: the shape of ``x`` (and its dtype); ``x`` itself when ``offset`` is all zeros.

    Example:
        >>> shift_at_offset(torch.arange(6).reshape(1, 6), (1,), (2,)).tolist()
        [[2, 3, 4, 5, 0, 0]]
        >>> x = torch.ones(1, 4, 4, 3)  # NHWC
        >>> y = shift_at_offset(x, (1, 2), (1, 0))
        >>> y.shape, y[0, :, 0, 0].tolist()
        (torch.Size([1, 4, 4, 3]), [1.0, 1.0, 1.0, 0.0])
    """
    if not any(offset):
        return x
    for dim, s in zip(dims, offset):
        if s == 0:
            continue
        n = x.shape[dim]
        kept = x.narrow(dim, min(s, n), max(n - s, 0))
        fill_shape = list(x.shape)
        fill_shape[dim] = n - kept.shape[dim]
        x = torch.cat([kept, x.new_zeros(fill_shape)], dim=dim)
    return x


def pixel_unshuffle_at_offset(x: torch.Tensor, factor: int, offset: Offset) -> torch.Tensor:
    """``F.pixel_unshuffle`` with its grouping grid moved by ``offset`` (zero fill).

    Args:
        x: ``(*, C, H, W)``; ``offset``: ``(sh, sw)`` with ``0 <= s < factor``.

    Shape:
        - x: ``(*, C, H, W)``, ``H`` and ``W`` divisible by ``factor``.
        - output: ``(*, C * factor**2, H / factor, W / factor)``.

    Example:
        Channel 0 holds the top-left pixel of each 2x2 block of the grid moved by ``(1, 1)``:

        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> y = pixel_unshuffle_at_offset(x, 2, (1, 1))
        >>> y.shape, y[0, 0].tolist()
        (torch.Size([1, 4, 2, 2]), [[5.0, 7.0], [13.0, 15.0]])
    """
    return F.pixel_unshuffle(shift_at_offset(x, (-2, -1), offset), factor)


def slice_at_offset(x: torch.Tensor, index, dims: Sequence[int], offset: Offset) -> torch.Tensor:
    """``x[index]`` (strided basic indexing) with its sampling grid moved by ``offset``.

    The slice's start moves by ``s`` along each stepped axis in ``dims``; positions past the
    end are zero fill, so the output keeps the default shape (the same as
    :func:`shift_at_offset` followed by the slice).

    Shape:
        - x: any shape; ``dims`` are the stepped axes, ``offset`` one int per entry.
        - output: the shape of ``x[index]``.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 4, 4, 1)  # NHWC
        >>> slice_at_offset(x, (Ellipsis, slice(0, None, 2), slice(0, None, 2), slice(None)), (1, 2), (1, 1))[0, ..., 0].tolist()
        [[5.0, 7.0], [13.0, 15.0]]
    """
    return shift_at_offset(x, dims, offset)[index]
