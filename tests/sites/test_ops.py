"""Offset ops checked against references written independently of the library.

SPEC §2: for a subsampling op with stride ``R`` and padding ``p``, the output at offset
``s`` is ``y_s[i] = z[i*R + s]`` with ``z`` the same op at stride 1 on the same padded
input, truncated to the default (``s = 0``) output shape. Where ``z`` has no element the
op runs over a fill that continues the padding (zeros for conv, ``-inf`` for max-pool,
excluded from the divisor for avg-pool). A window with no input element at all gives the
conv's bias, and 0 for pooling. Offset 0 is the unmodified op, bit for bit.

The references here never use the library's pad-and-crop trick:

* conv: ``z`` = the conv at stride 1 over ``x`` zero-padded by ``p`` plus generous extra
  zero fill at the end, then ``z[..., s::R]`` truncated to the default output size;
* pooling: a naive per-window loop that classifies every window element as input,
  original padding or fill and applies the rules above. It is first checked against
  PyTorch's own op at offset 0 (which validates its ceil_mode / count_include_pad /
  divisor_override handling), then compared with the library at every offset.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import undiscard
import undiscard.compat as compat
from undiscard.sites.ops import avg_pool_at_offset, conv_at_offset, max_pool_at_offset, pixel_unshuffle_at_offset, shift_at_offset

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    compat.ensure_torchvision()

DT = torch.float64
N, C = 2, 3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DT)


def _tup(v, nd: int) -> tuple[int, ...]:
    return (v,) * nd if isinstance(v, int) else tuple(v)


def _offsets(stride) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(r) for r in stride)))


def _conv_fn(nd):
    return (F.conv1d, F.conv2d, F.conv3d)[nd - 1]


def _max_fn(nd):
    return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]


def _avg_plain(x, kernel, stride, padding, ceil_mode, cip, div):
    nd = x.dim() - 2
    if nd == 1:
        assert div is None
        return F.avg_pool1d(x, kernel, stride, padding, ceil_mode, cip)
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    return pool(x, kernel, stride, padding, ceil_mode, cip, div)


# ---------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------


def conv_reference(x, weight, bias, stride, padding, dilation, groups, offset):
    """Stride-1 conv over (original zero padding + extra zero fill), sliced at ``offset``."""
    nd = x.dim() - 2
    conv = _conv_fn(nd)
    sizes = x.shape[2:]
    kernel = weight.shape[2:]
    out = [(n + 2 * p - d * (k - 1) - 1) // r + 1 for n, k, r, p, d in zip(sizes, kernel, stride, padding, dilation)]
    pad: list[int] = []
    for p, r, k, d in zip(reversed(padding), reversed(stride), reversed(kernel), reversed(dilation)):
        pad += [p, p + r + d * (k - 1) + 1]  # original padding + more fill than any offset needs
    z = conv(F.pad(x, pad), weight, bias, 1, 0, tuple(dilation), groups)
    idx = tuple(slice(s, s + (n - 1) * r + 1, r) for s, r, n in zip(offset, stride, out))
    y = z[(Ellipsis, *idx)]
    assert tuple(y.shape[2:]) == tuple(out), "reference conv: not enough fill"
    return y


def _torch_pool_out(n, k, r, p, d, ceil_mode):
    """PyTorch's pooling output length (pooling_output_shape), written out here."""
    span = n + 2 * p - d * (k - 1) - 1
    o = (span + (r - 1 if ceil_mode else 0)) // r + 1
    if ceil_mode and (o - 1) * r >= n + p:
        o -= 1
    return o


def pool_reference(x, kind, kernel, stride, padding, dilation, ceil_mode, cip, div, offset):
    """Naive window loop. Returns (y, empty) with ``empty`` the output positions whose
    window holds no input element.

    Window ``o`` on axis ``a`` covers input coordinates ``o*R + s - p + j*d``. Each
    element is *input* (inside x), *original padding* (inside ``[-p, n+p)`` on every
    axis) or *fill* (beyond the original padding on some axis).
    max: max over input elements (padding and fill are -inf); avg: sum over input
    elements / (#input + #original-padding if count_include_pad), or / divisor_override.
    A window without input element gives 0.
    """
    sizes = tuple(x.shape[2:])
    out = [
        _torch_pool_out(n, k, r, p, d, ceil_mode)
        for n, k, r, p, d in zip(sizes, kernel, stride, padding, dilation)
    ]
    y = torch.zeros((*x.shape[:2], *out), dtype=x.dtype)
    empty = torch.zeros(out, dtype=torch.bool)
    for o in itertools.product(*(range(m) for m in out)):
        best = None
        total = torch.zeros(x.shape[:2], dtype=x.dtype)
        n_input = 0
        n_orig = 0
        for j in itertools.product(*(range(k) for k in kernel)):
            c = tuple(oa * r + s - p + ja * d for oa, r, s, p, ja, d in zip(o, stride, offset, padding, j, dilation))
            is_input = all(0 <= ca < n for ca, n in zip(c, sizes))
            is_orig = all(-p <= ca < n + p for ca, n, p in zip(c, sizes, padding))
            if is_input:
                v = x[(slice(None), slice(None), *c)]
                best = v if best is None else torch.maximum(best, v)
                total = total + v
                n_input += 1
            elif is_orig:
                n_orig += 1
        if n_input == 0:
            empty[o] = True
            continue  # no input element: 0
        if kind == "max":
            y[(slice(None), slice(None), *o)] = best
        else:
            if div is not None:
                count = div
            else:
                count = n_input + (n_orig if cip else 0)
            y[(slice(None), slice(None), *o)] = total / count
    return y, empty


