"""Image-space aggregation over cached logits: GPS, AugTTA, ClassTTA, mean, max (undiscard.tta.merge)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import EPS32, assert_close_scaled
from undiscard.tta import merge as imgtta
from undiscard.errors import InputError, UndiscardError

K = 10


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add barrier waits (seconds on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n: int = 400, a: int = 4, seed: int = 0, scale: float = 6.0):
    """Over-confident synthetic logits: A noisy views of a signal, labels drawn from the signal."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, K, generator=g)
    y = torch.multinomial(torch.softmax(signal * 2, -1), 1, generator=g).squeeze(1)
    views = signal[:, None] + 0.7 * torch.randn(n, a, K, generator=g)
    return views * scale, y, ["identity"] + [f"aug{i}" for i in range(1, a)]


def _nll(logp, y):
    return float(-logp.gather(1, y[:, None]).mean())


def test_gps_with_one_candidate_is_temperature_scaled_identity():
    logits, y, names = _data(a=1)
    for budget in (1, 3):
        agg = imgtta.fit_gps(logits, y, names, budget)
        assert agg.picks == [0] * budget and agg.used() == [0]
        t = imgtta.fit_temperature(logits[:, 0], y)  # fitted on its own, not read off the aggregator
        assert agg.temperature == pytest.approx(t, rel=1e-9)
        want = torch.log_softmax(logits[:, 0] / t, -1)
        # float32 both: a division, log-softmax over K (max, exp, a sum of K, log), a logsumexp over one pick
        assert_close_scaled(agg(logits), want, ops=6 + math.sqrt(K), scale=(logits / t).abs().max())


def test_gps_temperature_lowers_identity_nll_on_overconfident_logits():
    logits, y, names = _data(scale=6.0)
    t = imgtta.fit_gps(logits, y, names, 1).temperature
    assert t > 1.5  # the logits are over-confident
    before = _nll(torch.log_softmax(logits[:, 0], -1), y)
    after = _nll(torch.log_softmax(logits[:, 0] / t, -1), y)
    assert after < before - 0.1
    for other in (t * 0.9, t * 1.1):  # a (local) minimum
        assert after <= _nll(torch.log_softmax(logits[:, 0] / other, -1), y)


def test_gps_first_pick_is_the_best_single_augmentation_and_second_the_best_pair():
    logits, y, names = _data(a=5, seed=1)
    agg = imgtta.fit_gps(logits, y, names, 2)
    probs = torch.softmax(logits.double() / agg.temperature, -1)
    single = [_nll(probs[:, a].log(), y) for a in range(5)]
    first = min(range(5), key=single.__getitem__)
    assert agg.picks[0] == first
    pair = [_nll(((probs[:, first] + probs[:, b]) / 2).log(), y) for b in range(5)]
    assert agg.picks[1] == min(range(5), key=pair.__getitem__)
    want = ((probs[:, agg.picks[0]] + probs[:, agg.picks[1]]) / 2).log()
    # the library in float32 vs this float64 reference: float32 rounding of ~6 steps with sums of K
    assert_close_scaled(agg(logits).double(), want, ops=6 + math.sqrt(K), eps=EPS32,
                        scale=(logits / agg.temperature).abs().max())


def test_gps_duplicate_picks_count_by_multiplicity():
    logits, y, names = _data(a=3)
    agg = imgtta.ImageAggregator("gps", names, temperature=2.0, picks=[1, 1, 2], budget=3)
    p = torch.softmax(logits / 2.0, -1)
    # float32, the same mixture by logsumexp vs by probabilities: ~6 steps with sums of K
    assert_close_scaled(agg(logits), ((2 * p[:, 1] + p[:, 2]) / 3).log(), ops=6 + math.sqrt(K),
                        scale=(logits / 2.0).abs().max())
    assert agg.used() == [1, 2]
    assert torch.equal(agg.forward_used(logits[:, [1, 2]]), agg(logits))  # the very same ops


@pytest.mark.parametrize("method", ["augtta", "classtta"])
def test_learned_weights_are_on_the_simplex(method):
    logits, y, names = _data(a=4)
    agg = imgtta.fit_image_aggregator(method, logits, y, names)
    w = agg.weights
    assert w.shape == ((4,) if method == "augtta" else (4, K))
    assert (w >= 0).all()
    assert_close_scaled(w.sum(0), torch.ones(w.shape[1:], dtype=w.dtype), ops=2 + 4)  # a softmax over A=4, summed
    # the identity alone and the plain mean of the logits are feasible: the fit must not be worse
    identity = _nll(torch.log_softmax(logits[:, 0], -1), y)
    mean_logits = _nll(torch.log_softmax(logits.mean(1), -1), y)
    slack = (4 + math.sqrt(len(y))) * EPS32 * max(identity, mean_logits)  # rounding of a float32 mean NLL
    assert _nll(agg(logits), y) <= min(identity, mean_logits) + slack


def test_augtta_gives_a_pure_noise_augmentation_a_small_weight():
    g = torch.Generator().manual_seed(0)
    n = 500
    y = torch.randint(0, K, (n,), generator=g)
    good = 4 * torch.nn.functional.one_hot(y, K).float()
    logits = torch.stack([good + torch.randn(n, K, generator=g) * 1.5 for _ in range(3)], 1)
    logits[:, 2] = 4 * torch.randn(n, K, generator=g)  # augmentation 2: pure noise
    agg = imgtta.fit_augtta(logits, y, ["identity", "a", "noise"])
    assert agg.weights[2] < 0.05 and agg.weights[:2].min() > 0.3
    # deterministic
    assert torch.equal(agg.weights, imgtta.fit_augtta(logits, y, ["identity", "a", "noise"]).weights)


