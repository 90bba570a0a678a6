"""Shared-prefix (trie) evaluation equals one forward per state; crossing tensors fall back."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import undiscard
from conftest import assert_close_scaled, cached, rounding_ops
from undiscard.run.trie import build_trie, run_trie

MODELS = [
    ("timm", "resnet18", (("num_classes", 5),), (3, 64, 64)),
    ("timm", "mobilenetv2_100", (("num_classes", 5),), (3, 64, 64)),
    ("timm", "pvt_v2_b0", (("num_classes", 5),), (3, 64, 64)),
    ("timm", "swin_tiny_patch4_window7_224", (("img_size", 64), ("window_size", 2), ("num_classes", 5)), (3, 64, 64)),
    ("torchvision", "inception_v3", (("num_classes", 5), ("aux_logits", False), ("init_weights", False)), (3, 96, 96)),
]


def _reference(model, x, states, sites):
    n, b, L = states.shape
    img = torch.arange(n).repeat_interleave(b)
    out = undiscard.run_states(model, x[img], states.reshape(n * b, L), sites)
    return out.reshape(n, b, *out.shape[1:])


@pytest.mark.parametrize("zoo,name,kw,size", MODELS, ids=[m[1] for m in MODELS])
def test_trie_equals_one_forward_per_state(zoo, name, kw, size):
    model = cached(zoo, name, kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *size, generator=g)
    sites = undiscard.find_sites(model, x[:1])
    L = len(sites.searchable)
    radix = torch.tensor([s.num_offsets for s in sites.searchable_sites])
    states = (torch.rand(3, 5, L, generator=g) * radix).long()
    states[:, 0] = 0
    states[:, 2, 1:] = states[:, 1, 1:]  # shared suffixes, different first offsets
    states[:, 3, :1] = states[:, 1, :1]  # a shared prefix
    with torch.no_grad():
        res = run_trie(model, x, states, sites)
        ref = _reference(model, x, states, sites)
    assert res.shared
    assert_close_scaled(res.outputs, ref, ops=rounding_ops(model))  # float32, other batch compositions
    # the trie computed no more rows than states, and shared the prefixes it could
    assert res.rows[-1] <= 15 and res.rows[0] <= res.rows[-1]


def test_trie_of_identical_states_computes_one_row_per_image():
    states = torch.zeros(4, 6, 3, dtype=torch.long)
    t = build_trie(states)
    assert [len(p) for p in t.parents] == [4, 4, 4]
    assert torch.equal(t.inverse, torch.arange(4).repeat_interleave(6))


class SkipNet(nn.Module):
    """A U-Net-like net: the stride-1 map crosses two sites into the decoder."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(2, 4, 3, 1, 1)
        self.down1 = nn.Conv2d(4, 4, 3, 2, 1)
        self.down2 = nn.Conv2d(4, 4, 3, 2, 1)
        self.down3 = nn.Conv2d(4, 4, 3, 2, 1)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        s = torch.relu(self.a(x))
        d = self.down3(torch.relu(self.down2(torch.relu(self.down1(s)))))
        up = F.interpolate(d, size=s.shape[-2:], mode="nearest")
        return self.out(torch.cat([up, s], 1))


@pytest.mark.parametrize("n", [1, 3])
def test_a_tensor_crossing_a_site_falls_back_with_the_same_results(n):
    model = SkipNet().eval()
    x = torch.randn(n, 2, 16, 16)
    sites = undiscard.find_sites(model, x[:1])
    assert list(sites.searchable) == [1]
    states = torch.tensor([[[0], [1], [2], [3]]] * n)
    with torch.no_grad():
        res = run_trie(model, x, states, sites)
        ref = _reference(model, x, states, sites)
    assert not res.shared
    assert_close_scaled(res.outputs, ref, ops=rounding_ops(model))


class BatchSizeNet(SkipNet):
    """SkipNet's encoder, reading the batch size before its sites and reshaping with it after
    them (torchvision's ViT does this): no tensor crosses a site, but the expanded rows no
    longer fit the shape."""

    def forward(self, x):
        n = x.shape[0]
        d = self.down3(torch.relu(self.down2(torch.relu(self.down1(torch.relu(self.a(x)))))))
        return d.reshape(n, 4, d.shape[-2] * d.shape[-1]).mean(-1)


@pytest.mark.parametrize("n", [1, 3])
def test_a_batch_size_read_before_a_site_falls_back_with_the_same_results(n):
    model = BatchSizeNet().eval()
    x = torch.randn(n, 2, 16, 16)
    sites = undiscard.find_sites(model, x[:1])
    states = torch.tensor([[[0, 0], [1, 0], [2, 1], [3, 3]]] * n)
    sites = sites.with_searchable([1, 2])
    with torch.no_grad():
        res = run_trie(model, x, states, sites)
        ref = _reference(model, x, states, sites)
        # the one-pass search of an order that reads no output expands the rows at once
        w = undiscard.wrap(model, 4, "displacement", "mean", searchable=[1, 2], return_details=True)
        rerun = undiscard.wrap(model, 4, "displacement", "mean", searchable=[1, 2], engine="rerun",
                               return_details=True)
        got, want = w(x), rerun(x)
    assert not res.shared
    assert_close_scaled(res.outputs, ref, ops=rounding_ops(model))
    assert torch.equal(got[1].states, want[1].states)
    assert_close_scaled(got[0], want[0], ops=rounding_ops(model))


def test_bad_states_are_a_clear_error():
    model = cached("timm", "resnet18", (("num_classes", 5),))
    x = torch.randn(2, 3, 64, 64)
    sites = undiscard.find_sites(model, x[:1])
    with pytest.raises(undiscard.StateError):
        run_trie(model, x, torch.zeros(2, 3, dtype=torch.long), sites)
    with pytest.raises(undiscard.StateError):
        run_trie(model, x, torch.full((2, 2, 3), 9), sites)


