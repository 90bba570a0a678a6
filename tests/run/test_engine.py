"""Running states: roll-equivalence (pins Delta), per-sample batches, no leaked state, errors."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import undiscard
from conftest import assert_close_scaled, cached, circular_net, rounding_ops


def _random_states(sites, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, s.num_offsets, (n,), generator=g) for s in sites.searchable_sites], 1)


@pytest.mark.parametrize("searchable", ["all", [2, 3, 4, 5], [1, 5], "inner"])
@torch.no_grad()
def test_state_equals_default_on_image_rolled_by_minus_delta(searchable):
    """SPEC §2: with circular padding, net_s(x) == net_0(roll(x, -Delta(s))), exactly.

    Non-searchable sites before a searchable one still count in P_l; the residual site
    (strided conv + strided shortcut) must move both ops together.
    """
    net = circular_net()
    x = torch.randn(6, 2, 64, 128, dtype=torch.double)
    sites = undiscard.find_sites(net, x[:1], searchable=searchable)
    assert sites.stride_total == (32, 64)
    states = _random_states(sites, 6, seed=1)
    y = undiscard.run_states(net, x, states, sites)
    delta = sites.displacement(states)
    for i in range(6):
        rolled = torch.roll(x[i : i + 1], shifts=(-int(delta[i, 0]), -int(delta[i, 1])), dims=(-2, -1))
        torch.testing.assert_close(y[i : i + 1], net(rolled), rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_roll_equivalence_fails_with_the_papers_displacement_formula():
    """The check can tell a wrong Delta: the paper's product *including* R_l misaligns."""
    net = circular_net()
    x = torch.randn(1, 2, 64, 128, dtype=torch.double)
    sites = undiscard.find_sites(net, x, searchable="all")
    st = torch.zeros(len(sites.searchable), dtype=torch.long)
    st[2] = sites[2].index_of((1, 1))
    right = sites.displacement(st)
    wrong = right * torch.tensor(sites[2].stride)
    y = undiscard.run_states(net, x, st, sites)
    good = net(torch.roll(x, shifts=tuple(-int(v) for v in right), dims=(-2, -1)))
    bad = net(torch.roll(x, shifts=tuple(-int(v) for v in wrong), dims=(-2, -1)))
    torch.testing.assert_close(y, good, rtol=1e-12, atol=1e-12)
    assert (y - bad).abs().max() > 1e-3


def test_displacement_is_sum_of_offsets_times_cumulative_stride(circ):
    sites = undiscard.find_sites(circ, torch.randn(1, 2, 64, 128, dtype=torch.double), searchable=[1, 4])
    # site 1: stride (2,2), P=(2,2); site 4: stride (1,2), P=(16,16)
    st = [(1, 1), (0, 1)]
    assert sites.displacement(st).tolist() == [1 * 2 + 0 * 16, 1 * 2 + 1 * 16]


@pytest.mark.parametrize("zoo,name,hw", [("timm", "resnet18", (64, 64)), ("timm", "swin_tiny_patch4_window7_224", (63, 95))])
@torch.no_grad()
def test_per_sample_states_in_one_batch_equal_one_by_one(zoo, name, hw):
    kwargs = (("img_size", hw), ("window_size", 4)) if name.startswith("swin") else ()
    model = cached(zoo, name, kwargs)
    x = torch.randn(5, 3, *hw)
    sites = undiscard.find_sites(model, x[:1], searchable="all")
    states = _random_states(sites, 5, seed=3)
    states[0] = 0  # mix the default state in
    together = undiscard.run_states(model, x, states, sites)
    for i in range(5):
        alone = undiscard.run_states(model, x[i : i + 1], states[i], sites)
        assert_close_scaled(together[i : i + 1], alone, ops=rounding_ops(model))  # float32, batch of 5 vs 1


