"""`undiscard fit`, configurations, statistics, offset-augmented training, shift consistency."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import undiscard
from conftest import assert_close_scaled, rounding_ops
from undiscard.method.config import load_config, model_fingerprint, save_config
from undiscard.evaluation.fit import aggregate_logits, fit, state_table, table_search
from undiscard.evaluation.paired import consistency, shift_images
from undiscard.evaluation.stats import calibration, mcnemar, paired_bootstrap


class OddPixelNet(nn.Module):
    """A 1x1 stride-2 convolution, mean pooling, a linear head: at the default offset
    (0, 0) it reads only the even pixels; the signal of :func:`odd_pixel_data` is on the odd ones."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1, stride=2, bias=False)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.fc.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
            self.fc.bias.copy_(torch.tensor([0.01, 0.0]))  # plain: class 0 always

    def forward_features(self, x):
        return self.conv(x)

    def forward_head(self, f):
        return self.fc(f.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def odd_pixel_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.zeros(n, 1, 8, 8)
    x[:, :, 1::2, 1::2] = (2.0 * y - 1.0)[:, None, None, None] + 0.1 * torch.randn(n, 1, 4, 4, generator=g)
    return x, y


def test_fit_finds_the_state_that_helps_and_writes_a_config_wrap_applies(tmp_path):
    model = OddPixelNet().eval()
    x, y = odd_pixel_data(200)
    table = state_table(model, x, searchable=[0])
    assert table.states.shape == (4, 1)
    res = fit(table, y, max_cost=4, searchable=[0])
    assert res["validation"]["significant"] and res["wrap"]["budget"] > 1, res["validation"]["decision"]
    assert res["validation"]["plain_top1"] == pytest.approx(100 * float((y == 0).double().mean()))
    path = save_config(tmp_path / "c.json", res, model)
    wrapped = undiscard.wrap(model, config=path)
    xt, yt = odd_pixel_data(100, seed=1)
    with torch.no_grad():
        acc = float((wrapped(xt).argmax(1) == yt).double().mean())
        plain = float((model(xt).argmax(1) == yt).double().mean())
    assert acc == 1.0 and plain < 0.7


def test_fit_keeps_the_plain_model_when_no_state_differs(tmp_path):
    # constant images: every offset reads the same values, so no configuration can differ from plain
    model = OddPixelNet().eval()
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (120,), generator=g)
    x = torch.randn(120, 1, 1, 1, generator=g).expand(120, 1, 8, 8).contiguous()
    res = fit(state_table(model, x, searchable=[0]), y, 4, searchable=[0])
    assert res["wrap"] == {"budget": 1} and res["name"] == "plain"
    assert not res["validation"]["significant"] and res["validation"]["crossfit"]["wins"] == 0


def test_fit_keeps_the_plain_model_when_the_gain_is_noise():
    # random labels: states differ, but nothing predicts them; the held-out gain is not significant
    model = OddPixelNet().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 1, 8, 8, generator=g)
    y = torch.randint(0, 2, (300,), generator=g)
    res = fit(state_table(model, x, searchable=[0]), y, 4, searchable=[0])
    assert res["wrap"] == {"budget": 1}, res["validation"]["decision"]


def test_a_config_is_refused_for_another_model(tmp_path):
    model = OddPixelNet().eval()
    path = save_config(tmp_path / "c.json", {"wrap": {"budget": 2, "searchable": [0]}}, model)
    other = OddPixelNet().eval()
    with torch.no_grad():
        other.fc.bias.add_(1e-3)
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(undiscard.ConfigError, match="another model"):
        undiscard.wrap(other, config=path)
    with pytest.raises(undiscard.OptionError, match="budget"):
        undiscard.wrap(model, 4, config=path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(undiscard.ConfigError, match="not a configuration"):
        load_config(tmp_path / "bad.json", model)
    (tmp_path / "evil.json").write_text(json.dumps({"kind": "undiscard.config/1", "wrap": {"__class__": 1}}))
    with pytest.raises(undiscard.ConfigError, match="unknown wrap settings"):
        load_config(tmp_path / "evil.json")


@pytest.mark.parametrize("width", [1, None])
@pytest.mark.parametrize("criterion", ["entropy", "random", "displacement"])
def test_the_state_table_replays_the_wrapper(width, criterion):
    """fit's candidates are computed from the table: it must give the wrapper's states and logits."""
    torch.manual_seed(0)
    model = _tiny_resnet()
    x = torch.randn(6, 1, 32, 32)
    table = state_table(model, x)
    prior = torch.rand(len(table.sites.searchable), 4, dtype=torch.float64)
    for use_prior in (False, True):
        idx = table_search(table, 5, criterion, width=width, prior=prior if use_prior else None)
        for agg in ("mean", "entropy"):
            sim = aggregate_logits(table.logits.gather(1, idx[..., None].expand(-1, -1, table.logits.shape[-1])), agg)
            with torch.no_grad():
                real, d = undiscard.wrap(model, 5, criterion, agg, width=width, prior=prior if use_prior else None,
                                         return_details=True)(x)
            assert torch.equal(d.states, table.states[idx])
            assert_close_scaled(sim, real, ops=rounding_ops(model))


def test_replay_gives_the_wrappers_logits_for_any_config():
    from undiscard.evaluation.fit import replay

    torch.manual_seed(0)
    model = _tiny_resnet()
    x = torch.randn(4, 1, 32, 32)
    table = state_table(model, x)
    for cfg in ({"budget": 1}, {"budget": 3}, {"budget": 4, "width": None, "aggregate": "mean"},
                {"budget": 3, "aggregate": "entropy", "policy": [[0, 0], [2, 1], [1, 3]]},
                {"budget": 2, "criterion": "random", "prior": [[0, 1, 2, 3], [0, 3, 2, 1]]}):
        with torch.no_grad():
            real = undiscard.wrap(model, **cfg)(x)
        assert_close_scaled(replay(table, cfg), real, ops=rounding_ops(model))


def _tiny_resnet():
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), stem_width=8, in_chans=1,
                  num_classes=10, output_stride=16).eval()


