"""Files that could run code, outputs that cannot be written, results that must not be overwritten, broken images.

Every loading path is handed a pickle whose unpickling would create a marker file (its
``__reduce__`` returns ``(open, (marker, "w"))``): it must be refused with a clear
message, and the marker must never appear. The one way to load a pickled model is the
explicit opt-in (``trust_pickle=True`` / ``--trust-pickle``).
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import undiscard.evaluation.classify as ev
from conftest import cached
from undiscard.cli.app import main
from undiscard.errors import FileTrustError, UndiscardError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "zoo" / "fmnist_resnet18.safetensors"
FAST = ["--limit", "4", "--batch-size", "4", "--budget", "1,2", "--timing-images", "1", "--repeats", "1"]
SEG_FAST = ["seg:deeplabv3-tiny", "--task", "segmentation", "--limit", "2", "--batch-size", "2", "--budget", "1,2",
            "--timing-images", "1", "--repeats", "1"]


class _Touch:
    """Unpickling this creates ``marker`` (it calls ``open(marker, "w")``): what a hostile file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile(path: Path, marker: Path, *, raw: bool = False, wrap=lambda p: {"state": p}) -> Path:
    """A file at ``path`` whose unpickling creates ``marker``: a ``torch.save`` archive, or a plain pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = wrap(_Touch(marker))
    if raw:
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)
    return path


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("undiscard: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a hostile file was unpickled"


def _folder(root: Path, n: int = 2) -> Path:
    """An ImageNet-style folder of 2 classes x ``n`` gray 40x40 PNGs."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = (torch.rand(40, 40, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr, mode="L").save(root / c / f"{i}.png")
    return root


# ---------------------------------------------------------------- the payload, and models


def test_the_hostile_payload_really_runs_when_unpickled(tmp_path):
    # the control: without it, a marker that never appears would prove nothing
    for raw in (False, True):
        m = tmp_path / f"ran{raw}"
        p = _hostile(tmp_path / f"h{raw}.pt", m, raw=raw)
        pickle.loads(p.read_bytes()) if raw else torch.load(p, weights_only=False)
        assert m.exists()


@pytest.mark.parametrize("name,raw", [("m.pt", False), ("m.pth", True)])
def test_load_model_refuses_a_pickled_model_without_the_opt_in(tmp_path, marker, name, raw):
    from undiscard.models.classifiers import load_model

    path = _hostile(tmp_path / name, marker, raw=raw, wrap=lambda p: p)
    with pytest.raises(FileTrustError) as info:
        load_model(str(path))
    msg = str(info.value)
    assert str(path) in msg and "can run any code" in msg
    assert "--trust-pickle" in msg and "trust_pickle=True" in msg and "safetensors" in msg and "timm:NAME" in msg


