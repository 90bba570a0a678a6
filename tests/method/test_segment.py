"""Dense prediction: exactness at offset 0, the roll test at input resolution, the engine's
fallback for cross-site skips, aggregation with border masks, models and checkpoints."""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import undiscard
from conftest import EPS16, assert_close_scaled, depth_and_width, rounding_ops
from undiscard.method.segment import _LEVEL, _SkipAlignMode, aggregate_dense, align_dense, dense_forward, dense_logits, level_displacements, mean_pixel_entropy, upsample_logits, wrap_segmentation
from undiscard.models.segmenters import build_segmenter, load_segmenter, parameter_count, save_segmenter

HAS_SMP = importlib.util.find_spec("segmentation_models_pytorch") is not None
ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=None)
def seg_model(name: str) -> nn.Module:
    """Random-weight segmentation models, built once per session (seeded)."""
    torch.manual_seed(0)
    if name in ("deeplabv3-tiny", "segformer-tiny"):
        return build_segmenter(name, num_classes=5, in_chans=1)
    if name.startswith("smp:"):
        return load_segmenter(name, num_classes=4, in_chans=1).model
    return load_segmenter(f"torchvision:{name}", num_classes=4).model


def _input(name: str, n: int = 2, size: int = 64) -> torch.Tensor:
    c = 3 if name in ("deeplabv3_resnet50", "fcn_resnet50") else 1
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(1))


NEEDS_SMP = pytest.mark.skipif(not HAS_SMP, reason="segmentation_models_pytorch is not installed")
SMP = [pytest.param(f"smp:{arch}:resnet18", marks=NEEDS_SMP, id=f"smp:{arch}:resnet18")
       for arch in ("Unet", "FPN", "DeepLabV3Plus")]  # skipped visibly, never dropped from the lists

EXACT = ["deeplabv3_resnet50", "fcn_resnet50", "deeplabv3-tiny", "segformer-tiny", *SMP]


@pytest.mark.parametrize("name", EXACT)
def test_offset_zero_reproduces_each_models_logits_exactly(name):
    model = seg_model(name)
    x = _input(name)
    fwd = dense_forward(model)
    with torch.no_grad():
        raw = fwd(x)
        sites = undiscard.find_sites(model, x[:1])
        with undiscard.use_states(model, sites, sites.zero_state(x.shape[0])):
            zero = fwd(x)
        plain = wrap_segmentation(model, budget=1)(x)
        w = wrap_segmentation(model, budget=4)
        searched = w.combine(w.search(x, budget=1))
    assert torch.equal(zero, raw)
    ref = raw if raw.shape[-2:] == x.shape[-2:] else F.interpolate(raw, size=x.shape[-2:], mode="bilinear", align_corners=False)
    assert plain.shape == (2, raw.shape[1], 64, 64)
    assert torch.equal(plain, ref) and torch.equal(searched, ref) and torch.equal(dense_logits(model, x), ref)


def test_dilated_backbone_counts_only_the_real_subsampling_sites():
    """Output stride 8: layer3/layer4 trade stride for dilation, so they are no sites."""
    sites = undiscard.find_sites(seg_model("deeplabv3_resnet50"), _input("deeplabv3_resnet50", 1))
    assert [s.name for s in sites] == ["backbone.conv1", "backbone.maxpool",
                                       "backbone.layer2.0.conv2 + backbone.layer2.0.downsample.0"]
    assert sites.stride_total == (8, 8) and list(sites.searchable) == [1]
    tiny = undiscard.find_sites(seg_model("deeplabv3-tiny"), torch.randn(1, 1, 96, 96))  # output stride 16
    assert tiny.stride_total == (16, 16) and len(tiny) == 4 and not any("layer4" in s.name for s in tiny)
    assert list(tiny.searchable) == [1, 2] and tiny.space_size == 16


class CircularSegNet(nn.Module):
    """Circular-padded convs (kernel = 2*pad + 1), four stride-2 sites, cell logits repeated
    ``rep`` times (16: to input size, an exact upsampling), so that net_s(x) == net_0(roll(x, -Delta))
    exactly (at the net's own output resolution when ``rep`` < 16)."""

    def __init__(self, rep: int = 16) -> None:
        super().__init__()
        self.rep = rep
        torch.manual_seed(0)
        c = dict(padding_mode="circular")
        self.stem = nn.Conv2d(2, 4, 3, 2, 1, **c)
        self.mid = nn.Conv2d(4, 4, 3, 1, 1, **c)
        self.down1 = nn.Conv2d(4, 6, 3, 2, 1, **c)
        self.down2 = nn.Conv2d(6, 6, 5, 2, 2, **c)
        self.down3 = nn.Conv2d(6, 6, 3, 2, 1, **c)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        y = torch.relu(self.mid(torch.relu(self.stem(x))))
        y = self.head(torch.relu(self.down3(torch.relu(self.down2(torch.relu(self.down1(y)))))))
        return y.repeat_interleave(self.rep, -2).repeat_interleave(self.rep, -1)


