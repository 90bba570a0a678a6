"""`undiscard eval --task segmentation` and `train-segmenter`: numbers, files, resuming, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from undiscard.cli import main
from undiscard.seg_eval import SegEvalConfig, run_seg_eval

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {"deeplabv3": ROOT / "zoo" / "fmnist_seg_deeplabv3.safetensors",
           "segformer": ROOT / "zoo" / "fmnist_seg_segformer.safetensors"}

FAST = ["--limit", "6", "--batch-size", "3", "--budget", "1,2,3", "--timing-images", "2", "--repeats", "1"]


def test_seg_eval_end_to_end_writes_the_json_the_table_and_the_figure(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["eval", "seg:deeplabv3-tiny", "--task", "segmentation", "--data", "fashion-mnist-seg:test", *FAST,
                 "--aggregate", "mean,entropy", "--json", str(out), "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    assert "mIoU %" in table and "x plain" in table
    res = json.loads(out.read_text())
    assert res["images"] == 6 and res["num_classes"] == 11 and res["input_size"] == [1, 96, 96]
    assert res["engine"] == ["trie"] and res["sites"]["space_size"] == 16
    assert png.stat().st_size > 10_000 and res["figure"]["budget"] == 3
    p = res["plain"]
    assert {(r["aggregate"], r["budget"]) for r in res["rows"]} == {(a, b) for a in ("mean", "entropy") for b in (1, 2, 3)}
    for r in res["rows"]:
        assert 0.0 <= r["miou"] <= 100.0 and 0.0 <= r["pixel_accuracy"] <= 100.0 and r["time_ratio"] > 0
        if r["budget"] == 1:  # B=1 is the plain model
            assert (r["miou"], r["pixel_accuracy"]) == (p["miou"], p["pixel_accuracy"])
    assert not out.with_suffix(".partial.pt").exists()


def test_a_model_with_cross_site_skips_is_evaluated_through_the_fallback(tmp_path):
    cfg = SegEvalConfig(model="seg:segformer-tiny", limit=4, batch_size=4, budgets=[1, 3], timing_images=1, repeats=1)
    res = run_seg_eval(cfg, tmp_path / "s.json", log=lambda m: None)
    assert res["engine"] == ["rerun (fallback)"] and len(res["rows"]) == 4
    # its head fuses stage 0 (before the searched sites): the skips are aligned, and the ablation is reported
    assert res["skips"]["fused_across_sites"] and res["skips"]["output_level"] == 0
    assert [(r["aggregate"], r["budget"], r["align_skips"]) for r in res["skips_unaligned"]] == [
        ("mean", 3, False), ("entropy", 3, False)]


def test_interrupted_seg_eval_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    import undiscard.evaluate as ev

    cfg = SegEvalConfig(model="seg:deeplabv3-tiny", limit=8, batch_size=2, budgets=[1, 3], timing_images=1, repeats=1)
    full = run_seg_eval(cfg, tmp_path / "a.json", log=lambda m: None)
    real = ev._progress

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

    monkeypatch.setattr(ev, "_progress", Boom)
    with pytest.raises(KeyboardInterrupt):
        run_seg_eval(cfg, tmp_path / "b.json", log=lambda m: None)
    assert torch.load(tmp_path / "b.partial.pt", weights_only=False)["done"] == 4
    monkeypatch.setattr(ev, "_progress", real)
    other = SegEvalConfig(**{**cfg.__dict__, "budgets": [1, 2]})
    with pytest.raises(Exception, match="--fresh"):
        run_seg_eval(other, tmp_path / "b.json", log=lambda m: None)
    logs: list[str] = []
    resumed = run_seg_eval(cfg, tmp_path / "b.json", log=logs.append)
    assert any("resuming at image 4/8" in m for m in logs)
    assert resumed["plain"]["miou"] == full["plain"]["miou"]
    for a, b in zip(full["rows"], resumed["rows"]):
        assert (a["miou"], a["pixel_accuracy"], a["per_class_iou"]) == (b["miou"], b["pixel_accuracy"], b["per_class_iou"])
    # --fresh starts over with the other arguments
    run_seg_eval(cfg, tmp_path / "c.json", log=lambda m: None)
    assert not (tmp_path / "b.partial.pt").exists()
    logs.clear()
    run_seg_eval(other, tmp_path / "b.json", log=logs.append, fresh=True)
    assert not any("resuming" in m for m in logs)


@pytest.mark.parametrize("argv,msg", [
    (["--single-states"], "--single-states is a classification option"),
    (["--no-align"], "classification option"),
    (["--aggregator", "x.safetensors"], "classification option"),
    (["--criterion", "learned"], "--criterion takes entropy, random, displacement"),
    (["--aggregate", "attention"], "--aggregate takes mean, entropy"),
    (["--budget", "1,17"], "exceeds the search space of 16"),
    (["--data", "pascal-voc"], "unknown segmentation spec"),
    (["--limit", "0"], "--limit must be positive"),
])
def test_seg_eval_bad_input_is_a_clear_error(argv, msg, capsys):
    assert main(["eval", "seg:deeplabv3-tiny", "--task", "segmentation", "--limit", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert "undiscard: error:" in err and msg in err and "Traceback" not in err


def test_a_classification_checkpoint_is_refused_for_segmentation(capsys):
    cls = ROOT / "zoo" / "fmnist_resnet18.safetensors"
    if not cls.exists():
        pytest.skip("no shipped classification checkpoint")
    assert main(["eval", str(cls), "--task", "segmentation", "--limit", "2"]) == 2
    assert "not one of undiscard's segmentation checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_segmenters_are_trained_and_exact_at_budget_one(name):
    path = SHIPPED[name]
    if not path.exists():
        pytest.skip(f"{path.name} not trained yet (scripts/train_seg.sh)")
    from undiscard.segdata import fashion_mnist_canvas
    from undiscard.segment import dense_logits, wrap_segmentation
    from undiscard.segmodels import load_segmenter
    from undiscard.segtrain import evaluate_segmenter

    loaded = load_segmenter(str(path))
    x, y = fashion_mnist_canvas("test", 96, limit=32)
    assert evaluate_segmenter(loaded.model, x, y, 11)["miou"] > 25.0  # far above a random model's ~7
    with torch.no_grad():
        assert torch.equal(wrap_segmentation(loaded.model, budget=1)(x[:4]), dense_logits(loaded.model, x[:4]))
    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["arch"].startswith("seg:") and summary["val"]["miou"] > 35.0


def test_train_segmenter_writes_a_checkpoint_that_loads_and_refuses_a_foreign_resume_file(tmp_path):
    from undiscard.segmodels import load_segmenter
    from undiscard.segtrain import SegRecipe, train_segmenter

    out = tmp_path / "m.safetensors"
    recipe = SegRecipe.for_arch("segformer-tiny", steps=3, batch_size=4, val_images=4, size=64)
    summary = train_segmenter(recipe, out, log=lambda m: None)
    assert summary["steps"] == 3 and 0.0 <= summary["val"]["miou"] <= 100.0
    loaded = load_segmenter(str(out))
    assert loaded.input_size == (1, 64, 64) and loaded.num_classes == 11
    assert json.loads(out.with_suffix(".json").read_text())["recipe"]["steps"] == 3
    torch.save({"recipe": {"arch": "other"}}, out.with_name(out.name + ".resume.pt"))
    with pytest.raises(Exception, match="another recipe"):
        train_segmenter(recipe, out, log=lambda m: None)