@torch.no_grad()
def test_per_sample_states_exact_in_float64(circ):
    x = torch.randn(7, 2, 64, 128, dtype=torch.double)
    sites = undiscard.find_sites(circ, x[:1], searchable="all")
    states = _random_states(sites, 7, seed=4)
    together = undiscard.run_states(circ, x, states, sites)
    alone = torch.cat([undiscard.run_states(circ, x[i : i + 1], states[i], sites) for i in range(7)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_model_is_unmodified_after_discovery_and_runs():
    model = cached("timm", "resnet18")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    sites = undiscard.find_sites(model, x[:1])
    assert model.training and all(m.training for m in model.modules())  # flags restored
    model.eval()
    undiscard.run_states(model, x, [1, 2, 3], sites)
    with pytest.raises(RuntimeError, match="boom"):
        with undiscard.use_states(model, sites, [1, 1, 1]):
            raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(model(x), cached("timm", "resnet18")(x))


@torch.no_grad()
def test_space_to_depth_hooks_are_removed_and_inert_elsewhere():
    model = cached("timm", "swin_tiny_patch4_window7_224", (("img_size", (63, 95)), ("window_size", 4)))
    x = torch.randn(1, 3, 63, 95)
    sites = undiscard.find_sites(model, x)
    plain = model(x)
    with undiscard.use_states(model, sites, [3, 3]):
        pass
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(x), plain)


@torch.no_grad()
def test_two_models_in_two_threads_run_their_own_states():
    a, b = circular_net(), circular_net()
    x = torch.randn(4, 2, 64, 128, dtype=torch.double)
    sa = undiscard.find_sites(a, x[:1], searchable="all")
    sb = undiscard.find_sites(b, x[:1], searchable="all")
    st_a, st_b = _random_states(sa, 4, 10), _random_states(sb, 4, 11)
    want_a, want_b = undiscard.run_states(a, x, st_a, sa), undiscard.run_states(b, x, st_b, sb)
    got, errors = {}, []

    def work(key, model, st, sites):
        try:
            with torch.no_grad():
                for _ in range(20):
                    got[key] = undiscard.run_states(model, x, st, sites)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=("a", a, st_a, sa)), threading.Thread(target=work, args=("b", b, st_b, sb))]
    for t in threads:
        t.start()
    plain = [a(x) for _ in range(20)]  # the main thread runs model a plainly meanwhile
    for t in threads:
        t.join()
    assert not errors
    torch.testing.assert_close(got["a"], want_a, rtol=0, atol=0)
    torch.testing.assert_close(got["b"], want_b, rtol=0, atol=0)
    assert all(torch.equal(p, plain[0]) for p in plain)


# ----------------------------------------------------------------------------- errors


def test_model_without_subsampling_raises_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(undiscard.NoSubsamplingSiteError, match="no subsampling site.*needs at least one"):
        undiscard.find_sites(model, torch.randn(1, 3, 32, 32))


def test_unbatched_input_raises_clear_error():
    with pytest.raises(undiscard.InputError, match=r"batched.*\(3, 64, 64\).*unsqueeze\(0\)"):
        undiscard.find_sites(cached("timm", "resnet18"), torch.randn(3, 64, 64))


def test_wrong_channel_count_raises_clear_error():
    with pytest.raises(undiscard.InputError, match=r"failed on an input of shape \(1, 1, 64, 64\).*channel count"):
        undiscard.find_sites(cached("timm", "resnet18"), torch.randn(1, 1, 64, 64))


def test_input_too_small_raises_clear_error():
    model = cached("torchvision", "inception_v3", (("init_weights", False), ("aux_logits", False)))
    with pytest.raises(undiscard.InputError, match=r"\(1, 3, 32, 32\).*large enough.*--input-size"):
        undiscard.find_sites(model, torch.randn(1, 3, 32, 32))


def test_state_of_wrong_length_raises_clear_error():
    sites = undiscard.find_sites(cached("timm", "resnet18"), torch.randn(1, 3, 64, 64))
    with pytest.raises(undiscard.StateError, match=r"one offset per searchable site \(3"):
        undiscard.run_states(cached("timm", "resnet18"), torch.randn(1, 3, 64, 64), [1, 2], sites)
    with pytest.raises(undiscard.StateError, match=r"one offset per searchable site \(3"):
        sites.encode(torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("state,msg", [([0, 4, 0], r"offset index 4 .*offsets are 0..3"),
                                        ([0, -1, 0], r"offset index -1"),
                                        ([(0, 0), (2, 0), (0, 0)], r"offset \(2, 0\) .*0 <= s\[a\] < stride\[a\]")])
def test_state_out_of_range_raises_clear_error(state, msg):
    sites = undiscard.find_sites(cached("timm", "resnet18"), torch.randn(1, 3, 64, 64))
    with pytest.raises(undiscard.StateError, match=msg):
        sites.encode(state)


def test_float_state_is_rejected():
    sites = undiscard.find_sites(cached("timm", "resnet18"), torch.randn(1, 3, 64, 64))
    with pytest.raises(undiscard.StateError, match="integer offset indices"):
        sites.encode(torch.zeros(3))


def test_sites_of_another_model_raise_mismatch():
    sites = undiscard.find_sites(cached("timm", "resnet18"), torch.randn(1, 3, 64, 64))
    with pytest.raises(undiscard.SiteMismatchError, match="find_sites"):
        undiscard.run_states(cached("timm", "mobilenetv2_100"), torch.randn(1, 3, 64, 64), [1, 1, 1], sites)


def test_offset_tuples_and_flat_indices_are_the_same_state():
    sites = undiscard.find_sites(cached("timm", "resnet18"), torch.randn(1, 3, 64, 64))
    assert sites.encode([(0, 1), (1, 0), (1, 1)]).tolist() == [1, 2, 3]
    assert sites.encode([[1, 2, 3], [0, 0, 0]]).shape == (2, 3)
    assert sites.offsets(torch.tensor([1, 2, 3])) == [[(0, 1), (1, 0), (1, 1)]]
