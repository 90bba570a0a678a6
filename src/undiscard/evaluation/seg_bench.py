"""The cost of the dense method (segmentation), side by side with the plain model.

``python -m undiscard.evaluation.seg_bench`` (``scripts/seg_bench.sh``): for each model, in one
process, every repeat runs every configuration once (interleaved), and the median of
the repeats is reported as ms per image and as a ratio to the plain forward:

* ``plain``: the model's logits at input resolution (:func:`undiscard.method.segment.dense_logits`);
* ``trie`` at ``B = 1, 4, 10``: :func:`undiscard.method.segment.wrap_segmentation` (criterion
  ``entropy``, width 1, aggregate ``mean``), the whole prediction: search (each state's
  forward through the shared-prefix engine, its softmax and pixel entropy at input
  resolution, the shifts) and aggregation;
* ``rerun``: the same with ``engine="rerun"`` (one batched forward per evaluated state).

The ideal for ``B`` states without sharing is ``B x plain``; shared prefixes give less.
Default models: the two shipped tiny models (``zoo/fmnist_seg_*.safetensors``, 96x96
Fashion-MNIST canvases, 1 thread, 16 images) and a random-weight torchvision
``deeplabv3_resnet50`` (21 classes, 256x256 noise images, 2 threads; its "inner" sites
hold 4 states, so it searches the three "main" sites: 64 states). Ratios from one
interleaved run are robust to other load on the machine; absolute milliseconds are not.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from undiscard.statefile import write_json_atomic

__all__ = ["SegBenchCase", "DEFAULT_CASES", "format_seg_bench", "run_seg_bench"]

ROOT = Path(__file__).resolve().parents[3]  # the repository (its zoo/ folder)


@dataclass
class SegBenchCase:
    """One model to time: ``spec`` as :func:`undiscard.models.segmenters.load_segmenter` takes it."""

    label: str
    spec: str
    size: int
    batch: int
    threads: int
    budgets: list[int] = field(default_factory=lambda: [1, 4, 10])
    rerun: list[int] = field(default_factory=lambda: [4, 10])  # budgets also timed with engine="rerun"
    searchable: Any = "inner"
    num_classes: int | None = None
    data: str = "canvas"  # "canvas": Fashion-MNIST test canvases; "noise": seeded N(0, 1) images


DEFAULT_CASES = [
    SegBenchCase("DeepLabV3-tiny (shipped)", "zoo/fmnist_seg_deeplabv3.safetensors", 96, 16, 1),
    SegBenchCase("SegFormer-tiny (shipped)", "zoo/fmnist_seg_segformer.safetensors", 96, 16, 1),
    SegBenchCase("torchvision deeplabv3_resnet50 (random weights)", "torchvision:deeplabv3_resnet50", 256, 4, 2,
                 searchable="main", num_classes=21, data="noise"),
]


def _load(case: SegBenchCase):
    from undiscard import compat
    from undiscard.models.segmenters import load_segmenter

    compat.ensure_torchvision()
    spec = case.spec
    if not spec.startswith(("torchvision:", "seg:", "smp:", "transformers:")) and not os.path.isabs(spec):
        spec = str(ROOT / spec) if (ROOT / spec).exists() else spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        loaded = load_segmenter(spec, num_classes=case.num_classes) if case.num_classes else load_segmenter(spec)
    c = int(loaded.input_size[0])
    if case.data == "canvas":
        from undiscard.data.segmentation import fashion_mnist_canvas

        x, _ = fashion_mnist_canvas("test", case.size, limit=case.batch)
        if x.shape[1] != c:
            x = x.expand(-1, c, -1, -1).contiguous()
    else:
        x = torch.randn(case.batch, c, case.size, case.size, generator=torch.Generator().manual_seed(0))
    return loaded, x


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_case(case: SegBenchCase, repeats: int = 3, log: Callable[[str], None] = print) -> dict:
    """Time one model: plain and every (engine, budget), interleaved; medians in ms per image."""
    from undiscard.method.segment import dense_logits, wrap_segmentation

    threads = torch.get_num_threads()
    torch.set_num_threads(case.threads)
    try:
        loaded, x = _load(case)
        model = loaded.model
        n = x.shape[0]
        configs: dict[str, Callable[[], Any]] = {"plain": lambda: dense_logits(model, x)}
        wrappers = {}
        shared_sites: dict = {}
        for engine, budgets in (("trie", case.budgets), ("rerun", case.rerun)):
            for b in budgets:
                w = wrap_segmentation(model, budget=b, criterion="entropy", aggregate="mean", engine=engine,
                                      searchable=case.searchable)
                w._sites = shared_sites  # find the sites once for all wrappers
                wrappers[(engine, b)] = w
                configs[f"{engine}|{b}"] = (lambda w=w: w(x))
        with torch.no_grad():
            sites = next(iter(wrappers.values())).sites_for(x)
            space = sites.space_size
            for key in [k for k in configs if k != "plain" and int(k.split("|")[1]) > space]:
                del configs[key]
                log(f"  {case.label}: skipping {key}: B exceeds the {space} states of sites {list(sites.searchable)}")
            heavy = case.size * case.size * case.batch > 96 * 96 * 64
            if not heavy:  # warm-up (allocator, the workspaces); heavy models only warm the plain forward
                for fn in configs.values():
                    fn()
            else:
                configs["plain"]()
            times: dict[str, list[float]] = {k: [] for k in configs}
            for r in range(repeats):
                for key, fn in configs.items():
                    times[key].append(_timed(fn))
                log(f"  {case.label}: repeat {r + 1}/{repeats} done")
        med = {k: statistics.median(v) for k, v in times.items()}
        plain = med["plain"]
        rows = []
        for key, t in med.items():
            if key == "plain":
                continue
            engine, b = key.split("|")
            w = wrappers[(engine, int(b))]
            rows.append({"engine": engine, "engine_used": w.last_engine if int(b) > 1 else "plain",
                         "budget": int(b), "ms_per_image": 1000 * t / n, "ratio": t / plain,
                         "ratio_per_state": t / plain / int(b), "rows_per_site": list(w.last_rows)})
        return {"label": case.label, "spec": case.spec, "input": [int(v) for v in x.shape[1:]], "batch": n,
                "threads": case.threads, "classes": int(loaded.num_classes), "searchable": list(sites.searchable),
                "space_size": space, "data": case.data, "repeats": repeats,
                "plain_ms_per_image": 1000 * plain / n, "rows": rows,
                "times_s": {k: v for k, v in times.items()}}
    finally:
        torch.set_num_threads(threads)


def run_seg_bench(cases: list[SegBenchCase] | None = None, repeats: int = 3, out_json: str | os.PathLike | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Run :func:`bench_case` for each case (default :data:`DEFAULT_CASES`); write the JSON if asked."""
    cases = DEFAULT_CASES if cases is None else cases
    t0 = time.perf_counter()
    results = []
    for case in cases:
        log(f"{case.label}: {case.size}x{case.size}, batch {case.batch}, {case.threads} thread(s)")
        results.append(bench_case(case, repeats, log))
    result = {"what": "segmentation cost: ms per image and ratio to the plain forward, median of interleaved repeats",
              "method": "wrap_segmentation(criterion='entropy', aggregate='mean', width=1): search + aggregation",
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__},
              "seconds": time.perf_counter() - t0, "models": results}
    if out_json is not None:
        write_json_atomic(result, out_json, indent=1)
    return result


