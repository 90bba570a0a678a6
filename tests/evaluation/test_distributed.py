"""`undiscard eval` under torchrun, and its per-shard resumable state.

The distributed runs launch ``python -m torch.distributed.run --standalone`` (a free
rendezvous port each time) with 2 CPU processes on gloo; their numbers must equal those
of one process exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import undiscard.evaluation.classify as ev
from undiscard.cli.app import main

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "zoo" / "fmnist_resnet18.safetensors"
# 24 images in batches of 4: 6 batches, 3 per rank. One thread, so that both runs do the same arithmetic.
ARGS = [str(SHIPPED), "--limit", "24", "--batch-size", "4", "--budget", "1,2", "--threads", "1",
        "--timing-images", "2", "--repeats", "1"]
TIMING_KEYS = {"ms_per_image", "time_ratio", "peak_memory_mb"}  # measured, not computed


def _metrics(res: dict) -> dict:
    """Everything but the cost: must be identical however many processes ran."""
    return {
        "images": res["images"],
        "config": res["config"],
        "plain": {k: v for k, v in res["plain"].items() if k not in TIMING_KEYS},
        "rows": [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in res["rows"]],
    }


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _torchrun(*argv: str, module: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *(["-m", "undiscard"] if module else []), *argv]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # --threads 1 in-process must not slow the rest of the suite


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One process, in this process: the numbers every sharded run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "one.json"
    n = torch.get_num_threads()
    try:
        assert main(["eval", *ARGS, "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads(out.read_text())
    assert res["processes"] == 1 and res["timing"]["measured_on"] == "one process"
    return res


def test_torchrun_gives_the_numbers_of_one_process(tmp_path, reference):
    out = tmp_path / "two.json"
    r = _torchrun("eval", *ARGS, "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert _metrics(res) == _metrics(reference)
    assert res["plain"]["n"] == 24 and res["processes"] == 2
    assert res["timing"]["measured_on"].startswith("rank 0 of 2")
    assert r.stdout.count("criterion  aggregate") == 1  # the table, printed by rank 0 only
    assert "timing on rank 0 alone" in r.stdout and "[rank 1/2]" not in r.stdout
    assert not list(tmp_path.glob("*.partial.*")), "shard states must be deleted once the JSON is written"


INTERRUPT = textwrap.dedent("""
    # rank 1 stops (Ctrl-C) right after saving its first batch: an interrupted torchrun eval
    import os, sys
    import undiscard.evaluation.classify as ev
    from undiscard.cli.app import main

    if os.environ["RANK"] == "1":
        real = ev._save_atomic

        def save_then_stop(obj, path):
            real(obj, path)
            raise KeyboardInterrupt

        ev._save_atomic = save_then_stop
    sys.exit(main())
