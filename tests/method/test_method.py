"""The drop-in wrapper, the attention aggregator and its checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

import undiscard
from conftest import RESNET_GRAY7, assert_close_scaled, cached, rounding_ops
from undiscard.method.learned import AttentionAggregator, load_aggregator, save_aggregator, backbone_fingerprint, sites_signature
from undiscard.method.classify import wrap

RESNET = RESNET_GRAY7


@pytest.fixture(scope="module")
def model():
    return cached(*RESNET)


@pytest.fixture(scope="module")
def x():
    return torch.randn(5, 1, 64, 64, generator=torch.Generator().manual_seed(1))


def test_budget_one_returns_exactly_the_plain_logits(model, x):
    with torch.no_grad():
        ref = model(x)
        out = wrap(model, budget=1)(x)
        out2, det = wrap(model, budget=1, return_details=True)(x)
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    assert det.states.shape == (5, 1, 3) and bool((det.states == 0).all()) and bool((det.weights == 1).all())


def test_search_b1_through_features_and_head_is_the_plain_model(model, x):
    w = wrap(model, budget=4)
    found = w.search(x, budget=1)
    logits, _ = w.combine(found)
    assert torch.equal(logits, model(x))


@pytest.mark.parametrize("aggregate", ["mean", "entropy"])
def test_wrapped_model_runs_batch_of_one_and_mixed_states(model, x, aggregate):
    w = wrap(model, budget=6, criterion="entropy", aggregate=aggregate, return_details=True)
    with torch.no_grad():
        one, det1 = w(x[:1])
        many, det = w(x)
    assert one.shape == (1, 7) and many.shape == (5, 7)
    assert torch.isfinite(many).all()
    # images chose different states, yet each image's result is the one it gets alone
    assert len({tuple(map(tuple, s.tolist())) for s in det.states}) > 1
    assert_close_scaled(many[:1], one, ops=rounding_ops(model))  # float32, a batch of 5 vs 1
    assert torch.equal(det.states[:1], det1.states)
    assert_close_scaled(det.weights.sum(1), torch.ones(5), ops=2 * 6)  # 6 divisions and a sum of 6, each rounded
    assert not torch.allclose(many, model(x), atol=1e-4)  # the states changed something


def test_mean_aggregate_is_the_mean_of_aligned_maps_through_the_head(model, x):
    w = wrap(model, budget=4, aggregate="mean")
    found = w.search(x)
    logits, weights = w.combine(found)
    ref = model.forward_head(w._from_positions(found.features.mean(1), found.grid))
    # the mean of 4 maps two ways (sums of 4), the head's pooling over the cells and its linear layer
    ops = rounding_ops(model.get_classifier()) + math.sqrt(4) + math.sqrt(found.features.shape[2])
    assert_close_scaled(logits, ref, ops=ops)
    assert_close_scaled(weights, torch.full((5, 4), 0.25), ops=2 + 4)  # a sum of 4 and a division


def test_untrained_attention_equals_mean(model, x):
    w = wrap(model, budget=5, aggregate="mean")
    found = w.search(x)
    agg = AttentionAggregator(found.features.shape[-1], dim=32, heads=4)
    wa = wrap(model, budget=5, aggregate="attention", aggregator=agg)
    mean_logits, _ = w.combine(found)
    att_logits, weights = wa.combine(found)
    # zero output layers: 0.2-weighted sum vs mean of 5 maps (sums of 5), then the same head
    assert_close_scaled(att_logits, mean_logits, ops=rounding_ops(model.get_classifier()) + 2 + 5)
    assert_close_scaled(weights, torch.full((5, 5), 0.2), ops=2 + 5)  # softmax of equal scores: exp, sum of 5, division


def test_attention_is_permutation_invariant_and_masks_padding(model, x):
    torch.manual_seed(0)
    agg = AttentionAggregator(16, dim=16, heads=2)
    for p in agg.parameters():
        torch.nn.init.normal_(p, std=0.2)
    # float64: invariance is exact; only the order of the sums over the states changes
    agg = agg.double()
    f, c = torch.randn(3, 4, 6, 16, dtype=torch.float64), torch.rand(3, 4, 2, dtype=torch.float64)
    out, w = agg(f, c)
    perm = torch.tensor([2, 0, 3, 1])
    out_p, w_p = agg(f[:, perm], c[:, perm])
    torch.testing.assert_close(out_p, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w_p, w[:, perm], rtol=1e-12, atol=1e-12)
    mask = torch.tensor([[True, True, False, False]] * 3)
    out_m, w_m = agg(f, c, mask)
    out_2, _ = agg(f[:, :2], c[:, :2])
    torch.testing.assert_close(out_m, out_2, rtol=1e-12, atol=1e-12)
    assert bool((w_m[:, 2:] == 0).all())


def test_learned_criterion_orders_by_the_aggregator_score(model, x):
    torch.manual_seed(0)
    found = wrap(model, budget=2).search(x, budget=1)
    agg = AttentionAggregator(found.features.shape[-1], dim=32, heads=4)
    torch.nn.init.normal_(agg.score[-1].weight, std=1.0)
    # budget 14: the 9 neighbours of the default, then 4 around the most promising one
    w = wrap(model, budget=14, criterion="learned", aggregate="attention", aggregator=agg, width=None)
    res = w.search(x)
    s = agg.state_logits(res.features.flatten(0, 1), res.cells.flatten(0, 1)).reshape(5, 14)
    best = s[:, 1:10].argmax(1) + 1  # the default is exhausted: all its neighbours are in
    for i in range(5):  # the second step expanded the best-scored state of the first
        diff = (res.states[i, 10:] != res.states[i, best[i]]).sum(1)
        assert bool((diff == 1).all())
    ent = wrap(model, budget=14, criterion="entropy", width=None).search(x)
    assert not torch.equal(res.states, ent.states)


def test_aggregator_checkpoint_round_trip_and_mismatch(tmp_path, model, x):
    torch.manual_seed(0)
    w = wrap(model, budget=3)
    sites = w.sites_for(x)
    agg = AttentionAggregator(512, dim=32, heads=4)
    for p in agg.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = save_aggregator(agg, tmp_path / "agg.safetensors", {
        "undiscard.backbone_fingerprint": backbone_fingerprint(model), "undiscard.sites": sites_signature(sites),
        "undiscard.align": "1"})
    back = load_aggregator(path, model, sites)
    f, c = torch.randn(2, 3, 4, 512), torch.rand(2, 3, 2)
    assert torch.equal(agg(f, c)[0], back(f, c)[0])
    torch.manual_seed(1)
    import timm
    other = timm.create_model("resnet18", num_classes=7, in_chans=1).eval()
    with pytest.raises(undiscard.SiteMismatchError, match="fingerprint"):
        load_aggregator(path, other)
    with pytest.raises(undiscard.SiteMismatchError, match="searchable sites"):
        load_aggregator(path, model, sites.with_searchable("all"))
    with pytest.raises(undiscard.UndiscardError, match="no aggregator checkpoint"):
        load_aggregator(tmp_path / "missing.safetensors", model)
    with pytest.raises(undiscard.UndiscardError, match="unaligned|aligned"):
        wrap(model, aggregate="attention", aggregator=path, align=False)
    # a wrapped model with the checkpoint path works; a missing one is an error, not a fallback
    assert wrap(model, budget=3, aggregate="attention", aggregator=path)(x).shape == (5, 7)
    with pytest.raises(undiscard.UndiscardError, match="no aggregator"):
        wrap(model, aggregate="attention", aggregator=tmp_path / "nope.safetensors")


def test_attention_or_learned_without_an_aggregator_is_an_error(model):
    with pytest.raises(undiscard.UndiscardError, match="needs a trained aggregator"):
        wrap(model, aggregate="attention")
    with pytest.raises(undiscard.UndiscardError, match="needs a trained aggregator"):
        wrap(model, criterion="learned")


@pytest.mark.parametrize("bad", [dict(budget=0), dict(budget=2.5), dict(criterion="best"), dict(aggregate="max")])
def test_bad_arguments_are_clear_errors(model, bad):
    with pytest.raises(undiscard.OptionError, match=next(iter(bad))):
        wrap(model, **bad)


def test_budget_above_the_space_is_a_clear_error(model, x):
    with pytest.raises(undiscard.StateError, match="outside 1..64"):
        wrap(model, budget=65)(x)


def test_unaligned_maps_differ_from_aligned_ones(model, x):
    a = wrap(model, budget=4, align=True).search(x)
    b = wrap(model, budget=4, align=False).search(x)
    assert torch.equal(a.states, b.states) is False or not torch.allclose(a.features, b.features)
    # the default state needs no shift: at most an interpolation with weights 1 and 0 (2 roundings)
    assert_close_scaled(a.features[:, 0], b.features[:, 0], ops=2)


@pytest.mark.parametrize("name,kw,layout", [
    ("swin_tiny_patch4_window7_224", (("img_size", 64), ("window_size", 2), ("num_classes", 3)), "NHWC"),
    ("vit_tiny_patch16_224", (("img_size", 64), ("num_classes", 3)), "tokens"),
    ("pvt_v2_b0", (("num_classes", 3),), "NCHW"),
])
def test_other_layouts(name, kw, layout):
    m = cached("timm", name, kw)
    x = torch.randn(2, 3, 64, 64)
    w = wrap(m, budget=3, aggregate="mean", searchable="main" if layout == "tokens" else "inner")
    assert w.split.layout == layout
    with torch.no_grad():
        out = w(x)
        assert out.shape == (2, 3) and torch.isfinite(out).all()
        assert torch.equal(wrap(m, budget=1)(x), m(x))


def test_with_width_one_the_criterion_picks_from_the_second_state_on(model, x):
    a = wrap(model, budget=4, criterion="entropy").search(x).states
    b = wrap(model, budget=4, criterion="random").search(x).states
    c = wrap(model, budget=4, criterion="displacement").search(x).states
    assert not torch.equal(a, b) and not torch.equal(a, c)
    # entropy: each new state neighbours the lowest-entropy state evaluated before it
    found = wrap(model, budget=4, criterion="entropy").search(x)
    from undiscard.method.aggregate import entropy as H

    h = H(found.logits)
    for i in range(x.shape[0]):
        for t in range(1, 4):
            best = int(torch.argmin(h[i, :t]))
            assert int((found.states[i, t] != found.states[i, best]).sum()) == 1


def test_wrap_spells_out_every_option_of_the_wrapper_with_its_default():
    import inspect

    from undiscard.method.classify import WRAP_DEFAULTS

    init = inspect.signature(undiscard.Undiscard.__init__).parameters
    options = {k: p.default for k, p in init.items() if k not in ("self", "model")}
    assert WRAP_DEFAULTS == options
    params = inspect.signature(undiscard.wrap).parameters
    assert set(params) == {"model", "config", *options}  # no **kwargs hiding an option
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values())