@torch.no_grad()
def test_aligned_dense_output_of_every_state_equals_the_default_on_the_rolled_image():
    """The roll test at input resolution: aligned_s(x) == roll(D_0(roll(x, -Delta)), +Delta), every state."""
    net = CircularSegNet().double().eval()
    x = torch.randn(1, 2, 32, 48, dtype=torch.double, generator=torch.Generator().manual_seed(2))
    w = wrap_segmentation(net, budget=256, criterion="displacement", searchable="main", fill="circular")
    found = w.search(x)
    assert found.states.shape == (1, 256, 4) and len({tuple(s) for s in found.states[0].tolist()}) == 256
    aligned, valid = align_dense(found.logits[0], found.delta[0], "circular")
    assert valid is None
    assert int(found.delta[0].max()) == 1 + 2 + 4 + 8  # the largest state moves 15 px per axis
    rolled = torch.cat([torch.roll(x, (-int(dh), -int(dw)), (-2, -1)) for dh, dw in found.delta[0].tolist()])
    ref = torch.stack([torch.roll(y, (int(dh), int(dw)), (-2, -1)) for y, (dh, dw) in zip(net(rolled), found.delta[0].tolist())])
    torch.testing.assert_close(aligned, ref, rtol=1e-12, atol=1e-12)
    # the default fill masks exactly the first Delta rows / columns and agrees elsewhere
    masked, valid = align_dense(found.logits[0], found.delta[0], "mask")
    for m, v, r, (dh, dw) in zip(masked, valid, ref, found.delta[0].tolist()):
        assert int((~v).sum()) == 32 * 48 - (32 - dh) * (48 - dw)
        assert bool(v[0, dh:, dw:].all())
        torch.testing.assert_close(m[:, dh:, dw:], r[:, dh:, dw:], rtol=1e-12, atol=1e-12)
    # a wrong direction of the shift is caught by the same comparison
    wrong, _ = align_dense(found.logits[0], -found.delta[0], "circular")
    assert (wrong - ref).abs().max() > 1e-3


