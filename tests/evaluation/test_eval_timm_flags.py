"""`undiscard eval` with timm validate.py's flags: results file, top-5, AMP, channels_last,
torch.compile, device, and the out-of-memory retry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from undiscard.cli.app import main
from undiscard.evaluation.classify import RESULT_COLUMNS, EvalConfig, _Acc, run_eval

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "zoo" / "fmnist_resnet18.safetensors"
QUICK = ["--limit", "8", "--batch-size", "4", "--budget", "1,2", "--aggregate", "mean", "--timing-images", "2",
         "--repeats", "1"]


def _cfg(**kw) -> EvalConfig:
    base = dict(model=str(SHIPPED), limit=8, batch_size=4, budgets=[1, 2], aggregates=["mean"], timing_images=2,
                repeats=1)
    return EvalConfig(**{**base, **kw})


def test_top5_counts_the_label_among_the_five_largest_logits():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3], [9.0, 8, 7, 6, 5, 4, 3], [0.0, 1, 2, 3, 4, 5, 6]])
    y = torch.tensor([2, 5, 0])  # third largest (in), sixth largest (out), smallest (out)
    acc = _Acc()
    acc.add(logits, y)
    s = acc.summary()
    assert acc.correct == [0, 0, 0] and acc.correct5 == [1, 0, 0]
    assert s["top1"] == 0.0 and s["top5"] == pytest.approx(100 / 3)
    few = _Acc()
    few.add(torch.tensor([[1.0, 0, 2]]), torch.tensor([1]))  # 3 classes: top-5 is top-3, always right
    assert few.summary()["top5"] == 100.0


@pytest.mark.parametrize("ext,fmt", [(".csv", None), (".json", None), (".txt", "json")])
def test_results_file_has_timms_columns_then_ours(tmp_path, capsys, ext, fmt):
    out, res_file = tmp_path / "r.json", tmp_path / f"res{ext}"
    argv = ["eval", str(SHIPPED), *QUICK, "--json", str(out), "--results-file", str(res_file)]
    if fmt:
        argv += ["--results-format", fmt]
    assert main(argv) == 0
    capsys.readouterr()
    res = json.loads(out.read_text())
    if (fmt or ext.lstrip(".")) == "json":
        rows = json.loads(res_file.read_text())
        assert all(list(r) == list(RESULT_COLUMNS) for r in rows)
    else:
        with res_file.open() as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == RESULT_COLUMNS
            rows = list(reader)
    assert len(rows) == 1 + len(res["rows"])
    plain = rows[0]
    assert plain["criterion"] == "plain" and float(plain["cost"]) == 1.0
    assert float(plain["top1"]) == pytest.approx(res["plain"]["top1"], abs=1e-4)
    assert float(plain["top1_err"]) == pytest.approx(100 - res["plain"]["top1"], abs=1e-4)
    assert float(plain["top5"]) >= float(plain["top1"])
    assert float(plain["param_count"]) == pytest.approx(res["param_count"]) and int(plain["img_size"]) == 128
    assert plain["interpolation"] == "bilinear"
    timed = [r for r in rows[1:] if r["aggregate"] == "mean"]
    assert timed and all(float(r["cost"]) > 0 and float(r["ms_per_img"]) > 0 for r in timed)


def test_retry_halves_the_forward_on_out_of_memory_and_gives_the_same_numbers(monkeypatch):
    from undiscard.method.classify import Undiscard

    ref = run_eval(_cfg(), log=lambda m: None)
    real = Undiscard.search

    def tight(self, x, *a, **k):  # a device that holds at most 2 images' searches
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, x, *a, **k)

    monkeypatch.setattr(Undiscard, "search", tight)
    with pytest.raises(Exception, match="add --retry"):
        run_eval(_cfg(), log=lambda m: None)
    logs: list[str] = []
    got = run_eval(_cfg(retry=True), log=logs.append)
    assert any("out of memory with 4 images per forward; retrying with 2" in m for m in logs)
    assert got["images"] == ref["images"] == 8
    # the same states per image (its search depends on the image alone): the same predictions;
    # the NLL may move by the rounding of a batch of 2 instead of 4 in the model's reductions
    for a, b in zip([ref["plain"], *ref["rows"]], [got["plain"], *got["rows"]]):
        assert (a["criterion"] if "criterion" in a else None) == (b["criterion"] if "criterion" in b else None)
        assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
        assert b["nll"] == pytest.approx(a["nll"], rel=1e-4)


def test_amp_runs_the_plain_model_and_the_method_under_autocast():
    got = run_eval(_cfg(amp=True), log=lambda m: None)
    assert got["amp_dtype"] == "bfloat16" and got["config"]["amp"] is True
    for r in got["rows"]:
        if r["budget"] == 1 and r["aggregate"] == "mean":  # budget 1 is the plain model, in the same precision
            assert r["top1"] == got["plain"]["top1"]


def test_channels_last_changes_the_layout_not_the_predictions():
    ref = run_eval(_cfg(), log=lambda m: None)
    got = run_eval(_cfg(channels_last=True), log=lambda m: None)
    assert [r["top1"] for r in got["rows"]] == [r["top1"] for r in ref["rows"]]
    assert got["plain"]["top1"] == ref["plain"]["top1"]


def test_torchcompile_compiles_the_model_and_the_captured_segments(capsys):
    assert main(["eval", str(SHIPPED), *QUICK]) == 0
    ref = capsys.readouterr().out
    assert main(["eval", str(SHIPPED), *QUICK, "--torchcompile", "eager"]) == 0
    got = capsys.readouterr().out

    def top1(table: str) -> list[str]:
        return [line.split()[3] for line in table.splitlines() if line.split()[:1] in (["plain"], ["entropy"])]

    assert top1(got) == top1(ref) and len(top1(ref)) >= 3


@pytest.mark.parametrize("argv,msg", [
    (["--device", "tpu"], "--device takes cpu, cuda or cuda:N"),
    (["--results-format", "csv"], "--results-format needs --results-file"),
    (["--amp", "--task", "segmentation"], "timm validate.py flags of the classification evaluation"),
    (["--channels-last", "--consistency", "2"], "timm validate.py flags"),
])
def test_timm_flags_bad_input_is_a_clear_error(argv, msg, capsys):
    assert main(["eval", str(SHIPPED), *QUICK, *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_device_cuda_runs_there_or_is_a_clear_error(capsys):
    rc = main(["eval", str(SHIPPED), *QUICK, "--device", "cuda"])
    if torch.cuda.is_available():
        assert rc == 0 and "cuda" in capsys.readouterr().out
    else:
        assert rc == 2 and "no CUDA device" in capsys.readouterr().err


def test_pretrained_reaches_the_loader(monkeypatch, capsys):
    import undiscard.models.classifiers as classifiers

    seen = {}
    real = classifiers.load_model

    def spy(spec, **kw):
        seen.update(kw)
        return real(spec, **{**kw, "pretrained": False})  # no download in tests

    monkeypatch.setattr(classifiers, "load_model", spy)
    assert main(["eval", str(SHIPPED), *QUICK, "--pretrained"]) == 0
    assert seen["pretrained"] is True
    capsys.readouterr()
