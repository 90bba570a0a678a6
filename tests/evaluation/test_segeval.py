"""`undiscard eval --task segmentation` and `train-segmenter`: numbers, files, resuming, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from undiscard.cli.app import main
from undiscard.evaluation.segment import PARTIAL_KIND, SegEvalConfig, run_seg_eval
from undiscard.statefile import load_state, save_state
from undiscard.models.train_classifier import RESUME_KIND

ROOT = Path(__file__).resolve().parents[2]
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
    assert not out.with_suffix(".partial.safetensors").exists()


def test_a_model_with_cross_site_skips_is_evaluated_through_the_fallback(tmp_path):
    cfg = SegEvalConfig(model="seg:segformer-tiny", limit=4, batch_size=4, budgets=[1, 3], timing_images=1, repeats=1)
    res = run_seg_eval(cfg, tmp_path / "s.json", log=lambda m: None)
    assert res["engine"] == ["rerun (fallback)"] and len(res["rows"]) == 4
    # its head fuses stage 0 (before the searched sites): the skips are aligned, and the ablation is reported
    assert res["skips"]["fused_across_sites"] and res["skips"]["output_level"] == 0
    assert [(r["aggregate"], r["budget"], r["align_skips"]) for r in res["skips_unaligned"]] == [
        ("mean", 3, False), ("entropy", 3, False)]


def test_interrupted_seg_eval_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    import undiscard.evaluation.segment as ev

    cfg = SegEvalConfig(model="seg:deeplabv3-tiny", limit=8, batch_size=2, budgets=[1, 3], timing_images=1, repeats=1)
    full = run_seg_eval(cfg, tmp_path / "a.json", log=lambda m: None)
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
        run_seg_eval(cfg, tmp_path / "b.json", log=lambda m: None)
    assert load_state(tmp_path / "b.partial.safetensors", PARTIAL_KIND)["done"] == 4  # nothing unpickled
    monkeypatch.setattr(ev, "progress", real)
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
    assert not (tmp_path / "b.partial.safetensors").exists()
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
    from undiscard.data.segmentation import fashion_mnist_canvas
    from undiscard.method.segment import dense_logits, wrap_segmentation
    from undiscard.models.segmenters import load_segmenter
    from undiscard.models.train_segmenter import evaluate_segmenter

    loaded = load_segmenter(str(path))
    x, y = fashion_mnist_canvas("test", 96, limit=32)
    assert evaluate_segmenter(loaded.model, x, y, 11)["miou"] > 25.0  # far above a random model's ~7
    with torch.no_grad():
        assert torch.equal(wrap_segmentation(loaded.model, budget=1)(x[:4]), dense_logits(loaded.model, x[:4]))
    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["arch"].startswith("seg:") and summary["val"]["miou"] > 35.0


def test_train_segmenter_writes_a_checkpoint_that_loads_and_refuses_a_foreign_resume_file(tmp_path):
    from undiscard.models.segmenters import load_segmenter
    from undiscard.models.train_segmenter import SegRecipe, train_segmenter

    out = tmp_path / "m.safetensors"
    recipe = SegRecipe.for_arch("segformer-tiny", steps=3, batch_size=4, val_images=4, size=64)
    summary = train_segmenter(recipe, out, log=lambda m: None)
    assert summary["steps"] == 3 and 0.0 <= summary["val"]["miou"] <= 100.0
    loaded = load_segmenter(str(out))
    assert loaded.input_size == (1, 64, 64) and loaded.num_classes == 11
    assert json.loads(out.with_suffix(".json").read_text())["recipe"]["steps"] == 3
    save_state({"recipe": {"arch": "other"}}, out.with_name(out.name + ".resume.safetensors"), RESUME_KIND)
    with pytest.raises(Exception, match="another recipe"):
        train_segmenter(recipe, out, log=lambda m: None)


# ---------------------------------------------------------------- --size, folder sets read per batch

def test_size_is_refused_for_classification_in_either_order(capsys):
    for argv in (["eval", "timm:resnet18", "--size", "64", "--limit", "2"],
                 ["eval", "timm:resnet18", "--size", "64", "--task", "classification"],
                 ["eval", "timm:resnet18", "--task", "classification", "--size", "64,32"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "undiscard: error: --size is a segmentation option" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", ["0", "64,0", "a", "1,2,3", "64x64"])
def test_a_malformed_size_is_a_clear_error(bad, capsys):
    assert main(["eval", "seg:deeplabv3-tiny", "--task", "segmentation", "--size", bad, "--limit", "2"]) == 2
    assert "--size takes H or H,W" in capsys.readouterr().err


def _ade_mixed(root: Path, n: int = 6) -> Path:
    from test_segdata import make_ade

    make_ade(root, "validation", sizes=[((8, 16), (12, 8), (16, 16))[i % 3] for i in range(n)])
    return root


def test_mixed_size_ade20k_needs_and_evaluates_with_size(tmp_path, capsys):
    root = _ade_mixed(tmp_path / "ade")
    base = ["eval", "seg:deeplabv3-tiny", "--task", "segmentation", "--data", f"ade20k:{root}", "--batch-size", "2",
            "--budget", "1,2", "--timing-images", "1", "--repeats", "1"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "different sizes" in err and "--size H[,W]" in err
    out = tmp_path / "r.json"
    assert main([*base, "--size", "32,48", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["images"] == 6 and res["num_classes"] == 150 and res["input_size"] == [3, 32, 48]
    assert res["data"] == "ade20k:validation" and res["config"]["size"] == [32, 48]
    assert res["rows"][0]["budget"] == 1 and res["rows"][0]["miou"] == res["plain"]["miou"]
    # the size is part of the saved configuration: a partial file of another size is not resumed
    partial = tmp_path / "p.partial.safetensors"
    save_state({"version": 3, "config": {**res["config"], "size": [32, 32]}, "batches": 1, "done": 2, "stats": {}},
               partial, PARTIAL_KIND)
    assert main([*base, "--size", "32,48", "--json", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "other arguments" in err and "size" in err and "--fresh" in err


def test_folder_sets_are_read_a_batch_at_a_time(tmp_path, monkeypatch):
    from undiscard.evaluation.segment import FIGURE_IMAGES
    from undiscard.data.segmentation import LazySegmentation

    root = _ade_mixed(tmp_path / "ade", n=7)
    asked: list[int] = []
    real = LazySegmentation.batch

    def batch(self, lo, hi):
        x, y = real(self, lo, hi)
        asked.append(x.shape[0])
        return x, y

    monkeypatch.setattr(LazySegmentation, "batch", batch)
    cfg = SegEvalConfig(model="seg:deeplabv3-tiny", data=f"ade20k:{root}", size=[32, 32], batch_size=2, budgets=[1, 2],
                        timing_images=1, repeats=1)
    res = run_seg_eval(cfg, None, log=lambda m: None, figure=tmp_path / "f.png")
    assert res["images"] == 7 and (tmp_path / "f.png").exists()
    # one probe image, the four evaluation batches (2, 2, 2, 1), the timing image, the figure's first images
    assert asked == [1, 2, 2, 2, 1, 1, FIGURE_IMAGES]
    assert max(asked) < 7


def test_old_partial_files_are_refused_with_a_hint_to_start_fresh(tmp_path):
    cfg = SegEvalConfig(model="seg:deeplabv3-tiny", limit=2, batch_size=2, budgets=[1, 2], timing_images=1, repeats=1)
    out = tmp_path / "a.json"
    torch.save({"version": 1, "config": dict(cfg.__dict__), "batches": 1, "done": 2,
                "confusion": {"plain": torch.zeros(2, 11, 11, dtype=torch.int64)}}, out.with_suffix(".partial.pt"))
    with pytest.raises(Exception, match="pickle format; it is not.*--fresh"):  # never unpickled
        run_seg_eval(cfg, out, log=lambda m: None)


# ---------------------------------------------------------------- default budgets

def test_default_budgets_drop_those_above_a_small_search_space(tmp_path, capsys):
    base = ["eval", "seg:deeplabv3-tiny", "--task", "segmentation", "--searchable", "2", "--limit", "2",
            "--batch-size", "2", "--timing-images", "1", "--repeats", "1"]
    out = tmp_path / "r.json"
    assert main([*base, "--json", str(out)]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "dropped" in line]
    assert len(notes) == 1 and "10" in notes[0] and "4 states" in notes[0]
    res = json.loads(out.read_text())
    assert sorted({r["budget"] for r in res["rows"]}) == [1, 4] and res["sites"]["space_size"] == 4
    assert res["config"]["budgets"] == [1, 4, 10] and any("dropped" in n for n in res["notes"])
    # an explicit --budget above the search space stays an error, even the default's values
    assert main([*base, "--budget", "1,4,10"]) == 2
    assert "budget 10 exceeds the search space of 4 states" in capsys.readouterr().err


def test_default_budgets_per_task():
    from undiscard.cli.app import build_parser
    from undiscard.method.classify import budgets_from

    args = build_parser().parse_args(["eval", "timm:resnet18"])
    assert budgets_from(args.budget) == [1, 2, 4, 8, 16]  # classification: unchanged
    assert build_parser().parse_args(["eval", "m", "--budget", "1,2"]).budget == "1,2"


# ---------------------------------------------------------------- per-image TP / FP / FN

def _confusion_reference(pred, target, k, ignore):
    """The former per-image (N, K, K) confusion matrices."""
    n = pred.shape[0]
    t, p = target.reshape(n, -1).long(), pred.reshape(n, -1).long()
    keep = t != ignore
    img = torch.arange(n)[:, None].expand_as(t)
    idx = (img * k * k + t.clamp(0, k - 1) * k + p)[keep]
    return torch.bincount(idx, minlength=n * k * k).reshape(n, k, k)


def _bootstrap_reference(method, plain, resamples=1000, seed=0):
    """The former bootstrap over per-image confusion matrices."""
    def miou(conf):
        tp = conf.diagonal(dim1=1, dim2=2)
        union = conf.sum(1) + conf.sum(2) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.zeros_like(tp))
        return 100.0 * iou.sum(1) / (union > 0).sum(1).clamp_min(1)

    n, k = plain.shape[0], plain.shape[-1]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (resamples, n), generator=g)
    w = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(resamples, n, dtype=torch.float64))
    gain = (miou((w @ method.reshape(n, -1).double()).reshape(-1, k, k))
            - miou((w @ plain.reshape(n, -1).double()).reshape(-1, k, k)))
    return tuple(torch.quantile(gain, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist())


@pytest.mark.parametrize("k,seed", [(11, 0), (150, 1), (3, 2)])
def test_per_image_counts_give_the_numbers_of_confusion_matrices_bit_for_bit(k, seed):
    from undiscard.evaluation.segment import bootstrap_gain, per_image_stats, summarize_stats
    from undiscard.data.segmentation import SegMetrics

    g = torch.Generator().manual_seed(seed)
    n, ignore = 40, 255
    target = torch.randint(0, k, (n, 24, 20), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = ignore
    plain = torch.where(torch.rand(target.shape, generator=g) < 0.6, target.clamp(max=k - 1),
                        torch.randint(0, k, target.shape, generator=g))
    method = torch.where(torch.rand(target.shape, generator=g) < 0.1, target.clamp(max=k - 1), plain)
    for pred in (plain, method):
        stats = per_image_stats(pred, target, k, ignore)
        conf = _confusion_reference(pred, target, k, ignore)
        assert stats.shape == (n, 3, k) and stats.dtype == torch.int32
        tp = conf.diagonal(dim1=1, dim2=2)
        assert torch.equal(stats.long(), torch.stack([tp, conf.sum(1) - tp, conf.sum(2) - tp], 1))
        m = SegMetrics(k, ignore).update(pred, target)
        got = summarize_stats(stats.sum(0))
        assert got["miou"] == 100.0 * m.miou() and got["pixel_accuracy"] == 100.0 * m.pixel_accuracy()
        assert got["per_class_iou"] == [None if v != v else round(100.0 * float(v), 3) for v in m.per_class_iou().tolist()]
    sm, sp = per_image_stats(method, target, k, ignore), per_image_stats(plain, target, k, ignore)
    cm, cp = _confusion_reference(method, target, k, ignore), _confusion_reference(plain, target, k, ignore)
    assert bootstrap_gain(sm, sp, seed=3) == _bootstrap_reference(cm, cp, seed=3)