@torch.no_grad()
def test_roll_test_holds_exactly_through_the_bilinear_upsampling_of_quarter_size_logits():
    """The same roll test with a net whose logits are 1/4 of the input size. The library
    upsamples each state's logits (bilinear) BEFORE the +Delta shift, so the invariant
    aligned_s(x) == roll(D_0(roll(x, -Delta)), +Delta) still holds exactly, D_0 being the default
    state's input-size output (dense_logits: the upsampled plain logits). It would not hold if the
    shift were applied at the native resolution and the upsampling after it (most Delta are not
    whole 4-px cells); that order is checked to differ. Also checked through combine (mean)."""
    net = CircularSegNet(rep=4).double().eval()
    x = torch.randn(1, 2, 32, 48, dtype=torch.double, generator=torch.Generator().manual_seed(2))
    w = wrap_segmentation(net, budget=256, criterion="displacement", searchable="main", fill="circular")
    found = w.search(x)
    assert found.logits.shape == (1, 256, 3, 8, 12)  # the native 1/4 size is what the search keeps
    delta = found.delta[0]
    assert int(delta.max()) == 15 and bool((delta % 4 != 0).any())
    rolled = torch.cat([torch.roll(x, (-int(dh), -int(dw)), (-2, -1)) for dh, dw in delta.tolist()])
    d0 = dense_logits(net, rolled)
    assert d0.shape == (256, 3, 32, 48)
    ref = torch.stack([torch.roll(y, (int(dh), int(dw)), (-2, -1)) for y, (dh, dw) in zip(d0, delta.tolist())])
    aligned, valid = align_dense(upsample_logits(found.logits[0], (32, 48)), delta, "circular")
    assert valid is None
    torch.testing.assert_close(aligned, ref, rtol=1e-12, atol=1e-12)
    # the library's own pipeline (upsample, log-softmax, shift, mean) gives the mean of the reference
    torch.testing.assert_close(w.combine(found, 256, "mean").exp(), ref.softmax(1).mean(0, keepdim=True),
                               rtol=1e-10, atol=1e-12)
    # shifting first, then upsampling, is another thing: the test would see the wrong order
    cells = [(dh // 4, dw // 4) for dh, dw in delta.tolist()]
    wrong = upsample_logits(torch.stack([torch.roll(y, c, (-2, -1)) for y, c in zip(found.logits[0], cells)]), (32, 48))
    assert (wrong - ref).abs().max() > 1e-3


@torch.no_grad()
def test_mean_aggregate_is_the_mean_of_the_aligned_probabilities():
    net = CircularSegNet().double().eval()
    x = torch.randn(2, 2, 32, 32, dtype=torch.double, generator=torch.Generator().manual_seed(3))
    w = wrap_segmentation(net, budget=5, criterion="random", fill="circular", return_details=True)
    out, det = w(x)
    for i in range(2):
        probs = []
        for st, (dh, dw) in zip(det.states[i], det.delta[i].tolist()):
            y = undiscard.run_states(net, x[i : i + 1], st, det.sites)
            probs.append(torch.roll(y.softmax(1), (dh, dw), (-2, -1)))
        torch.testing.assert_close(out[i : i + 1].exp(), torch.stack(probs).mean(0), rtol=1e-10, atol=1e-12)


def test_border_pixels_a_state_does_not_cover_are_excluded():
    k = 3  # float64: the hand-computed references are the same formulas, exact to rounding
    logp = torch.log_softmax(torch.randn(1, 2, k, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64), 2)
    valid = torch.ones(1, 2, 1, 4, 4, dtype=torch.bool)
    valid[0, 1, 0, :2] = False  # state 1 shifted by 2 rows: no prediction for rows 0, 1
    logp[0, 1, :, :2] = float("nan")  # whatever sits there must not leak in
    for agg in ("mean", "entropy"):
        out = aggregate_dense(logp, valid, agg)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[0, :, :2], logp[0, 0, :, :2])  # the default alone
        torch.testing.assert_close(out.exp().sum(1), torch.ones(1, 4, 4, dtype=torch.float64))
    mean = aggregate_dense(logp, valid, "mean")
    torch.testing.assert_close(mean[0, :, 2:].exp(), logp[0, :, :, 2:].exp().mean(0))


def test_entropy_weights_per_pixel_favour_the_confident_state():
    k = 4  # float64: the reference is the same formula by hand, exact to rounding
    sure = torch.log_softmax(torch.tensor([8.0, 0, 0, 0], dtype=torch.float64), 0)
    unsure = torch.log_softmax(torch.tensor([0.0, 0.1, 0, 0], dtype=torch.float64), 0)
    uniform = torch.full((k,), -math.log(k), dtype=torch.float64)
    logp = torch.stack([sure, unsure])[None, :, :, None, None].expand(1, 2, k, 1, 2).clone()
    logp[0, :, :, 0, 1] = uniform  # both uniform at this pixel: weight 0 each, equal weights
    out = aggregate_dense(logp, torch.ones(1, 2, 1, 1, 2, dtype=torch.bool), "entropy")
    h = lambda lp: float(-(lp.exp() * lp).sum())  # noqa: E731
    w = torch.tensor([1 - h(sure) / math.log(k), 1 - h(unsure) / math.log(k)], dtype=torch.float64)
    w = w / w.sum()
    torch.testing.assert_close(out[0, :, 0, 0].exp(), w[0] * sure.exp() + w[1] * unsure.exp())
    torch.testing.assert_close(out[0, :, 0, 1].exp(), uniform.exp())
    assert float(out[0, 0, 0, 0].exp()) > float(aggregate_dense(logp, torch.ones(1, 2, 1, 1, 2, dtype=torch.bool))[0, 0, 0, 0].exp())


def test_entropy_criterion_expands_the_lowest_mean_pixel_entropy_state():
    model = seg_model("deeplabv3-tiny")
    x = torch.randn(3, 1, 96, 96, generator=torch.Generator().manual_seed(5))
    w = wrap_segmentation(model, budget=6)
    found = w.search(x)
    for i in range(3):
        for t in range(1, 6):
            best = int(torch.argmin(found.entropy[i, :t]))
            assert int((found.states[i, t] != found.states[i, best]).sum()) == 1
    # the recorded entropy is the mean over the valid pixels of the aligned prediction
    logp = torch.log_softmax(found.logits[0], 1)
    al, valid = align_dense(logp, found.delta[0], "mask")
    valid = torch.ones_like(al[:, :1], dtype=torch.bool) if valid is None else valid
    # the same per-pixel entropies (log-softmax and a sum over K classes: ~4 roundings of sums of K)
    # summed over the H*W pixels in another order
    k, hw = logp.shape[1], logp.shape[-2] * logp.shape[-1]
    assert_close_scaled(found.entropy[0], mean_pixel_entropy(al, valid).float(), ops=4 * math.sqrt(k) + math.sqrt(hw))
    assert not torch.equal(found.states, wrap_segmentation(model, budget=6, criterion="random").search(x).states)


class TinyUNet(nn.Module):
    """Encoder features cross two sites into the decoder (U-Net skips)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inc = nn.Conv2d(1, 4, 3, 1, 1)
        self.d1 = nn.Conv2d(4, 8, 3, 2, 1)
        self.d2 = nn.Conv2d(8, 8, 3, 2, 1)
        self.d3 = nn.Conv2d(8, 8, 3, 2, 1)
        self.u2 = nn.Conv2d(16, 8, 3, 1, 1)
        self.u1 = nn.Conv2d(16, 4, 3, 1, 1)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        s0 = torch.relu(self.inc(x))
        s1 = torch.relu(self.d1(s0))
        s2 = torch.relu(self.d2(s1))
        b = torch.relu(self.d3(s2))
        y = torch.relu(self.u2(torch.cat([F.interpolate(b, scale_factor=2.0), s2], 1)))
        y = torch.relu(self.u1(torch.cat([F.interpolate(y, scale_factor=2.0), s1], 1)))
        return self.out(torch.cat([F.interpolate(y, scale_factor=2.0), s0], 1))


CROSS = ["tiny-unet", "segformer-tiny", *SMP]


def _alone(model: nn.Module, sites, x1: torch.Tensor, state: torch.Tensor, align_skips: bool) -> torch.Tensor:
    """Native logits of ONE image under ONE state, by ``use_states`` on a batch of one (no search,
    no trie, no store). With ``align_skips`` the forward runs inside the skip alignment for that
    state, as the library's per-state forward does; the alignment's own arithmetic is pinned
    independently by ``test_aligned_skips_shift_the_deep_map_onto_the_shallow_grid_before_the_fusion``."""
    fwd = dense_forward(model)
    xin = x1.clone()
    with torch.no_grad(), undiscard.use_states(model, sites, state[None]):
        if not align_skips:
            return fwd(xin)[0]
        setattr(xin, _LEVEL, 0)  # the input: before every searchable site
        with _SkipAlignMode(sites, state[None], tuple(x1.shape[-2:])):
            return fwd(xin)[0]


@pytest.mark.parametrize("align_skips", [True, False])
@pytest.mark.parametrize("name", CROSS)
def test_cross_site_skips_give_the_same_logits_through_the_fast_path_and_the_fallback(name, align_skips):
    """The trie detects the crossing and falls back; every (image, state) the search returns then
    equals that image run alone under that state (an independent reference: the trie's fallback
    and the engine="rerun" search run batches of 4 mixed images and states through the same code,
    so comparing them with each other alone could not fail)."""
    model = TinyUNet().eval() if name == "tiny-unet" else seg_model(name)
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(6))
    res = {}
    for engine in ("trie", "rerun"):
        w = wrap_segmentation(model, budget=5, engine=engine, max_batch=4, searchable="main", align_skips=align_skips)
        with torch.no_grad():
            found = w.search(x)
            res[engine] = (found, w.combine(found), w.last_engine, w.last_out_level)
    (a, out_a, eng_a, lvl_a), (b, out_b, eng_b, lvl_b) = res["trie"], res["rerun"]
    assert eng_a == "rerun (fallback)" and eng_b == "rerun"
    assert torch.equal(a.states, b.states) and torch.equal(a.delta, b.delta) and lvl_a == lvl_b
    sites = undiscard.find_sites(model, x[:1], searchable="main")
    # aligned skips put the output on the grid of the finest skip (tiny U-Net: before every searched site)
    n_levels = len(sites.searchable)
    if align_skips:
        assert lvl_a < n_levels and (lvl_a == 0 or name != "tiny-unet")
    else:
        assert lvl_a == n_levels
    flat = a.states.flatten(0, 1)
    assert torch.equal(a.delta.flatten(0, 1), level_displacements(sites, flat)[lvl_a])
    if lvl_a == n_levels:
        assert torch.equal(a.delta.flatten(0, 1), sites.displacement(flat))
    # float32 through other batch compositions (kernel blocking differs): rounding of the network
    ops = rounding_ops(model)
    assert_close_scaled(a.logits, b.logits, ops=ops)
    assert_close_scaled(out_a, out_b, ops=ops, scale=b.logits.abs().max())
    aligned_mattered = False
    for i, t in [(0, t) for t in range(a.states.shape[1])] + [(1, 4), (2, 2), (2, 3)]:
        ref = _alone(model, sites, x[i : i + 1], a.states[i, t], align_skips)
        assert_close_scaled(a.logits[i, t], ref, ops=ops)
        if align_skips and t > 0 and not aligned_mattered:
            plain = _alone(model, sites, x[i : i + 1], a.states[i, t], False)
            aligned_mattered = bool((plain - ref).abs().max() > 1e-3)
    assert aligned_mattered or not align_skips  # the alignment changed the logits of some state


class SkipProbe(nn.Module):
    """A shallow full-resolution map plus a deep map behind two stride-2 1x1 convs (two sites),
    repeated back to full resolution and added: the simplest decoder fusion across sites."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shallow = nn.Conv2d(1, 2, 1)
        self.d1 = nn.Conv2d(1, 3, 1, stride=2)
        self.d2 = nn.Conv2d(3, 2, 1, stride=2)

    def forward(self, x):
        deep = self.d2(self.d1(x)).repeat_interleave(4, -2).repeat_interleave(4, -1)
        return self.shallow(x) + deep


@torch.no_grad()
def test_aligned_skips_shift_the_deep_map_onto_the_shallow_grid_before_the_fusion():
    from undiscard.method.align import shift_cells

    model = SkipProbe().double().eval()
    x = torch.randn(1, 1, 16, 16, dtype=torch.double, generator=torch.Generator().manual_seed(9))
    w = wrap_segmentation(model, budget=16, criterion="displacement", searchable="main", engine="rerun")
    found = w.search(x)
    assert w.last_out_level == 0 and not bool(found.delta.any())  # the output is on the input's grid
    for st, y in zip(found.states[0], found.logits[0]):
        (sh0, sw0), (sh1, sw1) = (w.sites_for(x)[i].offset_of(int(k)) for i, k in zip((0, 1), st))
        dh, dw = sh0 + 2 * sh1, sw0 + 2 * sw1  # Delta of the deep map (P = 1, then 2)
        # 1x1 convs: sampling at offset s then convolving == convolving then sampling
        deep = F.conv2d(F.conv2d(x[..., dh::4, dw::4], model.d1.weight, model.d1.bias), model.d2.weight, model.d2.bias)
        deep = deep.repeat_interleave(4, -2).repeat_interleave(4, -1)
        ref = model.shallow(x) + shift_cells(deep, torch.tensor([[float(dh), float(dw)]]), "border")
        torch.testing.assert_close(y[None], ref, rtol=1e-12, atol=1e-12)
    unaligned = wrap_segmentation(model, budget=16, criterion="displacement", searchable="main", align_skips=False)
    assert unaligned.search(x).delta.abs().sum() > 0 and unaligned.last_out_level == 2


def _search_both_engines(model, x, **kw):
    """engine -> (found, combined, last_engine, last_rows) of one search with each engine."""
    got = {}
    for engine in ("trie", "rerun"):
        w = wrap_segmentation(model, engine=engine, **kw)
        with torch.no_grad():
            found = w.search(x)
            got[engine] = (found, w.combine(found), w.last_engine, w.last_rows)
    return got


def test_a_model_without_skips_shares_prefixes_with_the_same_results():
    model = seg_model("deeplabv3-tiny")
    x = torch.randn(3, 1, 96, 96, generator=torch.Generator().manual_seed(7))
    got = _search_both_engines(model, x, budget=6, aggregate="entropy")
    (a, out_a, eng_a, _), (b, out_b, eng_b, _) = got["trie"], got["rerun"]
    assert eng_a == "trie" and eng_b == "rerun"  # no crossing: the trie did not fall back
    assert torch.equal(a.states, b.states) and torch.equal(a.delta, b.delta)
    ops = rounding_ops(model)  # float32, other batch compositions
    assert_close_scaled(a.logits, b.logits, ops=ops)
    assert_close_scaled(out_a, out_b, ops=ops, scale=b.logits.abs().max())
    # an independent reference: each (image, state) run alone (no skips, so nothing to align)
    sites = wrap_segmentation(model, budget=1).sites_for(x)
    assert torch.equal(a.delta.flatten(0, 1), sites.displacement(a.states.flatten(0, 1)))
    for i, t in ((0, 0), (0, 3), (1, 5), (2, 2), (2, 4)):
        assert_close_scaled(a.logits[i, t], _alone(model, sites, x[i : i + 1], a.states[i, t], False), ops=ops)


def test_the_trie_computes_fewer_rows_than_rerunning_on_a_model_without_skips():
    model = seg_model("deeplabv3-tiny")
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(7))
    got = _search_both_engines(model, x, budget=5, searchable="main")
    (_, _, ea, ra), (_, _, eb, rb) = got["trie"], got["rerun"]
    assert ea == "trie" and ra[-1] == rb[-1] == 3 * 5  # every state reached the last site once
    assert ra[0] < rb[0]  # states that differ only at later sites resumed from the cached prefix