def shift_reference(x, dims, offset):
    """``y[i] = x[i + s]`` along each of ``dims``, 0 past the end (written with indexing)."""
    y = torch.zeros_like(x)
    src = [slice(None)] * x.dim()
    dst = [slice(None)] * x.dim()
    for d, s in zip(dims, offset):
        n = x.shape[d]
        src[d] = slice(s, n)
        dst[d] = slice(0, max(n - s, 0))
    y[tuple(dst)] = x[tuple(src)]
    return y


# ---------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------

# (nd, cin, cout, groups, kernel, stride, padding, dilation, sizes, bias)
CONV_CASES = [
    # 1-d
    (1, 3, 4, 1, 3, 2, 1, 1, (9,), True),
    (1, 3, 4, 1, 7, 3, 2, 1, (16,), False),
    (1, 4, 4, 4, 3, 2, 0, 2, (10,), True),  # depthwise, dilated
    (1, 3, 2, 1, 1, 3, 0, 1, (7,), True),  # a window entirely in fill at s=2
    # 2-d
    (2, 3, 4, 1, 3, 2, 1, 1, (8, 8), True),  # even sizes
    (2, 3, 4, 1, 3, 2, 1, 1, (7, 9), False),  # odd, non-square
    (2, 3, 4, 1, 3, 2, 0, 1, (8, 7), True),  # padding 0
    (2, 3, 4, 1, 3, 2, 2, 2, (9, 8), True),  # dilated, padding 2
    (2, 3, 4, 1, 1, 2, 0, 1, (7, 8), True),  # kernel 1 (ResNet shortcut)
    (2, 3, 4, 1, 2, 2, 0, 1, (7, 9), True),  # kernel 2 = stride (patchify)
    (2, 3, 4, 1, 7, 2, 3, 1, (13, 14), False),  # 7x7 stem
    (2, 3, 4, 1, 7, 2, 2, 1, (11, 12), True),  # kernel 7, padding 2
    (2, 3, 6, 3, 3, 2, 1, 1, (7, 8), True),  # grouped
    (2, 4, 4, 4, 3, 2, 1, 1, (9, 6), True),  # depthwise
    (2, 4, 8, 4, 3, 3, 1, 1, (8, 7), False),  # depthwise x2, stride 3
    (2, 3, 4, 1, 3, 3, 1, 1, (9, 10), True),  # stride 3
    (2, 3, 4, 1, 3, (2, 1), 1, 1, (7, 6), True),  # non-square stride
    (2, 3, 4, 1, (3, 1), (1, 2), (1, 0), 1, (6, 9), True),  # non-square kernel/stride/padding
    (2, 3, 4, 1, 4, 4, 0, 1, (9, 10), True),  # patch embedding, sizes not multiples
    (2, 3, 4, 1, 1, 3, 0, 1, (7, 7), True),  # fill-only windows at s=2
    (2, 2, 3, 1, 3, (2, 3), (1, 2), (2, 1), (9, 11), False),  # mixed everything
    # 3-d
    (3, 2, 3, 1, 3, 2, 1, 1, (5, 6, 7), True),
    (3, 2, 4, 2, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, (3, 7, 6), False),
    (3, 2, 2, 2, 2, (2, 3, 2), 0, 1, (5, 7, 6), True),
    (3, 2, 3, 1, 3, 2, 2, 2, (7, 6, 7), True),  # dilated
]


def _conv_id(c):
    nd, cin, cout, g, k, r, p, d, sizes, b = c
    return f"{nd}d-k{k}-r{r}-p{p}-d{d}-g{g}-{'x'.join(map(str, sizes))}-{'bias' if b else 'nobias'}"