def test_classtta_weights_per_class_sum_to_one_and_shape():
    logits, y, names = _data(a=3, n=200)
    agg = imgtta.fit_classtta(logits, y, names, epochs=50)
    out = agg(logits)
    mixed = (logits * agg.weights).sum(1)
    want = torch.log_softmax(mixed, -1)
    # the same formula (the weights cast to the logits' dtype or not): a sum of A=3 and a log-softmax over K
    assert_close_scaled(out, want.to(out.dtype), ops=4 + math.sqrt(3) + math.sqrt(K), eps=EPS32, scale=mixed.abs().max())


def test_mean_and_max_match_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # N=1, A=2, K=3
    p0 = torch.tensor([math.e**2, 1, 1]) / (math.e**2 + 2)
    p1 = torch.tensor([1, math.e, 1]) / (math.e + 2)
    mean = imgtta.mean_aggregator(["identity", "hflip"])(logits)
    ops = 6 + math.sqrt(3)  # float32 both: ~6 steps (exp, sums of K=3, log, a division) each rounded
    assert_close_scaled(mean[0], ((p0 + p1) / 2).log(), ops=ops, scale=2.0)  # scale: the largest logit
    mx = torch.maximum(p0, p1)
    out = imgtta.max_aggregator(["identity", "hflip"])(logits)
    assert_close_scaled(out[0], (mx / mx.sum()).log(), ops=ops, scale=2.0)
    assert_close_scaled(out.exp().sum(-1), torch.ones(1), ops=ops)


@pytest.mark.parametrize("method", imgtta.METHODS)
def test_forward_with_wrong_number_of_augmentations_is_an_input_error(method):
    logits, y, names = _data(a=3, n=50)
    agg = imgtta.fit_image_aggregator(method, logits, y, names, budget=2 if method == "gps" else None, **(
        {"epochs": 5} if method in ("augtta", "classtta") else {}))
    with pytest.raises(InputError, match="A=2"):
        agg(logits[:, :2])


@pytest.mark.parametrize("method", imgtta.METHODS)
def test_save_load_round_trip_gives_identical_outputs(method, tmp_path):
    logits, y, names = _data(a=3, n=100)
    kw = {"epochs": 20} if method in ("augtta", "classtta") else {}
    agg = imgtta.fit_image_aggregator(
        method, logits, y, names, budget=4 if method == "gps" else None, trained_on="undiscard B_feat=5 logits", **kw
    )
    path = agg.save(tmp_path / f"{method}.safetensors")
    back = imgtta.ImageAggregator.load(path, names=names)
    assert back.method == method and back.names == names and back.trained_on == "undiscard B_feat=5 logits"
    assert back.budget == agg.budget and back.used() == agg.used()
    assert torch.equal(back(logits), agg(logits))


def test_load_with_other_names_is_a_clear_error(tmp_path):
    logits, y, names = _data(a=3, n=100)
    path = imgtta.fit_gps(logits, y, names, 2).save(tmp_path / "gps.safetensors")
    with pytest.raises(UndiscardError, match=r"different order.*same names, same order.*refit"):
        imgtta.ImageAggregator.load(path, names=[names[0], names[2], names[1]])
    with pytest.raises(UndiscardError, match=r"\['identity', 'aug1', 'aug2'\].*\['identity', 'hflip'\].*missing"):
        imgtta.ImageAggregator.load(path, names=["identity", "hflip"])
    with pytest.raises(UndiscardError, match="no image-TTA aggregator"):
        imgtta.ImageAggregator.load(tmp_path / "nope.safetensors")


def test_fit_dispatch_errors():
    logits, y, names = _data(a=3, n=20)
    with pytest.raises(InputError, match="valid: mean, max, gps, augtta, classtta"):
        imgtta.fit_image_aggregator("median", logits, y, names)
    with pytest.raises(InputError, match="gps needs a budget"):
        imgtta.fit_image_aggregator("gps", logits, y, names)
    with pytest.raises(InputError, match="uses all A=3"):
        imgtta.fit_image_aggregator("augtta", logits, y, names, budget=2)
    with pytest.raises(InputError, match=r"y must be"):
        imgtta.fit_gps(logits, y[:5], names, 1)
    with pytest.raises(InputError, match="unique"):
        imgtta.fit_gps(logits, y, ["identity", "a", "a"], 1)


def test_logits_cache_round_trip_and_metadata_mismatch(tmp_path):
    path = tmp_path / "cache" / "logits.safetensors"
    meta = {"model": "resnet18", "data": "fashion-mnist:val", "images": 1000, "config": {"b_feat": 5}}
    cache = imgtta.LogitsCache(path, meta=meta)
    assert cache.get("identity") is None and len(cache) == 0
    t = torch.randn(7, 10)
    cache.put("identity", t)
    cache.put("hflip", t * 2)
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*.tmp"))
    again = imgtta.LogitsCache(path, meta=dict(meta))
    assert again.keys() == ["hflip", "identity"] and "hflip" in again
    assert torch.equal(again.get("identity"), t) and torch.equal(again.get("hflip"), t * 2)
    assert torch.equal(imgtta.LogitsCache(path).get("identity"), t)  # no meta: no check
    with pytest.raises(UndiscardError, match=r"images: cache has '1000', now '999'.*--fresh"):
        imgtta.LogitsCache(path, meta={**meta, "images": 999})
    with pytest.raises(UndiscardError, match=r"extra: cache has '<missing>'"):
        imgtta.LogitsCache(path, meta={**meta, "extra": "x"})
    fresh = imgtta.LogitsCache(path, meta={**meta, "images": 999}, fresh=True)
    assert len(fresh) == 0
    fresh.put("identity", t)
    assert imgtta.LogitsCache(path, meta={**meta, "images": 999}).keys() == ["identity"]