@pytest.mark.parametrize("arch", ["deeplabv3", "segformer"])
def test_cached_shifted_sums_equal_the_plain_aggregate_of_the_aligned_log_probabilities(arch):
    """combine's default path (fill="mask": shifted sums over the search's cached probabilities,
    _aggregate_shifted) equals the straightforward reference built from found.logits / found.delta,
    for both aggregates and every budget; and so does the uncached path (cache_bytes = -1).
    The shipped weights (trained, confident) make the entropy weights far from uniform; SegFormer's
    logits are 1/4 size (the upsampling) and channels-last."""
    model = load_segmenter(str(ROOT / "zoo" / f"fmnist_seg_{arch}.safetensors")).model
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(11))
    w = wrap_segmentation(model, budget=6, searchable="main")
    with torch.no_grad():
        found = w.search(x)
    assert found._store.keep_probs and found._store.finite  # the cached path is the one tested
    n, big_b = found.states.shape[:2]
    assert bool(found.delta.flatten(0, 1).any(1).sum() >= 3)  # shifted states, so masks matter
    w_nc = wrap_segmentation(model, budget=6, searchable="main")
    w_nc.cache_bytes = -1
    with torch.no_grad():
        uncached = w_nc.search(x)
    assert not uncached._store.keep_probs and torch.equal(uncached.states, found.states)
    # the same logits aggregated along two paths: upsampling (4 terms), log-softmax and entropy
    # (sums of K), sums over <= B states: ~6 roundings of sums of K*B terms, relative to the logits
    ops, scale = 6 * math.sqrt(found.logits.shape[2] * big_b), found.logits.abs().max()
    for agg in ("mean", "entropy"):
        for b in range(2, big_b + 1):
            y = found.logits[:, :b].flatten(0, 1)
            logp = torch.log_softmax(upsample_logits(y, (64, 64)), 1)
            al, valid = align_dense(logp, found.delta[:, :b].flatten(0, 1), "mask")
            valid = torch.ones_like(al[:, :1], dtype=torch.bool) if valid is None else valid
            ref = aggregate_dense(al.view(n, b, *al.shape[1:]), valid.view(n, b, *valid.shape[1:]), agg)
            with torch.no_grad():
                got, slow = w.combine(found, b, agg), w_nc.combine(uncached, b, agg)
            assert_close_scaled(got, ref, ops=ops, scale=scale)
            assert_close_scaled(slow, got, ops=ops, scale=scale)
    # the reference is not blind: another aggregate is far from it
    assert (w.combine(found, big_b, "mean") - w.combine(found, big_b, "entropy")).abs().max() > 1e-3


