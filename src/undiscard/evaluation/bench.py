"""The cost of recovered activations, measured against the plain model and the floor.

``undiscard bench`` (or ``python -m undiscard.evaluation.bench``): random-weight timm models at
224x224, one batch, CPU by default. For each budget B it times, interleaved in one run
(every repeat runs every configuration once, the median is reported):

* ``plain``: ``model(x)``;
* ``ours``: :func:`undiscard.wrap` with ``engine="trie"`` (entropy search, width 1,
  alignment on, mean aggregation): search + align + aggregate, the whole prediction;
* ``segments``: the same with ``engine="segments"`` (the graph captured once, no per-call
  interception);
* ``rerun``: the same search with ``engine="rerun"``: one full forward per evaluated
  state, what the authors' code does (it re-runs the network for every expansion).

The **floor** for the states a search evaluated is ``sum over segments of (segment time
per image) x (distinct prefixes reaching that segment)``: segment times are measured on
a plain forward (time stamps at the first call of each searchable site), the prefixes are
the rows :class:`~undiscard.run.trie.SharedPrefixEvaluator` computed. FLOPs come from
``torch.utils.flop_counter`` (the floor likewise from per-segment FLOPs). Peak memory is
the peak resident set of a fresh process running one configuration (on CUDA: the peak
of ``torch.cuda.max_memory_allocated``).

Batch-1 **latency** (one request at a time): ms per image, median (p50) and 90th
percentile (p90) over interleaved repeats, at B = 4 and 10: the entropy search on ours and
on segments, and the default order (displacement: every state in one pass) on segments.
**Options** (one model, B=10): channels_last and ``torch.compile`` for the plain model,
ours and segments; with a compiled model, ``segments`` compiles its captured graph
(the segments between the sites), ``ours`` runs the eager module under the compiled one.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from undiscard.errors import UndiscardError
from undiscard.evaluation.runio import PeakMemory
from undiscard.method.classify import wrap
from undiscard.sites.calls import BINDERS
from undiscard.sites.sitemap import SiteMap
from undiscard.sites.discover import find_sites

__all__ = ["run_bench", "format_markdown", "plot_bench"]

MODES = ("plain", "ours", "rerun")
#: the engine behind each timed mode of ours
ENGINE = {"ours": "trie", "segments": "segments", "rerun": "rerun"}
_DEVICE = {"type": "cpu"}


def _timm(name: str):
    from undiscard import compat

    compat.ensure_torchvision()
    try:
        import timm
    except ImportError:
        raise UndiscardError("the benchmark builds timm models: pip install 'undiscard[zoo]'") from None
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


class _Marks(TorchFunctionMode):
    """Calls ``mark(j)`` at the first call of each searchable site ``j`` in a forward."""

    def __init__(self, sites: SiteMap, mark: Callable[[int], None]) -> None:
        super().__init__()
        self.calls, self.mark, self.counter, self.seen = sites.calls, mark, 0, set()
        self.level = {si: j for j, si in enumerate(sites.searchable)}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        binder = BINDERS.get(func)
        call = binder(func, args, kwargs) if binder is not None else None
        if call is not None and call.strided and self.calls:
            site = self.calls[self.counter % len(self.calls)][2]
            self.counter += 1
            j = self.level.get(site)
            if j is not None and j not in self.seen:
                self.seen.add(j)
                self.mark(j)
        return func(*args, **kwargs)


def segment_profile(model, x: torch.Tensor, sites: SiteMap, repeats: int = 3) -> tuple[list[float], list[float]]:
    """Per-image seconds and FLOPs of the ``L + 1`` segments a plain forward splits into at
    the searchable sites (segment 0: before the first one)."""
    L = len(sites.searchable)
    n = x.shape[0]
    runs = []
    for _ in range(repeats + 1):
        stamps = [0.0] * (L + 1)
        t0 = time.perf_counter()

        def mark(j, stamps=stamps, t0=t0):
            stamps[j + 1] = time.perf_counter() - t0

        with torch.no_grad(), _Marks(sites, mark):
            model(x)
        total = time.perf_counter() - t0
        bounds = [0.0] + stamps[1:] + [total]
        runs.append([bounds[k + 1] - bounds[k] for k in range(L + 1)])
    runs = runs[1:]  # the first is warm-up
    times = [statistics.median(r[k] for r in runs) / n for k in range(L + 1)]
    fl = FlopCounterMode(display=False)
    marks = [0] * (L + 1)

    def fmark(j):
        marks[j + 1] = fl.get_total_flops()

    with torch.no_grad(), fl, _Marks(sites, fmark):
        model(x)
    bounds = [0] + marks[1:] + [fl.get_total_flops()]
    flops = [(bounds[k + 1] - bounds[k]) / n for k in range(L + 1)]
    return times, flops


def _floor(per_segment: Sequence[float], rows: Sequence[int], n: int) -> float:
    return per_segment[0] * n + sum(p * r for p, r in zip(per_segment[1:], rows))


def _flops(fn) -> int:
    fl = FlopCounterMode(display=False)
    with torch.no_grad(), fl:
        fn()
    return fl.get_total_flops()


def _sync() -> None:
    if _DEVICE["type"] == "cuda":
        torch.cuda.synchronize()


def _time(fn) -> float:
    _sync()
    t = time.perf_counter()
    with torch.no_grad():
        fn()
    _sync()
    return time.perf_counter() - t


def _peak_rss_mb(args: list[str]) -> float | None:
    """Peak RSS of a fresh process running one configuration (``--peak``)."""
    cmd = [sys.executable, "-m", "undiscard.evaluation.bench", "--peak", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return None
    return float(r.stdout.strip().splitlines()[-1])


def _peak_child(model_name: str, mode: str, budget: int, batch: int, size: int, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    model = _timm(model_name)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    _time(lambda: model(x[:1]))  # lazy initialisation out of the way
    with PeakMemory("cpu") as pm:  # the peak RSS (VmHWM) is reset: only the run below counts
        if mode == "plain":
            _time(lambda: model(x))
        else:
            u = wrap(model, budget, "entropy", "mean", engine=ENGINE[mode])
            _time(lambda: u(x))
    print(pm.mb if pm.mb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_bench(
    models: Sequence[str] = ("resnet18", "resnet50", "mobilenetv2_100"),
    *,
    size: int = 224,
    batch: int = 16,
    budgets: Sequence[int] = (1, 4, 10, 16),
    repeats: int = 3,
    threads: int = 0,
    channels_last: bool = False,
    memory: Sequence[tuple[str, int, int]] = (("resnet50", 10, 16), ("resnet50", 32, 8)),
    options: str | None = "resnet50",
    compile: bool = True,
    latency: Sequence[str] = ("resnet50", "mobilenetv2_100"),
    latency_repeats: int = 15,
    device: str = "cpu",
    log=print,
) -> dict:
    """Measure; see the module doc. ``memory``: ``(model, B, batch)`` peak-RSS points;
    ``options``: the model the channels_last / torch.compile variants are tried on (B=10);
    ``latency``: the models timed at batch 1."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UndiscardError("--device cuda: no CUDA device is available to torch")
    _DEVICE["type"] = dev.type
    result = {
        "device": str(dev) if dev.type != "cuda" else f"cuda ({torch.cuda.get_device_name(dev)})",
        "threads": torch.get_num_threads(), "size": size, "batch": batch,
        "budgets": list(budgets), "repeats": repeats, "channels_last": channels_last,
        "torch": torch.__version__, "models": {},
    }
    for name in models:
        model = _timm(name).to(dev)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        sites = find_sites(model, x[:1])
        seg_t, seg_f = segment_profile(model, x, sites)
        wrapped = {(m, b): wrap(model, b, "entropy", "mean", engine=ENGINE[m])
                   for m in ("ours", "segments", "rerun") for b in budgets}
        run = {("plain", 0): lambda: model(x)}
        for (m, b), u in wrapped.items():
            run[(m, b)] = (lambda u=u: u(x))
        log(f"{name}: {len(sites.searchable)} searchable sites, {sites.space_size} states; warm-up")
        _time(run[("plain", 0)])
        _time(run[("ours", budgets[-1])])
        _time(run[("segments", budgets[-1])])  # the capture, once per input size
        times: dict[tuple[str, int], list[float]] = {k: [] for k in run}
        for rep in range(repeats):
            for key, fn in run.items():  # interleaved: every configuration once per repeat
                times[key].append(_time(fn))
            log(f"  repeat {rep + 1}/{repeats}: plain {times[('plain', 0)][-1] * 1000:.0f} ms")
        plain = statistics.median(times[("plain", 0)])
        plain_flops = _flops(run[("plain", 0)])
        rows_out = []
        for b in budgets:
            row = {"B": b}
            for m in ("ours", "segments", "rerun"):
                t = statistics.median(times[(m, b)])
                fl = _flops(run[(m, b)])
                row[m] = {"s": t, "x_plain": t / plain, "flops": fl, "flops_x_plain": fl / plain_flops}
            rows = wrapped[("ours", b)].last_rows if b > 1 else [batch] * len(sites.searchable)
            row["rows"] = list(rows)
            floor_t = _floor(seg_t, rows, batch) if b > 1 else plain
            floor_f = _floor(seg_f, rows, batch) if b > 1 else plain_flops
            row["floor"] = {"s": floor_t, "x_plain": floor_t / plain, "flops_x_plain": floor_f / plain_flops}
            row["ours_over_floor"] = row["ours"]["s"] / floor_t
            row["segments_over_floor"] = row["segments"]["s"] / floor_t
            row["rerun_over_ours"] = row["rerun"]["s"] / row["ours"]["s"]
            rows_out.append(row)
        # where the time of one prediction goes (B = the largest <= 10)
        bb = max([b for b in budgets if 1 < b <= 10] or [budgets[-1]])
        u = wrapped[("ours", bb)]
        spent = {"align": 0.0, "aggregate": 0.0}
        align0 = u.split.align

        def timed_align(*a, **k):
            t = time.perf_counter()
            out = align0(*a, **k)
            spent["align"] += time.perf_counter() - t
            return out

        u.split.align = timed_align
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                found = u.search(x)
                t1 = time.perf_counter()
                u.combine(found)
                t2 = time.perf_counter()
        finally:
            u.split.align = align0
        spent["aggregate"] = t2 - t1
        share = {"B": bb, "total_s": t2 - t0, "align_s": spent["align"], "aggregate_s": spent["aggregate"],
                 "align_aggregate_share": (spent["align"] + spent["aggregate"]) / (t2 - t0)}
        result["models"][name] = {
            "searchable": list(sites.searchable), "space": sites.space_size, "plain_s": plain,
            "plain_flops": plain_flops, "segment_s": seg_t, "segment_flops": seg_f, "rows": rows_out, "share": share,
        }
        log(format_markdown({**result, "models": {name: result["models"][name]}}, with_targets=False))
    if latency:
        result["latency"] = {name: _latency(name, size, latency_repeats, dev, log) for name in latency}
    if options:
        result["options"] = _options(options, size, batch, repeats, compile, dev, log)
    peaks = []
    for name, b, n in (memory if dev.type == "cpu" else ()):
        pk = {"model": name, "B": b, "batch": n}
        for m in MODES:
            pk[m] = _peak_rss_mb([name, m, str(b), str(n), str(size), str(threads)])
        log(f"peak RSS {name} B={b} batch {n}: " + ", ".join(f"{m} {pk[m]:.0f} MB" for m in MODES if pk[m]))
        peaks.append(pk)
    result["memory"] = peaks
    return result