def _conv_setup(case, seed=0):
    nd, cin, cout, groups, k, r, p, d, sizes, has_bias = case
    k, r, p, d = (_tup(v, nd) for v in (k, r, p, d))
    x = _randn(N, cin, *sizes, seed=seed)
    w = _randn(cout, cin // groups, *k, seed=seed + 1)
    b = _randn(cout, seed=seed + 2) if has_bias else None
    return x, w, b, r, p, d, groups


# (nd, kernel, stride, padding, dilation, ceil_mode, sizes)
MAX_CASES = [
    (1, 3, 2, 1, 1, False, (9,)),
    (1, 3, 2, 1, 1, True, (8,)),
    (1, 2, 3, 0, 1, True, (10,)),
    (1, 3, 2, 1, 2, True, (9,)),
    (1, 1, 3, 0, 1, False, (7,)),  # fill-only window at s=2
    (2, 3, 2, 1, 1, False, (8, 8)),
    (2, 3, 2, 1, 1, True, (8, 7)),  # ceil_mode adds a window on the 8 axis
    (2, 3, 2, 0, 1, True, (7, 8)),
    (2, 2, 2, 0, 1, True, (7, 9)),  # odd sizes: ceil_mode matters
    (2, 2, 2, 0, 1, False, (7, 9)),
    (2, 3, 3, 1, 1, True, (8, 9)),
    (2, 3, (2, 1), 1, 1, False, (7, 6)),
    (2, 3, 2, 1, 2, False, (9, 8)),  # dilated
    (2, 3, 2, 1, 2, True, (9, 8)),
    (2, 2, 3, 1, 1, False, (7, 8)),  # stride > kernel - padding: empty windows
    (2, (3, 2), (2, 3), (1, 1), (1, 2), True, (9, 7)),
    (3, 3, 2, 1, 1, False, (5, 6, 7)),
    (3, 2, 2, 0, 1, True, (5, 6, 7)),
    (3, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, True, (3, 7, 6)),
]

# (nd, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, sizes)
AVG_CASES = [
    (1, 3, 2, 1, False, True, None, (9,)),
    (1, 3, 2, 1, True, False, None, (8,)),
    (1, 3, 2, 1, True, True, None, (8,)),
    (1, 2, 2, 0, True, True, None, (9,)),
    (1, 3, 3, 1, True, True, None, (10,)),
    (1, 1, 3, 0, False, True, None, (7,)),  # fill-only window at s=2
    (2, 1, 3, 0, False, True, None, (7, 7)),
    (2, 2, 3, 1, False, True, None, (7, 8)),  # empty windows, padding counted
    (2, 2, 3, 1, False, True, 3, (7, 8)),
    (2, 3, 2, 1, False, True, None, (8, 8)),
    (2, 3, 2, 1, False, False, None, (8, 8)),
    (2, 3, 2, 1, False, True, 5, (9, 7)),
    (2, 3, 2, 1, True, True, None, (8, 7)),
    (2, 3, 2, 1, True, False, None, (8, 7)),
    (2, 3, 2, 1, True, True, 4, (8, 7)),
    (2, 3, 2, 1, True, False, 7, (8, 9)),
    (2, 2, 2, 0, True, True, None, (7, 9)),
    (2, 2, 2, 0, True, False, None, (7, 9)),
    (2, 2, 2, 1, True, True, None, (7, 8)),
    (2, 3, 3, 1, True, True, None, (8, 9)),
    (2, 3, 3, 1, True, False, None, (8, 9)),
    (2, 3, (2, 1), 1, False, False, None, (7, 6)),
    (2, (3, 2), (2, 3), (1, 1), True, True, None, (9, 7)),
    (2, 4, 4, 2, True, True, None, (9, 10)),
    (3, 3, 2, 1, True, False, None, (5, 6, 7)),
    (3, 2, 2, 0, True, True, None, (5, 7, 6)),
    (3, 3, 2, 1, False, True, 7, (5, 6, 7)),
    (3, 2, 2, 1, True, True, 3, (5, 6, 5)),
    (3, (1, 3, 3), (1, 2, 2), (0, 1, 1), True, True, None, (3, 7, 6)),
]


def _max_id(c):
    nd, k, r, p, d, ceil, sizes = c
    return f"{nd}d-k{k}-r{r}-p{p}-d{d}-{'ceil' if ceil else 'floor'}-{'x'.join(map(str, sizes))}"


def _avg_id(c):
    nd, k, r, p, ceil, cip, div, sizes = c
    return (
        f"{nd}d-k{k}-r{r}-p{p}-{'ceil' if ceil else 'floor'}-{'cip' if cip else 'nocip'}-div{div}-"
        f"{'x'.join(map(str, sizes))}"
    )


# ---------------------------------------------------------------------------------
# conv
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv_reference_at_offset_zero_equals_torch_conv(case):
    x, w, b, r, p, d, g = _conv_setup(case)
    nd = x.dim() - 2
    expected = _conv_fn(nd)(x, w, b, r, p, d, g)
    assert_close(conv_reference(x, w, b, r, p, d, g, (0,) * nd), expected)


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv_every_offset_matches_stride1_slice_reference(case):
    x, w, b, r, p, d, g = _conv_setup(case)
    nd = x.dim() - 2
    default = _conv_fn(nd)(x, w, b, r, p, d, g)
    for s in _offsets(r):
        y = conv_at_offset(x, w, b, r, p, d, g, s)
        assert y.shape == default.shape, s
        assert_close(y, conv_reference(x, w, b, r, p, d, g, s), msg=lambda m: f"offset {s}: {m}")


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv_offset_zero_is_bitwise_identical_to_plain_conv(case):
    x, w, b, r, p, d, g = _conv_setup(case)
    nd = x.dim() - 2
    assert torch.equal(conv_at_offset(x, w, b, r, p, d, g, (0,) * nd), _conv_fn(nd)(x, w, b, r, p, d, g))


def test_conv_offset_inside_input_equals_exact_stride1_slice():
    # Even size 12, padding 1: z has 12 positions, so no offset needs fill and the offset
    # output is literally the stride-1 conv, sliced.
    x = _randn(N, 3, 12, 12)
    w, b = _randn(4, 3, 3, 3, seed=1), _randn(4, seed=2)
    z = F.conv2d(x, w, b, 1, 1)
    for s in _offsets((2, 2)):
        y = conv_at_offset(x, w, b, (2, 2), (1, 1), (1, 1), 1, s)
        assert_close(y, z[..., s[0]::2, s[1]::2])


# ---------------------------------------------------------------------------------
# max pooling
# ---------------------------------------------------------------------------------


def _max_setup(case, seed=0):
    nd, k, r, p, d, ceil, sizes = case
    k, r, p, d = (_tup(v, nd) for v in (k, r, p, d))
    return _randn(N, C, *sizes, seed=seed), k, r, p, d, ceil


@pytest.mark.parametrize("case", MAX_CASES, ids=_max_id)
def test_max_pool_reference_at_offset_zero_equals_torch_max_pool(case):
    x, k, r, p, d, ceil = _max_setup(case)
    nd = x.dim() - 2
    ref, empty = pool_reference(x, "max", k, r, p, d, ceil, None, None, (0,) * nd)
    assert not empty.any()
    assert_close(ref, _max_fn(nd)(x, k, r, p, d, ceil))


@pytest.mark.parametrize("case", MAX_CASES, ids=_max_id)
def test_max_pool_every_offset_matches_naive_window_reference(case):
    x, k, r, p, d, ceil = _max_setup(case)
    nd = x.dim() - 2
    default = _max_fn(nd)(x, k, r, p, d, ceil)
    for s in _offsets(r):
        y = max_pool_at_offset(x, k, r, p, d, ceil, s)
        assert y.shape == default.shape, s
        assert torch.isfinite(y).all(), s
        ref, _ = pool_reference(x, "max", k, r, p, d, ceil, None, None, s)
        assert_close(y, ref, msg=lambda m: f"offset {s}: {m}")


@pytest.mark.parametrize("case", MAX_CASES, ids=_max_id)
def test_max_pool_offset_zero_is_bitwise_identical_to_plain_max_pool(case):
    x, k, r, p, d, ceil = _max_setup(case)
    nd = x.dim() - 2
    assert torch.equal(max_pool_at_offset(x, k, r, p, d, ceil, (0,) * nd), _max_fn(nd)(x, k, r, p, d, ceil))


# ---------------------------------------------------------------------------------
# average pooling
# ---------------------------------------------------------------------------------


def _avg_setup(case, seed=0):
    nd, k, r, p, ceil, cip, div, sizes = case
    k, r, p = (_tup(v, nd) for v in (k, r, p))
    return _randn(N, C, *sizes, seed=seed), k, r, p, ceil, cip, div


@pytest.mark.parametrize("case", AVG_CASES, ids=_avg_id)
def test_avg_pool_reference_at_offset_zero_equals_torch_avg_pool(case):
    x, k, r, p, ceil, cip, div = _avg_setup(case)
    nd = x.dim() - 2
    ref, empty = pool_reference(x, "avg", k, r, p, (1,) * nd, ceil, cip, div, (0,) * nd)
    assert not empty.any()
    assert_close(ref, _avg_plain(x, k, r, p, ceil, cip, div))


@pytest.mark.parametrize("case", AVG_CASES, ids=_avg_id)
def test_avg_pool_every_offset_matches_naive_window_reference(case):
    x, k, r, p, ceil, cip, div = _avg_setup(case)
    nd = x.dim() - 2
    default = _avg_plain(x, k, r, p, ceil, cip, div)
    for s in _offsets(r):
        y = avg_pool_at_offset(x, k, r, p, ceil, cip, div, s)
        assert y.shape == default.shape, s
        assert torch.isfinite(y).all(), s
        ref, _ = pool_reference(x, "avg", k, r, p, (1,) * nd, ceil, cip, div, s)
        assert_close(y, ref, msg=lambda m: f"offset {s}: {m}")


@pytest.mark.parametrize("case", AVG_CASES, ids=_avg_id)
def test_avg_pool_offset_zero_is_bitwise_identical_to_plain_avg_pool(case):
    x, k, r, p, ceil, cip, div = _avg_setup(case)
    nd = x.dim() - 2
    y = avg_pool_at_offset(x, k, r, p, ceil, cip, div, (0,) * nd)
    assert torch.equal(y, _avg_plain(x, k, r, p, ceil, cip, div))


# ---------------------------------------------------------------------------------
# random sweep
# ---------------------------------------------------------------------------------


def _random_case(rng):
    """A random valid 1-d/2-d conv/max/avg configuration. Every axis is at least as long
    as its stride and dilation (smaller inputs: see test_input_shorter_than_offset_...)."""
    import random

    assert isinstance(rng, random.Random)
    nd = rng.choice([1, 2])
    kind = rng.choice(["conv", "max", "avg"])
    k = tuple(rng.randint(1, 5) for _ in range(nd))
    r = tuple(rng.randint(1, 4) for _ in range(nd))
    d = tuple(rng.randint(1, 3) for _ in range(nd)) if kind != "avg" else (1,) * nd
    if kind == "conv":
        p = tuple(rng.randint(0, 3) for _ in range(nd))
    else:
        p = tuple(rng.randint(0, kk // 2) for kk in k)
    sizes = tuple(rng.randint(max(rr, dd), 10) for rr, dd in zip(r, d))
    ceil, cip = rng.random() < 0.5, rng.random() < 0.5
    div = rng.choice([None, None, 3]) if nd == 2 and kind == "avg" else None
    return kind, k, r, p, d, sizes, ceil, cip, div


@pytest.mark.parametrize("chunk", range(6))
def test_random_configs_every_offset_matches_reference(chunk):
    import random

    rng = random.Random(1000 + chunk)
    checked = 0
    while checked < 40:
        kind, k, r, p, d, sizes, ceil, cip, div = _random_case(rng)
        nd = len(k)
        x = _randn(1, 2, *sizes, seed=checked)
        w, b = _randn(3, 2, *k, seed=1), _randn(3, seed=2)
        try:
            if kind == "conv":
                default = _conv_fn(nd)(x, w, b, r, p, d)
            elif kind == "max":
                default = _max_fn(nd)(x, k, r, p, d, ceil)
            else:
                default = _avg_plain(x, k, r, p, ceil, cip, div)
        except RuntimeError:
            continue  # torch rejects it (output too small, ...)
        if default.numel() == 0:
            continue
        checked += 1
        cfg = (kind, k, r, p, d, sizes, ceil, cip, div)
        for s in _offsets(r):
            if kind == "conv":
                y = conv_at_offset(x, w, b, r, p, d, 1, s)
                ref = conv_reference(x, w, b, r, p, d, 1, s)
            elif kind == "max":
                y = max_pool_at_offset(x, k, r, p, d, ceil, s)
                ref = pool_reference(x, "max", k, r, p, d, ceil, None, None, s)[0]
            else:
                y = avg_pool_at_offset(x, k, r, p, ceil, cip, div, s)
                ref = pool_reference(x, "avg", k, r, p, d, ceil, cip, div, s)[0]
            if not any(s):
                assert torch.equal(y, default), cfg
            assert y.shape == default.shape, (cfg, s)
            assert_close(y, ref, msg=lambda m: f"{cfg} offset {s}: {m}")


# ---------------------------------------------------------------------------------
# windows entirely in fill
# ---------------------------------------------------------------------------------


def test_conv_window_entirely_in_fill_gives_bias():
    # kernel 1, stride 3, size 7: default output 3 (positions 0, 3, 6); at offset 2 the
    # last window sits at position 8 >= 7, in fill only.
    x = _randn(N, 3, 7, 7)
    w, b = _randn(4, 3, 1, 1, seed=1), _randn(4, seed=2)
    y = conv_at_offset(x, w, b, (3, 3), (0, 0), (1, 1), 1, (2, 2))
    assert y.shape == (N, 4, 3, 3)
    assert torch.isfinite(y).all()
    bias = b.view(1, 4, 1).expand(N, 4, 3)
    assert_close(y[:, :, -1, :], bias)
    assert_close(y[:, :, :, -1], bias)
    assert_close(y[:, :, :2, :2], F.conv2d(x, w, b)[:, :, 2::3, 2::3])
    # and at offset (2, 0) only the last row is fill
    y = conv_at_offset(x, w, b, (3, 3), (0, 0), (1, 1), 1, (2, 0))
    assert_close(y[:, :, -1, :], bias)
    assert_close(y[:, :, :2, :], F.conv2d(x, w, b)[:, :, 2::3, 0::3])


def test_conv_window_entirely_in_fill_without_bias_is_zero():
    x = _randn(N, 3, 7)
    w = _randn(4, 3, 1, seed=1)
    y = conv_at_offset(x, w, None, (3,), (0,), (1,), 1, (2,))
    assert torch.equal(y[..., -1], torch.zeros(N, 4, dtype=DT))


@pytest.mark.parametrize(
    "kernel,padding",
    [(1, 0), (2, 1)],  # (2, 1): last window = [original padding, fill], no input element
    ids=["k1p0", "k2p1"],
)
def test_max_pool_window_entirely_in_fill_gives_zero(kernel, padding):
    x = _randn(N, C, 7, 8) - 10.0  # all inputs negative: a 0 cannot come from the input
    ref, empty = pool_reference(x, "max", (kernel,) * 2, (3, 3), (padding,) * 2, (1, 1), False, None, None, (2, 2))
    assert empty[-1, :].all() and not empty[:-1, :-1].any()
    y = max_pool_at_offset(x, (kernel,) * 2, (3, 3), (padding,) * 2, (1, 1), False, (2, 2))
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, :, -1, :], torch.zeros_like(y[:, :, -1, :]))
    assert (y[:, :, :-1, :-1] < 0).all()
    assert_close(y, ref)


@pytest.mark.parametrize("cip", [True, False])
@pytest.mark.parametrize("div", [None, 3])
@pytest.mark.parametrize("kernel,padding", [(1, 0), (2, 1)], ids=["k1p0", "k2p1"])
def test_avg_pool_window_entirely_in_fill_gives_zero(kernel, padding, cip, div):
    x = _randn(N, C, 7, 8) + 10.0
    ref, empty = pool_reference(x, "avg", (kernel,) * 2, (3, 3), (padding,) * 2, (1, 1), False, cip, div, (2, 2))
    assert empty[-1, :].all()
    y = avg_pool_at_offset(x, (kernel,) * 2, (3, 3), (padding,) * 2, False, cip, div, (2, 2))
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, :, -1, :], torch.zeros_like(y[:, :, -1, :]))
    assert_close(y, ref)