def test_batch_results_do_not_depend_on_the_other_images():
    """The shipped (trained) SegFormer: random weights predict nearly uniform pixels, where the
    entropy weights ``1 - H/log K`` are differences of nearly equal numbers that amplify the
    float32 rounding ~10^4 times (a batch of 3 and a batch of 1 then agree only to ~1e-4 of the
    log-probabilities, beyond any rounding tolerance); trained predictions are confident."""
    model = load_segmenter(str(ROOT / "zoo" / "fmnist_seg_segformer.safetensors")).model
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(8))
    w = wrap_segmentation(model, budget=4, aggregate="entropy", return_details=True)
    with torch.no_grad():
        many, det = w(x)
        assert w.last_out_level == 0  # the head fuses stage 0, which is before both searched sites
        one, det1 = w(x[:1])  # the search seeds each image by its position in the batch: same position
    assert many.shape == (3, 11, 64, 64) and torch.isfinite(many).all()
    assert len({tuple(map(tuple, s.tolist())) for s in det.states}) > 1  # images chose different states
    plain = dense_logits(model, x)
    assert_close_scaled(many[:1], one, ops=rounding_ops(model), scale=plain.abs().max())  # float32, batch of 3 vs 1
    assert torch.equal(det.states[:1], det1.states)
    assert not torch.allclose(many, plain.log_softmax(1), atol=1e-4)  # states changed something


