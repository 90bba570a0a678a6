"""Dataset-level policies: greedy fitting, one-pass evaluation, Pareto front, CLI resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import undiscard
from conftest import EPS16, assert_close_scaled, cached, rounding_ops
from undiscard.method.classify import Undiscard
from undiscard.evaluation.policy import evaluate_policy, fit_policy, pareto_front, policy_features


def _setup():
    model = cached("timm", "resnet18", (("num_classes", 3),))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 64, 64, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    u = Undiscard(model, 2, "entropy", "mean", searchable=[3])
    return model, x, y, u, u.sites_for(x[:1])


def test_policy_features_equal_one_forward_per_state_aligned():
    model, x, y, u, sites = _setup()
    states = torch.tensor([[0], [3], [1]])
    with torch.no_grad():
        f, grid = policy_features(u, x[:4], sites, states, batch=3)
        for s in range(3):
            st = states[s].expand(4, 1)
            with undiscard.use_states(model, sites, st):
                ref = model.forward_features(x[:4])
            ref = u.split.to_positions(u.split.align(ref, sites.displacement(st), sites.stride_total, "zeros"))
            assert_close_scaled(f[:, s], ref, ops=rounding_ops(model))  # float32, batches of 3 vs 4


def test_greedy_fit_picks_the_state_that_lowers_the_nll_most():
    model, x, y, u, sites = _setup()
    with torch.no_grad():
        pol = fit_policy(u, x, y, sites, 3, log=lambda *a: None)
        f, grid = policy_features(u, x, sites, torch.arange(4)[:, None])
        # recompute the second pick by brute force
        nll, scale = {}, 0.0
        for c in (1, 2, 3):
            lg = u.split.head(u._from_positions((f[:, 0] + f[:, c]) / 2, grid))
            nll[c], scale = float(F.cross_entropy(lg, y)), max(scale, float(lg.abs().max()))
    assert pol.states[0] == [0]
    assert pol.states[1] == [min(nll, key=nll.get)]
    # features held in float16 while fitting: each rounded once (<= eps16/2 of itself), the mean of two and
    # the head's sum keep that relative size in the logits, and the NLL moves by about the logits' change
    assert_close_scaled(torch.tensor(pol.val_nll[1]), torch.tensor(min(nll.values())), ops=4, eps=EPS16, scale=scale)
    assert len({tuple(s) for s in pol.states}) == 3  # no repeats
    acc = evaluate_policy(u, pol, x, y, sites, batch=4)
    assert len(acc) == 3 and all(0 <= a <= 100 for a in acc)


def test_pareto_front_keeps_only_undominated_points():
    pts = [{"cost": 1.0, "top1": 80}, {"cost": 2.0, "top1": 79}, {"cost": 2.0, "top1": 82},
           {"cost": 3.0, "top1": 82}, {"cost": 5.0, "top1": 83}]
    assert [(p["cost"], p["top1"]) for p in pareto_front(pts)] == [(1.0, 80), (2.0, 82), (5.0, 83)]


def test_a_too_large_space_is_a_clear_error():
    model, x, y, _, _ = _setup()
    u = Undiscard(model, 2, "entropy", "mean", searchable="all")
    sites = u.sites_for(x[:1])
    with pytest.raises(undiscard.StateError, match="space"):
        fit_policy(u, x, y, sites, 2)


def test_fit_policy_cli_writes_and_resumes(tmp_path):
    out = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "undiscard", "fit-policy", "zoo/fmnist_resnet18.safetensors", "--val-images", "16",
           "--limit", "16", "--max-budget", "2", "--spaces", "last=4", "--timing-images", "4", "--repeats", "1",
           "--threads", "1", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    first = json.loads(out.read_text())
    assert set(first["policies"]) == {"last"} and len(first["policies"]["last"]["test_top1"]) == 2
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "done (saved)" in r.stdout
    assert json.loads(out.read_text())["policies"] == first["policies"]