def test_avg_pool_1d_window_entirely_in_fill_gives_zero():
    x = _randn(N, C, 7) + 10.0
    y = avg_pool_at_offset(x, (1,), (3,), (0,), False, True, None, (2,))
    assert torch.isfinite(y).all()
    assert torch.equal(y[..., -1], torch.zeros(N, C, dtype=DT))
    assert_close(y[..., :2], x[..., 2::3][..., :2])


@pytest.mark.parametrize("kind", ["conv", "max", "avg"])
def test_input_shorter_than_offset_gives_fill_window_value_not_error(kind):
    # Length-1 input, kernel 1, stride 3: default output 1 window (position 0). At offset 2
    # the window sits at position 2, entirely in fill: bias for conv, 0 for pooling.
    x = _randn(1, 2, 1)
    w, b = _randn(3, 2, 1, seed=1), _randn(3, seed=2)
    if kind == "conv":
        y = conv_at_offset(x, w, b, (3,), (0,), (1,), 1, (2,))
        expected = b.view(1, 3, 1)
    elif kind == "max":
        y = max_pool_at_offset(x, (1,), (3,), (0,), (1,), False, (2,))
        expected = torch.zeros(1, 2, 1, dtype=DT)
    else:
        y = avg_pool_at_offset(x, (1,), (3,), (0,), False, True, None, (2,))
        expected = torch.zeros(1, 2, 1, dtype=DT)
    assert_close(y, expected)


