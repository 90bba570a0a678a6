"""Shared test helpers: the torchvision compat guard, seeded models, tiny circular nets, and
the float tolerance every float32 comparison of the suite uses (``assert_close_scaled``)."""

from __future__ import annotations

import functools
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import undiscard.compat as compat

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    compat.ensure_torchvision()


#: a seeded random timm resnet18 for gray 7-class inputs, built once (``cached(*RESNET_GRAY7)``)
RESNET_GRAY7 = ("timm", "resnet18", (("num_classes", 7), ("in_chans", 1)))


# ------------------------------------------------------------------ float tolerances

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7, machine epsilon: one rounding errs by at most half of it
EPS16 = torch.finfo(torch.float16).eps  # 9.8e-4

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def depth_and_width(model: nn.Module) -> tuple[int, int]:
    """``(depth, width)`` of a network for :func:`assert_close_scaled`.

    ``depth``: the number of weight layers (convs and linear layers, every branch counted,
    so at least the depth of the longest path; residual branches add their rounding too);
    ``width``: the longest reduction one of them computes (``in_channels / groups * kernel``
    or ``in_features``). Attention's matmuls reduce over a head's width or over the tokens
    with softmax weights (a convex combination) and are covered by the linear layers' terms.
    """
    depth, width = 0, 1
    for m in model.modules():
        if isinstance(m, _CONV):
            depth += 1
            width = max(width, m.in_channels // m.groups * math.prod(m.kernel_size))
        elif isinstance(m, nn.Linear):
            depth += 1
            width = max(width, m.in_features)
    return max(depth, 1), width


def rounding_ops(model: nn.Module) -> float:
    """``depth * sqrt(width)`` (:func:`depth_and_width`): the ``ops`` of a float32 network."""
    depth, width = depth_and_width(model)
    return depth * math.sqrt(width)


def assert_close_scaled(actual, expected, *, ops: float, eps: float | None = None, scale=None, msg=None) -> None:
    """``actual == expected`` up to the rounding of two equivalent float computations.

    For results that are mathematically equal but computed by different float32 kernels or
    summation orders (another batch composition, the trie vs one forward per state, chunked
    vs whole, channels-last vs contiguous, a fused vs a step-by-step formula). CPU BLAS and
    oneDNN pick their blocking, vector width and summation order by CPU (Intel vs AMD, AVX2
    vs AVX-512) and by batch size, so such results agree only to rounding, and by how much
    depends on the machine: the tolerance is derived from the computation, not measured:

        atol = ops * eps * max|expected|,   rtol = 0,   eps = the dtype's machine epsilon

    * one reduction of ``n`` products, summed in two different orders, differs by about
      ``sqrt(n) * eps`` of the magnitude of its result (random-walk rounding; blocked and
      pairwise sums stay below it; the worst case ``n * eps`` is never approached);
    * a network adds such an error in each of its ``depth`` layers, each relative to the
      scale of that layer's output, and carries earlier ones forward at about the same
      scale, so the outputs differ by up to ``depth * sqrt(width) * eps * max|output|``:
      ``ops = rounding_ops(model)`` (:func:`rounding_ops`); for a formula of a few
      elementwise steps ``ops`` is the number of rounded steps (times ``sqrt(n)`` for a
      sum of ``n`` terms), stated at the call.

    Comparing against ``max|expected|`` (not elementwise ``rtol``) is deliberate: rounding
    errors scale with the magnitude of the values a layer combines, not with the one output
    element that happens to be near zero. A real bug (a wrong offset, a state leaking
    between samples, a wrong alignment) changes outputs by O(1) of their magnitude, which
    is 10^2 to 10^4 times these tolerances (e.g. resnet18: ops ~ 1400, atol ~ 1.7e-4 of
    max|output|), so the comparisons keep their power. Where exactness is the point (the
    roll test, offset 0, float64 references) the tests compare in float64 or exactly
    instead, and do not use this helper.

    The bound holds for well-conditioned computations. One that cancels amplifies rounding
    beyond it: the entropy weights ``1 - H/log K`` of nearly uniform predictions (random
    weights) are differences of nearly equal numbers (~10^4 x); such tests use a trained
    model's confident predictions or float64 instead of a looser tolerance.

    Measured on an AMD EPYC (AVX2), the suite's comparisons use at most ~35 of the ~2600 of
    an smp U-Net and mostly 0-5; the rest is headroom for other CPUs and kernels (AVX-512,
    Winograd convolutions), which is the point. ``UNDISCARD_TOL_LOG=FILE`` appends, per
    comparison, the test, the ``ops`` used (``max|diff| / (eps * scale)``) and the ``ops``
    allowed, to see how much of the tolerance a machine uses.

    ``eps`` defaults to that of ``expected``'s dtype; ``EPS16`` with ``ops = depth`` for
    weights stored in float16 (each weight rounded once, by at most ``eps16 / 2`` of itself,
    moves each layer's output by about that fraction of its scale: no ``sqrt(width)``).
    ``scale`` defaults to ``max|expected|``; log-probabilities pass the logits' magnitude
    (``log_softmax`` keeps the absolute rounding of the logits, whatever its output's size).
    """
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    if eps is None:
        eps = torch.finfo(expected.dtype).eps
    finite = expected[torch.isfinite(expected)]
    if scale is None:
        scale = float(finite.abs().max()) if finite.numel() else 0.0
    scale = float(scale)
    atol = ops * eps * scale
    if os.environ.get("UNDISCARD_TOL_LOG"):  # calibration aid: how much of atol a machine uses
        if actual.shape == expected.shape and finite.numel():
            err = float((actual.double() - expected.double()).abs().nan_to_num(0.0).max())
            with open(os.environ["UNDISCARD_TOL_LOG"], "a") as f:
                test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
                f.write(f"{test}\t{err / (eps * scale) if scale else 0:.1f}\t{ops:.0f}\t{err:.2e}\t{scale:.2e}\n")
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=msg)


