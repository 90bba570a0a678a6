"""Site discovery and exact state evaluation on real architectures (random weights)."""

from __future__ import annotations

import pytest
import torch

import undiscard
from conftest import cached

# (zoo, name, constructor kwargs, sizes (H, W): one odd, one non-square)
MODELS = [
    ("timm", "resnet18", (), [(67, 67), (64, 96)]),
    ("timm", "resnet50", (), [(65, 65), (64, 80)]),
    ("timm", "resnet26d", (), [(67, 67), (64, 96)]),
    ("timm", "mobilenetv2_100", (), [(67, 67), (64, 96)]),
    ("timm", "efficientnet_b0", (), [(67, 67), (64, 96)]),
    ("timm", "convnext_atto", (), [(67, 67), (64, 96)]),
    ("timm", "inception_v3", (), [(79, 79), (96, 128)]),
    ("timm", "vit_tiny_patch16_224", (("img_size", (67, 85)), ("dynamic_img_size", True), ("dynamic_img_pad", True)),
     [(67, 85), (64, 96)]),
    ("timm", "swin_tiny_patch4_window7_224", (("img_size", (63, 95)), ("window_size", 4)), [(63, 95)]),
    ("timm", "pvt_v2_b0", (), [(67, 67), (64, 96)]),
    ("timm", "mobilevitv2_050", (), [(64, 96), (96, 64)]),
    ("torchvision", "resnet18", (), [(67, 67), (64, 96)]),
    ("torchvision", "mobilenet_v2", (), [(67, 67), (64, 96)]),
    ("torchvision", "inception_v3", (("init_weights", False), ("aux_logits", False)), [(79, 79), (96, 128)]),
    ("torchvision", "shufflenet_v2_x0_5", (), [(67, 67), (64, 96)]),
]

CASES = [pytest.param(z, n, kw, hw, id=f"{z}:{n}-{hw[0]}x{hw[1]}") for z, n, kw, sizes in MODELS for hw in sizes]


@pytest.mark.parametrize("zoo,name,kwargs,hw", CASES)
@torch.no_grad()
def test_offset_zero_reproduces_model_and_offsets_change_it(zoo, name, kwargs, hw):
    model = cached(zoo, name, kwargs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *hw, generator=g)
    sites = undiscard.find_sites(model, x[:1])
    plain = model(x)
    zero = undiscard.run_states(model, x, sites.zero_state(), sites)
    assert zero.shape == plain.shape
    assert torch.equal(zero, plain)  # offset 0 runs the very same ops on the same batch: bit for bit
    # a non-zero state runs, keeps the shape, stays finite and actually changes the output: by a fair
    # fraction of how much the output differs between two images (max|output| would not do: in random-weight
    # torchvision Inception the head's bias dwarfs what the image changes, ~4e-7 of it)
    last = torch.tensor([s.num_offsets - 1 for s in sites.searchable_sites])
    moved = undiscard.run_states(model, x, last, sites)
    assert moved.shape == plain.shape and torch.isfinite(moved).all()
    between_images = (plain[0] - plain[1]).abs().max()
    assert between_images > 0 and (moved - plain).abs().max() > 0.1 * between_images


def _site_summary(sites):
    return [(s.kind, s.stride, len(s.ops), s.main) for s in sites]


@torch.no_grad()
def test_resnet18_has_five_sites_with_block_transitions_grouped():
    sites = undiscard.find_sites(cached("timm", "resnet18"), torch.randn(1, 3, 64, 64))
    assert [s.name for s in sites] == [
        "conv1",
        "maxpool",
        "layer2.0.conv1 + layer2.0.downsample.0",
        "layer3.0.conv1 + layer3.0.downsample.0",
        "layer4.0.conv1 + layer4.0.downsample.0",
    ]
    assert sites.searchable == (1, 2, 3)
    assert [s.cum_stride for s in sites] == [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)]
    assert sites.space_size == 64 and sites.stride_total == (32, 32)


@torch.no_grad()
def test_resnet50_transition_groups_strided_conv2_with_shortcut():
    sites = undiscard.find_sites(cached("timm", "resnet50"), torch.randn(1, 3, 64, 64))
    assert len(sites) == 5
    for stage in (2, 3, 4):
        site = sites[stage]
        assert {o.name for o in site.ops} == {f"layer{stage}.0.conv2", f"layer{stage}.0.downsample.0"}