def test_budget_above_the_space_is_a_clear_error():
    model = seg_model("deeplabv3-tiny")
    with pytest.raises(undiscard.StateError, match="outside 1..16"):
        wrap_segmentation(model, budget=17)(torch.randn(1, 1, 96, 96))


@pytest.mark.parametrize("bad", [dict(budget=0), dict(budget=2.5), dict(criterion="learned"), dict(aggregate="attention"),
                                 dict(engine="fast"), dict(fill="zeros"), dict(max_batch=0)])
def test_bad_arguments_are_clear_errors(bad):
    with pytest.raises(undiscard.OptionError, match=next(iter(bad))):
        wrap_segmentation(seg_model("deeplabv3-tiny"), **bad)


def test_bad_input_is_a_clear_error():
    w = wrap_segmentation(seg_model("deeplabv3-tiny"), budget=2)
    with pytest.raises(undiscard.InputError, match="unsqueeze"):
        w(torch.randn(1, 96, 96))
    with pytest.raises(undiscard.InputError, match="floating-point"):
        w(torch.zeros(1, 1, 96, 96, dtype=torch.long))
    with pytest.raises(undiscard.InputError, match="N, C, H, W"):
        w([1, 2, 3])


def test_output_detection_and_a_custom_output():
    class Obj:
        def __init__(self, t):
            self.logits = t

    base = TinyUNet().eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = base(x)
        for wrapper in (lambda t: {"out": t, "aux": t}, Obj, lambda t: (t, None), lambda t: t):
            m = _Wrapped(base, wrapper)
            assert torch.equal(dense_logits(m, x), ref)
        m = _Wrapped(base, lambda t: {"seg": t})
        with pytest.raises(undiscard.UndiscardError, match="output="):
            dense_logits(m, x)
        assert torch.equal(wrap_segmentation(m, budget=1, output=lambda d: d["seg"])(x), ref)
        with pytest.raises(undiscard.UndiscardError, match=r"\(N, K, h, w\)"):
            wrap_segmentation(m, budget=1, output=lambda d: d["seg"].mean((2, 3)))(x)