@functools.lru_cache(maxsize=None)
def zoo_model(zoo: str, name: str, **kwargs) -> nn.Module:
    """A random-weight zoo model in eval mode, built once per test session (seeded)."""
    torch.manual_seed(0)
    if zoo == "timm":
        import timm

        return timm.create_model(name, **kwargs).eval()
    import torchvision

    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def cached(zoo: str, name: str, kwargs: tuple = ()) -> nn.Module:
    return zoo_model(zoo, name, **dict(kwargs))


class CircularPool(nn.Module):
    """Circular padding then max/avg pooling, kernel 2*pad+1 (no end fill ever needed)."""

    def __init__(self, kernel: int, stride: int, kind: str) -> None:
        super().__init__()
        self.kernel, self.stride, self.kind = kernel, stride, kind

    def forward(self, x):
        p = self.kernel // 2
        x = F.pad(x, (p, p, p, p), mode="circular")
        pool = F.max_pool2d if self.kind == "max" else F.avg_pool2d
        return pool(x, self.kernel, self.stride)


class CircularResidual(nn.Module):
    """A ResNet-style transition: strided 3x3 conv + strided 1x1 shortcut (one site)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 2, 1, padding_mode="circular")
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, padding_mode="circular")
        self.shortcut = nn.Conv2d(cin, cout, 1, 2)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv(x))) + self.shortcut(x)


def circular_net() -> nn.Module:
    """Circular-padded convs and pools, kernel = 2*pad + 1; total stride (32, 64)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, 2, 1, padding_mode="circular"),
        nn.ReLU(),
        CircularPool(3, 2, "max"),
        nn.Conv2d(4, 4, 5, 1, 2, padding_mode="circular"),
        CircularResidual(4, 6),
        nn.ReLU(),
        CircularPool(3, 2, "avg"),
        nn.Conv2d(6, 6, (1, 3), (1, 2), (0, 1), padding_mode="circular"),
        nn.Conv2d(6, 5, 3, 2, 1, padding_mode="circular"),
    ).double().eval()


@pytest.fixture
def circ():
    return circular_net()
