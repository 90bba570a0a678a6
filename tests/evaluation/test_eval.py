"""`undiscard eval` / `train-aggregator`: the numbers, the files, resuming, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import EPS32, cached
from undiscard.cli.app import main
from undiscard.evaluation.classify import EvalConfig, calibration_error, run_eval

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "zoo" / "fmnist_resnet18.safetensors"
SHIPPED_AGG = ROOT / "zoo" / "fmnist_resnet18.aggregator.safetensors"


def test_calibration_error_of_a_perfectly_calibrated_and_an_overconfident_model():
    conf = torch.tensor([0.8] * 10, dtype=torch.float64)
    assert calibration_error(conf, torch.tensor([1] * 8 + [0] * 2)) == pytest.approx(0.0, abs=1e-12)
    assert calibration_error(torch.tensor([1.0] * 4), torch.tensor([1, 0, 0, 0])) == pytest.approx(0.75)


def test_eval_on_the_shipped_model_on_a_slice(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = [str(SHIPPED), "--limit", "24", "--batch-size", "12", "--budget", "1,2,4", "--aggregate", "mean,entropy",
            "--timing-images", "4", "--repeats", "1", "--json", str(out), "--plot", str(png)]
    if SHIPPED_AGG.exists():
        args[args.index("mean,entropy")] = "mean,entropy,attention"
        args += ["--aggregator", str(SHIPPED_AGG), "--criterion", "entropy,learned"]
    assert main(["eval", *args]) == 0
    table = capsys.readouterr().out
    assert "top-1 %" in table and "x plain" in table
    res = json.loads(out.read_text())
    assert res["images"] == 24 and png.stat().st_size > 1000
    p = res["plain"]
    assert p["top1"] > 50.0  # a trained model, not a random one
    for r in res["rows"]:
        assert 0.0 <= r["top1"] <= 100.0 and r["nll"] > 0
        if r["budget"] == 1 and r["aggregate"] != "attention-default-only":  # B=1 is the plain model
            # the same features (offset 0 is bit for bit); the head's float32 pooling (4x4 cells) and linear
            # layer (512 inputs) may run on another layout, and the NLL moves by at most twice the largest
            # logit change; the shipped model's logits stay below 10 in magnitude (4.6 on these images)
            nll_tol = 2 * (math.sqrt(16) + math.sqrt(512)) * EPS32 * 10
            assert r["top1"] == p["top1"] and r["nll"] == pytest.approx(p["nll"], rel=0, abs=nll_tol)
        if r["aggregate"] not in ("best-single", "attention-default-only"):
            assert r["time_ratio"] > 0
    assert not out.with_suffix(".partial.safetensors").exists()
    if SHIPPED_AGG.exists():  # the control row: the aggregator on the default state alone
        assert any(r["aggregate"] == "attention-default-only" for r in res["rows"])


def test_interrupted_eval_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    import undiscard.evaluation.classify as ev

    model = cached("timm", "resnet18", (("num_classes", 10), ("in_chans", 1)))
    path = tmp_path / "m.safetensors"
    from undiscard.models.classifiers import save_checkpoint

    save_checkpoint(model, path, arch="timm:resnet18", num_classes=10, in_chans=1, input_size=(1, 64, 64))
    cfg = EvalConfig(model=str(path), limit=12, batch_size=4, budgets=[1, 3], timing_images=2, repeats=1)
    full = run_eval(cfg, tmp_path / "a.json", log=lambda m: None)

    real = ev.progress

    class Boom:
        def __init__(self, *a):
            self.bar, self.calls = real(*a), 0

        def update(self, k):
            self.calls += 1
            if self.calls == 3:  # the initial update, then two batches
                raise KeyboardInterrupt
            self.bar.update(k)

        def close(self):
            self.bar.close()

    monkeypatch.setattr(ev, "progress", Boom)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, tmp_path / "b.json", log=lambda m: None)
    partial = ev.read_partial(tmp_path / "b.partial.safetensors")  # safetensors + JSON: nothing unpickled
    assert partial["done"] == 8
    monkeypatch.setattr(ev, "progress", real)
    logs = []
    resumed = run_eval(cfg, tmp_path / "b.json", log=logs.append)
    assert any("resuming at image 8/12" in m for m in logs)
    for a, b in zip(full["rows"], resumed["rows"]):
        assert (a["top1"], a["nll"]) == (b["top1"], b["nll"])


@pytest.mark.parametrize("argv,msg", [
    (["--criterion", "best"], "--criterion takes"),
    (["--aggregate", "max"], "--aggregate takes"),
    (["--aggregate", "attention"], "need --aggregator"),
    (["--budget", "1,65"], "exceeds the search space of 64"),
    (["--budget", "0,2"], "budgets must be positive"),
    (["--data", "imagenet"], "--data takes"),
    (["--data", "fashion-mnist:dev"], "split must be"),
    (["--limit", "0"], "--limit must be positive"),
])
def test_eval_bad_input_is_a_clear_error(argv, msg, capsys):
    assert main(["eval", str(SHIPPED), *argv]) == 2
    err = capsys.readouterr().err
    assert "undiscard: error:" in err and msg in err and "Traceback" not in err


def test_train_aggregator_writes_a_checkpoint_the_wrapper_uses(tmp_path):
    from undiscard.method.learned import load_aggregator, train_aggregator
    from undiscard.method.classify import wrap

    model = cached("timm", "resnet18", (("num_classes", 4), ("in_chans", 1)))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 64, 64, generator=g), torch.randint(0, 4, (16,), generator=g)
    w = wrap(model, budget=1)
    out = tmp_path / "agg.safetensors"
    train_aggregator(w, x, y, out, states_per_image=4, epochs=2, batch_size=8, dim=16, heads=2, log=lambda m: None)
    agg = load_aggregator(out, model, w.sites_for(x))
    assert agg.meta["undiscard.feature_dim"] == "512" and agg.meta["undiscard.align"] == "1"
    assert any(p.abs().sum() > 0 for p in agg.proj_out.parameters())  # it learned something
    logits = wrap(model, budget=3, aggregate="attention", aggregator=out)(x[:2])
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    assert not (tmp_path / "agg.safetensors.cache.safetensors").exists()


def test_train_aggregator_refuses_a_missing_backbone(capsys):
    assert main(["train-aggregator", "zoo/nope.safetensors", "--out", "x.safetensors"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_eval_on_an_image_folder_streams_batches(tmp_path):
    from PIL import Image

    from undiscard.models.classifiers import save_checkpoint

    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            arr = (torch.rand(40, 40, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr, mode="L").save(tmp_path / "data" / c / f"{i}.png")
    model = cached("timm", "resnet18", (("num_classes", 2), ("in_chans", 1)))
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path, arch="timm:resnet18", num_classes=2, in_chans=1, input_size=(1, 64, 64))
    cfg = EvalConfig(model=str(path), data=str(tmp_path / "data"), limit=5, batch_size=2, budgets=[1, 2],
                     timing_images=2, repeats=1)
    res = run_eval(cfg, None, log=lambda m: None)
    assert res["images"] == 5 and res["data"] == str(tmp_path / "data")
    assert res["plain"]["n"] == 5