class _Wrapped(nn.Module):
    def __init__(self, net, wrap):
        super().__init__()
        self.net, self.wrap = net, wrap

    def forward(self, x):
        return self.wrap(self.net(x))


def test_upsampling_is_bilinear_without_corner_alignment():
    y = torch.randn(1, 2, 5, 7)
    assert torch.equal(upsample_logits(y, (5, 7)), y)
    assert torch.equal(upsample_logits(y, (20, 28)), F.interpolate(y, (20, 28), mode="bilinear", align_corners=False))  # the same kernel


# --------------------------------------------------------------------- models and checkpoints

def test_project_architectures_fit_the_size_budget():
    dl, sf = build_segmenter("deeplabv3-tiny"), build_segmenter("segformer-tiny")
    total = parameter_count(dl) + parameter_count(sf)
    assert total * 2 <= 1_900_000  # both float16 checkpoints together under 1.9 MB
    assert dense_logits(dl, torch.randn(1, 1, 96, 96)).shape == (1, 11, 96, 96)
    assert dense_forward(sf)(torch.randn(1, 1, 96, 96)).shape == (1, 11, 24, 24)


def test_all_shipped_weights_stay_within_the_repository_budget():
    # the converged 64-px zoo (about 6 MB) and the short-trained 128-px one (37 MB); training resume files excluded
    files = sorted(f for f in (ROOT / "zoo").glob("*.safetensors") if ".resume." not in f.name)
    assert sum(f.stat().st_size for f in files) <= 48_000_000, [(f.name, f.stat().st_size) for f in files]
    seg = [f for f in files if f.name.startswith("fmnist_seg_")]
    assert sum(f.stat().st_size for f in seg) <= 1_900_000