# ---------------------------------------------------------------------------------
# shift / pixel_unshuffle
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(8, 6), (7, 9)])
@pytest.mark.parametrize("factor", [2, 3])
def test_pixel_unshuffle_every_offset_is_shifted_input_then_default_op(sizes, factor):
    h, w = sizes
    h, w = h - h % factor, w - w % factor
    x = _randn(N, C, h, w)
    for s in _offsets((factor, factor)):
        y = pixel_unshuffle_at_offset(x, factor, s)
        assert_close(y, F.pixel_unshuffle(shift_reference(x, (2, 3), s), factor))
    assert torch.equal(pixel_unshuffle_at_offset(x, factor, (0, 0)), F.pixel_unshuffle(x, factor))


@pytest.mark.parametrize("dims", [(1, 2), (2, 3), (-2, -1), (2,)])
def test_shift_at_offset_matches_indexing_reference(dims):
    x = _randn(2, 5, 7, 6)
    for s in itertools.product(range(4), repeat=len(dims)):
        pos = tuple(d % x.dim() for d in dims)
        assert torch.equal(shift_at_offset(x, dims, s), shift_reference(x, pos, s)), s
    assert shift_at_offset(x, dims, (0,) * len(dims)) is x


# ---------------------------------------------------------------------------------
# model level: find_sites + run_states
# ---------------------------------------------------------------------------------


