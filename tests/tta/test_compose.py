"""Image-space TTA stacked on recovered activations (issue 5): composition and its evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import assert_close_scaled, cached, rounding_ops
from undiscard.tta.compose import ImageTTA, compose, view_logits
from undiscard.errors import UndiscardError
from undiscard.tta.merge import fit_image_aggregator, mean_aggregator
from undiscard.method.classify import Undiscard
from undiscard.tta.transforms import augmentation_pool, flips, transforms_by_names

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _model():
    return cached("timm", "resnet18", (("num_classes", 5),))


def _x(n=3, size=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g)


def test_composition_with_feature_budget_one_equals_the_image_method_alone_exactly():
    model, x = _model(), _x()
    views = augmentation_pool((64, 64), MEAN, STD, n=4)
    g = torch.Generator().manual_seed(0)
    val = torch.randn(40, len(views), 5, generator=g)
    y = torch.randint(0, 5, (40,), generator=g)
    for agg in (mean_aggregator([t.name for t in views]),
                fit_image_aggregator("augtta", val, y, [t.name for t in views]),
                fit_image_aggregator("gps", val, y, [t.name for t in views], budget=3)):
        with torch.no_grad():
            got = compose(model, views, agg, feature_budget=1)(x)
            used = set(agg.used())
            alone = torch.stack([model(t.augment(x)) if i in used else torch.zeros(3, 5) for i, t in enumerate(views)], 1)
            want = agg(alone)
        assert torch.equal(got, want), agg.method


def test_composition_runs_each_used_view_through_the_feature_method():
    model, x = _model(), _x()
    views = flips()
    agg = mean_aggregator([t.name for t in views])
    with torch.no_grad():
        got = ImageTTA(model, views, agg, feature_budget=3, criterion="entropy", aggregate="mean")(x)
        u = Undiscard(model, 3, "entropy", "mean")
        per_view = torch.stack([u(t.augment(x)) for t in views], 1)
        want = agg(per_view)
    # float32, the views batched differently: the network's rounding, relative to the logits
    assert_close_scaled(got, want, ops=rounding_ops(model), scale=per_view.abs().max())
    assert not torch.allclose(got, agg(torch.stack([model(t.augment(x)) for t in views], 1)), atol=1e-4)


def test_view_logits_budget_one_is_the_plain_model_and_larger_budgets_read_one_search():
    model, x = _model(), _x(5)
    view = flips()[1]
    u = Undiscard(model, 4, "entropy", "entropy")
    got = view_logits(u, view, x, [1, 2, 4], batch_size=2)
    with torch.no_grad():
        assert torch.equal(got[1], torch.cat([model(view.augment(x[s:s + 2])) for s in range(0, 5, 2)]))
        for b in (2, 4):
            want = torch.cat([Undiscard(model, b, "entropy", "entropy")(view.augment(x[s:s + 2])) for s in range(0, 5, 2)])
            assert_close_scaled(got[b], want, ops=rounding_ops(model))  # float32, other batches


def test_an_aggregator_fitted_on_other_augmentations_is_refused_with_a_clear_error(tmp_path):
    model = _model()
    views = augmentation_pool((64, 64), MEAN, STD, n=4)
    agg = mean_aggregator([t.name for t in views])
    with pytest.raises(UndiscardError, match="augmentations"):
        ImageTTA(model, list(reversed(views)), agg)
    with pytest.raises(UndiscardError, match="augmentations"):
        ImageTTA(model, views[:3], agg)
    # rebuilding the transforms from the saved names gives a composition that runs
    again = transforms_by_names(agg.names, (64, 64), MEAN, STD)
    assert [t.name for t in again] == agg.names
    ImageTTA(model, again, agg)


def test_tta_study_cli_writes_a_table_and_reuses_the_cached_logits(tmp_path):
    out, cache = tmp_path / "t.json", tmp_path / "cache"
    cmd = [sys.executable, "-m", "undiscard", "tta-study", "zoo/fmnist_resnet18.safetensors", "--totals", "4",
           "--feature-budget", "2", "--tta-pool", "4", "--tta-val-images", "24", "--limit", "16", "--batch-size", "8",
           "--timing-images", "2", "--repeats", "1", "--threads", "1", "--cache-dir", str(cache), "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    rows = {(x["method"], x["b_feat"], x["trained_on"]) for x in res["rows"]}
    for m in ("mean", "max"):
        assert (m, 1, "-") in rows and (m, 2, "-") in rows
    for m in ("gps", "augtta", "classtta"):
        assert {(m, 1, "plain"), (m, 2, "undiscard"), (m, 2, "plain")} <= rows
    for row in res["rows"]:
        assert row["b_total"] == row["b_img"] * row["b_feat"] and row["cost"] > 0
        assert row["b_img"] <= (2 if row["method"] == "flips" else row["image_budget"])
    mean1 = next(x for x in res["rows"] if x["method"] == "mean" and x["b_feat"] == 1)
    assert mean1["b_img"] == 4
    # the rerun computes no view again
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr
    assert "  view " not in r2.stderr
    res2 = json.loads(out.read_text())
    assert [x["top1"] for x in res2["rows"]] == [x["top1"] for x in res["rows"]]


def test_eval_image_tta_cli_and_bad_options(tmp_path):
    base = [sys.executable, "-m", "undiscard", "eval", "zoo/fmnist_resnet18.safetensors", "--limit", "8",
            "--tta-val-images", "16", "--tta-pool", "4", "--timing-images", "2", "--repeats", "1", "--threads", "1",
            "--cache-dir", str(tmp_path / "c")]
    r = subprocess.run(base + ["--image-tta", "gps", "--image-budget", "3", "--budget", "1,2",
                               "--json", str(tmp_path / "g.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "g.json").read_text())
    assert {(x["b_feat"], x["trained_on"]) for x in res["rows"]} == {(1, "plain"), (2, "undiscard"), (2, "plain")}
    assert all(len(x["picks"]) == 3 for x in res["rows"])
    r = subprocess.run(base + ["--image-tta", "augtta", "--image-budget", "9"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "pool" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(base + ["--image-tta", "mean", "--single-states"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--single-states" in r.stderr


def test_paired_interval_brackets_the_difference_and_is_zero_for_identical_results():
    from undiscard.evaluation.tta import paired_interval

    a = "0110" * 50
    assert paired_interval(a, a) == (0.0, 0.0)
    lo, hi = paired_interval(a, "1110" * 50)  # 50 more correct of 200: +25 points
    assert 15 < lo < 25 < hi < 35
    with pytest.raises(Exception, match="same images"):
        paired_interval(a, a[:-1])


@pytest.mark.parametrize("argv, needle", [
    (["eval", "zoo/fmnist_resnet18.safetensors", "--image-budget", "3"], "--image-budget needs --image-tta"),
    (["eval", "zoo/fmnist_resnet18.safetensors", "--image-tta", "flips", "--image-budget", "3"], "flips"),
    (["eval", "zoo/fmnist_resnet18.safetensors", "--image-tta", "gps", "--criterion", "entropy,random"], "ONE value"),
    (["eval", "zoo/fmnist_resnet18.safetensors", "--image-tta", "mean", "--aggregate", "mean,entropy"], "ONE value"),
    (["eval", "zoo/fmnist_seg_deeplabv3.safetensors", "--task", "segmentation", "--image-tta", "gps"], "classification"),
    (["eval", "zoo/fmnist_resnet18.safetensors", "--image-tta", "mean", "--image-aggregator", "x.safetensors"],
     "nothing to fit"),
    (["tta-study", "zoo/fmnist_resnet18.safetensors", "--feature-budget", "0"], "--feature-budget"),
    (["tta-study", "zoo/fmnist_resnet18.safetensors", "--feature-budget", "1"], "--feature-budget"),
])
def test_image_tta_options_that_would_be_ignored_are_clear_errors(argv, needle, capsys):
    from undiscard.cli.app import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_fitted_image_aggregators_are_saved_and_reapplied_and_a_mismatch_is_refused(tmp_path, capsys):
    from undiscard.cli.app import main

    base = ["eval", "zoo/fmnist_resnet18.safetensors", "--limit", "8", "--tta-val-images", "16", "--tta-pool", "4",
            "--timing-images", "2", "--repeats", "1", "--threads", "1", "--cache-dir", str(tmp_path / "c"),
            "--budget", "1", "--image-tta", "augtta", "--image-budget", "3"]
    assert main(base + ["--save-image-aggregators", str(tmp_path / "aggs"), "--json", str(tmp_path / "a.json")]) == 0
    saved = sorted((tmp_path / "aggs").glob("*.safetensors"))
    assert [p.name for p in saved] == ["augtta-m3-fit_bfeat1.safetensors"]
    assert main(base + ["--image-aggregator", str(saved[0]), "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text())["rows"] for f in ("a.json", "b.json"))
    assert [r["correct"] for r in a] == [r["correct"] for r in b]
    capsys.readouterr()
    # fitted on the first 3 views: applying it to the first 2 is another augmentation list
    bad = [v if v != "3" else "2" for v in base] + ["--image-aggregator", str(saved[0])]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "fitted on the augmentations" in err and "Traceback" not in err
    # another model (weights fingerprint / spec) is refused too
    other = [v if v != "zoo/fmnist_resnet18.safetensors" else "zoo/fmnist_mobilenetv2_100.safetensors" for v in base]
    assert main(other + ["--image-aggregator", str(saved[0])]) == 2
    assert "refit it" in capsys.readouterr().err