def _p90(v: Sequence[float]) -> float:
    """The 90th percentile, interpolated between the order statistics."""
    return statistics.quantiles(v, n=10, method="inclusive")[-1] if len(v) > 1 else v[0]


def _latency(name: str, size: int, repeats: int, dev: torch.device, log) -> dict:
    """Batch 1: ms per image, p50 and p90, at B = 4 and 10 (interleaved): the entropy search
    (one pass per step) on ours and on segments, and the default order (displacement, which
    looks at no output: every state in one pass) on segments; with each one's FLOPs."""
    model = _timm(name).to(dev)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dev)
    run = {("plain", "-", 1): lambda: model(x)}
    for b in (4, 10):
        for m, crit, agg in (("ours", "entropy", "mean"), ("segments", "entropy", "mean"),
                             ("segments", "displacement", "entropy")):
            u = wrap(model, b, crit, agg, engine=ENGINE[m])
            run[(m, crit, b)] = (lambda u=u: u(x))
    for fn in run.values():  # warm-up (and the capture)
        _time(fn)
    times: dict = {k: [] for k in run}
    for _ in range(repeats):
        for k, fn in run.items():
            times[k].append(_time(fn))
    p50 = statistics.median(times[("plain", "-", 1)])
    f0 = _flops(run[("plain", "-", 1)])
    out = {"repeats": repeats, "rows": [
        {"mode": m, "search": crit, "B": b, "p50_ms": 1000 * statistics.median(t), "p90_ms": 1000 * _p90(t),
         "x_plain": statistics.median(t) / p50, "flops_x_plain": _flops(run[(m, crit, b)]) / f0}
        for (m, crit, b), t in times.items()]}
    log(f"batch-1 latency {name}: " + ", ".join(f"{r['mode']} {r['search']} B={r['B']} {r['p50_ms']:.0f} ms"
                                                for r in out["rows"]))
    return out