def format_seg_bench(result: dict) -> str:
    """A markdown table: one row per model, ms/image (x plain) per engine and budget."""
    keys: list[tuple[str, int]] = []
    for m in result["models"]:
        for r in m["rows"]:
            if (r["engine"], r["budget"]) not in keys:
                keys.append((r["engine"], r["budget"]))
    keys.sort(key=lambda k: (k[0] != "trie", k[1]))
    head = ["model", "input", "batch", "threads", "states", "plain ms/img"] + [
        f"B={b}" + (" rerun" if e == "rerun" else "") for e, b in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in result["models"]:
        by = {(r["engine"], r["budget"]): r for r in m["rows"]}
        cells = []
        for k in keys:
            r = by.get(k)
            cells.append("-" if r is None else f"{r['ms_per_image']:.1f} ({r['ratio']:.1f}x)")
        c, h, w = m["input"]
        lines.append(f"| {m['label']} | {c}x{h}x{w} | {m['batch']} | {m['threads']} | {m['space_size']} "
                     f"(sites {m['searchable']}) | {m['plain_ms_per_image']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m undiscard.evaluation.seg_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the results here (e.g. results/seg_bench_cpu.json)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated substrings of the model labels to run")
    ap.add_argument("--r50-batch", type=int, default=None, help="batch of the deeplabv3_resnet50 case (default 4)")
    args = ap.parse_args(argv)
    cases = list(DEFAULT_CASES)
    if args.r50_batch:
        cases = [SegBenchCase(**{**c.__dict__, "batch": args.r50_batch}) if "resnet50" in c.spec else c for c in cases]
    if args.only:
        want = [s.strip().lower() for s in args.only.split(",") if s.strip()]
        cases = [c for c in cases if any(s in c.label.lower() or s in c.spec.lower() for s in want)]
    res = run_seg_bench(cases, args.repeats, args.json, log=lambda m: print(m, file=sys.stderr))
    print(format_seg_bench(res))
    print(f"({res['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
