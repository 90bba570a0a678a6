"""Greedy best-first search over the state lattice."""

from __future__ import annotations

import pytest
import torch

import undiscard
from conftest import circular_net
from undiscard.method.aggregate import entropy
from undiscard.method.search import greedy_search, neighbours


@pytest.fixture(scope="module")
def sites():
    net = circular_net()
    # searchable: a (2,2) site and a (1,2) site -> 4 * 2 = 8 states
    return undiscard.find_sites(net, torch.randn(1, 2, 64, 128, dtype=torch.double), searchable=[1, 4])


def _fake_evaluate(table):
    """Logits looked up per state: lets a test decide which states look confident."""

    def evaluate(img, states):
        return torch.stack([table(int(i), tuple(s.tolist())) for i, s in zip(img, states)])

    return evaluate


def _neg_entropy(out, states=None):
    return -entropy(out)


@pytest.mark.parametrize("criterion", ["entropy", "random", "displacement"])
def test_budget_equal_to_space_size_reaches_every_state_once(sites, criterion):
    ev = _fake_evaluate(lambda i, s: torch.tensor([float(sum(s)), 0.0, float(i)]))
    res = greedy_search(ev, 3, sites, sites.space_size, criterion, score=_neg_entropy)
    assert res.states.shape == (3, 8, 2)
    for i in range(3):
        got = {tuple(s) for s in res.states[i].tolist()}
        assert got == {(a, b) for a in range(4) for b in range(2)}
    assert (res.states[:, 0] == 0).all()


def test_budget_one_is_the_default_state_only(sites):
    ev = _fake_evaluate(lambda i, s: torch.zeros(3))
    res = greedy_search(ev, 2, sites, 1, "entropy", score=_neg_entropy)
    assert res.states.tolist() == [[[0, 0]], [[0, 0]]]


def test_budget_above_space_size_is_a_clear_error(sites):
    with pytest.raises(undiscard.StateError, match=r"budget 9 is outside 1..8"):
        greedy_search(lambda i, s: torch.zeros(len(i), 3), 1, sites, 9, "random")


def test_entropy_and_learned_need_a_score(sites):
    with pytest.raises(undiscard.StateError, match="needs a score"):
        greedy_search(lambda i, s: torch.zeros(len(i), 3), 1, sites, 2, "entropy")


def test_criteria_choose_different_states_on_a_case_built_to_tell_them_apart(sites):
    # state (3, 0) is the only confident one; (1, 0) is nearest in displacement.
    def table(i, s):
        return torch.tensor([20.0, 0.0, 0.0]) if s == (3, 0) else torch.tensor([0.1 * s[0], 0.0, 0.1 * s[1]])

    ev = _fake_evaluate(table)
    by_disp = greedy_search(ev, 1, sites, 2, "displacement", width=1).states[0, 1].tolist()
    assert by_disp == [1, 0]  # offset (0, 1) at the first site: Delta (0, 2) px, the smallest move
    # width 4: step 1 evaluates all 4 neighbours of the default; step 2 expands the most
    # promising of them, whose only fresh neighbour is then state 6
    sixth = {}
    for criterion in ("entropy", "displacement"):
        res = greedy_search(ev, 1, sites, 6, criterion, score=_neg_entropy, width=4)
        states = [tuple(s) for s in res.states[0].tolist()]
        assert set(states[1:5]) == set(neighbours((0, 0), sites))
        sixth[criterion] = states[5]
    assert sixth["entropy"] == (3, 1)  # the confident (3, 0) is expanded
    assert sixth["displacement"] == (1, 1)  # the nearest, (1, 0), is expanded


def test_search_is_deterministic_given_a_seed(sites):
    ev = _fake_evaluate(lambda i, s: torch.tensor([float(s[0]), float(s[1]), 0.0]))
    a = greedy_search(ev, 4, sites, 5, "random", seed=1).states
    b = greedy_search(ev, 4, sites, 5, "random", seed=1).states
    c = greedy_search(ev, 4, sites, 5, "random", seed=2).states
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_each_step_evaluates_all_images_in_one_call(sites):
    calls = []

    def ev(img, states):
        calls.append(len(img))
        return torch.zeros(len(img), 3)

    greedy_search(ev, 16, sites, 4, "entropy", score=_neg_entropy, width=None)
    # default state for all 16, then the 3 remaining states of every image in one step
    assert calls == [16, 48]


@pytest.mark.parametrize("criterion", ["random", "displacement"])
def test_a_search_blind_to_outputs_is_planned_and_evaluated_in_one_call(sites, criterion):
    calls = []

    def ev(img, states):
        calls.append(len(img))
        return torch.stack([img.double(), *states.double().T], 1)  # each row names its request

    res = greedy_search(ev, 5, sites, 6, criterion, seed=3)
    assert calls == [30]
    # budgets stay prefixes, every state is evaluated once, and each output is its own request's
    for b in (1, 3):
        assert torch.equal(greedy_search(ev, 5, sites, b, criterion, seed=3).states, res.states[:, :b])
    assert all(len({tuple(s) for s in res.states[i].tolist()}) == 6 for i in range(5))
    assert torch.equal(res.outputs[..., 0].long(), torch.arange(5)[:, None].expand(5, 6))
    assert torch.equal(res.outputs[..., 1:].long(), res.states)


@torch.no_grad()
def test_search_with_the_real_engine_evaluates_what_it_reports():
    net = circular_net()
    x = torch.randn(3, 2, 64, 128, dtype=torch.double)
    sites = undiscard.find_sites(net, x[:1])

    def ev(img, states):
        return undiscard.run_states(net, x[img], states, sites).flatten(1)[:, :10]

    res = greedy_search(ev, 3, sites, 5, "entropy", score=_neg_entropy)
    for i in range(3):
        for b in range(5):
            want = undiscard.run_states(net, x[i : i + 1], res.states[i, b], sites).flatten(1)[0, :10]
            torch.testing.assert_close(res.outputs[i, b], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("criterion", ["entropy", "random", "displacement"])
def test_a_smaller_budget_is_a_prefix_of_a_larger_one(sites, criterion):
    # per-image generators: image i's search does not depend on the budget or the other images
    g = torch.Generator().manual_seed(3)
    table = {(i, s): torch.randn(5, generator=g) for i in range(4) for s in _all_states(sites)}
    ev = _fake_evaluate(lambda i, s: table[(i, s)])
    big = greedy_search(ev, 4, sites, 8, criterion, score=_neg_entropy, seed=5)
    for b in (1, 2, 3, 5, 7):
        small = greedy_search(ev, 4, sites, b, criterion, score=_neg_entropy, seed=5)
        assert torch.equal(small.states, big.states[:, :b])
    # and a different seed changes the order for the random criterion
    if criterion == "random":
        other = greedy_search(ev, 4, sites, 8, criterion, score=_neg_entropy, seed=6)
        assert not torch.equal(other.states, big.states)


def _all_states(sites):
    import itertools

    return list(itertools.product(*[range(sites.sites[i].num_offsets) for i in sites.searchable]))
