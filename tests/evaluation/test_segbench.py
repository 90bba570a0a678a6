"""The segmentation cost benchmark runs end to end on a tiny case and writes its table (smoke test)."""

from __future__ import annotations

import json

from undiscard.evaluation.seg_bench import SegBenchCase, format_seg_bench, run_seg_bench


def test_seg_bench_smoke(tmp_path):
    case = SegBenchCase("tiny", "seg:deeplabv3-tiny", 64, 2, 1, budgets=[1, 3], rerun=[3], num_classes=5, data="noise")
    res = run_seg_bench([case], repeats=1, out_json=tmp_path / "b.json", log=lambda m: None)
    m = res["models"][0]
    assert [(r["engine"], r["budget"]) for r in m["rows"]] == [("trie", 1), ("trie", 3), ("rerun", 3)]
    assert all(r["ms_per_image"] > 0 and r["ratio"] > 0 for r in m["rows"]) and m["plain_ms_per_image"] > 0
    assert m["rows"][1]["engine_used"] == "trie" and m["rows"][2]["engine_used"] == "rerun"
    assert json.loads((tmp_path / "b.json").read_text())["models"][0]["space_size"] == 16
    table = format_seg_bench(res)
    assert "| tiny | 1x64x64 | 2 | 1 |" in table and "B=3 rerun" in table
