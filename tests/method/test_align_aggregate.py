"""Alignment of final maps (SPEC §2) and learning-free aggregation (SPEC §3)."""

from __future__ import annotations

import math

import pytest
import torch

import undiscard
from conftest import assert_close_scaled, circular_net
from undiscard.method.aggregate import entropy_weights, weighted_mean
from undiscard.method.align import align_to_default, shift_cells


class _Trunk(torch.nn.Module):
    """The circular net up to its final map (N, C, h, w)."""

    def __init__(self):
        super().__init__()
        self.net = circular_net()

    def forward(self, x):
        return self.net(x)


@torch.no_grad()
def test_alignment_undoes_the_roll_where_delta_is_a_multiple_of_the_total_stride():
    net = _Trunk()
    x = torch.randn(4, 2, 128, 256, dtype=torch.double)  # final map 4x4
    sites = undiscard.find_sites(net, x[:1], searchable="all")
    p = torch.tensor(sites.stride_total)
    g = torch.Generator().manual_seed(0)
    states = torch.stack([torch.randint(0, s.num_offsets, (4,), generator=g) for s in sites.searchable_sites], 1)
    delta = sites.displacement(states)
    m = torch.tensor([[1, 0], [0, 1], [1, 1], [1, 3]])
    # pre-roll each image so that the total displacement, state + roll, is m * P pixels
    pre = m * p - delta
    xs = torch.cat([torch.roll(x[i : i + 1], tuple(-int(v) for v in pre[i]), dims=(-2, -1)) for i in range(4)])
    maps = undiscard.run_states(net, xs, states, sites)
    aligned = align_to_default(maps, m * p, sites.stride_total, fill="circular")
    torch.testing.assert_close(aligned, net(x), rtol=1e-12, atol=1e-12)
    # the opposite direction does not undo it
    wrong = align_to_default(maps, -m * p, sites.stride_total, fill="circular")
    assert (wrong - net(x)).abs().max() > 1e-3


def test_integer_shift_moves_content_forward_with_zero_fill():
    f = torch.arange(12.0).reshape(1, 1, 3, 4)
    out = shift_cells(f, torch.tensor([[1.0, -1.0]]))
    expected = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 0], [5, 6, 7, 0]], dtype=torch.float)
    assert torch.equal(out[0, 0], expected)


def test_fractional_shift_interpolates_linearly_between_cells():
    # float64: linear interpolation of a ramp is the shifted ramp, exact to rounding
    ramp = torch.arange(10.0, dtype=torch.float64).reshape(1, 1, 1, 10).repeat(2, 3, 1, 1)
    out = shift_cells(ramp, torch.tensor([[0.0, 0.25], [0.0, 1.5]], dtype=torch.float64), fill="border")
    torch.testing.assert_close(out[0, :, 0, 1:], ramp[0, :, 0, 1:] - 0.25)
    torch.testing.assert_close(out[1, :, 0, 2:], ramp[1, :, 0, 2:] - 1.5)


def test_circular_shift_there_and_back_is_identity():
    f = torch.randn(3, 2, 5, 7, dtype=torch.double)
    d = torch.tensor([[1.0, 3.0], [-2.0, 0.0], [4.0, -5.0]])
    torch.testing.assert_close(shift_cells(shift_cells(f, d, "circular"), -d, "circular"), f)


def test_shift_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(N, D\) = \(2, 2\)"):
        shift_cells(torch.zeros(2, 1, 3, 3), torch.zeros(2, 3))


def test_entropy_weights_favour_confident_states_and_sum_to_one():
    logits = torch.tensor([[[10.0, 0, 0], [0.0, 0, 0], [2.0, 1, 0]]])
    w = entropy_weights(logits)
    assert_close_scaled(w.sum(1), torch.ones(1), ops=2 + 3)  # 3 divisions by their sum, summed again
    assert w[0, 0] > w[0, 2] > w[0, 1] and w[0, 1] == 0  # uniform prediction: H = log K


def test_entropy_weights_are_nan_safe():
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[float("nan"), 1.0], [-1e4, 1e4]], [[float("inf"), 0], [0, 0]]])
    w = entropy_weights(logits)
    assert torch.isfinite(w).all()
    assert_close_scaled(w[0], torch.tensor([0.5, 0.5]), ops=2 + 2)  # all uniform: equal weights (a sum, a division)
    assert_close_scaled(w[1], torch.tensor([0.0, 1.0]), ops=2 + 2)  # a NaN state gets 0
    x = torch.stack([torch.tensor([[float("nan"), 1.0], [2.0, 3.0]])] * 3)
    assert torch.isfinite(weighted_mean(x, w)[1]).all()


def test_weighted_mean_with_equal_weights_is_the_mean():
    x = torch.randn(4, 5, 7)
    w = torch.full((4, 5), 0.2)
    assert_close_scaled(weighted_mean(x, w), weighted_mean(x), ops=2 + 5)  # weighted sums of 5 vs a mean of 5
    assert math.isclose(float(weighted_mean(torch.ones(1, 3, 1)).squeeze()), 1.0)
