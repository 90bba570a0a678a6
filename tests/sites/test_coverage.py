"""Coverage: every grid reduction of a forward is a site, or it is reported by name.

Strided slicing is a site kind (Swin's patch merging in torchvision and transformers,
LeViT's subsampling attention), global pooling is not a site, and ``check`` samples the
offsets of sites that have many.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import undiscard
from conftest import cached
from undiscard.evaluation.checks import MAX_OFFSETS, offsets_to_check, run_checks
from undiscard.sites import calls
from undiscard.sites.ops import slice_at_offset


class HandSliced(nn.Module):
    """conv s2 -> conv s1 -> ``x[..., ::2, ::2]`` written by hand -> conv s2."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x))[..., ::2, ::2]).mean((2, 3))


def _sites(model, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sites = undiscard.find_sites(model.eval(), x)
    return sites, [w for w in caught if issubclass(w.category, undiscard.MissedSubsamplingWarning)]


def test_a_hand_written_strided_slice_that_is_not_intercepted_fails_coverage_and_passes_once_it_is(monkeypatch):
    torch.manual_seed(0)
    model, x = HandSliced().eval(), torch.randn(1, 3, 32, 32)
    sites, warned = _sites(model, x)
    assert [s.kind for s in sites] == ["conv", "slice", "conv"] and sites.stride_total == (8, 8)
    assert sites.missed == () and not warned
    assert all(r.passed for r in run_checks(model, sites, x))

    monkeypatch.delitem(calls.BINDERS, torch.Tensor.__getitem__)  # as if slicing were not intercepted
    sites, warned = _sites(model, x)
    assert [s.kind for s in sites] == ["conv", "conv"] and sites.stride_total == (4, 4)
    assert len(sites.missed) == 1 and "(__getitem__) maps the grid 16x16 to 8x8" in sites.missed[0]
    assert len(warned) == 1 and "16x16 to 8x8" in str(warned[0].message)
    cover = {r.name: r for r in run_checks(model, sites, x)}["sites_cover_every_subsampling"]
    assert not cover.passed and "16x16 to 8x8" in cover.detail


@torch.no_grad()
def test_a_slice_site_at_an_offset_is_the_slice_of_the_shifted_map():
    torch.manual_seed(0)
    model, x = HandSliced().eval(), torch.randn(2, 3, 32, 32)
    sites = undiscard.find_sites(model, x[:1]).with_searchable([1])
    seen = {}
    model.b.register_forward_hook(lambda m, a, out: seen.__setitem__("b", out))
    for k in range(4):
        s = sites[1].offset_of(k)
        y = undiscard.run_states(model, x, [k], sites)
        b = seen["b"]  # 16x16: the slice keeps rows s0, s0+2, ... (zero past the end)
        want = torch.zeros(2, 8, 8, 8)
        part = b[..., s[0]::2, s[1]::2]
        want[..., : part.shape[-2], : part.shape[-1]] = part
        assert torch.equal(y, model.c(want).mean((2, 3)))


def test_slice_at_offset_moves_the_start_and_keeps_the_shape():
    x = torch.arange(2 * 5 * 6 * 3.0).reshape(2, 5, 6, 3)  # NHWC, odd height
    index = (Ellipsis, slice(1, None, 2), slice(0, None, 2), slice(None))
    for s in [(0, 0), (1, 0), (0, 1), (1, 1)]:
        y = slice_at_offset(x, index, (1, 2), s)
        assert y.shape == x[index].shape
        part = x[:, 1 + s[0]::2, s[1]::2]
        assert torch.equal(y[:, : part.shape[1], : part.shape[2]], part)
        assert not y[:, part.shape[1]:].any()


@pytest.mark.parametrize("index", [
    (Ellipsis, slice(None, None, 2)),  # one axis of a 2-D model: rotary-embedding bookkeeping
    (slice(None, None, 2),),  # the batch axis
    (0, slice(None, None, 2), slice(None, None, 2)),  # drops the batch
])
def test_strided_indexing_that_is_not_subsampling_is_not_a_site(index):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, 2, 1)

        def forward(self, x):
            return self.conv(x)[index].sum() + self.conv(x).mean()

    sites, warned = _sites(M(), torch.randn(2, 4, 16, 16))
    assert [s.kind for s in sites] == ["conv"] and not warned


@pytest.mark.parametrize("pool", [
    lambda x: F.avg_pool2d(x, x.shape[-2:]),
    lambda x: F.max_pool2d(x, 8),
    lambda x: F.avg_pool2d(x, 1280, ceil_mode=True),  # transformers' EfficientNet pooler
])
def test_a_global_pool_is_not_a_site(pool):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2, 1)

        def forward(self, x):
            return pool(self.conv(x)).flatten(1)

    sites, warned = _sites(M(), torch.randn(1, 3, 16, 16))
    assert [s.kind for s in sites] == ["conv"] and sites.stride_total == (2, 2) and not warned


def test_torchvision_swin_gets_its_three_merging_sites_and_timm_swin_is_unchanged():
    tv, _ = _sites(cached("torchvision", "swin_t"), torch.randn(1, 3, 64, 64))
    assert [s.kind for s in tv] == ["conv", "slice", "slice", "slice"]
    assert tv.stride_total == (32, 32) and tv.missed == ()
    assert all(len(s.ops) == 4 for s in tv.sites[1:])  # the four slices of one merging are one site
    tm, _ = _sites(cached("timm", "swin_tiny_patch4_window7_224", (("img_size", (64, 64)), ("window_size", 4))),
                   torch.randn(1, 3, 64, 64))
    assert [s.kind for s in tm] == ["conv"] + ["space_to_depth"] * 3 and tm.stride_total == (32, 32)


def test_transformers_swin_gets_its_merging_sites():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                  num_heads=[1, 1, 1, 1], window_size=2, num_labels=10)
    sites, warned = _sites(transformers.SwinForImageClassification(cfg), torch.randn(1, 3, 64, 64))
    assert [s.kind for s in sites] == ["conv", "slice", "slice", "slice"]
    assert sites.stride_total == (32, 32) and not warned


@torch.no_grad()
def test_levit_subsampling_sites_are_found_and_wrap_runs():
    model = cached("timm", "levit_128s")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    sites, warned = _sites(model, x[:1])
    assert [s.kind for s in sites] == ["conv"] * 4 + ["slice"] * 2
    assert sites.stride_total == (64, 64) and not warned
    wrapped = undiscard.wrap(model, budget=4)
    y = wrapped(x)
    assert y.shape == (2, 1000) and torch.isfinite(y).all()
    assert torch.allclose(undiscard.wrap(model, budget=1)(x), model(x), atol=1e-5, rtol=0)


def test_check_samples_the_offsets_of_a_site_with_many_and_always_takes_the_corners():
    site = undiscard.find_sites(nn.Conv2d(1, 1, 16, stride=16), torch.zeros(1, 1, 32, 32))[0]
    a = offsets_to_check(site, torch.Generator().manual_seed(0))
    b = offsets_to_check(site, torch.Generator().manual_seed(1))
    assert len(a) == len(b) == MAX_OFFSETS and len(set(a)) == MAX_OFFSETS and 0 not in a
    corners = {site.index_of(c) for c in [(0, 15), (15, 0), (15, 15)]}
    assert corners <= set(a) and corners <= set(b) and set(a) != set(b)
    small = undiscard.find_sites(nn.Conv2d(1, 1, 3, stride=4), torch.zeros(1, 1, 32, 32))[0]
    assert offsets_to_check(small) == list(range(1, 16))
