"""Aligning the final maps of different states (docs/method.md, "Alignment").

State ``s`` sees the image rolled by ``-Delta(s)`` pixels, so its final map (cell size
``P = stride_total``) is displaced by ``-Delta/P`` cells, fractional in general. It is
aligned by shifting it ``+Delta/P`` cells: ``out[i] = f[i - d]``. A fractional shift is
the linear interpolation of the two integer shifts around it (separable per axis).

Border fill (where ``i - d`` leaves the map): ``"zeros"`` (default), ``"border"``
(repeat the edge cell) or ``"circular"`` (wrap; exact for circular-padded networks,
which is how the tests pin the direction and size of the shift down).
"""

from __future__ import annotations

import torch

from undiscard.errors import InputError
from undiscard.method.options import check_choice

__all__ = ["FILLS", "shift_cells", "align_to_default"]

FILLS = ("zeros", "border", "circular")


def _shift_int_border(f: torch.Tensor, k: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[i, ..., j, ...] = f[i, ..., clamp(j - k_i, 0, n - 1), ...]`` along ``dim``, by slice copies
    (the values a gather with clamped indices gives, without building the index tensor)."""
    n = f.shape[dim]
    ks = [max(-n, min(n, v)) for v in k.tolist()]
    out = torch.empty(f.shape, dtype=f.dtype, device=f.device)  # contiguous, as gather's result
    pairs = [(f, out, ks[0], dim)] if len(set(ks)) == 1 else [(f[i], out[i], v, dim - 1) for i, v in enumerate(ks)]
    for src, dst, v, d in pairs:
        if v >= 0:
            dst.narrow(d, v, n - v).copy_(src.narrow(d, 0, n - v))
            if v:
                dst.narrow(d, 0, v).copy_(src.narrow(d, 0, 1).expand_as(dst.narrow(d, 0, v)))
        else:
            v = -v
            dst.narrow(d, 0, n - v).copy_(src.narrow(d, v, n - v))
            dst.narrow(d, n - v, v).copy_(src.narrow(d, n - 1, 1).expand_as(dst.narrow(d, n - v, v)))
    return out


def _shift_int(f: torch.Tensor, k: torch.Tensor, dim: int, fill: str) -> torch.Tensor:
    """``out[i] = f[i - k]`` along ``dim`` with a per-sample integer ``k`` of shape ``(N,)``."""
    if fill == "border":
        return _shift_int_border(f, k, dim)
    n = f.shape[dim]
    src = torch.arange(n, device=f.device)[None, :] - k[:, None]  # (N, n)
    if fill == "circular":
        idx, keep = src % n, None
    else:
        keep = (src >= 0) & (src < n)
        idx = src.clamp(0, n - 1)
        if fill == "border":
            keep = None
    shape = [f.shape[0]] + [1] * (f.dim() - 1)
    shape[dim] = n
    idx = idx.reshape(shape).expand_as(f)
    out = f.gather(dim, idx)
    if keep is not None:
        out = out * keep.reshape(shape).to(f.dtype)
    return out


def shift_cells(f: torch.Tensor, shift: torch.Tensor, fill: str = "zeros") -> torch.Tensor:
    """Shift each sample's map by ``shift`` cells (sub-cell by linear interpolation).

    Args:
        f: ``(N, C, *spatial)`` maps.
        shift: ``(N, D)`` float cells per spatial axis (``D = f.dim() - 2``); ``out[i] = f[i - shift]``.
        fill: ``"zeros"``, ``"border"`` or ``"circular"``.

    Returns:
        ``(N, C, *spatial)``.

    Shape:
        - f: ``(N, C, *spatial)``, any number ``D`` of spatial axes.
        - shift: ``(N, D)``, float cells per spatial axis.
        - output: ``(N, C, *spatial)``, the dtype of ``f``.

    Raises:
        OptionError: an unknown ``fill``. InputError: ``shift`` not ``(N, D)``.

    Example:
        >>> f = torch.arange(4.0).reshape(1, 1, 1, 4)
        >>> shift_cells(f, torch.tensor([[0.0, 0.5]]))
        tensor([[[[0.0000, 0.5000, 1.5000, 2.5000]]]])
    """
    check_choice("fill", fill, FILLS)
    nd = f.dim() - 2
    if shift.shape != (f.shape[0], nd):
        raise InputError(f"shift must be (N, D) = ({f.shape[0]}, {nd}) for maps of shape {tuple(f.shape)}; got {tuple(shift.shape)}")
    shift = shift.to(device=f.device, dtype=torch.float64)
    out = f
    for a in range(nd):
        dim = 2 + a
        lo = torch.floor(shift[:, a])
        frac = (shift[:, a] - lo).to(f.dtype)
        k = lo.long()
        base = _shift_int(out, k, dim, fill)
        if bool((frac == 0).all()):
            out = base
            continue
        nxt = _shift_int(out, k + 1, dim, fill)
        w = frac.reshape([-1] + [1] * (f.dim() - 1))
        out = base * (1 - w) + nxt * w
    return out


def align_to_default(f: torch.Tensor, delta_px: torch.Tensor, stride_total: tuple[int, ...], fill: str = "zeros") -> torch.Tensor:
    """Undo a state's displacement on its final map: shift by ``+delta_px / stride_total`` cells.

    Args:
        f: ``(N, C, *spatial)`` final maps of states with displacements ``delta_px``.
        delta_px: ``(N, D)`` integer displacement in input pixels (:meth:`SiteMap.displacement`).
        stride_total: the map's cell size in pixels per axis (:attr:`SiteMap.stride_total`).
        fill: ``"zeros"``, ``"border"`` or ``"circular"`` (see :func:`shift_cells`).

    Shape:
        - f: ``(N, C, *spatial)`` with ``D = len(stride_total)`` spatial axes.
        - delta_px: ``(N, D)``.
        - output: ``(N, C, *spatial)``.

    Example:
        A displacement of 4 pixels is one cell of a stride-4 map:

        >>> f = torch.arange(4.0).reshape(1, 1, 1, 4)
        >>> align_to_default(f, torch.tensor([[0, 4]]), (4, 4)).tolist()
        [[[[0.0, 0.0, 1.0, 2.0]]]]
    """
    cells = delta_px.to(torch.float64) / torch.tensor(stride_total, dtype=torch.float64)
    return shift_cells(f, cells, fill)