def _options(name: str, size: int, batch: int, repeats: int, compile: bool, dev: torch.device, log) -> dict:
    """channels_last and torch.compile for the plain model, ours and segments at B=10."""
    base = _timm(name).to(dev)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    variants = {"default": (base, x)}
    cl = _timm(name).to(dev).to(memory_format=torch.channels_last)
    variants["channels_last"] = (cl, x.contiguous(memory_format=torch.channels_last))
    out: dict = {"model": name, "B": 10}
    if compile:
        try:
            comp = torch.compile(_timm(name).to(dev))
            t = _time(lambda: comp(x))
            out["compile_s"] = t
            variants["compile"] = (comp, x)
        except Exception as e:  # no compiler on this machine, ...
            out["compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    run = {}
    for v, (m, xx) in variants.items():
        run[(v, "plain")] = (lambda m=m, xx=xx: m(xx))
        for mode in ("ours", "segments"):
            u = wrap(m, 10, "entropy", "mean", engine=ENGINE[mode])
            run[(v, mode)] = (lambda u=u, xx=xx: u(xx))
    for k, fn in run.items():
        t = _time(fn)
        if k == ("compile", "segments"):
            out["compile_segments_s"] = t
    times: dict = {k: [] for k in run}
    for _ in range(repeats):
        for k, fn in run.items():
            times[k].append(_time(fn))
    base_plain = statistics.median(times[("default", "plain")])
    med = {k: statistics.median(t) for k, t in times.items()}
    out["variants"] = {v: {"plain_s": med[(v, "plain")], "ours_s": med[(v, "ours")], "segments_s": med[(v, "segments")],
                           "plain_x_default": med[(v, "plain")] / base_plain,
                           "ours_x_plain": med[(v, "ours")] / med[(v, "plain")],
                           "ours_x_default_ours": med[(v, "ours")] / med[("default", "ours")],
                           "segments_x_default_ours": med[(v, "segments")] / med[("default", "ours")]}
                       for v in variants}
    log("options: " + ", ".join(f"{v} plain {d['plain_s'] * 1000:.0f} ms ours {d['ours_s'] * 1000:.0f} ms "
                                f"segments {d['segments_s'] * 1000:.0f} ms" for v, d in out["variants"].items()))
    return out


TARGETS = ("B=1 <= 1.03x plain; resnet50 B=10 <= 10x plain and <= 1.2x the floor; mobilenetv2_100 B=10 (segments) "
           "<= 1.05x the floor; align + aggregate <= 5%; peak RSS at B=32, batch 8 <= 2 GB; resnet50 B=10 compiled "
           "segments <= 0.9x eager ours; batch 1 resnet50 B=4 <= 3x and B=10 <= 7x the plain latency "
           "(on a GPU: B=10 <= 3x)")


def targets(result: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the performance targets of :data:`TARGETS` that this result covers."""
    out = []
    for name, m in result["models"].items():
        for r in m["rows"]:
            if r["B"] == 1:
                out.append((f"{name} B=1 <= 1.03x plain", f"{r['ours']['x_plain']:.2f}x", r["ours"]["x_plain"] <= 1.03))
    r50 = result["models"].get("resnet50")
    if r50:
        for r in r50["rows"]:
            if r["B"] == 10:
                out.append(("resnet50 B=10 <= 10x plain", f"{r['ours']['x_plain']:.2f}x", r["ours"]["x_plain"] <= 10))
                out.append(("resnet50 B=10 within 1.2x of the trie floor", f"{r['ours_over_floor']:.2f}x",
                            r["ours_over_floor"] <= 1.2))
    mb = result["models"].get("mobilenetv2_100")
    if mb:
        for r in mb["rows"]:
            if r["B"] == 10 and "segments_over_floor" in r:
                out.append(("mobilenetv2_100 B=10 (segments) within 1.05x of the floor", f"{r['segments_over_floor']:.2f}x",
                            r["segments_over_floor"] <= 1.05))
    if r50:
        for r in r50["rows"]:
            if r["B"] == 10 and "segments" in r:
                out.append(("resnet50 B=10: segments no slower than ours (trie)",
                            f"{r['segments']['s'] / r['ours']['s']:.2f}x", r["segments"]["s"] <= r["ours"]["s"] * 1.02))
    opt = result.get("options") or {}
    comp = (opt.get("variants") or {}).get("compile")
    if comp and "segments_x_default_ours" in comp:
        out.append((f"{opt['model']} B=10: compiled segments <= 0.9x eager ours", f"{comp['segments_x_default_ours']:.2f}x",
                    comp["segments_x_default_ours"] <= 0.9))
    lat = (result.get("latency") or {}).get("resnet50")
    if lat:
        gpu = str(result.get("device", "")).startswith("cuda")
        for b, cap in ((4, 3.0), (10, 3.0 if gpu else 7.0)):
            best = min(r["x_plain"] for r in lat["rows"] if r["B"] == b)
            out.append((f"batch 1 resnet50 B={b} <= {cap:g}x the plain latency (best engine and search, p50)", f"{best:.2f}x",
                        best <= cap))
    for name, m in result["models"].items():
        s = m["share"]
        out.append((f"{name} align + aggregate <= 5% (B={s['B']})", f"{100 * s['align_aggregate_share']:.1f}%",
                    s["align_aggregate_share"] <= 0.05))
    for pk in result.get("memory", []):
        if pk["B"] == 32 and pk.get("ours"):
            out.append((f"{pk['model']} peak RSS at B=32, batch {pk['batch']} <= 2 GB", f"{pk['ours'] / 1024:.2f} GB",
                        pk["ours"] <= 2048))
    return out


def format_markdown(result: dict, with_targets: bool = True) -> str:
    lines = []
    for name, m in result["models"].items():
        lines += [
            f"**timm {name}** (random weights), {result['size']}x{result['size']}, batch {result['batch']}, "
            f"{result['device']} with {result['threads']} threads: plain forward {m['plain_s'] * 1000:.0f} ms "
            f"({m['plain_flops'] / 1e9 / result['batch']:.2f} GFLOP/image); searchable sites {m['searchable']} "
            f"({m['space']} states). Median of {result['repeats']} interleaved repeats.",
            "",
            "| B | ours x plain | segments x plain | rerun x plain | rerun / ours | floor x plain | ours / floor "
            "| segments / floor | FLOPs ours / rerun / floor (x plain) | rows per site |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            seg = r.get("segments")
            lines.append(
                f"| {r['B']} | {r['ours']['x_plain']:.2f} | {seg['x_plain'] if seg else float('nan'):.2f} | "
                f"{r['rerun']['x_plain']:.2f} | {r['rerun_over_ours']:.2f} | "
                f"{r['floor']['x_plain']:.2f} | {r['ours_over_floor']:.2f} | {r.get('segments_over_floor', float('nan')):.2f} | "
                f"{r['ours']['flops_x_plain']:.2f} / "
                f"{r['rerun']['flops_x_plain']:.2f} / {r['floor']['flops_x_plain']:.2f} | {r['rows']} |"
            )
        s = m["share"]
        lines += ["", f"Alignment + aggregation at B={s['B']}: {1000 * s['align_s']:.1f} + {1000 * s['aggregate_s']:.1f} ms "
                  f"of {1000 * s['total_s']:.0f} ms ({100 * s['align_aggregate_share']:.1f}%).", ""]
    if result.get("latency"):
        lines += [f"Batch-1 latency ({result['size']}x{result['size']}, {result['device']}), ms per image over "
                  "interleaved repeats:", "",
                  "| model | engine | search | B | p50 ms | p90 ms | p50 x plain | FLOPs x plain |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, lat in result["latency"].items():
            for r in lat["rows"]:
                fl = r.get("flops_x_plain")
                lines.append(f"| {name} | {r['mode']} | {r.get('search', 'entropy')} | {r['B']} | {r['p50_ms']:.1f} | "
                             f"{r['p90_ms']:.1f} | {r['x_plain']:.2f} | {'-' if fl is None else f'{fl:.2f}'} |")
        lines.append("")
    if result.get("memory"):
        lines += ["| peak RSS (fresh process) | plain | ours | rerun |", "|---|---|---|---|"]
        for pk in result["memory"]:
            cells = [f"{pk[m]:.0f} MB" if pk.get(m) else "failed" for m in MODES]
            lines.append(f"| {pk['model']} B={pk['B']}, batch {pk['batch']} | " + " | ".join(cells) + " |")
        lines.append("")
    opt = result.get("options")
    if opt:
        ours0 = opt["variants"]["default"]["ours_s"]
        lines += [f"Options on {opt['model']} (B={opt['B']}, one more interleaved run; absolute times differ from the "
                  "table above by the machine's drift): " + "; ".join(
            f"{v}: plain {d['plain_s'] * 1000:.0f} ms ({d['plain_x_default']:.2f}x default), ours {d['ours_s'] * 1000:.0f} ms "
            f"({d['ours_s'] / ours0:.2f}x default ours)"
            + (f", segments {d['segments_s'] * 1000:.0f} ms ({d['segments_s'] / ours0:.2f}x default ours)"
               if "segments_s" in d else "")
            for v, d in opt["variants"].items())
            + (f"; the compiled model's first call took {opt['compile_s']:.0f} s (inductor cache warm)" if "compile_s" in opt else "")
            + (f", the compiled segments' first call {opt['compile_segments_s']:.0f} s" if "compile_segments_s" in opt else "")
            + (f"; torch.compile failed: {opt['compile_error']}" if "compile_error" in opt else "") + ".", ""]
    if with_targets:
        lines += ["| target | measured | met |", "|---|---|---|"]
        for t, v, ok in targets(result):
            lines.append(f"| {t} | {v} | {'yes' if ok else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def plot_bench(result: dict, path: str | os.PathLike) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UndiscardError("--plot needs matplotlib: pip install 'undiscard[plot]'") from None
    names = list(result["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = result["models"][name]["rows"]
        bs = [r["B"] for r in rows]
        for key, style in (("rerun", "o--"), ("ours", "o-"), ("floor", "k:")):
            ax.plot(bs, [r[key]["x_plain"] for r in rows], style, label=key)
        ax.plot(bs, bs, color="0.8", lw=1, label="B x plain")
        ax.set_title(f"{name}, batch {result['batch']}, {result['device']}")
        ax.set_xlabel("budget B (states per image)")
        ax.set_ylabel("time / plain forward")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_readme(result: dict, readme: str | os.PathLike, tag: str | None = None) -> None:
    """Replace the text of a Markdown file between ``<!-- {tag}:start -->`` and ``<!-- {tag}:end -->``
    (``tag`` None: ``bench-gpu`` for a CUDA measurement, ``bench`` otherwise)."""
    gpu = str(result.get("device", "")).startswith("cuda")
    tag = tag or ("bench-gpu" if gpu else "bench")
    p = Path(readme)
    text = p.read_text()
    a, b = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    if a not in text or b not in text:
        raise UndiscardError(f"{p} has no {a} ... {b} markers")
    script = "scripts/gpu_check.sh" if gpu else "scripts/bench.sh"
    body = (f"\nGenerated by `bash {script}` (`undiscard bench`); do not edit by hand. "
            f"Targets: {TARGETS}.\n\n" + format_markdown(result))
    p.write_text(text[: text.index(a) + len(a)] + body + text[text.index(b):])


def main(argv: Sequence[str] | None = None) -> int:
    """The child process that measures one configuration's peak memory (``--peak NAME MODE B N SIZE THREADS``);
    the benchmark itself is ``undiscard bench``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["--peak"] or len(argv) != 7:
        print("python -m undiscard.evaluation.bench runs the peak-memory child of `undiscard bench`; run the "
              "benchmark with `undiscard bench` (see `undiscard bench --help`)", file=sys.stderr)
        return 2
    name, mode, b, n, size, threads = argv[1:7]
    _peak_child(name, mode, int(b), int(n), int(size), int(threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())

