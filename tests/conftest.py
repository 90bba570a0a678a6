"""Shared test helpers: the torchvision compat guard, seeded models, tiny circular nets."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import undiscard._compat as _compat

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _compat.ensure_torchvision()


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