@pytest.mark.parametrize("arch", ["deeplabv3-tiny", "segformer-tiny"])
def test_checkpoint_round_trip(tmp_path, arch):
    torch.manual_seed(3)
    model = build_segmenter(arch, num_classes=4, in_chans=1)
    for p in model.parameters():  # move off the initialisation so a missing load would show
        p.data.add_(0.01 * torch.randn_like(p))
    x = torch.randn(2, 1, 64, 64)
    path = save_segmenter(model, tmp_path / "m.safetensors", arch=f"seg:{arch}", num_classes=4, in_chans=1,
                          input_size=(1, 64, 64), half=False)
    back = load_segmenter(str(path))
    assert back.num_classes == 4 and back.input_size == (1, 64, 64) and back.pretrained
    with torch.no_grad():
        assert torch.equal(dense_logits(back.model, x), dense_logits(model, x))
    half = load_segmenter(str(save_segmenter(model, tmp_path / "h.safetensors", arch=arch, num_classes=4, in_chans=1,
                                             input_size=(1, 64, 64))))
    with torch.no_grad():
        # float16 weights: each rounded once, by <= eps16/2 of itself, moving each layer's output by about that
        assert_close_scaled(dense_logits(half.model, x), dense_logits(model, x), ops=depth_and_width(model)[0], eps=EPS16)
    with pytest.raises(undiscard.UndiscardError, match="num_classes=4"):
        load_segmenter(str(path), num_classes=11)


def test_loading_errors_are_clear(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here either way: fail fast
    with pytest.raises(undiscard.UndiscardError, match="could not"):
        load_segmenter("transformers:nvidia/segformer-b0-finetuned-ade-512-512")
    with pytest.raises(undiscard.UnknownModelError, match="Did you mean"):
        load_segmenter("torchvision:deeplabv3_resnet5")
    with pytest.raises(undiscard.UnknownModelError, match="no segmentation architecture"):
        load_segmenter("seg:unet-huge")
    with pytest.raises(undiscard.UnknownModelError, match="no such file"):
        load_segmenter(str(tmp_path / "missing.safetensors"))
    from undiscard.models.classifiers import save_checkpoint

    cls = save_checkpoint(nn.Conv2d(1, 1, 1), tmp_path / "cls.safetensors", arch="timm:resnet18", num_classes=10,
                          in_chans=1, input_size=(1, 32, 32))
    with pytest.raises(undiscard.UndiscardError, match="not one of undiscard's segmentation checkpoints"):
        load_segmenter(str(cls))


def test_torchvision_names_build_offline_with_random_weights():
    loaded = load_segmenter("torchvision:deeplabv3_mobilenet_v3_large", num_classes=3)
    assert not loaded.pretrained and loaded.num_classes == 3
    with torch.no_grad():
        assert dense_logits(loaded.model, torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


class _Confident(nn.Module):
    """Logits scaled by 1000: every state's softmax underflows to exactly 0 for most classes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return F.interpolate(self.body(x) * 1000, size=x.shape[-2:], mode="bilinear")


@pytest.mark.parametrize("aggregate", ["mean", "entropy"])
@torch.no_grad()
def test_aggregated_log_probabilities_stay_finite_where_every_state_underflows(aggregate):
    torch.manual_seed(0)
    model, x = _Confident().eval(), torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert (torch.softmax(model(x), 1) == 0).float().mean() > 0.3  # the case log-of-mean would turn to -inf
    y = wrap_segmentation(model, budget=4, aggregate=aggregate)(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(torch.logsumexp(y, 1), torch.zeros(()), atol=1e-4)  # log-probabilities: normalised


@pytest.mark.parametrize("name", [*EXACT, "zoo:deeplabv3", "zoo:segformer"])
@torch.no_grad()
def test_every_shipped_and_listed_segmentation_model_gives_finite_aggregated_output(name):
    if name.startswith("zoo:"):
        model, x = load_segmenter(str(ROOT / "zoo" / f"fmnist_seg_{name[4:]}.safetensors")).model, _input("zoo")
    else:
        model, x = seg_model(name), _input(name)
    y = wrap_segmentation(model, budget=4)(x)
    assert not torch.isnan(y).any() and not (y == float("-inf")).any() and torch.isfinite(y).all()