""")


def test_interrupted_torchrun_resumes_every_shard_to_the_same_numbers(tmp_path, reference, capsys, keep_threads):
    out = tmp_path / "two.json"
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT)
    r = _torchrun(str(script), "eval", *ARGS, "--json", str(out), module=False)
    assert r.returncode != 0 and not out.exists()
    shard1 = tmp_path / "two.shard1of2.partial.safetensors"
    saved = ev.read_partial(shard1)
    assert saved["done"] == 4 and saved["batches"] == 1 and saved["index"] == [4, 5, 6, 7]  # batch 1 of 6
    assert saved["shard"] == [1, 2] and not (tmp_path / "two.partial.safetensors").exists()

    # one process cannot resume what two saved: a clear error, nothing deleted
    assert main(["eval", *ARGS, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "run with 2 process(es); this run has 1" in err and "--fresh" in err and "Traceback" not in err
    assert shard1.exists()

    r = _torchrun("eval", *ARGS, "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[rank 1/2] resuming at image 4/12 of shard 1" in r.stderr
    assert _metrics(json.loads(out.read_text())) == _metrics(reference)
    assert not list(tmp_path.glob("two.*partial*"))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> bytes:
    """The saved state of a one-process eval interrupted (Ctrl-C) after its first batch of 4 images."""
    out = tmp_path_factory.mktemp("cut") / "r.json"
    real, n = ev._save_atomic, torch.get_num_threads()

    def save_then_stop(obj, path):
        real(obj, path)
        raise KeyboardInterrupt

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ev, "_save_atomic", save_then_stop)
            assert main(["eval", *ARGS, "--json", str(out)]) == 130  # "interrupted; ... run the same command to resume"
    finally:
        torch.set_num_threads(n)
    partial = out.with_suffix(".partial.safetensors")
    state = ev.read_partial(partial)
    assert state["done"] == 4 and state["index"] == [0, 1, 2, 3] and not out.exists()
    return partial.read_bytes()


def test_fresh_ignores_a_saved_partial(tmp_path, reference, interrupted, capsys, keep_threads):
    out = tmp_path / "r.json"
    partial = out.with_suffix(".partial.safetensors")
    # tamper with the saved first batch: every plain prediction wrong
    partial.write_bytes(interrupted)
    state = ev.read_partial(partial)
    k = sum(state["acc"]["plain"]["correct"])
    assert k > 0
    state["acc"]["plain"]["correct"] = [0] * 4
    ev._save_atomic(state, partial)
    tampered = partial.read_bytes()

    assert main(["eval", *ARGS, "--json", str(out)]) == 0  # resumes: the tampered batch is used
    assert "resuming at image 4/24" in capsys.readouterr().err
    resumed = json.loads(out.read_text())
    assert resumed["plain"]["top1"] == pytest.approx(reference["plain"]["top1"] - 100 * k / 24)
    assert not partial.exists()

    partial.write_bytes(tampered)
    assert main(["eval", *ARGS, "--json", str(out), "--fresh"]) == 0  # starts over: the reference numbers
    err = capsys.readouterr().err
    assert f"--fresh: deleted {partial}" in err and "resuming" not in err
    assert _metrics(json.loads(out.read_text())) == _metrics(reference)
    assert not partial.exists()


def test_other_arguments_with_a_saved_partial_are_refused(tmp_path, interrupted, capsys, keep_threads):
    out = tmp_path / "r.json"
    partial = out.with_suffix(".partial.safetensors")
    partial.write_bytes(interrupted)
    argv = list(ARGS)
    argv[argv.index("1,2")] = "1,3"
    assert main(["eval", *argv, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "undiscard: error:" in err and "other arguments" in err and "--fresh" in err and "Traceback" not in err
    assert "budgets: saved [1, 2], now [1, 3]" in err
    assert partial.read_bytes() == interrupted and not out.exists()  # refused: nothing touched
    assert main(["eval", *argv, "--json", str(out), "--fresh"]) == 0
    assert json.loads(out.read_text())["config"]["budgets"] == [1, 3] and not partial.exists()


def test_world_size_without_torchrun_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert main(["eval", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not" in err and "torchrun" in err
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert main(["eval", *ARGS]) == 2
    assert "RANK must be in 0..1" in capsys.readouterr().err


def test_merge_puts_interleaved_shards_back_in_image_order():
    # batches of 2 over 5 images on 2 ranks: rank 0 has batches 0, 2 (images 0,1,4), rank 1 batch 1 (2,3)
    def part(index):
        return {"index": index, "acc": {"plain": {"conf": [i / 10 for i in index], "correct": [i % 2 for i in index],
                                                  "correct5": [1 for _ in index], "nll": [float(i) for i in index]}}}

    accs = ev._merge([part([0, 1, 4]), part([2, 3])], 5)
    assert accs["plain"].nll == [0.0, 1.0, 2.0, 3.0, 4.0] and accs["plain"].correct == [0, 1, 0, 1, 0]
    with pytest.raises(ev.UndiscardError, match="not the 5 images"):
        ev._merge([part([0, 1, 4]), part([2, 4])], 5)  # overlapping shards
    empty = {"index": [], "acc": {}}  # a rank with no batch (more ranks than batches)
    assert ev._merge([part([0, 1]), empty], 2)["plain"].nll == [0.0, 1.0]