@pytest.mark.parametrize("max_batch", [1, 4, 7, 1000])
def test_chunked_equals_unchunked(max_batch):
    model = cached("timm", "resnet18", (("num_classes", 5),))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 64, generator=g)
    sites = undiscard.find_sites(model, x[:1])
    states = torch.randint(0, 4, (4, 5, 3), generator=g)
    with torch.no_grad():
        whole = run_trie(model, x, states, sites)
        parts = run_trie(model, x, states, sites, max_batch=max_batch)
    assert_close_scaled(parts.outputs, whole.outputs, ops=rounding_ops(model))  # chunks: other batch sizes
    assert parts.rows[-1] == whole.rows[-1]  # the same distinct prefixes, split across chunks


def test_requests_in_any_order_and_count_per_image():
    from undiscard.run.trie import run_requests

    model = cached("timm", "resnet18", (("num_classes", 5),))
    x = torch.randn(3, 3, 64, 64)
    sites = undiscard.find_sites(model, x[:1])
    images = torch.tensor([2, 0, 2, 2, 1, 0])
    states = torch.tensor([[0, 1, 2], [3, 3, 3], [0, 1, 3], [1, 0, 0], [2, 2, 2], [3, 3, 3]])
    with torch.no_grad():
        res = run_requests(model, x, images, states, sites, max_batch=3)
        ref = undiscard.run_states(model, x[images], states, sites)
    assert res.shared
    assert_close_scaled(res.outputs, ref, ops=rounding_ops(model))


SEARCH_MODELS = [m for m in MODELS if m[1] in ("resnet18", "mobilenetv2_100", "pvt_v2_b0", "swin_tiny_patch4_window7_224")]


@pytest.mark.parametrize("zoo,name,kw,size", SEARCH_MODELS, ids=[m[1] for m in SEARCH_MODELS])
def test_search_through_the_prefix_cache_equals_rerunning_every_state(zoo, name, kw, size):
    model = cached(zoo, name, kw)
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(2))
    found = {}
    for engine in ("rerun", "trie"):
        u = undiscard.wrap(model, 6, "entropy", "mean", engine=engine, max_batch=4)
        with torch.no_grad():
            found[engine] = (u.search(x), u.last_rows)
    (a, rows_a), (b, rows_b) = found["rerun"], found["trie"]
    assert torch.equal(a.states, b.states)
    assert_close_scaled(b.features, a.features, ops=rounding_ops(model))
    # every evaluated state reached the last site once; earlier sites shared prefixes
    assert rows_b[-1] == rows_a[-1] == 3 * 6
    if name in ("resnet18", "mobilenetv2_100"):  # resumable from cached site inputs
        assert rows_b[0] < rows_a[0]
    else:  # PVT/Swin reshape with -1 before a site: an empty batch fails, prefixes are recomputed
        assert rows_b[0] <= rows_a[0]


def test_search_on_a_model_with_a_crossing_skip_falls_back_with_the_same_results():
    model = SkipNet().eval()
    x = torch.randn(2, 2, 16, 16)
    classifier = nn.Sequential(model, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # head(features(x)) == classifier(x)
    split = (model, lambda f: f.mean((2, 3)))
    found = {}
    for engine in ("rerun", "trie"):
        u = undiscard.wrap(classifier, 3, "entropy", "mean", engine=engine, split=split)
        with torch.no_grad():
            found[engine] = u.search(x)
    assert torch.equal(found["rerun"].states, found["trie"].states)
    assert_close_scaled(found["trie"].features, found["rerun"].features, ops=rounding_ops(model))


def test_a_resumed_pass_computes_only_what_is_new():
    from undiscard.run.trie import SharedPrefixEvaluator

    model = cached("timm", "resnet18", (("num_classes", 5),))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    sites = undiscard.find_sites(model, x[:1])
    ev = SharedPrefixEvaluator(model, x, sites)
    img = torch.tensor([0, 1])
    with torch.no_grad():
        first = ev(img, torch.tensor([[0, 0, 0], [0, 0, 0]]))
        assert ev.rows == [2, 2, 2]
        # differs from the cached prefix only at the last site: sites 0 and 1 are not recomputed
        second = ev(img, torch.tensor([[0, 0, 3], [0, 0, 1]]))
        assert ev.rows == [2, 2, 4]
        third = ev(torch.tensor([1]), torch.tensor([[2, 0, 0]]))
        assert ev.rows == [3, 3, 5]
        ref = undiscard.run_states(model, x[[0, 1, 0, 1, 1]],
                                   torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 3], [0, 0, 1], [2, 0, 0]]), sites)
    assert_close_scaled(torch.cat([first, second, third]), ref, ops=rounding_ops(model))


def test_an_unknown_engine_is_a_clear_error():
    model = cached("timm", "resnet18", (("num_classes", 5),))
    with pytest.raises(undiscard.OptionError, match="engine"):
        undiscard.wrap(model, 2, engine="fast")


def test_channels_last_search_equals_the_default_format():
    model = cached("timm", "resnet18", (("num_classes", 5),))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = undiscard.wrap(model, 5, "entropy", "mean").search(x)
        cl_model = cached("timm", "resnet18", (("num_classes", 5),)).to(memory_format=torch.channels_last)
        try:
            got = undiscard.wrap(cl_model, 5, "entropy", "mean").search(x.contiguous(memory_format=torch.channels_last))
        finally:
            cl_model.to(memory_format=torch.contiguous_format)
    assert torch.equal(ref.states, got.states)
    assert_close_scaled(got.features, ref.features, ops=rounding_ops(model))  # NHWC kernels, another order
