"""Hostile and careless inputs to the API: each gets the correct answer or one clear error.

An image's prediction is a function of the image (and the seed) alone; a model in train
mode, a split that is not the model's, a malformed batch or state is refused at the door
with the project's own error; gradients flow through the chosen states.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import undiscard
from conftest import RESNET_GRAY7, EPS32, assert_close_scaled, cached, rounding_ops
from undiscard.method.aggregate import entropy_weights
from undiscard.method.learned import AttentionAggregator
from undiscard.method.align import align_to_default, shift_cells
from undiscard.run.engine import use_states
from undiscard.method.search import image_seeds

RESNET = RESNET_GRAY7


@pytest.fixture(scope="module")
def model():
    return cached(*RESNET)


@pytest.fixture(scope="module")
def x():
    return torch.randn(5, 1, 64, 64, generator=torch.Generator().manual_seed(11))


def _learned_aggregator(model, x):
    found = undiscard.wrap(model, budget=2).search(x[:1], budget=1)
    torch.manual_seed(0)
    agg = AttentionAggregator(found.features.shape[-1], dim=32, heads=4)
    torch.nn.init.normal_(agg.score[-1].weight, std=1.0)  # scores that differ between states
    return agg


# ------------------------------------------------------------------ 3. an image's answer is its own

CASES = [(c, e) for c in ("entropy", "random", "displacement", "learned") for e in ("trie", "rerun")]


@pytest.mark.parametrize("criterion,engine", CASES)
def test_each_images_answer_is_the_same_alone_shuffled_and_chunked(model, x, criterion, engine):
    x = x[:, :, :48, :48]  # final map 2x2: sub-cell alignment still acts, cheaper forwards
    kw = dict(engine=engine, return_details=True)
    if criterion == "learned":
        kw.update(aggregator=_learned_aggregator(model, x), aggregate="attention")
    with torch.no_grad():
        y, d = undiscard.wrap(model, 6, criterion, **kw)(x)
        ops = rounding_ops(model)
        for i in range(x.shape[0]):  # alone: batch size 1
            yi, di = undiscard.wrap(model, 6, criterion, **kw)(x[i : i + 1])
            assert torch.equal(di.states[0], d.states[i]), f"image {i}: its states depend on its batch-mates"
            assert_close_scaled(yi[0], y[i], ops=ops)
        perm = torch.tensor([3, 0, 4, 1, 2])  # shuffled: the shuffled answers
        yp, dp = undiscard.wrap(model, 6, criterion, **kw)(x[perm])
        assert torch.equal(dp.states, d.states[perm])
        assert_close_scaled(yp, y[perm], ops=ops)
        yc, dc = undiscard.wrap(model, 6, criterion, max_batch=3, **kw)(x)  # chunked forwards
        assert torch.equal(dc.states, d.states)
        assert_close_scaled(yc, y, ops=ops)


def test_a_duplicated_image_gets_the_same_states_as_its_twin(model, x):
    xx = torch.cat([x[:2], x[:2]])
    with torch.no_grad():
        _, d = undiscard.wrap(model, 5, "random", return_details=True)(xx)
    assert torch.equal(d.states[:2], d.states[2:])
    assert not torch.equal(d.states[0], d.states[1])  # and different images differ (seeded by content)


def test_image_seeds_depend_on_the_values_and_the_seed_only():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    s = image_seeds(x)
    assert len(set(s)) == 4 and s == image_seeds(x.clone()) and s[2:] == image_seeds(x[2:])
    assert image_seeds(x, seed=1) != s
    y = x.clone()
    y[1, 0, 0, 0] += 1e-3  # one value changed: that image's seed changes, the others' do not
    t = image_seeds(y)
    assert t[1] != s[1] and [t[0], t[2], t[3]] == [s[0], s[2], s[3]]
    assert image_seeds(x[:0]) == []


@pytest.mark.parametrize("criterion", ["entropy", "random"])
def test_segmentation_answers_do_not_depend_on_the_batch(criterion):
    from undiscard.models.segmenters import build_segmenter

    torch.manual_seed(0)
    seg = build_segmenter("deeplabv3-tiny", num_classes=5, in_chans=1).eval()
    x = torch.randn(3, 1, 48, 48, generator=torch.Generator().manual_seed(2))
    w = undiscard.wrap_segmentation(seg, 4, criterion, return_details=True)
    with torch.no_grad():
        y, d = w(x)
        for i in range(3):
            yi, di = w(x[i : i + 1])
            assert torch.equal(di.states[0], d.states[i])
            assert_close_scaled(yi[0], y[i], ops=rounding_ops(seg), scale=y[i][torch.isfinite(y[i])].abs().max())
        yp, dp = w(x.flip(0))
        assert torch.equal(dp.states, d.states.flip(0))


def test_eval_gives_the_same_numbers_at_two_batch_sizes(tmp_path):
    from undiscard.evaluation.classify import EvalConfig, run_eval
    from undiscard.models.classifiers import save_checkpoint

    model = cached("timm", "resnet18", (("num_classes", 10), ("in_chans", 1)))
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, arch="timm:resnet18", num_classes=10, in_chans=1, input_size=(1, 64, 64))
    res = []
    for bs in (12, 5):
        cfg = EvalConfig(model=str(path), limit=12, batch_size=bs, budgets=[1, 3], criteria=["entropy", "random"],
                         aggregates=["mean", "entropy"], timing_images=1, repeats=1)
        res.append(run_eval(cfg, tmp_path / f"bs{bs}.json", log=lambda m: None))
    a, b = res
    assert a["plain"]["top1"] == b["plain"]["top1"]
    # per-image logits differ only by the rounding of batched kernels, at most
    # rounding_ops * eps * max|logit| (conftest); log-softmax moves by at most twice that
    with torch.no_grad():
        scale = float(model(torch.randn(8, 1, 64, 64, generator=torch.Generator().manual_seed(0))).abs().max())
    nll_tol = 2 * rounding_ops(model) * EPS32 * max(scale, 1.0)
    rows_a = {(r["budget"], r["criterion"], r["aggregate"]): r for r in a["rows"]}
    rows_b = {(r["budget"], r["criterion"], r["aggregate"]): r for r in b["rows"]}
    assert rows_a.keys() == rows_b.keys() and len(rows_a) > 4
    for k, r in rows_a.items():
        assert r["top1"] == rows_b[k]["top1"], k
        # the same states per image; NLL differs only by the rounding of batched kernels
        assert r["nll"] == pytest.approx(rows_b[k]["nll"], abs=nll_tol), k


# ------------------------------------------------------------------ 4. silent wrong answers

def _bn_buffers(m: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for n, b in m.named_buffers() if "running" in n or "num_batches" in n]


def test_a_model_in_train_mode_is_refused_and_left_untouched(x):
    m = copy.deepcopy(cached(*RESNET)).train()
    before = _bn_buffers(m)
    sites = undiscard.find_sites(m, x[:1])
    with pytest.raises(undiscard.ModelModeError, match=r"eval mode.*model\.eval\(\)"):
        undiscard.wrap(m, 4)(x)
    with pytest.raises(undiscard.ModelModeError, match="allow_train=True"):
        undiscard.run_states(m, x, [1, 2, 3], sites)
    with pytest.raises(undiscard.ModelModeError):
        undiscard.wrap_segmentation(m, 2)(x)
    for a, b in zip(before, _bn_buffers(m)):
        assert torch.equal(a, b)  # no BatchNorm buffer moved
    assert len(before) >= 40


def test_run_states_in_train_mode_on_purpose_trains_under_the_offsets(x):
    m = copy.deepcopy(cached(*RESNET)).train()
    sites = undiscard.find_sites(m, x[:1])
    before = _bn_buffers(m)
    y = undiscard.run_states(m, x, [1, 2, 3], sites, allow_train=True)
    assert y.shape == (5, 7)
    assert any(not torch.equal(a, b) for a, b in zip(before, _bn_buffers(m)))  # a training forward


def test_a_model_without_train_dependent_layers_runs_in_train_mode():
    m = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten())  # train mode, but nothing behaves differently
    x = torch.randn(2, 1, 16, 16)
    sites = undiscard.find_sites(m, x[:1])
    assert undiscard.run_states(m, x, sites.zero_state(), sites).shape == (2, 4)


def _double_model():
    torch.manual_seed(0)
    import timm

    return timm.create_model("resnet18", num_classes=4, in_chans=1, zero_init_last=False).eval().double()


def _reference_grads(model, x, states, sites, aggregate):
    """Per-image, per-state forwards one by one (float64), the same aggregation, summed."""
    model.zero_grad()
    xr = x.clone().requires_grad_()
    total = 0.0
    for i in range(x.shape[0]):
        feats = []
        for s in states[i]:
            with use_states(model, sites, s):
                f = model.forward_features(xr[i : i + 1])
            feats.append(align_to_default(f, sites.displacement(s[None]), sites.stride_total))
        logits = torch.stack([model.forward_head(f)[0] for f in feats])  # (B, K)
        w = torch.full((len(feats),), 1.0 / len(feats), dtype=x.dtype) if aggregate == "mean" else \
            entropy_weights(logits[None])[0]
        agg = sum(wj * f for wj, f in zip(w, feats))
        total = total + model.forward_head(agg).sum()
    total.backward()
    return xr.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("engine", ["trie", "rerun"])
@pytest.mark.parametrize("aggregate", ["mean", "entropy"])
def test_gradients_through_the_searched_states_match_per_state_gradients(engine, aggregate):
    model = _double_model()
    x = torch.randn(3, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    w = undiscard.wrap(model, 4, "entropy", aggregate, engine=engine, return_details=True)
    xg = x.clone().requires_grad_()
    model.zero_grad()
    y, d = w(xg)
    y.sum().backward()
    got_x, got_p = xg.grad, {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_x, ref_p = _reference_grads(model, x, d.states, d.sites, aggregate)
    # float64: the same math in another order, so agreement to ~1e-12 of the gradients' scale
    torch.testing.assert_close(got_x, ref_x, rtol=0, atol=1e-9 * float(ref_x.abs().max()))
    assert float(got_p["conv1.weight"].abs().max()) > 0 and float(got_p["layer2.0.conv1.weight"].abs().max()) > 0
    for n, g in ref_p.items():
        torch.testing.assert_close(got_p[n], g, rtol=0, atol=1e-9 * max(float(g.abs().max()), 1e-30), msg=n)


def test_gradients_flow_through_run_states_with_per_sample_states():
    model = _double_model()
    x = torch.randn(3, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sites = undiscard.find_sites(model, x[:1])
    states = torch.tensor([[0, 1, 2], [3, 0, 1], [1, 1, 1]])
    xg = x.clone().requires_grad_()
    model.zero_grad()
    undiscard.run_states(model, xg, states, sites).square().sum().backward()
    got_x, got_w = xg.grad.clone(), model.conv1.weight.grad.clone()
    model.zero_grad()
    ref_x = torch.zeros_like(x)
    for i in range(3):
        xi = x[i : i + 1].clone().requires_grad_()
        undiscard.run_states(model, xi, states[i], sites).square().sum().backward()
        ref_x[i] = xi.grad[0]
    torch.testing.assert_close(got_x, ref_x, rtol=0, atol=1e-9 * float(ref_x.abs().max()))
    torch.testing.assert_close(got_w, model.conv1.weight.grad, rtol=0, atol=1e-9 * float(got_w.abs().max()))


def test_a_split_from_another_model_is_refused_at_every_budget(model, x):
    other = cached("timm", "resnet18", (("num_classes", 7), ("in_chans", 1), ("drop_rate", 0.0), ("global_pool", "max")))
    for budget in (1, 4):
        with pytest.raises(undiscard.SplitError, match="does not reproduce the model"):
            undiscard.wrap(model, budget, split=(model.forward_features, other.forward_head))(x)


def test_the_models_own_split_is_accepted(model, x):
    with torch.no_grad():
        y = undiscard.wrap(model, 3, split=(model.forward_features, model.forward_head))(x)
    assert y.shape == (5, 7) and torch.isfinite(y).all()


@pytest.mark.parametrize("head,msg", [(lambda f: f.sum(), r"returned \(\) for a batch of 2"),
                                      (lambda f: f.flatten(1), r"returned \(2, \d+\) .* returns \(2, 7\)")])
def test_a_split_head_of_the_wrong_shape_is_refused(model, x, head, msg):
    with pytest.raises(undiscard.SplitError, match=msg):
        undiscard.wrap(model, 4, split=(model.forward_features, head))(x)


@pytest.mark.parametrize("split", ["features", ("a", "b"), (1,), None])
def test_a_split_that_is_not_a_pair_of_functions_is_refused(model, split):
    split = model.forward_features if split == "features" else split
    if split is None:
        split = (model.forward_features, model.forward_head, model.forward_head)
    with pytest.raises(undiscard.SplitError, match=r"pair \(features_fn, head_fn\)"):
        undiscard.wrap(model, 4, split=split)


def test_entropy_weights_sum_to_one_even_on_all_nan_input():
    nan = torch.full((2, 3, 4), float("nan"))
    w = entropy_weights(nan)
    assert_close_scaled(w.sum(1), torch.ones(2), ops=3)  # three weights, one division each and a sum
    mask = torch.tensor([[True, True, False], [False, False, False]])
    wm = entropy_weights(nan, mask)
    assert_close_scaled(wm, torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]), ops=2)  # one division
    mixed = torch.randn(2, 3, 4)
    mixed[0, 1] = float("nan")
    wx = entropy_weights(mixed)
    assert wx[0, 1] == 0
    assert_close_scaled(wx.sum(1), torch.ones(2), ops=3)


# ------------------------------------------------------------------ 5. one clear error, not a traceback

def test_run_states_on_an_unbatched_image_is_a_clear_error(model, x):
    sites = undiscard.find_sites(model, x[:1])
    with pytest.raises(undiscard.InputError, match=r"batch \(N, C, H, W\); got shape \(1, 64, 64\).*unsqueeze\(0\)"):
        undiscard.run_states(model, x[0], sites.zero_state(), sites)
    with pytest.raises(undiscard.InputError, match="unsqueeze"):
        undiscard.wrap(model, 4)(x[0])


def test_an_empty_batch_gives_an_empty_answer_like_the_plain_model(model, x):
    with torch.no_grad():
        plain = model(x[:0])
        for b in (1, 4):
            assert undiscard.wrap(model, b)(x[:0]).shape == plain.shape == (0, 7)
        y, d = undiscard.wrap(model, 4, return_details=True)(x[:0])
        assert y.shape == (0, 7) and d.states.shape == (0, 1, 3)
        sites = undiscard.find_sites(model, x[:1])
        assert undiscard.run_states(model, x[:0], torch.zeros(0, 3, dtype=torch.long), sites).shape == (0, 7)
        assert undiscard.run_states(model, x[:0], sites.zero_state(), sites).shape == (0, 7)


def test_per_sample_states_for_another_batch_size_are_a_clear_error(model, x):
    sites = undiscard.find_sites(model, x[:1])
    with pytest.raises(undiscard.StateError, match="got 2 states for a batch of 5"):
        undiscard.run_states(model, x, torch.zeros(2, 3, dtype=torch.long), sites)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.uint8, torch.int64])
def test_an_input_of_another_dtype_is_a_clear_error(model, x, dtype):
    xb = x.to(dtype)
    sites = undiscard.find_sites(model, x[:1])
    msg = rf"dtype {dtype}.*torch\.float32" if dtype.is_floating_point else rf"dtype {dtype}.*normalise"
    with pytest.raises(undiscard.InputError, match=msg):
        undiscard.wrap(model, 4)(xb)
    with pytest.raises(undiscard.InputError, match=msg):
        undiscard.run_states(model, xb, sites.zero_state(), sites)


def test_a_bfloat16_input_under_autocast_runs(model, x):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = undiscard.wrap(model, 3, "entropy", "mean")(x[:2].bfloat16())
    assert y.shape == (2, 7) and torch.isfinite(y).all()


@pytest.mark.parametrize("state", [[0, 1.5, 0], [0, True, 1], [(0, 1.0), (1, 1), (0, 0)], ["0", 1, 2],
                                   torch.tensor([0.0, 1.0, 0.0])])
def test_a_non_integer_offset_is_a_clear_error(model, x, state):
    sites = undiscard.find_sites(model, x[:1])
    with pytest.raises(undiscard.StateError, match="integer"):
        undiscard.run_states(model, x, state, sites)


@pytest.mark.parametrize("bad,name", [(dict(criterion="best"), "criterion"), (dict(aggregate="max"), "aggregate"),
                                      (dict(engine="fast"), "engine"), (dict(max_batch=0), "max_batch"),
                                      (dict(max_batch=2.5), "max_batch"), (dict(fill="reflect"), "fill"),
                                      (dict(width=0), "width"), (dict(budget=0), "budget")])
def test_a_bad_option_is_an_option_error_naming_it(model, bad, name):
    with pytest.raises(undiscard.OptionError, match=rf"^{name} must be"):
        undiscard.wrap(model, **bad)


def test_align_and_aggregate_errors_derive_from_the_projects_base_error():
    f = torch.zeros(2, 3, 4, 4)
    with pytest.raises(undiscard.OptionError, match="fill must be one of"):
        shift_cells(f, torch.zeros(2, 2), fill="reflect")
    with pytest.raises(undiscard.InputError, match=r"shift must be \(N, D\) = \(2, 2\)"):
        shift_cells(f, torch.zeros(2, 1))
    with pytest.raises(undiscard.InputError, match=r"logits must be \(N, B, K\)"):
        entropy_weights(torch.zeros(2, 3))
    for cls in (undiscard.OptionError, undiscard.InputError, undiscard.StateError, undiscard.SplitError,
                undiscard.ModelModeError, undiscard.FileTrustError):
        assert issubclass(cls, undiscard.UndiscardError)


def test_no_bare_builtin_error_is_raised_on_purpose_in_the_library():
    """Every error raised on purpose is the project's own (``errors.py``); an internal
    sentinel caught in the same module is named in ``ALLOWED``."""
    import re
    from pathlib import Path

    src = Path(undiscard.__file__).parent
    pattern = re.compile(r"raise (ValueError|TypeError|RuntimeError|KeyError|LookupError|FileNotFoundError|Exception)\(")
    found = [f"{p.name}:{i}" for p in src.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
             if pattern.search(line) and "# internal" not in line]
    assert not found, f"bare built-in errors raised: {found} (use an UndiscardError subclass)"
