"""The shared-prefix engine on a captured graph (engine="segments") against the intercepting one."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import undiscard
from conftest import assert_close_scaled, cached, rounding_ops
from undiscard.run.segments import CaptureWarning, capture
from undiscard.run.trie import SharedPrefixEvaluator

from test_trie import MODELS, SkipNet


def _requests(sites, n, per, seed):
    g = torch.Generator().manual_seed(seed)
    radix = torch.tensor([s.num_offsets for s in sites.searchable_sites])
    states = (torch.rand(n * per, len(radix), generator=g) * radix).long()
    return torch.arange(n).repeat_interleave(per), states


@pytest.mark.parametrize("zoo,name,kw,size", MODELS, ids=[m[1] for m in MODELS])
def test_segments_equal_the_intercepting_engine(zoo, name, kw, size):
    model = cached(zoo, name, kw)
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(0))
    sites = undiscard.find_sites(model, x[:1])
    forward = getattr(model, "forward_features", None)
    images, states = _requests(sites, 3, 4, 1)
    later = states.clone()
    later[:, -1] = (later[:, -1] + 1) % sites.searchable_sites[-1].num_offsets  # resumes from cached prefixes
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # models that reject an empty batch recompute prefixes
        warnings.simplefilter("error", CaptureWarning)
        ref_ev = SharedPrefixEvaluator(model, x, sites, forward=forward)
        ev = SharedPrefixEvaluator(model, x, sites, forward=forward, capture=True)
        ref = torch.cat([ref_ev(images, states), ref_ev(images, later)])
        got = torch.cat([ev(images, states), ev(images, later)])
    assert ev.captured is not None
    assert ev.rows == ref_ev.rows  # the same prefixes computed, the same sharing
    # the same ops on the same rows: equal up to a kernel's choice of algorithm
    assert_close_scaled(got, ref, ops=rounding_ops(model))


class _ValueBranch(nn.Module):
    """Control flow on the input's values: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.ModuleList([nn.Conv2d(2 if i == 0 else 4, 4, 3, 2, 1) for i in range(3)])

    def forward(self, x):
        for c in self.c:
            x = torch.relu(c(x))
        return -x if x.sum() > 0 else x


@pytest.mark.parametrize("model", [SkipNet(), _ValueBranch()], ids=["skip-across-sites", "value-branch"])
def test_a_refused_capture_warns_once_and_gives_the_same_results(model):
    model = model.eval()
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    sites = undiscard.find_sites(model, x[:1])
    images, states = _requests(sites, 2, 3, 2)
    with torch.no_grad():
        ref = SharedPrefixEvaluator(model, x, sites)(images, states)
        with pytest.warns(CaptureWarning, match="cannot be captured"):
            ev = SharedPrefixEvaluator(model, x, sites, capture=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CaptureWarning)  # once per model and input size
            ev2 = SharedPrefixEvaluator(model, x, sites, capture=True)
        got, got2 = ev(images, states), ev2(images, states)
    assert ev.captured is None
    assert torch.equal(got, ref) and torch.equal(got2, ref)


def test_the_reason_a_capture_is_refused_is_named():
    model = SkipNet().eval()
    x = torch.randn(1, 2, 16, 16)
    sites = undiscard.find_sites(model, x)
    with pytest.raises(undiscard.UndiscardError, match="both sides of a searchable site"):
        capture(model, None, sites, x)


def test_the_captured_graph_out_of_a_pass_is_the_model():
    model = cached("timm", "resnet18", (("num_classes", 5),))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    sites = undiscard.find_sites(model, x[:1])
    cap = capture(model, model.forward_features, sites, x)
    with torch.no_grad():
        assert torch.equal(cap.run(x, None), model.forward_features(x))


def test_wrap_with_segments_equals_wrap_with_the_trie():
    model = cached("timm", "mobilenetv2_100", (("num_classes", 5),))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = undiscard.wrap(model, 6, "entropy", "mean", return_details=True)(x)
        b = undiscard.wrap(model, 6, "entropy", "mean", engine="segments", return_details=True)(x)
    assert torch.equal(a[1].states, b[1].states)
    assert_close_scaled(b[0], a[0], ops=rounding_ops(model))


def test_compile_needs_the_segments_engine():
    model = cached("timm", "resnet18", (("num_classes", 5),))
    with pytest.raises(undiscard.OptionError, match="segments"):
        undiscard.wrap(model, 2, compile=True)


def _compiled_equals_eager(backend: str) -> None:
    import copy

    model = copy.deepcopy(cached("timm", "resnet18", (("num_classes", 5),)))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", CaptureWarning)  # the capture must succeed: a fallback would hide the compile
        a = undiscard.wrap(model, 5, "entropy", "mean", return_details=True)(x)
        w = undiscard.wrap(model, 5, "entropy", "mean", engine="segments", compile=backend, return_details=True)
        b = w(x)
        b2 = w(x[:2])  # another batch size: the same compiled segments (dynamic batch)
    assert torch.equal(a[1].states, b[1].states) and torch.equal(b2[1].states, a[1].states[:2])
    # a compiler may fuse and reorder the float ops of a layer: at most a few roundings per op
    assert_close_scaled(b[0], a[0], ops=rounding_ops(model))
    assert_close_scaled(b2[0], a[0][:2], ops=rounding_ops(model))


def test_compiled_segments_equal_the_eager_engine():
    # dynamo traces the segments between the sites (the site function is kept out of them);
    # the "eager" backend runs what it traced as it is, so this checks the capture and the graph breaks
    _compiled_equals_eager("eager")


@pytest.mark.slow
def test_inductor_compiled_segments_equal_the_eager_engine():
    _compiled_equals_eager("inductor")