@pytest.mark.parametrize("argv", [
    ["sites", "{m}"],
    ["check", "{m}"],
    ["eval", "{m}", *FAST],
    ["eval", "{m}", "--image-tta", "mean", "--cache-dir", "{tmp}/cache", *FAST],
    ["tta-study", "{m}", "--cache-dir", "{tmp}/cache", "--limit", "4"],
    ["train-aggregator", "{m}", "--out", "{tmp}/agg.safetensors", "--images", "4"],
    ["fit-policy", "{m}", "--val-images", "4", "--limit", "4"],
], ids=lambda a: "-".join(a[:3]).replace("{m}", "").strip("-"))
def test_every_command_that_loads_a_model_refuses_a_pickle_without_trust_pickle(tmp_path, marker, capsys, argv):
    m = _hostile(tmp_path / "m.pt", marker, wrap=lambda p: p)
    argv = [a.format(m=m, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    _one_line_error(capsys, str(m), "--trust-pickle", "can run any code")


def test_trust_pickle_loads_a_genuine_pickled_model(tmp_path, capsys):
    from undiscard.models.classifiers import load_model

    model = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    path = tmp_path / "mine.pt"
    torch.save(model, path)
    with pytest.raises(FileTrustError):
        load_model(str(path))
    loaded = load_model(str(path), trust_pickle=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.input_size[0] == 1 and "unpickled" in loaded.note
    assert main(["sites", str(path), "--input-size", "1", "32", "32", "--trust-pickle"]) == 0
    out = capsys.readouterr().out
    assert "whole module unpickled" in out and "2 sites" in out


def test_a_state_dict_pt_is_explained_without_running_anything(tmp_path):
    from undiscard.models.classifiers import load_model

    path = tmp_path / "sd.pt"
    torch.save(nn.Conv2d(1, 2, 3).state_dict(), path)  # tensors only: read with weights_only=True
    with pytest.raises(UndiscardError, match="holds a state_dict, not a whole model"):
        load_model(str(path))


def test_a_pickle_named_safetensors_is_not_loaded(tmp_path, marker):
    from undiscard.method.learned import load_aggregator
    from undiscard.tta.merge import ImageAggregator, LogitsCache
    from undiscard.models.classifiers import load_model

    fake = _hostile(tmp_path / "m.safetensors", marker)
    with pytest.raises(UndiscardError, match="not a readable safetensors file"):
        load_model(str(fake))
    with pytest.raises(UndiscardError, match="not a safetensors file"):
        load_aggregator(fake)
    with pytest.raises(UndiscardError, match="not a safetensors file"):
        ImageAggregator.load(fake)
    with pytest.raises(UndiscardError, match="not a readable safetensors file"):
        LogitsCache(fake, meta={"model": "x"})


def test_no_unrestricted_unpickling_outside_the_opt_in():
    src = ROOT / "src" / "undiscard"
    files = sorted(src.rglob("*.py"))
    assert len(files) > 40  # every module of every subpackage
    hits = [(p.relative_to(src).as_posix(), i + 1) for p in files for i, line in enumerate(p.read_text().splitlines())
            if "weights_only=False" in line]
    assert [name for name, _ in hits] == ["models/classifiers.py"], hits  # _load_pickle's trust_pickle branch
    loads = [(p.name, line.strip()) for p in files for line in p.read_text().splitlines()
             if "torch.load(" in line or "pickle.load" in line]
    assert loads and all("weights_only=" in line for _, line in loads), loads


# ---------------------------------------------------------------- evaluation resume files


@pytest.mark.parametrize("name", ["r.partial.pt", "r.partial.safetensors"])
def test_a_hostile_eval_partial_file_is_refused(tmp_path, marker, capsys, name):
    out = tmp_path / "r.json"
    bad = _hostile(tmp_path / name, marker)
    before = bad.read_bytes()
    assert main(["eval", str(SHIPPED), *FAST, "--json", str(out)]) == 2
    _one_line_error(capsys, str(bad), "pickle format", "never loaded" if name.endswith("safetensors") else "not loaded",
                    "--fresh")
    assert bad.read_bytes() == before and not out.exists()


def test_fresh_deletes_an_old_pickled_partial_without_loading_it(tmp_path, marker, capsys):
    out = tmp_path / "r.json"
    bad = _hostile(tmp_path / "r.partial.pt", marker)
    assert main(["eval", str(SHIPPED), "--data", str(_folder(tmp_path / "data")), *FAST, "--json", str(out),
                 "--fresh"]) == 0
    assert f"--fresh: deleted {bad}" in capsys.readouterr().err
    assert not bad.exists() and json.loads(out.read_text())["images"] == 4


@pytest.mark.parametrize("name", ["r.shard1of2.partial.safetensors", "r.shard1of2.partial.pt"])
def test_a_hostile_torchrun_shard_file_is_refused(tmp_path, marker, monkeypatch, capsys, name):
    out = tmp_path / "r.json"
    bad = _hostile(tmp_path / name, marker)
    # rank 1 of 2 reading its own shard file (the collective that shares the refusal, run as one process)
    real = ev._agree
    monkeypatch.setattr(ev, "_agree", lambda d, err: real(ev._Dist(), err))
    config = ev.saved_config(ev.EvalConfig(model=str(SHIPPED)))
    with pytest.raises(UndiscardError, match="pickle format.*--fresh"):
        ev._load_shard_state(out, ev._Dist(1, 2), config, 4, False, lambda m: None)
    # one process finds the shard of a 2-process run: refused without reading it
    monkeypatch.undo()
    assert main(["eval", str(SHIPPED), *FAST, "--json", str(out)]) == 2
    _one_line_error(capsys, str(bad), "--fresh")


@pytest.mark.parametrize("name", ["r.partial.pt", "r.partial.safetensors"])
def test_a_hostile_segmentation_partial_file_is_refused(tmp_path, marker, capsys, name):
    out = tmp_path / "r.json"
    bad = _hostile(tmp_path / name, marker)
    assert main(["eval", *SEG_FAST, "--json", str(out)]) == 2
    _one_line_error(capsys, str(bad), "pickle format", "--fresh")
    assert bad.exists() and not out.exists()


# ---------------------------------------------------------------- caches and training resume files


@pytest.mark.parametrize("name", ["agg.safetensors.cache.pt", "agg.safetensors.cache.safetensors"])
def test_a_hostile_aggregator_cache_is_refused_by_train_aggregator(tmp_path, marker, capsys, name):
    out = tmp_path / "agg.safetensors"
    bad = _hostile(tmp_path / name, marker)
    data = _folder(tmp_path / "data")
    assert main(["train-aggregator", str(SHIPPED), "--data", str(data), "--images", "4", "--states", "2",
                 "--epochs", "1", "--batch-size", "2", "--dim", "8", "--heads", "2", "--out", str(out)]) == 2
    _one_line_error(capsys, str(bad), "pickle format", "feature cache")
    assert not out.exists()


@pytest.mark.parametrize("name", ["m.safetensors.resume.pt", "m.safetensors.resume.safetensors"])
def test_a_hostile_backbone_training_resume_file_is_refused(tmp_path, marker, capsys, name):
    from undiscard.models.train_classifier import Recipe, train_backbone

    out = tmp_path / "m.safetensors"
    bad = _hostile(tmp_path / name, marker)
    recipe = Recipe(arch="timm:resnet18", size=32, epochs=128 / 55000)
    with pytest.raises(FileTrustError, match="pickle format.*(--fresh|delete it)"):
        train_backbone(recipe, out, log=lambda m: None)
    if name.endswith(".pt"):  # the command line says the same in one line
        assert main(["train-backbone", "timm:resnet18", "--out", str(out), "--size", "32"]) == 2
        _one_line_error(capsys, str(bad), "pickle format", "--fresh")
    assert not out.exists()


@pytest.mark.parametrize("name", ["m.safetensors.resume.pt", "m.safetensors.resume.safetensors"])
def test_a_hostile_segmenter_training_resume_file_is_refused(tmp_path, marker, name):
    from undiscard.models.train_segmenter import SegRecipe, train_segmenter

    out = tmp_path / "m.safetensors"
    _hostile(tmp_path / name, marker)
    recipe = SegRecipe.for_arch("deeplabv3-tiny", steps=2, batch_size=2, val_images=2, size=32)
    with pytest.raises(FileTrustError, match="pickle format"):
        train_segmenter(recipe, out, log=lambda m: None)
    assert not out.exists()


def test_training_resume_state_round_trips_without_pickles(tmp_path):
    # model + optimizer state dicts (int keys, tuples, scalar tensors), RNG state, floats: exactly back
    from undiscard.statefile import load_state, save_state

    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(), "step": 7,
             "losses": [0.1, float("inf")], "grid": (4, 4)}
    path = save_state(state, tmp_path / "s.safetensors", "test/1")
    assert path.read_bytes()[:1] != b"\x80" and not path.with_name(path.name + ".tmp").exists()
    back = load_state(path, "test/1")
    assert back["step"] == 7 and back["losses"] == [0.1, float("inf")] and back["grid"] == (4, 4)
    assert torch.equal(back["rng"], state["rng"]) and back["opt"]["param_groups"] == state["opt"]["param_groups"]
    opt2 = torch.optim.AdamW(nn.Linear(3, 2).parameters())
    opt2.load_state_dict(back["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    with pytest.raises(UndiscardError, match="format 'test/1', expected 'other/1'"):
        load_state(path, "other/1")


def test_a_state_file_is_never_mistaken_for_a_pickle(tmp_path):
    # a safetensors header of 128 bytes starts with 0x80, like a pickle: the header shape decides
    from undiscard.statefile import load_state, looks_like_pickle, save_state

    for n in range(0, 400, 3):
        path = save_state({"recipe": {"arch": "x" * n}}, tmp_path / "s.safetensors", "test/1")
        assert not looks_like_pickle(path), n
        assert load_state(path, "test/1")["recipe"]["arch"] == "x" * n


# ---------------------------------------------------------------- completed outputs are not overwritten


def test_a_completed_eval_json_is_reused_or_refused_never_overwritten(tmp_path, capsys, monkeypatch):
    import undiscard.models.classifiers

    out = tmp_path / "r.json"
    base = ["eval", str(SHIPPED), "--data", str(_folder(tmp_path / "data")), *FAST, "--json", str(out)]
    assert main(base) == 0
    res = json.loads(out.read_text())
    del res["config"]["skip_corrupt"]  # as written before --skip-corrupt existed: still the same arguments
    out.write_text(json.dumps(res))
    first = out.read_bytes()
    capsys.readouterr()
    other = [a if a != "1,2" else "1,3" for a in base]
    assert main(other) == 2
    _one_line_error(capsys, str(out), "completed evaluation with other arguments", "budgets: saved [1, 2], now [1, 3]",
                    "--fresh")
    assert out.read_bytes() == first

    def boom(*a, **k):
        raise AssertionError("a completed result must not be recomputed")

    monkeypatch.setattr(undiscard.models.classifiers, "load_model", boom)
    assert main(base) == 0  # the same arguments: its results, printed, nothing recomputed
    captured = capsys.readouterr()
    assert "is complete" in captured.err and "wrote" not in captured.err and "top-1 %" in captured.out
    assert out.read_bytes() == first
    monkeypatch.undo()
    assert main([*other, "--fresh"]) == 0
    assert f"--fresh: deleted {out}" in capsys.readouterr().err
    assert json.loads(out.read_text())["config"]["budgets"] == [1, 3]


def test_eval_refuses_a_json_that_is_not_its_result(tmp_path, marker, capsys):
    out = _hostile(tmp_path / "r.json", marker)  # not JSON at all (and never unpickled)
    assert main(["eval", str(SHIPPED), *FAST, "--json", str(out)]) == 2
    _one_line_error(capsys, str(out), "is not the JSON of a undiscard eval result", "--fresh")
    out.write_text(json.dumps({"hello": 1}))
    assert main(["eval", str(SHIPPED), *FAST, "--json", str(out)]) == 2
    _one_line_error(capsys, "is not a undiscard eval result")


def test_a_completed_segmentation_json_is_reused_or_refused(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["eval", *SEG_FAST, "--json", str(out)]) == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert main(["eval", *[a if a != "1,2" else "1,3" for a in SEG_FAST], "--json", str(out)]) == 2
    _one_line_error(capsys, "completed evaluation with other arguments", "--fresh")
    assert main(["eval", *SEG_FAST, "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "is complete" in err and "wrote" not in err and out.read_bytes() == first
    # a classification run does not overwrite it either
    assert main(["eval", str(SHIPPED), *FAST, "--json", str(out)]) == 2
    _one_line_error(capsys, "holds a completed segmentation evaluation", "--fresh")


def test_image_tta_and_tta_study_do_not_overwrite_another_report(tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"config": {}, "rows": []}))  # e.g. a feature-space eval result
    common = ["--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    assert main(["eval", str(SHIPPED), "--image-tta", "mean", *FAST, *common]) == 2
    _one_line_error(capsys, "is not a result of `undiscard eval --image-tta`", "--fresh")
    out.write_text(json.dumps({"command": {"name": "tta-study", "arguments": {"totals": "5"}}}))
    assert main(["tta-study", str(SHIPPED), "--limit", "4", *common]) == 2
    _one_line_error(capsys, "completed `undiscard tta-study` result of other arguments", "totals: saved '5', now '10,20'",
                    "--fresh")


def test_fit_policy_refuses_a_saved_study_of_other_settings(tmp_path, capsys):
    out = tmp_path / "p.json"
    out.write_text(json.dumps({"settings": {"model": "x"}, "policies": {}}))
    assert main(["fit-policy", str(SHIPPED), "--val-images", "4", "--limit", "4", "--spaces", "last=4",
                 "--json", str(out)]) == 2
    _one_line_error(capsys, str(out), "other settings", "model: saved 'x'", "--fresh")
    out.write_text("not json")
    assert main(["fit-policy", str(SHIPPED), "--json", str(out)]) == 2
    _one_line_error(capsys, "is not the JSON of a fit-policy result")


def test_a_trained_backbone_is_kept_or_refused_not_retrained(tmp_path, capsys, monkeypatch):
    import undiscard.models.classifiers
    from undiscard.models.classifiers import save_checkpoint
    from undiscard.models.train_classifier import Recipe

    out = tmp_path / "m.safetensors"
    recipe = Recipe(arch="timm:resnet18", size=32)
    save_checkpoint(nn.Linear(2, 2), out, arch="timm:resnet18", num_classes=10, in_chans=1, input_size=(1, 32, 32),
                    extra_metadata={"undiscard.recipe": json.dumps(asdict(recipe))})
    (tmp_path / "m.json").write_text(json.dumps({"recipe": asdict(recipe), "val_top1": 0.5}))

    def boom(*a, **k):
        raise AssertionError("a trained checkpoint must not be retrained")

    monkeypatch.setattr(undiscard.models.classifiers, "load_model", boom)
    assert main(["train-backbone", "timm:resnet18", "--out", str(out), "--size", "32", "--lr", "1e-3"]) == 2
    _one_line_error(capsys, str(out), "another recipe", "lr: saved 0.002, now 0.001", "--fresh")
    assert main(["train-backbone", "timm:resnet18", "--out", str(out), "--size", "32"]) == 0
    assert "is complete" in capsys.readouterr().err


def test_a_trained_segmenter_is_kept_or_refused(tmp_path):
    from safetensors.torch import save_file

    from undiscard.models.train_segmenter import SegRecipe, train_segmenter

    out = tmp_path / "m.safetensors"
    recipe = SegRecipe.for_arch("deeplabv3-tiny", steps=2)
    save_file({"w": torch.zeros(1)}, str(out), metadata={"undiscard.recipe": json.dumps(asdict(recipe))})
    logs: list[str] = []
    assert train_segmenter(recipe, out, log=logs.append)["recipe"] == asdict(recipe)
    assert any("is complete" in m for m in logs)
    with pytest.raises(UndiscardError, match="another recipe.*steps: saved 2, now 3.*--fresh"):
        train_segmenter(SegRecipe.for_arch("deeplabv3-tiny", steps=3), out, log=logs.append)


def test_a_trained_aggregator_is_kept_or_refused(tmp_path):
    from undiscard.method.learned import train_aggregator
    from undiscard.method.classify import wrap

    model = cached("timm", "resnet18", (("num_classes", 4), ("in_chans", 1)))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    w = wrap(model, budget=1)
    out = tmp_path / "agg.safetensors"
    kw = dict(states_per_image=2, epochs=1, batch_size=4, dim=8, heads=2)
    first = train_aggregator(w, x, y, out, **kw, log=lambda m: None)
    before = out.read_bytes()
    logs: list[str] = []
    assert train_aggregator(w, x, y, out, **kw, log=logs.append)["loss"] == first["loss"]
    assert any("is complete" in m for m in logs) and out.read_bytes() == before
    with pytest.raises(UndiscardError, match="other settings.*train.*--fresh"):
        train_aggregator(w, x, y, out, **{**kw, "epochs": 2}, log=lambda m: None)
    with pytest.raises(UndiscardError, match="other settings.*data"):
        train_aggregator(w, x + 1, y, out, **kw, log=lambda m: None)
    train_aggregator(w, x, y, out, **{**kw, "epochs": 2}, fresh=True, log=lambda m: None)
    assert out.read_bytes() != before


# ---------------------------------------------------------------- outputs that cannot be written


BAD_OUTPUTS = [
    ["eval", str(SHIPPED), "--json", "{bad}.json"],
    ["eval", str(SHIPPED), "--plot", "{bad}.png"],
    ["eval", *SEG_FAST, "--json", "{bad}.json"],
    ["eval", str(SHIPPED), "--image-tta", "mean", "--json", "{bad}.json"],
    ["tta-study", str(SHIPPED), "--json", "{bad}.json"],
    ["fit-policy", str(SHIPPED), "--json", "{bad}.json"],
    ["bench", "--json", "{bad}.json"],
    ["train-backbone", "timm:resnet18", "--out", "{bad}.safetensors"],
    ["train-segmenter", "deeplabv3-tiny", "--out", "{bad}.safetensors"],
    ["train-aggregator", str(SHIPPED), "--out", "{bad}.safetensors"],
]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Loading a model or measuring anything fails the test: the refusal must come first."""
    import undiscard.evaluation.bench
    import undiscard.models.classifiers
    import undiscard.models.segmenters

    def boom(*a, **k):
        raise AssertionError("computation started before the output path was checked")

    for mod, name in ((undiscard.models.classifiers, "load_model"), (undiscard.models.segmenters, "load_segmenter"),
                      (undiscard.evaluation.bench, "run_bench")):
        monkeypatch.setattr(mod, name, boom)


@pytest.mark.parametrize("argv", BAD_OUTPUTS, ids=lambda a: "-".join(x for x in a[:4] if not x.startswith("/")))
def test_an_output_under_a_file_is_one_error_line_before_any_computation(tmp_path, capsys, nothing_runs, argv):
    afile = tmp_path / "afile"
    afile.write_text("a regular file")
    argv = [a.format(bad=afile / "sub" / "out") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("undiscard: error: --") and "Traceback" not in err, err
    assert "cannot write there" in err and f"{afile} is a file, not a folder" in err


def test_an_output_that_is_a_folder_is_refused(tmp_path, capsys, nothing_runs):
    assert main(["eval", str(SHIPPED), "--json", str(tmp_path)]) == 2
    _one_line_error(capsys, "cannot write there: it is a folder")


def test_an_output_in_a_folder_without_write_permission_is_refused(tmp_path, capsys, nothing_runs, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root writes anywhere, so os.access says yes: answer as it does for any other user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == os.fspath(locked)
                            else real(p, mode, **kw))
    try:
        assert main(["eval", str(SHIPPED), "--json", str(locked / "out.json")]) == 2
        _one_line_error(capsys, "cannot write there", "not writable (permission denied)")
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------- corrupt images in --data folders


def _corrupt(data: Path) -> list[Path]:
    """A file that is no image and a truncated PNG, among good images."""
    garbage = data / "cat" / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    good = (data / "dog" / "0.png").read_bytes()
    truncated = data / "dog" / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    return [garbage, truncated]


def test_a_corrupt_image_is_named_and_skipped_only_when_asked(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    bad = _corrupt(data)
    argv = ["eval", str(SHIPPED), "--data", str(data), "--batch-size", "3", "--budget", "1,2", "--timing-images", "1",
            "--repeats", "1"]
    assert main(argv) == 2
    line = _one_line_error(capsys, "not a readable image", "--skip-corrupt")
    assert str(bad[0]) in line or str(bad[1]) in line
    out = tmp_path / "r.json"
    assert main([*argv, "--skip-corrupt", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 unreadable images" in err and str(bad[0]) in err and str(bad[1]) in err
    res = json.loads(out.read_text())
    assert res["images"] == 4 and sorted(p for p, _ in res["skipped_corrupt"]) == sorted(map(str, bad))


def test_train_aggregator_names_a_corrupt_training_image(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    bad = _corrupt(data)[0]
    assert main(["train-aggregator", str(SHIPPED), "--data", str(data), "--out", str(tmp_path / "a.safetensors")]) == 2
    _one_line_error(capsys, str(bad), "not a readable image", "--skip-corrupt")


def test_a_corrupt_segmentation_image_is_named_and_skipped_only_when_asked(tmp_path, capsys):
    from test_segdata import make_ade

    root = tmp_path / "ade"
    make_ade(root, "validation", sizes=((16, 16),) * 3)
    bad = root / "images" / "validation" / "ADE_val_00000002.jpg"
    bad.write_bytes(b"\x89PNG not really")
    base = ["eval", "seg:deeplabv3-tiny", "--task", "segmentation", "--data", f"ade20k:{root}", "--batch-size", "2",
            "--budget", "1,2", "--timing-images", "1", "--repeats", "1"]
    for extra in ([], ["--size", "16"]):  # found when reading the headers, or when decoding a batch
        assert main([*base, *extra]) == 2
        _one_line_error(capsys, str(bad), "not a readable image", "--skip-corrupt")
    out = tmp_path / "s.json"
    assert main([*base, "--skip-corrupt", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image" in err and str(bad) in err
    res = json.loads(out.read_text())
    assert res["images"] == 2 and res["skipped_corrupt"][0][0] == str(bad)