def test_a_policy_config_evaluates_its_states_for_every_image():
    model = _tiny_resnet()
    x = torch.randn(3, 1, 32, 32)
    pol = [[0, 0], [3, 0], [0, 1]]
    with torch.no_grad():
        out, d = undiscard.wrap(model, 3, aggregate="mean", policy=pol, return_details=True)(x)
    assert d.states.tolist() == [pol] * 3
    with pytest.raises(undiscard.OptionError, match="default state"):
        undiscard.wrap(model, 2, policy=[[1, 0], [0, 0]])


def test_mcnemar_and_bootstrap_are_exact_on_known_cases():
    a = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    m = mcnemar(a, b)
    assert (m["wins"], m["losses"]) == (5, 0) and m["p"] == pytest.approx(2 / 32)
    assert mcnemar(b, b)["p"] == 1.0
    gain, lo, hi = paired_bootstrap(a, b)
    assert gain == pytest.approx(62.5) and lo <= gain <= hi
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)


def test_temperature_scaling_does_not_raise_the_validation_nll():
    g = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(500, 10, generator=g)
    y = torch.randint(0, 10, (500,), generator=g)
    c = calibration(logits, y, logits, y)
    assert c["nll_ts"] <= c["nll"] + 1e-9 and c["temperature"] > 1


def test_offset_augmented_gradients_match_per_state_gradients():
    """One per-sample-state batch gives the gradients of running each sample under its own state."""
    from undiscard.sites.discover import find_sites
    from undiscard.models.train_classifier import random_states

    torch.manual_seed(0)
    model = _tiny_resnet()  # eval mode: BatchNorm would otherwise couple the samples of a batch
    x = torch.randn(6, 1, 32, 32)
    y = torch.randint(0, 10, (6,))
    sites = find_sites(model, x[:1])
    states = random_states(sites, 6, 1.0, torch.Generator().manual_seed(1))
    assert len({tuple(s) for s in states.tolist()}) > 1
    loss = nn.functional.cross_entropy(undiscard.run_states(model, x, states, sites), y, reduction="sum")
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(6):
        li = nn.functional.cross_entropy(undiscard.run_states(model, x[i : i + 1], states[i], sites), y[i : i + 1],
                                         reduction="sum")
        for r, gi in zip(ref, torch.autograd.grad(li, list(model.parameters()))):
            r += gi
    for g_, r in zip(grads, ref):
        assert_close_scaled(g_, r, ops=6 * rounding_ops(model))


def test_offset_augmented_training_runs_a_few_steps(tmp_path):
    from undiscard.models.train_classifier import Recipe, train_backbone

    out = tmp_path / "m.safetensors"
    r = Recipe(arch="zoo:fmnist-resnet", size=64, epochs=3 * 64 / 55000, batch_size=64, augment="shift",
               offset_augment=0.5)
    summary = train_backbone(r, out, log=lambda m: None)
    assert summary["steps"] == 3 and summary["recipe"]["offset_augment"] == 0.5
    with pytest.raises(undiscard.UndiscardError, match="probability"):
        train_backbone(Recipe(arch="zoo:fmnist-resnet", offset_augment=1.5), tmp_path / "n.safetensors")


class MaxNet(nn.Module):
    """Global max and min of the image: unchanged by any shift that keeps the object in the frame."""

    def forward(self, x):
        return torch.stack([x.amax((1, 2, 3)), -x.amin((1, 2, 3))], 1)


def test_consistency_is_complete_for_a_shift_invariant_model():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(50, 1, 24, 24)
    x[:, :, 8:16, 8:16] = torch.randn(50, 1, 8, 8, generator=g)  # the object, 8 px from every border
    same = consistency({"max": MaxNet()}, x, 6)["max"]
    assert same.all() and same.shape == (50,)
    shifted = shift_images(x, torch.full((50,), 3), torch.full((50,), -2))
    assert torch.equal(shifted[:, :, 11:19, 6:14], x[:, :, 8:16, 8:16])


def test_fit_command_writes_a_config_eval_applies(tmp_path, capsys):
    from undiscard.cli.app import main
    from undiscard.models.classifiers import load_model, save_checkpoint

    torch.manual_seed(0)
    net = load_model("zoo:fmnist-resnet").model
    path = save_checkpoint(net, tmp_path / "r.safetensors", arch="zoo:fmnist-resnet", num_classes=10, in_chans=1,
                input_size=(1, 64, 64))
    cfg = tmp_path / "c.json"
    assert main(["fit", str(path), "--limit", "60", "--out", str(cfg), "--threads", "1"]) == 0
    body = json.loads(cfg.read_text())
    assert body["model_fingerprint"] == model_fingerprint(load_model(str(path)).model)
    assert main(["eval", str(path), "--config", str(cfg), "--limit", "20", "--consistency", "4",
                 "--timing-images", "4", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "McNemar" in out and "shift consistency" in out
    torch.manual_seed(1)  # another model of the same architecture: the config is refused, in one line
    other = save_checkpoint(load_model("zoo:fmnist-resnet").model, tmp_path / "o.safetensors", arch="zoo:fmnist-resnet",
                            num_classes=10, in_chans=1, input_size=(1, 64, 64))
    assert main(["eval", str(other), "--config", str(cfg), "--limit", "4"]) == 2
    err = capsys.readouterr().err
    assert "fitted for another model" in err and "Traceback" not in err