@torch.no_grad()
def test_resnet26d_groups_avgpool_shortcut_with_conv():
    sites = undiscard.find_sites(cached("timm", "resnet26d"), torch.randn(1, 3, 64, 64))
    assert [s.kind for s in sites] == ["conv", "max_pool", "conv+avg_pool", "conv+avg_pool", "conv+avg_pool"]


@pytest.mark.parametrize("zoo,kwargs", [("timm", ()), ("torchvision", (("init_weights", False), ("aux_logits", False)))])
@torch.no_grad()
def test_inception_reduction_branches_form_one_site_including_functional_pool(zoo, kwargs):
    sites = undiscard.find_sites(cached(zoo, "inception_v3", kwargs), torch.randn(1, 3, 96, 96))
    assert len(sites) == 5
    mixed_6a, mixed_7a = sites[3], sites[4]
    assert len(mixed_6a.ops) == 3 and len(mixed_7a.ops) == 3
    assert "Mixed_6a:max_pool2d" in [o.name for o in mixed_6a.ops]  # F.max_pool2d inside forward
    assert all(s.main for s in sites)


@torch.no_grad()
def test_swin_patch_merging_is_found_as_space_to_depth():
    model = cached("timm", "swin_tiny_patch4_window7_224", (("img_size", (63, 95)), ("window_size", 4)))
    sites = undiscard.find_sites(model, torch.randn(1, 3, 63, 95))
    assert _site_summary(sites) == [("conv", (4, 4), 1, True)] + [("space_to_depth", (2, 2), 1, True)] * 3
    assert [s.name for s in sites[1:]] == [f"layers.{i}.downsample" for i in (1, 2, 3)]
    assert sites[1].ops[0].spatial_dims == (1, 2)  # NHWC


@torch.no_grad()
def test_pvt_key_value_reduction_convs_are_side_sites_and_not_searched_by_default():
    sites = undiscard.find_sites(cached("timm", "pvt_v2_b0"), torch.randn(1, 3, 64, 64))
    main = [s for s in sites if s.main]
    side = [s for s in sites if not s.main]
    assert [s.stride for s in main] == [(4, 4), (2, 2), (2, 2), (2, 2)]
    assert [s.stride for s in side] == [(8, 8)] * 2 + [(4, 4)] * 2 + [(2, 2)] * 2
    assert all(".attn.sr" in s.name for s in side)
    assert sites.searchable == (main[1].index, main[2].index)
    # a side site moves no later grid: its displacement is 0 and it leaves P_l alone
    every = sites.with_searchable("all")
    st = torch.zeros(len(every.searchable), dtype=torch.long)
    st[side[0].index] = 5
    assert every.displacement(st).tolist() == [0, 0]
    assert [s.cum_stride for s in main] == [(1, 1), (4, 4), (8, 8), (16, 16)]


@pytest.mark.parametrize(
    "zoo,name,expected",
    [
        ("timm", "vit_tiny_patch16_224", [("conv", (16, 16))]),
        ("timm", "convnext_atto", [("conv", (4, 4))] + [("conv", (2, 2))] * 3),
        ("timm", "efficientnet_b0", [("conv", (2, 2))] * 5),
        ("timm", "mobilenetv2_100", [("conv", (2, 2))] * 5),
        ("timm", "mobilevitv2_050", [("conv", (2, 2))] * 5),
        ("torchvision", "resnet18", [("conv", (2, 2)), ("max_pool", (2, 2))] + [("conv", (2, 2))] * 3),
        ("torchvision", "mobilenet_v2", [("conv", (2, 2))] * 5),
    ],
)
@torch.no_grad()
def test_site_counts_per_architecture(zoo, name, expected):
    kwargs = (("img_size", 64),) if name.startswith("vit") else ()
    sites = undiscard.find_sites(cached(zoo, name, kwargs), torch.randn(1, 3, 64, 64))
    assert [(s.kind, s.stride) for s in sites] == expected


@torch.no_grad()
def test_shufflenet_downsampling_units_group_both_branches():
    sites = undiscard.find_sites(cached("torchvision", "shufflenet_v2_x0_5"), torch.randn(1, 3, 64, 64))
    assert len(sites) == 5
    for s in sites[2:]:
        assert len(s.ops) == 2 and {o.name.split(".")[2] for o in s.ops} == {"branch1", "branch2"}


@torch.no_grad()
def test_vit_single_site_is_searchable_when_inner_leaves_none():
    sites = undiscard.find_sites(cached("timm", "vit_tiny_patch16_224", (("img_size", 64),)), torch.randn(1, 3, 64, 64))
    assert sites.searchable == (0,) and sites.space_size == 256