def _single_site(model, x):
    sites = undiscard.find_sites(model, x[:1], searchable="all")
    assert len(sites) == 1 and sites.searchable == (0,)
    return sites


def _check_every_offset(model, x, reference, expected_stride):
    """Every offset of the model's single site, by flat index, by tuple, and per sample."""
    sites = _single_site(model, x)
    site = sites[0]
    assert site.stride == expected_stride
    assert site.num_offsets == math.prod(expected_stride)
    with torch.no_grad():
        default = model(x)
        for k in range(site.num_offsets):
            s = site.offset_of(k)
            assert site.index_of(s) == k
            assert k == sum(a * math.prod(site.stride[i + 1:]) for i, a in enumerate(s))  # row-major
            expected = reference(x, s)
            y = undiscard.run_states(model, x, torch.tensor([k]), sites)
            assert y.shape == default.shape
            assert_close(y, expected, msg=lambda m: f"offset {s}: {m}")
            assert_close(undiscard.run_states(model, x, [s], sites), expected)
            per_sample = torch.full((x.shape[0], 1), k, dtype=torch.long)
            assert_close(undiscard.run_states(model, x, per_sample, sites), expected)
        assert torch.equal(undiscard.run_states(model, x, torch.tensor([0]), sites), default)
    return sites


def test_model_conv2d_every_offset_matches_reference():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1)).double().eval()
    conv = m[0]
    x = _randn(2, 3, 9, 8)
    ref = lambda x, s: conv_reference(x, conv.weight, conv.bias, (2, 2), (1, 1), (1, 1), 1, s)  # noqa: E731
    sites = _check_every_offset(m, x, ref, (2, 2))
    assert sites[0].kind == "conv"


def test_model_conv2d_non_square_stride_every_offset_matches_reference():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, (3, 1), stride=(1, 3), padding=(1, 0))).double().eval()
    conv = m[0]
    x = _randn(2, 3, 6, 10)
    ref = lambda x, s: conv_reference(x, conv.weight, conv.bias, (1, 3), (1, 0), (1, 1), 1, s)  # noqa: E731
    _check_every_offset(m, x, ref, (1, 3))


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_model_conv2d_padding_mode_is_explicit_pad_then_zero_fill(mode):
    # nn.Conv2d with a non-zero padding_mode pads explicitly and calls conv with padding 0:
    # the padded tensor is the op's input, and the fill beyond it is zeros.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode=mode)).double().eval()
    conv = m[0]
    x = _randn(2, 3, 7, 8)

    def ref(x, s):
        xp = F.pad(x, (1, 1, 1, 1), mode=mode)
        return conv_reference(xp, conv.weight, conv.bias, (2, 2), (0, 0), (1, 1), 1, s)

    _check_every_offset(m, x, ref, (2, 2))


def test_model_conv1d_and_conv3d_every_offset_matches_reference():
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Conv1d(3, 4, 3, stride=3, padding=1)).double().eval()
    x1 = _randn(2, 3, 11)
    ref1 = lambda x, s: conv_reference(x, m1[0].weight, m1[0].bias, (3,), (1,), (1,), 1, s)  # noqa: E731
    _check_every_offset(m1, x1, ref1, (3,))
    m3 = nn.Sequential(nn.Conv3d(2, 3, 3, stride=2, padding=1, groups=1)).double().eval()
    x3 = _randn(2, 2, 5, 6, 7)
    ref3 = lambda x, s: conv_reference(x, m3[0].weight, m3[0].bias, (2,) * 3, (1,) * 3, (1,) * 3, 1, s)  # noqa: E731
    _check_every_offset(m3, x3, ref3, (2, 2, 2))


def test_model_max_pool2d_ceil_mode_every_offset_matches_reference():
    m = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)).eval()
    x = _randn(2, 3, 8, 7)
    ref = lambda x, s: pool_reference(x, "max", (3, 3), (2, 2), (1, 1), (1, 1), True, None, None, s)[0]  # noqa: E731
    sites = _check_every_offset(m, x, ref, (2, 2))
    assert sites[0].kind == "max_pool"


def test_model_max_pool2d_ceil_mode_no_padding_every_offset_matches_reference():
    m = nn.Sequential(nn.MaxPool2d(2, stride=2, ceil_mode=True)).eval()
    x = _randn(2, 3, 7, 9)
    ref = lambda x, s: pool_reference(x, "max", (2, 2), (2, 2), (0, 0), (1, 1), True, None, None, s)[0]  # noqa: E731
    _check_every_offset(m, x, ref, (2, 2))


def test_model_avg_pool2d_without_count_include_pad_every_offset_matches_reference():
    m = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)).eval()
    x = _randn(2, 3, 7, 8)
    ref = lambda x, s: pool_reference(x, "avg", (3, 3), (2, 2), (1, 1), (1, 1), False, False, None, s)[0]  # noqa: E731
    sites = _check_every_offset(m, x, ref, (2, 2))
    assert sites[0].kind == "avg_pool"


def test_model_avg_pool2d_ceil_mode_divisor_override_every_offset_matches_reference():
    m = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, divisor_override=5)).eval()
    x = _randn(2, 3, 8, 7)
    ref = lambda x, s: pool_reference(x, "avg", (3, 3), (2, 2), (1, 1), (1, 1), True, True, 5, s)[0]  # noqa: E731
    _check_every_offset(m, x, ref, (2, 2))


def test_model_pool1d_and_pool3d_every_offset_matches_reference():
    m1 = nn.Sequential(nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)).eval()
    x1 = _randn(2, 3, 8)
    ref1 = lambda x, s: pool_reference(x, "avg", (3,), (2,), (1,), (1,), True, False, None, s)[0]  # noqa: E731
    _check_every_offset(m1, x1, ref1, (2,))
    m3 = nn.Sequential(nn.MaxPool3d(2, stride=2, ceil_mode=True)).eval()
    x3 = _randn(2, 2, 5, 6, 5)
    ref3 = lambda x, s: pool_reference(x, "max", (2,) * 3, (2,) * 3, (0,) * 3, (1,) * 3, True, None, None, s)[0]  # noqa: E731
    _check_every_offset(m3, x3, ref3, (2, 2, 2))


class _FunctionalMaxPool(nn.Module):
    """A stride-1 conv, then a functional max-pool call in ``forward`` (no pool module)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return F.max_pool2d(self.conv(x), kernel_size=3, stride=2, padding=1)


def test_model_functional_max_pool_every_offset_matches_reference():
    torch.manual_seed(0)
    m = _FunctionalMaxPool().double().eval()
    x = _randn(2, 3, 9, 8)

    def ref(x, s):
        h = F.conv2d(x, m.conv.weight, m.conv.bias)
        return pool_reference(h, "max", (3, 3), (2, 2), (1, 1), (1, 1), False, None, None, s)[0]

    sites = _check_every_offset(m, x, ref, (2, 2))
    assert sites[0].kind == "max_pool"
    assert sites[0].name.endswith("max_pool2d")


class _FunctionalPool(nn.Module):
    def __init__(self, call) -> None:
        super().__init__()
        self.call = call

    def forward(self, x):
        return self.call(x)


@pytest.mark.parametrize(
    "call,ref",
    [
        (  # default stride (= kernel), positional
            lambda x: F.max_pool2d(x, 2),
            lambda x, s: pool_reference(x, "max", (2, 2), (2, 2), (0, 0), (1, 1), False, None, None, s)[0],
        ),
        (
            lambda x: F.max_pool2d(x, 3, 2, 1, 1, True),
            lambda x, s: pool_reference(x, "max", (3, 3), (2, 2), (1, 1), (1, 1), True, None, None, s)[0],
        ),
        (
            lambda x: F.avg_pool2d(x, 2, ceil_mode=True),
            lambda x, s: pool_reference(x, "avg", (2, 2), (2, 2), (0, 0), (1, 1), True, True, None, s)[0],
        ),
        (
            lambda x: F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False),
            lambda x, s: pool_reference(x, "avg", (3, 3), (2, 2), (1, 1), (1, 1), False, False, None, s)[0],
        ),
    ],
    ids=["max-default-stride", "max-positional-ceil", "avg-default-stride-ceil", "avg-kwargs-nocip"],
)
def test_model_functional_pool_argument_forms_every_offset_matches_reference(call, ref):
    m = _FunctionalPool(call)
    _check_every_offset(m, _randn(2, 3, 7, 9), ref, (2, 2))


def test_model_conv2d_valid_string_padding_every_offset_matches_reference():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding="valid")).double().eval()
    ref = lambda x, s: conv_reference(x, m[0].weight, m[0].bias, (2, 2), (0, 0), (1, 1), 1, s)  # noqa: E731
    _check_every_offset(m, _randn(2, 3, 8, 9), ref, (2, 2))


def _same_pad(n, k, r, d=1):
    total = max((math.ceil(n / r) - 1) * r + (k - 1) * d + 1 - n, 0)
    return total // 2, total - total // 2


def _pad_same_ref(x, k, r, value):
    (top, bottom), (left, right) = _same_pad(x.shape[-2], k, r), _same_pad(x.shape[-1], k, r)
    return F.pad(x, (left, right, top, bottom), value=value)


@pytest.mark.parametrize("sizes", [(8, 8), (7, 9)])
def test_model_timm_conv2d_same_every_offset_matches_reference(sizes):
    from timm.layers import create_conv2d

    torch.manual_seed(0)
    m = create_conv2d(3, 4, 3, stride=2, padding="same").double().eval()
    assert type(m).__name__ == "Conv2dSame"
    x = _randn(2, 3, *sizes)

    def ref(x, s):
        xp = _pad_same_ref(x, 3, 2, 0.0)
        return conv_reference(xp, m.weight, m.bias, (2, 2), (0, 0), (1, 1), 1, s)

    _check_every_offset(m, x, ref, (2, 2))


@pytest.mark.parametrize("sizes", [(8, 8), (7, 9)])
def test_model_timm_max_pool2d_same_every_offset_matches_reference(sizes):
    from timm.layers import create_pool2d

    m = create_pool2d("max", 3, stride=2, padding="same").eval()
    assert type(m).__name__ == "MaxPool2dSame"
    x = _randn(2, 3, *sizes)

    def ref(x, s):
        xp = _pad_same_ref(x, 3, 2, float("-inf"))  # the -inf padding is part of the op's input
        y, empty = pool_reference(xp, "max", (3, 3), (2, 2), (0, 0), (1, 1), False, None, None, s)
        assert not empty.any()
        return y

    _check_every_offset(m, x, ref, (2, 2))


@pytest.mark.parametrize("sizes", [(8, 8), (7, 9)])
def test_model_timm_avg_pool2d_same_every_offset_matches_reference(sizes):
    from timm.layers import create_pool2d

    m = create_pool2d("avg", 3, stride=2, padding="same").eval()
    assert type(m).__name__ == "AvgPool2dSame"
    x = _randn(2, 3, *sizes)

    def ref(x, s):
        xp = _pad_same_ref(x, 3, 2, 0.0)  # explicit zeros count as input elements
        return pool_reference(xp, "avg", (3, 3), (2, 2), (0, 0), (1, 1), False, True, None, s)[0]

    _check_every_offset(m, x, ref, (2, 2))


@pytest.mark.parametrize("filt_size", [3, 5])
@pytest.mark.parametrize("sizes", [(8, 8), (7, 9)])
def test_model_timm_blurpool_every_offset_matches_reference(filt_size, sizes):
    from timm.layers import BlurPool2d

    m = BlurPool2d(channels=3, filt_size=filt_size, stride=2).double().eval()
    x = _randn(2, 3, *sizes)
    pad = ((2 - 1) + (filt_size - 1)) // 2
    coeffs = torch.tensor([math.comb(filt_size - 1, i) for i in range(filt_size)], dtype=DT) / 2 ** (filt_size - 1)
    filt = (coeffs[:, None] * coeffs[None, :]).expand(3, 1, filt_size, filt_size)

    def ref(x, s):
        xp = F.pad(x, (pad,) * 4, mode="reflect")
        return conv_reference(xp, filt, None, (2, 2), (0, 0), (1, 1), 3, s)

    assert_close(m(x), ref(x, (0, 0)))  # the reference reproduces the module at offset 0
    _check_every_offset(m, x, ref, (2, 2))


@pytest.mark.parametrize("factor", [2, 3])
def test_model_pixel_unshuffle_every_offset_is_shifted_input(factor):
    m = nn.Sequential(nn.PixelUnshuffle(factor))
    x = _randn(2, 3, 2 * factor, 3 * factor)
    ref = lambda x, s: F.pixel_unshuffle(shift_reference(x, (2, 3), s), factor)  # noqa: E731
    sites = _check_every_offset(m, x, ref, (factor, factor))
    assert sites[0].kind == "pixel_unshuffle"


@pytest.mark.parametrize("sizes", [(8, 6), (7, 9)])
def test_model_swin_patch_merging_every_offset_is_module_on_shifted_input(sizes):
    from timm.models.swin_transformer import PatchMerging

    torch.manual_seed(0)
    merge = PatchMerging(dim=8).double().eval()
    m = nn.Sequential(merge)
    x = _randn(2, *sizes, 8)  # NHWC
    with torch.no_grad():
        ref = lambda x, s: merge(shift_reference(x, (1, 2), s))  # noqa: E731
        sites = _check_every_offset(m, x, ref, (2, 2))
    assert sites[0].kind == "space_to_depth"
    assert sites[0].ops[0].spatial_dims == (1, 2)


def test_model_swin_patch_merging_as_root_module_is_found():
    from timm.models.swin_transformer import PatchMerging

    m = PatchMerging(dim=8).double().eval()
    sites = undiscard.find_sites(m, _randn(1, 8, 6, 8), searchable="all")
    assert len(sites) == 1 and sites[0].kind == "space_to_depth"


# ---------------------------------------------------------------------------------
# per-sample states
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer,stride",
    [
        (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 2)),
        (lambda: nn.MaxPool2d(3, stride=3, padding=1, ceil_mode=True), (3, 3)),
        (lambda: nn.AvgPool2d(2, stride=(2, 3), count_include_pad=False, ceil_mode=True), (2, 3)),
    ],
    ids=["conv", "maxpool", "avgpool"],
)
def test_per_sample_offsets_equal_each_sample_run_alone(layer, stride):
    torch.manual_seed(0)
    m = nn.Sequential(layer()).double().eval()
    x = _randn(4, 3, 9, 8)
    sites = _single_site(m, x)
    assert sites[0].stride == stride
    n = sites[0].num_offsets
    ks = torch.tensor([n - 1, 0, 1, n // 2])
    assert len(set(ks.tolist())) == 4
    with torch.no_grad():
        y = undiscard.run_states(m, x, ks[:, None], sites)
        for i in range(4):
            alone = undiscard.run_states(m, x[i:i + 1], torch.tensor([int(ks[i])]), sites)
            assert_close(y[i:i + 1], alone, msg=lambda msg: f"sample {i}: {msg}")


def test_per_sample_states_two_sites_match_composed_references():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    ).double().eval()
    x = _randn(4, 3, 13, 11)
    sites = undiscard.find_sites(m, x[:1], searchable="all")
    assert len(sites) == 2 and sites.searchable == (0, 1)
    states = torch.tensor([[0, 3], [1, 2], [2, 1], [3, 0]])
    conv = m[0]
    with torch.no_grad():
        y = undiscard.run_states(m, x, states, sites)
        for i, (k0, k1) in enumerate(states.tolist()):
            s0, s1 = sites[0].offset_of(k0), sites[1].offset_of(k1)
            h = torch.relu(conv_reference(x[i:i + 1], conv.weight, conv.bias, (2, 2), (1, 1), (1, 1), 1, s0))
            expected, _ = pool_reference(h, "max", (3, 3), (2, 2), (1, 1), (1, 1), True, None, None, s1)
            assert_close(y[i:i + 1], expected, msg=lambda msg: f"sample {i}: {msg}")
            alone = undiscard.run_states(m, x[i:i + 1], [s0, s1], sites)
            assert_close(y[i:i + 1], alone)
